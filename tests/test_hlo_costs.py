"""The per-op costs of a compiled TPU program (kdface/training/_hlo_costs.py, issue 23 item 5):
flops read from the optimized HLO equal the compiler's own count, every costly op carries the
compiler's cycles and the source line that made it, and the plan's step time comes from the
estimate it names. The programs are compiled for v5e with libtpu in a subprocess (libtpu on
jax's path makes every other `import jax` here try to start a TPU)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from kdface.training._compile import CHIPS, CompiledStep, clock_hz, estimate
from kdface.training._hlo_costs import _valid_taps, bound

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_SITE = os.path.join(sys.prefix, "tpu-site")

# what each compiled program starts with: libtpu on the path, one v5e chip to compile for
PRELUDE = textwrap.dedent("""
    import json, os, sys
    sys.path.append(os.path.join(sys.prefix, "tpu-site"))
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_platforms", "cpu")
    from jax import lax
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from kdface.training._hlo_costs import entry_costs, top_ops, total_cycles
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    one = NamedSharding(Mesh(np.asarray(devices[:1]), ("d",)), P())
""")
# a 3x3 SAME convolution, a 3x3 stride-2 one padded by 1 (the SphereFace stem), a product
SCRIPT = PRELUDE + textwrap.dedent("""
    NHWC = ("NHWC", "HWIO", "NHWC")
    def step(x, k, k2, a, b):
        y = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC)
        z = lax.conv_general_dilated(x, k2, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC)
        return y, z, a @ b
    s = lambda shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=one)
    compiled = jax.jit(step).lower(s((8, 16, 16, 32)), s((3, 3, 32, 64)), s((3, 3, 32, 16)),
                                   s((256, 512)), s((512, 384))).compile()
    ops = entry_costs(compiled.as_text())
    print(json.dumps({
        "compiler_flops": compiled.cost_analysis()["flops"],
        "ops": [{"name": o.name, "opcode": o.opcode, "cycles": o.cycles, "flops": o.flops,
                 "hbm_bytes": o.hbm_bytes, "source": o.source} for o in ops],
        "total_cycles": total_cycles(ops), "top": [o.name for o in top_ops(ops, 2)]}))
""")
# counted loops (scan) of 8, 16 and 24 steps, and a loop whose length the data decides
LOOPS = PRELUDE + textwrap.dedent("""
    s = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=one)
    cycles = lambda f: total_cycles(entry_costs(jax.jit(f).lower(
        s((256, 512)), s((512, 512))).compile().as_text()))
    out = {n: cycles(lambda x, w, n=n: lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None,
                                                 length=n)[0]) for n in (8, 16, 24)}
    out["open"] = cycles(lambda x, w: lax.while_loop(lambda c: jnp.sum(c) < 1e6,
                                                     lambda c: jnp.tanh(c @ w) + 1, x))
    print(json.dumps(out))
""")
# data parallelism over the 4 chips: a replicated [256, 1000] weight whose gradient every chip
# must sum (the all-reduce the compiler gives no cycles), and a batch-split product
COLLECTIVES = PRELUDE + textwrap.dedent("""
    from kdface.training._hlo_costs import collectives
    mesh = Mesh(np.asarray(devices), ("d",))
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("d"))
    loss = lambda w, x: jnp.sum(jnp.tanh(x @ w))
    compiled = jax.jit(jax.grad(loss), out_shardings=rep).lower(
        jax.ShapeDtypeStruct((256, 1000), jnp.float32, sharding=rep),
        jax.ShapeDtypeStruct((64, 256), jnp.float32, sharding=split)).compile()
    print(json.dumps([{"opcode": c.opcode, "group": c.group, "array_bytes": c.array_bytes,
                       "count": c.count, "traffic": c.traffic}
                      for c in collectives(compiled.as_text(), 4)]))
