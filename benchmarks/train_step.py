r"""Train-step throughput per recipe, the teacher cache's speedup, and the full-size step.

  python -m benchmarks.train_step [--batch=32] [--steps=5] [--quick]
  python -m benchmarks.train_step --full [--batch=16] [--steps=3] [--classes=85742]

``--full``: an IResNet-100 teacher (Deng et al. 2019, 65 M parameters) and a MobileFaceNet
student (Chen et al. 2018) at 112x112 with CosFace heads over ``--classes`` (MS1M's 85,742 by
default), bfloat16 on an accelerator and float32 on a CPU (``--dtype``). Cases: kd_im with the
teacher's forward pass, kd_im from the teacher cache (float16 embeddings in the batch, logits
from the teacher head), and the student alone. Each is timed in kdface (the trainer's jitted
step, uint8 batches already on the device) and in PyTorch eager written the way arcface_torch
users write it (``benchmarks.torch_models``: insightface's IResNet and MobileFaceNet layouts,
the same losses), in alternated rounds per case (kdface, torch, kdface, ...) in one process.
Reported: images/s, model FLOP utilization (``kdface.models.count_macs``; the peak is the
data-sheet bf16 peak on a GPU and the measured JAX GEMM rate on a CPU) and the torch ratio. The
breakdown adds the input pipeline alone (host and device LR view) and the loop
(``kdface.training.fit`` over in-memory uint8 batches, student alone) against the step alone.
Writes the section "Full size" of benchmarks/TRAIN_STEP.md.

Without ``--full``, for the Wang et al. 2019 pair (SphereFace-64 teacher, thin SphereFace-36
student, 112x112) it times one jitted ``kd_im`` step (hard + soft predictions + MK-MMD) three
ways, side by side in one process: with the teacher's forward pass, with the teacher's outputs
read from the cache, and the student alone (``scratch``, the floor). Median over ``--steps``
steps after compilation; writes the section "Teacher cache speedup" of benchmarks/TRAIN_STEP.md
with the command and the machine.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time

from absl import app, flags

import kdface  # noqa: F401  (sets its XLA CPU flag before the backend starts)

from benchmarks._common import commit
from benchmarks._markdown_section import write_section

flags.DEFINE_integer("batch", None, "Global batch size (default 32; --full: 128 on an "
                     "accelerator, 16 on a CPU).")
flags.DEFINE_integer("steps", None, "Timed steps (rounds with --full) per case, median "
                     "reported (default 5; --full: 3).")
flags.DEFINE_bool("quick", False, "Small networks at 56x56 (a smoke run).")
flags.DEFINE_bool("full", False, "IResNet-100 teacher + MobileFaceNet student, torch peer, "
                  "breakdown (module docstring).")
flags.DEFINE_integer("classes", None, "Classes of the heads (default 1000; --full: 85742).")
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                  "--full: network compute dtype (auto: bfloat16 on an accelerator, float32 on "
                  "a CPU).")
flags.DEFINE_integer("loop_steps", 20, "--full: timed steps of the loop row.")
flags.DEFINE_integer("pipeline_batches", 8, "--full: timed batches of the input-pipeline rows.")
flags.DEFINE_bool("peer", True, "--full: also time the PyTorch peer (needs torch).")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "TRAIN_STEP.md"),
                    "Markdown output.")
F = flags.FLAGS


def _case(recipe_name, student, teacher, cached, batch_size, hw, classes, steps):
    import numpy as np
    import optax
    from benchmarks._full_step import compiled_step
    from kdface.distill import build_recipe
    from kdface.training import StepConfig

    cfg = {"head": "softmax", "lambda_hard": 1.0, "lambda_soft": 1.0, "lambda_feature": 1.0,
           "temperature": 4.0, "feature_loss": "mk_mmd", "margin_scale": 64.0, "margin": 0.35}
    rng = np.random.default_rng(0)
    batch = {"student_image": rng.normal(size=(batch_size, *hw, 3)).astype(np.float32),
             "teacher_image": rng.normal(size=(batch_size, *hw, 3)).astype(np.float32),
             "label": rng.integers(0, classes, batch_size).astype(np.int32)}
    if cached:
        batch["teacher_embedding"] = rng.normal(size=(batch_size, 512)).astype(np.float32)
    mode = None if teacher is None else ("cache" if cached else "forward")
    run, compile_s = compiled_step(build_recipe(recipe_name, cfg), student, teacher, mode,
                                   optax.sgd(0.01, momentum=0.9),
                                   StepConfig(teacher_cached=cached), batch)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), compile_s


CACHE_SECTION = "## Teacher cache speedup (Wang et al. 2019 pair)"
FULL_SECTION = "## Full size: IResNet-100 teacher + MobileFaceNet student"


def main(argv):
    del argv
    if F.full:
        return full()
    F.batch = F.batch or 32
    F.steps = F.steps or 5
    from flax import nnx
    from kdface.distill import build_student
    hw = (56, 56) if F.quick else (112, 112)
    classes = 1000
    t_name, s_name = "sphereface64", "sphereface36_thin"
    opts = {"input_size": hw}
    if F.quick:
        t_name = s_name = "sphereface_custom"
    t_opts = dict(opts, channels=(32, 64, 128, 256), units=(1, 2, 2, 1)) if F.quick else opts
    s_opts = dict(opts, channels=(12, 24, 48, 96), units=(1, 1, 1, 1)) if F.quick else opts
    teacher = build_student(t_name, num_classes=classes, head="softmax", rngs=nnx.Rngs(1),
                            backbone_options=t_opts).network
    rows = []
    for label, recipe, cached, with_teacher in (
            ("kd_im, teacher forward", "kd_im", False, True),
            ("kd_im, teacher cache", "kd_im", True, True),
            ("scratch (student alone)", "scratch", False, False)):
        student = build_student(s_name, num_classes=classes, head="softmax", rngs=nnx.Rngs(0),
                                backbone_options=s_opts)
        median, compile_s = _case(recipe, student, teacher if with_teacher else None, cached,
                                  F.batch, hw, classes, F.steps)
        rows.append((label, median, compile_s))
        print(f"{label:28s} {median * 1000:9.1f} ms/step  {F.batch / median:8.1f} img/s  "
              f"(compile {compile_s:.1f} s)", flush=True)
    speedup = rows[0][1] / rows[1][1]
    lines = [
        CACHE_SECTION,
        "",
        f"Command: `python -m benchmarks.train_step --batch={F.batch} --steps={F.steps}"
        f"{' --quick' if F.quick else ''}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no accelerator "
        f"({platform.platform()}); shared with other jobs while measured, so read ratios, "
        "not absolutes.  ",
        f"Networks: teacher {t_name}, student {s_name}, input {hw[0]}x{hw[1]}, "
        f"{classes} classes, batch {F.batch}, fwd+bwd+update, median of {F.steps} steps.",
        "",
        "| case | ms / step | images / s | compile (s) |",
        "|---|---|---|---|",
        *[f"| {label} | {m * 1000:.1f} | {F.batch / m:.1f} | {c:.1f} |" for label, m, c in rows],
        "",
        f"Teacher cache speedup per step: **{speedup:.2f}x** (teacher forward {rows[0][1]*1000:.0f}"
        f" ms vs cached {rows[1][1]*1000:.0f} ms; the student alone takes "
        f"{rows[2][1]*1000:.0f} ms).",
        "",
    ]
    write_section(F.out, CACHE_SECTION, lines)
    print(f"speedup {speedup:.2f}x; wrote {F.out}")
    return 0


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f}"


def full() -> int:
    import jax
    from flax import nnx
    from benchmarks import _full_step as fs
    from kdface.distill import build_student

    accelerator = jax.devices()[0].platform != "cpu"
    batch = F.batch or (128 if accelerator else 16)
    rounds = F.steps or 3
    classes = F.classes or 85742
    dtype = F.dtype if F.dtype != "auto" else ("bfloat16" if accelerator else "float32")
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's per-save INFO lines
    machine = fs.machine_line()
    print(f"machine: {machine}; batch {batch}, {classes} classes, {dtype}", flush=True)
    t_start = time.perf_counter()
    teacher = build_student("iresnet100", num_classes=classes, head="cosface",
                            rngs=nnx.Rngs(1)).network
    cases, macs = fs.jax_cases(batch, classes, dtype, teacher)
    if F.peer:
        cases += fs.torch_cases(batch, classes, dtype, {c.label: c.flops for c in cases})
    fs.time_rounds(cases, rounds)
    peak, peak_source = fs.peak_flops(dtype)
    student_case = next(c for c in cases if c.framework == "kdface"
                        and c.label == fs.CASES[2][0])
    loop, alone = fs.loop_rate(batch, classes, F.loop_steps, dtype, student_case)
    pipeline = fs.pipeline_rates(batch, F.pipeline_batches, os.cpu_count() or 1)
    median = {(c.framework, c.label): statistics.median(c.times) for c in cases}
    rows = []
    for c in cases:
        m = median[c.framework, c.label]
        mfu = f"{c.flops / m / peak:.1%}" if peak else "n/a"
        peer = median.get(("torch eager", c.label))
        ratio = f"**{peer / m:.2f}x**" if c.framework == "kdface" and peer else ""
        rows.append(f"| {c.label} | {c.framework} | {_ms(m)} | {batch / m:,.1f} | {mfu} | "
                    f"{ratio} | {c.compile_s:.1f} |")
    lines = [
        FULL_SECTION,
        "",
        f"Command: `python -m benchmarks.train_step --full --batch={batch} --steps={rounds} "
        f"--classes={classes} --dtype={dtype}` at commit {commit()}, "
        f"{time.perf_counter() - t_start:.0f} s.  ",
        f"Machine: {fs.machine_line()} (load at the end).  ",
        f"Networks: teacher iresnet100 ({macs['teacher'] / 1e9:.2f} G multiply-adds per "
        f"112x112 image), student mobilefacenet ({macs['student'] / 1e6:.0f} M), CosFace heads "
        f"over {classes:,} classes at 512-d; {dtype} networks, float32 losses; SGD momentum "
        f"0.9, weight decay 5e-4 (both frameworks). Step alone: batch {batch} already on the "
        f"device (uint8 in kdface, normalized in the step; float NCHW in torch, as "
        f"arcface_torch's loader delivers it); per case, "
        f"alternated rounds of kdface and torch, median of {rounds}; torch with "
        "OMP_WAIT_POLICY=PASSIVE (no spinning threads between the alternated steps); kdface with "
        f"its XLA flag (`XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}`, kdface/__init__.py). MFU: "
        "model FLOPs (2 x multiply-adds: the student's forward x 3 for its backward, the "
        "teacher's forward, the heads) per second over the "
        f"peak: {peak_source}.",
        "",
        "| case | framework | ms / step | images / s | MFU | kdface vs torch | compile s |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Breakdown (kdface, same batch):",
        "",
        "| part | images / s | vs the step alone (student) |",
        "|---|---|---|",
        f"| step alone, student alone (data on the device; {F.loop_steps} steps before and "
        f"after the loop) | {alone:,.1f} | 1.00x |",
        f"| the loop (`fit`, in-memory uint8 batches, student alone, {F.loop_steps} steps) | "
        f"{loop:,.1f} | **{loop / alone:.2f}x** |",
        *[f"| {label} | {rate:,.0f} | {rate / alone:.2f}x |" for label, rate in pipeline],
        "",
    ]
    if not accelerator:
        lines += ["GPU rows: not measured (no accelerator was lent to this work).", ""]
    write_section(F.out, FULL_SECTION, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    # torch's OpenMP threads otherwise spin-wait after each parallel region, taking the cores
    # from the kdface step timed next in the alternated rounds.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(app.run(main))
