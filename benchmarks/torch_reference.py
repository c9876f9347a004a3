"""PyTorch (CPU) reference implementations of kdface's losses, for the loss-throughput benchmark.

Two kinds, written from the math (no code copied):

* **Peer formulations** (``*_official``, ``*_broadcast``, ``*_torchdistill``, ``*_park``): the
  way the public reference code computes each loss today, with its memory shape.
  - ``pwr_dense_official``: the official PWR code's math (Nikitin et al. 2020's MXNet loss): scores
    from ``e @ e.T`` (``1 - cos`` for cosine), the upper triangle as M = N(N-1)/2 scores, the
    ``[M, M]`` matrices of student and teacher score differences, the float mask of teacher order,
    the margin-shifted difference, the inversion penalty, masked sum / mask sum.
  - ``mmd_broadcast``: the transfer-learning library's multi-kernel MMD: a ``(2n, 2n, d)``
    broadcast difference of the pooled samples, squared and summed to distances, bandwidth from
    the mean distance, Gaussian kernels at bandwidth x multipliers, ``mean(XX + YY - XY - YX)``.
  - ``rkd_distance_torchdistill`` / ``rkd_angle_torchdistill``: torchdistill's RKD: pairwise
    distances from the Gram matrix (diagonal set to 0, mean over non-zero distances), and angles
    from the ``[N, N, D]`` difference tensor, normalized, and the ``[N, N, N]`` batched product;
    smooth-L1 averaged over all ``N^2`` / ``N^3`` entries.
  - ``darkrank_hard_park``: Park et al.'s hard DarkRank: teacher-sorted student scores and a
    Python loop of tail log-sum-exps.
* **Best-effort PyTorch versions of kdface's algorithms** (``*_torch``): GEMM-based MK-MMD, Gram-
  based RKD with RKD-A in cache-sized tiles whose pass also forms the Gram gradient (a custom
  autograd Function, as kdface's ``custom_jvp``), tiled PWR blocks under checkpointing, and
  the sort-based PWR (``_torch_pwr_sorted``); they show what the framework alone buys.

Constants follow kdface so that values agree (the test ``tests/test_benchmarks_reference.py``
checks it): MK-MMD uses Wang et al. 2019's kernel ``exp(-d^2 / (2 sigma^2 m))``, m in
``(1, 2, 4, 8, 16)``, averaged (the library's own kernel omits the 2, centres the multipliers on
sigma^2 and sums the kernels, which changes constants, not cost). The PWR margin is folded into
every inversion, RankNet included, as kdface defines it (the official code ignores the margin for
RankNet). RKD keeps torchdistill's normalization (means over all ``N^2`` / ``N^3`` entries):
``KDFACE_SCALE`` converts to kdface's means over distinct pairs / triplets.

Every function takes ``student``/``teacher`` float tensors (``[N, D]``, or logits ``[N, C]``)
and returns a scalar tensor; gradients flow to the student only (the teacher is frozen).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from benchmarks._torch_pwr_sorted import pwr_pair_values, pwr_scores
from benchmarks._torch_pwr_sorted import pwr_sorted_torch  # noqa: F401  (re-export)

Tensor = torch.Tensor

# Multiply a torchdistill-normalized value by KDFACE_SCALE[name](N) to get kdface's value.
KDFACE_SCALE = {
    "rkd_distance": lambda n: n / (n - 1),
    "rkd_angle": lambda n: n * n / ((n - 1) * (n - 2)),
}


# ------------------------------------------------------------------------------------ PWR

def _l2_normalize(e: Tensor) -> Tensor:
    """MXNet-style instance L2 normalization (eps inside the sqrt, as kdface)."""
    return e / torch.sqrt((e * e).sum(dim=1, keepdim=True) + 1e-12)


def _official_scores(e: Tensor, relation: str) -> Tensor:
    """``[M]`` pair scores as the official code: ``1 - cos`` or ``sqrt(max(d^2, 1e-12))``."""
    e = _l2_normalize(e)
    prod = e @ e.T
    if relation == "cosine":
        scores = 1.0 - prod
    else:
        sq = (e * e).sum(dim=1)
        scores = torch.sqrt(torch.clamp(sq[:, None] + sq[None, :] - 2.0 * prod, min=1e-12))
    rows, cols = torch.triu_indices(e.shape[0], e.shape[0], offset=1)
    return scores[rows, cols]


def pwr_dense_official(student: Tensor, teacher: Tensor, *, relation: str = "cosine",
                       inversion: str = "exp", margin: str = "teacher_diff",
                       margin_value: float = 0.0, power: float = 1.0,
                       beta: float = 1.0) -> Tensor:
    """PWR (Nikitin et al. 2020 eq. 3) as the official code computes it, with ``[M, M]`` tensors.

    Distances (``1 - cos``) instead of kdface's similarities give the same loss (see
    ``kdface.losses._pwr``). ``power`` adds the official 1e-12 inside the power."""
    s = _official_scores(student, relation)
    with torch.no_grad():
        t = _official_scores(teacher, relation)
        diff_label = t[:, None] - t[None, :]
        is_greater = (diff_label > 0).to(s.dtype)
    diff_pred = s[:, None] - s[None, :]
    if margin == "teacher_diff":
        shift: Tensor | float = diff_label
    elif margin == "teacher_std":
        shift = torch.std(t, unbiased=False)
    elif margin == "const":
        shift = margin_value
    else:
        shift = 0.0
    scores_diff = -diff_pred + shift
    if inversion == "ranknet":
        diff_loss = torch.log(1.0 + torch.exp(beta * scores_diff))
    elif inversion in ("diff", "power"):
        diff_loss = torch.pow(F.relu(scores_diff) + 1e-12, power if inversion == "power" else 1.0)
    else:
        diff_loss = F.relu(torch.exp(beta * scores_diff) - 1.0)
    return (diff_loss * is_greater).sum() / is_greater.sum()


def pwr_penalty(z: Tensor, inversion: str, power: float, beta: float) -> Tensor:
    """The inversion penalty of kdface (0 with slope 0 at ``z <= 0`` except RankNet)."""
    pos = z > 0
    if inversion == "ranknet":
        return F.softplus(beta * z)
    if inversion == "exp":
        return torch.where(pos, torch.expm1(beta * torch.where(pos, z, 0.0)), 0.0)
    if inversion == "power" and power != 1.0:
        return torch.where(pos, torch.where(pos, z, 1.0) ** power, 0.0)
    return torch.where(pos, z, 0.0)


def ordered_pair_count(t: Tensor) -> Tensor:
    """Number of ordered pairs with ``t_a > t_b`` (int64, no overflow)."""
    return torch.searchsorted(torch.sort(t).values, t, right=False).sum()


def _pwr_block(t_rows: Tensor, y_rows: Tensor, t: Tensor, x: Tensor, inversion: str,
               power: float, beta: float) -> Tensor:
    ordered = t_rows[:, None] > t[None, :]
    z = x[None, :] - y_rows[:, None]
    return torch.where(ordered, pwr_penalty(z, inversion, power, beta), 0.0).sum()


def _pwr_exp_block(t_rows: Tensor, y_rows: Tensor, ey_rows: Tensor, t: Tensor, x: Tensor,
                   ex: Tensor) -> Tensor:
    # exp(beta (x_b - y_a)) - 1 = ex_b * ey_a - 1: no per-pair exp.
    keep = (t_rows[:, None] > t[None, :]) & (x[None, :] > y_rows[:, None])
    return torch.where(keep, ex[None, :] * ey_rows[:, None] - 1.0, 0.0).sum()


def pwr_tiled_torch(student: Tensor, teacher: Tensor, *, relation: str = "cosine",
                    inversion: str = "exp", margin: str = "teacher_diff",
                    margin_value: float = 0.0, power: float = 1.0, beta: float = 1.0,
                    block_elements: int = 1 << 22) -> Tensor:
    """Best-effort tiled PWR: row blocks of the comparison matrix, each under
    ``torch.utils.checkpoint`` so the backward pass recomputes it (memory O(M + block))."""
    if relation != "cosine":
        raise ValueError("the torch tiled reference implements relation='cosine' only")
    s = pwr_scores(student)
    with torch.no_grad():
        t = pwr_scores(teacher)
    x, y = pwr_pair_values(s, t, margin, margin_value)
    m = s.shape[0]
    rows = max(1, min(m, block_elements // m))
    total = s.new_zeros(())
    if inversion == "exp" and beta * 4.01 <= 60.0:   # factorization safe in float32
        mid = 0.5 * (x.max() + y.min()).detach()
        ex, ey = torch.exp(beta * (x - mid)), torch.exp(-beta * (y - mid))
        for a in range(0, m, rows):
            sl = slice(a, a + rows)
            total = total + checkpoint(_pwr_exp_block, t[sl], y[sl], ey[sl], t, x, ex,
                                       use_reentrant=False)
    else:
        for a in range(0, m, rows):
            sl = slice(a, a + rows)
            total = total + checkpoint(_pwr_block, t[sl], y[sl], t, x, inversion, power, beta,
                                       use_reentrant=False)
    count = ordered_pair_count(t)
    return total / count.clamp(min=1).to(total.dtype)


# --------------------------------------------------------------------------------- MK-MMD

def mmd_broadcast(x: Tensor, y: Tensor, *, multipliers=(1, 2, 4, 8, 16),
                  normalize: bool = True) -> Tensor:
    """Biased MK-MMD^2 from a ``(2n, 2n, d)`` broadcast (``x``, ``y``: ``[n, d]`` each)."""
    if normalize:
        x, y = _l2_normalize(x), _l2_normalize(y)
    n = x.shape[0]
    total = torch.cat([x, y], dim=0)
    p = total.shape[0]
    total0 = total.unsqueeze(0).expand(p, p, total.shape[1])
    total1 = total.unsqueeze(1).expand(p, p, total.shape[1])
    l2_distance = ((total0 - total1) ** 2).sum(2)
    sigma2 = l2_distance.detach().sum() / (p * p - p)
    kernels = sum(torch.exp(-l2_distance / (2.0 * sigma2 * m)) for m in multipliers)
    kernels = kernels / len(multipliers)
    xx, yy = kernels[:n, :n], kernels[n:, n:]
    xy, yx = kernels[:n, n:], kernels[n:, :n]
    return torch.mean(xx + yy - xy - yx)


def _kernel_sum(a: Tensor, b: Tensor, coefs: list[Tensor]) -> Tensor:
    sq_a, sq_b = (a * a).sum(dim=1), (b * b).sum(dim=1)
    d2 = torch.clamp(sq_a[:, None] + sq_b[None, :] - 2.0 * (a @ b.T), min=0.0)
    k = torch.exp(-coefs[0] * d2)
    for c in coefs[1:]:
        k = k + torch.exp(-c * d2)
    return k.sum() / len(coefs)


def mmd_gemm_torch(x: Tensor, y: Tensor, *, multipliers=(1, 2, 4, 8, 16),
                   normalize: bool = True) -> Tensor:
    """Best-effort biased MK-MMD^2: squared distances from one GEMM per block (centred inputs),
    the kernels summed in one pass; no ``(2n, 2n, d)`` tensor."""
    if normalize:
        x, y = _l2_normalize(x), _l2_normalize(y)
    n, m = x.shape[0], y.shape[0]
    z = torch.cat([x, y], dim=0)
    zc = z - z.mean(dim=0, keepdim=True)
    sigma2 = (2.0 * (zc * zc).sum() / (z.shape[0] - 1)).detach().clamp(min=1e-12)
    coefs = [1.0 / (2.0 * sigma2 * mult) for mult in multipliers]
    center = z.mean(dim=0, keepdim=True).detach()
    x, y = x - center, y - center
    return (_kernel_sum(x, x, coefs) / (n * n) + _kernel_sum(y, y, coefs) / (m * m)
            - 2.0 * _kernel_sum(x, y, coefs) / (n * m))


# ------------------------------------------------------------------------------------ RKD

def _pdist_torchdistill(e: Tensor, eps: float = 1e-12) -> Tensor:
    sq = e.pow(2).sum(dim=1)
    d = torch.clamp(sq[:, None] + sq[None, :] - 2.0 * (e @ e.T), min=eps).sqrt().clone()
    idx = torch.arange(e.shape[0])
    d[idx, idx] = 0.0
    return d


def rkd_distance_torchdistill(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD-D: smooth-L1 of mean-normalized distances, averaged over all ``N^2`` entries."""
    with torch.no_grad():
        t_d = _pdist_torchdistill(teacher)
        t_d = t_d / t_d[t_d > 0].mean()
    d = _pdist_torchdistill(student)
    d = d / d[d > 0].mean()
    return F.smooth_l1_loss(d, t_d)


