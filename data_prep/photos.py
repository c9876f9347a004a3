"""A folder of photographs per identity -> aligned 112x112 faces, a training set and a pair list.

``root/<identity>/<photos>`` (any size, any number of people per photo) becomes:

- ``<aligned>/<identity>/<identity>_0001.jpg ...``: the largest face of each photo, found by
  YuNet (``kdface.data.FaceDetector``) and aligned to the 5-point template
  (``kdface.data.align_face``), JPEG quality 95, numbered in sorted photo order; identity names
  have runs of whitespace replaced by ``_`` (pairs.txt separates fields by whitespace);
- ``<aligned>/landmarks.csv``: the detected landmarks carried into each crop (the training
  set's ``landmarks`` feature), and ``<aligned>/sources.csv``: crop, photo, face box, score,
  number of faces found;
- ``<aligned>/pairs.txt``: an LFW-style pair list over the crops (``kdface.data.read_lfw_pairs``
  reads it): genuine pairs are two photos of one identity folder, impostor pairs two
  identities; as many of each, in ``F`` folds of ``N`` + ``N`` (the LFW layout), ``F`` up to
  ``num_folds``;
- the built training set (``kdface_training/<name>``, from the identity folders) and
  verification set (``kdface_verification/<name>``, from ``pairs.txt``) under ``data_dir``.
"""
from __future__ import annotations

import csv
import itertools
import logging
import os
import re
import shutil

import numpy as np

__all__ = ["align_photo_folders", "photo_pairs"]

_log = logging.getLogger(__name__)
_SOURCES = "sources.csv"
# Written first into every aligned-faces folder, so a run that failed half-way (a photo
# without a face) can be rerun over its own output while other folders are never emptied.
_MARKER = ".data_prep_photos"


def _identity_name(folder: str) -> str:
    return re.sub(r"\s+", "_", folder.strip())


