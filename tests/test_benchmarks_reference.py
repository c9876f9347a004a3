"""The PyTorch references of the loss benchmark compute kdface's losses (apples to apples).

Every implementation registered in ``benchmarks._loss_cases`` (the peers' formulations, the
best-effort torch versions of kdface's algorithms, and kdface's own JAX methods) is run through
the benchmark's own builders on small inputs; values and gradients must agree with kdface's
function within tests/_tolerance.py's float32 bound. The measurement helpers' isolation (memory
cap, timeout) is checked too. Skipped only when torch is not importable (it is in the ``bench``
extra).
"""
from __future__ import annotations

import functools
import time

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (the 'bench' extra) is not installed")

from _tolerance import assert_close  # noqa: E402
from benchmarks import _measure  # noqa: E402
from benchmarks import torch_reference as ref  # noqa: E402
from benchmarks._torch_pwr_sorted import dominance_sums  # noqa: E402
from benchmarks._loss_cases import LOSSES, PWR_VARIANTS, Config, make_inputs  # noqa: E402

CFG = Config(dim=16, classes=12, seed=3)
N = 11


@functools.lru_cache(maxsize=None)
def _jax_value_grad_cached(key, impl_name, n):
    loss = LOSSES[key]
    arrays, argnums = make_inputs(loss.kind, n, CFG)
    fn = jax.jit(jax.value_and_grad(loss.impl(impl_name).build(n, CFG), argnums=argnums))
    value, grads = fn(*[jax.numpy.asarray(a) for a in arrays])
    return float(value), [np.asarray(g) for g in grads]


def _jax_value_grad(impl, loss, n, cfg):
    assert cfg is CFG
    return _jax_value_grad_cached(loss.key, impl.name, n)


def _torch_value_grad(impl, loss, n, cfg):
    arrays, argnums = make_inputs(loss.kind, n, cfg)
    tensors = [torch.from_numpy(a) for a in arrays]
    if loss.kind == "head":
        tensors[2] = tensors[2].long()
    args = [t.clone().requires_grad_() if i in argnums else t for i, t in enumerate(tensors)]
    value = impl.build(n, cfg)(*args)
    value.backward()
    return value.item(), [args[i].grad.numpy() for i in argnums]


def _value_grad(impl, loss, n, cfg):
    runner = _jax_value_grad if impl.framework == "jax" else _torch_value_grad
    return runner(impl, loss, n, cfg)


def _reference(loss):
    return next(i for i in loss.impls if i.framework == "jax")


# kdface's other PWR methods (tiled, sorted) against its dense one are tests/test_losses_pwr*'s
# business; here every torch implementation is checked against kdface.
CASES = [(key, impl.name) for key, loss in LOSSES.items() for impl in loss.impls
         if impl.framework == "torch"]


@pytest.mark.parametrize("key,impl_name", CASES)
def test_implementation_matches_kdface(key, impl_name):
    loss = LOSSES[key]
    impl = loss.impl(impl_name)
    n = N
    v_ref, g_ref = _value_grad(_reference(loss), loss, n, CFG)
    v, g = _value_grad(impl, loss, n, CFG)
    assert np.isfinite(v_ref) and v_ref != 0.0
    # torch float32 vs kdface float32 (case 3): 2 x the longest reduction of any loss here,
    # RKD-A's N^3 angle triplets after a dim-long product (a bound for every kind: pairs
    # are N^2, classes x dim for the heads); scale: max|value| / max|gradient| per array
    terms = 2 * (n ** 3 + CFG.dim)
    assert_close(v, v_ref, terms=terms, what=f"{key}: {impl_name}: ")
    for a, b in zip(g, g_ref):
        assert np.max(np.abs(b)) > 0
        assert_close(a, b, terms=terms, what=f"{key}: {impl_name} gradient: ")


def _lattice_embeddings(rng, n, dim=8, support=4):
    """Unit vectors with ``support`` entries +-0.5: norms are exactly 1 and every cosine is a
    multiple of 1/4, exact in float32 in every framework, so teacher ties are real ties."""
    e = np.zeros((n, dim), np.float32)
    for row in e:
        idx = rng.choice(dim, size=support, replace=False)
        row[idx] = rng.choice([-0.5, 0.5], size=support)
    return e


