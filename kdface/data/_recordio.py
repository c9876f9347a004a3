"""MXNet RecordIO datasets: random-access reader and writer for insightface ``.rec``/``.idx``.

The byte format (record parts, split records, IRHeader, ``.idx`` lines) is described and
implemented in ``_recordio_format.py``. Two layouts exist:

* **flat** (newer writers): images at keys ``0..N-1``.
* **legacy insightface** (faces_emore, faces_webface_112x112, ...): key 0 is a header record with
  ``flag = 2``, labels ``[first_identity_key, end_key]`` and no image; images are at keys
  ``1..first_identity_key - 1``; identity record ``first_identity_key + c`` (for
  ``c < end_key - first_identity_key``) has ``flag = 2``, labels ``[a, b]`` (the image keys
  ``a..b-1`` of identity ``c``, which must be contiguous) and no image. A key-0 record is taken as
  the legacy header only when it has ``flag >= 2`` *and* no image bytes, so a flat file whose
  first image carries array labels is not mistaken for one. insightface's ``RecBuilder`` and
  ``face2rec2.py`` write the header record *after* the images; that only matters without the
  ``.idx`` (see ``build_recordio_index``).
"""
from __future__ import annotations

import collections.abc
import os

import numpy as np

from kdface.data._images import decode_image, encode_image
from kdface.data._recordio_format import (  # noqa: F401 - re-exported
    _FLOAT32_EXACT,
    _IR,
    _LENGTH_BITS,
    _LENGTH_MASK,
    _PART_HEAD,
    RECORDIO_MAGIC,
    IRHeader,
    RecordIOError,
    default_idx_path,
    _frame,
    _identity,
    _read_index,
    _read_parts,
    _write_index,
    build_recordio_index,
    pack_irheader,
    unpack_irheader,
)

__all__ = [
    "RECORDIO_MAGIC",
    "IRHeader",
    "RecordIO",
    "RecordIOError",
    "RecordIOExamples",
    "build_recordio_index",
    "pack_irheader",
    "unpack_irheader",
    "write_recordio",
]