""")
# the lines of SCRIPT's three calls, for the source attribution
LINE_Y, LINE_Z, LINE_AB = (SCRIPT.splitlines().index(line) + 1 for line in SCRIPT.splitlines()
                           if line.strip().startswith(("y = ", "z = ", "return y")))


def _run(tmp_path_factory, script):
    if not os.path.isdir(os.path.join(TPU_SITE, "libtpu")):
        pytest.fail(f"libtpu is not installed in {TPU_SITE}: `make test` installs it "
                    f"(.ci/install-libtpu {sys.executable})")
    path = tmp_path_factory.mktemp("hlo") / "program.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def costs(tmp_path_factory):
    return _run(tmp_path_factory, SCRIPT)


def test_a_counted_loop_counts_its_body_once_per_step(tmp_path_factory):
    loops = _run(tmp_path_factory, LOOPS)
    # the body's cycles times the trip count: linear in the steps, 8 more steps cost the same
    per_8 = loops["16"] - loops["8"]
    assert per_8 > 0 and loops["24"] - loops["16"] == per_8 and loops["8"] > per_8 * 0.5
    assert loops["open"] is None  # a loop of unknown length: no cycle total, the roofline


def _valid_taps_by_hand(n, size, stride, low):
    # output positions of a convolution over n inputs, counted one by one
    n_out = (n + 2 * low - size) // stride + 1
    return sum(1 for o in range(n_out) for t in range(size) if 0 <= o * stride + t - low < n)


def test_valid_taps_count_the_taps_inside_the_input():
    # SAME 3x3 over 16: each border output loses one tap, 16 * 3 - 2
    assert _valid_taps(16, 16, 3, 1, 1) == 46 == _valid_taps_by_hand(16, 3, 1, 1)
    # 3x3 stride 2 padded 1 over 16 -> 8 outputs: only the first loses a tap, 8 * 3 - 1
    assert _valid_taps(16, 8, 3, 2, 1) == 23 == _valid_taps_by_hand(16, 3, 2, 1)
    assert _valid_taps(5, 3, 3, 1, 0) == 9  # unpadded: every tap inside


def test_flops_read_from_the_program_equal_the_compilers_own_count(costs):
    # 2 x batch x C_out x C_in x (taps inside the input, per axis) for each convolution, and
    # 2 x M x N x K for the product: integers, and XLA's cost analysis counts the same
    same = 2 * 8 * 64 * 32 * 46 * 46
    stem = 2 * 8 * 16 * 32 * 23 * 23
    product = 2 * 256 * 384 * 512
    assert sum(op["flops"] for op in costs["ops"]) == same + stem + product
    assert costs["compiler_flops"] == same + stem + product
    by_line = {}
    for op in costs["ops"]:
        if op["flops"]:
            by_line.setdefault(op["source"], 0)
            by_line[op["source"]] += op["flops"]
    assert by_line == {f"program.py:{LINE_Y}": same, f"program.py:{LINE_Z}": stem,
                       f"program.py:{LINE_AB}": product}


def test_every_op_with_flops_has_the_compilers_cycles(costs):
    costly = [op for op in costs["ops"] if op["flops"]]
    assert len(costly) == 3 and all(op["cycles"] and op["cycles"] > 0 for op in costly)
    assert costs["total_cycles"] == sum(op["cycles"] or 0 for op in costs["ops"])
    cycles = {op["name"]: op["cycles"] or 0 for op in costs["ops"]}
    assert [cycles[n] for n in costs["top"]] == sorted(cycles.values(), reverse=True)[:2]


def test_the_clock_derived_from_the_peak_matches_v4s_published_clock():
    # Jouppi et al. 2023, "TPU v4: An Optically Reconfigurable Supercomputer" (Table 2): a 1050
    # MHz clock; here derived from Google's 275 TFLOP/s peak and 2 cores x 4 MXUs of 128 x 128
    assert abs(clock_hz("v4") / 1.05e9 - 1) < 0.002
    assert clock_hz("v5e") == 197e12 / (4 * 128 * 128 * 2)
    assert clock_hz("h100") is None  # no cycle estimates on GPUs


def _step(optimal, cycles, flops=1e12, bytes_accessed=1e9):
    return CompiledStep(batch_size=1024, devices=8, argument_bytes=1, state_bytes=1,
                        output_bytes=0, alias_bytes=0, temp_bytes=1, code_bytes=0, flops=flops,
                        bytes_accessed=bytes_accessed, optimal_seconds=optimal,
                        head_sharded=True, largest=("x", 1), cycles=cycles,
                        top_ops=(("models/_conv.py:64", "conv", 300_000, 5e10, 1e5),))


def test_the_step_time_is_the_estimate_it_names():
    peak = CHIPS["v5e"][0] * 1e12
    floor = 1e12 / peak
    usable = estimate(_step(0.02, 30_000_000), "v5e", num_examples=None, hosts=1)
    assert usable["estimate"] == "compiler (optimal_seconds)" and usable["step_seconds"] == 0.02
    cycles = estimate(_step(-141.0, 30_000_000), "v5e", num_examples=None, hosts=1)
    assert cycles["estimate"].startswith("compiler cycles")
    assert cycles["step_seconds"] == 30_000_000 / clock_hz("v5e") > floor
    assert cycles["images_per_s_chip"] == 128 / cycles["step_seconds"]
    # cycles that would beat the MXUs' peak are not believed: the roofline stands
    fast = estimate(_step(-141.0, 1000), "v5e", num_examples=None, hosts=1)
    assert fast["estimate"].startswith("roofline") and fast["step_seconds"] == max(
        floor, 1e9 / (CHIPS["v5e"][2] * 1e9))
    # nor cycles below half the roofline (its bytes: 1e13 at 819 GB/s, 12.2 ms), as for
    # optimal_seconds
    low = estimate(_step(-141.0, 9_000_000, bytes_accessed=1e13), "v5e", num_examples=None,
                   hosts=1)
    assert 9_000_000 / clock_hz("v5e") < 0.5 * low["roofline_seconds"]
    assert low["estimate"].startswith("roofline") and low["step_seconds"] == 1e13 / 819e9
    top = cycles["top_ops"][0]
    assert top["ms"] == 1e3 * 300_000 / clock_hz("v5e") and top["bound"] == "MXU"


def test_what_bounds_an_op():
    peak, bandwidth = 197e12, 819e9
    assert bound(197e9, 0, 1.5e-3, peak, bandwidth) == "MXU"          # 1 ms of MXU in 1.5 ms
    assert bound(0, 819e6, 1.2e-3, peak, bandwidth) == "HBM"          # 1 ms of HBM in 1.2 ms
    assert bound(1e6, 1e6, 1e-3, peak, bandwidth) == "vector unit"    # neither explains it


def test_the_gradient_all_reduce_of_data_parallelism_is_found_with_its_bytes(tmp_path_factory):
    found = _run(tmp_path_factory, COLLECTIVES)
    # the summed gradient of the replicated weight, 256 x 1000 float32 on every chip: a
    # ring / bandwidth-optimal all-reduce over 4 chips sends 2 x 3/4 of it from each
    weight = 256 * 1000 * 4
    sums = [c for c in found if c["opcode"].startswith(("all-reduce", "reduce-scatter"))]
    assert sum(c["traffic"] * c["count"] for c in found) >= 2 * 3 / 4 * weight
    assert sums and all(c["group"] == 4 for c in sums)
    assert any(c["array_bytes"] == weight and c["traffic"] == 1.5 * weight for c in sums)


def test_replica_groups_in_each_of_xlas_notations_give_the_group_size():
    from kdface.training._hlo_costs import Collective, _group_size
    assert _group_size("all-reduce(x), replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%s", 8) == 4
    assert _group_size("all-gather(x), replica_groups=[2,4]<=[8], dimensions={0}", 8) == 4
    assert _group_size("all-gather(x), replica_groups=[2,2]<=[2,2]T(1,0), dim", 4) == 2
    assert _group_size("all-reduce(x), replica_groups=mesh['axis_0'=4,'axis_1'=2] "
                       "{'axis_0'}, to_apply=%s", 8) == 4
    assert _group_size("all-reduce(x), replica_groups=mesh['axis_0'=4,'axis_1'=2] "
                       "{'axis_0','axis_1'}, to_apply=%s", 8) == 8
    assert _group_size("all-reduce(x), replica_groups={}, to_apply=%s", 8) == 8
    # what each chip sends, per the bandwidth-optimal algorithms, for an array of 800 bytes
    sent = {op: Collective(op, 4, 800.0, 1, "").traffic for op in (
        "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute-start")}
    assert sent == {"all-reduce": 1200.0, "all-gather": 600.0, "reduce-scatter": 2400.0,
                    "all-to-all": 600.0, "collective-permute-start": 800.0}
