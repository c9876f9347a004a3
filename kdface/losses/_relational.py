"""Relational distillation baselines: RKD-D, RKD-A (Park et al., 2019) and DarkRank-hard
(Chen et al., 2018), as compared against PWR in Nikitin et al. 2020 §4.

All three are written in their fast, memory-bounded form:

* pairwise distances come from one Gram matrix (``|a|^2 + |b|^2 - 2 a.b``), never from an
  ``[N, N, D]`` difference tensor; embeddings are centred first (the losses are translation
  invariant) so the Gram trick loses little precision, and the matmuls ask for
  ``Precision.HIGHEST`` so TF32 on GPUs cannot silently cost three decimal digits;
* RKD-A never holds the ``[N, N, N]`` angle tensor: angles follow from the Gram matrix and are
  reduced in cache-sized ``[vertices, rows, N]`` tiles, and its gradient with respect to the
  Gram matrix is accumulated in the same pass (a ``custom_jvp``), so the backward pass is
  bounded too and nothing is recomputed;
* DarkRank ranks each anchor's row by a two-pass radix sort of the teacher distances and
  evaluates the Plackett-Luce likelihood by scans over list positions with a written-out
  gradient (``plackett_luce_nll``), never through ``lax.cumlogsumexp``;
* each loss is a sum over *rows* (pair rows, vertices, anchors), and the private ``*_rows`` cores
  take a row range and a ``total`` reduction so ``kdface.losses._sharded`` can split the rows over
  devices and psum the partial sums.

The teacher is a frozen target: its side is under ``stop_gradient`` in every loss (as in Park et
al.'s public code, which computes it under ``torch.no_grad``).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kdface._platform import target_platform
from kdface.losses import _pwr_sorted
from kdface.losses._checks import (check_embeddings, check_option, check_positive,
                                   check_same_rows, compute_dtype)

Array = jax.Array
Total = Callable[[Array], Array]

HIGHEST = jax.lax.Precision.HIGHEST
# RKD-A tiles are [vertices, rows, N]. On the CPU they are sized to stay in a core's L2 cache
# (1 MiB here): the pass is bound by memory traffic. Fused fwd+bwd at N=512 on one core took
# 0.32-0.36 s with 2^18-element tiles, 2.0 s with [2, 512, 512] (2^19) and 3.2 s with
# [32, 512, 512] (2^23) tiles. Elsewhere (not measured) tiles take whole rows and 2^23 elements.
ANGLE_TILE_ELEMENTS = 1 << 18
ANGLE_TILE_ROWS = 32
ANGLE_TILE_ELEMENTS_ACCEL = 1 << 23
# RKD-D's mean distance mu is floored here, so a batch whose rows all coincide (mu = 0) gives
# normalized distances 0 instead of 0/0. The value is Park et al.'s: their code clamps squared
# distances at 1e-12, so no pair distance (hence no mean) is below 1e-6.
MU_FLOOR = 1e-6
_REDUCTIONS = ("mean", "sum", None)


def _identity(x: Array) -> Array:
    return x


def huber(x: Array) -> Array:
    """Huber / smooth-L1 with delta 1 (``F.smooth_l1_loss`` in Park et al.'s code)."""
    ax = jnp.abs(x)
    return jnp.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


def prepare_pair(student: Array, teacher: Array, *, min_n: int) -> tuple[Array, Array]:
    """Checks ``[N, D_s]``/``[N, D_t]`` embeddings, casts to the compute dtype, stops teacher."""
    check_embeddings("student", student)
    check_embeddings("teacher", teacher)
    check_same_rows("student", student, "teacher", teacher)
    n = student.shape[0]
    if n < min_n:
        raise ValueError(f"this loss needs a batch of at least N={min_n} embeddings, got N={n}")
    dtype = compute_dtype(student, teacher)
    return student.astype(dtype), jax.lax.stop_gradient(teacher.astype(dtype))


def centered(e: Array) -> Array:
    """``e - mean(e)``: distances and angles are translation invariant; centring keeps the Gram
    entries small so ``|a|^2 + |b|^2 - 2 a.b`` cancels less."""
    return e - jnp.mean(e, axis=0, keepdims=True)


def gram(a: Array, b: Array) -> Array:
    """``a @ b.T`` at full float32 precision (no TF32 / bf16 passes on accelerators)."""
    return jnp.matmul(a, b.T, precision=HIGHEST)


def row_mask(row_offset: Array | int, n_rows: int, n: int) -> Array:
    """``[n_rows, n]`` bool, True where global row ``row_offset + r`` equals column ``c``."""
    rows = row_offset + jnp.arange(n_rows)
    return rows[:, None] == jnp.arange(n)[None, :]


def pair_sq_distances(e_all: Array, row_offset: Array | int, n_rows: int) -> Array:
    """``[n_rows, N]`` squared distances of rows ``row_offset..`` of ``e_all: [N, D]`` to all
    rows, from the Gram matrix, clamped at 0; the self-distance is exactly 0."""
    rows = jax.lax.dynamic_slice_in_dim(e_all, row_offset, n_rows, axis=0)
    sq_all = jnp.sum(e_all * e_all, axis=1)
    sq_rows = jnp.sum(rows * rows, axis=1)
    d2 = sq_rows[:, None] + sq_all[None, :] - 2.0 * gram(rows, e_all)
    d2 = jnp.where(row_mask(row_offset, n_rows, e_all.shape[0]), 0.0, d2)
    return jnp.maximum(d2, 0.0)


def safe_sqrt(d2: Array) -> Array:
    """``sqrt`` whose gradient is 0 (not inf/NaN) where ``d2 == 0`` (self-pairs, duplicates)."""
    positive = d2 > 0.0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, d2, 1.0)), 0.0)


