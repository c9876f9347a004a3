"""Test helpers for kdface.models: build networks with cheap, deterministic parameters.

Random initialisation compiles one XLA program per parameter shape, which costs about a second of
CPU each on the shared test machine; tests that only need *some* fixed weights (shapes, forward
equalities, adapters) fill an abstract model with NumPy values instead.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdface.models import create


def abstract_model(name: str, **kwargs):
    """``nnx.eval_shape`` of ``create(name, ...)``: shapes only, nothing allocated (cached; do
    not mutate the result)."""
    kwargs.setdefault("input_size", (112, 112))
    return _abstract(name, tuple(sorted(kwargs.items())))


@functools.lru_cache(maxsize=None)
def _abstract(name, items):
    return nnx.eval_shape(lambda: create(name, rngs=nnx.Rngs(0), **dict(items)))


def materialize(module, seed: int = 0):
    """Gives every variable of an abstract ``module`` concrete NumPy-generated values (in place).

    Kernels ~ N(0, 0.5 / fan_in) (keeps deep BN-free residual stacks finite), biases ~ N(0, 0.1),
    BN scale U(0.5, 1.5), BN running mean N(0, 0.1) and var U(0.5, 1.5), PReLU slopes 0.25.
    """
    rng = np.random.default_rng(seed)
    for path, node in nnx.iter_graph(module):
        if not isinstance(node, nnx.Variable):
            continue
        name, shape = str(path[-1]), tuple(node.shape)
        if name == "kernel":
            value = rng.normal(0.0, np.sqrt(0.5 / max(1, int(np.prod(shape[:-1])))), shape)
        elif name == "alpha":
            value = np.full(shape, 0.25)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name in ("bias", "mean", "weight"):
            value = rng.normal(0.0, 0.1, shape)
        else:
            raise ValueError(f"no fill rule for variable {path}")
        node.set_value(jnp.asarray(value, jnp.float32))
    return module


def concrete_model(name: str, seed: int = 0, **kwargs):
    """A fresh network with :func:`materialize` d weights, in eval mode."""
    model = materialize(nnx.eval_shape(lambda: create(name, rngs=nnx.Rngs(0), **kwargs)), seed)
    model.eval()
    return model
