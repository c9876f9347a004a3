"""Batch-1 CPU latency of exported students: ONNX Runtime vs JAX -> ONNX_LATENCY.md.

    python -m benchmarks.onnx_latency [--names sphereface36_thin,mobilefacenet,iresnet18]
                                      [--repeats 30] [--output benchmarks/ONNX_LATENCY.md]

For each network: weights are NumPy random values with non-trivial BatchNorm statistics (latency
does not depend on them; JAX random initialization would compile one program per shape); the
eval-mode network is exported with ``kdface.interop.backbone_to_onnx`` (NCHW input, dynamic
batch) and run by ONNX Runtime's CPU provider (default session options: all graph
optimizations, default thread count) and by ``jax.jit`` on the CPU backend. Each timed call is
one batch-1 112x112 image, blocked until the result is ready; the two runtimes are alternated
call by call after compile/warm-up so that load changes on a shared machine hit both alike, and
the medians are reported. The largest ONNX-vs-JAX output difference is reported too.
"""
from __future__ import annotations

import argparse
import os
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
from kdface._platform import cpu_model  # noqa: E402
from kdface.models import count_params, create  # noqa: E402

DEFAULT = ("sphereface36_thin", "mobilefacenet", "vargfacenet", "sphereface20", "iresnet18",
           "iresnet50")


def _numpy_weights(model, seed: int = 0):
    rng = np.random.default_rng(seed)
    for path, node in nnx.iter_graph(model):
        if (isinstance(node, nnx.Variable) and not isinstance(node, nnx.RngState)
                and jnp.issubdtype(node.dtype, jnp.floating)):
            shape, kind = tuple(node.shape), str(path[-1])
            if kind in ("var", "scale"):
                value = rng.uniform(0.5, 1.5, shape)
            elif kind in ("mean", "bias"):
                value = rng.normal(0.0, 0.1, shape)
            else:
                value = rng.normal(0.0, np.sqrt(1.0 / max(1, int(np.prod(shape[:-1])))), shape)
            node.set_value(jnp.asarray(value, node.dtype))
    return model


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(name: str, repeats: int, input_hw=(112, 112)) -> dict:
    import onnxruntime as ort
    from kdface.interop import backbone_to_onnx
    model = _numpy_weights(nnx.eval_shape(lambda: create(name, rngs=nnx.Rngs(0),
                                                         input_size=input_hw)))
    model.eval()
    row = {"params": count_params(model)}
    t0 = time.perf_counter()
    proto = backbone_to_onnx(model, input_size=input_hw)
    row["export_s"] = time.perf_counter() - t0
    blob = proto.SerializeToString()
    row["onnx_mb"] = len(blob) / 2**20
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    x = np.random.default_rng(1).uniform(-1, 1, (1, *input_hw, 3)).astype(np.float32)
    x_jax, x_nchw = jnp.asarray(x), np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    run_jax = lambda: forward(state, x_jax).block_until_ready()
    run_ort = lambda: session.run(["embedding"], {"input": x_nchw})
    want, got = np.asarray(run_jax()), run_ort()[0]  # compile + warm-up
    run_jax(), run_ort()
    row["max_rel_diff"] = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    tj, to = [], []
    for _ in range(repeats):
        tj.append(_timed(run_jax))
        to.append(_timed(run_ort))
    row["jax_ms"], row["ort_ms"] = 1e3 * statistics.median(tj), 1e3 * statistics.median(to)
    return row


def _table(rows) -> list[str]:
    lines = ["| network | params (M) | JAX b=1 (ms) | ONNX Runtime b=1 (ms) | JAX / ORT | "
             "max rel. diff | export (s) | .onnx (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        if isinstance(r, str):
            lines.append(f"| {name} | error: {r} | | | | | | |")
            continue
        lines.append(f"| {name} | {r['params'] / 1e6:.2f} | {r['jax_ms']:.1f} | "
                     f"{r['ort_ms']:.1f} | {r['jax_ms'] / r['ort_ms']:.2f}x | "
                     f"{r['max_rel_diff']:.1e} | {r['export_s']:.1f} | {r['onnx_mb']:.1f} |")
    return lines


def main(argv=None) -> int:
    import onnxruntime as ort
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", default=",".join(DEFAULT), help="comma-separated backbones")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per runtime")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__),
                                                         "ONNX_LATENCY.md"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    load_start = os.getloadavg()
    rows = []
    for name in [n for n in args.names.split(",") if n]:
        t0 = time.perf_counter()
        try:
            rows.append((name, measure(name, args.repeats)))
        except Exception as e:  # one failure must not hide the other rows
            traceback.print_exc()
            rows.append((name, f"{type(e).__name__}: {e}".replace("|", "/")[:120]))
        print(f"{name}: {rows[-1][1]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    load_end = os.getloadavg()
    command = "python -m benchmarks.onnx_latency" + (
        f" --names {args.names}" if args.names != ",".join(DEFAULT) else "") + (
        f" --repeats {args.repeats}" if args.repeats != 30 else "")
    fmt = lambda load: ", ".join(f"{v:.1f}" for v in load)
    lines = ["# ONNX Runtime vs JAX: batch-1 CPU latency of exported networks", "",
             f"Command: `{command}`", "",
             f"Machine: {cpu_model()}, {os.cpu_count()} CPU cores visible, shared with other "
             f"jobs (load average {fmt(load_start)} at start, {fmt(load_end)} at end), so "
             f"absolute times are noisy; the two runtimes were alternated call by call, which "
             f"makes their ratio the more reliable number. jax {jax.__version__}, onnxruntime "
             f"{ort.__version__}, {time.strftime('%Y-%m-%d')}.", "",
             f"Eval mode, float32, one 112x112 image, median of {args.repeats} calls each after "
             f"compile and warm-up. The ONNX file comes from `kdface.interop.backbone_to_onnx` "
             f"(what `python -m kdface.export` writes): NCHW input, dynamic batch, BatchNorms "
             f"folded into the convolutions, PReLU fused; ONNX Runtime runs it with default "
             f"session options. 'max rel. diff' is max |ORT - JAX| / max |JAX| on the timed "
             f"input.", ""]
    lines += _table(rows)
    return write_markdown(args.output, lines)


if __name__ == "__main__":
    sys.exit(main())
