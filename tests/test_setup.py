"""The test environment itself: the settings conftest.py promises are in force."""
import jax
import jax.numpy as jnp
import pytest


def test_forced_cpu_devices(n_devices):
    """4 unless KDFACE_TEST_DEVICES / XLA_FLAGS ask for another count (make test-numerics)."""
    assert jax.device_count() == n_devices
    assert all(d.platform == "cpu" for d in jax.devices())


def test_rank_promotion_is_strict():
    with pytest.raises(ValueError, match="rank"):
      jnp.ones((3, 2)) + jnp.ones((2,))