class RecordIO(collections.abc.Sequence):
    """Random-access reader of an insightface/MXNet ``.rec`` through its ``.idx``.

    ``dataset[i]`` is ``(label, image)``: ``label`` the int identity (first label when the record
    has array labels), ``image`` uint8 ``[H, W, 3]`` RGB. ``idx_path`` defaults to the ``.rec``
    path with ``.idx``; without one, pass ``build_index=True`` to scan the ``.rec`` (in memory,
    nothing written) or write one with :func:`build_recordio_index`. Both the flat and the legacy
    insightface layout are read (module docstring). Reads use ``os.pread`` on one file
    descriptor, so threads and forked workers can share a reader; pickling drops the descriptor
    and unpickling reopens the file. ``labels`` reads every header once (a few µs per record).
    """

    def __init__(self, rec_path, idx_path=None, *, build_index: bool = False):
        self.rec_path = os.fspath(rec_path)
        self.idx_path = default_idx_path(self.rec_path) if idx_path is None else os.fspath(idx_path)
        if not os.path.isfile(self.rec_path):
            raise FileNotFoundError(f"RecordIO file not found: {self.rec_path}")
        self._fd = None
        self._size = os.path.getsize(self.rec_path)
        if os.path.isfile(self.idx_path):
            self._offsets = _read_index(self.idx_path)
        elif build_index:
            self._offsets = build_recordio_index(self.rec_path, write=False)
        else:
            raise FileNotFoundError(
                f"RecordIO index not found: {self.idx_path}. Pass idx_path=..., or "
                f"RecordIO({self.rec_path!r}, build_index=True) to scan the .rec, or write one "
                "with kdface.data.build_recordio_index(rec_path)."
            )
        self._labels = None
        self._identity_ranges = None
        self._file()  # opened here, not lazily, so threads never race to open it
        self._detect_layout()

    def _detect_layout(self) -> None:
        self.layout = "flat"
        self._identity_keys = np.zeros((0,), np.int64)
        if 0 in self._offsets:
            header, rest = self.read_key(0)
            if header.flag >= 2 and not rest:
                first, end = (float(v) for v in header.label[:2])
                if not (first.is_integer() and end.is_integer() and 1 <= first <= end):
                    raise RecordIOError(
                        f"{self.rec_path}: legacy header record 0 holds [{first}, {end}], "
                        "expected integers 1 <= first_identity_key <= end"
                    )
                self.layout = "legacy"
                keys = np.arange(1, int(first), dtype=np.int64)
                self._identity_keys = np.arange(int(first), int(end), dtype=np.int64)
                ends = keys[[0, -1]] if len(keys) else keys
                missing = [int(k) for k in ends if int(k) not in self._offsets]
                if missing:
                    raise RecordIOError(
                        f"{self.rec_path}: legacy header says images are at keys 1..{int(first)-1}"
                        f" but key {missing[0]} is not in {self.idx_path}"
                    )
                self.keys = keys
                return
        self.keys = np.fromiter(self._offsets.keys(), dtype=np.int64, count=len(self._offsets))

    # -- raw access -------------------------------------------------------------------------

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return self._fd

    def read_raw(self, key: int) -> bytes:
        """The reassembled payload (IRHeader + labels + image bytes) of the record ``key``."""
        try:
            offset = self._offsets[int(key)]
        except KeyError:
            raise KeyError(f"key {key} is not in {self.idx_path}") from None
        if offset >= self._size:
            raise RecordIOError(
                f"{self.rec_path} is truncated: key {key} starts at byte offset {offset} but the "
                f"file has {self._size} bytes"
            )
        return _read_parts(self._file(), offset, self.rec_path, self._size)[0]

    def read_key(self, key: int) -> tuple[IRHeader, bytes]:
        """``(IRHeader, bytes after the labels)`` of the record with the given ``.idx`` key."""
        return unpack_irheader(self.read_raw(key), name=f"{self.rec_path} key {key}")

    def _header_only(self, key: int) -> IRHeader:
        """Reads just enough bytes for the header (falls back to a full read if split)."""
        offset = self._offsets[int(key)]
        head = os.pread(self._file(), 8 + _IR.size + 64, offset)
        if len(head) >= 8 + _IR.size:
            magic, lrec = _PART_HEAD.unpack_from(head, 0)
            length = lrec & _LENGTH_MASK
            if magic == RECORDIO_MAGIC and lrec >> _LENGTH_BITS == 0 and length >= _IR.size:
                flag = _IR.unpack_from(head, 8)[0]
                if 8 + _IR.size + 4 * flag <= len(head) and _IR.size + 4 * flag <= length:
                    return unpack_irheader(head[8:8 + _IR.size + 4 * flag])[0]
        return self.read_key(key)[0]

    # -- sequence protocol ------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.keys)

    def _key(self, index) -> int:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"RecordIO indices must be integers, got {type(index).__name__}")
        n = len(self.keys)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        return int(self.keys[index])

    def read_encoded(self, index: int) -> tuple[int, bytes]:
        """``(label, encoded image bytes)`` of image ``index`` without decoding."""
        key = self._key(index)
        name = f"{self.rec_path} key {key}"
        header, image = unpack_irheader(self.read_raw(key), name=name)
        if not image:
            raise RecordIOError(f"{name}: the record holds no image bytes")
        return _identity(header, name), image

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        label, data = self.read_encoded(index)
        name = f"{self.rec_path} key {self._key(index)}"
        return label, decode_image(data, name=name)

    # -- metadata ---------------------------------------------------------------------------

    @property
    def labels(self) -> np.ndarray:
        """int64 ``[N]`` identity of every image, read from the headers only (cached)."""
        if self._labels is None:
            name = self.rec_path
            self._labels = np.array(
                [_identity(self._header_only(k), f"{name} key {k}") for k in self.keys],
                dtype=np.int64,
            )
        return self._labels

    @property
    def num_classes(self) -> int:
        """``max(labels) + 1`` (labels index a classifier), 0 for an empty file."""
        return int(self.labels.max()) + 1 if len(self) else 0

    @property
    def identity_ranges(self) -> np.ndarray | None:
        """Legacy layout: int64 ``[C, 2]`` image-key range ``[a, b)`` per identity record."""
        if self.layout != "legacy":
            return None
        if self._identity_ranges is None:
            rows = []
            for key in self._identity_keys:
                header = self._header_only(int(key))
                if header.flag < 2:
                    raise RecordIOError(
                        f"{self.rec_path} key {key}: identity record needs flag >= 2 "
                        f"([first_key, end_key]), got flag {header.flag}"
                    )
                rows.append([int(header.label[0]), int(header.label[1])])
            self._identity_ranges = np.array(rows, dtype=np.int64).reshape(-1, 2)
        return self._identity_ranges

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down `os`
            pass

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fd"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._file()

    def __repr__(self) -> str:
        return f"RecordIO({self.rec_path!r}, layout={self.layout!r}, images={len(self)})"


