"""The papers' evaluation protocols on one model: verification (HR and LR probes),
identification, nearest-neighbour verification, alignment; and embedding export.

The numbers come from :mod:`kdface.metrics`; this module turns images or exported embeddings
into the arrays those metrics take and checks that they fit together.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kdface import metrics
from kdface.metrics import DEFAULT_FAR_TARGETS, DEFAULT_FPR_TARGETS, DEFAULT_RANKS


def check_fold_count(pairs: dict[str, int], folds: int, *,
                     own_folds: dict[str, int | None] | None = None) -> None:
    """Refuses, in one line naming the set and ``--folds``, a verification set with fewer pairs
    than ``folds`` (every fold tests at least one pair, its threshold chosen on the others).
    pairs: ``{set name: pair count}``; own_folds: the folds each set's pair list declares
    (``data_prep.build photos`` writes ``min(10, pairs / 2)``), suggested when they fit."""
    for name, count in pairs.items():
        if count >= folds:
            continue
        own = (own_folds or {}).get(name)
        if count < 2:
            fix = "a verification set needs at least 2 pairs (--folds >= 2)"
        elif own is not None and 2 <= own <= count:
            fix = f"pass --folds={own} (the folds of its pair list)"
        else:
            fix = f"pass --folds=K with 2 <= K <= {count}"
        raise ValueError(f"verification set {name!r} has {count} pairs, fewer than "
                         f"--folds={folds} verification folds: {fix}")


def _check_pairs(images: np.ndarray, issame: Any) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be interleaved pairs uint8 [2P, H, W, 3], got shape "
                         f"{images.shape}")
    if images.shape[0] % 2:
        raise ValueError(f"images must be interleaved pairs [2P, H, W, 3]: got an odd number "
                         f"of images ({images.shape[0]})")
    issame = np.asarray(issame)
    if issame.ndim != 1 or images.shape[0] // 2 != issame.shape[0]:
        raise ValueError(f"{images.shape[0] // 2} pairs of images but {issame.size} issame "
                         f"labels (shape {issame.shape})")
    return issame.astype(bool)


def _embed(model, images, flip: bool, *, summed: bool = False) -> np.ndarray:
    """Embeddings of ``images``; with ``flip`` the normalized sum of the image's and the mirrored
    image's, or with ``summed`` their plain float64 sum (insightface normalizes the sum once, in
    its verification step: passing the sum keeps its floats)."""
    if flip and summed:
        mirrored = np.ascontiguousarray(np.asarray(images)[:, :, ::-1])
        return (np.asarray(model(images), np.float64) +
                np.asarray(model(mirrored), np.float64))
    if hasattr(model, "embed"):
        return model.embed(images, flip=flip)
    emb = model(images)
    if flip:
        mirrored = np.ascontiguousarray(np.asarray(images)[:, :, ::-1])
        emb = metrics.embeddings_with_flip(emb, model(mirrored))
    return emb


def verification_from_embeddings(emb: Any, issame: Any, *, folds: int = 10,
                                 far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
                                 protocol: str = "exact") -> dict[str, Any]:
    """The 10-fold protocol (``kdface.metrics.verification``, ``protocol`` ``'exact'`` or
    ``'insightface'``) on interleaved pair embeddings ``emb: [2P, D]`` (pair i = rows 2i, 2i + 1)
    and ``issame: [P]``."""
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[0] % 2:
        raise ValueError(f"pair embeddings must be interleaved [2P, D], got shape {emb.shape}")
    issame = np.asarray(issame)
    if issame.ndim != 1 or issame.shape[0] != emb.shape[0] // 2:
        raise ValueError(f"{emb.shape[0] // 2} pairs of embeddings but {issame.size} issame "
                         f"labels")
    first, second = metrics.split_interleaved(emb)
    return metrics.verification(first, second, issame, folds=folds, far_targets=far_targets,
                                protocol=protocol)


def verification_report(embed, images: np.ndarray, issame: np.ndarray, *, flip: bool = False,
                        folds: int = 10, far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
                        protocol: str = "exact") -> dict[str, Any]:
    """insightface's 10-fold verification protocol on interleaved pairs ``images: [2P, H, W, 3]``.

    embed: an :class:`Embedder` or any ``uint8 [N, H, W, 3] -> [N, D]`` callable. With ``flip``
    each image's embedding is ``normalize(e(x) + e(mirror(x)))`` (insightface's option).
    Returns ``kdface.metrics.verification``'s dict: 10-fold accuracy (threshold on 9 folds,
    accuracy on the 10th, contiguous folds in file order; Nikitin et al. 2020 §4.1), best-threshold
    accuracy, ROC/AUC, TAR@FAR with the unsupported FARs listed. ``protocol='insightface'``:
    insightface's grids and interpolation (``kdface.metrics.insightface_verification``), fed
    the unnormalized image + mirror sums as insightface's script feeds them.
    """
    issame = _check_pairs(images, issame)
    emb = _embed(embed, images, flip, summed=protocol == "insightface")
    return verification_from_embeddings(emb, issame, folds=folds, far_targets=far_targets,
                                        protocol=protocol)


def check_lr_sizes(sizes: Sequence[int]) -> list[int]:
    """Probe sizes as positive ints (Wang et al. 2019 §3.1 uses 8, 12, 16, 20 px)."""
    if isinstance(sizes, (str, bytes)):
        raise TypeError("lr_sizes must be a sequence of ints, not a string")
    out = []
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
            raise ValueError(f"LR probe sizes must be positive ints (pixels), got {s!r}")
        out.append(int(s))
    if len(set(out)) != len(out):
        raise ValueError(f"LR probe sizes repeat: {out}")
    return out


def lr_report(embed, images: np.ndarray, issame: np.ndarray, sizes: Sequence[int], *,
              flip: bool = False, folds: int = 10,
              far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
              protocol: str = "exact") -> dict[int, dict[str, Any]]:
    """Wang et al. 2019 §3.1 LR-LFW: the gallery image (row 2i) is kept, the probe (row 2i + 1) is
    blurred, downscaled to ``size`` px on its longer side and scaled back
    (``kdface.data.lr_probe_pairs``); one verification result per size."""
    from kdface.data import lr_probe_pairs
    issame = _check_pairs(images, issame)
    sizes = check_lr_sizes(sizes)
    longer = max(np.asarray(images).shape[1:3])
    if any(s >= longer for s in sizes):
        raise ValueError(f"LR probe sizes {sizes} must be smaller than the set's images "
                         f"({longer} px on the longer side)")
    return {s: verification_report(embed, lr_probe_pairs(images, s), issame, flip=flip,
                                   folds=folds, far_targets=far_targets, protocol=protocol)
            for s in sizes}


def identification_report(probe_emb: Any, probe_labels: Any, gallery_emb: Any,
                          gallery_labels: Any, *, distractor_emb: Any = None,
                          ranks: Sequence[int] = DEFAULT_RANKS,
                          fpr_targets: Sequence[float] = DEFAULT_FPR_TARGETS,
                          probe_chunk: int = 1024, item_chunk: int = 16384,
                          nn_top1: bool = True) -> dict[str, Any]:
    """Identification (``kdface.metrics.identify``, chunked) plus Wang et al. 2017's
    nearest-neighbour top-1 verification.

    probe_emb: [Q, D], probe_labels: [Q]; gallery_emb: [G, D], gallery_labels: [G];
    distractor_emb: [M, D] or None (may be memory-mapped). Returns identify's dict (rank-k
    accuracy, CMC, TPR@FPR over all probe-item pairs, DIR@FPIR, unsupported targets, counts;
    a rank above the number of gallery + distractor items is None), ``seconds``, and with
    ``nn_top1`` the leave-one-out Euclidean nearest-neighbour accuracy over gallery + probes
    together (``kdface.metrics.nearest_neighbour_verification``; Wang et al. 2017 §5.1: each
    test sample's nearest other sample shares its identity).
    """
    t0 = time.perf_counter()
    num_items = len(gallery_emb) + (0 if distractor_emb is None else len(distractor_emb))
    ranks = [int(k) for k in ranks]
    searchable = [k for k in ranks if k <= num_items]
    if not searchable:
        raise ValueError(f"every rank in {ranks} exceeds the {num_items} searched items")
    result = metrics.identify(probe_emb, probe_labels, gallery_emb, gallery_labels,
                              distractor_emb=distractor_emb, ranks=searchable,
                              fpr_targets=fpr_targets, probe_chunk=probe_chunk,
                              item_chunk=item_chunk)
    # A rank beyond the number of searched items has no meaning: reported as None.
    result["rank_accuracy"].update({k: None for k in ranks if k > num_items})
    result["seconds"] = time.perf_counter() - t0
    if nn_top1:
        every = np.concatenate([np.asarray(gallery_emb), np.asarray(probe_emb)])
        labels = np.concatenate([np.asarray(gallery_labels), np.asarray(probe_labels)])
        nn = metrics.nearest_neighbour_verification(every, labels, metric="euclidean")
        result["nn_top1"] = nn["top1_accuracy"]
        result["nn_num_singletons"] = nn["num_singletons"]
    return result


def alignment_report(pred: Any, truth: Any) -> dict[str, Any]:
    """Wang et al. 2017 §5.1 alignment NRMSE of 5-point landmarks ``pred, truth: [N, 5, 2]``.

    Both in pixels of the network input (the frame of the training targets); error per image =
    mean point-to-point distance / inter-ocular distance (points 0 and 1, the eye centres of the
    5-point layout) of the ground truth. Returns ``kdface.metrics.nrmse_dataset``'s dict (NRMSE,
    failure rate at 0.1, CED and its area) plus ``num_images``.
    """
    result = metrics.nrmse_dataset(pred, truth, normalization="inter_ocular", left_eye=0,
                                   right_eye=1)
    result["num_images"] = int(np.asarray(truth).shape[0])
    return result


def identification_arrays(embedder, records, *, flip: bool = False,
                          distractor_records=None) -> dict[str, np.ndarray]:
    """``gallery_emb, gallery_labels, probe_emb, probe_labels`` (+ ``distractor_emb``) of a
    labelled dataset embedded by ``embedder``: per identity the first image (dataset order) is
    the gallery image, the others are probes (:func:`split_gallery_probe`)."""
    from kdface.evaluation._sources import embed_records, split_gallery_probe
    data = embed_records(embedder, records, flip=flip)
    gallery, probes = split_gallery_probe(data["labels"])
    if probes.size == 0:
        raise ValueError(f"dataset {records.name} has one image per identity: no probes")
    out = {"gallery_emb": data["embedding"][gallery], "gallery_labels": data["labels"][gallery],
           "probe_emb": data["embedding"][probes], "probe_labels": data["labels"][probes]}
    if distractor_records is not None:
        out["distractor_emb"] = embed_records(embedder, distractor_records,
                                              flip=flip)["embedding"]
    return out


def export_embeddings(embedder, path: str, *, sets: dict | None = None,
                      lr_sizes: Sequence[int] = (), flip: bool = False,
                      identification_data=None, distractor_data=None) -> list[str]:
    """Writes a run's embeddings to ``path`` (``.npz``) in the :class:`EmbeddingFile` format.

    sets: ``{name: (images [2P, H, W, 3], issame [P])}`` -> ``<name>/emb`` [2P, E],
    ``<name>/issame``, and ``<name>/lr<size>/emb`` per LR probe size; identification_data /
    distractor_data: :class:`FaceRecords` -> ``gallery_emb``, ``gallery_labels``, ``probe_emb``,
    ``probe_labels`` (+ ``distractor_emb``). ``flip`` is stored; embeddings are float32 (with
    flip, the normalized sum). Returns the keys written.
    """
    if not os.fspath(path).endswith(".npz"):
        raise ValueError(f"export path must end with .npz, got {path!r}")
    arrays: dict[str, np.ndarray] = {"flip": np.asarray(bool(flip))}
    from kdface.data import lr_probe_pairs
    for name, (images, issame) in (sets or {}).items():
        issame = _check_pairs(images, issame)
        arrays[f"{name}/emb"] = np.asarray(_embed(embedder, images, flip), np.float32)
        arrays[f"{name}/issame"] = issame
        for s in check_lr_sizes(lr_sizes):
            arrays[f"{name}/lr{s}/emb"] = np.asarray(
                _embed(embedder, lr_probe_pairs(images, s), flip), np.float32)
    if identification_data is not None:
        found = identification_arrays(embedder, identification_data, flip=flip,
                                      distractor_records=distractor_data)
        arrays.update({k: (np.asarray(v, np.float32) if k.endswith("_emb") else v)
                       for k, v in found.items()})
    elif distractor_data is not None:
        raise ValueError("distractor data without identification data: nothing to search")
    if len(arrays) == 1:
        raise ValueError("nothing to export: give verification sets and/or identification data")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, **arrays)
    return sorted(arrays)
