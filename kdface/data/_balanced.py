"""Identity-balanced batch order: P identities x K images per batch, plus an optional uniform part.

A metric loss with in-batch mining (the FaceNet triplet loss with batch-hard mining: Schroff et
al., "FaceNet: A Unified Embedding for Face Recognition and Clustering", CVPR 2015,
https://arxiv.org/abs/1503.03832; Hermans et al., "In Defense of the Triplet Loss for Person
Re-Identification", 2017, https://arxiv.org/abs/1703.07737) needs positives in the batch: on a
uniformly shuffled batch of 128 from CASIA-WebFace (~47 images per identity) about 1 % of the
anchors have one. The balanced order builds each global batch from groups of K images of one
identity (K = 4: Hermans et al.'s P x K batches, and TFace's EKD ``BalancedBatchSampler``), so every
anchor of the balanced part has at least K - 1 positives. ``uniform_rows`` more rows per batch can
come from a uniform shuffle (EKD mixes 32 random and 32 balanced images).

**Epoch.** Epoch ``e`` draws, from ``default_rng([seed, tag, e])``:

1. each identity's images in a random order, cut into ``ceil(n_i / K)`` groups of K. The last
   group of an identity with ``n_i % K != 0`` is topped up by going round that identity's
   images again (an identity with 1 image gives ``[a, a, a, a]``, one with 5 gives
   ``[a b c d] [e a b c]``): every image is in the epoch at least once, and an image's repeats
   are its ``copy`` 1, 2, ...;
2. the order of the groups: identity ``i``'s ``g_i`` groups get the keys
   ``((j + phi_i + u_ij / 2) / g_i) mod 1`` (``phi_i``, ``u_ij`` uniform), sorted. Each group's
   place is uniform over the epoch, and one identity's groups are spread at least
   ``1 / (2 g_i)`` of the epoch apart, so two of them rarely share a batch (they may: that
   only adds positives; in an MS1M-sized epoch, 4.5 M images of 85 k identities in batches of
   128 x 4, none did);
3. batches of ``P = balanced_rows / K`` groups in that order, ``ceil(G / P)`` batches per epoch
   (``G`` groups in all); a last batch short of groups is filled with the epoch's first groups
   again (their images' repeats, ``copy`` + K).

So an epoch visits every image at least once and has about ``N + C (K - 1) / 2`` balanced rows
(``C`` identities), a little more than a pass of the uniform order (the trainer's ``--epochs``
still counts ``N / batch_size`` steps per epoch).

The uniform part is a stream of permutations of all records, ``uniform_rows`` per batch
(permutation ``q`` from ``default_rng([seed, tag2, q])``), running on across epochs.

**Hosts.** The order is one global order, the same on every host (a function of the labels and the
seed); host ``h`` of ``H`` takes rows ``[h B / H, (h + 1) B / H)`` of each global batch ``B``, so
the hosts' shares concatenate to the batch one process would make, whatever the host count.
Each global batch is laid out as its ``balanced_rows`` group rows, then its ``uniform_rows``,
so a contiguous slice of ``m K`` rows (a relation group of the trainer's
``--relation_group_size``, a device's rows when K divides them) holds whole identity groups.

**Labels.** The order needs every record's identity before the first batch. ``record_labels``
reads them once: a ``RecordIO`` from its headers only (no image is read), a built tfds dataset
through its records once (array_record rows hold the image and the label together, so one pass
reads the images' bytes too) and then from a ``labels-<split>.npy`` next to the dataset,
memory-mapped, so later runs pay nothing.
"""
from __future__ import annotations

import os
import socket
import threading

import numpy as np

__all__ = ["BATCH_SAMPLERS", "balanced_rows", "record_labels"]

BATCH_SAMPLERS = ("uniform", "balanced")
_TAG_GROUPS = 14
_TAG_UNIFORM_PART = 15
_LABEL_CHUNK = 4096  # records deserialized per read while collecting a tfds source's labels


def _index_dtype(n: int):
    return np.int32 if n < 2**31 else np.int64


