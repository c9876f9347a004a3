"""Parameters, MACs and batch-1 CPU latency of every registered backbone -> MODEL_STATS.md.

    python -m benchmarks.model_stats [--names iresnet50,mobilefacenet] [--repeats 20]
                                     [--output benchmarks/MODEL_STATS.md]

* parameters: ``kdface.models.count_params`` (``nnx.Param`` scalars; BN running statistics not
  counted), on an abstract model;
* MACs: ``kdface.models.count_macs`` — multiply-accumulates of convolutions and FC layers at
  112x112, counted from the forward pass's jaxpr (padding taps included, element-wise ops not);
  "FLOPs" in the papers' tables mean these MACs (MAdds);
* latency: median wall time of ``repeats`` batch-1 eval-mode forward passes on CPU, each blocked
  until ready, after compiling and one warm-up call. On a shared machine the absolute numbers
  move with load; student/teacher ratios are measured back to back and are more stable.
  Weights are NumPy random values (latency does not depend on them).

The Wang et al. 2019 student (``sphereface36_thin``) vs teacher (``sphereface64``) speed ratio is
measured at the paper's 112x96 input, alternating the two networks run by run so that load
changes hit both alike (the paper reports 3x on a 2.5 GHz Intel CPU).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import traceback

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks._common import write_markdown  # noqa: E402
from kdface.models import count_macs, count_params, create, names  # noqa: E402

# Extra configurations of a registered name worth their own row.
VARIANTS = {"resnet50": [("resnet50/2", {"width_divisor": 2}), ("resnet50/4", {"width_divisor": 4}),
                         ("resnet50/8", {"width_divisor": 8})]}
PUBLISHED = {  # params (M), MACs (G) the issue / papers quote
    "iresnet50": "43.6 M (insightface)", "iresnet100": "65.2 M (insightface)",
    "vargfacenet": "≈5 M, 1 G FLOPs (yan2019)", "mobilefacenet": "≈1 M (MobileFaceNet paper)",
    "sphereface36_thin": "student, 3x faster than teacher (wang2019)",
}


def _with_numpy_weights(model, seed: int = 0):
    """Fills an abstract model with NumPy random values. Latency does not depend on the values,
    and JAX random initialisation compiles one program per parameter shape (minutes for a
    100-layer network on a small shared CPU)."""
    rng = np.random.default_rng(seed)
    for path, node in nnx.iter_graph(model):
        if (isinstance(node, nnx.Variable) and not isinstance(node, nnx.RngState)
                and jnp.issubdtype(node.dtype, jnp.floating)):
            shape = tuple(node.shape)
            if str(path[-1]) in ("var", "scale"):
                value = rng.uniform(0.5, 1.5, shape)
            else:
                value = rng.normal(0.0, np.sqrt(0.5 / max(1, int(np.prod(shape[:-1])))), shape)
            node.set_value(jnp.asarray(value, node.dtype))
    return model


def _compiled_forward(name: str, kwargs: dict, input_hw: tuple[int, int]):
    model = _with_numpy_weights(nnx.eval_shape(lambda: create(name, rngs=nnx.Rngs(0),
                                                              **kwargs)))
    model.eval()
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    x = jax.random.normal(jax.random.key(0), (1, *input_hw, 3), jnp.float32)
    fn(state, x).block_until_ready()  # compile
    fn(state, x).block_until_ready()  # warm-up
    return lambda: fn(state, x).block_until_ready()


def _time_once(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(name: str, kwargs: dict, repeats: int, input_hw=(112, 112)) -> dict:
    abstract = nnx.eval_shape(lambda: create(name, rngs=nnx.Rngs(0), **kwargs))
    row = {"params": count_params(abstract), "macs": count_macs(abstract, input_hw)}
    run = _compiled_forward(name, kwargs, input_hw)
    row["latency_ms"] = 1e3 * statistics.median(_time_once(run) for _ in range(repeats))
    return row


def wang2019_ratio(repeats: int, input_hw=(112, 96)) -> dict:
    kw = {"input_size": input_hw}
    student = _compiled_forward("sphereface36_thin", kw, input_hw)
    teacher = _compiled_forward("sphereface64", kw, input_hw)
    ts, tt = [], []
    for _ in range(repeats):
        ts.append(_time_once(student))
        tt.append(_time_once(teacher))
    s, t = statistics.median(ts), statistics.median(tt)
    macs = [count_macs(nnx.eval_shape(lambda n=n: create(n, rngs=nnx.Rngs(0), **kw)), input_hw)
            for n in ("sphereface36_thin", "sphereface64")]
    return {"student_ms": 1e3 * s, "teacher_ms": 1e3 * t, "ratio": t / s,
            "mac_ratio": macs[1] / macs[0]}


def _table(rows: list[tuple[str, dict | str]]) -> list[str]:
    lines = ["| network | params (M) | MACs @112x112 (G) | CPU latency b=1 (ms) | published |",
             "|---|---:|---:|---:|---|"]
    for label, r in rows:
        pub = PUBLISHED.get(label, "")
        if isinstance(r, str):
            lines.append(f"| {label} | error: {r} | | | {pub} |")
        else:
            lines.append(f"| {label} | {r['params'] / 1e6:.2f} | {r['macs'] / 1e9:.3f} | "
                         f"{r['latency_ms']:.1f} | {pub} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", default="", help="comma-separated names (default: all)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per network")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__),
                                                         "MODEL_STATS.md"))
    parser.add_argument("--skip-ratio", action="store_true", help="skip the wang2019 ratio")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    chosen = [n for n in args.names.split(",") if n] or names()
    rows = []
    for name in chosen:
        for label, kwargs in [(name, {})] + VARIANTS.get(name, []):
            t0 = time.perf_counter()
            try:
                rows.append((label, measure(name, kwargs, args.repeats)))
            except Exception as e:  # one broken network must not hide the others' numbers
                traceback.print_exc()
                rows.append((label, f"{type(e).__name__}: {e}".replace("|", "/")[:120]))
            print(f"{label}: {rows[-1][1]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    lines = ["# Model statistics", "",
             f"Generated by `python -m benchmarks.model_stats` on {platform.machine()} "
             f"({os.cpu_count()} CPU cores visible), jax {jax.__version__}, "
             f"{time.strftime('%Y-%m-%d')}. Eval mode, float32, NHWC, batch 1, "
             f"median of {args.repeats} runs after compile + warm-up. The machine was shared "
             "with other jobs, so absolute latencies are noisy (ratios measured back to back "
             "are more reliable).", "",
             "MACs are multiply-accumulates of convolutions and fully connected layers (padding "
             "taps included, element-wise ops excluded), counted from the forward pass's jaxpr; "
             "1 MAC = 2 FLOPs in XLA's count.", ""]
    lines += _table(rows)
    if not args.skip_ratio:
        r = wang2019_ratio(args.repeats)
        lines += ["", "## Wang et al. 2019: thin 36-layer student vs 64-layer teacher (112x96)", "",
                  f"student `sphereface36_thin` {r['student_ms']:.1f} ms, teacher "
                  f"`sphereface64` {r['teacher_ms']:.1f} ms (batch 1, CPU, alternated runs): "
                  f"**student is {r['ratio']:.1f}x faster** (MAC ratio {r['mac_ratio']:.1f}x; "
                  "the paper reports 3x on a 2.5 GHz Intel CPU)."]
        print(f"wang2019 ratio: {r}", flush=True)
    return write_markdown(args.output, lines)


if __name__ == "__main__":
    sys.exit(main())
