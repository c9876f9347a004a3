"""The full-size train step of ``python -m benchmarks.train_step --full`` (module docstring of
``benchmarks.train_step``): an IResNet-100 teacher and a MobileFaceNet student at 112x112, kdface
against the same step written in PyTorch the way arcface_torch users write it, plus the
breakdown (input pipeline alone, step alone with the batch already on the device, the loop)."""
from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

HW = (112, 112)
EMBEDDING = 512
TEMPERATURE = 4.0
WEIGHT_DECAY = 5e-4   # insightface's arcface_torch SGD, and kdface's --weight_decay default
RUNAWAY = 1000.0      # kdface's --runaway_factor default
# (label, kdface recipe, teacher: "forward" | "cache" | None)
CASES = (("kd_im, teacher forward", "kd_im", "forward"),
         ("kd_im, teacher cache", "kd_im", "cache"),
         ("student alone (CosFace)", "scratch", None))
# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, no sparsity).
GPU_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0}


@dataclass
class Case:
    label: str
    framework: str
    step: Callable[[], None]
    compile_s: float
    flops: float            # model FLOPs of one step (2 x multiply-adds)
    times: list[float]


def _recipe_config() -> dict[str, Any]:
    return {"head": "cosface", "margin_scale": 64.0, "margin": 0.35, "lambda_hard": 1.0,
            "lambda_soft": 1.0, "lambda_feature": 1.0, "temperature": TEMPERATURE,
            "feature_loss": "mk_mmd"}


def step_flops(student_macs: int, teacher_macs: int, teacher: str | None, batch: int,
               classes: int) -> float:
    """Model FLOPs of one step: the student's forward + backward (3x its forward, the usual
    estimate), its CosFace head (3 x E x C per image), and for kd_im the teacher's forward
    (with ``teacher='forward'``) and the teacher head's logits (E x C per image)."""
    macs = 3 * (student_macs + EMBEDDING * classes)
    if teacher == "forward":
        macs += teacher_macs
    if teacher is not None:
        macs += EMBEDDING * classes
    return 2.0 * batch * macs


def compiled_step(recipe, student, teacher_net, teacher: str | None, opt, step_config,
                  host_batch: dict[str, np.ndarray]) -> tuple[Callable[[], None], float]:
    """kdface's jitted trainer step over ``host_batch`` placed on the device, compiled by a
    first call: ``(run, compile seconds)``; ``run()`` takes one step and blocks on its loss.
    ``teacher``: 'forward' (the teacher network in the step), 'cache' (its head only; the
    batch carries ``teacher_embedding``) or None."""
    import jax
    from kdface.training import init_health, init_state, make_train_step, split_teacher
    graphdef, state = init_state(student, opt)
    teacher_def, teacher_state = (split_teacher(teacher_net, cached=teacher == "cache")
                                  if teacher else (None, None))
    step = jax.jit(make_train_step(recipe, graphdef, teacher_def, opt, step_config),
                   donate_argnums=(0, 1))
    placed = jax.device_put(host_batch)
    holder = {"state": state, "health": init_health(recipe)}

    def run():
        holder["state"], holder["health"], m = step(holder["state"], holder["health"],
                                                    teacher_state, placed)
        jax.block_until_ready(m["loss"])

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0


