"""The two-view input pipeline: grain over a tfds data source, decoded with OpenCV.

Every training example becomes two views of one face (Wang et al. 2019 §2.2, "KD_im"): the
teacher's (the original image) and the student's (the same image degraded to low resolution by
``LowResolutionAugment`` for 40% of samples by default). The horizontal flip is drawn once per
example and applied to the image *before* the views are made, so both views always share it.
So is the optional random crop (``crop_from``): Wang et al.'s knowledge-transfer paper resizes
each face and randomly crops and flips a sub-image of the network's input size.

Determinism: the order is a function of ``(seed, epoch)`` (a NumPy permutation), and each
example's flip and degradation are functions of ``(seed, epoch, record index)`` only, so they
do not depend on the batch size, the thread count, or the number of hosts. The iterator's state
(``get_state()``, a small JSON-able dict) restores the exact position, so a resumed run sees the
same batches.

Sharding: each host (``jax.process_index()`` of ``jax.process_count()``, or explicit grain
``ShardOptions``) reads a contiguous, disjoint slice of the records (``drop_remainder`` trims
every slice to the same length so hosts step in lockstep) and shuffles within it; a host yields
its ``global_batch_size / shard_count`` rows of each global batch, which
``device_put_batch`` assembles into one array sharded over the device mesh.

``batch_sampler='balanced'`` replaces the order (``kdface.data._balanced``): each global batch is
groups of K images of one identity (plus an optional uniform part), one global order computed
alike on every host, each host taking its contiguous rows of every global batch. A record's
repeats within an epoch (identities short of K images) draw their own crop and flip from
``(seed, epoch, record, copy)``; first visits keep the uniform order's keys.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cv2
import grain
from absl import flags as absl_flags
import jax
import numpy as np
import tensorflow_datasets as tfds

from kdface.data._balanced import BATCH_SAMPLERS, BalancedOrder, balanced_rows, record_labels
from kdface.data._degrade import LowResolutionAugment
from kdface.data._images import decode_image
from kdface.data._recordio import RecordIO, RecordIOExamples
from kdface.data._verification_bin import read_verification_bin_encoded

__all__ = [
    "VIEWS",
    "TwoViewPipeline",
    "device_put_batch",
    "make_training_pipeline",
    "make_verification_arrays",
    "normalize_images",
]

# What a network sees, in the recipes' vocabulary (kdface.distill RecipeSpec.student_view /
# teacher_view): the (flipped, cropped) original image, or its low-resolution degradation. A
# teacher on 'low_resolution' sees the very image the student sees.
VIEWS = ("original", "low_resolution")
# The pipeline's earlier name for "the teacher sees the student's view"; still accepted.
_LEGACY_SHARED_VIEW = "augmented"
# Landmark order (eyes, nose, mouth corners) after a horizontal flip: left and right swap.
_FLIP_LANDMARKS = np.asarray([1, 0, 2, 4, 3])
_TAG_SHUFFLE = 11
_TAG_FLIP = 12
_TAG_CROP = 13


def normalize_images(images: np.ndarray) -> np.ndarray:
    """uint8 ``[..., H, W, 3]`` -> float32 ``(x / 255 - 0.5) / 0.5`` in [-1, 1] (the insightface
    convention every paper's public code uses)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    out = np.multiply(images, np.float32(2.0 / 255.0), dtype=np.float32)
    out -= np.float32(1.0)
    return out


def _even_split(n: int, options: grain.sharding.ShardOptions) -> tuple[int, int]:
    """Contiguous ``[start, end)`` of shard ``shard_index``: the first ``n % shard_count``
    shards get one extra record unless ``drop_remainder`` (grain's rule)."""
    per, extra = divmod(n, options.shard_count)
    start = per * options.shard_index
    end = start + per
    if not options.drop_remainder:
        start += min(options.shard_index, extra)
        end += min(options.shard_index + 1, extra)
    return start, end


class _EpochOrder:
    """Record index at each stream position: the shard's records, permuted anew each epoch.

    The permutation of epoch ``e`` is ``default_rng([seed, tag, e]).permutation(length)``,
    computed once per epoch (4 bytes per record) and shared by the reading threads. grain's
    ``MapDataset.shuffle`` would avoid that memory but its index shuffle costs milliseconds per
    element on small datasets (measured here: ~9 ms at 10 records, ~0.13 ms at 1000).
    """

    def __init__(self, start: int, length: int, seed: int, shuffle: bool):
        self.start, self.length, self.seed, self.shuffle = start, length, seed, shuffle
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __call__(self, stream_index: int) -> tuple[int, int, int]:
        """``(epoch, record index, copy)`` of stream position ``stream_index`` (``copy`` is
        always 0: each record once per epoch)."""
        epoch, position = divmod(int(stream_index), self.length)
        if not self.shuffle:
            return epoch, self.start + position, 0
        with self._lock:
            order = self._cache.get(epoch)
            if order is None:
                rng = np.random.default_rng([self.seed, _TAG_SHUFFLE, epoch])
                order = rng.permutation(self.length).astype(np.int32 if self.length < 2**31
                                                            else np.int64)
                if len(self._cache) >= 2:  # threads straddle at most one epoch boundary
                    self._cache.pop(min(self._cache))
                self._cache[epoch] = order
        return epoch, self.start + int(order[position]), 0

    def __getstate__(self) -> dict:
        # grain worker processes receive the pipeline by pickling: each starts with its own
        # lock and an empty cache (the permutation is a function of (seed, epoch)).
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache, self._lock = {}, threading.Lock()


class _TwoViews:
    """Turns a stream position into one two-view example (a dict of arrays)."""

    def __init__(self, source, *, order, seed, flip, teacher_view, student_augment,
                 image_size, crop_from=None):
        self.source = source
        self.order = order
        self.seed = seed
        self.flip = flip
        self.teacher_view = teacher_view
        self.student_augment = student_augment
        self.image_size = image_size
        self.crop_from = crop_from

    def __call__(self, stream_index: int, _) -> dict[str, np.ndarray]:
        epoch, record_index, copy = self.order(stream_index)
        # A record's repeats within one epoch (the balanced order's top-ups) draw their own crop
        # and flip; the first visit keeps the key (seed, epoch, record) of the uniform order.
        repeat = [copy] if copy else []
        record = self.source[record_index]
        image = decode_image(record["image"], name=f"record {record_index}")
        landmarks = record.get("landmarks")
        height, width = image.shape[:2]
        resized = self.crop_from or self.image_size
        if (height, width) != resized:
            image = cv2.resize(image, resized[::-1], interpolation=cv2.INTER_AREA)
            if landmarks is not None:
                scale = np.asarray([resized[1] / width, resized[0] / height])
                landmarks = landmarks * scale.astype(np.float32)[None, :]
        if self.crop_from is not None:
            rng = np.random.default_rng([self.seed, _TAG_CROP, epoch, record_index] + repeat)
            top = int(rng.integers(resized[0] - self.image_size[0] + 1))
            left = int(rng.integers(resized[1] - self.image_size[1] + 1))
            image = image[top:top + self.image_size[0], left:left + self.image_size[1]].copy()
            if landmarks is not None:
                landmarks = landmarks - np.asarray([left, top], np.float32)[None, :]
        flipped = False
        if self.flip:
            rng = np.random.default_rng([self.seed, _TAG_FLIP, epoch, record_index] + repeat)
            flipped = bool(rng.random() < 0.5)
        if flipped:
            image = cv2.flip(image, 1)  # a contiguous mirrored copy, faster than [:, ::-1]
            if landmarks is not None:
                # Pixel column j maps to W - 1 - j, and left/right points swap names.
                mirrored = np.stack([self.image_size[1] - 1.0 - landmarks[:, 0],
                                     landmarks[:, 1]], axis=1)
                landmarks = mirrored[_FLIP_LANDMARKS]
        student, size = image, 0
        if self.student_augment is not None:
            student, size = self.student_augment(image, epoch=epoch, index=record_index)
        teacher = student if self.teacher_view == "low_resolution" else image
        out = {
            "teacher_image": teacher,
            "student_image": student,
            "label": np.int32(record["label"]),
            "index": np.int64(record_index),
            "flipped": np.bool_(flipped),
            "student_size": np.int32(size),
        }
        if landmarks is not None:
            out["landmarks"] = np.asarray(landmarks, np.float32)
        return out


class TwoViewPipeline:
    """An iterable of per-host batches with a checkpointable iterator position.

    Each batch is a dict: ``teacher_image`` and ``student_image`` float32 ``[B, H, W, 3]`` in
    [-1, 1] (uint8 when ``normalize=False``), ``label`` int32 ``[B]``, ``index`` int64 ``[B]``
    (record index in the source: a key for cached teacher outputs), ``flipped`` bool ``[B]``,
    ``student_size`` int32 ``[B]`` (low-resolution size, 0 if not degraded) and, where the
    dataset has them, ``landmarks`` float32 ``[B, 5, 2]`` (flipped with the image). ``B`` is
    ``global_batch_size // shard_count``.

    ``iter(pipeline)`` starts at the beginning; ``get_state()`` / ``set_state(state)`` read and
    move the position of the pipeline's current iterator (``pipeline.iterator``), and
    ``iter_from(state)`` starts a fresh one there.
    """

    def __init__(self, dataset, *, fingerprint: dict, read_options: grain.ReadOptions,
                 num_workers: int = 0):
        self._dataset = dataset
        self._fingerprint = fingerprint
        self._read_options = read_options
        self._num_workers = num_workers
        self.iterator = None

    @property
    def batches_per_epoch(self) -> int:
        """Batches in one pass over this host's shard (rounded as ``drop_remainder`` says)."""
        return self._fingerprint["batches_per_epoch"]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        dataset = self._dataset.to_iter_dataset(self._read_options)
        if self._num_workers:
            if not absl_flags.FLAGS.is_parsed():
                # grain's worker start-up reads its absl flags; a library caller (no absl app)
                # has not parsed any: use their defaults.
                absl_flags.FLAGS.mark_as_parsed()
            # Worker processes each make whole batches (grain slices the stream among them);
            # the iterator state stays a position in the one stream, so resuming is exact.
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self._num_workers))
        self.iterator = iter(dataset)
        return self.iterator

    def get_state(self) -> dict[str, Any]:
        """JSON-able state: the grain iterator position and the settings it is valid for."""
        if self.iterator is None:
            iter(self)
        return {"grain": self.iterator.get_state(), "pipeline": dict(self._fingerprint)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves the current iterator (a new one if none) to a position from ``get_state``."""
        saved = dict(state.get("pipeline", {}))
        if saved.get("teacher_view") == _LEGACY_SHARED_VIEW:    # states saved before the rename
            saved["teacher_view"] = saved.get("student_view")
        if saved != self._fingerprint:
            diff = {k: (saved.get(k), v) for k, v in self._fingerprint.items()
                    if saved.get(k) != v}
            raise ValueError(f"iterator state was saved for a different pipeline; differing "
                             f"settings (saved, now): {diff}")
        if self.iterator is None:
            iter(self)
        self.iterator.set_state(state["grain"])

    def iter_from(self, state: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
        """A fresh iterator positioned where ``state`` was taken."""
        iter(self)
        self.set_state(state)
        return self.iterator


def _default_low_resolution(seed: int):
    return LowResolutionAugment(seed=seed)


def make_training_pipeline(
        source, *, global_batch_size: int, seed: int = 0, shuffle: bool = True,
        num_epochs: int | None = None, drop_remainder: bool = True, flip: bool = True,
        teacher_view: str = "original", student_view: str = "low_resolution",
        student_augment: Callable | None = None, image_size: Sequence[int] = (112, 112),
        crop_from: Sequence[int] | None = None, normalize: bool = True,
        shard_options: grain.sharding.ShardOptions | None = None,
        num_devices: int | None = None, num_threads: int = 2,
        prefetch_buffer_size: int | None = None, num_workers: int = 0,
        batch_sampler: str = "uniform", images_per_identity: int = 4, uniform_images: int = 0,
        labels=None) -> TwoViewPipeline:
    """Builds the two-view training pipeline over a random-access ``source``.

    Args:
      source: a tfds data source (``load_training_source``) or any sequence of dicts with
        ``image`` (encoded bytes), ``label`` and optionally ``landmarks`` ``[5, 2]``.
      global_batch_size: rows of one step over all hosts; must divide by the device count
        (``num_devices``, default ``jax.device_count()``) and by the number of shards.
      seed: shuffling, flips and degradation are functions of ``(seed, epoch, record)``.
      num_epochs: ``None`` repeats forever. ``drop_remainder``: drop a last partial batch and
        trim host shards to equal length.
      teacher_view: 'original' (the flipped original; a deterministic function of the record
        and ``flipped``, so teacher outputs can be cached) or 'low_resolution' (the teacher sees
        exactly the student's degraded image, as in KD where both networks share the input;
        needs ``student_view='low_resolution'``). The older name 'augmented' ("the student's
        view") is still accepted.
      student_view: 'original' or 'low_resolution' (``student_augment``, default
        ``LowResolutionAugment(seed=seed)``: blur + downscale to {8,12,16,20,30} px and back for
        40% of samples, Wang et al. 2019 §2.2). A custom ``student_augment(image, *, epoch, index)
        -> (image, size)`` replaces it.
      image_size: ``(height, width)`` of the images the networks get.
      crop_from: ``None`` (the face is resized to ``image_size``), or ``(height, width)`` at
        least ``image_size``: the face is resized to it and a random ``image_size`` window is
        cut out (offsets uniform, a function of ``(seed, epoch, record)``; landmarks move with
        it), before the flip and the views, so both views share the crop.
      shard_options: grain ``ShardOptions``; default one shard per JAX process
        (``ShardByJaxProcess(drop_remainder=drop_remainder)``).
      num_threads, prefetch_buffer_size: grain read threads (0 = in the calling thread) and
        the number of examples read ahead.
      num_workers: grain worker processes (0 = none, batches are made in this process); each
        makes whole batches with its own ``num_threads`` read threads. They pay off when the
        per-example Python work (decode, LR view) holds the GIL; the source and the
        ``student_augment`` must pickle. ``benchmarks/INPUT_PIPELINE.md`` has the measured
        images/s against workers.
      batch_sampler: 'uniform' (the records shuffled, each once per epoch, hosts reading
        disjoint slices) or 'balanced': each global batch is ``(global_batch_size -
        uniform_images) / images_per_identity`` groups of ``images_per_identity`` images of one
        identity, then ``uniform_images`` uniformly drawn rows; one global order that hosts
        share row-wise; an epoch visits every record at least once (``kdface.data._balanced``).
        ``shuffle`` must stay on; epochs are whole batches (``drop_remainder`` is moot).
      labels: int ``[len(source)]`` identities for the balanced order; default read once from
        the source (``record_labels``: RecordIO headers, or a cached pass over a tfds source).
    """
    if not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be a positive int, got {global_batch_size!r}")
    if student_view not in VIEWS:
        raise ValueError(f"student_view must be one of {VIEWS}, got {student_view!r}")
    if teacher_view == _LEGACY_SHARED_VIEW:
        teacher_view = student_view
    if teacher_view not in VIEWS:
        raise ValueError(f"teacher_view must be one of {VIEWS}, got {teacher_view!r}")
    if teacher_view == "low_resolution" and student_view != "low_resolution":
        raise ValueError("teacher_view='low_resolution' shows the teacher the student's degraded "
                         "image; it needs student_view='low_resolution'")
    if student_augment is not None and student_view != "low_resolution":
        raise ValueError("student_augment is only used with student_view='low_resolution'")
    if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
        raise ValueError(f"num_epochs must be None or a positive int, got {num_epochs!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
    if batch_sampler not in BATCH_SAMPLERS:
        raise ValueError(f"batch_sampler must be one of {BATCH_SAMPLERS}, got {batch_sampler!r}")
    balanced = batch_sampler == "balanced"
    if balanced:
        group_rows = balanced_rows(global_batch_size, images_per_identity, uniform_images)
        if not shuffle:
            raise ValueError("batch_sampler='balanced' draws its batches at random; shuffle=False "
                             "is for the uniform sampler")
    image_size = tuple(int(v) for v in image_size)
    if len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"image_size must be (height, width), got {image_size!r}")
    if crop_from is not None:
        crop_from = tuple(int(v) for v in crop_from)
        if len(crop_from) != 2 or crop_from[0] < image_size[0] or crop_from[1] < image_size[1]:
            raise ValueError(f"crop_from must be (height, width) no smaller than image_size "
                             f"{image_size}, got {crop_from!r}")
    if num_devices is None:
        num_devices = jax.device_count()
    if global_batch_size % num_devices:
        raise ValueError(f"global_batch_size {global_batch_size} must be divisible by the "
                         f"number of devices {num_devices} (one equal slice per device)")
    if shard_options is None:
        shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=drop_remainder)
    if global_batch_size % shard_options.shard_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be divisible by the "
                         f"number of hosts/shards {shard_options.shard_count}")
    host_batch = global_batch_size // shard_options.shard_count
    if isinstance(source, RecordIO):
        source = RecordIOExamples(source)
    num_records = len(source)
    start, end = _even_split(num_records, shard_options)
    if balanced:
        if labels is not None and np.shape(labels) != (num_records,):
            raise ValueError(f"labels must have one entry per record ({num_records}), got shape "
                             f"{np.shape(labels)}")
        order = BalancedOrder(
            record_labels(source) if labels is None else labels, seed=int(seed),
            images_per_identity=images_per_identity, balanced=group_rows,
            uniform=global_batch_size - group_rows, host_rows=host_batch,
            host_index=shard_options.shard_index)
    elif end <= start:
        raise ValueError(f"shard {shard_options.shard_index} of {shard_options.shard_count} "
                         f"is empty ({num_records} records)")
    elif drop_remainder and end - start < host_batch:
        raise ValueError(f"each host has {end - start} records, fewer than one batch of "
                         f"{host_batch} (drop_remainder=True would yield nothing)")
    if student_view == "low_resolution" and student_augment is None:
        student_augment = _default_low_resolution(int(seed))
    if student_view == "original":
        student_augment = None

    if not balanced:
        order = _EpochOrder(start, end - start, int(seed), bool(shuffle))
    positions = grain.MapDataset.range(order.length).repeat(num_epochs)
    examples = positions.map_with_index(_TwoViews(
        source, order=order, seed=int(seed), flip=flip, teacher_view=teacher_view,
        student_augment=student_augment, image_size=image_size, crop_from=crop_from))
    batches = examples.batch(host_batch, drop_remainder=drop_remainder)
    if normalize:
        # Once per batch rather than per example: one float32 allocation instead of 2B.
        batches = batches.map(_normalize_views)
    per_epoch = (end - start) // host_batch if drop_remainder else -(-(end - start) // host_batch)
    if balanced:
        per_epoch = order.batches_per_epoch
    fingerprint = {
        "num_records": num_records, "shard": [shard_options.shard_index, shard_options.shard_count],
        "global_batch_size": global_batch_size, "seed": int(seed), "shuffle": bool(shuffle),
        "num_epochs": num_epochs, "drop_remainder": bool(drop_remainder), "flip": bool(flip),
        "teacher_view": teacher_view, "student_view": student_view,
        "batches_per_epoch": per_epoch,
    }
    if crop_from is not None:  # absent otherwise, so states saved before the option still load
        fingerprint["crop_from"] = list(crop_from)
    if balanced:  # likewise absent for the uniform sampler
        fingerprint.update(batch_sampler=batch_sampler, images_per_identity=images_per_identity,
                           uniform_images=global_batch_size - group_rows)
    read_options = grain.ReadOptions(
        num_threads=num_threads,
        prefetch_buffer_size=prefetch_buffer_size if prefetch_buffer_size is not None
        else max(1, 2 * num_threads))
    return TwoViewPipeline(batches, fingerprint=fingerprint, read_options=read_options,
                           num_workers=num_workers)


def _normalize_views(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    batch["teacher_image"] = normalize_images(batch["teacher_image"])
    batch["student_image"] = normalize_images(batch["student_image"])
    return batch


def device_put_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, Any]:
    """Assembles each host's rows into global ``jax.Array`` s sharded by ``sharding`` (e.g.
    ``NamedSharding(mesh, P('data'))``): leading dims add up over hosts to the global batch."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def _verification_records(source):
    """``(len, getter)`` for a ``.bin`` path, a built dataset directory or a data source."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            source = tfds.builder_from_directory(path).as_data_source(split="test")
        else:
            encoded, issame = read_verification_bin_encoded(path)
            num = len(issame)
            return num, lambda i: {"image1": encoded[2 * i], "image2": encoded[2 * i + 1],
                                   "issame": issame[i], "fold": None}
    return len(source), source.__getitem__


def make_verification_arrays(source, *, num_folds: int = 10, image_size=None):
    """Decodes a whole verification set for evaluation.

    ``source``: a verification ``.bin`` path, a built dataset directory
    (``<data_dir>/kdface_verification/<name>/<version>``) or a data source from
    ``load_verification_source``. ``image_size`` (height, width) resizes if given.

    Returns ``images1``, ``images2``: uint8 ``[P, H, W, 3]`` RGB; ``issame``: bool ``[P]``;
    ``folds``: int64 ``[P]`` (stored folds, or ``num_folds`` contiguous folds for a ``.bin``).
    Normalize with ``normalize_images`` before the network.
    """
    num, get = _verification_records(source)
    if num == 0:
        raise ValueError("verification source has no pairs")
    first, second, issame, folds = [], [], np.zeros(num, bool), np.zeros(num, np.int64)
    for i in range(num):
        rec = get(i)
        for out, key in ((first, "image1"), (second, "image2")):
            image = decode_image(rec[key], name=f"pair {i} {key}")
            if image_size is not None and image.shape[:2] != tuple(image_size):
                image = cv2.resize(image, tuple(image_size)[::-1], interpolation=cv2.INTER_AREA)
            out.append(image)
        issame[i] = bool(rec["issame"])
        folds[i] = i * num_folds // num if rec["fold"] is None else int(rec["fold"])
    try:
        return np.stack(first), np.stack(second), issame, folds
    except ValueError as err:
        raise ValueError(f"verification images differ in size; pass image_size ({err})") from err
