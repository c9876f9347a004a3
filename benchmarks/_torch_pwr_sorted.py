"""Best-effort PyTorch version of the sort-based exact PWR (kdface ``method='sorted'``).

For the separable inversions the loss over teacher-ordered pairs (a above b) is a 2-D dominance
sum: with ``z_ab = x_b - y_a``,

* diff:  sum [t_b < t_a][x_b > y_a] (x_b - y_a)
* exp:   sum [t_b < t_a][x_b > y_a] (e^{beta x_b} e^{-beta y_a} - 1)

Each score is a *data event* (value x_b, weight x_b or e^{beta x_b}) at its position in the
teacher order and a *query event* (value y_a) at the start of its teacher tie group, so a data
event precedes a query exactly when t_b < t_a (ties contribute nothing). A divide-and-conquer
over the event order (log2 of it levels; per level, blocks of 2^k data events sorted by value,
suffix sums of weights and counts, a batched ``searchsorted`` per query) gives, for every query,
the count and weight sum of the data before it with a larger value: O(M log^2 M) work. Autograd
keeps every level's gather indices, so memory grows as M log M (kdface keeps O(M) with a
custom VJP; torch has no cheap equivalent without writing the backward by hand).
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def pwr_pair_values(s: Tensor, t: Tensor, margin: str, margin_value: float
                    ) -> tuple[Tensor, Tensor]:
    """``(x, y)`` with the teacher-ordered pair (a above b) difference ``z = x_b - y_a``."""
    if margin == "teacher_diff":
        return s - t, s - t
    if margin == "const":
        return s + margin_value, s
    if margin == "teacher_std":
        return s + torch.std(t, unbiased=False), s
    return s, s


def pwr_scores(e: Tensor) -> Tensor:
    """``[M]`` cosine similarities of the pairs ``i < j`` (kdface's convention; MXNet-style L2
    normalization, eps inside the sqrt)."""
    e = e / torch.sqrt((e * e).sum(dim=1, keepdim=True) + 1e-12)
    rows, cols = torch.triu_indices(e.shape[0], e.shape[0], offset=1)
    return (e @ e.T)[rows, cols]


def dominance_sums(t: Tensor, x: Tensor, y: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """For every score a: ``(W_a, C_a)`` = (sum of ``w_b``, count) over b with ``t_b < t_a``
    and ``x_b > y_a``; ``[M]`` each (``C`` int64). Differentiable in ``w``."""
    m = t.shape[0]
    t_sorted, perm = torch.sort(t, stable=True)
    position = torch.empty_like(perm)
    position[perm] = torch.arange(m)
    group_start = torch.searchsorted(t_sorted, t, right=False)
    keys = torch.cat([2 * group_start, 2 * position + 1])          # queries, then data
    order = torch.argsort(keys, stable=True)
    n_events = 2 * m
    size = 1 << max(1, (n_events - 1).bit_length())
    pad = size - n_events
    is_data = torch.cat([torch.zeros(m, dtype=torch.bool), torch.ones(m, dtype=torch.bool)])
    is_data = torch.nn.functional.pad(is_data[order], (0, pad))
    source = torch.cat([torch.arange(m), torch.arange(m)])[order]
    with torch.no_grad():
        value = torch.where(is_data[:n_events], x[source], y[source])
        value = torch.nn.functional.pad(value, (0, pad), value=float("inf"))
        data_value = torch.where(is_data, value, -torch.inf)
    weight = torch.nn.functional.pad(torch.where(is_data[:n_events], w[source], 0.0), (0, pad))
    count = is_data.to(torch.int64)
    acc_w = weight.new_zeros(size)
    acc_c = torch.zeros(size, dtype=torch.int64)
    half = 1
    while half < size:
        lv = data_value.view(-1, 2, half)[:, 0, :]
        qv = value.view(-1, 2, half)[:, 1, :].contiguous()
        lw = weight.view(-1, 2, half)[:, 0, :]
        lc = count.view(-1, 2, half)[:, 0, :]
        sv, idx = torch.sort(lv, dim=-1)
        sw = torch.gather(lw, -1, idx)
        sc = torch.gather(lc, -1, idx)
        suffix_w = torch.cat([sw.flip(-1).cumsum(-1).flip(-1), sw.new_zeros(sw.shape[0], 1)],
                             dim=-1)
        suffix_c = torch.cat([sc.flip(-1).cumsum(-1).flip(-1), sc.new_zeros(sc.shape[0], 1)],
                             dim=-1)
        first_larger = torch.searchsorted(sv, qv, right=True)
        got_w = torch.gather(suffix_w, -1, first_larger)
        got_c = torch.gather(suffix_c, -1, first_larger)
        acc_w = acc_w + torch.stack([torch.zeros_like(got_w), got_w], dim=1).reshape(size)
        acc_c = acc_c + torch.stack([torch.zeros_like(got_c), got_c], dim=1).reshape(size)
        half *= 2
    queries = ~is_data[:n_events]
    query_source = source[queries]
    out_w = weight.new_zeros(m).index_add(0, query_source, acc_w[:n_events][queries])
    out_c = torch.zeros(m, dtype=torch.int64).index_add(0, query_source,
                                                        acc_c[:n_events][queries])
    return out_w, out_c


def pwr_sorted_torch(student: Tensor, teacher: Tensor, *, relation: str = "cosine",
                     inversion: str = "exp", margin: str = "teacher_diff",
                     margin_value: float = 0.0, power: float = 1.0,
                     beta: float = 1.0) -> Tensor:
    """Exact PWR for ``inversion`` ``'diff'`` (or ``'power'`` with ``power == 1``) and ``'exp'``
    by dominance sums; mean over the teacher-ordered pairs (kdface's definition)."""
    separable = inversion in ("diff", "exp") or (inversion == "power" and power == 1.0)
    if relation != "cosine" or not separable:
        raise ValueError("the torch sorted reference implements relation='cosine' with "
                         "inversion 'diff' or 'exp' only")
    s = pwr_scores(student)
    with torch.no_grad():
        t = pwr_scores(teacher)
    x, y = pwr_pair_values(s, t, margin, margin_value)
    if inversion == "exp":
        mid = 0.5 * (x.max() + y.min()).detach()
        w_sum, c = dominance_sums(t, x, y, torch.exp(beta * (x - mid)))
        total = (torch.exp(-beta * (y - mid)) * w_sum).sum() - c.sum().to(x.dtype)
    else:
        w_sum, c = dominance_sums(t, x, y, x)
        total = w_sum.sum() - (y * c.to(y.dtype)).sum()
    pairs = torch.searchsorted(torch.sort(t).values, t, right=False).sum()
    return total / pairs.clamp(min=1).to(total.dtype)
