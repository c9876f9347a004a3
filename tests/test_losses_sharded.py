"""Batch-global relational losses over 4 CPU devices equal the single-device losses."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from kdface.losses import _sharded
from kdface.losses._mmd import mk_mmd
from kdface.losses._relational import darkrank_hard_loss, rkd_angle_loss, rkd_distance_loss

# (sharded name, single-device loss, options, student N, teacher N, teacher D)
CASES = [
    ("rkd_distance", rkd_distance_loss, {"reduction": "sum"}, 12, 12, 3),
    ("rkd_angle", rkd_angle_loss, {"block_size": 2}, 12, 12, 3),
    ("darkrank_hard", darkrank_hard_loss, {}, 12, 12, 3),
    ("darkrank_hard", darkrank_hard_loss, {"list_length": 4, "beta": 2.0}, 8, 8, 3),
    ("mk_mmd", mk_mmd, {}, 12, 8, 5),
    ("mk_mmd", mk_mmd, {"estimator": "unbiased", "normalize": False}, 8, 12, 5),
    ("mk_mmd", mk_mmd, {"estimator": "linear"}, 16, 16, 5),
]
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]


@functools.cache
def data_mesh():
    return jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))


def _inputs(n_s, n_t, d_t, seed=0):
    rng = np.random.default_rng(seed)
    s = jnp.asarray(rng.normal(size=(n_s, 5)) * 0.5, jnp.float32)
    t = jnp.asarray(rng.normal(size=(n_t, d_t)) * 0.5 + 0.3, jnp.float32)
    return s, t


@pytest.mark.parametrize("name,loss,options,n_s,n_t,d_t", CASES, ids=IDS)
def test_value_and_gradient_equal_single_device(name, loss, options, n_s, n_t, d_t):
    s, t = _inputs(n_s, n_t, d_t)
    mesh = data_mesh()
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    s_sharded, t_sharded = jax.device_put(s, sharding), jax.device_put(t, sharding)

    def global_loss(a, b):
        return _sharded.sharded_relational_loss(name, a, b, mesh=mesh, **options)

    value, grad = jax.jit(jax.value_and_grad(global_loss))(s_sharded, t_sharded)
    want_value, want_grad = jax.jit(jax.value_and_grad(
        functools.partial(loss, **options)))(s, t)
    np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-6)
    scale = float(jnp.max(jnp.abs(want_grad)))
    assert scale > 0
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("name,loss", [("rkd_angle", rkd_angle_loss),
                                       ("darkrank_hard", darkrank_hard_loss)])
def test_grad_inside_shard_map_is_local_slice_of_global_gradient(name, loss):
    """A train step differentiates inside shard_map: no extra psum is needed."""
    s, t = _inputs(12, 12, 3, seed=1)
    fn = _sharded.SHARDED_LOSSES[name]
    spec = PartitionSpec("data")

    def per_device(a, b):
        value, grad = jax.value_and_grad(functools.partial(fn, axis_name="data"))(a, b)
        return value, grad

    value, grad = jax.jit(jax.shard_map(per_device, mesh=data_mesh(), in_specs=(spec, spec),
                                        out_specs=(PartitionSpec(), spec)))(s, t)
    want_value, want_grad = jax.jit(jax.value_and_grad(loss))(s, t)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_global_batch_differs_from_mean_of_local_losses():
    """Guards the point of the module: a per-shard loss would be a different loss."""
    s, t = _inputs(12, 12, 3, seed=2)
    global_value = _sharded.sharded_relational_loss("rkd_angle", s, t, mesh=data_mesh())
    local_loss = jax.jit(rkd_angle_loss)
    local_mean = np.mean([float(local_loss(s[i:i + 3], t[i:i + 3])) for i in (0, 3, 6, 9)])
    np.testing.assert_allclose(global_value, local_loss(s, t), rtol=1e-5)
    assert abs(float(global_value) - local_mean) > 1e-3


def test_bad_inputs():
    s, t = _inputs(12, 12, 3)
    mesh = data_mesh()
    with pytest.raises(ValueError, match="loss_name"):
        _sharded.sharded_relational_loss("pwr", s, t, mesh=mesh)
    with pytest.raises(ValueError, match="not divisible"):
        _sharded.sharded_relational_loss("rkd_distance", s[:10], t[:10], mesh=mesh)
    with pytest.raises(ValueError, match="even number of rows per device"):
        _sharded.sharded_relational_loss("mk_mmd", s, s, mesh=mesh, estimator="linear")
    with pytest.raises(ValueError, match="reduction"):
        _sharded.sharded_relational_loss("darkrank_hard", s, t, mesh=mesh, reduction=None)
    with pytest.raises(TypeError, match="floating"):
        _sharded.sharded_relational_loss("rkd_angle", s.astype(jnp.int32), t, mesh=mesh)
    with pytest.raises(ValueError, match="N=3"):
        _sharded.sharded_relational_loss("rkd_angle", s[:1], t[:1],
                                         mesh=jax.make_mesh((1,), ("data",),
                                                            axis_types=(AxisType.Auto,)))
