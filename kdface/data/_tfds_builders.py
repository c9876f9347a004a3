"""tensorflow-datasets builders for face training and verification sets, without TensorFlow.

Datasets are written as ``array_record`` with images kept **encoded** (the JPEG/PNG bytes the
user's file already holds, in a ``tfds.features.Tensor(shape=(), dtype=np.object_)``): tfds can
then build and read them with no TensorFlow installed, nothing is re-compressed, and the input
pipeline decodes with OpenCV. ``tfds.features.Image`` would decode on read with PIL and needs
TensorFlow to encode arrays, so it is not used.

Layout on disk: ``<data_dir>/kdface_training/<name>/<version>/`` and
``<data_dir>/kdface_verification/<name>/<version>/``; ``<name>`` is the builder config, one per
user dataset (``faces_emore_train_<hash>``, ``lfw``, ``cfp_fp``...). Each carries
``metadata.json`` with the build summary (images or pairs, identities, skipped records, source
path) and the source's ``fingerprint`` (:func:`source_fingerprint`): a built dataset is reused
only for the source it was built from, and a name already taken by another source is refused
(every insightface training set is called ``train.rec``, so training sets are named after
their folder plus a fingerprint prefix by default).

Features:

* training: ``image`` encoded bytes, ``label`` int64 identity, and ``landmarks`` float32
  ``[5, 2]`` (x, y pixels; left eye, right eye, nose, left and right mouth corner) when a
  landmarks CSV is given.
* verification: ``image1``, ``image2`` encoded bytes, ``issame`` bool, ``fold`` int64 (unless
  the source names them, pairs split into ``num_folds`` contiguous folds sized as scikit-learn's
  ``KFold(n_splits=num_folds, shuffle=False)``, which insightface's evaluation uses:
  :func:`kfold_fold_ids`), ``pair`` int64 (position in the source file). Verification sets keep
  the source order.
"""
from __future__ import annotations

import csv
import dataclasses
import inspect
import os
import shutil

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tqdm.auto import tqdm

from kdface.data._align import read_landmarks_csv
from kdface.data._folders import read_identity_folders
from kdface.data._images import UndecodableImageError, decode_image
from kdface.data._pairs import read_lfw_pairs
from kdface.data._recordio import RecordIO, RecordIOError
from kdface.data._sources import (
    _check_name,
    _default_name,
    _default_training_name,
    kfold_fold_ids,
    source_fingerprint,
)
from kdface.data._verification_bin import read_verification_bin_encoded

__all__ = [
    "TRAINING_BUILDER",
    "VERIFICATION_BUILDER",
    "FaceTrainingConfig",
    "FaceVerificationConfig",
    "KdfaceTraining",
    "KdfaceVerification",
    "build_training_dataset",
    "build_verification_dataset",
    "write_landmarks_csv",
    "dataset_path",
    "built_dataset_names",
    "kfold_fold_ids",
    "source_fingerprint",
    "load_training_source",
    "load_verification_source",
    "load_dataset_metadata",
]

TRAINING_BUILDER = "kdface_training"
VERIFICATION_BUILDER = "kdface_verification"
_VERSION = "1.0.0"
_RELEASE_NOTES = {"1.0.0": "Encoded images in array_record, readable without TensorFlow."}
_TRAINING_FORMATS = ("recordio", "folders")
_VERIFICATION_FORMATS = ("bin", "pairs")


@dataclasses.dataclass
class FaceTrainingConfig(tfds.core.BuilderConfig):
    """One user training set: ``source`` is a ``.rec`` path or a folder-per-identity root.

    ``landmarks``: optional CSV in ``kdface.data.read_landmarks_csv``'s format (header
    ``filename,x1,y1,...,x5,y5``); ``filename`` is the record index for RecordIO and the image
    path relative to the root for folders. ``skip_undecodable``: skip (and
    count) records whose image cannot be decoded instead of failing. ``verify_images``: decode
    every image once while building to find bad ones (costs one decode per image).
    """

    source: str = ""
    source_format: str = "recordio"
    landmarks: str | None = None
    skip_undecodable: bool = False
    verify_images: bool = True
    progress: bool = False
    fingerprint: str = ""


@dataclasses.dataclass
class FaceVerificationConfig(tfds.core.BuilderConfig):
    """One verification set: an insightface ``.bin`` or an LFW ``pairs.txt`` + image root.

    ``num_folds``: KFold-sized contiguous folds for a ``.bin`` (it stores none). ``pairs.txt``
    images are ``images_root/<name>/<name>_%04d.<image_ext>``. ``skip_missing``: skip (and
    count) pairs naming missing or undecodable images instead of failing.
    """

    source: str = ""
    source_format: str = "bin"
    images_root: str | None = None
    image_ext: str = "jpg"
    num_folds: int = 10
    skip_missing: bool = False
    verify_images: bool = True
    progress: bool = False
    fingerprint: str = ""