# ----------------------------------------------------------------------------------- RKD-D

def rkd_distance_rows(student: Array, teacher: Array, row_offset: Array | int, n_rows: int,
                      total: Total = _identity) -> Array:
    """Per-pair Huber terms ``[n_rows, N]`` for global rows ``row_offset..`` (0 on i == j).

    ``student``/``teacher`` are the full centred ``[N, D]`` batches; ``total`` sums a partial
    sum over all rows (identity on one device, ``psum`` across devices) for the normalizer mu.
    """
    n = student.shape[0]
    off_diagonal = ~row_mask(row_offset, n_rows, n)
    n_pairs = n * (n - 1)

    def normalized(e: Array) -> Array:
        d = safe_sqrt(pair_sq_distances(e, row_offset, n_rows))
        mu = jnp.maximum(total(jnp.sum(d)) / n_pairs, MU_FLOOR)
        return d / mu

    diff = normalized(student) - normalized(teacher)
    return jnp.where(off_diagonal, huber(diff), 0.0)


def rkd_distance_loss(student: Array, teacher: Array, *, reduction: str | None = "mean"
                      ) -> Array:
    """RKD-D (Park et al., CVPR 2019, eq. (3)-(4)); baseline 'RKD-D' of Nikitin et al. 2020 §4.

    ``psi_D(t_i, t_j) = |t_i - t_j| / mu`` with ``mu`` the mean distance over the batch's pairs,
    for teacher and student separately; the loss is the Huber (smooth-L1, delta 1) difference.

    Args:
      student: ``[N, D_s]`` float embeddings (gradients flow here, also through ``mu``).
      teacher: ``[N, D_t]`` float embeddings (held constant: ``stop_gradient``).
      reduction: ``'mean'`` over the ``N(N-1)`` ordered pairs ``i != j`` (equal to the mean over
        unordered pairs ``i < j``, the matrix being symmetric), ``'sum'`` over them, or ``None``
        for the ``[N, N]`` per-pair matrix (zero diagonal).

    Returns:
      A scalar, or ``[N, N]`` when ``reduction=None``. Float32 for half-precision inputs.

    Choices (the paper leaves open what the mean runs over): ``mu`` and the mean both run over
    pairs ``i != j``. ``mu`` is floored at ``MU_FLOOR = 1e-6``: when all rows of an input
    coincide (mean distance 0) its normalized distances are 0, and value and gradient stay
    finite. Park et al.'s public code averages the Huber term over all ``N^2`` entries, zero
    diagonal included, i.e. ``(N-1)/N`` times this value; it clamps squared distances at 1e-12
    (every off-diagonal distance is at least 1e-6) and takes ``mu`` over the positive entries,
    i.e. over the same ``N(N-1)`` pairs, so the two differ only where distances fall below 1e-6
    (duplicate embeddings: there a distance 1e-6, here 0; all rows equal: normalized distances
    1 there, 0 here). No normalization of the embeddings is done here (a recipe may
    L2-normalize first). Invariant to scaling either input while its mean distance is above
    1e-6. Needs ``N >= 2``.
    """
    check_option("reduction", reduction, _REDUCTIONS)
    student, teacher = prepare_pair(student, teacher, min_n=2)
    n = student.shape[0]
    terms = rkd_distance_rows(centered(student), centered(teacher), 0, n)
    if reduction is None:
        return terms
    if reduction == "sum":
        return jnp.sum(terms)
    return jnp.sum(terms) / (n * (n - 1))


