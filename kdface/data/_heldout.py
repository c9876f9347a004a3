"""The held-out split of a training set's images: Wang, Lan, Zhang 2017's top-1 test samples.

Wang, Lan, Zhang 2017 (arXiv:1709.02929) §5.1: "In all datasets, we randomly split them into
training and testing samples" — the proportion is not in kdface's reference text ([…]);
**kdface's choice** is :data:`HELDOUT_FRACTION` = 10 % of each identity's images.

The split is a function of each record's *content* and a seed, never of its position: a record's
key is a seeded 64-bit BLAKE2b hash of its label and its encoded image bytes, and per identity
the ``floor(fraction * d)`` smallest of its ``d`` distinct keys are held out (at most ``d - 1``:
every identity keeps a training image; identical images of one identity share a key, so they
fall on the same side). So an insightface ``.rec``, the tfds set the trainer builds from it
(stored in tfds's own hashed order) and a folder of the same image files split alike, and the
trainer and the evaluator can each compute the split from the data they read. (A record the
builder skipped as undecodable changes its identity's ``d``; the evaluator cannot decode it
either.)

:class:`TrainingView` is the other side: a source without its held-out records, what a trainer
reads to leave the test images out of training.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np

HELDOUT_FRACTION = 0.1
"""kdface's choice of Wang et al. 2017's lost train/test proportion: 10 % per identity."""

_PERSON = b"kdface-heldout"  # BLAKE2b personalization: keys of this split only


def check_fraction(fraction: Any) -> float:
    """``fraction`` as a float in (0, 1), or a ValueError saying so."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) \
            or not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"the held-out fraction must lie in (0, 1), got {fraction!r}")
    return float(fraction)


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
            or not 0 <= int(seed) < 2 ** 64:
        raise ValueError(f"the split seed must be an int in [0, 2**64), got {seed!r}")
    return int(seed)


def _image_bytes(image: Any) -> bytes:
    """Encoded image bytes as stored; a decoded array as its shape, dtype and pixels."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, np.ndarray) and image.dtype.kind in "SO" and image.ndim == 0:
        return bytes(image.item())
    array = np.ascontiguousarray(image)
    return repr((array.shape, array.dtype.str)).encode() + array.tobytes()


def record_key(label: int, image: Any, *, seed: int = 0) -> int:
    """The 64-bit split key of one record: BLAKE2b(label, image bytes) salted with ``seed``."""
    digest = hashlib.blake2b(digest_size=8, person=_PERSON,
                             salt=check_seed(seed).to_bytes(16, "little"))
    digest.update(int(label).to_bytes(8, "little", signed=True))
    digest.update(_image_bytes(image))
    return int.from_bytes(digest.digest(), "little")


def source_labels_and_keys(count: int, read: Callable[[int], tuple[int, Any]], *,
                           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(labels int64 [N], keys uint64 [N])`` of ``count`` records, ``read(i) -> (label,
    encoded image)`` (nothing is decoded)."""
    labels = np.empty(count, np.int64)
    keys = np.empty(count, np.uint64)
    for i in range(count):
        label, image = read(i)
        labels[i] = int(label)
        keys[i] = record_key(label, image, seed=seed)
    return labels, keys


@dataclasses.dataclass(frozen=True)
class HeldOutSplit:
    """The split of N records. ``test``: sorted indices of the held-out records [T]; ``train``:
    the others [N - T]; ``labels``: int64 [N]; ``fraction``, ``seed``: how it was drawn;
    ``num_classes``: the largest label + 1 (the class count a classifier trained on the whole
    set has, as the trainer counts it)."""
    test: np.ndarray
    train: np.ndarray
    labels: np.ndarray
    fraction: float
    seed: int

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    @property
    def test_identities(self) -> int:
        return int(np.unique(self.labels[self.test]).size)


