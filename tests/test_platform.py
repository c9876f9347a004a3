"""Trace-time formulation choices follow the target platform, not the host (issue 23).

Compiled from a CPU host for a TPU mesh, ``jax.default_backend()`` says 'cpu'; the three choices
below must then take their accelerator formulations. Each is checked on the jaxpr it traces.
"""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from kdface._platform import compiling_for, target_platform
from kdface.losses import _logit, _relational
from kdface.models import _conv


def test_the_target_defaults_to_the_host_and_follows_the_context():
    assert target_platform() == "cpu"
    with compiling_for("tpu"):
        assert target_platform() == "tpu"
        with compiling_for("cuda"):
            assert target_platform() == "gpu"
        assert target_platform() == "tpu"
    assert target_platform() == "cpu"
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    with compiling_for(mesh) as got:
        assert got == "cpu"
    with pytest.raises(ValueError, match="target platform must be one of"):
        with compiling_for("npu"):
            pass


def _primitives(fn, *args) -> set[str]:
    """The primitives of a fresh trace (a new wrapper: jax caches traces per function, and the
    target platform is not part of the key)."""
    jaxpr = jax.make_jaxpr(lambda *a: fn(*a))(*args)

    def walk(j):
        for eqn in j.eqns:
            yield eqn.primitive.name
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from walk(sub)
    return set(walk(jaxpr.jaxpr))


def test_depthwise_conv_is_left_to_xla_for_a_tpu():
    x = jnp.ones((2, 8, 8, 4))
    w = jnp.ones((3, 3, 1, 4))

    def conv(x, w):
        return _conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                          feature_group_count=4)
    assert "custom_vjp_call" in _primitives(conv, x, w)  # the CPU formulation's own gradient
    with compiling_for("tpu"):
        assert _primitives(conv, x, w) == {"conv_general_dilated"}


def test_soft_losses_and_angle_tiles_are_whole_for_a_tpu():
    n, c = 64, _logit.SOFT_ROW_BLOCK_ELEMENTS // 8  # 8 rows per CPU block
    s = jnp.zeros((n, c))
    fn = lambda a, b: _logit._row_blocked(lambda x, y: (x.sum(1), y.sum(1), x.max(1)), a, b)
    assert "dynamic_slice" in _primitives(fn, s, s)  # blocks of rows
    with compiling_for("tpu"):
        assert "dynamic_slice" not in _primitives(fn, s, s)
        assert _relational.angle_tile_rows(10_000) == 10_000
    assert _relational.angle_tile_rows(10_000) == min(10_000, _relational.ANGLE_TILE_ROWS)