# ----------------------------------------------------------------------------------- RKD-A

def _on_cpu() -> bool:
    return target_platform() == "cpu"


def angle_tile_rows(n: int) -> int:
    """Rows ``i`` per ``[vertices, rows, N]`` angle tile (all of them off the CPU)."""
    return min(n, ANGLE_TILE_ROWS) if _on_cpu() else n


def angle_block_size(n: int, n_vertices: int, block_size: int | None) -> int:
    """Vertices per ``[block, rows, n]`` tile: the user's choice, else as many as keep a tile
    near ``ANGLE_TILE_ELEMENTS`` elements; at least 1, at most ``n_vertices`` (the vertices to
    do)."""
    if block_size is None:
        budget = ANGLE_TILE_ELEMENTS if _on_cpu() else ANGLE_TILE_ELEMENTS_ACCEL
        return max(1, min(n_vertices, budget // (angle_tile_rows(n) * n)))
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    return min(block_size, n_vertices)


def _inverse_distances(g_rows: Array, sq_rows: Array, sq_all: Array, vertices: Array) -> Array:
    """``[B, N]`` ``1/|e_i - e_j|`` for vertices ``j`` (rows), 0 where the direction is undefined:
    ``i == j`` or ``e_i`` indistinguishable from ``e_j`` at the Gram trick's precision (Park et
    al.'s ``F.normalize`` likewise maps a zero difference to the zero vector)."""
    d2 = sq_rows[:, None] + sq_all[None, :] - 2.0 * g_rows
    tol = 8.0 * jnp.finfo(d2.dtype).eps * (sq_rows[:, None] + sq_all[None, :])
    defined = (d2 > tol) & (vertices[:, None] != jnp.arange(sq_all.shape[0])[None, :])
    return jnp.where(defined, jax.lax.rsqrt(jnp.where(defined, d2, 1.0)), 0.0)


def _vertex_side(g: Array, vertices: Array, n_pad: int) -> tuple[Array, ...]:
    """Per-vertex vectors of one vertex block: ``G_jk: [B, N]``, ``G_jj: [B]``,
    ``1/d_jk: [B, N]``, and the first and last padded to ``n_pad`` columns for the ``i`` side."""
    sq_all = jnp.diagonal(g)
    g_rows = jnp.take(g, vertices, axis=0)
    g_jj = jnp.take(sq_all, vertices)
    inv_d = _inverse_distances(g_rows, g_jj, sq_all, vertices)
    pad = ((0, 0), (0, n_pad - g.shape[0]))
    return g_rows, g_jj, inv_d, jnp.pad(g_rows, pad), jnp.pad(inv_d, pad)


def _tile_cosines(g_pad: Array, side: tuple[Array, ...], row0: Array, rows: int
                  ) -> tuple[Array, Array, Array]:
    """``[B, R, N]`` cosines ``<e_ij, e_kj> = (G_ik - G_ij - G_jk + G_jj) / (d_ij d_kj)`` for the
    block's vertices ``j``, rows ``i = row0 .. row0 + R`` and all ``k``; also ``1/d_ij: [B, R]``
    and ``1/d_kj: [B, N]``."""
    g_k, g_jj, inv_k, g_i_all, inv_i_all = side
    g_ik = jax.lax.dynamic_slice_in_dim(g_pad, row0, rows, axis=0)
    g_ji = jax.lax.dynamic_slice_in_dim(g_i_all, row0, rows, axis=1)
    inv_i = jax.lax.dynamic_slice_in_dim(inv_i_all, row0, rows, axis=1)
    numer = g_ik[None] - g_ji[:, :, None] - g_k[:, None, :] + g_jj[:, None, None]
    return numer * inv_i[:, :, None] * inv_k[:, None, :], inv_i, inv_k


def _symmetric(g: Array) -> Array:
    return 0.5 * (g + g.T)


def _angle_sweep(g_student: Array, g_teacher: Array, vertex_offset: Array | int,
                 n_vertices: int, block_size: int, with_grad: bool
                 ) -> tuple[Array, Array | None]:
    """One pass over the triplets with vertex in ``vertex_offset .. + n_vertices``, in
    ``[block_size, angle_tile_rows(N), N]`` tiles (vertex blocks outside, row blocks inside).
    Returns the sum of ``Huber(cos_s - cos_t)`` over them and, with ``with_grad``, its gradient
    with respect to ``g_student`` in the same pass (see ``rkd_angle_sum``)."""
    gs, gt = _symmetric(g_student), _symmetric(g_teacher)
    n = gs.shape[0]
    rows = angle_tile_rows(n)
    n_vblocks, n_rblocks = -(-n_vertices // block_size), -(-n // rows)
    n_pad = n_rblocks * rows
    gs_pad = jnp.pad(gs, ((0, n_pad - n), (0, 0)))
    gt_pad = jnp.pad(gt, ((0, n_pad - n), (0, 0)))
    columns = jnp.arange(n)

    def vertex_block(carry, vblock):
        local = vblock * block_size + jnp.arange(block_size)
        valid = local < n_vertices
        vertices = jnp.minimum(vertex_offset + local, n - 1)
        side_s, side_t = _vertex_side(gs, vertices, n_pad), _vertex_side(gt, vertices, n_pad)

        def row_block(inner, rblock):
            row0 = rblock * rows
            i = row0 + jnp.arange(rows)
            cos_s, inv_i, inv_k = _tile_cosines(gs_pad, side_s, row0, rows)
            cos_t = _tile_cosines(gt_pad, side_t, row0, rows)[0]
            diff = cos_s - cos_t
            keep = (valid[:, None, None] & (i < n)[None, :, None]
                    & (i[:, None] != columns[None, :])[None])
            total = jnp.sum(jnp.where(keep, huber(diff), 0.0))
            if not with_grad:
                return inner + total, None
            # d/d cos_s of Huber is clip(diff, -1, 1); d cos_s / d numer = 1/(d_ij d_kj)
            slope = jnp.where(keep, jnp.clip(diff, -1.0, 1.0), 0.0)
            d_numer = slope * inv_i[:, :, None] * inv_k[:, None, :]
            # Summed over the vertices slice by slice: with XLA:CPU's fused reduction over this
            # leading axis, fwd+bwd at N=1024 took 1.2-1.4x longer on one core and 4.7x longer
            # on two (5.95 s vs 1.27 s).
            d_ik = jax.lax.fori_loop(1, block_size, lambda b, s: s + d_numer[b], d_numer[0])
            return inner + total, (d_ik, jnp.sum(d_numer, axis=2),
                                   jnp.sum(slope * cos_s, axis=2))

        if not with_grad:
            return jax.lax.scan(row_block, carry, jnp.arange(n_rblocks))[0], None
        total, acc, diag = carry
        total, (d_ik, numer_rows, slope_cos) = jax.lax.scan(row_block, total,
                                                            jnp.arange(n_rblocks))
        acc = acc + d_ik.reshape(n_pad, n)
        numer_rows = jnp.moveaxis(numer_rows, 0, 1).reshape(block_size, n_pad)[:, :n]
        slope_cos = jnp.moveaxis(slope_cos, 0, 1).reshape(block_size, n_pad)[:, :n]
        inv_d = side_s[2]
        # Both (i, k) orders count and cos is symmetric in them, so the terms through d_ij and
        # d_kj (and through G_ij and G_jk) are equal: d/d(d_ij^2) = -(1/d_ij^2) sum_k slope cos.
        d_sq = -(inv_d * inv_d) * slope_cos
        vertex_row = -2.0 * numer_rows - 2.0 * d_sq                 # d/dG_ji
        vertex_diag = jnp.sum(numer_rows, axis=1) + jnp.sum(d_sq, axis=1)   # d/dG_jj
        return (total, acc, diag + jnp.sum(d_sq, axis=0)), (vertex_row, vertex_diag)

    # A zero that varies over the same shard_map axes as the inputs, so scan carries keep their
    # type when this runs per device (the offset and the gathered Grams are device-varying).
    zero = 0.0 * (gs[0, 0] + gt[0, 0] + vertex_offset)
    blocks = jnp.arange(n_vblocks)
    if not with_grad:
        return jax.lax.scan(vertex_block, zero, blocks)[0], None
    init = (zero, jnp.full((n_pad, n), zero), jnp.full((n,), zero))
    (total, acc, diag), (vertex_row, vertex_diag) = jax.lax.scan(vertex_block, init, blocks)
    own = vertex_offset + jnp.arange(n_vertices)
    grad = acc[:n] + jnp.diag(diag)                                  # d/dG_ik, d/dG_ii
    grad = grad.at[own].add(vertex_row.reshape(-1, n)[:n_vertices])
    grad = grad.at[own, own].add(vertex_diag.reshape(-1)[:n_vertices])
    return total, _symmetric(grad)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def rkd_angle_sum(g_student: Array, g_teacher: Array, vertex_offset: Array | int,
                  n_vertices: int, block_size: int) -> Array:
    """Sum of Huber(cos_s - cos_t) over triplets whose vertex lies in
    ``vertex_offset .. vertex_offset + n_vertices`` (other two points distinct from it and from
    each other), from the Gram matrices (read as ``(G + G^T) / 2``), in tiles of
    ``block_size`` vertices x ``angle_tile_rows(N)`` rows x ``N``.

    Differentiating it runs one fused pass that forms the value and the ``[N, N]`` gradient
    with respect to ``g_student`` tile by tile (the Huber slope times the derivatives of the
    cosine through ``G_ik``, ``G_ij``, ``G_jk``, ``G_jj`` and the two distances), so the
    backward pass neither stores nor recomputes triplet-sized arrays. ``g_teacher`` is the
    frozen target: no tangent flows from it (callers put it under ``stop_gradient``).
    """
    return _angle_sweep(g_student, g_teacher, vertex_offset, n_vertices, block_size,
                        with_grad=False)[0]


@rkd_angle_sum.defjvp
def _rkd_angle_sum_jvp(n_vertices: int, block_size: int, primals: tuple, tangents: tuple
                       ) -> tuple[Array, Array]:
    g_student, g_teacher, vertex_offset = primals
    total, grad = _angle_sweep(g_student, g_teacher, vertex_offset, n_vertices, block_size,
                               with_grad=True)
    return total, jnp.vdot(grad, tangents[0])


def rkd_angle_loss(student: Array, teacher: Array, *, block_size: int | None = None) -> Array:
    """RKD-A (Park et al., CVPR 2019, eq. (5)-(6)); baseline 'RKD-A' of Nikitin et al. 2020 §4.

    ``psi_A(t_i, t_j, t_k) = cos angle(t_i, t_j, t_k) = <e_ij, e_kj>``,
    ``e_ij = (t_i - t_j) / |t_i - t_j|``, vertex ``t_j``; Huber (delta 1) between the teacher's
    and the student's cosine, averaged over triplets.

    Args:
      student: ``[N, D_s]`` float embeddings.
      teacher: ``[N, D_t]`` float embeddings (``stop_gradient``).
      block_size: vertices per ``[block_size, rows, N]`` tile (``rows = min(N, 32)`` on the CPU,
        ``N`` elsewhere; a few tiles are live at once); ``None`` keeps a tile near ``2^18``
        elements on the CPU (in a core's L2 cache), ``2^23`` elsewhere. The result does not
        depend on it.

    Returns:
      Scalar mean over the ``N(N-1)(N-2)`` ordered triplets ``(i, j, k)`` of distinct indices.

    Choices: Park et al.'s public code forms all ``N^3`` ordered triplets with the first index
    as the vertex and divides by ``N^3``. With distinct rows its degenerate triplets contribute
    0 (``i == k`` gives cos 1 on both sides, a point equal to the vertex gives the zero vector),
    so it is ``(N-1)(N-2)/N^2`` times this value. With duplicate rows it is not: a triplet
    ``(i, j, i)`` whose point ``i`` coincides with the vertex ``j`` on one side only has cos 0
    there and 1 on the other, and adds Huber(1) = 0.5; Park's value is then
    ``[N(N-1)(N-2) L + 0.5 P] / N^3`` with ``P`` the ordered pairs ``i != j`` equal in exactly
    one of student and teacher. Both orders ``(i, k)`` and ``(k, i)`` count, as there.
    A point too close to the vertex for a float32 direction (duplicate embeddings) gets cosine
    0, like ``F.normalize`` of a zero vector. Cosines come from the Gram matrix of the centred
    embeddings, so neither an ``[N, N, N]`` nor an ``[N, N, D]`` array is ever built.
    Needs ``N >= 3``.
    """
    student, teacher = prepare_pair(student, teacher, min_n=3)
    n = student.shape[0]
    block = angle_block_size(n, n, block_size)
    gs = gram(centered(student), centered(student))
    gt = gram(centered(teacher), centered(teacher))
    return rkd_angle_sum(gs, gt, 0, n, block) / (n * (n - 1) * (n - 2))


# --------------------------------------------------------------------------- DarkRank-hard

def check_darkrank_options(alpha: float, beta: float, list_length: int | None) -> None:
    check_positive("alpha", alpha)
    check_positive("beta", beta)
    if list_length is not None and (isinstance(list_length, bool)
                                    or not isinstance(list_length, int) or list_length < 1):
        raise ValueError(f"list_length must be a positive int or None, got {list_length!r}")


def _logaddexp(a: Array, b: Array) -> Array:
    """``log(e^a + e^b)`` for finite ``a``, ``b`` (no infinity handling needed here)."""
    return jnp.maximum(a, b) + jnp.log1p(jnp.exp(-jnp.abs(a - b)))


def _tail_logsumexps(ranked_t: Array) -> Array:
    """``T[k] = log sum_{l >= k} exp(ranked_t[l])`` along axis 0 of ``[L, R]``, one list position
    per step, each step a logaddexp over the R lists (exact for any score range).

    Written as a scan over positions because ``lax.cumlogsumexp`` lowers to an O(L^2)
    reduce-window per list when not differentiated (a forward-only call at N=512 took longer
    than value and gradient together) and is differentiated through an associative scan."""
    def step(after: Array, x: Array) -> tuple[Array, Array]:
        tail = _logaddexp(x, after)
        return tail, tail
    last = ranked_t[-1]
    return jnp.concatenate([jax.lax.scan(step, last, ranked_t[:-1], reverse=True)[1],
                            last[None]])


@jax.custom_vjp
def plackett_luce_nll(ranked_t: Array) -> Array:
    """``[R]`` negative log-likelihoods ``-sum_k (x_k - log sum_{l >= k} exp x_l)`` of R lists
    given position-major as ``ranked_t: [L, R]`` (``x_k = ranked_t[k, r]``, k = 0 first).

    The gradient is written out: ``dL/dx_j = -1 + sum_{k <= j} exp(x_j - T_k) = exp(x_j + C_j) - 1``
    with ``T`` the tail log-sum-exps and ``C_j = log sum_{k <= j} exp(-T_k)`` (a forward scan;
    ``x_j + C_j <= log(j + 1)``, so nothing overflows), computed in one scan that also emits the
    gradient, instead of autodiff through two associative scans."""
    return jnp.sum(_tail_logsumexps(ranked_t) - ranked_t, axis=0)


def _plackett_luce_fwd(ranked_t: Array) -> tuple[Array, tuple[Array, Array]]:
    tails = _tail_logsumexps(ranked_t)
    return jnp.sum(tails - ranked_t, axis=0), (ranked_t, tails)


def _plackett_luce_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array]:
    ranked_t, tails = res

    def step(before: Array, xt: tuple[Array, Array]) -> tuple[Array, Array]:
        x, tail = xt
        c = _logaddexp(before, -tail)
        return c, g * jnp.expm1(x + c)
    first = -tails[0]
    grad0 = g * jnp.expm1(ranked_t[0] + first)
    rest = jax.lax.scan(step, first, (ranked_t[1:], tails[1:]))[1]
    return (jnp.concatenate([grad0[None], rest]),)


plackett_luce_nll.defvjp(_plackett_luce_fwd, _plackett_luce_bwd)


def teacher_ranking(d2_teacher: Array, self_pair: Array, length: int) -> Array:
    """``[R, length]`` int32: per anchor row, the columns by increasing teacher distance (the
    anchor itself last, excluded), equal computed distances in index order (a stable sort).

    float32 distances go through ``_pwr_sorted.radix_argsort`` (two single-operand int32 sorts:
    XLA:CPU's argsort with a float comparator took ~5x longer at N=512); float64 (x64 on)
    through ``jnp.argsort``."""
    keys = jnp.where(self_pair, jnp.inf, d2_teacher)
    if keys.dtype == jnp.float64:
        order = jnp.argsort(keys, axis=1, stable=True)
    else:
        order = _pwr_sorted.radix_argsort(_pwr_sorted.unsigned_key(keys))
    return order[:, :length].astype(jnp.int32)


@jax.custom_vjp
def ranked_scores(scores: Array, order: Array) -> Array:
    """``[R, L]`` ``scores[r, order[r, k]]`` for ``[R, N]`` scores and ``[R, L]`` distinct column
    indices per row. Its gradient writes each row's cotangents back with a scatter *set* (the
    columns of a row are distinct): with XLA:CPU, autodiff's scatter-add for ``take_along_axis``
    took twice as long at N=2048, that of a position-major gather four times as long."""
    return jnp.take_along_axis(scores, order, axis=1)


def _ranked_scores_fwd(scores: Array, order: Array) -> tuple[Array, tuple[Array, int]]:
    return ranked_scores(scores, order), (order, scores.shape[1])


def _ranked_scores_bwd(res: tuple[Array, int], g: Array) -> tuple[Array, None]:
    order, n = res
    rows = jnp.arange(order.shape[0])[:, None]
    d_scores = jnp.zeros((order.shape[0], n), g.dtype).at[rows, order].set(
        g, unique_indices=True)
    return d_scores, None


ranked_scores.defvjp(_ranked_scores_fwd, _ranked_scores_bwd)


def darkrank_rows(student: Array, teacher: Array, row_offset: Array | int, n_rows: int, *,
                  alpha: float, beta: float, list_length: int | None) -> Array:
    """Per-anchor negative log-likelihoods ``[n_rows]`` for anchors ``row_offset..`` of the full
    centred ``[N, D]`` batches."""
    n = student.shape[0]
    length = n - 1 if list_length is None else min(list_length, n - 1)
    self_pair = row_mask(row_offset, n_rows, n)
    order = teacher_ranking(pair_sq_distances(teacher, row_offset, n_rows), self_pair, length)
    d2_student = jnp.maximum(pair_sq_distances(student, row_offset, n_rows), 1e-12)
    scores = -alpha * d2_student ** (0.5 * beta)              # S = -alpha |s_i - s_j|^beta
    # Position-major [length, n_rows], the layout the scans of plackett_luce_nll step through.
    return plackett_luce_nll(ranked_scores(scores, order).T)


def darkrank_hard_loss(student: Array, teacher: Array, *, alpha: float = 3.0,
                       beta: float = 3.0, list_length: int | None = None,
                       reduction: str | None = "mean") -> Array:
    """DarkRank, hard version (Chen et al., AAAI 2018, eq. (4)-(6)); baseline 'DarkRank' of
    Nikitin et al. 2020 §4 (which uses the hard version for its batch-size-free cost).

    Similarity ``S(x_i, x_j) = -alpha |x_i - x_j|^beta``. For each anchor ``i`` the other samples
    are sorted by the teacher's similarity (``pi``), and the student's scores must reproduce that
    order under the Plackett-Luce model:
    ``L_i = -sum_k [ S_s(i, pi_k) - log sum_{l >= k} exp S_s(i, pi_l) ]``, with the tail
    log-sum-exp taken as a reverse ``cumlogsumexp`` (stable for any score range).

    Args:
      student: ``[N, D_s]`` float embeddings.
      teacher: ``[N, D_t]`` float embeddings (only its ranking is used; no gradient).
      alpha, beta: similarity scale and power; DarkRank's defaults 3 and 3.
      list_length: rank only the teacher's ``list_length`` nearest neighbours of each anchor
        (Park et al.'s re-implementation uses 4); ``None`` ranks all ``N - 1`` others.
      reduction: ``'mean'`` over anchors, ``'sum'`` over anchors, or ``None`` for ``[N]``.

    Returns:
      A scalar, or ``[N]`` per-anchor losses when ``reduction=None``.

    Choices: the anchor is excluded from its own list; teacher distances that are exactly equal
    as computed keep index order (a stable sort), but distances equal in exact arithmetic are
    computed from centred embeddings through the Gram trick and may differ by rounding, which
    then orders them; the loss
    is averaged over anchors (as Park et al.'s code) rather than summed as in the brief's
    formula, so its scale does not grow with the batch. Student squared distances are clamped
    at 1e-12 so ``beta < 2`` keeps finite gradients for duplicate embeddings. No normalization
    of the embeddings is done here. Differentiable in reverse mode (``jax.grad``, ``vjp``); its
    gradient is written out, so forward mode (``jax.jvp``) is not available. Needs ``N >= 2``.
    """
    check_darkrank_options(alpha, beta, list_length)
    check_option("reduction", reduction, _REDUCTIONS)
    student, teacher = prepare_pair(student, teacher, min_n=2)
    n = student.shape[0]
    per_anchor = darkrank_rows(centered(student), centered(teacher), 0, n, alpha=alpha,
                               beta=beta, list_length=list_length)
    if reduction is None:
        return per_anchor
    if reduction == "sum":
        return jnp.sum(per_anchor)
    return jnp.mean(per_anchor)
