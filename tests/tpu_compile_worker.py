"""Subprocess of tests/test_platform_tpu.py: compiles kdface functions for a TPU topology from
this CPU host (libtpu on PYTHONPATH, see .ci/install-libtpu) and prints what it found as JSON."""
import json
import os
import re
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from kdface._platform import compiling_for  # noqa: E402
from kdface.losses import _logit  # noqa: E402
from kdface.models import MarginHead, _conv  # noqa: E402

topology = sys.argv[1]
devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
mesh = Mesh(np.asarray(devices).reshape(-1), ("data",))
n = len(devices)


def ops(text: str) -> dict[str, int]:
    found = {}
    for op in re.findall(r"\b(stablehlo\.[a-z_]+|func\.call|custom_call)\b", text):
        found[op] = found.get(op, 0) + 1
    return found


def depthwise_grad(x, w):
    conv = lambda x, w: _conv.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=8)
    return jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))(x, w)


def xla_depthwise_grad(x, w):
    conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=8)
    return jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))(x, w)


def soft(s, t):
    return _logit._row_blocked(lambda a, b: (a.sum(1), b.sum(1), a.max(1)), s, t)


head_def, head_state = nnx.split(MarginHead(16, 8 * n, rngs=nnx.Rngs(0)))


def head_grad():
    # a new function each time: jit's trace cache is keyed on the function and the arguments,
    # not on kdface's target platform, so a second lowering of the same one reused the first
    return jax.jit(lambda state, e: jax.grad(
        lambda st: jnp.sum(nnx.merge(head_def, st)(e)))(state))


emb = jax.ShapeDtypeStruct((2 * n, 16), jnp.float32, sharding=NamedSharding(mesh, P()))
x = jax.ShapeDtypeStruct((2 * n, 8, 8, 8), jnp.float32, sharding=NamedSharding(mesh, P("data")))
w = jax.ShapeDtypeStruct((3, 3, 1, 8), jnp.float32, sharding=NamedSharding(mesh, P()))
rows = 4 * _logit.SOFT_ROW_BLOCK_ELEMENTS // 1024
z = jax.ShapeDtypeStruct((rows, 1024), jnp.float32, sharding=NamedSharding(mesh, P()))
out = {"devices": n, "platform": devices[0].platform}
# Traced for the host (what kdface did before: jax.default_backend() answers 'cpu' here).
out["host_depthwise"] = ops(jax.jit(lambda a, b: depthwise_grad(a, b)).lower(x, w).as_text())
out["host_soft"] = ops(jax.jit(lambda a, b: soft(a, b)).lower(z, z).as_text())
out["host_head"] = ops(head_grad().lower(head_state, emb).as_text())
with compiling_for(mesh):
    lowered = jax.jit(lambda a, b: depthwise_grad(a, b)).lower(x, w)
    out["tpu_depthwise"] = ops(lowered.as_text())
    compiled = lowered.compile()
    out["tpu_soft"] = ops(jax.jit(lambda a, b: soft(a, b)).lower(z, z).as_text())
    out["tpu_head"] = ops(head_grad().lower(head_state, emb).as_text())
out["xla_depthwise"] = ops(jax.jit(xla_depthwise_grad).lower(x, w).as_text())
memory = compiled.memory_analysis()
out["argument_bytes"] = int(memory.argument_size_in_bytes)
out["flops"] = float(compiled.cost_analysis().get("flops", 0.0))
print(json.dumps(out))
