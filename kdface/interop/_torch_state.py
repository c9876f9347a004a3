"""PyTorch ``.pth`` state dicts read into NumPy, without PyTorch and without running the pickle.

Since PyTorch 1.6 ``torch.save`` writes a zip archive: ``<name>/data.pkl`` is a pickle of the
object (a state dict is an ``OrderedDict`` of tensors) and ``<name>/data/<key>`` holds the raw
bytes of each storage; ``<name>/byteorder`` says ``little`` or ``big``. In the pickle a tensor is
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`` and a
storage is a persistent id ``('storage', torch.FloatStorage, key, location, numel)``.

A pickle runs code named by the file, so the reader uses Python's pure-Python unpickler with the
globals restricted to exactly that vocabulary (the same approach as kdface's verification ``.bin``
reader): ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` /
``_rebuild_parameter`` and the typed storage classes (``torch.FloatStorage`` ... each mapped to a
NumPy dtype). They are replaced by NumPy builders, so nothing from ``torch`` is imported; every
other global is refused with :class:`UnsafeTorchPickleError` before anything runs. Strides and
offsets are bounds-checked against the storage size.

The legacy (pre-1.6, non-zip) format is read with ``torch.load(weights_only=True)`` when PyTorch
is installed (it is PyTorch's own restricted loader); without PyTorch it is refused with a
message saying how to re-save the file.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any

import numpy as np

__all__ = ["UnsafeTorchPickleError", "read_torch_state_dict"]


class UnsafeTorchPickleError(pickle.UnpicklingError):
    """A ``.pth`` pickle asked for something other than tensors and dicts; nothing ran."""


class _StorageType:
    """Stands in for ``torch.<Kind>Storage``: only its NumPy dtype is used."""

    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, np.dtype(dtype)

    def __repr__(self):
        return f"torch.{self.name} (restricted)"


def _bfloat16():
    import ml_dtypes  # shipped with jax
    return ml_dtypes.bfloat16


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def _storage_type(name: str) -> _StorageType:
    if name == "BFloat16Storage":
        return _StorageType(name, _bfloat16())
    return _StorageType(name, _STORAGE_DTYPES[name])


def _refuse(what: str):
    raise UnsafeTorchPickleError(f"refusing {what}: a state dict holds only tensors and dicts")


class _Storage:
    """A storage read from the archive: a flat NumPy array in native byte order."""

    def __init__(self, array: np.ndarray):
        self.array = array


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    """NumPy twin of ``torch._utils._rebuild_tensor_v2``: a strided view, copied."""
    del requires_grad, backward_hooks, metadata
    if not isinstance(storage, _Storage):
        _refuse(f"_rebuild_tensor_v2 of a {type(storage).__name__}")
    ints = lambda v: isinstance(v, tuple) and all(isinstance(i, int) and i >= 0 for i in v)
    if not (isinstance(storage_offset, int) and storage_offset >= 0 and ints(size)
            and ints(stride) and len(size) == len(stride)):
        _refuse("a tensor with a malformed offset/size/stride")
    flat = storage.array
    count = int(np.prod(size, dtype=np.int64))
    if count == 0:
        return np.zeros(size, flat.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        _refuse(f"a tensor reaching element {last} of a {flat.size}-element storage")
    view = np.lib.stride_tricks.as_strided(
        flat[storage_offset:], shape=size, strides=[s * flat.itemsize for s in stride],
        writeable=False)
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    del requires_grad, backward_hooks
    if not isinstance(data, np.ndarray):
        _refuse(f"_rebuild_parameter of a {type(data).__name__}")
    return data


def _ordered_dict(*args):
    if args:
        _refuse("OrderedDict built from arguments")
    return collections.OrderedDict()


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}
for _name in (*_STORAGE_DTYPES, "BFloat16Storage"):
    _ALLOWED[("torch", _name)] = _name  # resolved lazily (bfloat16 needs ml_dtypes)


class _RestrictedUnpickler(pickle._Unpickler):
    """Pure-Python unpickler (its opcode table can be changed, the C one's cannot): globals
    limited to ``_ALLOWED``, storages read from the archive, BUILD only on plain dicts."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            _refuse(f"the global {module}.{name}")
        return _storage_type(allowed) if isinstance(allowed, str) else allowed

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
                or not isinstance(pid[4], int)):
            _refuse(f"the persistent id {pid!r}")
        _, kind, key, _, numel = pid
        if key not in self._storages:
            name = f"{self._prefix}data/{key}"
            try:
                raw = self._archive.read(name)
            except KeyError:
                raise ValueError(f"storage {name} missing from the archive") from None
            dtype = kind.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            if len(raw) < numel * dtype.itemsize:
                raise ValueError(f"storage {name} holds {len(raw)} bytes, fewer than "
                                 f"{numel} x {dtype.itemsize}")
            array = np.frombuffer(raw, dtype=dtype, count=numel)
            self._storages[key] = _Storage(array.astype(kind.dtype, copy=False))
        return self._storages[key]

    def _load_build(self):
        target, state = self.stack[-2], self.stack[-1]
        if type(target) not in (dict, collections.OrderedDict) or not isinstance(state, dict):
            _refuse(f"BUILD (setting state) on a {type(target).__name__}")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build