def _tfds_labels(source) -> np.ndarray:
    """Labels of a tfds data source, cached as ``labels-<split>.npy`` in its dataset directory."""
    info = source.dataset_info
    split = str(getattr(source, "split", "train"))
    path = os.path.join(os.fspath(info.data_dir), f"labels-{split}.npy")
    n = len(source)
    if os.path.isfile(path):
        cached = np.load(path, mmap_mode="r")
        if cached.shape == (n,):
            return cached
    print(f"kdface.data: reading the labels of {n} records once (kept in {path})", flush=True)
    labels = np.empty(n, np.int64)
    for start in range(0, n, _LABEL_CHUNK):
        rows = source.__getitems__(list(range(start, min(n, start + _LABEL_CHUNK))))
        labels[start:start + len(rows)] = [int(r["label"]) for r in rows]
    try:  # a read-only dataset directory: keep the labels in memory only
        # Every host of a job may write it at once (same content): a name per writer, an
        # atomic rename.
        tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, labels)
        os.replace(tmp, path)
    except OSError:
        pass
    return labels


def record_labels(source) -> np.ndarray:
    """int ``[N]``: the identity of every record of a pipeline ``source``, read once.

    A source with a ``labels`` array (``kdface.data.RecordIO``: headers only) gives it; a tfds
    data source (``load_training_source``) is read once and its labels cached beside the dataset
    (module docstring); any other sequence of dicts is read record by record.
    """
    labels = getattr(source, "labels", None)
    if labels is None and hasattr(source, "dataset_info"):
        labels = _tfds_labels(source)
    if labels is None:
        labels = [int(source[i]["label"]) for i in range(len(source))]
    labels = np.asarray(labels)
    if labels.shape != (len(source),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"source labels must be ints [{len(source)}], got {labels.dtype} "
                         f"{labels.shape}")
    if len(labels) and labels.min() < 0:
        raise ValueError(f"source labels must be >= 0, got {int(labels.min())}")
    return labels


def balanced_rows(batch_size: int, images_per_identity: int, uniform_images: int) -> int:
    """Rows of the balanced part, ``batch_size - uniform_images``, checked to be a positive
    multiple of ``images_per_identity`` (K >= 2); one-line ``ValueError`` otherwise."""
    k, u = images_per_identity, uniform_images
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"images_per_identity must be an int >= 2 with balanced batches (an "
                         f"anchor needs a positive), got {k!r}")
    if isinstance(u, bool) or not isinstance(u, (int, np.integer)) or not 0 <= u < batch_size:
        raise ValueError(f"uniform_images must be an int in [0, batch_size {batch_size}), "
                         f"got {u!r}")
    rows = batch_size - u
    if rows % k:
        raise ValueError(f"the balanced part batch_size - uniform_images = {batch_size} - {u} = "
                         f"{rows} must be a multiple of images_per_identity {k}")
    return rows


