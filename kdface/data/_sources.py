"""Where a dataset comes from: content fingerprints, default names, and KFold-sized folds.

A built dataset records the fingerprint of its source so that it is only ever handed out for
that content; default training-set names carry a fingerprint prefix because every insightface
training set is called ``train.rec``.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from kdface.data._recordio_format import default_idx_path

__all__ = ["kfold_fold_ids", "source_fingerprint"]


def kfold_fold_ids(num_items: int, num_folds: int) -> np.ndarray:
    """int64 ``[num_items]``: the fold of each item under ``KFold(num_folds, shuffle=False)``.

    scikit-learn's rule (its ``KFold`` documentation): folds are contiguous, in order, the
    first ``num_items % num_folds`` of size ``num_items // num_folds + 1`` and the others of
    size ``num_items // num_folds``. insightface's ``verification.py`` splits pairs with that
    ``KFold``; written here in NumPy so kdface needs no scikit-learn.
    """
    if not isinstance(num_folds, (int, np.integer)) or num_folds < 1:
        raise ValueError(f"num_folds must be a positive int, got {num_folds!r}")
    base, extra = divmod(int(num_items), int(num_folds))
    sizes = base + (np.arange(num_folds) < extra)
    return np.repeat(np.arange(num_folds, dtype=np.int64), sizes)


_FINGERPRINT_SPAN = 1 << 20  # bytes hashed at each end of a file


def _hash_file_ends(digest, path: str) -> None:
    """Adds a file's size and its first and last MiB to ``digest`` (a fraction of a second
    for a multi-GB ``.rec``, yet two different datasets cannot agree on both ends)."""
    size = os.path.getsize(path)
    digest.update(f"{size}:".encode())
    with open(path, "rb") as f:
        digest.update(f.read(_FINGERPRINT_SPAN))
        if size > 2 * _FINGERPRINT_SPAN:
            f.seek(size - _FINGERPRINT_SPAN)
        digest.update(f.read())


def source_fingerprint(source, source_format: str, *, landmarks=None,
                       images_root=None) -> str:
    """Hex SHA-256 identifying a dataset source's content, whatever its path.

    ``recordio``: size and first/last MiB of the ``.rec`` and of its ``.idx`` (if any);
    ``bin``: the same for the file; ``folders``: every image's relative path and size;
    ``pairs``: the ``pairs.txt`` ends plus the absolute ``images_root``. A landmarks CSV is
    included, since it changes the built features.
    """
    source = os.fspath(source)
    digest = hashlib.sha256(f"{source_format}\n".encode())
    if source_format == "folders":
        for root, dirs, files in os.walk(source):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                digest.update(f"{os.path.relpath(path, source)}:{os.path.getsize(path)}\n"
                              .encode())
    else:
        _hash_file_ends(digest, source)
        idx = default_idx_path(source)
        if source_format == "recordio" and os.path.isfile(idx):
            _hash_file_ends(digest, idx)
        if images_root is not None:
            digest.update(os.path.abspath(os.fspath(images_root)).encode())
    if landmarks is not None:
        _hash_file_ends(digest, os.fspath(landmarks))
    return digest.hexdigest()


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in text)


def _default_name(source: str) -> str:
    base = os.path.basename(os.path.normpath(source))
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return _safe_name(stem) or "dataset"


def _default_training_name(source: str, fingerprint: str) -> str:
    """``<folder>_<stem>_<8 hex>`` for a file, ``<folder>_<8 hex>`` for a folder of folders:
    readable, and unique to the content (every insightface set is ``<folder>/train.rec``)."""
    path = os.path.abspath(source)
    if os.path.isdir(path):
        base = _safe_name(os.path.basename(path))
    else:
        parent = _safe_name(os.path.basename(os.path.dirname(path)))
        base = "_".join(p for p in (parent, _default_name(path)) if p)
    return f"{base or 'dataset'}_{fingerprint[:8]}"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-." for c in name):
        raise ValueError(f"name must be a non-empty string of letters, digits, '_', '-', '.', "
                         f"got {name!r}")
    return name
