"""insightface verification ``.bin`` files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...), safely.

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``bins[2i]`` and ``bins[2i + 1]`` are the
encoded JPEG/PNG bytes of pair ``i`` and ``issame_list[i]`` says whether they show the same
person. insightface's packers write it with ``pickle.HIGHEST_PROTOCOL`` of the Python that ran
them (2 for the Python 2 files distributed with faces_emore & co., 5 today). ``lfw2pack.py``
stores the file bytes; ``agedb2pack2.py``, ``cfp2pack.py`` and ``build_eval_pack.py`` store
``cv2.imencode`` output directly, a uint8 numpy array (``(N, 1)``-shaped with older OpenCV):
every C-contiguous uint8 array is read as encoded bytes. Files written by Python 2 hold ``str``
objects, so they are loaded with ``encoding='bytes'`` (which leaves Python 3 pickles unchanged).

Unpickling runs code named by the file, so the reader uses a restricted unpickler. Lists,
tuples, bytes, bools and ints need no code and always load. Everything that needs a global is
refused with :class:`UnsafePickleError` except this narrow set, met in real files:

* ``_codecs.encode(text, 'latin1')``: how protocol-2 pickles spell ``bytes``; only latin-1
  text is accepted.
* numpy arrays and scalars of kind bool/int/uint (e.g. ``issame_list`` saved as a bool array,
  images saved as uint8 arrays of encoded bytes): ``numpy.core.multiarray._reconstruct`` (only
  for ``numpy.ndarray``), ``numpy.core.multiarray.scalar``, ``numpy.core.numeric._frombuffer``
  (also under ``numpy._core``) and ``numpy.dtype``, each wrapped so that it builds nothing
  but a bool/int/uint dtype. Object arrays, and every other global, are refused.
"""
from __future__ import annotations

import io
import os
import pickle

import numpy as np

from kdface.data._images import check_image, decode_image, encode_image, stack_images

__all__ = [
    "UnsafePickleError",
    "read_verification_bin",
    "read_verification_bin_encoded",
    "write_verification_bin",
]

_SAFE_KINDS = "biu"


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A verification ``.bin`` asked to load something other than plain data; nothing ran."""


class _NdarrayToken:
    """Stands in for ``numpy.ndarray`` so a pickle cannot call the class with its own args."""

    def __repr__(self):
        return "numpy.ndarray (restricted)"


_NDARRAY = _NdarrayToken()


def _refuse(what: str):
    raise UnsafePickleError(f"refusing {what}: verification .bin files hold only plain data")


def _latin1_bytes(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        _refuse(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _bytearray(data=b"", encoding=None):
    if isinstance(data, str) and encoding in ("latin1", "latin-1"):
        return bytearray(data.encode("latin1"))
    if isinstance(data, bytes) and encoding is None:
        return bytearray(data)
    _refuse(f"bytearray({type(data).__name__}, {encoding!r})")


def _safe_dtype(spec, align=False, copy=False):
    if not isinstance(spec, (str, bytes)):
        _refuse(f"numpy.dtype({type(spec).__name__})")
    dtype = np.dtype(spec.decode("ascii") if isinstance(spec, bytes) else spec, align, copy)
    return _checked_dtype(dtype)


def _checked_dtype(dtype):
    if (not isinstance(dtype, np.dtype) or dtype.kind not in _SAFE_KINDS
            or dtype.fields is not None or dtype.subdtype is not None or dtype.hasobject):
        _refuse(f"numpy data of dtype {dtype!r}")
    return dtype


def _safe_reconstruct(cls, shape, typecode):
    if cls is not _NDARRAY:
        _refuse(f"_reconstruct of {cls!r}")
    if not isinstance(typecode, (str, bytes)):
        _refuse(f"_reconstruct typecode {typecode!r}")
    # The placeholder's dtype is replaced by the BUILD state, whose dtype can only come from
    # _safe_dtype; the result is validated again after loading.
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)


def _safe_scalar(dtype, data=None):
    dtype = _checked_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        _refuse("numpy scalar without matching raw bytes")
    return np.frombuffer(data, dtype=dtype)[0]


def _safe_frombuffer(buffer, dtype, shape, order):
    dtype = _checked_dtype(dtype)
    if not isinstance(buffer, (bytes, bytearray)) or order not in ("C", "F"):
        _refuse("numpy _frombuffer with a non-bytes buffer")
    return np.frombuffer(bytes(buffer), dtype=dtype).reshape(shape, order=order).copy()


_ALLOWED = {
    ("_codecs", "encode"): _latin1_bytes,
    ("builtins", "bytearray"): _bytearray,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _safe_dtype,
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _safe_reconstruct
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = _safe_scalar
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _safe_frombuffer


class _RestrictedUnpickler(pickle._Unpickler):
    """Python's pure-Python unpickler with globals and BUILD restricted.

    The pure-Python class is used (not the C one) because only its opcode table can be
    changed: BUILD (``__setstate__``/attribute assignment) is allowed on numpy arrays and
    dtypes only, so a pickle cannot set attributes on the allowed helper functions.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            _refuse(f"the global {module}.{name}")
        return allowed

    def persistent_load(self, pid):
        _refuse("a persistent id")

    def _load_build(self):
        target = self.stack[-2]
        if type(target) not in (np.ndarray,) and not isinstance(target, np.dtype):
            _refuse(f"BUILD (setting state) on a {type(target).__name__}")
        pickle._Unpickler.load_build(self)
        # A dtype's or an array's state may name another dtype; it must pass the same check.
        _checked_dtype(target if isinstance(target, np.dtype) else target.dtype)

    dispatch[pickle.BUILD[0]] = _load_build


