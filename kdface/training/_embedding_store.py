"""The teacher cache's storage: per-record embeddings on disk, memory-mapped, written atomically.

At the users' scale a cache of teacher *logits* cannot exist (MS1M: 5.8 M records x 2 flips x
85 k classes x 4 bytes = 4 TB). Logits are a function of the embedding (the teacher's head), so
only embeddings are stored: ``[N, 2, E]`` (axis 1 = as stored, horizontally flipped) in float16
by default (MS1M at E = 512: 11.9 GB, read through the page cache, never loaded whole).

Layout of a store directory ``<root>/<key>/``: ``embedding.npy`` (a standard ``.npy`` file,
opened with ``np.load(mmap_mode='r')``) and ``meta.json`` (shape, dtype, the key's description).
A store is built in ``<root>/<key>.partial/`` and renamed into place only when every row is
written, so a kill at any moment leaves either the finished store or a partial one; the partial
one records how many rows are done (``progress.json``, written after the rows are flushed) and
the next build continues from there. A finished store whose file does not have the size its
header promises (truncated by a full disk, a copy cut short) is refused by name
(``BadStoreError``) and rebuilt by the caller.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np

DTYPES = {"float16": np.float16, "float32": np.float32}


class BadStoreError(RuntimeError):
    """A cache file exists but cannot be trusted; the message names the file and the fix,
    ``problem`` the file and what is wrong with it."""

    def __init__(self, path: str, problem: str, directory: str):
        super().__init__(f"teacher cache {path} {problem}; delete {directory} to rebuild it")
        self.problem = f"{path} {problem}"


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, value: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_store(directory: str) -> np.ndarray:
    """The finished store in ``directory`` as a read-only memory map ``[N, 2, E]``.

    Raises ``FileNotFoundError`` when there is none and ``BadStoreError`` when its files are
    damaged (size or shape not what ``meta.json`` and the ``.npy`` header say).
    """
    meta_path = os.path.join(directory, "meta.json")
    path = os.path.join(directory, "embedding.npy")
    if not os.path.exists(meta_path) or not os.path.exists(path):
        raise FileNotFoundError(f"no teacher cache in {directory}")
    meta = _read_json(meta_path)
    if meta is None:
        raise BadStoreError(meta_path, "is unreadable", directory)
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise BadStoreError(path, f"is damaged ({e})", directory) from None
    expected = tuple(meta["shape"])
    if array.shape != expected or str(array.dtype) != meta["dtype"]:
        raise BadStoreError(path, f"holds {array.dtype} {array.shape}, its meta.json says "
                            f"{meta['dtype']} {expected}", directory)
    header = os.path.getsize(path) - array.nbytes
    if header < 0 or header > 4096:
        raise BadStoreError(path, "is truncated", directory)
    return array


def build_store(directory: str, *, num_rows: int, width: int, dtype: str,
                rows: Callable[[int, int], np.ndarray], chunk: int,
                description: dict[str, Any], progress: Callable[[int], None] | None = None
                ) -> np.ndarray:
    """Builds (or finishes building) the store in ``directory`` and returns it memory-mapped.

    ``rows(start, stop)`` returns float ``[stop - start, 2, width]`` for those records; it is
    called for ``chunk``-sized ranges in order, from where an interrupted build stopped.
    In a multi-host job each process builds the store of the records it reads, in its own
    directory, so no process waits for another.
    """
    if dtype not in DTYPES:
        raise ValueError(f"teacher cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    partial = f"{directory}.partial"
    shape = (int(num_rows), 2, int(width))
    meta = {"shape": list(shape), "dtype": np.dtype(DTYPES[dtype]).name,
            "description": description}
    done = 0
    state = _read_json(os.path.join(partial, "progress.json"))
    path = os.path.join(partial, "embedding.npy")
    if state is not None and state.get("meta") == meta and os.path.exists(path):
        try:
            array = np.load(path, mmap_mode="r+")
            if array.shape == shape:
                done = int(state["done"])
        except (ValueError, OSError):
            done = 0
    if done == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        array = np.lib.format.open_memmap(path, mode="w+", dtype=DTYPES[dtype], shape=shape)
        _write_json(os.path.join(partial, "progress.json"), {"meta": meta, "done": 0})
    if progress is not None and done:
        progress(done)
    for start in range(done, shape[0], chunk):
        stop = min(shape[0], start + chunk)
        values = np.asarray(rows(start, stop))
        if values.shape != (stop - start, 2, shape[2]):
            raise ValueError(f"teacher outputs for records {start}:{stop} have shape "
                             f"{values.shape}, expected {(stop - start, 2, shape[2])}")
        if not np.all(np.isfinite(values)):
            raise FloatingPointError(f"the teacher's embedding of records {start}:{stop} is "
                                     "not finite; check the teacher checkpoint")
        array[start:stop] = values.astype(array.dtype)
        array.flush()
        _write_json(os.path.join(partial, "progress.json"), {"meta": meta, "done": stop})
        if progress is not None:
            progress(stop - start)
    del array
    _write_json(os.path.join(partial, "meta.json"), meta)
    os.remove(os.path.join(partial, "progress.json"))
    _fsync_dir(partial)
    if os.path.exists(directory):  # a damaged finished store being replaced
        shutil.rmtree(directory)
    os.replace(partial, directory)
    _fsync_dir(os.path.dirname(os.path.abspath(directory)))
    return open_store(directory)
