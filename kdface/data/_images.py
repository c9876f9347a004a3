"""Image bytes <-> uint8 RGB arrays with OpenCV, with errors that name the record.

Every loader in ``kdface.data`` hands images around as uint8 ``[H, W, 3]`` arrays in **RGB**
order. OpenCV decodes to and encodes from BGR, so the swap happens here and only here: a JPEG
written by :func:`encode_image` from an RGB array holds the true colours, exactly like the
JPEGs inside insightface's ``.rec``/``.bin`` files (which ``mx.image.imdecode`` returns as RGB).
"""
from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Iterable

import cv2
import numpy as np

__all__ = [
    "UndecodableImageError",
    "check_image",
    "decode_image",
    "encode_image",
    "read_image_file",
]

_FORMATS = {"jpg": ".jpg", "jpeg": ".jpg", "png": ".png"}


class UndecodableImageError(ValueError):
    """Raised when bytes that should hold an image cannot be decoded; the message names them."""


def check_image(image, *, name: str = "image") -> np.ndarray:
    """Checks that ``image`` is a uint8 ``[H, W, 3]`` array and returns it as a numpy array."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 [H, W, 3] RGB, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name} must be uint8 [H, W, 3] RGB, got shape {image.shape}")
    return image


def _encoded_buffer(data, name: str) -> np.ndarray:
    """Encoded bytes as a 1-D uint8 view: bytes-like, or any C-contiguous uint8 array.

    ``cv2.imencode`` returns an ``(N, 1)`` array in older OpenCV releases and insightface's
    ``.bin`` packers stored that array as is, so every C-contiguous uint8 array is accepted.
    """
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim == 0 or not data.flags.c_contiguous:
            raise TypeError(
                f"{name}: encoded image arrays must be C-contiguous uint8, got {data.dtype} "
                f"{data.shape}"
            )
        return data.reshape(-1)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    raise TypeError(f"{name}: expected encoded image bytes, got {type(data).__name__}")


def decode_image(data, *, name: str = "image", strict: bool = False) -> np.ndarray:
    """Decodes encoded image bytes (JPEG, PNG, BMP, ...) to uint8 ``[H, W, 3]`` RGB.

    ``data``: bytes, or a C-contiguous uint8 array of encoded bytes (any shape, e.g. the
    ``(N, 1)`` arrays older ``cv2.imencode`` returns). Grayscale images are expanded to three
    channels, alpha is dropped and 16-bit images are reduced to 8 bits (OpenCV's
    ``IMREAD_COLOR``). ``name`` identifies the record in the error raised for bytes that are
    not a decodable image (``UndecodableImageError``).

    ``strict``: also refuse damaged JPEGs that OpenCV decodes anyway, filling the damaged part
    with grey or garbage: a JPEG that ends before its end-of-image marker, and one for which
    libjpeg reports corrupt data ("Corrupt JPEG data: premature end of data segment", "...
    extraneous bytes before marker ..."). Meant for checking a dataset once while building it;
    it serializes JPEG decoding in the process (see ``_imdecode_with_warnings``).
    """
    buf = _encoded_buffer(data, name)
    if buf.size == 0:
        raise UndecodableImageError(f"{name}: cannot decode an image from 0 bytes")
    is_jpeg = strict and bytes(buf[:2]) == b"\xff\xd8"
    if is_jpeg:
        raw = buf.tobytes()
        start = raw.find(b"\xff\xda")
        if start < 0 or raw.rfind(b"\xff\xd9") < start:
            raise UndecodableImageError(
                f"{name}: damaged JPEG: the {buf.size} bytes end before the end-of-image marker "
                "(truncated)"
            )
    try:
        if is_jpeg:
            bgr, warnings = _imdecode_with_warnings(buf)
        else:
            bgr, warnings = cv2.imdecode(buf, cv2.IMREAD_COLOR), []
    except cv2.error as err:  # OpenCV raises for some malformed headers instead of returning None
        raise UndecodableImageError(
            f"{name}: {buf.size} bytes are not a decodable image ({err})"
        ) from err
    if bgr is None:
        head = bytes(buf[:8]).hex()
        raise UndecodableImageError(
            f"{name}: {buf.size} bytes are not a decodable image (first bytes {head})"
        )
    if warnings:
        raise UndecodableImageError(f"{name}: damaged JPEG, libjpeg reports: {warnings[0]}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# libjpeg's warnings that mean the pixel data is damaged (jerror.h, JWRN_*); others (an unknown
# JFIF revision, an Adobe colour-transform code) leave the pixels intact and are passed through.
_DAMAGE_WARNINGS = (b"Corrupt JPEG data", b"Premature end of JPEG file",
                    b"Invalid SOS parameters", b"Inconsistent progression sequence")


class _StderrSink:
    """A per-process temporary file that fd 2 is pointed at while libjpeg runs."""

    lock = threading.Lock()
    fd = None
    pid = None

    @classmethod
    def get(cls) -> int:
        if cls.fd is None or cls.pid != os.getpid():
            with tempfile.TemporaryFile() as f:  # already unlinked; the dup keeps it open
                cls.fd = os.dup(f.fileno())
            cls.pid = os.getpid()
        return cls.fd

    @classmethod
    def reset_after_fork(cls) -> None:
        cls.lock = threading.Lock()  # a fork taken mid-decode must not inherit a held lock
        cls.fd = None


if hasattr(os, "register_at_fork"):  # POSIX only, like the fd juggling it protects
    os.register_at_fork(after_in_child=_StderrSink.reset_after_fork)


def _imdecode_with_warnings(buf: np.ndarray):
    """``(cv2.imdecode result, damage warnings)`` for JPEG bytes.

    OpenCV installs libjpeg's default message handler, which prints warnings with ``fprintf``
    on stderr and lets the decode succeed; neither ``cv2`` nor any library kdface requires
    exposes them. So fd 2 points at a temporary file for the duration of the call (under a
    lock, ~20 us) and what libjpeg wrote there is read back; any other text that landed there
    meanwhile is written on to the real stderr.
    """
    with _StderrSink.lock:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all: libjpeg's messages go nowhere, decode unchecked
            return cv2.imdecode(buf, cv2.IMREAD_COLOR), []
        sink = _StderrSink.get()
        try:
            os.dup2(sink, 2)
            try:
                bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
            finally:
                os.dup2(saved, 2)
        finally:
            os.close(saved)
        size = os.fstat(sink).st_size
        text = os.pread(sink, size, 0) if size else b""
        if size:
            os.ftruncate(sink, 0)
            os.lseek(sink, 0, os.SEEK_SET)
    damage, other = [], []
    for line in text.splitlines(keepends=True):
        (damage if line.startswith(_DAMAGE_WARNINGS) else other).append(line)
    if other:
        os.write(2, b"".join(other))
    return bgr, [line.decode("utf-8", "replace").strip() for line in damage]


def encode_image(image, *, format: str = "jpg", quality: int = 95, name: str = "image") -> bytes:
    """Encodes uint8 ``[H, W, 3]`` RGB to JPEG (``quality`` 1..100) or PNG bytes.

    The array is swapped to BGR before ``cv2.imencode`` so the file holds the true colours.
    """
    image = check_image(image, name=name)
    ext = _FORMATS.get(str(format).lower())
    if ext is None:
        raise ValueError(f"format must be one of {sorted(_FORMATS)}, got {format!r}")
    params = []
    if ext == ".jpg":
        if not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
            raise ValueError(f"quality must be an int in [1, 100], got {quality!r}")
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    bgr = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(ext, bgr, params)
    if not ok:
        raise ValueError(f"{name}: OpenCV failed to encode a {image.shape} image as {ext}")
    return buf.tobytes()


def read_image_file(path, *, strict: bool = False) -> np.ndarray:
    """Reads and decodes an image file to uint8 ``[H, W, 3]`` RGB (errors name the path).

    ``strict``: refuse damaged JPEGs as :func:`decode_image` does.

    The file is read with Python's ``open`` rather than ``cv2.imread`` so non-ASCII paths work
    and a missing file gives ``FileNotFoundError`` instead of a silent ``None``.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    return decode_image(data, name=path, strict=strict)


def stack_images(images: Iterable[np.ndarray], count: int, *, name: Callable[[int], str],
                 fix: str) -> np.ndarray:
    """uint8 ``[count, H, W, 3]`` from ``count`` decoded images that must share one size.

    Filled in place as ``images`` yields them (a generator of decodes), so a test set is held
    once, not twice as with a list and ``np.stack``. ``name(i)`` names image ``i`` in the error;
    ``fix`` says what to do about a size mismatch. No images give ``[0, 0, 0, 3]``.
    """
    out = None
    for i, image in enumerate(images):
        if out is None:
            out = np.empty((count,) + image.shape, dtype=np.uint8)
        elif image.shape != out.shape[1:]:
            raise ValueError(f"{name(i)} is {image.shape} but {name(0)} is {out.shape[1:]}; {fix}")
        out[i] = image
    return np.zeros((0, 0, 0, 3), dtype=np.uint8) if out is None else out
