"""Face identification: closed-set rank-k (CMC), open-set DIR@FPIR and MegaFace-style Id(k)/Ver.

Papers: Nikitin et al. 2020 §4.1 (MegaFace: "TPR@FPR = 1e-6 for verification, and accuracy at
rank-1 and rank-10 for identification" with 1M distractors) and Wang et al. 2019 §3.1 (SCFace:
mugshot gallery, surveillance probes, rank-1 "face recognition rate").

Everything is computed block by block (:mod:`kdface.metrics._topk`): per probe a running top-k of
*non-mate* scores and the best *mate* score are kept, so a million distractors never sit in memory
as a score matrix. Scores are cosine similarities of L2-normalized float32 embeddings.

Rank definition (exact, tie-proof): a mated probe is correct at rank k when fewer than k non-mate
items (gallery items of other identities, or distractors) score strictly higher than its best
mate. Without ties this is "its identity appears among the top-k items"; exact ties are resolved
in the probe's favour, so the result does not depend on chunking or sort stability.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kdface.metrics._topk import (
    TailOfScores,
    merge_top_values,
    similarity_blocks,
    sort_desc,
    tail_capacity,
    threshold_from_tail,
    unit_rows32,
    _check_chunk,
    _matrix,
)

DEFAULT_RANKS = (1, 5, 10)
DEFAULT_FPR_TARGETS = (1e-3, 1e-4, 1e-5, 1e-6)


def identify(probe_emb: Any, probe_labels: Any, gallery_emb: Any, gallery_labels: Any, *,
             distractor_emb: Any = None, ranks: Sequence[int] = DEFAULT_RANKS,
             fpr_targets: Sequence[float] = DEFAULT_FPR_TARGETS, probe_chunk: int = 1024,
             item_chunk: int = 16384) -> dict[str, Any]:
    """Closed- and open-set identification of probes against a gallery (+ unlabeled distractors).

    probe_emb: [Q, D], probe_labels: [Q] int; gallery_emb: [G, D], gallery_labels: [G] int;
    distractor_emb: [M, D] or None (may be a memory-mapped array), identity unknown, never a mate.
    A probe is *mated* when some gallery item has its label.

    Returns a dict:

    - ``rank_accuracy`` {k: fraction of mated probes correct at rank k} (module docstring), and
      ``cmc`` [max(ranks)] for every rank 1..max(ranks);
    - ``tpr_at_fpr`` {f: TPR}: all-pairs verification over the search (MegaFace "Ver" style):
      genuine = (probe, same-label gallery item) scores, impostor = (probe, other-label gallery
      item) and (probe, distractor) scores; the threshold admits floor(f * #impostors) impostors
      (``s > t``), TPR = fraction of genuine scores above it;
    - ``dir_at_fpir`` {f: DIR}: open-set (NIST FRVT style) — FPIR(t) = fraction of *non-mated*
      probes whose top-1 score over all items exceeds t; DIR(t) = fraction of mated probes
      correct at rank 1 with best-mate score > t, at the t admitting floor(f * #non-mated) of them;
    - ``*_unsupported`` lists: targets with f * count < 1 (not one false accept allowed), whose
      value is None (also None when no genuine pair / mated probe exists);
    - ``num_probes``, ``num_mated``, ``num_non_mated``, ``num_gallery``, ``num_distractors``.

    probe_chunk, item_chunk: block sizes; memory is about 3 * 4 * probe_chunk * item_chunk bytes.
    """
    probe = _matrix("probe_emb", probe_emb)
    gallery = _matrix("gallery_emb", gallery_emb)
    p_lab = _labels("probe_labels", probe_labels, probe.shape[0])
    g_lab = _labels("gallery_labels", gallery_labels, gallery.shape[0])
    distr = None if distractor_emb is None else _matrix("distractor_emb", distractor_emb)
    _same_dim(probe, "gallery_emb", gallery)
    if distr is not None:
        _same_dim(probe, "distractor_emb", distr)
    n_distr = 0 if distr is None else distr.shape[0]
    ranks = _ranks(ranks, gallery.shape[0] + n_distr)
    fpr_targets = _rates("fpr_targets", fpr_targets)
    _check_chunk("probe_chunk", probe_chunk)
    _check_chunk("item_chunk", item_chunk)

    k_max = max(ranks)
    mated = np.isin(p_lab, g_lab)
    per_label = dict(zip(*np.unique(g_lab, return_counts=True)))
    n_genuine = int(sum(per_label.get(lab, 0) for lab in p_lab.tolist()))
    n_impostor = probe.shape[0] * (gallery.shape[0] + n_distr) - n_genuine
    tail = TailOfScores(tail_capacity(fpr_targets, n_impostor))
    genuine, best_mate = [], np.full(probe.shape[0], -np.inf, np.float32)
    top_nonmate = np.full((probe.shape[0], k_max), -np.inf, np.float32)
    for q0 in range(0, probe.shape[0], probe_chunk):
        q1 = min(q0 + probe_chunk, probe.shape[0])
        query, top = unit_rows32(probe[q0:q1]), top_nonmate[q0:q1]
        for g0, g1, s in similarity_blocks(query, gallery, item_chunk):
            is_mate = p_lab[q0:q1, None] == g_lab[None, g0:g1]
            genuine.append(s[is_mate])
            best_mate[q0:q1] = np.maximum(best_mate[q0:q1],
                                          np.where(is_mate, s, -np.inf).max(axis=1))
            s[is_mate] = -np.inf
            top = merge_top_values(top, s)
            tail.add(s)
        if distr is not None:
            for _, _, s in similarity_blocks(query, distr, item_chunk):
                top = merge_top_values(top, s)
                tail.add(s)
        top_nonmate[q0:q1] = sort_desc(top)

    # k-th largest non-mate <= best mate  <=>  fewer than k non-mates strictly above the mate.
    hit = top_nonmate[mated] <= best_mate[mated, None]
    cmc = np.mean(hit, axis=0) if mated.any() else np.full(k_max, np.nan)
    genuine = np.concatenate(genuine) if genuine else np.zeros(0, np.float32)
    tpr, tpr_unsup = _tpr_at_fpr(genuine, tail, n_impostor, fpr_targets)
    top1 = np.maximum(top_nonmate[:, 0], best_mate)
    dir_, dir_unsup = _dir_at_fpir(hit[:, 0] if mated.any() else np.zeros(0, bool),
                                   best_mate[mated], top1[~mated], fpr_targets)
    return {
        "rank_accuracy": {k: (float(cmc[k - 1]) if mated.any() else None) for k in ranks},
        "cmc": cmc,
        "tpr_at_fpr": tpr,
        "tpr_at_fpr_unsupported": tpr_unsup,
        "dir_at_fpir": dir_,
        "dir_at_fpir_unsupported": dir_unsup,
        "num_probes": int(probe.shape[0]),
        "num_mated": int(mated.sum()),
        "num_non_mated": int((~mated).sum()),
        "num_gallery": int(gallery.shape[0]),
        "num_distractors": n_distr,
    }


def megaface_identification(probe_emb: Any, probe_labels: Any, distractor_emb: Any, *,
                            ranks: Sequence[int] = (1, 10),
                            fpr_targets: Sequence[float] = (1e-6,), probe_chunk: int = 1024,
                            item_chunk: int = 16384) -> dict[str, Any]:
    """MegaFace challenge-1 style Id(k) and Ver (Nikitin et al. 2020 Table 1: Ver, Id(1), Id(10)).

    probe_emb: [Q, D] with probe_labels [Q] int (FaceScrub role); distractor_emb: [M, D]
    (MegaFace's 1M distractors; may be memory-mapped).

    Id(k), as we read the MegaFace protocol: every ordered pair (p, g) of *different* probe images
    of one identity is one search, with a gallery made of g plus all distractors (the other probe
    images are not in it). The search is correct at rank k when fewer than k distractors score
    strictly higher with p than g does. Id(k) = correct searches / searches; identities with a
    single image make no search.

    Ver = TPR at FPR f: genuine = unordered same-identity probe pairs, impostor = every
    (probe, distractor) pair; the threshold admits floor(f * Q * M) impostors (``s > t``).

    Returns ``id_at_rank`` {k: Id(k)}, ``ver_tpr_at_fpr`` {f: TPR or None},
    ``ver_unsupported``, ``num_searches``, ``num_genuine_pairs``, ``num_impostor_pairs``.
    """
    probe = _matrix("probe_emb", probe_emb)
    p_lab = _labels("probe_labels", probe_labels, probe.shape[0])
    distr = _matrix("distractor_emb", distractor_emb)
    _same_dim(probe, "distractor_emb", distr)
    ranks = _ranks(ranks, distr.shape[0] + 1)
    fpr_targets = _rates("fpr_targets", fpr_targets)
    _check_chunk("probe_chunk", probe_chunk)
    _check_chunk("item_chunk", item_chunk)

    k_max = max(ranks)
    n_impostor = probe.shape[0] * distr.shape[0]
    tail = TailOfScores(tail_capacity(fpr_targets, n_impostor))
    correct = np.zeros(k_max, np.int64)
    searches, genuine = 0, []
    for q0 in range(0, probe.shape[0], probe_chunk):
        q1 = min(q0 + probe_chunk, probe.shape[0])
        query = unit_rows32(probe[q0:q1])
        top = np.full((q1 - q0, k_max), -np.inf, np.float32)
        for _, _, s in similarity_blocks(query, distr, item_chunk):
            top = merge_top_values(top, s)
            tail.add(s)
        top = sort_desc(top)
        for g0, g1, s in similarity_blocks(query, probe, item_chunk):
            rows, cols = np.nonzero(p_lab[q0:q1, None] == p_lab[None, g0:g1])
            keep = rows + q0 != cols + g0
            rows, cols = rows[keep], cols[keep]
            mate = s[rows, cols]
            correct += np.sum(top[rows] <= mate[:, None], axis=0)
            searches += rows.size
            genuine.append(mate[rows + q0 < cols + g0])
    genuine = np.concatenate(genuine) if genuine else np.zeros(0, np.float32)
    ver, unsup = _tpr_at_fpr(genuine, tail, n_impostor, fpr_targets)
    return {
        "id_at_rank": {k: (float(correct[k - 1] / searches) if searches else None)
                       for k in ranks},
        "ver_tpr_at_fpr": ver,
        "ver_unsupported": unsup,
        "num_searches": int(searches),
        "num_genuine_pairs": int(genuine.size),
        "num_impostor_pairs": int(n_impostor),
    }


def _tpr_at_fpr(genuine: np.ndarray, tail: TailOfScores, n_impostor: int,
                targets: tuple[float, ...]) -> tuple[dict[float, Any], list[float]]:
    unsupported = [f for f in targets if f * n_impostor + 1e-9 < 1.0]
    out: dict[float, Any] = {}
    largest = tail.largest() if n_impostor else np.zeros(0, np.float32)
    for f in targets:
        if f in unsupported or genuine.size == 0:
            out[f] = None
            continue
        t = threshold_from_tail(largest, f, n_impostor)
        out[f] = float(np.mean(genuine > t))
    return out, unsupported


def _dir_at_fpir(rank1_hit: np.ndarray, mate_score: np.ndarray, non_mated_top1: np.ndarray,
                 targets: tuple[float, ...]) -> tuple[dict[float, Any], list[float]]:
    n = non_mated_top1.size
    unsupported = [f for f in targets if f * n + 1e-9 < 1.0]
    largest = np.sort(non_mated_top1)[::-1]
    out: dict[float, Any] = {}
    for f in targets:
        if f in unsupported or rank1_hit.size == 0:
            out[f] = None
            continue
        t = threshold_from_tail(largest, f, n)
        out[f] = float(np.mean(rank1_hit & (mate_score > t)))
    return out, unsupported


def _labels(name: str, labels: Any, n: int) -> np.ndarray:
    arr = np.asarray(labels)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array of identity ids, got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must have shape [N]=[{n}] (one label per embedding row), "
                         f"got shape {arr.shape}")
    return arr


def _same_dim(probe: Any, name: str, other: Any) -> None:
    if other.shape[1] != probe.shape[1]:
        raise ValueError(f"{name} must have the probes' dimension D={probe.shape[1]}, "
                         f"got {other.shape[1]}")


def _ranks(ranks: Sequence[int], num_items: int) -> tuple[int, ...]:
    out = tuple(ranks)
    if not out:
        raise ValueError("ranks must name at least one rank k >= 1")
    for k in out:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"ranks must be ints, got {k!r}")
        if not 1 <= k <= num_items:
            raise ValueError(f"each rank must lie in [1, {num_items}] (the searched items), "
                             f"got {k}")
    return tuple(sorted(set(int(k) for k in out)))


def _rates(name: str, rates: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(f) for f in rates)
    for f in out:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"{name} must lie in (0, 1], got {f}")
    return out
