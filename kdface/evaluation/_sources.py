"""Where evaluation images come from: verification pairs and labelled face datasets.

Verification sets (``load_sets``): insightface ``.bin`` files, LFW ``pairs.txt`` + image folder,
or verification sets built with ``kdface.data.build_verification_dataset``; all become
``{name: (images uint8 [2P, H, W, 3] interleaved, issame bool [P])}`` in file order (the 10-fold
protocol's folds are contiguous blocks of that order).

Labelled datasets (``open_face_records``) for identification, nearest-neighbour verification and
alignment: a built training set (``kdface.data.build_training_dataset``: name in ``data_dir`` or
its directory), an insightface ``.rec`` (+ ``.idx``), a folder per identity, or an in-memory
list of records ``{'image': bytes or uint8 [H, W, 3], 'label': int, 'landmarks'?: [5, 2]}``.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def _pairs_spec(entry: str, image_root: str | None) -> tuple[str, str] | None:
    """``(pairs.txt, image_root)`` when ``entry`` names a pairs file (``pairs.txt[=ROOT]``)."""
    path, _, root = entry.partition("=")
    if not path.lower().endswith(".txt"):
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pairs file {path} not found")
    root = root or image_root or os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image root {root} of {path} not found")
    return path, root


def set_name(entry: str) -> str:
    """Report name of a ``--val_data`` entry: the file stem (``lfw.bin`` -> ``lfw``); for
    ``pairs.txt`` the name of its folder (``lfw/pairs.txt`` -> ``lfw``); a built name as is."""
    path = entry.partition("=")[0] if entry.lower().partition("=")[0].endswith(".txt") else entry
    stem = os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    if stem == "pairs" and os.path.dirname(os.path.abspath(path)):
        stem = os.path.basename(os.path.dirname(os.path.abspath(path))) or stem
    return stem


def load_sets(val_data: Sequence[str], *, data_dir: str = "data",
              pairs_image_root: str | None = None,
              pairs_ext: str = "jpg") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (images uint8 [2P, H, W, 3], issame bool [P])}`` for each ``val_data`` entry.

    An entry is a ``.bin`` path (insightface; read with the restricted unpickler), a
    ``pairs.txt`` path optionally followed by ``=IMAGE_ROOT`` (LFW layout
    ``ROOT/name/name_0001.<pairs_ext>``; ROOT defaults to ``pairs_image_root``, else the pairs
    file's folder), or the name of a verification set built in ``data_dir``. Pair ``i`` is rows
    ``2i`` (the gallery image in the LR protocol) and ``2i + 1`` (the probe). All images of one
    set must have one size (they are resized per run to the run's input size).
    """
    from kdface.data import load_verification_source, make_verification_arrays, read_lfw_pairs
    if isinstance(val_data, str):
        raise TypeError("val_data must be a sequence of entries, not one string")
    sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for entry in val_data:
        name = set_name(entry)
        if name in sets:
            raise ValueError(f"two verification sets are named {name!r}; rename a file")
        pairs = _pairs_spec(entry, pairs_image_root)
        if pairs is not None:
            images, issame, _ = read_lfw_pairs(pairs[0], pairs[1], ext=pairs_ext)
            sets[name] = (np.asarray(images), np.asarray(issame, bool))
            continue
        if os.path.exists(entry):
            source = entry
        else:
            try:
                source = load_verification_source(data_dir, entry)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"--val_data entry {entry!r} is neither a file nor a "
                                        f"verification set built in {data_dir}: {err}") from err
        first, second, issame, _ = make_verification_arrays(source)
        images = np.stack([first, second], axis=1).reshape(-1, *first.shape[1:])
        sets[name] = (images, np.asarray(issame, bool))
    return sets


class FaceRecords:
    """Random access to a labelled face dataset: ``records.read(i) -> (label, image, landmarks)``.

    ``image`` is uint8 ``[H, W, 3]`` RGB (decoded here), ``landmarks`` float32 ``[5, 2]`` in
    pixels of that image, or None. ``name`` describes the source for messages and reports.
    """

    def __init__(self, name: str, count: int, read: Callable[[int], tuple[int, np.ndarray, Any]],
                 read_encoded: Callable[[int], tuple[int, Any]] | None = None):
        self.name = name
        self._count = int(count)
        self._read = read
        self._read_encoded = read_encoded

    def __len__(self) -> int:
        return self._count

    def read(self, i: int) -> tuple[int, np.ndarray, np.ndarray | None]:
        label, image, landmarks = self._read(i)
        if landmarks is not None:
            landmarks = np.asarray(landmarks, np.float32).reshape(-1, 2)
        return int(label), image, landmarks

    def read_encoded(self, i: int) -> tuple[int, Any]:
        """``(label, image as stored)``: the encoded bytes of a ``.rec``, a built set or a
        file, or the array of an in-memory record; nothing is decoded (the held-out split's
        content keys, ``kdface.evaluation.heldout_split``)."""
        if self._read_encoded is None:
            label, image, _ = self._read(i)
            return int(label), image
        label, image = self._read_encoded(i)
        return int(label), image


def _record_reader(records, name: str, landmarks_csv: dict | None = None):
    from kdface.data import decode_image

    def read(i):
        rec = records[i]
        image = rec["image"]
        if isinstance(image, np.ndarray) and image.ndim == 3:
            image = np.asarray(image, np.uint8)
        else:
            image = decode_image(image, name=f"{name} record {i}")
        points = rec.get("landmarks")
        if points is None and landmarks_csv is not None:
            points = _csv_points(landmarks_csv, str(i), name)
        return rec["label"], image, points
    return read