def _load(path: str):
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError(f"{path} is empty (0 bytes), not a verification .bin pickle")
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError as err:
        raise UnsafePickleError(
            f"{path}: {err}. Only lists, tuples, bytes, bools, ints and numpy bool/int/uint "
            "arrays may appear; this file may be malicious and was not loaded."
        ) from None
    except Exception as err:  # noqa: BLE001 - the pure-Python unpickler raises many kinds
        if isinstance(err, EOFError):  # the pure-Python unpickler's EOFError has no text
            reason = "the pickle ends early: the file is truncated"
        else:
            reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise ValueError(f"{path} is not a readable verification .bin pickle ({reason}; "
                         f"{len(data)} bytes)") from err


def _as_bytes(item, where: str) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, bytearray):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim >= 1:
        # cv2.imencode output as insightface's packers store it: [N] or [N, 1] (older OpenCV).
        if not item.flags.c_contiguous:
            raise ValueError(f"{where}: a uint8 array of encoded bytes must be C-contiguous, "
                             f"got shape {item.shape} with strides {item.strides}")
        return item.tobytes()
    what = type(item).__name__
    if isinstance(item, np.ndarray):
        what = f"a {item.dtype} array of shape {item.shape}"
    raise ValueError(f"{where} must be encoded image bytes (bytes or a uint8 array), got {what}")


def read_verification_bin_encoded(path) -> tuple[list[bytes], np.ndarray]:
    """``(encoded [2P] list of bytes, issame bool [P])`` of a ``.bin`` without decoding."""
    path = os.fspath(path)
    obj = _load(path)
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair")
    bins, issame = obj
    if isinstance(bins, np.ndarray) and bins.dtype == object:
        raise ValueError(f"{path}: bins must be a list of encoded images")
    if not isinstance(bins, (list, tuple)):
        raise ValueError(f"{path}: bins must be a list, got {type(bins).__name__}")
    encoded = [_as_bytes(item, f"{path} bins[{i}]") for i, item in enumerate(bins)]
    if isinstance(issame, np.ndarray):
        _checked_dtype(issame.dtype)
        flags = issame.reshape(-1)
    elif isinstance(issame, (list, tuple)):
        for i, v in enumerate(issame):
            if not isinstance(v, (bool, int, np.bool_, np.integer)) or int(v) not in (0, 1):
                raise ValueError(f"{path}: issame_list[{i}] must be a bool, got {v!r}")
        flags = np.asarray([int(v) for v in issame], dtype=np.int64)
    else:
        raise ValueError(f"{path}: issame_list must be a list, got {type(issame).__name__}")
    if flags.size and not np.isin(flags, (0, 1)).all():
        raise ValueError(f"{path}: issame_list must hold only 0/1/True/False")
    if len(encoded) != 2 * flags.size:
        raise ValueError(
            f"{path}: {len(encoded)} images for {flags.size} pairs (expected twice as many)"
        )
    return encoded, flags.astype(bool)


def read_verification_bin(path, *, strict: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Reads an insightface verification ``.bin``.

    Returns ``images``: uint8 ``[2P, H, W, 3]`` RGB (pair ``i`` is rows ``2i`` and ``2i + 1``)
    and ``issame``: bool ``[P]``. All images must share one size (insightface sets are
    112x112). Refuses pickles that would run code (:class:`UnsafePickleError`, module
    docstring); undecodable images raise ``UndecodableImageError`` naming the index, and with
    ``strict`` (default) so do damaged JPEGs OpenCV would decode with grey or garbage blocks.
    """
    path = os.fspath(path)
    encoded, issame = read_verification_bin_encoded(path)
    images = stack_images(
        (decode_image(data, name=f"{path} image {i} (pair {i // 2})", strict=strict)
         for i, data in enumerate(encoded)),
        len(encoded), name=lambda i: f"{path}: image {i}", fix="a .bin must hold one image size")
    return images, issame


def write_verification_bin(path, images_or_encoded, issame, *, format: str = "jpg",
                           quality: int = 95, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
    """Writes ``(bins, issame_list)`` as insightface's packers do.

    ``images_or_encoded``: uint8 ``[2P, H, W, 3]`` RGB (or a sequence of such images), encoded
    here as ``format`` (``'jpg'`` at ``quality``, or ``'png'``), or a sequence of ``2P`` encoded
    bytes stored unchanged. ``issame``: ``[P]`` bools. Images are stored as ``bytes`` (what
    ``lfw2pack.py`` writes) and the pickle uses ``protocol``, by default
    ``pickle.HIGHEST_PROTOCOL`` as insightface's scripts do; pass ``protocol=2`` for a file that
    Python 2 (the insightface releases of 2018-2019) can also read.
    """
    path = os.fspath(path)
    if protocol not in range(2, pickle.HIGHEST_PROTOCOL + 1):
        raise ValueError(f"protocol must be 2..{pickle.HIGHEST_PROTOCOL}, got {protocol!r}")
    flags = np.asarray(issame)
    if flags.ndim != 1 or not (flags.dtype == bool or np.isin(flags, (0, 1)).all()):
        raise ValueError(f"issame must be a 1-D sequence of bools, got {flags.dtype} {flags.shape}")
    items = list(images_or_encoded)  # rows of a [2P, H, W, 3] array, or a sequence
    if len(items) != 2 * flags.size:
        raise ValueError(f"{len(items)} images for {flags.size} pairs (expected twice as many)")
    bins = []
    for i, item in enumerate(items):
        if isinstance(item, (bytes, bytearray, memoryview)):
            bins.append(bytes(item))
        else:
            image = check_image(item, name=f"image {i}")
            bins.append(encode_image(image, format=format, quality=quality, name=f"image {i}"))
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        pickle.dump((bins, [bool(v) for v in flags]), f, protocol=protocol)
    os.replace(tmp, path)