@pytest.mark.parametrize("variant", sorted(PWR_VARIANTS))
def test_pwr_references_agree_with_teacher_ties(variant):
    """With exactly tied teacher scores (most pairs share a value), tied pairs contribute
    nothing in every formulation: the official dense math, the torch tiled and sorted ones
    and kdface's dense method agree."""
    rng = np.random.default_rng(7)
    teacher = _lattice_embeddings(rng, 10)
    student = (teacher + 0.3 * rng.standard_normal(teacher.shape)).astype(np.float32)
    options = PWR_VARIANTS[variant]
    s, t = torch.from_numpy(student), torch.from_numpy(teacher)
    scores = ref.pwr_scores(t)
    assert len(torch.unique(scores)) < len(scores) // 3     # heavily tied
    dense = ref.pwr_dense_official(s, t, **options).item()
    # float32 vs float32 in another order (case 3): 2 x (an 8-long cosine, then the sums over
    # the 10 x 10 pairs of pairs: 100 x 100 at most); scale: the loss
    terms = 2 * (8 + 100 * 100)
    assert_close(ref.pwr_tiled_torch(s, t, **options, block_elements=64).item(), dense,
                 terms=terms, what="tiled: ")
    if options["inversion"] != "ranknet":
        assert_close(ref.pwr_sorted_torch(s, t, **options).item(), dense, terms=terms,
                     what="sorted: ")
    from kdface.losses._pwr import pwr_loss
    kd = float(jax.jit(lambda a, b: pwr_loss(a, b, method="dense", **options))(student, teacher))
    assert_close(kd, dense, terms=terms, what="kdface: ")


def test_dominance_sums_against_loop():
    rng = np.random.default_rng(1)
    t = torch.from_numpy(rng.integers(0, 5, 40).astype(np.float32))   # many ties
    x = torch.from_numpy(rng.standard_normal(40).astype(np.float32))
    y = torch.from_numpy(rng.standard_normal(40).astype(np.float32))
    w = torch.from_numpy(rng.random(40).astype(np.float32))
    got_w, got_c = dominance_sums(t, x, y, w)
    for a in range(40):
        keep = [b for b in range(40) if t[b] < t[a] and x[b] > y[a]]
        assert got_c[a].item() == len(keep)                      # an integer count: exact
        want = float(np.sum(w.numpy()[keep], dtype=np.float64))
        # float32 vs float64 (case 2): at most 40 weights in [0, 1) summed; scale: their sum
        assert_close(got_w[a].item(), want, terms=40, scale=max(want, 1.0))


def test_torchdistill_normalization_factors():
    """torchdistill averages over all N^2 / N^3 entries (zeros included); KDFACE_SCALE undoes
    exactly that, checked against the best-effort versions that average over distinct ones."""
    rng = np.random.default_rng(2)
    s = torch.from_numpy(rng.standard_normal((7, 5)).astype(np.float32))
    t = torch.from_numpy(rng.standard_normal((7, 5)).astype(np.float32))
    # float32 vs float32 (case 3): 2 x (a 5-long distance + the 7^2 pairs' mean) and 2 x
    # (a 5-long product + the 7^3 triplets' mean); scale: the loss
    assert_close(
        ref.KDFACE_SCALE["rkd_distance"](7) * ref.rkd_distance_torchdistill(s, t).item(),
        ref.rkd_distance_torch(s, t).item(), terms=2 * (5 + 7 ** 2))
    assert_close(
        ref.KDFACE_SCALE["rkd_angle"](7) * ref.rkd_angle_torchdistill(s, t).item(),
        ref.rkd_angle_torch(s, t).item(), terms=2 * (5 + 7 ** 3))


def test_fused_rkd_angle_gradient_matches_torchdistill_autograd():
    """The best-effort RKD-A forms its gradient by hand (kdface's fused pass): it must equal
    autograd through torchdistill's dense formulation, over several vertex and row tiles."""
    rng = np.random.default_rng(3)
    s = torch.from_numpy(rng.standard_normal((11, 6)).astype(np.float32))
    t = torch.from_numpy(rng.standard_normal((11, 4)).astype(np.float32))
    s_fused = s.clone().requires_grad_(True)
    s_dense = s.clone().requires_grad_(True)
    fused = ref.rkd_angle_torch(s_fused, t, tile_elements=2 * 4 * 11, rows=4)
    dense = ref.KDFACE_SCALE["rkd_angle"](11) * ref.rkd_angle_torchdistill(s_dense, t)
    fused.backward()
    dense.backward()
    # float32 vs float32 (case 3): 2 x (a 6-long product + the 11^3 triplets); scale: the
    # loss, and max|gradient| (the old atol=1e-7 ignored the gradient's magnitude)
    assert_close(fused.item(), dense.item(), terms=2 * (6 + 11 ** 3))
    assert_close(s_fused.grad.numpy(), s_dense.grad.numpy(), terms=2 * (6 + 11 ** 3))