def _encoded_reader(records):
    def read(i):
        rec = records[i]
        return rec["label"], rec["image"]
    return read


def _csv_points(table: dict, key: str, name: str) -> np.ndarray:
    if key not in table:
        raise ValueError(f"{name}: the landmarks CSV has no row for {key!r}")
    return table[key]


def open_face_records(spec: Any, *, data_dir: str = "data",
                      landmarks: str | None = None) -> FaceRecords:
    """Opens a labelled dataset (module docstring) as :class:`FaceRecords`.

    spec: a ``FaceRecords``; a list of record dicts; a ``.rec`` path; a folder per identity; a
    built training set's directory (holding ``dataset_info.json``) or name in ``data_dir``.
    landmarks: optional CSV (``kdface.data.read_landmarks_csv``) for ``.rec`` / folder sources,
    keyed as the training builder keys them (record index for ``.rec``, path relative to the
    root for folders); built sets carry their landmarks already.
    """
    from kdface.data import (RecordIO, load_training_source, read_identity_folders,
                             read_image_file, read_landmarks_csv)
    if isinstance(spec, FaceRecords):
        return spec
    table = read_landmarks_csv(landmarks) if landmarks else None
    if isinstance(spec, (list, tuple)):
        return FaceRecords("records", len(spec), _record_reader(spec, "records", table),
                           _encoded_reader(spec))
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"dataset must be a path, a built set name or a list of records, got "
                        f"{type(spec).__name__}")
    path = os.fspath(spec)
    if path.endswith(".rec"):
        rec = RecordIO(path, build_index=True)  # a lost .idx is rebuilt in memory

        def read_rec(i):
            label, image = rec[i]
            return label, image, None if table is None else _csv_points(table, str(i), path)
        return FaceRecords(path, len(rec), read_rec, rec.read_encoded)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "dataset_info.json")):
        import tensorflow_datasets as tfds
        source = tfds.builder_from_directory(path).as_data_source(split="train")
        return FaceRecords(path, len(source), _record_reader(source, path, table),
                           _encoded_reader(source))
    if os.path.isdir(path):
        folders = read_identity_folders(path, on_undecodable="unchecked")

        def read_folder(i):
            label, file = folders.samples[i]
            points = None
            if table is not None:
                points = _csv_points(table, os.path.relpath(file, path), path)
            return label, read_image_file(file), points

        def read_folder_file(i):
            label, file = folders.samples[i]
            with open(file, "rb") as f:
                return label, f.read()
        return FaceRecords(path, len(folders.samples), read_folder, read_folder_file)
    if os.path.exists(path):
        raise ValueError(f"{path}: expected a .rec file, a folder per identity or a built "
                         f"training set directory")
    try:
        source = load_training_source(data_dir, path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"dataset {path!r} is neither a path nor a training set built "
                                f"in {data_dir}: {err}") from err
    return FaceRecords(f"{data_dir}:{path}", len(source), _record_reader(source, path, table),
                       _encoded_reader(source))


def embed_records(embedder, records: FaceRecords, *, flip: bool = False,
                  with_landmarks: bool = False, chunk: int = 1024) -> dict[str, np.ndarray]:
    """Embeds every image of ``records`` in dataset order, ``chunk`` images decoded at a time.

    Returns ``embedding`` [N, E], ``labels`` [N] int64, and with ``with_landmarks`` also
    ``pred_landmarks`` [N, 5, 2] (network-input pixels) and ``landmarks`` [N, 5, 2]: the
    dataset's landmarks scaled to the network input exactly as the training pipeline scales them
    (x by W_in / W, y by H_in / H).
    """
    n = len(records)
    if n == 0:
        raise ValueError(f"dataset {records.name} is empty")
    emb, labels, pred, truth = [], np.zeros(n, np.int64), [], []
    h_in, w_in = embedder.input_size
    for start in range(0, n, chunk):
        images = []
        for i in range(start, min(start + chunk, n)):
            label, image, points = records.read(i)
            labels[i] = label
            images.append(image)
            if with_landmarks:
                if points is None:
                    raise ValueError(f"{records.name} record {i} has no landmarks (alignment "
                                     f"needs a dataset built with a landmarks CSV)")
                scale = np.asarray([w_in / image.shape[1], h_in / image.shape[0]], np.float32)
                truth.append(points * scale[None, :])
        if with_landmarks:
            out = embedder.outputs(images)
            pred.append(out["landmarks"])
            emb.append(embedder.embed(images, flip=True) if flip else out["embedding"])
        else:
            emb.append(embedder.embed(images, flip=flip))
    result = {"embedding": np.concatenate(emb), "labels": labels}
    if with_landmarks:
        result["pred_landmarks"] = np.concatenate(pred)
        result["landmarks"] = np.stack(truth)
    return result


def split_gallery_probe(labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(gallery [G], probes [Q])`` of a labelled set: each identity's first image in
    dataset order is its gallery image, the rest are its probes (Wang et al. 2019 §3.1 SCFace
    layout: one enrolment image per identity). Identities with one image are gallery only and
    act as extra non-mates for everyone else. Dataset order is the ``.rec`` record order, the
    sorted file names of a folder per identity, or, for a built tfds training set, the order
    tfds stored (fixed by its key hashing, not the source's order)."""
    lab = np.asarray(labels)
    if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be int [N], got {lab.dtype} {lab.shape}")
    _, first = np.unique(lab, return_index=True)
    is_gallery = np.zeros(lab.shape[0], bool)
    is_gallery[first] = True
    return np.nonzero(is_gallery)[0], np.nonzero(~is_gallery)[0]
