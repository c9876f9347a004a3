"""Chunked similarity search: running top-k merges and a global tail of the largest scores.

The building blocks of :mod:`kdface.metrics._identification`: a probe set is compared with a
gallery (and up to millions of distractors) one ``[probe_chunk, item_chunk]`` float32 block at a
time, so memory stays at one block plus ``[probes, k]`` running state whatever the item count.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np


def chunk_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` blocks of at most ``size`` rows covering ``range(n)``."""
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def unit_rows32(x: Any) -> np.ndarray:
    """Rows of ``x: [N, D]`` as float32 with unit L2 norm (an all-zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.sqrt(np.einsum("nd,nd->n", x, x))[:, None]
    return x / np.maximum(norm, np.float32(1e-12))


def similarity_blocks(query: np.ndarray, items: Any, item_chunk: int
                      ) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yields ``(start, stop, scores [Q, stop - start])`` cosine blocks of unit ``query: [Q, D]``.

    ``items: [N, D]`` may be a memory-mapped array; each block is read and normalized on the fly.
    """
    for start, stop in chunk_bounds(items.shape[0], item_chunk):
        yield start, stop, query @ unit_rows32(items[start:stop]).T


def merge_top_values(top: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The k largest values per row of ``top: [B, k]`` and ``scores: [B, n]``, unordered.

    Only values are kept, so exactly tied scores cannot change the result.
    """
    k = top.shape[1]
    if scores.shape[1] > k:
        scores = np.partition(scores, scores.shape[1] - k, axis=1)[:, -k:]
    both = np.concatenate([top, scores], axis=1)
    return np.partition(both, both.shape[1] - k, axis=1)[:, -k:]


def sort_desc(values: np.ndarray) -> np.ndarray:
    """Rows of ``values: [B, k]`` sorted in descending order."""
    return -np.sort(-values, axis=1)


class TailOfScores:
    """The ``capacity`` largest of a stream of scores (a multiset), in bounded memory.

    Used to place a threshold at FAR/FPR ``f`` over ``total`` impostor scores without storing
    them: the threshold is the (floor(f * total) + 1)-th largest, so ``capacity`` must be at least
    that. Scores at or below the running floor (the smallest kept value once full) are dropped
    on arrival, which leaves every order statistic up to ``capacity`` unchanged.
    """

    def __init__(self, capacity: int):
        self.capacity = max(int(capacity), 1)
        self.floor = -np.inf
        self._kept: list[np.ndarray] = []
        self._pending = 0

    def add(self, scores: np.ndarray) -> None:
        """Adds every finite value of ``scores`` (any shape); ``-inf`` entries act as masks."""
        new = scores[scores > self.floor]
        if new.size:
            self._kept.append(new.astype(np.float32, copy=False).ravel())
            self._pending += new.size
        if self._pending > 2 * self.capacity + (1 << 20):
            self._compact()

    def _compact(self) -> None:
        values = np.concatenate(self._kept) if self._kept else np.zeros(0, np.float32)
        if values.size > self.capacity:
            values.partition(values.size - self.capacity)
            values = values[-self.capacity:].copy()  # drop the big buffer, keep the tail only
            self.floor = float(values.min())
        self._kept, self._pending = [values], values.size

    def largest(self) -> np.ndarray:
        """The kept values, descending (all values seen if fewer than ``capacity``)."""
        self._compact()
        return np.sort(self._kept[0])[::-1]


def tail_capacity(targets: tuple[float, ...], total: int) -> int:
    """Order statistics needed for thresholds at rates ``targets`` among ``total`` scores."""
    if not targets or total == 0:
        return 1
    return min(total, math.floor(max(targets) * total + 1e-9) + 1)


def threshold_from_tail(largest_desc: np.ndarray, rate: float, total: int) -> float:
    """Threshold admitting at most ``floor(rate * total)`` of ``total`` scores via ``s > t``.

    ``largest_desc`` holds at least the ``floor(rate * total) + 1`` largest scores, descending.
    """
    k = math.floor(rate * total + 1e-9)
    if k >= total:
        return float(largest_desc[-1]) - 1.0
    return float(largest_desc[k])


def top_k(query: Any, items: Any, k: int, *, query_chunk: int = 1024, item_chunk: int = 16384,
          exclude_same_index: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most cosine-similar items per query row, by a chunked running merge.

    query: [Q, D]; items: [N, D] (may be memory-mapped). Returns ``(scores [Q, k] float32,
    indices [Q, k] int64)``, scores descending, ties at equal score ordered by index. With
    ``exclude_same_index`` (query and items are the same set) item i is never returned for query
    i: leave-one-out search. Which of several items tied exactly at the k-th score is kept is
    unspecified. Raises if fewer than ``k`` items are available per query.
    """
    q = _matrix("query", query)
    it = _matrix("items", items)
    if q.shape[1] != it.shape[1]:
        raise ValueError(f"query and items must have the same dimension D, "
                         f"got {q.shape[1]} and {it.shape[1]}")
    if exclude_same_index and q.shape[0] != it.shape[0]:
        raise ValueError("exclude_same_index needs query and items of the same length, "
                         f"got {q.shape[0]} and {it.shape[0]}")
    available = it.shape[0] - (1 if exclude_same_index else 0)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= available:
        raise ValueError(f"k must be an int in [1, {available}] (items per query), got {k!r}")
    _check_chunk("query_chunk", query_chunk)
    _check_chunk("item_chunk", item_chunk)
    out_s = np.empty((q.shape[0], k), np.float32)
    out_i = np.empty((q.shape[0], k), np.int64)
    for q0, q1 in chunk_bounds(q.shape[0], query_chunk):
        top_s = np.full((q1 - q0, k), -np.inf, np.float32)
        top_i = np.full((q1 - q0, k), -1, np.int64)
        for i0, i1, s in similarity_blocks(unit_rows32(q[q0:q1]), it, item_chunk):
            if exclude_same_index:
                rows = np.arange(max(q0, i0), min(q1, i1))
                s[rows - q0, rows - i0] = -np.inf
            idx = np.broadcast_to(np.arange(i0, i1)[None, :], s.shape)
            if s.shape[1] > k:
                part = np.argpartition(-s, k - 1, axis=1)[:, :k]
                s, idx = np.take_along_axis(s, part, 1), np.take_along_axis(idx, part, 1)
            both_s = np.concatenate([top_s, s], axis=1)
            both_i = np.concatenate([top_i, idx], axis=1)
            part = np.argpartition(-both_s, k - 1, axis=1)[:, :k]
            top_s = np.take_along_axis(both_s, part, 1)
            top_i = np.take_along_axis(both_i, part, 1)
        order = np.lexsort((top_i, -top_s), axis=1)
        out_s[q0:q1] = np.take_along_axis(top_s, order, 1)
        out_i[q0:q1] = np.take_along_axis(top_i, order, 1)
    return out_s, out_i


def _matrix(name: str, x: Any) -> Any:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if len(x.shape) != 2:
        raise ValueError(f"{name} must have shape [N, D] (rank 2), got shape {tuple(x.shape)}")
    return x


def _check_chunk(name: str, size: Any) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"{name} must be a positive int, got {size!r}")