def _allocate(mib):
    block = np.ones(mib * 2**20 // 8)
    time.sleep(0.5)
    return {"sum": float(block.sum())}


def _sleep():
    time.sleep(30)
    return {}


# The forked children below only touch NumPy, never JAX, so JAX's fork warning does not apply.
pytestmark_fork = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called")


def _cap_above_this_process(extra: int = 2**31) -> int:
    """An RSS cap ``extra`` bytes above this process's RSS: a forked child may count the parent's
    resident pages as its own (a pytest worker that ran other tests first holds gigabytes), so a
    fixed 2 GiB cap killed children that should finish (seen: 2.38 GiB at start)."""
    return _measure.rss_bytes() + extra


@pytestmark_fork
def test_run_isolated_kills_past_memory_cap():
    out = _measure.run_isolated(_allocate, (400,), timeout_s=60, rss_cap_bytes=200 * 2**20)
    assert out["status"] == "killed", out
    assert out["max_rss_mib"] > 200


@pytestmark_fork
def test_run_isolated_timeout_and_result():
    out = _measure.run_isolated(_sleep, timeout_s=0.5, rss_cap_bytes=_cap_above_this_process())
    assert out["status"] == "timeout"
    out = _measure.run_isolated(_allocate, (8,), timeout_s=60,
                                rss_cap_bytes=_cap_above_this_process())
    assert out["status"] == "ok" and out["sum"] == 8 * 2**20 // 8


@pytestmark_fork
def test_case_memory_counts_a_large_allocation():
    def case():
        mem = _measure.CaseMemory()
        block = np.ones(300 * 2**20 // 8)
        block.sum()
        del block
        return mem.report()

    out = _measure.run_isolated(case, timeout_s=60, rss_cap_bytes=_cap_above_this_process())
    assert out["status"] == "ok", out
    if out["peak_reset"]:
        assert 290 < out["peak_mib"] < 400, out


def _row(loss, impl, n, time_s, peak_mib=100.0, value=1.0, status="ok"):
    return {"loss": loss, "impl": impl, "n": n, "status": status, "time_s": time_s,
            "times": [time_s], "compile_s": 1.0, "peak_mib": peak_mib, "value": value,
            "load": 1.0, "role": LOSSES[loss].impl(impl).role,
            "framework": LOSSES[loss].impl(impl).framework}


def test_report_targets_measured_and_extrapolated():
    from benchmarks import _report

    cfg = Config()
    results = [
        _row("pwr_exp_tdiff", "kdface tiled", 512, 5.0, peak_mib=150.0),
        _row("pwr_exp_tdiff", "kdface sorted", 512, 0.6),
        _row("pwr_exp_tdiff", "kdface sorted", 4096, 40.0),
        _row("pwr_exp_tdiff", "kdface tiled", 192, 0.2),
        _row("pwr_exp_tdiff", "torch dense (official)", 160, 10.0),
        _row("mmd", "kdface", 512, 0.05),
        _row("mmd", "torch broadcast (library)", 256, 5.0),
        _row("mmd", "torch GEMM", 512, 0.04),
        _row("rkd_da", "kdface", 512, 7.0, peak_mib=300.0),
        _row("rkd_da", "torchdistill", 512, 28.0, peak_mib=3000.0),
    ]
    machine = {"jax_baseline_mib": 200.0, "gemm_gflops": {"jax": 20.0}}
    lines = "\n".join(_report.targets(results, machine, cfg))
    assert "350 MiB = JAX-only process baseline 200 MiB + case peak 150 MiB" in lines
    assert "| PWR sorted (exp, teacher-diff) N=512 < 0.5 s | 600 ms | **missed** |" in lines
    # dense torch at 192 scaled from 160 by M^2: 10 s * (18336 / 12720)^2 = 20.8 s -> 104x
    assert "extrapolated from N=160 by pair comparisons): 104x | **met**" in lines
    # broadcast at 512 scaled from 256 by (2N)^2: 20 s -> 400x; GEMM torch is faster: missed
    assert "400x | **met**" in lines
    assert "50.0 ms vs 40.0 ms: 0.80x | **missed**" in lines
    assert "7,000 ms vs 28,000 ms: 4.00x | **missed**" in lines
    assert "300 MiB vs 2.93 GiB: 1/10.0 | **met**" in lines
    report = _report.markdown(results, machine, cfg)
    assert report.count("### ") == 3
