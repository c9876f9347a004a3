"""Compiled for a TPU topology from this CPU host, kdface's trace-time choices take the TPU
formulations (issue 23): `make test` installs libtpu in <venv>/tpu-site (.ci/install-libtpu) and
this test runs the compile in a subprocess with it on PYTHONPATH (kept off the venv's own path,
where every `import jax` without a TPU would try to start it)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_SITE = os.path.join(sys.prefix, "tpu-site")


@pytest.fixture(scope="module")
def compiled():
    if not os.path.isdir(os.path.join(TPU_SITE, "libtpu")):
        pytest.fail(f"libtpu is not installed in {TPU_SITE}: `make test` installs it "
                    f"(.ci/install-libtpu {sys.executable})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TPU_SITE]), "JAX_PLATFORMS": "cpu",
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}  # other tests compile for a TPU at the same time
    env.pop("XLA_FLAGS", None)  # CPU-only flags (ISA caps, device counts) mean nothing here
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "tpu_compile_worker.py"),
                           "v5e:2x2"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_topology_is_a_tpu_slice(compiled):
    assert compiled["platform"] == "tpu" and compiled["devices"] == 4
    assert compiled["flops"] > 0 and compiled["argument_bytes"] > 0


def test_depthwise_convolution_is_xla_s_for_the_tpu(compiled):
    # For the host, kdface's CPU formulation: its own gradient, not XLA's convolution transpose.
    assert compiled["host_depthwise"] != compiled["xla_depthwise"]
    # For the TPU mesh, exactly the program plain lax.conv_general_dilated lowers to.
    assert compiled["tpu_depthwise"] == compiled["xla_depthwise"]


def test_soft_losses_are_not_row_blocked_for_the_tpu(compiled):
    assert compiled["host_soft"].get("stablehlo.dynamic_slice", 0) > 0  # the CPU row blocks
    assert compiled["tpu_soft"].get("stablehlo.dynamic_slice", 0) == 0


def test_the_margin_head_normalizes_its_weight_first_for_the_tpu(compiled):
    # models/_heads.py, the weight's gradient: for the host the column norms are a product with
    # a row of ones that scales the product after it (2 products forward, their 2 transposes
    # backward); for the TPU the columns are normalized first (1 and 1)
    assert compiled["host_head"].get("stablehlo.dot_general", 0) == 4
    assert compiled["tpu_head"].get("stablehlo.dot_general", 0) == 2
