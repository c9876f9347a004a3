r"""MobileFaceNet forward and MobileFaceNet + CosFace train step: kdface vs PyTorch eager (CPU).

  python -m benchmarks.depthwise [--batch=64] [--rounds=3] [--classes=1000]

Side by side in one process, in alternated rounds (each round times every case once, after
warm-up), median over ``--rounds``:

* ``kdface (XLA conv)``: kdface's step with every convolution left to XLA's
  ``lax.conv_general_dilated`` (the library before ``kdface.models._conv``), obtained by
  turning the fast path off while that variant is traced;
* ``kdface``: the library as shipped (``kdface.models._conv.conv_general_dilated``);
* ``torch eager``: the same network in PyTorch (``benchmarks.torch_models``, insightface's
  MobileFaceNet layout), the same CosFace head and SGD with momentum.

The train step is kdface's trainer step (``make_train_step``, recipe ``scratch``, head
``cosface``: forward, backward, SGD-momentum update, BN statistics) on float32 112x112 images.
The forward is the eval-mode embedding network. Writes the section "Depthwise convolutions on
the CPU" of benchmarks/TRAIN_STEP.md (the rest of the file is kept).
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from unittest import mock

from absl import app, flags

import kdface  # noqa: F401  (sets its XLA CPU flag before the backend starts)

from benchmarks._common import commit, publish_section

flags.DEFINE_integer("batch", 64, "Batch size.")
flags.DEFINE_integer("rounds", 3, "Alternated timing rounds (median reported).")
flags.DEFINE_integer("classes", 1000, "CosFace classes.")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "TRAIN_STEP.md"),
                    "Markdown file whose depthwise section is (re)written.")
F = flags.FLAGS

SECTION = "## Depthwise convolutions on the CPU"
HW = (112, 112)


def _kdface_cases(batch_size, classes, fast):
    """``(forward(), step())`` callables for kdface, each blocking until its result is ready."""
    import jax
    import numpy as np
    import optax
    from flax import nnx
    from kdface.distill import build_recipe, build_student
    from kdface.models import _conv
    from kdface.training import StepConfig, init_health, init_state, make_train_step

    patch = (mock.patch.object(_conv, "_fast_kind", lambda *a: None) if not fast
             else mock.patch.object(_conv, "_fast_kind", _conv._fast_kind))
    student = build_student("mobilefacenet", num_classes=classes, head="cosface",
                            rngs=nnx.Rngs(0))
    cfg = {"head": "cosface", "margin_scale": 64.0, "margin": 0.35}
    recipe = build_recipe("scratch", cfg)
    opt = optax.sgd(0.1, momentum=0.9)
    graphdef, state = init_state(student, opt)
    step = jax.jit(make_train_step(recipe, graphdef, None, opt, StepConfig()),
                   donate_argnums=(0,))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch_size, *HW, 3)).astype(np.float32)
    batch = jax.device_put({"student_image": images,
                            "label": rng.integers(0, classes, batch_size).astype(np.int32)})
    backbone = build_student("mobilefacenet", num_classes=classes, head="cosface",
                             rngs=nnx.Rngs(0)).network.backbone
    backbone.eval()
    bdef, bstate = nnx.split(backbone)

    @jax.jit
    def embed(bstate, x):
        return nnx.merge(bdef, bstate)(x)

    x = jax.device_put(images)
    holder = {"state": state, "health": init_health(recipe)}
    with patch:  # tracing happens on the first call
        jax.block_until_ready(embed(bstate, x))
        holder["state"], holder["health"], metrics = step(holder["state"], holder["health"],
                                                          None, batch)
        jax.block_until_ready(metrics["loss"])

    def forward():
        jax.block_until_ready(embed(bstate, x))

    def train():
        holder["state"], holder["health"], m = step(holder["state"], holder["health"], None,
                                                    batch)
        jax.block_until_ready(m["loss"])

    return forward, train


def _torch_cases(batch_size, classes):
    import numpy as np
    import torch
    from benchmarks.torch_models import CosFaceHead, MobileFaceNet
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    net, head = MobileFaceNet(), CosFaceHead(512, classes)
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.1,
                          momentum=0.9)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.normal(size=(batch_size, 3, *HW)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, classes, batch_size))

    def forward():
        net.eval()
        with torch.no_grad():
            net(images)

    def train():
        net.train()
        opt.zero_grad(set_to_none=True)
        loss = head(net(images), labels)
        loss.backward()
        opt.step()

    return forward, train


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime unavailable"


def main(argv):
    del argv
    load_before = _uptime()
    print(load_before, flush=True)
    cases = {}
    t0 = time.perf_counter()
    cases["torch eager"] = _torch_cases(F.batch, F.classes)
    cases["kdface (XLA conv)"] = _kdface_cases(F.batch, F.classes, fast=False)
    cases["kdface"] = _kdface_cases(F.batch, F.classes, fast=True)
    print(f"built and compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    times = {(name, kind): [] for name in cases for kind in ("forward", "step")}
    for name, (fwd, step) in cases.items():  # warm-up
        fwd(), step()
    for r in range(F.rounds):
        for kind in ("forward", "step"):
            for name, pair in cases.items():
                fn = pair[0] if kind == "forward" else pair[1]
                t = time.perf_counter()
                fn()
                times[name, kind].append(time.perf_counter() - t)
                print(f"round {r} {kind:7s} {name:18s} {times[name, kind][-1] * 1e3:9.1f} ms",
                      flush=True)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    load_after = _uptime()
    torch_fwd, torch_step = med["torch eager", "forward"], med["torch eager", "step"]
    rows = [f"| {name} | {med[name, 'forward']:.0f} | {torch_fwd / med[name, 'forward']:.2f}x "
            f"| {med[name, 'step']:.0f} | {torch_step / med[name, 'step']:.2f}x |"
            for name in cases]
    lines = [
        SECTION,
        "",
        f"Command: `python -m benchmarks.depthwise --batch={F.batch} --rounds={F.rounds} "
        f"--classes={F.classes}` at commit {commit()}.  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no accelerator "
        f"({platform.platform()}), shared with other agents' jobs while measured (load before: "
        f"`{load_before.split('load average:')[-1].strip()}`, after: "
        f"`{load_after.split('load average:')[-1].strip()}`), so read ratios, not absolutes.  ",
        f"MobileFaceNet (Chen et al. 2018, 512-d embedding) at {HW[0]}x{HW[1]}, float32, batch "
        f"{F.batch}; the step adds a CosFace head over {F.classes} classes (s=64, m=0.35), "
        "backward and SGD-momentum update. Alternated rounds, median of "
        f"{F.rounds}. Speed ratio = torch ms / this row's ms (> 1: faster than torch).",
        "",
        "| implementation | forward ms | vs torch eager | train step ms | vs torch eager |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "`kdface (XLA conv)` is the library with every convolution left to XLA's "
        "`lax.conv_general_dilated` (the state before `kdface.models._conv`). `kdface` trains "
        "through `kdface.models._conv.conv_general_dilated`: custom VJPs whose depthwise forward "
        "is a fused sum over the kernel taps, whose depthwise input gradient is that sum's "
        "derivative, whose depthwise weight gradient is a per-channel reduction, and whose 1x1 "
        "convolutions are matrix products; the un-differentiated forward keeps XLA's "
        "convolution (one Conv per layer in traced graphs, e.g. ONNX export), so the forward "
        "column does not change.",
        "",
    ]
    return publish_section(F.out, SECTION, lines)


if __name__ == "__main__":
    sys.exit(app.run(main))
