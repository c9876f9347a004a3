"""IJB-B / IJB-C from the files users have, embedded by a run: ``--ijb=IJBC:/data/IJBC``.

Layout (that of insightface's IJB evaluation; ``<name>`` is ``ijbb`` or ``ijbc``)::

    ROOT/meta/<name>_face_tid_mid.txt        image_name template_id media_id      (one per image)
    ROOT/meta/<name>_name_5pts_score.txt     image_name x1 y1 ... x5 y5 face_score (same order)
    ROOT/meta/<name>_template_pair_label.txt template_id1 template_id2 label (1 = same subject)
    ROOT/loose_crop/<image_name>             the loose face crops

Each crop is aligned to the 112x112 template by its 5 landmarks (``kdface.data.align_face``:
least-squares similarity, bilinear, black border, insightface's template), embedded with its
mirror image by the run (resized to the run's input size and normalized as in training), and the
protocol of :mod:`kdface.metrics._ijb` turns the features into TAR@FAR.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from kdface import metrics
from kdface.metrics import IJB_FAR_TARGETS

IJB_NAMES = ("IJBB", "IJBC")


class IjbMeta:
    """The meta files of one IJB set: ``names`` [N] image file names, ``templates``, ``medias``
    [N] int64, ``landmarks`` [N, 5, 2] float32 (x, y) in crop pixels, ``face_scores`` [N]
    float32, ``pairs`` (``template1``, ``template2``, ``labels``) [P] each; ``image_dir``."""

    def __init__(self, root: str, name: str):
        upper = name.upper()
        if upper not in IJB_NAMES:
            raise ValueError(f"IJB set name must be one of {IJB_NAMES}, got {name!r} "
                             f"(--ijb=IJBC:/path/to/IJBC)")
        self.name = upper
        self.root = os.fspath(root)
        meta = os.path.join(self.root, "meta")
        prefix = os.path.join(meta, upper.lower())
        self.image_dir = os.path.join(self.root, "loose_crop")
        for path in (f"{prefix}_face_tid_mid.txt", f"{prefix}_name_5pts_score.txt",
                     f"{prefix}_template_pair_label.txt", self.image_dir):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} not found: an {upper} root holds meta/"
                                        f"{upper.lower()}_face_tid_mid.txt, "
                                        f"meta/{upper.lower()}_name_5pts_score.txt, "
                                        f"meta/{upper.lower()}_template_pair_label.txt and "
                                        f"loose_crop/")
        rows = _rows(f"{prefix}_face_tid_mid.txt", 3)
        self.names = [r[0] for r in rows]
        self.templates = _ints(rows, 1, f"{prefix}_face_tid_mid.txt")
        self.medias = _ints(rows, 2, f"{prefix}_face_tid_mid.txt")
        points = _rows(f"{prefix}_name_5pts_score.txt", 12)
        if [r[0] for r in points] != self.names:
            raise ValueError(f"{prefix}_name_5pts_score.txt does not list the images of "
                             f"{prefix}_face_tid_mid.txt in the same order: the features would "
                             f"be assigned to the wrong templates")
        try:
            self.landmarks = np.array([[float(v) for v in r[1:11]] for r in points],
                                      dtype=np.float32).reshape(-1, 5, 2)
        except ValueError as err:
            raise ValueError(f"{prefix}_name_5pts_score.txt: {err}") from None
        # As insightface parses them: the score strings straight to float32.
        self.face_scores = np.array([r[11] for r in points]).astype(np.float32)
        pairs = _rows(f"{prefix}_template_pair_label.txt", 3)
        path = f"{prefix}_template_pair_label.txt"
        self.template1, self.template2 = _ints(pairs, 0, path), _ints(pairs, 1, path)
        self.labels = _ints(pairs, 2, path)
        if not np.isin(self.labels, (0, 1)).all():
            raise ValueError(f"{path}: labels must be 0 or 1")

    def __len__(self) -> int:
        return len(self.names)


def _rows(path: str, width: int) -> list[list[str]]:
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != width:
                raise ValueError(f"{path} line {number}: expected {width} space-separated "
                                 f"fields, got {len(parts)}")
            rows.append(parts)
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows


def _ints(rows: list[list[str]], column: int, path: str) -> np.ndarray:
    try:
        return np.array([int(r[column]) for r in rows], dtype=np.int64)
    except ValueError as err:
        raise ValueError(f"{path} column {column + 1}: {err}") from None


def aligned_crops(meta: IjbMeta, start: int, stop: int) -> np.ndarray:
    """uint8 ``[stop - start, 112, 112, 3]`` RGB: images ``start..stop`` aligned by their
    landmarks (``kdface.data.align_face``, insightface's 112x112 template)."""
    from kdface.data import align_face, read_image_file
    out = np.empty((stop - start, 112, 112, 3), np.uint8)
    for i in range(start, stop):
        image = read_image_file(os.path.join(meta.image_dir, meta.names[i]))
        out[i - start] = align_face(image, meta.landmarks[i], output_size=(112, 112))
    return out


def ijb_embeddings(model, meta: IjbMeta, *, flip: bool = True,
                   chunk: int = 512) -> tuple[np.ndarray, np.ndarray | None]:
    """``(emb [N, D], emb_flipped [N, D] or None)`` float32 of every aligned crop, ``chunk``
    crops at a time. model: an Embedder or a ``uint8 [n, H, W, 3] -> [n, D]`` callable."""
    parts, flipped = [], []
    for start in range(0, len(meta), chunk):
        crops = aligned_crops(meta, start, min(start + chunk, len(meta)))
        parts.append(np.asarray(model(crops), np.float32))
        if flip:
            mirrored = np.ascontiguousarray(crops[:, :, ::-1])
            flipped.append(np.asarray(model(mirrored), np.float32))
    return np.concatenate(parts), (np.concatenate(flipped) if flip else None)


def ijb_report(model, root: str, name: str, *,
               far_targets: Sequence[float] = IJB_FAR_TARGETS, flip: bool = True,
               face_score: bool = True, keep_norm: bool = True) -> dict[str, Any]:
    """IJB-B/C 1:1 verification of ``model`` on the set at ``root`` (module docstring).

    flip / face_score / keep_norm: insightface's F2 (image + mirror features added), D1
    (features times the detector score) and N1 (norms kept), all on by default as in its
    script. Returns :func:`kdface.metrics.ijb_verification`'s dict plus ``settings``.
    """
    meta = IjbMeta(root, name)
    emb, emb_flipped = ijb_embeddings(model, meta, flip=flip)
    feats = metrics.ijb_image_features(emb, emb_flipped,
                                       meta.face_scores if face_score else None,
                                       keep_norm=keep_norm)
    result = metrics.ijb_verification(feats, meta.templates, meta.medias, meta.template1,
                                      meta.template2, meta.labels, far_targets=far_targets)
    result["settings"] = {"set": meta.name, "root": meta.root, "flip": bool(flip),
                          "face_score": bool(face_score), "keep_norm": bool(keep_norm)}
    return result


def parse_ijb_spec(entry: str) -> tuple[str, str]:
    """``'IJBC:/data/IJBC'`` -> ``('IJBC', '/data/IJBC')`` (name case-insensitive)."""
    name, sep, root = str(entry).partition(":")
    if not sep or not root or name.upper() not in IJB_NAMES:
        raise ValueError(f"an IJB entry is NAME:ROOT with NAME one of {IJB_NAMES}, got "
                         f"{entry!r} (--ijb=IJBC:/path/to/IJBC)")
    return name.upper(), root