def _prepare_out_dir(out_dir: str) -> None:
    """Empties a folder this module wrote before (it holds the marker); refuses others."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not os.path.isfile(os.path.join(out_dir, _MARKER)):
            raise ValueError(f"aligned-faces folder {out_dir} is not empty and was not written "
                             "by `data_prep.build photos`; choose another --aligned-dir")
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, _MARKER), "w") as f:
        f.write("aligned faces written by `python -m data_prep.build photos`\n")


def align_photo_folders(root, out_dir, *, detector, skip_no_face: bool = False,
                        skip_undecodable: bool = False, progress: bool = False) -> dict:
    """Detects and aligns the largest face of every photo under ``root/<identity>/``.

    Writes the crops, ``landmarks.csv`` and ``sources.csv`` into ``out_dir`` (module
    docstring; a folder written here before is replaced). A photo without a face raises
    ``kdface.data.NoFaceError`` naming it, or is skipped and counted with ``skip_no_face``;
    an undecodable one raises ``UndecodableImageError``, or is skipped and counted with
    ``skip_undecodable``. Returns ``{'photos', 'faces', 'no_face', 'undecodable',
    'identities', 'path', 'counts': {identity: crops}}``.
    """
    from kdface.data import (NoFaceError, detect_and_align, encode_image, read_identity_folders,
                             read_image_file, write_landmarks_csv)
    root, out_dir = os.fspath(root), os.path.abspath(os.fspath(out_dir))
    if os.path.abspath(root) == out_dir:
        raise ValueError(f"--aligned-dir must differ from the photo folder {root}")
    folders = read_identity_folders(root, on_undecodable="unchecked")
    names = [_identity_name(n) for n in folders.class_names]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(f"{root}: identity folders whose names differ only in whitespace "
                         f"clash as {clashes}; rename them")
    _prepare_out_dir(out_dir)
    samples = folders.samples
    if progress:
        from tqdm.auto import tqdm
        samples = tqdm(samples, desc="photos", unit="photo")
    keys, points, rows, counts = [], [], [], {}
    no_face = undecodable = 0
    for label, path in samples:
        identity = names[label]
        try:
            image = read_image_file(path, strict=True)
        except ValueError:  # UndecodableImageError
            if not skip_undecodable:
                raise
            _log.warning("skipping undecodable photo %s", path)
            undecodable += 1
            continue
        try:
            crop, landmarks, faces, index = detect_and_align(image, detector, name=path)
        except NoFaceError:
            if not skip_no_face:
                raise
            _log.warning("skipping photo without a face: %s", path)
            no_face += 1
            continue
        counts[identity] = counts.get(identity, 0) + 1
        key = f"{identity}/{identity}_{counts[identity]:04d}.jpg"
        os.makedirs(os.path.join(out_dir, identity), exist_ok=True)
        with open(os.path.join(out_dir, key), "wb") as f:
            f.write(encode_image(crop, format="jpg", quality=95, name=path))
        keys.append(key)
        points.append(landmarks)
        box = faces.boxes[index]
        rows.append([key, os.path.relpath(path, root), *(f"{v:.1f}" for v in box),
                     f"{faces.scores[index]:.4f}", len(faces.scores)])
    if not keys:
        raise ValueError(f"{root}: no face found in any photo ({no_face} without a face, "
                         f"{undecodable} undecodable)")
    write_landmarks_csv(os.path.join(out_dir, "landmarks.csv"), keys, np.stack(points))
    with open(os.path.join(out_dir, _SOURCES), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "photo", "x", "y", "width", "height", "score", "faces"])
        writer.writerows(rows)
    return {"photos": len(folders.samples), "faces": len(keys), "no_face": no_face,
            "undecodable": undecodable, "identities": len(counts), "path": out_dir,
            "counts": counts}


def photo_pairs(counts: dict, *, num_folds: int = 10, max_pairs: int = 3000, seed: int = 0):
    """LFW-layout pairs over identities with ``counts[identity]`` images numbered from 1.

    Genuine pairs: every two images of one identity; impostor pairs: images of two different
    identities, drawn uniformly without repeats (seeded ``numpy`` generator). ``n`` of each kind
    (``min`` of the genuine count, the impostor count and ``max_pairs // 2``) are cut into
    ``F = min(num_folds, n)`` folds of ``N = n // F`` genuine then ``N`` impostor lines.
    Returns ``(pairs, F)`` for ``kdface.data.write_lfw_pairs(path, pairs, num_folds=F)``, or
    ``([], 0)`` when no identity has two images or there is only one identity.
    """
    if num_folds < 1 or max_pairs < 2:
        raise ValueError(f"num_folds must be >= 1 and max_pairs >= 2, got {num_folds}, "
                         f"{max_pairs}")
    rng = np.random.default_rng(seed)
    names = sorted(counts)
    genuine = [(n, i, j) for n in names for i, j in
               itertools.combinations(range(1, counts[n] + 1), 2)]
    impostor_total = sum(counts[a] * counts[b] for a, b in itertools.combinations(names, 2))
    n = min(len(genuine), impostor_total, max_pairs // 2)
    if n == 0:
        return [], 0
    folds = min(num_folds, n)
    n = folds * (n // folds)
    genuine = [genuine[k] for k in rng.permutation(len(genuine))[:n]]
    if impostor_total <= 200_000:  # small: draw from the enumerated pairs
        every = [(a, i, b, j) for a, b in itertools.combinations(names, 2)
                 for i in range(1, counts[a] + 1) for j in range(1, counts[b] + 1)]
        impostor = [every[k] for k in rng.permutation(len(every))[:n]]
    else:  # large: rejection sampling, n <= max_pairs // 2 is far below the impostor count
        impostor, seen = [], set()
        flat = [(name, i) for name in names for i in range(1, counts[name] + 1)]
        while len(impostor) < n:
            a, b = rng.choice(len(flat), size=2, replace=False)
            (name1, i), (name2, j) = sorted((flat[a], flat[b]))
            if name1 != name2 and (name1, i, name2, j) not in seen:
                seen.add((name1, i, name2, j))
                impostor.append((name1, i, name2, j))
    per = n // folds
    pairs = []
    for f in range(folds):
        pairs += genuine[f * per:(f + 1) * per] + impostor[f * per:(f + 1) * per]
    return pairs, folds