def _angles_torchdistill(e: Tensor) -> Tensor:
    diff = e.unsqueeze(0) - e.unsqueeze(1)                   # [N, N, D]
    unit = F.normalize(diff, p=2, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2)).view(-1)    # [N^3]


def rkd_angle_torchdistill(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD-A: cosines of all ``N^3`` (vertex-first) triplets from the ``[N, N, D]`` tensor."""
    with torch.no_grad():
        t_angle = _angles_torchdistill(teacher)
    return F.smooth_l1_loss(_angles_torchdistill(student), t_angle)


def rkd_da_torchdistill(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD-D + RKD-A (weights 1, 1) in torchdistill's formulation."""
    return rkd_distance_torchdistill(student, teacher) + rkd_angle_torchdistill(student, teacher)


def _huber(x: Tensor) -> Tensor:
    ax = x.abs()
    return torch.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


def _centered_gram(e: Tensor) -> Tensor:
    e = e - e.mean(dim=0, keepdim=True)
    return e @ e.T


def _gram_distances(g: Tensor) -> Tensor:
    sq = torch.diagonal(g)
    d2 = torch.clamp(sq[:, None] + sq[None, :] - 2.0 * g, min=0.0)
    d2 = d2 * (1.0 - torch.eye(g.shape[0], dtype=g.dtype))
    pos = d2 > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, d2, 1.0)), 0.0)


