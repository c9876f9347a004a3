"""Test-wide JAX settings: four CPU devices and strict rank promotion (docs/CONTRIBUTING.md).

These must run before any JAX computation touches a device, which is why they live at import
time of the conftest rather than in a fixture.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_rank_promotion", "raise")
# Random initializers compile once per parameter shape; threefry's take ~10x longer to compile
# on CPU than rbg's, which dominated model-building tests. Values differ, determinism does not.
jax.config.update("jax_default_prng_impl", "rbg")
