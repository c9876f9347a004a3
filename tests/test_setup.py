"""The test environment itself: the settings conftest.py promises are in force."""
import jax
import jax.numpy as jnp
import pytest


def test_four_cpu_devices():
    assert jax.device_count() == 4
    assert all(d.platform == "cpu" for d in jax.devices())


def test_rank_promotion_is_strict():
    with pytest.raises(ValueError, match="rank"):
      jnp.ones((3, 2)) + jnp.ones((2,))
