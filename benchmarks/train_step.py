r"""Train-step throughput per recipe, and the teacher cache's measured speedup.

  python -m benchmarks.train_step [--batch=32] [--steps=5] [--quick]

For the Wang et al. 2019 pair (SphereFace-64 teacher, thin SphereFace-36 student, 112x112) it times
one jitted ``kd_im`` step (hard + Hinton + MK-MMD) three ways, side by side in one process:
with the teacher's forward pass, with the teacher's outputs read from the cache, and the student
alone (``scratch``, the floor). Median over ``--steps`` steps after compilation; writes
benchmarks/TRAIN_STEP.md with the command and the machine.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time

from absl import app, flags

flags.DEFINE_integer("batch", 32, "Global batch size.")
flags.DEFINE_integer("steps", 5, "Timed steps per case (median reported).")
flags.DEFINE_bool("quick", False, "Small networks at 56x56 (a smoke run).")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "TRAIN_STEP.md"),
                    "Markdown output.")
F = flags.FLAGS


def _case(recipe_name, student, teacher, cached, batch_size, hw, classes, steps):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from kdface.distill import build_recipe
    from kdface.training import StepConfig, init_health, init_state, make_train_step
    from kdface.training._step import split_teacher

    cfg = {"head": "softmax", "lambda_hard": 1.0, "lambda_soft": 1.0, "lambda_feature": 1.0,
           "temperature": 4.0, "feature_loss": "mk_mmd", "margin_scale": 64.0, "margin": 0.35}
    recipe = build_recipe(recipe_name, cfg)
    opt = optax.sgd(0.01, momentum=0.9)
    graphdef, state = init_state(student, opt)
    teacher_def, teacher_state = (split_teacher(teacher) if teacher is not None and not cached
                                  else (None, None))
    if cached:  # the cache holds embeddings; the step recomputes logits from the teacher head
        head_def, teacher_state = nnx.split(teacher.head)
        teacher_def = (head_def, teacher.head_kind, teacher.logit_scale)
    step = jax.jit(make_train_step(recipe, graphdef, teacher_def, opt,
                                   StepConfig(teacher_cached=cached)), donate_argnums=(0, 1))
    rng = np.random.default_rng(0)
    batch = {"student_image": rng.normal(size=(batch_size, *hw, 3)).astype(np.float32),
             "teacher_image": rng.normal(size=(batch_size, *hw, 3)).astype(np.float32),
             "label": rng.integers(0, classes, batch_size).astype(np.int32)}
    if cached:
        batch["teacher_embedding"] = rng.normal(size=(batch_size, 512)).astype(np.float32)
    batch = jax.device_put(batch)
    t0 = time.perf_counter()
    health = init_health(recipe)
    state, health, metrics = step(state, health, teacher_state, batch)
    jax.block_until_ready(metrics["loss"])
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, health, metrics = step(state, health, teacher_state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    return statistics.median(times), compile_s


def main(argv):
    del argv
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
        "# Train-step throughput",
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
    with open(F.out, "w") as f:
        f.write("\n".join(lines))
    print(f"speedup {speedup:.2f}x; wrote {F.out}")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