def heldout_split(labels: Any, keys: Any, *, fraction: float = HELDOUT_FRACTION,
                  seed: int = 0) -> HeldOutSplit:
    """Per identity, the records whose key is among its ``floor(fraction * d)`` smallest distinct
    keys (``d``: its distinct keys; at most ``d - 1``) are the test split.

    labels: int [N]; keys: uint64 [N] (:func:`record_key`); ``seed`` is recorded only (the keys
    carry it). Identities with fewer than ``1 / fraction`` distinct images keep all of them for
    training.
    """
    fraction = check_fraction(fraction)
    labels = np.asarray(labels)
    keys = np.asarray(keys)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be int [N], got {labels.dtype} {labels.shape}")
    if keys.shape != labels.shape or keys.dtype != np.uint64:
        raise ValueError(f"keys must be uint64 [{labels.size}], got {keys.dtype} {keys.shape}")
    if labels.size == 0:
        raise ValueError("no records to split")
    if labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got {labels.min()}")
    labels = labels.astype(np.int64)
    pairs = np.stack([labels.astype(np.uint64), keys], axis=1)
    distinct, inverse = np.unique(pairs, axis=0, return_inverse=True)  # sorted by label, key
    inverse = inverse.reshape(-1)
    owner = distinct[:, 0].astype(np.int64)
    first = np.searchsorted(owner, owner, side="left")
    rank = np.arange(owner.size) - first                     # position among its identity's keys
    per_identity = np.bincount(owner)[owner]                 # d of each distinct key's identity
    quota = np.minimum(np.floor(fraction * per_identity + 1e-9).astype(np.int64),
                       per_identity - 1)
    held = rank < quota
    is_test = held[inverse]
    return HeldOutSplit(test=np.nonzero(is_test)[0], train=np.nonzero(~is_test)[0],
                        labels=labels, fraction=fraction, seed=check_seed(seed))


def _read_training_record(source) -> Callable[[int], tuple[int, Any]]:
    def read(i):
        record = source[i]
        return record["label"], record["image"]
    return read


def split_training_source(source, *, fraction: float = HELDOUT_FRACTION,
                          seed: int = 0) -> HeldOutSplit:
    """The held-out split of a trainer's source (``source[i]`` a dict with ``image`` bytes and
    ``label``: a built tfds training set, or a list of such dicts)."""
    labels, keys = source_labels_and_keys(len(source), _read_training_record(source),
                                          seed=check_seed(seed))
    return heldout_split(labels, keys, fraction=fraction, seed=seed)


class TrainingView:
    """``source`` without its held-out records: ``len()`` = the training split's size,
    ``view[i]`` = ``source[split.train[i]]``. What the trainer reads to keep the top-1 test
    images out of training; it pickles (grain workers) whenever ``source`` does.

    ``TrainingView(source, fraction=0.1, seed=0)`` computes the split from ``source``
    (:func:`split_training_source`; every record's bytes are read and hashed once);
    ``split=`` reuses one.
    """

    def __init__(self, source, *, fraction: float = HELDOUT_FRACTION, seed: int = 0,
                 split: HeldOutSplit | None = None):
        if split is None:
            split = split_training_source(source, fraction=fraction, seed=seed)
        elif split.labels.size != len(source):
            raise ValueError(f"the split covers {split.labels.size} records but the source has "
                             f"{len(source)}")
        self.source = source
        self.split = split
        self.indices = split.train

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= int(i) < n:
            raise IndexError(f"record {i} of a {n}-record training view")
        return self.source[int(self.indices[int(i)])]

    def __repr__(self) -> str:
        return (f"TrainingView({len(self)} of {self.split.labels.size} records; "
                f"{self.split.test.size} held out, fraction={self.split.fraction:g}, "
                f"seed={self.split.seed})")


def split_description(split: HeldOutSplit) -> str:
    """One line for reports: what was held out."""
    pct = 100 * split.fraction
    return (f"{split.test.size} of {split.labels.size} images held out ({pct:g} % of each "
            f"identity's distinct images, floor, seeded content hash, seed {split.seed}; "
            f"{split.test_identities} of {np.unique(split.labels).size} identities tested)")


def fraction_needed(fraction: float) -> int:
    """Distinct images an identity needs for one held-out image."""
    return math.ceil(1.0 / fraction - 1e-9)
