"""Argument checks shared by every loss (check at the door: docs/CONTRIBUTING.md).

Each helper raises ``TypeError`` for a wrong dtype and ``ValueError`` for a wrong shape or option,
with a message that names the argument, what was expected and what was given.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np


def check_float(name: str, x: Any) -> None:
    """Raises TypeError unless ``x`` is an array of a floating dtype (bf16/f16/f32/f64)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        raise TypeError(f"{name} must be a floating-point array, got {type(x).__name__}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {dtype}")


def check_rank(name: str, x: Any, rank: int, shape_doc: str) -> None:
    """Raises ValueError unless ``x.ndim == rank``; ``shape_doc`` is e.g. ``'[N, D]'``."""
    if np.ndim(x) != rank:
        raise ValueError(f"{name} must have shape {shape_doc} (rank {rank}), "
                         f"got shape {tuple(np.shape(x))}")


def check_embeddings(name: str, x: Any, *, min_n: int = 1) -> None:
    """Checks a float ``[N, D]`` embedding matrix with at least ``min_n`` rows."""
    check_float(name, x)
    check_rank(name, x, 2, "[N, D]")
    if x.shape[0] < min_n:
        raise ValueError(f"{name} needs at least N={min_n} rows for this loss, got N={x.shape[0]}")


def check_same_rows(name_a: str, a: Any, name_b: str, b: Any) -> None:
    """Raises ValueError unless ``a`` and ``b`` have the same leading (batch) size."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b} must have the same number of rows N, "
                         f"got {a.shape[0]} and {b.shape[0]}")


def check_same_shape(name_a: str, a: Any, name_b: str, b: Any) -> None:
    """Raises ValueError unless ``a.shape == b.shape``."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{name_a} and {name_b} must have the same shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


def check_option(name: str, value: Any, allowed: Iterable[str]) -> None:
    """Raises ValueError unless ``value`` is one of the ``allowed`` option strings."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_labels(name: str, labels: Any, n: int) -> None:
    """Checks integer class labels of shape ``[n]``."""
    dtype = getattr(labels, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array of class ids, got dtype {dtype}")
    if np.ndim(labels) != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape [N]=[{n}], got {tuple(np.shape(labels))}")


def check_positive(name: str, value: float) -> None:
    """Raises ValueError unless the Python number ``value`` is > 0."""
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def compute_dtype(*arrays: Any) -> jnp.dtype:
    """float32 for half-precision inputs (losses accumulate in f32), else the inputs' dtype."""
    dtype = jnp.result_type(*arrays)
    if jnp.finfo(dtype).bits < 32:
        return jnp.dtype(jnp.float32)
    return dtype