def jax_cases(batch: int, classes: int, dtype: str, teacher_net) -> tuple[list[Case], dict]:
    """kdface's jitted ``make_train_step`` for each case; batches uint8 on the device."""
    import jax.numpy as jnp
    from flax import nnx
    from kdface.distill import build_recipe, build_student
    from kdface.models import count_macs
    from kdface.training import StepConfig, make_optimizer

    compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, *HW, 3), dtype=np.uint8)
    lr_images = rng.integers(0, 256, (batch, *HW, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, batch).astype(np.int32)
    probe = build_student("mobilefacenet", num_classes=classes, head="cosface", rngs=nnx.Rngs(0))
    macs = {"student": count_macs(probe.network.backbone, HW),
            "teacher": count_macs(teacher_net.backbone, HW)}
    cases = []
    for label, recipe_name, teacher in CASES:
        recipe = build_recipe(recipe_name, _recipe_config())
        student = build_student("mobilefacenet", num_classes=classes, head="cosface",
                                rngs=nnx.Rngs(0))
        # The trainer's optimizer and step settings (what `fit` runs, so the loop row compares
        # like with like): SGD momentum 0.9 with weight decay 5e-4 as L2, the runaway check.
        opt = make_optimizer(optimizer="sgd", learning_rate=0.01, momentum=0.9,
                             weight_decay=WEIGHT_DECAY)
        host = {"student_image": lr_images if teacher else images, "label": labels}
        if teacher == "forward":
            host["teacher_image"] = images
        if teacher == "cache":  # as the teacher cache stores them
            host["teacher_embedding"] = rng.normal(size=(batch, EMBEDDING)).astype(np.float16)
        run, compile_s = compiled_step(
            recipe, student, teacher_net, teacher, opt,
            StepConfig(teacher_cached=teacher == "cache", compute_dtype=compute,
                       runaway_factor=RUNAWAY), host)
        cases.append(Case(label, "kdface", run, compile_s,
                          step_flops(macs["student"], macs["teacher"], teacher, batch, classes),
                          []))
        print(f"  compiled kdface {label}: {cases[-1].compile_s:.1f} s", flush=True)
    return cases, macs


def torch_cases(batch: int, classes: int, dtype: str, flops: dict[str, float]) -> list[Case]:
    """The same steps in PyTorch eager, arcface_torch style: host-normalized float NCHW
    tensors, ``torch.no_grad`` teacher, SGD with momentum over the student and its head."""
    import torch
    from benchmarks.torch_models import CosFaceHead, IResNet, MobileFaceNet, kd_im_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    teacher = IResNet().to(device).eval()
    teacher_weight = torch.randn(EMBEDDING, classes, device=device) * 0.01
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(batch, 3, *HW, generator=g) * 2 - 1).to(device)
    lr_images = (torch.rand(batch, 3, *HW, generator=g) * 2 - 1).to(device)
    labels = torch.randint(0, classes, (batch,), generator=g).to(device)
    cached = torch.randn(batch, EMBEDDING, generator=g).half().to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    cases = []
    for label, _, kind in CASES:
        student, head = MobileFaceNet().to(device), CosFaceHead(EMBEDDING, classes).to(device)
        opt = torch.optim.SGD(list(student.parameters()) + list(head.parameters()), lr=0.01,
                              momentum=0.9, weight_decay=WEIGHT_DECAY)

        def run(student=student, head=head, opt=opt, kind=kind):
            student.train()
            opt.zero_grad(set_to_none=True)
            with autocast:
                if kind == "forward":
                    with torch.no_grad():
                        t_emb = teacher(images)
                elif kind == "cache":
                    t_emb = cached
                s_emb = student(lr_images if kind else images)
                if kind:
                    loss = kd_im_loss(s_emb.float(), t_emb.float(), labels, head,
                                      teacher_weight, temperature=TEMPERATURE)
                else:
                    loss = head(s_emb.float(), labels)
            loss.backward()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()

        t0 = time.perf_counter()
        run()
        cases.append(Case(label, "torch eager", run, time.perf_counter() - t0, flops[label], []))
    return cases


def time_rounds(cases: list[Case], rounds: int) -> None:
    """Per case, alternated rounds of its implementations (kdface, torch eager, kdface, ...),
    so that each ratio compares the two under the same load and memory state; cases run one
    after the other."""
    for label in dict.fromkeys(c.label for c in cases):
        group = [c for c in cases if c.label == label]
        for _ in range(rounds):
            for case in group:
                t0 = time.perf_counter()
                case.step()
                case.times.append(time.perf_counter() - t0)
        print(f"  {label}: " + ", ".join(
            f"{c.framework} {[round(t * 1000) for t in c.times]} ms" for c in group), flush=True)