class RecordIOExamples(collections.abc.Sequence):
    """A ``RecordIO`` as a training-pipeline source: ``examples[i]`` is ``{'image': encoded
    bytes, 'label': int64}`` (decoded later, in the pipeline) and ``labels`` the headers' labels
    (no image read), which the balanced batch order needs before the first batch."""

    def __init__(self, records: RecordIO):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        label, data = self.records.read_encoded(index)
        return {"image": data, "label": np.int64(label)}

    @property
    def labels(self) -> np.ndarray:
        return self.records.labels


def write_recordio(rec_path, samples, *, idx_path=None, layout: str = "flat",
                   quality: int = 95, image_format: str = "jpg") -> int:
    """Writes ``samples`` as an MXNet ``.rec`` + ``.idx`` pair; returns the number of images.

    ``samples``: iterable of ``(label, image)`` where ``label`` is an int (stored with flag 0)
    or a 1-D sequence of numbers (array label, identity first), and ``image`` is uint8
    ``[H, W, 3]`` RGB (encoded here as ``image_format`` at JPEG ``quality``, RGB->BGR for
    OpenCV so the file holds true colours) or already-encoded bytes (stored unchanged).
    Payloads holding the magic word at an aligned offset are split like dmlc's writer does.

    ``layout='flat'``: images at keys 0..N-1, except when the first sample has array labels:
    insightface's ``MXFaceDataset`` takes any multi-label record 0 for the legacy header (and
    would read ``range(1, label[0])``, i.e. no images), so such a file gets a header record 0
    holding ``[N + 1, N + 1]`` (images at keys 1..N, no identity records), which insightface and
    kdface both read as the N images. ``layout='legacy'``: the insightface layout (module
    docstring): header record 0, images at keys 1..N, then one identity record per identity. It
    requires the labels to be exactly 0..C-1 with each identity's images contiguous in
    ``samples``, and N, C below 2**24 (the header stores keys as float32).
    """
    if layout not in ("flat", "legacy"):
        raise ValueError(f"layout must be 'flat' or 'legacy', got {layout!r}")
    rec_path = os.fspath(rec_path)
    idx_path = default_idx_path(rec_path) if idx_path is None else os.fspath(idx_path)
    legacy = layout == "legacy"
    header_only = False  # flat with array labels first: header record 0, no identity records
    index = {}
    ranges = {}  # legacy: identity -> [first_key, end_key)
    previous = None
    tmp_rec, tmp_idx = rec_path + ".partial", idx_path + ".partial"
    try:
        with open(tmp_rec, "wb") as f:
            if legacy:
                f.write(_frame(pack_irheader([0.0, 0.0])))  # placeholder, see _write_legacy_tail
            key = 1 if legacy else 0
            num_images = 0
            for n, sample in enumerate(samples):
                label, image = _check_sample(sample, n)
                if n == 0 and not legacy and np.ndim(label) > 0:
                    header_only = True
                    f.write(_frame(pack_irheader([0.0, 0.0])))  # overwritten below
                    key = 1
                if isinstance(image, np.ndarray):
                    data = encode_image(image, format=image_format, quality=quality,
                                        name=f"sample {n}")
                else:
                    data = image
                identity = int(label) if np.ndim(label) == 0 else int(np.asarray(label)[0])
                if legacy:
                    if identity != previous:
                        if identity in ranges:
                            raise ValueError(
                                f"layout='legacy' needs each identity's samples contiguous; "
                                f"identity {identity} reappears at sample {n}"
                            )
                        ranges[identity] = [key, key]
                        previous = identity
                    ranges[identity][1] = key + 1
                index[key] = f.tell()
                f.write(_frame(pack_irheader(label, data)))
                key += 1
                num_images += 1
            if legacy:
                _write_legacy_tail(f, index, ranges, key)
            elif header_only:
                if key >= _FLOAT32_EXACT:
                    raise ValueError("array labels on the first sample need a header record "
                                     "that stores keys as float32: at most 2**24 images")
                _overwrite_header(f, index, key, key)
        _write_index(tmp_idx, dict(sorted(index.items())))
        os.replace(tmp_rec, rec_path)
        os.replace(tmp_idx, idx_path)
    finally:
        for tmp in (tmp_rec, tmp_idx):
            if os.path.exists(tmp):
                os.remove(tmp)
    return num_images


