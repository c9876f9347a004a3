"""MXNet RecordIO bytes: record framing, IRHeader, and ``.idx`` files (no mxnet needed).

File layout (dmlc-core ``recordio.h``, which MXNet and insightface use):

* A record is one or more *parts*. Each part is ``uint32 magic = 0xced7230a``, ``uint32 lrec``
  with ``cflag = lrec >> 29`` and ``length = lrec & (2**29 - 1)``, ``length`` payload bytes and
  zero padding to a multiple of 4 (all little-endian).
* ``cflag`` 0 is a whole record; 1/2/3 are the first/middle/last part of a split record. The
  writer splits a payload wherever the magic word sits at a 4-byte aligned offset inside it and
  *drops* that word; the reader puts the magic word back between parts. (``0x3ed7230a`` and
  ``lrec >> 30``, sometimes quoted, are the or-tools/protobuf RecordWriter's magic and an
  outdated dmlc comment; the dmlc code and every ``.rec`` file use ``0xced7230a`` and 29 length
  bits, so that is what this module reads and writes.)
* ``.idx`` is text, one ``key\\toffset`` line per record: the byte offset of its first part.
* Each image record's payload starts with an IRHeader ``<IfQQ`` (flag, label, id, id2). With
  ``flag == 0`` the label is the float32 scalar ``label``; with ``flag > 0``, ``flag`` float32
  labels follow the header (the header's own ``label`` field is then 0) and the identity is the
  first of them. The encoded image (JPEG for insightface sets, true colours, so decoding gives RGB)
  follows.

The reader and writer built on these, and the two dataset layouts, are in ``_recordio.py``.
"""
from __future__ import annotations

import numbers
import os
import struct
from typing import NamedTuple

import numpy as np

__all__ = [
    "RECORDIO_MAGIC",
    "IRHeader",
    "RecordIOError",
    "build_recordio_index",
    "pack_irheader",
    "unpack_irheader",
]

RECORDIO_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_PART_HEAD = struct.Struct("<II")
_IR = struct.Struct("<IfQQ")
_FLOAT32_EXACT = 1 << 24  # keys/labels stored as float32 are exact only below 2**24


class RecordIOError(ValueError):
    """A ``.rec``/``.idx`` pair that does not follow the format (bad magic, truncation, ...)."""


class IRHeader(NamedTuple):
    """MXNet image-record header. ``label``: float (flag 0) or float32 array ``[flag]``."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack_irheader(label, payload: bytes = b"", *, id: int = 0, id2: int = 0) -> bytes:
    """Builds a record payload: IRHeader ``<IfQQ`` (+ float32 labels) + ``payload``.

    ``label``: a number (stored with flag 0) or a 1-D sequence of numbers (flag = its length,
    the header's label field 0, the labels as float32 after the header), as MXNet's
    ``recordio.pack`` does.
    """
    if isinstance(label, numbers.Number) and not isinstance(label, bool):
        return _IR.pack(0, float(label), int(id), int(id2)) + bytes(payload)
    labels = np.asarray(label, dtype=np.float32)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"array labels must be a non-empty 1-D sequence, got shape {labels.shape}")
    return _IR.pack(labels.size, 0.0, int(id), int(id2)) + labels.tobytes() + bytes(payload)


def unpack_irheader(record: bytes, *, name: str = "record") -> tuple[IRHeader, bytes]:
    """Splits a record payload into its :class:`IRHeader` and the bytes after the labels."""
    if len(record) < _IR.size:
        raise RecordIOError(f"{name}: {len(record)} bytes is shorter than the 24-byte IRHeader")
    flag, label, id_, id2 = _IR.unpack_from(record, 0)
    end = _IR.size + 4 * flag
    if flag > 0:
        if len(record) < end:
            raise RecordIOError(
                f"{name}: IRHeader says {flag} float32 labels but the record has "
                f"{len(record) - _IR.size} bytes after the header"
            )
        label = np.frombuffer(record, dtype=np.float32, count=flag, offset=_IR.size).copy()
    return IRHeader(flag, label, id_, id2), record[end:]


def _identity(header: IRHeader, name: str) -> int:
    value = float(header.label if header.flag == 0 else header.label[0])
    if not value.is_integer():
        raise RecordIOError(f"{name}: identity label {value} is not an integer")
    return int(value)


def _frame(payload: bytes) -> bytes:
    """Frames one record, splitting it at 4-byte aligned magic words as dmlc's writer does."""
    if len(payload) > _LENGTH_MASK:
        raise ValueError(f"a RecordIO record must be < 2**29 bytes, got {len(payload)}")
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i:i + 4] == _MAGIC_BYTES]
    out = []
    start = 0
    for n, cut in enumerate(cuts):
        out.append(_PART_HEAD.pack(RECORDIO_MAGIC, ((1 if n == 0 else 2) << _LENGTH_BITS)
                                   | (cut - start)))
        out.append(payload[start:cut])
        start = cut + 4
    last = len(payload) - start
    out.append(_PART_HEAD.pack(RECORDIO_MAGIC, ((3 if cuts else 0) << _LENGTH_BITS) | last))
    out.append(payload[start:])
    out.append(b"\0" * (-last % 4))  # split parts end 4-aligned, only the last needs padding
    return b"".join(out)