def rkd_distance_torch(student: Tensor, teacher: Tensor) -> Tensor:
    """Best-effort RKD-D from centred Gram matrices, mean over the ``N(N-1)`` pairs (kdface)."""
    n = student.shape[0]
    with torch.no_grad():
        dt = _gram_distances(_centered_gram(teacher))
        dt = dt / (dt.sum() / (n * (n - 1)))
    ds = _gram_distances(_centered_gram(student))
    ds = ds / (ds.sum() / (n * (n - 1)))
    off = 1.0 - torch.eye(n, dtype=ds.dtype)
    return (_huber(ds - dt) * off).sum() / (n * (n - 1))


def _vertex_side(g: Tensor, vertices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``G_jk: [B, N]``, ``G_jj: [B]``, ``1/d_jk: [B, N]`` (0 where undefined) for vertices j."""
    sq = torch.diagonal(g)
    g_rows = g[vertices]
    g_jj = sq[vertices]
    d2 = g_jj[:, None] + sq[None, :] - 2.0 * g_rows
    tol = 8.0 * torch.finfo(g.dtype).eps * (g_jj[:, None] + sq[None, :])
    ok = (d2 > tol) & (vertices[:, None] != torch.arange(g.shape[0])[None, :])
    return g_rows, g_jj, torch.where(ok, torch.rsqrt(torch.where(ok, d2, 1.0)), 0.0)


def _tile_cosines(g: Tensor, side: tuple[Tensor, Tensor, Tensor], r0: int, r1: int) -> Tensor:
    """``[B, R, N]`` cosines at the block's vertices for rows ``i = r0 .. r1`` and all ``k``."""
    g_k, g_jj, inv = side
    numer = g[None, r0:r1, :] - g_k[:, r0:r1, None] - g_k[:, None, :] + g_jj[:, None, None]
    return numer * inv[:, r0:r1, None] * inv[:, None, :]


def _fused_angle_sum(gs: Tensor, gt: Tensor, vertex_block: int, rows: int
                     ) -> tuple[Tensor, Tensor]:
    """kdface's fused RKD-A pass in torch: the triplet sum of Huber(cos_s - cos_t) and its
    gradient with respect to the (symmetric) student Gram matrix, tile by tile."""
    n = gs.shape[0]
    total = gs.new_zeros(())
    grad = torch.zeros_like(gs)
    grad_diag = gs.new_zeros(n)
    columns = torch.arange(n)
    for v0 in range(0, n, vertex_block):
        vertices = torch.arange(v0, min(n, v0 + vertex_block))
        side_s, side_t = _vertex_side(gs, vertices), _vertex_side(gt, vertices)
        inv = side_s[2]
        numer_rows = torch.zeros_like(inv)
        slope_cos = torch.zeros_like(inv)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            cos_s = _tile_cosines(gs, side_s, r0, r1)
            diff = cos_s - _tile_cosines(gt, side_t, r0, r1)
            keep = (torch.arange(r0, r1)[:, None] != columns[None, :])[None]
            total += torch.where(keep, _huber(diff), 0.0).sum()
            slope = torch.where(keep, diff.clamp(-1.0, 1.0), 0.0)
            d_numer = slope * inv[:, r0:r1, None] * inv[:, None, :]
            grad[r0:r1] += d_numer.sum(0)
            numer_rows[:, r0:r1] = d_numer.sum(2)
            slope_cos[:, r0:r1] = (slope * cos_s).sum(2)
        d_sq = -(inv * inv) * slope_cos
        grad[vertices] += -2.0 * numer_rows - 2.0 * d_sq
        grad[vertices, vertices] += numer_rows.sum(1) + d_sq.sum(1)
        grad_diag += d_sq.sum(0)
    grad += torch.diag(grad_diag)
    return total, 0.5 * (grad + grad.T)


class _FusedAngle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gs: Tensor, gt: Tensor, vertex_block: int, rows: int) -> Tensor:
        total, grad = _fused_angle_sum(gs, gt, vertex_block, rows)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, ct: Tensor):
        (grad,) = ctx.saved_tensors
        return ct * grad, None, None, None


