"""PWR across 4 CPU devices (jax.shard_map over 'data'): equals the single-device loss and
gradient (Nikitin et al. 2020 eq. 3 on the global batch).

Both the sharded and the single-device float32 results are compared with the float64 reference
of test_losses_pwr.py under the one tolerance rule (tests/_tolerance.py): eps32 x reduction
length x the float64 magnitude of each element's terms. The sharded loss adds one psum over the
4 devices to each reduction (+4 terms)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from _tolerance import assert_close
from test_losses_pwr import ref_embeddings_terms64
from kdface.losses import pwr_loss, pwr_loss_sharded

DATA = PartitionSpec("data")
DEVICES = 4


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
    # jax.grad inside shard_map w.r.t. the local shard is already the local slice.
    local_grad = jax.shard_map(
        lambda a, b: jax.grad(lambda a_: pwr_loss_sharded(a_, b, **kw))(a), mesh=mesh,
        in_specs=(DATA, DATA), out_specs=DATA)
    kw64 = {k: v for k, v in kw.items() if k != "method"}
    v64, v_scale, g64, g_scale, count = ref_embeddings_terms64(np.asarray(s), np.asarray(t),
                                                                **kw64)
    n, d = s.shape
    m = n * (n - 1) // 2
    for what, v, g in (("sharded", value, grad), ("single", value0, grad0),
                       ("local grad", None, jax.jit(local_grad)(s, t))):
        if v is not None:
            # The mean of `count` pair terms of scores that are sums of D products (+ the psum).
            assert_close(float(v), v64, terms=count + 2 * d + DEVICES, scale=v_scale,
                         what=f"{what} value: ")
        # Gradient (i, c): a score's slopes over its <= M - 1 ordered pairs, the N - 1 scores of
        # row i, the normalization's D, the psum; per-element scale from the float64 terms.
        assert_close(np.asarray(g), g64, terms=m + n + d + DEVICES, scale=g_scale,
                     what=f"{what} grad: ")

def test_sharded_auto_and_errors(mesh):
    s, t = _batch(24)
    sharded = jax.shard_map(lambda a, b: pwr_loss_sharded(a, b), mesh=mesh,
                            in_specs=(DATA, DATA), out_specs=PartitionSpec())
    v64, v_scale, _, _, count = ref_embeddings_terms64(np.asarray(s), np.asarray(t))
    for what, v in (("sharded", jax.jit(sharded)(s, t)), ("single", pwr_loss(s, t))):
        assert_close(float(v), v64, terms=count + 2 * s.shape[1] + DEVICES, scale=v_scale,
                     what=f"{what} auto: ")
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
