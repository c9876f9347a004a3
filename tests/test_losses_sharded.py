"""Batch-global relational losses over 4 CPU devices equal the single-device losses.

Float comparisons follow the one tolerance rule (tests/_tolerance.py). Values: the sharded float32
loss against the float64 loops of test_losses_relational.py / test_losses_mmd.py, bounded as there
(the same helpers), plus the psum of the 4 devices' partial sums. Gradients: sharded against
single-device float32 (no float64 gradient loop at these sizes), twice the bound of
test_losses_relational's gradient rule (each side carries its own rounding).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from _tolerance import assert_close
from test_losses_mmd import (MULTS, _normalized, _terms_scale as _mmd_terms_scale, ref_mmd,
                             ref_sigma2)
from test_losses_relational import (_darkrank_terms_scale, _rkd_angle_terms_scale,
                                    _rkd_distance_terms_scale, ref_darkrank, ref_rkd_angle,
                                    ref_rkd_distance)
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
DEVICES = 4


def _reference(name, options, s, t):
    """(float64 value, its bound in eps-units, (gradient terms, scale: a function of
    max|grad|))."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    n = len(s)
    if name == "mk_mmd":
        kw = {k: v for k, v in options.items() if k in ("normalize", "estimator")}
        value = ref_mmd(s, t, **kw)
        terms, scale = _mmd_terms_scale(s, t, normalize=options.get("normalize", True))
        # As test_losses_mmd's gradient: N + M + 2D terms of the MMD's scale times the kernel
        # coefficient 1 / (2 sigma^2 min(mults)).
        sigma2 = ref_sigma2(*_normalized(s, t, options.get("normalize", True)))
        return value, terms * scale, (len(s) + len(t) + 2 * s.shape[1],
                                      lambda g: max(scale / (2 * sigma2 * min(MULTS)), g))
    if name == "rkd_distance":
        value = ref_rkd_distance(s, t, reduction=options.get("reduction", "mean"))
        terms, scale = _rkd_distance_terms_scale(s, t, reduction=options.get("reduction", "mean"))
        n_terms = n * (n - 1)
    elif name == "rkd_angle":
        value = ref_rkd_angle(s, t)
        terms, scale = _rkd_angle_terms_scale(s, t)
        n_terms = n * (n - 1) * (n - 2)
    else:
        kw = {k: v for k, v in options.items() if k in ("list_length", "beta")}
        value = ref_darkrank(s, t, **kw)
        terms, scale = _darkrank_terms_scale(s, t, **kw)
        n_terms = n * kw.get("list_length", n - 1)
    # test_losses_relational._grad_close: sqrt(n_terms) for the sum of the terms' derivatives
    # plus the relative error R = bound / |value| the terms carry.
    units = math.sqrt(n_terms) + terms * scale / abs(value)
    return value, terms * scale, (1, lambda g: units * g)


def _assert_value(value, ref_value, value_bound, what=""):
    # + the psum of the 4 devices' partial sums: 4 more roundings of magnitude |value|.
    assert_close(float(value), ref_value, terms=1,
                 scale=value_bound + DEVICES * abs(ref_value), what=what)


def _assert_grad(grad, want_grad, grad_bound, what=""):
    terms, scale_of = grad_bound
    largest = float(np.abs(np.asarray(want_grad)).max())
    assert largest > 0
    # float32 vs float32: both sides' bound; + the psum's 4 roundings.
    assert_close(np.asarray(grad), np.asarray(want_grad), terms=2 * terms + DEVICES,
                 scale=scale_of(largest), what=what)


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
    ref_value, value_bound, grad_bound = _reference(name, options, s, t)
    _assert_value(value, ref_value, value_bound, "sharded value: ")
    _assert_value(want_value, ref_value, value_bound, "single value: ")
    _assert_grad(grad, want_grad, grad_bound, "grad: ")


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
    ref_value, value_bound, grad_bound = _reference(name, {}, s, t)
    _assert_value(value, ref_value, value_bound, "value: ")
    _assert_grad(grad, want_grad, grad_bound, "grad: ")


def test_global_batch_differs_from_mean_of_local_losses():
    """Guards the point of the module: a per-shard loss would be a different loss."""
    s, t = _inputs(12, 12, 3, seed=2)
    global_value = _sharded.sharded_relational_loss("rkd_angle", s, t, mesh=data_mesh())
    local_loss = jax.jit(rkd_angle_loss)
    local_mean = np.mean([float(local_loss(s[i:i + 3], t[i:i + 3])) for i in (0, 3, 6, 9)])
    ref_value, value_bound, _ = _reference("rkd_angle", {}, s, t)
    _assert_value(global_value, ref_value, value_bound)
    # Not a rounding tolerance: the per-shard mean is another loss, ~1e-2 away here.
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