def rkd_angle_torch(student: Tensor, teacher: Tensor, *, tile_elements: int = 1 << 18,
                    rows: int = 32) -> Tensor:
    """Best-effort RKD-A, kdface's algorithm: cosines from the Gram matrix in cache-sized
    ``[vertices, rows, N]`` tiles, the Gram gradient accumulated in the same pass (a custom
    autograd Function); mean over the ``N(N-1)(N-2)`` distinct triplets (kdface)."""
    n = student.shape[0]
    gs = _centered_gram(student)
    with torch.no_grad():
        gt = _centered_gram(teacher)
    gs_sym = 0.5 * (gs + gs.T)
    rows = min(rows, n)
    vertex_block = max(1, min(n, tile_elements // (rows * n)))
    total = _FusedAngle.apply(gs_sym, gt, vertex_block, rows)
    return total / (n * (n - 1) * (n - 2))


def rkd_da_torch(student: Tensor, teacher: Tensor) -> Tensor:
    """Best-effort RKD-D + RKD-A (kdface normalization)."""
    return rkd_distance_torch(student, teacher) + rkd_angle_torch(student, teacher)


# ------------------------------------------------------------------------------- DarkRank

def _darkrank_ranked(student: Tensor, teacher: Tensor, alpha: float, beta: float,
                     list_length: int | None) -> Tensor:
    n = student.shape[0]
    length = n - 1 if list_length is None else min(list_length, n - 1)
    with torch.no_grad():
        score_t = -alpha * _pdist_torchdistill(teacher).pow(beta)
        order = score_t.sort(dim=1, descending=True).indices[:, 1:length + 1]
    score_s = -alpha * _pdist_torchdistill(student).pow(beta)
    return torch.gather(score_s, 1, order)


def darkrank_hard_park(student: Tensor, teacher: Tensor, *, alpha: float = 3.0,
                       beta: float = 3.0, list_length: int | None = None) -> Tensor:
    """Hard DarkRank as Park et al.'s re-implementation: one log-sum-exp per list position."""
    ranked = _darkrank_ranked(student, teacher, alpha, beta, list_length)
    tails = torch.stack([torch.logsumexp(ranked[:, i:], dim=1)
                         for i in range(ranked.shape[1])], dim=1)
    return (-(ranked - tails).sum(dim=1)).mean()


def darkrank_hard_torch(student: Tensor, teacher: Tensor, *, alpha: float = 3.0,
                        beta: float = 3.0, list_length: int | None = None) -> Tensor:
    """Best-effort hard DarkRank: the tail log-sum-exps as one reverse ``logcumsumexp``."""
    ranked = _darkrank_ranked(student, teacher, alpha, beta, list_length)
    tails = torch.logcumsumexp(ranked.flip(1), dim=1).flip(1)
    return (-(ranked - tails).sum(dim=1)).mean()


# ---------------------------------------------------------------- per-example losses

def hinton_kd_torch(student_logits: Tensor, teacher_logits: Tensor, *,
                    temperature: float = 4.0) -> Tensor:
    """``tau^2 KL(p_t || p_s)``, batch mean (``F.kl_div`` with ``reduction='batchmean'``)."""
    log_ps = F.log_softmax(student_logits / temperature, dim=-1)
    with torch.no_grad():
        log_pt = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
    return kl * temperature ** 2


def angular_torch(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean (1 - cos(s, t))^2`` (Duong et al. 2019 eq. 4)."""
    return ((1.0 - F.cosine_similarity(student, teacher.detach(), dim=1)) ** 2).mean()


def _head_cosines(embeddings: Tensor, weight: Tensor) -> Tensor:
    return F.linear(F.normalize(embeddings, dim=1), F.normalize(weight, dim=1))


def cosface_ce_torch(embeddings: Tensor, weight: Tensor, labels: Tensor, *,
                     scale: float = 64.0, margin: float = 0.35) -> Tensor:
    """CosFace head + cross-entropy: ``CE(s (cos - m onehot), y)``."""
    cos = _head_cosines(embeddings, weight)
    onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
    return F.cross_entropy(scale * (cos - margin * onehot), labels)


def arcface_ce_torch(embeddings: Tensor, weight: Tensor, labels: Tensor, *,
                     scale: float = 64.0, margin: float = 0.5) -> Tensor:
    """ArcFace head (insightface style: ``cos(theta + m)`` with the ``cos - m sin m`` fallback
    past ``theta > pi - m``) + cross-entropy."""
    cos = _head_cosines(embeddings, weight).clamp(-1.0, 1.0)
    sin = torch.sqrt(torch.clamp(1.0 - cos * cos, min=1e-12))
    phi = cos * math.cos(margin) - sin * math.sin(margin)
    phi = torch.where(cos > math.cos(math.pi - margin), phi, cos - margin * math.sin(margin))
    onehot = F.one_hot(labels, cos.shape[1]).to(torch.bool)
    return F.cross_entropy(scale * torch.where(onehot, phi, cos), labels)
