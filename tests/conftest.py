"""Test-wide JAX settings: forced CPU devices and strict rank promotion (docs/CONTRIBUTING.md).

These must run before any JAX computation touches a device, which is why they live at import
time of the conftest rather than in a fixture.

The number of CPU devices is 4 unless the environment says otherwise, so that the tests marked
``shards`` can be run on 1 and 8 devices too (``make test-numerics``): it is read from
``KDFACE_TEST_DEVICES`` or from ``--xla_force_host_platform_device_count=N`` in ``XLA_FLAGS``
(the XLA flag and ``jax_num_cpu_devices`` must agree, so the flag wins when both are given).
Sharded tests build their mesh over ``jax.devices()`` and use sizes divisible by 8.
"""
import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

_flag = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
N_DEVICES = int(_flag.group(1)) if _flag else int(os.environ.get("KDFACE_TEST_DEVICES", "4"))
if N_DEVICES < 1:
    raise SystemExit(f"the forced CPU device count must be >= 1, got {N_DEVICES}")

jax.config.update("jax_num_cpu_devices", N_DEVICES)
jax.config.update("jax_numpy_rank_promotion", "raise")
# Random initializers compile once per parameter shape; threefry's take ~10x longer to compile
# on CPU than rbg's, which dominated model-building tests. Values differ, determinism does not.
jax.config.update("jax_default_prng_impl", "rbg")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "shards: builds a mesh over every forced CPU device; run by make test-numerics "
        "with 1 and 8 devices as well as the default 4")


@pytest.fixture(scope="session")
def n_devices() -> int:
    """How many CPU devices this run forces (4 by default)."""
    return N_DEVICES
