"""benchmarks/tpu_plan.py's report from planned rows (issue 23): the estimate each row names,
the cycle sum against optimal_seconds where both exist, the costliest ops, and the targets read
from the rows, with the flops floor of the 2 M / 85,742-class step ratio computed from them."""
from benchmarks import tpu_plan
from kdface.training._compile import CHIPS


def _row(topology, classes, head, *, seconds, flops, estimate, cycles=None, top=()):
    return {"recipe": "kd_im, teacher forward", "topology": topology, "classes": classes,
            "head": head, "head_sharded": head == "on", "total_gib": 1.5, "fits": True,
            "flops_per_step": flops, "estimate": estimate, "images_per_s_chip": 128 / seconds,
            "images_per_s_slice": 8 * 128 / seconds, "mfu": 0.5, "batch_per_chip": 128,
            "roofline_seconds": seconds * 0.9, "step_seconds": seconds, "epoch_seconds": 60.0,
            "compile_s": 1.0, "cycles_seconds": cycles, "top_ops": list(top), "commit": "abc"}


def test_the_report_reads_the_targets_and_the_flops_floor_from_the_rows():
    op = {"op": "conv_general_dilated", "source": "models/_conv.py:64", "ms": 0.454,
          "bound": "MXU", "mxu_share": 0.55, "hbm_bytes": 1.5e5}
    rows = [_row("v5e-8", 85_742, "on", seconds=0.016, flops=1.67e12, top=[op],
                 estimate="compiler cycles (per-op estimated_cycles ...)"),
            _row("v5e-8", 2_000_000, "on", seconds=0.058, flops=2.59e12,
                 estimate="compiler cycles (per-op estimated_cycles ...)"),
            _row("v5p-8", 85_742, "on", seconds=0.0085, flops=1.67e12, cycles=0.0084,
                 estimate="compiler (optimal_seconds)")]
    rows[0]["collective_seconds"] = 0.0016  # compiled with the collectives recorded
    text = "\n".join(tpu_plan.markdown(rows, "cmd"))
    # the collectives beside the roofline where a row has them, blank where it predates them
    assert f"| {128 / (0.016 * 0.9):,.0f} | 1.6 ms | 1 min |" in text
    assert f"| {128 / (0.058 * 0.9):,.0f} |  | 1 min |" in text
    assert "| kd_im, teacher forward | v5e-8 | 85,742 | sharded |" in text
    assert "| cycles | 8,000 |" in text and "| optimal_seconds | 15,059 |" in text
    assert "| 8.5 ms | 8.4 ms | 0.988 |" in text          # cycles / optimal_seconds on v5p
    assert "| v5e-8 | 85,742 | on | conv_general_dilated | models/_conv.py:64 | 0.454 ms | MXU |" \
        in text
    assert "**15,059** (compiler, v5p-8" in text
    floor = (0.016 + (2.59e12 - 1.67e12) / (CHIPS["v5e"][0] * 1e12)) / 0.016
    assert f"**{0.058 / 0.016:.2f}x**" in text and f">= **{floor:.2f}x**" in text
