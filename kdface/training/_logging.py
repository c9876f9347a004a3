"""Run logs without TensorFlow: a JSONL file, TensorBoard event files, and a progress line.

TensorBoard reads TFRecord files of ``Event`` protocol buffers. Scalars need only three messages
(Event{wall_time=1, step=2, summary=5}, Summary{value=1}, Value{tag=1, simple_value=2}), so they
are encoded here by hand rather than pulling in TensorFlow or tensorboard; ``read_events`` parses
them back (for tests and for users without TensorBoard).
"""
from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from typing import Any

_CRC_TABLE: list[int] = []


def _crc32c(data: bytes) -> int:
    if not _CRC_TABLE:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            _CRC_TABLE.append(c)
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def _event(wall_time: float, step: int, *, summary: bytes | None = None,
           file_version: str | None = None) -> bytes:
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        msg += _length_delimited(3, file_version.encode())
    if summary is not None:
        msg += _length_delimited(5, summary)
    return msg


def _scalar_summary(tag: str, value: float) -> bytes:
    inner = _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", value))
    return _length_delimited(1, inner)


class EventWriter:
    """Appends scalar summaries to ``events.out.tfevents.*`` in ``log_dir``."""

    def __init__(self, log_dir: str):
        os.makedirs(log_dir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(log_dir, name)
        self._file = open(self.path, "ab")
        self._write(_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", _masked_crc(header)) + record
                         + struct.pack("<I", _masked_crc(record)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        now = time.time()
        for tag, value in values.items():
            self._write(_event(now, step, summary=_scalar_summary(tag, float(value))))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, pos


def _fields(buf: bytes):
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def read_events(path: str) -> list[tuple[int, str, float]]:
    """``(step, tag, value)`` of every scalar in an event file, checking both CRCs."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[pos + 8:pos + 12])[0] != _masked_crc(header):
            raise ValueError(f"{path}: bad length checksum at offset {pos}")
        record = data[pos + 12:pos + 12 + length]
        if struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] != \
                _masked_crc(record):
            raise ValueError(f"{path}: bad record checksum at offset {pos}")
        pos += 16 + length
        step, summary = 0, None
        for number, value in _fields(record):
            if number == 2:
                step = value
            elif number == 5:
                summary = value
        if summary is None:
            continue
        for _, value_msg in _fields(summary):
            tag, scalar = "", float("nan")
            for number, value in _fields(value_msg):
                if number == 1:
                    tag = value.decode()
                elif number == 2:
                    (scalar,) = struct.unpack("<f", value)
            out.append((step, tag, scalar))
    return out


class RunLog:
    """JSONL + TensorBoard events + a one-line progress display, on the main process only."""

    def __init__(self, log_dir: str, *, enabled: bool = True, total_steps: int = 0):
        self.enabled = enabled
        self.total_steps = total_steps
        if enabled:
            os.makedirs(log_dir, exist_ok=True)
            self._jsonl = open(os.path.join(log_dir, "log.jsonl"), "a")
            self._events = EventWriter(log_dir)

    def log(self, step: int, values: dict[str, Any], *, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": time.time(), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self._events.scalars(step, {f"{kind}/{k}": v for k, v in values.items()
                                    if isinstance(v, (int, float))})

    def progress(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        width = 24
        done = int(width * step / max(self.total_steps, 1))
        text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{self.total_steps} "
                         f"{text}   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            self._jsonl.close()
            self._events.close()