def _read_parts(fd: int, offset: int, path: str, size: int) -> tuple[bytes, int]:
    """Reads the record starting at ``offset``; returns (payload, offset after the record)."""
    parts = []
    pos = offset
    while True:
        head = os.pread(fd, 8, pos)
        if len(head) < 8:
            raise RecordIOError(
                f"{path} is truncated: a record part header at byte offset {pos} needs 8 bytes, "
                f"the file has {max(size - pos, 0)} left"
            )
        magic, lrec = _PART_HEAD.unpack(head)
        if magic != RECORDIO_MAGIC:
            raise RecordIOError(
                f"{path}: bad magic 0x{magic:08x} at byte offset {pos} (expected 0x"
                f"{RECORDIO_MAGIC:08x}); the file is not MXNet RecordIO or the .idx offsets do "
                "not belong to this .rec"
            )
        cflag, length = lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK
        expected = (0, 1) if not parts else (2, 3)
        if cflag not in expected:
            raise RecordIOError(
                f"{path}: record part at byte offset {pos} has cflag {cflag}, expected one of "
                f"{expected} (a split record is broken or the .idx points inside one)"
            )
        data = os.pread(fd, length, pos + 8)
        if len(data) < length:
            raise RecordIOError(
                f"{path} is truncated: the record part at byte offset {pos} declares {length} "
                f"bytes but only {len(data)} remain"
            )
        parts.append(data)
        pos += 8 + length + (-length % 4)
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(parts), pos


def build_recordio_index(rec_path, idx_path=None, *, write: bool = True) -> dict[int, int]:
    """Scans a ``.rec`` and returns the ``{key: offset}`` its writer's ``.idx`` would hold.

    Every writer kdface knows numbers records in the order it writes them, with one exception:
    the legacy insightface header (key 0) is written *after* the images by insightface's
    ``RecBuilder`` (after the identity records too) and by ``face2rec2.py`` (before them). So
    the header is found wherever it lies (:func:`_legacy_header_position`), becomes key 0, and
    the other records get keys 1, 2, ... in file order; a file without one gets keys 0, 1, ...
    With ``write`` the index is saved as ``key\\toffset`` lines (default path: ``.rec`` ->
    ``.idx``). Reads the whole file once: minutes for a multi-GB training set.
    """
    rec_path = os.fspath(rec_path)
    offsets, candidates = [], []
    fd = os.open(rec_path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            offsets.append(pos)
            payload, pos = _read_parts(fd, pos, rec_path, size)
            if len(payload) >= _IR.size:
                flag = _IR.unpack_from(payload, 0)[0]
                if flag >= 2 and len(payload) == _IR.size + 4 * flag:  # labels, no image
                    label = np.frombuffer(payload, np.float32, count=2, offset=_IR.size)
                    candidates.append((len(offsets) - 1, float(label[0]), float(label[1])))
    finally:
        os.close(fd)
    header = _legacy_header_position(candidates, len(offsets), rec_path)
    if header is None:
        index = dict(enumerate(offsets))
    else:
        rest = offsets[:header] + offsets[header + 1:]
        index = {0: offsets[header], **{k: off for k, off in enumerate(rest, 1)}}
    if write:
        _write_index(default_idx_path(rec_path) if idx_path is None else os.fspath(idx_path), index)
    return index


def _legacy_header_position(candidates, num_records: int, rec_path: str) -> int | None:
    """File position of the legacy header among imageless multi-label records, or None.

    The header holds ``[first_identity_key, end]`` with ``end`` the number of keys, i.e. of
    records; an identity record ``[a, b)`` has ``b <= first_identity_key``, which is below the
    number of records whenever identity records exist, so none can pass for the header.
    """
    found = [pos for pos, first, end in candidates
             if end == num_records and first.is_integer() and 1 <= first <= end]
    if len(found) > 1:
        raise RecordIOError(
            f"{rec_path}: records at positions {found[:3]} all look like the legacy header "
            f"[first_identity_key, {num_records}]; the keys cannot be rebuilt without the .idx"
        )
    return found[0] if found else None


def default_idx_path(rec_path: str) -> str:
    root, ext = os.path.splitext(rec_path)
    return (root if ext == ".rec" else rec_path) + ".idx"


def _write_index(idx_path: str, index: dict[int, int]) -> None:
    with open(idx_path, "w") as f:
        f.writelines(f"{key}\t{offset}\n" for key, offset in index.items())


def _read_index(idx_path: str) -> dict[int, int]:
    index = {}
    with open(idx_path) as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise RecordIOError(
                    f"{idx_path}:{line_no}: expected 'key<TAB>offset', got {line!r}"
                )
            try:
                index[int(fields[0])] = int(fields[1])
            except ValueError:
                raise RecordIOError(
                    f"{idx_path}:{line_no}: key and offset must be integers, got {line!r}"
                ) from None
    return index
