"""The teacher cache's on-disk store: memory-mapped, atomic, resumable, damage named."""
from __future__ import annotations

import os

import numpy as np
import pytest

from kdface.training._embedding_store import BadStoreError, build_store, open_store


def _rows_fn(values, calls):
    def rows(start, stop):
        calls.append((start, stop))
        return values[start:stop]
    return rows


def _values(n=50, width=6, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 2, width)).astype(np.float32) * 5


def test_build_then_open_memory_mapped(tmp_path):
    values, calls = _values(), []
    store = build_store(str(tmp_path / "k"), num_rows=50, width=6, dtype="float32",
                        rows=_rows_fn(values, calls), chunk=16, description={"t": 1})
    assert isinstance(store, np.memmap) and store.shape == (50, 2, 6)
    np.testing.assert_array_equal(np.asarray(store), values)
    assert calls == [(0, 16), (16, 32), (32, 48), (48, 50)]
    assert not os.path.exists(str(tmp_path / "k") + ".partial")
    again = open_store(str(tmp_path / "k"))
    np.testing.assert_array_equal(np.asarray(again), values)
    # The file is exactly N x 2 x E x itemsize plus the .npy header.
    size = os.path.getsize(tmp_path / "k" / "embedding.npy")
    assert 50 * 2 * 6 * 4 < size <= 50 * 2 * 6 * 4 + 4096


def test_float16_store_size_and_precision(tmp_path):
    values = _values(n=40, width=8)
    store = build_store(str(tmp_path / "h"), num_rows=40, width=8, dtype="float16",
                        rows=lambda a, b: values[a:b], chunk=40, description={})
    assert store.dtype == np.float16
    assert os.path.getsize(tmp_path / "h" / "embedding.npy") <= 40 * 2 * 8 * 2 + 4096
    # float16 keeps 11 significant bits: relative error <= 2^-11 per entry.
    rel = np.abs(np.asarray(store, np.float32) - values) / np.maximum(np.abs(values), 1e-3)
    assert rel.max() <= 2.0 ** -11 + 1e-7


def test_interrupted_build_resumes_where_it_stopped(tmp_path):
    values, calls = _values(), []
    rows = _rows_fn(values, calls)

    def dying(start, stop):
        if start >= 32:
            raise KeyboardInterrupt  # a kill between chunks
        return rows(start, stop)

    with pytest.raises(KeyboardInterrupt):
        build_store(str(tmp_path / "k"), num_rows=50, width=6, dtype="float32", rows=dying,
                    chunk=16, description={"t": 1})
    with pytest.raises(FileNotFoundError):  # nothing half-written is visible as a cache
        open_store(str(tmp_path / "k"))
    calls.clear()
    store = build_store(str(tmp_path / "k"), num_rows=50, width=6, dtype="float32", rows=rows,
                        chunk=16, description={"t": 1})
    assert calls == [(32, 48), (48, 50)]
    np.testing.assert_array_equal(np.asarray(store), values)


def test_partial_of_another_key_is_not_resumed(tmp_path):
    values = _values()
    with pytest.raises(KeyboardInterrupt):
        def dying(start, stop):
            if start:
                raise KeyboardInterrupt
            return values[start:stop] + 100
        build_store(str(tmp_path / "k"), num_rows=50, width=6, dtype="float32", rows=dying,
                    chunk=16, description={"teacher": "old"})
    store = build_store(str(tmp_path / "k"), num_rows=50, width=6, dtype="float32",
                        rows=lambda a, b: values[a:b], chunk=16,
                        description={"teacher": "new"})
    np.testing.assert_array_equal(np.asarray(store), values)


def test_truncated_store_is_named(tmp_path):
    values = _values()
    build_store(str(tmp_path / "k"), num_rows=50, width=6, dtype="float32",
                rows=lambda a, b: values[a:b], chunk=50, description={})
    path = tmp_path / "k" / "embedding.npy"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(BadStoreError, match=r"embedding\.npy.*delete"):
        open_store(str(tmp_path / "k"))


def test_non_finite_teacher_output_refused(tmp_path):
    values = _values()
    values[7, 1, 2] = np.nan
    with pytest.raises(FloatingPointError, match="records 0:16"):
        build_store(str(tmp_path / "k"), num_rows=50, width=6, dtype="float16",
                    rows=lambda a, b: values[a:b], chunk=16, description={})


def test_bad_dtype_refused(tmp_path):
    with pytest.raises(ValueError, match="float16"):
        build_store(str(tmp_path / "k"), num_rows=2, width=2, dtype="bf16",
                    rows=lambda a, b: np.zeros((b - a, 2, 2)), chunk=2, description={})