def _source(n: int, seed: int = 0) -> list[dict]:
    """``n`` JPEG-encoded 112x112 images (smooth noise, face-like JPEG sizes), 10 labels."""
    import cv2
    from kdface.data import encode_image
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        image = cv2.resize(small, HW[::-1], interpolation=cv2.INTER_CUBIC)
        out.append({"image": encode_image(image), "label": i % 10})
    return out


def pipeline_rates(batch: int, batches: int, threads: int) -> list[tuple[str, float]]:
    """Images/s of kdface's input pipeline alone (uint8 two views, as the trainer reads them),
    with the LR view made on the host (OpenCV) and with ``--lr_on_device`` (the host only
    draws each sample's LR size)."""
    from kdface.data import DecideOnlyAugment, LowResolutionAugment, make_training_pipeline
    source = _source(max(4 * batch, 256))
    batches = max(batches, -(-1024 // batch))  # at least 1,024 images: beyond any read-ahead
    rows = []
    for label, on_device in (("LR view on the host", False), ("LR view on the device", True)):
        augment = LowResolutionAugment(seed=0)
        if on_device:
            augment = DecideOnlyAugment(augment)
        pipeline = make_training_pipeline(
            source, global_batch_size=batch, num_devices=1, seed=0, normalize=False,
            student_augment=augment, num_threads=threads,
            prefetch_buffer_size=max(2 * threads, batch) if threads else None)
        iterator = iter(pipeline)
        next(iterator)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        rows.append((f"input pipeline alone, {label} ({threads} grain threads)",
                     batches * batch / (time.perf_counter() - t0)))
        print(f"  {rows[-1][0]}: {rows[-1][1]:.0f} img/s", flush=True)
    return rows


def loop_rate(batch: int, classes: int, steps: int, dtype: str,
              step_alone: Case) -> tuple[float, float]:
    """Images/s that ``kdface.training.fit`` reports for the student-alone case over in-memory
    uint8 batches (the first, compiling step and checkpoint time excluded, as the trainer
    counts them), and the step alone's images/s over the same number of steps timed right
    before and after it (their mean), so that both see the same load."""
    def alone() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            step_alone.step()
        return steps * batch / (time.perf_counter() - t0)

    from kdface.training import ArrayBatches, TrainConfig, fit
    rng = np.random.default_rng(0)
    n = 4 * batch
    images = rng.integers(0, 256, (n, *HW, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, n).astype(np.int32)
    before = alone()
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            workdir=os.path.join(tmp, "loop"), recipe="scratch", student="mobilefacenet",
            head="cosface", margin_scale=64.0, margin=0.35, batch_size=batch, steps=steps + 1,
            learning_rate=0.01, schedule="constant", log_every=steps + 1, save_every=steps + 1,
            async_checkpoints=False, progress=False, bf16=dtype == "bfloat16",
            weight_decay=WEIGHT_DECAY, runaway_factor=RUNAWAY)
        summary = fit(config, ArrayBatches(images, labels, batch_size=batch),
                      num_classes=classes)
    return float(summary["metrics"]["images_per_s"]), (before + alone()) / 2


def peak_flops(dtype: str) -> tuple[float | None, str]:
    """The machine's peak (FLOP/s) that MFU is relative to, and where it comes from."""
    import jax
    device = jax.devices()[0]
    if device.platform == "gpu":
        for name, tflops in GPU_PEAK_TFLOPS.items():
            if name in device.device_kind:
                return tflops * 1e12, f"{device.device_kind} dense bf16 data-sheet peak"
        return None, f"{device.device_kind}: no peak on record"
    from benchmarks._measure import gemm_gflops
    rate = gemm_gflops(2048, 3)["jax"] * 1e9
    return rate, f"measured JAX float32 2048^3 GEMM on this CPU ({rate / 1e9:.0f} GFLOP/s)"


def machine_line() -> str:
    import jax
    devices = jax.devices()
    kind = devices[0].device_kind if devices[0].platform != "cpu" else "no accelerator"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {kind} "
            f"({platform.platform()}), load {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