def _progress(iterable, total: int | None, enabled: bool, desc: str):
    if not enabled:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit=desc.rstrip("s"))


def _check_decodable(data: bytes, name: str) -> None:
    image = decode_image(data, name=name, strict=True)
    if image.ndim != 3 or image.shape[2] != 3:
        raise UndecodableImageError(f"{name}: decoded to shape {image.shape}, not [H, W, 3]")


def write_landmarks_csv(path, keys, landmarks) -> None:
    """Writes the landmarks CSV ``read_landmarks_csv`` reads (header ``filename,x1,y1,...,y5``);
    ``keys``: N record indices or relative paths; ``landmarks``: float ``[N, 5, 2]``."""
    landmarks = np.asarray(landmarks, np.float32)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (5, 2) or len(keys) != len(landmarks):
        raise ValueError(f"landmarks must be [N, 5, 2] with N keys, got {landmarks.shape} and "
                         f"{len(keys)} keys")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename"] + [f"{a}{i}" for i in range(1, 6) for a in "xy"])
        for key, points in zip(keys, landmarks):
            writer.writerow([key] + [f"{v:.3f}" for v in points.reshape(-1)])


class _LocalCodePath:
    """Points tfds at this file directly: tfds 4.9.10 resolves a packaged builder's code path
    through ``importlib_resources``, a package it only requires on Python < 3.9 (so it is
    missing here); the plain file path is what it would compute anyway."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(inspect.getfile(cls))


class KdfaceTraining(_LocalCodePath, tfds.core.GeneratorBasedBuilder):
    """Face training set (``image`` bytes, ``label``, optional ``landmarks``) from RecordIO or
    folders; one config per user dataset (see ``build_training_dataset``)."""

    VERSION = tfds.core.Version(_VERSION)
    RELEASE_NOTES = _RELEASE_NOTES
    BUILDER_CONFIGS = [FaceTrainingConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds.features.Tensor(shape=(), dtype=np.object_,
                                          doc="encoded JPEG/PNG bytes, RGB"),
            "label": tfds.features.Scalar(dtype=np.int64, doc="identity"),
        }
        if self.builder_config.landmarks:
            features["landmarks"] = tfds.features.Tensor(
                shape=(5, 2), dtype=np.float32, doc="x, y of eyes, nose, mouth corners")
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Face training set from {self.builder_config.source_format} "
                        f"{self.builder_config.source}",
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _records(self):
        """Yields ``(key, landmark_key, label, encoded or exception, where)`` from the source;
        ``where`` names the record in errors (the ``.rec`` key, or the file)."""
        cfg = self.builder_config
        if cfg.source_format == "recordio":
            with RecordIO(cfg.source, build_index=True) as rec:
                for i in _progress(range(len(rec)), len(rec), cfg.progress, "records"):
                    try:
                        label, data = rec.read_encoded(i)
                    except RecordIOError as err:
                        yield i, str(i), -1, err, ""
                        continue
                    where = f"{cfg.source} key {int(rec.keys[i])} (image {i})"
                    yield i, str(i), label, data, where
        else:
            # The folder reader decodes every image once itself ('error' or 'skip').
            folders = read_identity_folders(
                cfg.source, on_undecodable=("skip" if cfg.skip_undecodable else "error")
                if cfg.verify_images else "unchecked")
            self._folder_skipped = folders.skipped
            items = folders.samples
            for i, (label, path) in enumerate(
                    _progress(items, len(items), cfg.progress, "images")):
                key = os.path.relpath(path, cfg.source)
                with open(path, "rb") as f:
                    yield i, key, int(label), f.read(), path

    def _generate_examples(self):
        cfg = self.builder_config
        landmarks = read_landmarks_csv(cfg.landmarks) if cfg.landmarks else None
        skipped, labels = 0, set()
        self._folder_skipped = 0
        max_label = -1
        for key, landmark_key, label, data, where in self._records():
            try:
                if isinstance(data, Exception):
                    raise data
                if cfg.verify_images and cfg.source_format == "recordio":
                    _check_decodable(data, where)
            except (UndecodableImageError, ValueError):
                if not cfg.skip_undecodable:
                    raise
                skipped += 1
                continue
            example = {"image": data, "label": int(label)}
            if landmarks is not None:
                if landmark_key not in landmarks:
                    raise ValueError(f"{cfg.landmarks}: no landmarks for key {landmark_key!r}")
                example["landmarks"] = landmarks[landmark_key]
            labels.add(int(label))
            max_label = max(max_label, int(label))
            yield key, example
        self.info.metadata.update({
            "source": os.path.abspath(cfg.source), "source_format": cfg.source_format,
            "identities": len(labels), "num_classes": max_label + 1,
            "skipped": skipped + self._folder_skipped, "fingerprint": cfg.fingerprint,
        })


class KdfaceVerification(_LocalCodePath, tfds.core.GeneratorBasedBuilder):
    """Face verification pairs (``image1``, ``image2``, ``issame``, ``fold``, ``pair``) from a
    ``.bin`` or ``pairs.txt``; source order is kept (see ``build_verification_dataset``)."""

    VERSION = tfds.core.Version(_VERSION)
    RELEASE_NOTES = _RELEASE_NOTES
    BUILDER_CONFIGS = [FaceVerificationConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        encoded = dict(shape=(), dtype=np.object_, doc="encoded JPEG/PNG bytes, RGB")
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Face verification pairs from {self.builder_config.source_format} "
                        f"{self.builder_config.source}",
            features=tfds.features.FeaturesDict({
                "image1": tfds.features.Tensor(**encoded),
                "image2": tfds.features.Tensor(**encoded),
                "issame": tfds.features.Scalar(dtype=np.bool_),
                "fold": tfds.features.Scalar(dtype=np.int64),
                "pair": tfds.features.Scalar(dtype=np.int64),
            }),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # pair i stays example i; folds stay contiguous
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"test": self._generate_examples()}

    def _pairs(self):
        """``(image1 bytes, image2 bytes, issame, fold or None)`` per pair, and a skip count."""
        cfg = self.builder_config
        if cfg.source_format == "bin":
            encoded, issame = read_verification_bin_encoded(cfg.source)
            pairs = [(encoded[2 * i], encoded[2 * i + 1], bool(s), None)
                     for i, s in enumerate(issame)]
            return pairs, 0
        listing = read_lfw_pairs(cfg.source, cfg.images_root, ext=cfg.image_ext,
                                 load_images=False,
                                 on_missing="skip" if cfg.skip_missing else "error")
        paths, issame, folds = listing
        pairs = []
        for i, (same, fold) in enumerate(zip(issame, folds)):
            encoded = []
            for path in paths[2 * i: 2 * i + 2]:
                with open(path, "rb") as f:
                    encoded.append(f.read())
            pairs.append((encoded[0], encoded[1], bool(same), int(fold)))
        return pairs, listing.skipped

    def _generate_examples(self):
        cfg = self.builder_config
        pairs, skipped = self._pairs()
        num_pairs = len(pairs)
        if num_pairs == 0:
            raise ValueError(f"{cfg.source}: no verification pairs")
        kept = []
        default_folds = kfold_fold_ids(num_pairs, cfg.num_folds)
        for i, (a, b, same, fold) in enumerate(
                _progress(pairs, num_pairs, cfg.progress, "pairs")):
            if fold is None:
                fold = default_folds[i]
            try:
                if cfg.verify_images:
                    _check_decodable(a, f"{cfg.source} pair {i} image 1")
                    _check_decodable(b, f"{cfg.source} pair {i} image 2")
            except UndecodableImageError:
                if not cfg.skip_missing:
                    raise
                skipped += 1
                continue
            kept.append((same, fold))
            yield i, {"image1": a, "image2": b, "issame": bool(same), "fold": int(fold),
                      "pair": i}
        self.info.metadata.update({
            "source": os.path.abspath(cfg.source), "source_format": cfg.source_format,
            "pairs": len(kept), "same": int(sum(same for same, _ in kept)),
            "skipped": int(skipped), "num_folds": len({fold for _, fold in kept}),
            "fingerprint": cfg.fingerprint,
        })


def dataset_path(data_dir, builder: str, name: str) -> str:
    """``<data_dir>/<builder>/<name>/<version>``: where a built dataset lives."""
    if builder not in (TRAINING_BUILDER, VERIFICATION_BUILDER):
        raise ValueError(f"builder must be {TRAINING_BUILDER!r} or {VERIFICATION_BUILDER!r}, "
                         f"got {builder!r}")
    return os.path.join(os.fspath(data_dir), builder, name, _VERSION)


def _check_same_source(builder: str, config, data_dir) -> None:
    """Refuses to hand out a dataset built under ``config.name`` from a different source."""
    path = dataset_path(data_dir, builder, config.name)
    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
        return
    built = load_dataset_metadata(data_dir, builder, config.name)
    old_source = built.get("source", "?")
    if built.get("fingerprint"):
        same = built["fingerprint"] == config.fingerprint
    else:  # built before sources were fingerprinted: the path is all there is to compare
        same = old_source == os.path.abspath(config.source)
    if same:
        return
    new_source = os.path.abspath(config.source)
    if old_source == new_source:
        cause = (f"dataset {config.name!r} in {path} was built from {old_source} when it held "
                 "other content (or with another landmarks CSV)")
    else:
        cause = (f"dataset {config.name!r} in {path} was built from {old_source}, whose "
                 f"content differs from {new_source}")
    raise ValueError(f"{cause}; choose another name (--name), rebuild it from the new source "
                     "(--overwrite), or use another --data-dir")


def _prepare(builder_cls, config, data_dir: str, overwrite: bool) -> dict:
    path = dataset_path(data_dir, builder_cls.name, config.name)
    if overwrite and os.path.isdir(path):
        shutil.rmtree(path)
    _check_same_source(builder_cls.name, config, data_dir)
    builder = builder_cls(config=config, data_dir=os.fspath(data_dir),
                          file_format="array_record")
    builder.download_and_prepare(
        download_dir=os.path.join(os.fspath(data_dir), "downloads"))
    return load_dataset_metadata(data_dir, builder_cls.name, config.name)


def build_training_dataset(source, data_dir, *, name: str | None = None,
                           source_format: str = "auto", landmarks=None,
                           skip_undecodable: bool = False, verify_images: bool = True,
                           overwrite: bool = False, progress: bool = False) -> dict:
    """Builds ``<data_dir>/kdface_training/<name>`` from a ``.rec`` (+ ``.idx``) or folders.

    ``source_format``: 'recordio', 'folders' or 'auto' (a directory means folders). ``name``
    defaults to the source's folder (and file) name plus the first 8 hex digits of its
    :func:`source_fingerprint`, e.g. ``faces_emore_train_1f0c2a9b``. An already built dataset
    is reused when it was built from the same content (unless ``overwrite``); a name taken by a
    dataset built from other content is refused (``ValueError`` naming both sources). A
    ``.rec`` without ``.idx`` is indexed in memory. Images are decoded once to find bad ones
    (``verify_images``): undecodable or damaged (see ``decode_image(strict=True)``) images
    raise ``UndecodableImageError``, or are skipped and counted with ``skip_undecodable``.
    Returns the build summary: ``name``, ``images``, ``identities``, ``num_classes``,
    ``skipped``, ``source``, ``fingerprint``, ``path``.
    """
    source = os.fspath(source)
    if source_format == "auto":
        source_format = "folders" if os.path.isdir(source) else "recordio"
    if source_format not in _TRAINING_FORMATS:
        raise ValueError(f"source_format must be one of {_TRAINING_FORMATS} or 'auto', "
                         f"got {source_format!r}")
    if not os.path.exists(source):
        raise FileNotFoundError(f"training source not found: {source}")
    if landmarks is not None and not os.path.isfile(landmarks):
        raise FileNotFoundError(f"landmarks CSV not found: {landmarks}")
    fingerprint = source_fingerprint(source, source_format, landmarks=landmarks)
    config = FaceTrainingConfig(
        name=_check_name(name or _default_training_name(source, fingerprint)), source=source,
        source_format=source_format, landmarks=None if landmarks is None else os.fspath(landmarks),
        skip_undecodable=skip_undecodable, verify_images=verify_images, progress=progress,
        fingerprint=fingerprint)
    return _prepare(KdfaceTraining, config, data_dir, overwrite)


def build_verification_dataset(source, data_dir, *, name: str | None = None,
                               source_format: str = "auto", images_root=None,
                               image_ext: str = "jpg", num_folds: int = 10,
                               skip_missing: bool = False, verify_images: bool = True,
                               overwrite: bool = False, progress: bool = False) -> dict:
    """Builds ``<data_dir>/kdface_verification/<name>`` from a ``.bin`` or a ``pairs.txt``.

    ``source_format``: 'bin', 'pairs' or 'auto' (by extension, ``.txt`` means pairs, which
    need ``images_root``). ``name`` defaults to the file name (``lfw`` for ``lfw.bin``); as for
    training sets, a dataset is reused only for the content it was built from and a name taken
    by other content is refused. ``.bin`` pairs get ``num_folds`` contiguous folds sized as
    sklearn's ``KFold`` (:func:`kfold_fold_ids`, what insightface's evaluation uses). Damaged
    or undecodable images are refused, or skipped and counted with ``skip_missing``. Returns
    the build summary: ``pairs``, ``same``, ``skipped``, ``num_folds``, ``source``,
    ``fingerprint``, ``path``.
    """
    source = os.fspath(source)
    if source_format == "auto":
        source_format = "pairs" if source.endswith(".txt") else "bin"
    if source_format not in _VERIFICATION_FORMATS:
        raise ValueError(f"source_format must be one of {_VERIFICATION_FORMATS} or 'auto', "
                         f"got {source_format!r}")
    if not os.path.isfile(source):
        raise FileNotFoundError(f"verification source not found: {source}")
    if source_format == "pairs" and images_root is None:
        raise ValueError("pairs.txt sources need images_root (the folder of identity folders)")
    if not isinstance(num_folds, int) or num_folds < 2:
        raise ValueError(f"num_folds must be an int >= 2, got {num_folds!r}")
    config = FaceVerificationConfig(
        name=_check_name(name or _default_name(source)), source=source,
        source_format=source_format,
        images_root=None if images_root is None else os.fspath(images_root), image_ext=image_ext,
        num_folds=num_folds, skip_missing=skip_missing, verify_images=verify_images,
        progress=progress,
        fingerprint=source_fingerprint(source, source_format, images_root=images_root))
    return _prepare(KdfaceVerification, config, data_dir, overwrite)


def built_dataset_names(data_dir, builder: str) -> list[str]:
    """Names of the datasets built under ``<data_dir>/<builder>`` (sorted)."""
    root = os.path.dirname(os.path.dirname(dataset_path(data_dir, builder, "x")))
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root)
                  if os.path.isfile(os.path.join(root, n, _VERSION, "dataset_info.json")))


def _read_only_builder(data_dir, builder: str, name: str):
    path = dataset_path(data_dir, builder, name)
    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
        raise FileNotFoundError(_missing_dataset_message(data_dir, builder, name))
    return tfds.builder_from_directory(path)


def _missing_dataset_message(data_dir, builder: str, name: str) -> str:
    """One line: what is missing, what is built under ``data_dir``, the command that builds it."""
    training = builder == TRAINING_BUILDER
    kind = "training" if training else "verification"
    root = os.path.join(os.fspath(data_dir), builder)
    built = built_dataset_names(data_dir, builder)
    listing = f"built there: {', '.join(built)}" if built else "none is built there"
    command = "recordio PATH.rec" if training else "verification-bin PATH.bin"
    if os.sep in name or (os.altsep and os.altsep in name) or name.endswith(
            (".bin", ".rec", ".idx", ".txt")):
        cause = (f"file {name} not found, and no {kind} dataset of that name is built under "
                 f"{root}")
        fix = (f"pass the path of an existing file, or the name of a built dataset "
               f"(`python -m data_prep.build {command} --data-dir {data_dir}` builds one)")
    else:
        cause = f"no {kind} dataset named {name!r} under {root}"
        fix = (f"pass one of those names or a {'.rec or folder' if training else '.bin'} path, "
               f"or build it with `python -m data_prep.build {command} --data-dir {data_dir}`")
    return f"{cause} ({listing}); {fix}"


def load_dataset_metadata(data_dir, builder: str, name: str) -> dict:
    """The build summary of a built dataset (``metadata.json``) plus ``path``, ``features``
    and ``num_examples``."""
    ro = _read_only_builder(data_dir, builder, name)
    summary = dict(ro.info.metadata or {})
    split = "train" if builder == TRAINING_BUILDER else "test"
    count = ro.info.splits[split].num_examples
    summary.update(path=dataset_path(data_dir, builder, name), name=name,
                   features=sorted(ro.info.features.keys()), num_examples=int(count))
    summary["images" if builder == TRAINING_BUILDER else "pairs"] = int(count)
    return summary


def load_training_source(data_dir, name: str):
    """Random-access tfds data source (``ArrayRecordDataSource``) of a built training set:
    ``len()`` examples, ``source[i]`` a dict of ``image`` bytes, ``label`` and maybe
    ``landmarks``. No TensorFlow is imported."""
    return _read_only_builder(data_dir, TRAINING_BUILDER, name).as_data_source(split="train")


def load_verification_source(data_dir, name: str):
    """Random-access tfds data source of a built verification set, in source pair order."""
    return _read_only_builder(data_dir, VERIFICATION_BUILDER, name).as_data_source(split="test")
