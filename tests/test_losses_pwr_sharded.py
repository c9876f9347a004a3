"""PWR across 4 CPU devices (jax.shard_map over 'data'): equals the single-device loss and
gradient (Nikitin et al. 2020 eq. 3 on the global batch)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from kdface.losses import pwr_loss, pwr_loss_sharded

DATA = PartitionSpec("data")


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) >= 4, "tests/conftest.py provides 4 CPU devices"
    return jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))


def _batch(n: int = 16):
    rng = np.random.default_rng(0)
    s = rng.normal(size=(n, 8)).astype(np.float32)
    t = rng.normal(size=(n, 6)).astype(np.float32)
    t[1] = t[0]                                   # teacher ties across the device boundary...
    t[n // 4 + 1] = t[0]                          # ...and inside another device's rows
    return jnp.asarray(s), jnp.asarray(t)


@pytest.mark.parametrize("method,inversion,margin,relation", [
    ("dense", "exp", "teacher_diff", "cosine"), ("tiled", "ranknet", "teacher_std", "euclidean"),
    ("sorted", "diff", "const", "cosine")])
def test_sharded_equals_single_device(mesh, method, inversion, margin, relation):
    kw = dict(method=method, inversion=inversion, margin=margin, relation=relation,
              margin_value=0.1 if margin == "const" else 0.0)
    s, t = _batch()
    sharded = jax.shard_map(lambda a, b: pwr_loss_sharded(a, b, **kw), mesh=mesh,
                            in_specs=(DATA, DATA), out_specs=PartitionSpec())
    value, grad = jax.jit(jax.value_and_grad(sharded))(s, t)
    value0, grad0 = jax.jit(jax.value_and_grad(lambda a, b: pwr_loss(a, b, **kw)))(s, t)
    np.testing.assert_allclose(float(value), float(value0), rtol=1e-6)
    tol = 1e-5 * float(jnp.abs(grad0).max())
    np.testing.assert_allclose(np.asarray(grad), np.asarray(grad0), rtol=1e-5, atol=tol)
    # jax.grad inside shard_map w.r.t. the local shard is already the local slice.
    local_grad = jax.shard_map(
        lambda a, b: jax.grad(lambda a_: pwr_loss_sharded(a_, b, **kw))(a), mesh=mesh,
        in_specs=(DATA, DATA), out_specs=DATA)
    np.testing.assert_allclose(np.asarray(jax.jit(local_grad)(s, t)), np.asarray(grad0),
                               rtol=1e-5, atol=tol)


def test_sharded_auto_and_errors(mesh):
    s, t = _batch(24)
    sharded = jax.shard_map(lambda a, b: pwr_loss_sharded(a, b), mesh=mesh,
                            in_specs=(DATA, DATA), out_specs=PartitionSpec())
    np.testing.assert_allclose(float(jax.jit(sharded)(s, t)), float(pwr_loss(s, t)), rtol=1e-6)
    for kwargs, err, match in (({"inversion": "hinge"}, ValueError, "inversion"),
                               ({"method": "fast"}, ValueError, "method"),
                               ({"beta": 0.0}, ValueError, "beta")):
        bad = jax.shard_map(lambda a, b, kw=kwargs: pwr_loss_sharded(a, b, **kw), mesh=mesh,
                            in_specs=(DATA, DATA), out_specs=PartitionSpec())
        with pytest.raises(err, match=match):
            jax.jit(bad)(s, t)
    mismatched = jax.shard_map(lambda a, b: pwr_loss_sharded(a, b[:-1]), mesh=mesh,
                               in_specs=(DATA, DATA), out_specs=PartitionSpec())
    with pytest.raises(ValueError, match="same number of rows"):
        jax.jit(mismatched)(s, t)
    with pytest.raises(TypeError, match="floating"):
        jax.jit(sharded)(s.astype(jnp.int32), t)