def _check_sample(sample, n: int):
    try:
        label, image = sample
    except (TypeError, ValueError):
        raise TypeError(f"sample {n} must be a (label, image) pair") from None
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = bytes(image)
        if not image:
            raise ValueError(f"sample {n}: encoded image bytes are empty")
    elif not isinstance(image, np.ndarray):
        raise TypeError(
            f"sample {n}: image must be a uint8 [H, W, 3] array or encoded bytes, "
            f"got {type(image).__name__}"
        )
    labels = np.asarray(label)
    if labels.ndim > 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.number):
        raise ValueError(f"sample {n}: label must be an int or a 1-D sequence, got {label!r}")
    identity = float(labels.reshape(-1)[0])
    if not identity.is_integer() or abs(identity) >= _FLOAT32_EXACT:
        raise ValueError(
            f"sample {n}: identity {identity} must be an integer below 2**24 (stored as float32)"
        )
    return label, image


def _write_legacy_tail(f, index, ranges, key) -> None:
    """Appends identity records and overwrites record 0 with [first_identity_key, end]."""
    num_ids = len(ranges)
    if sorted(ranges) != list(range(num_ids)):
        raise ValueError(
            "layout='legacy' needs labels 0..C-1 (identity record first_key + c describes "
            f"identity c); got {num_ids} identities with labels {sorted(ranges)[:10]}..."
        )
    first = key
    if first + num_ids >= _FLOAT32_EXACT:
        raise ValueError("layout='legacy' stores keys as float32: at most 2**24 records")
    for c in range(num_ids):
        index[key] = f.tell()
        f.write(_frame(pack_irheader([float(v) for v in ranges[c]], id=c)))
        key += 1
    _overwrite_header(f, index, first, key)


def _overwrite_header(f, index, first: int, end: int) -> None:
    """Writes the legacy header ``[first, end]`` over the placeholder record at offset 0."""
    # The header payload is 32 bytes of small non-negative numbers and can never contain the
    # magic word (whose float32 reading is negative), so its frame has a fixed size and the
    # placeholder written first can be overwritten in place.
    f.seek(0)
    f.write(_frame(pack_irheader([float(first), float(end)])))
    index[0] = 0
