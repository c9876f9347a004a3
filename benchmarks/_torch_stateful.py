"""PyTorch peers of the two losses with state, EKD and AdaDistill, written the way their official
code computes them (written from the math and the code's sequence of tensor operations; no code
copied), for ``benchmarks.loss_throughput``.

* ``ekd_official`` follows TFace's ``EKD.forward`` (Tencent/TFace, ``recognition/tasks/ekd``):
  the ``[N, N]`` label-equality matrix from ``repeat``, a ``triu`` boolean mask of the pairs,
  ``masked_select`` of positive and negative similarities, a full descending ``torch.sort`` of
  the student's and of the teacher's negatives, thresholds at ``L // a``, the momentum update,
  and the clamped-sigmoid anchor counts with ``F.mse_loss``. The module's buffers become
  arguments (``s_anchor``, ``t_anchor``) so every timed call starts from the same state.
* ``adadistill_official`` follows ``AdaptiveAArcFace`` / ``AdaptiveACosFace`` (fdbtrs/AdaDistill,
  ``utils/losses.py``) and the training script's ``CrossEntropyLoss``: the centre update under
  ``no_grad`` by advanced-index assignment on a copy of the kernel (the module updates its
  parameter in place), the normalized kernel, the in-place ``acos_ / += m / cos_`` ArcFace
  margin (or ``-= m`` CosFace), cross-entropy.

Both return the scalar loss; gradients flow to the student only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

EKD_INVERSE_FPR = (10, 100, 1000, 10000, 100000, 1000000)


def _sigmoid_clamped(x: Tensor, temp: float) -> Tensor:
    exponent = torch.clamp(-x / temp, min=-50, max=50)
    return 1.0 / (1.0 + torch.exp(exponent))


def _relative_loss(s_sim: Tensor, t_sim: Tensor, s_anchor: Tensor, t_anchor: Tensor,
                   temp: float) -> Tensor:
    s_rank = _sigmoid_clamped(s_sim.unsqueeze(1) - s_anchor.unsqueeze(0), temp)
    t_rank = _sigmoid_clamped(t_sim.unsqueeze(1) - t_anchor.unsqueeze(0), temp)
    return F.mse_loss(s_rank.sum(dim=1, keepdim=True), t_rank.sum(dim=1, keepdim=True))


def ekd_official(g_s: Tensor, g_t: Tensor, labels: Tensor, s_anchor: Tensor, t_anchor: Tensor,
                 *, topk: int = 2000, temp: float = 0.01, momentum: float = 0.01) -> Tensor:
    """EKD (Huang et al. 2022) in TFace's sequence of operations; see the module docstring."""
    n = labels.size(0)
    g_s = F.normalize(g_s.view(n, -1))
    classes_eq = labels.repeat(n, 1) == labels.view(-1, 1).repeat(1, n)
    sim_s = torch.mm(g_s, g_s.t())
    upper = torch.triu(torch.ones(classes_eq.size()), 1).bool()
    pos_inds = classes_eq[upper]
    neg_inds = ~classes_eq[upper]
    s = sim_s[upper]
    pos_s = torch.masked_select(s, pos_inds)
    neg_s = torch.masked_select(s, neg_inds)
    sorted_s_neg, sorted_s_index = torch.sort(neg_s, descending=True)
    with torch.no_grad():
        g_t = F.normalize(g_t.view(n, -1))
        sim_t = torch.mm(g_t, g_t.t())
        t = sim_t[upper]
        pos_t = torch.masked_select(t, pos_inds)
        neg_t = torch.masked_select(t, neg_inds)
        sorted_t_neg, _ = torch.sort(neg_t, descending=True)
        length = sorted_s_neg.size(0)
        select = [length // a for a in EKD_INVERSE_FPR]
        s_anchor = momentum * sorted_s_neg[select] + (1 - momentum) * s_anchor
        t_anchor = momentum * sorted_t_neg[select] + (1 - momentum) * t_anchor
    pos_loss = _relative_loss(pos_s, pos_t, s_anchor, t_anchor, temp)
    hard = sorted_s_index[0:topk]
    neg_loss = _relative_loss(neg_s[hard], neg_t[hard], s_anchor, t_anchor, temp)
    return pos_loss * 0.02 + neg_loss * 0.01


def _l2_norm(x: Tensor, axis: int = 1) -> Tensor:
    return torch.div(x, torch.norm(x, 2, axis, True))


def adadistill_official(emb: Tensor, emb_t: Tensor, labels: Tensor, kernel: Tensor, *,
                        head: str = "arcface", s: float = 64.0, m: float = 0.45) -> Tensor:
    """AdaDistill (Boutros et al. 2024) header + cross-entropy as the official code runs it."""
    labels = labels.long()
    kernel = kernel.clone()
    emb = _l2_norm(emb, axis=1)
    emb_t = _l2_norm(emb_t, axis=1)
    cosine_sim = torch.nn.CosineSimilarity()
    with torch.no_grad():
        cos_tmp = cosine_sim(emb, emb_t).clamp(-1, 1)
        lam = cosine_sim(kernel[:, labels].T, emb_t).clamp(1e-6, 1).view(-1, 1)
        alpha = (cos_tmp.view(-1, 1) * lam).clamp(1e-6, 1.0).T
        kernel[:, labels] = alpha * kernel[:, labels] + (1.0 - alpha) * emb_t.T
    kernel_norm = _l2_norm(kernel, axis=0)
    cos_theta = torch.mm(emb, kernel_norm).clamp(-1, 1)
    index = torch.where(labels != -1)[0]
    m_hot = torch.zeros(index.size()[0], cos_theta.size()[1])
    m_hot.scatter_(1, labels[index, None], m)
    if head == "arcface":
        cos_theta.acos_()
        cos_theta[index] += m_hot
        logits = cos_theta.cos_().mul_(s)
    else:
        cos_theta[index] -= m_hot
        logits = cos_theta * s
    return F.cross_entropy(logits, labels)