def _read_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pickles:
            if any(n.endswith("constants.pkl") for n in names):
                raise ValueError(f"{path} is a TorchScript archive; save the module's "
                                 f"state_dict() with torch.save instead")
            raise ValueError(f"{path} is a zip file without a data.pkl: not a torch.save file")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = archive.read(f"{prefix}byteorder").decode("ascii").strip()
            if byteorder not in ("little", "big"):
                raise ValueError(f"{path}: unknown byteorder {byteorder!r}")
        unpickler = _RestrictedUnpickler(archive.read(pickles[0]), archive, prefix, byteorder)
        return unpickler.load()


def _read_legacy(path: str) -> Any:
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"{path} is in PyTorch's legacy (pre-1.6, non-zip) format, which kdface reads only "
            f"through PyTorch: install torch, or re-save it with torch>=1.6 "
            f"(torch.save(torch.load(path), path))") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # PyTorch's restricted loader refused a global
        raise UnsafeTorchPickleError(f"{path}: PyTorch's weights-only loader refused it ({err}); "
                                     f"this file may be malicious and was not loaded") from None
    return _tensors_to_numpy(obj, torch)


def _tensors_to_numpy(obj, torch):
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
        return (obj.float() if obj.dtype == torch.bfloat16 else obj).numpy()
    if isinstance(obj, dict):
        return {k: _tensors_to_numpy(v, torch) for k, v in obj.items()}
    return obj


def _state_dict_of(obj: Any, path: str) -> dict[str, np.ndarray]:
    """The tensors of a loaded object: a state dict, or the backbone's one inside a checkpoint
    dict (arcface_torch's resume file ``checkpoint_gpu_<rank>.pt`` keeps it under
    ``state_dict_backbone``, next to the classifier's, the optimizer's and the scheduler's)."""
    if isinstance(obj, dict) and not any(isinstance(v, np.ndarray) for v in obj.values()):
        for key in ("state_dict_backbone", "state_dict", "model", "backbone", "module"):
            if isinstance(obj.get(key), dict):
                return _state_dict_of(obj[key], path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ValueError(f"{path}: state dict key {key!r} is not a string")
        if not isinstance(value, np.ndarray):
            continue  # e.g. an epoch counter stored beside the tensors
        if value.dtype.kind == "O":
            raise ValueError(f"{path}: tensor {key} has object dtype")
        # DataParallel / DistributedDataParallel prefix every key with 'module.'.
        out[key[len("module."):] if key.startswith("module.") else key] = value
    if not out:
        keys = sorted(str(k) for k in obj)[:12]
        raise ValueError(f"{path} holds no tensors at its top level and no backbone state dict "
                         f"under 'state_dict_backbone', 'state_dict', 'model', 'backbone' or "
                         f"'module' (its keys: {keys}); save the backbone's state_dict() with "
                         f"torch.save")
    return out


def read_torch_state_dict(path) -> dict[str, np.ndarray]:
    """Reads a ``torch.save``'d state dict as ``{name: np.ndarray}`` without running its pickle.

    path: a ``.pth`` / ``.pt`` file written by ``torch.save(module.state_dict(), path)``, or a
    checkpoint dict holding one under ``state_dict_backbone`` (arcface_torch's
    ``checkpoint_gpu_<rank>.pt``; its optimizer and scheduler states are read but not returned)
    / ``state_dict`` / ``model`` / ``backbone``. Tensors keep
    their shapes and dtypes, except bfloat16, returned as float32. A ``module.`` prefix
    (DataParallel) is stripped. Raises :class:`UnsafeTorchPickleError` (nothing executed) when the
    pickle names any global outside the state-dict vocabulary, ``ValueError`` for malformed files.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PyTorch file {path} not found")
    if zipfile.is_zipfile(path):
        try:
            obj = _read_zip(path)
        except UnsafeTorchPickleError as err:
            raise UnsafeTorchPickleError(f"{path}: {err}. This file may be malicious and was "
                                         f"not loaded.") from None
        except (ValueError, FileNotFoundError):
            raise
        except Exception as err:  # noqa: BLE001 - the pure-Python unpickler raises many kinds
            raise ValueError(f"{path} is not a readable PyTorch state dict: {err}") from err
    else:
        obj = _read_legacy(path)
    state = _state_dict_of(obj, path)
    return {k: (v.astype(np.float32) if v.dtype.name == "bfloat16" else v)
            for k, v in state.items()}
