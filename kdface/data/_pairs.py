"""LFW-style ``pairs.txt`` + image folder, the other way users bring verification sets.

Format (LFW's ``pairs.txt``): a header ``F N`` (``10 300`` for LFW: 10 folds, 300 pairs of each
kind per fold), then ``F`` contiguous folds of ``2N`` lines: ``name n1 n2`` for a same-person
pair and ``name1 n1 name2 n2`` for a different-person pair (fields separated by tabs or
spaces). Image ``n`` of ``name`` is ``image_root/name/name_%04d.<ext>``. Two variants are also
read: a one-number header ``N`` (``pairsDevTrain.txt``: one fold of ``2N`` lines) and no header
at all, in which case the ``P`` pairs are cut into 10 contiguous folds of near-equal size
(``fold = 10 * i // P``), the same rule the verification metric applies by default.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from kdface.data._images import read_image_file, stack_images

__all__ = ["LfwPairs", "read_lfw_pairs", "write_lfw_pairs"]

_log = logging.getLogger(__name__)
_HEADERLESS_FOLDS = 10


class LfwPairs(tuple):
    """``(images, issame, folds)`` with ``.skipped``, the number of pairs dropped.

    ``images``: uint8 ``[2P, H, W, 3]`` RGB, or a list of ``2P`` paths when read with
    ``load_images=False``; ``issame``: bool ``[P]``; ``folds``: int64 ``[P]`` fold index.
    """

    def __new__(cls, images, issame, folds, skipped: int = 0):
        obj = super().__new__(cls, (images, issame, folds))
        obj.skipped = skipped
        return obj

    def __getnewargs__(self):
        return (*self, self.skipped)

    images = property(lambda self: self[0])
    issame = property(lambda self: self[1])
    folds = property(lambda self: self[2])


def _parse(pairs_path: str):
    """Returns [(name1, n1, name2, n2)], issame [P], folds [P]."""
    with open(pairs_path) as f:
        lines = [(no, line.split()) for no, line in enumerate(f, 1) if line.strip()]
    header = None
    if lines and len(lines[0][1]) in (1, 2) and all(t.isdigit() for t in lines[0][1]):
        header = [int(t) for t in lines[0][1]]
        lines = lines[1:]
    pairs, issame = [], []
    for no, tokens in lines:
        try:
            if len(tokens) == 3:
                pairs.append((tokens[0], int(tokens[1]), tokens[0], int(tokens[2])))
                issame.append(True)
            elif len(tokens) == 4:
                pairs.append((tokens[0], int(tokens[1]), tokens[2], int(tokens[3])))
                issame.append(False)
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{pairs_path}:{no}: expected 'name n1 n2' or 'name1 n1 name2 n2', got "
                f"{' '.join(tokens)!r}"
            ) from None
    count = len(pairs)
    if header is None:
        folds = np.arange(count, dtype=np.int64) * _HEADERLESS_FOLDS // max(count, 1)
    else:
        num_folds, per_class = header if len(header) == 2 else (1, header[0])
        if count != 2 * num_folds * per_class:
            raise ValueError(
                f"{pairs_path}: header '{' '.join(map(str, header))}' announces "
                f"{2 * num_folds * per_class} pairs ({num_folds} folds x 2 x {per_class}) but "
                f"the file lists {count}"
            )
        folds = np.arange(count, dtype=np.int64) // (2 * per_class)
    return pairs, np.asarray(issame, dtype=bool), folds


def read_lfw_pairs(pairs_path, image_root, *, on_missing: str = "error", ext: str = "jpg",
                   load_images: bool = True) -> LfwPairs:
    """Reads an LFW ``pairs.txt`` and its image folder (module docstring for the format).

    Returns :class:`LfwPairs` ``(images, issame, folds)``: images uint8 ``[2P, H, W, 3]`` RGB
    (all one size; pair ``i`` is rows ``2i``, ``2i + 1``) or, with ``load_images=False``, the
    ``2P`` paths; issame bool ``[P]``; folds int64 ``[P]``. A pair whose image file is missing
    raises ``FileNotFoundError`` (listing the first few) with ``on_missing='error'``; with
    ``'skip'`` such pairs are dropped, logged, and counted in ``.skipped``.
    """
    if on_missing not in ("error", "skip"):
        raise ValueError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
    pairs_path, image_root = os.fspath(pairs_path), os.fspath(image_root)
    pairs, issame, folds = _parse(pairs_path)
    ext = ext.lstrip(".")
    paths, keep, missing = [], [], {}  # dict: an ordered set of missing files
    for i, (name1, n1, name2, n2) in enumerate(pairs):
        pair = [os.path.join(image_root, name, f"{name}_{n:04d}.{ext}")
                for name, n in ((name1, n1), (name2, n2))]
        absent = [p for p in pair if not os.path.isfile(p)]
        if absent:
            missing.update(dict.fromkeys(absent))
            continue
        keep.append(i)
        paths.extend(pair)
    skipped = len(pairs) - len(keep)
    if skipped and on_missing == "error":
        shown = ", ".join(list(missing)[:5])
        raise FileNotFoundError(
            f"{pairs_path}: {skipped} of {len(pairs)} pairs refer to {len(missing)} missing "
            f"image files under {image_root} (e.g. {shown}); pass on_missing='skip' to drop them"
        )
    if skipped:
        _log.warning("%s: skipped %d of %d pairs with missing images", pairs_path, skipped,
                     len(pairs))
    keep = np.asarray(keep, dtype=np.int64)
    issame, folds = issame[keep], folds[keep]
    if not load_images:
        return LfwPairs(paths, issame, folds, skipped)
    images = stack_images((read_image_file(p) for p in paths), len(paths),
                          name=lambda i: paths[i],
                          fix="pass load_images=False to get paths for images of several sizes")
    return LfwPairs(images, issame, folds, skipped)


def write_lfw_pairs(pairs_path, pairs: Sequence[tuple], *, num_folds: int | None = 10) -> None:
    """Writes a ``pairs.txt`` (for tests and for users making their own protocol).

    ``pairs``: in file order, ``(name, n1, n2)`` for same and ``(name1, n1, name2, n2)`` for
    different pairs. With ``num_folds`` the LFW header ``num_folds per_class`` is written, which
    requires ``len(pairs) == 2 * num_folds * per_class``; ``num_folds=None`` writes no header.
    """
    lines = []
    for i, pair in enumerate(pairs):
        if len(pair) not in (3, 4):
            raise ValueError(f"pair {i} must have 3 (same) or 4 (different) fields, got {pair}")
        lines.append("\t".join(str(v) for v in pair))
    if num_folds is not None:
        if num_folds < 1 or len(lines) % (2 * num_folds):
            raise ValueError(f"{len(lines)} pairs cannot fill {num_folds} folds of 2 x N pairs")
        lines.insert(0, f"{num_folds}\t{len(pairs) // (2 * num_folds)}")
    with open(os.fspath(pairs_path), "w") as f:
        f.write("\n".join(lines) + "\n")
