"""Image bytes <-> uint8 RGB arrays with OpenCV, with errors that name the record.

Every loader in ``kdface.data`` hands images around as uint8 ``[H, W, 3]`` arrays in **RGB**
order. OpenCV decodes to and encodes from BGR, so the swap happens here and only here: a JPEG
written by :func:`encode_image` from an RGB array holds the true colours, exactly like the
JPEGs inside insightface's ``.rec``/``.bin`` files (which ``mx.image.imdecode`` returns as RGB).
"""
from __future__ import annotations

import os

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


def decode_image(data, *, name: str = "image") -> np.ndarray:
    """Decodes encoded image bytes (JPEG, PNG, BMP, ...) to uint8 ``[H, W, 3]`` RGB.

    Grayscale images are expanded to three channels, alpha is dropped and 16-bit images are
    reduced to 8 bits (OpenCV's ``IMREAD_COLOR``). ``name`` identifies the record in the error
    raised for bytes that are not a decodable image (``UndecodableImageError``).
    """
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise TypeError(
                f"{name}: encoded image arrays must be 1-D uint8, got {data.dtype} {data.shape}"
            )
        buf = data
    elif isinstance(data, (bytes, bytearray, memoryview)):
        buf = np.frombuffer(data, dtype=np.uint8)
    else:
        raise TypeError(f"{name}: expected encoded image bytes, got {type(data).__name__}")
    if buf.size == 0:
        raise UndecodableImageError(f"{name}: cannot decode an image from 0 bytes")
    try:
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as err:  # OpenCV raises for some malformed headers instead of returning None
        raise UndecodableImageError(
            f"{name}: {buf.size} bytes are not a decodable image ({err})"
        ) from err
    if bgr is None:
        head = bytes(buf[:8]).hex()
        raise UndecodableImageError(
            f"{name}: {buf.size} bytes are not a decodable image (first bytes {head})"
        )
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


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


def read_image_file(path) -> np.ndarray:
    """Reads and decodes an image file to uint8 ``[H, W, 3]`` RGB (errors name the path).

    The file is read with Python's ``open`` rather than ``cv2.imread`` so non-ASCII paths work
    and a missing file gives ``FileNotFoundError`` instead of a silent ``None``.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    return decode_image(data, name=path)