class BalancedOrder:
    """Stream position of one host -> ``(epoch, record index, copy)`` (module docstring).

    ``labels``: int ``[N]`` identities; ``balanced``/``uniform``: rows of each global batch in
    the two parts; ``host_rows``/``host_index``: this host's share and which one. Epoch orders
    are computed on first use (O(N log N), about ``12 N`` bytes) and the last two kept, shared by
    the reading threads; grain workers rebuild them (they pickle without the cache).
    """

    def __init__(self, labels, *, seed: int, images_per_identity: int, balanced: int,
                 uniform: int, host_rows: int, host_index: int):
        labels = np.asarray(labels)
        n = len(labels)
        self.seed, self.k = int(seed), int(images_per_identity)
        self.balanced, self.uniform = int(balanced), int(uniform)
        self.host_rows, self.host_index = int(host_rows), int(host_index)
        self.num_records = n
        # Records grouped by identity, once: the per-epoch work is then one float sort.
        self._by_label = np.argsort(labels, kind="stable").astype(_index_dtype(n))
        _, self._counts = np.unique(labels, return_counts=True)
        self.num_identities = len(self._counts)
        self._starts = np.concatenate([[0], np.cumsum(self._counts)[:-1]])
        self._groups = -(-self._counts // self.k)  # ceil(n_i / K)
        self.num_groups = int(self._groups.sum())
        per_batch = self.balanced // self.k
        if self.num_identities < per_batch:
            raise ValueError(f"balanced batches of {per_batch} identities x {self.k} images need "
                             f"at least {per_batch} identities; the source has "
                             f"{self.num_identities}")
        self.batches_per_epoch = -(-self.num_groups // per_batch)
        self._cache: dict[tuple[str, int], tuple[np.ndarray, ...]] = {}
        self._lock = threading.Lock()

    @property
    def length(self) -> int:
        """Positions of this host's stream in one epoch."""
        return self.batches_per_epoch * self.host_rows

    def _cached(self, kind: str, epoch: int, make):
        key = (kind, epoch)
        with self._lock:
            value = self._cache.get(key)
            if value is None:
                value = make(epoch)
                mine = sorted(k for k in self._cache if k[0] == kind)
                if len(mine) >= 2:  # threads straddle at most one epoch boundary
                    self._cache.pop(mine[0])
                self._cache[key] = value
        return value

    def epoch_slots(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(record, copy)``, each ``[batches_per_epoch * balanced]``: epoch ``epoch``'s groups
        in batch order."""
        rng = np.random.default_rng([self.seed, _TAG_GROUPS, int(epoch)])
        n, k = self.num_records, self.k
        identity_of_sorted = np.repeat(np.arange(self.num_identities), self._counts)
        # Shuffle within each identity: sort by identity + a uniform key in [0, 1).
        within = np.argsort(identity_of_sorted + rng.random(n), kind="stable")
        shuffled = self._by_label[within]
        slots_per_identity = self._groups * k
        identity = np.repeat(np.arange(self.num_identities), slots_per_identity)
        first_slot = np.concatenate([[0], np.cumsum(slots_per_identity)[:-1]])
        j = np.arange(len(identity)) - first_slot[identity]
        count = self._counts[identity]
        records = shuffled[self._starts[identity] + j % count]
        copies = (j // count).astype(np.int32)
        # Group order: identity i's g_i groups evenly spread with a random phase (docstring).
        group_identity = np.repeat(np.arange(self.num_identities), self._groups)
        first_group = np.concatenate([[0], np.cumsum(self._groups)[:-1]])
        jg = np.arange(self.num_groups) - first_group[group_identity]
        phase = rng.random(self.num_identities)[group_identity]
        keys = np.mod((jg + phase + 0.5 * rng.random(self.num_groups))
                      / self._groups[group_identity], 1.0)
        group_order = np.argsort(keys, kind="stable")
        short = self.batches_per_epoch * (self.balanced // k) - self.num_groups
        # Repeats of a record inside its identity's groups have copy <= K - 1, so + K keeps the
        # refill's copies distinct.
        bump = np.concatenate([np.zeros(self.num_groups, np.int32), np.full(short, k, np.int32)])
        group_order = np.concatenate([group_order, group_order[:short]])
        slots = (group_order[:, None] * k + np.arange(k)[None, :]).reshape(-1)
        return (records[slots].astype(_index_dtype(n)),
                copies[slots] + np.repeat(bump, k))

    def _uniform_permutation(self, q: int) -> tuple[np.ndarray]:
        rng = np.random.default_rng([self.seed, _TAG_UNIFORM_PART, int(q)])
        return (rng.permutation(self.num_records).astype(_index_dtype(self.num_records)),)

    def global_row(self, epoch: int, batch: int, row: int) -> tuple[int, int]:
        """``(record, copy)`` at ``row`` of global batch ``batch`` of ``epoch``."""
        if row < self.balanced:
            records, copies = self._cached("groups", epoch, self.epoch_slots)
            slot = batch * self.balanced + row
            return int(records[slot]), int(copies[slot])
        q = (epoch * self.batches_per_epoch + batch) * self.uniform + row - self.balanced
        permutation, position = divmod(q, self.num_records)
        (order,) = self._cached("uniform", permutation, self._uniform_permutation)
        return int(order[position]), 0

    def __call__(self, stream_index: int) -> tuple[int, int, int]:
        """``(epoch, record index, copy)`` of this host's stream position ``stream_index``."""
        epoch, position = divmod(int(stream_index), self.length)
        batch, row = divmod(position, self.host_rows)
        record, copy = self.global_row(epoch, batch, self.host_index * self.host_rows + row)
        return epoch, record, copy

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache, self._lock = {}, threading.Lock()
