"""The training loop: one loop for every recipe, data-parallel over all devices.

``fit(config, batches, ...)`` builds the networks the recipe names, loads the frozen teacher
params-only, resumes from the latest checkpoint in ``config.workdir`` if there is one, and runs
the jitted step over a ``data`` mesh (jit over NamedSharding(mesh, P('data')); the
global batch is split across devices and, under jit, BatchNorm statistics and relational losses
see the global batch, or groups of ``relation_group_size`` of it).

``batches`` is any iterator of dicts of host NumPy arrays (this process's share of the global
batch) with ``get_state()`` / ``set_state(state)`` (the data iterator's resumable position).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from contextlib import nullcontext
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kdface.data import device_put_batch, normalize_images
from kdface.distill import DistillStudent, FaceNetwork, Recipe, build_recipe
from kdface.training._checkpoint import Checkpoints
from kdface.training._config import TrainConfig
from kdface.training._logging import RunLog
from kdface.training._optim import learning_rate_schedule, make_optimizer, resolve_schedule
from kdface.training._restore import (build_run_student, init_from_run, read_run_config,
                                      restore_run)
from kdface.training._placement import place_state, student_shardings
from kdface.training._prefetch import DevicePrefetcher
from kdface.training._validate import check_teacher_flags, check_workdir
from kdface.training._step import (StepConfig, init_health, init_state, make_train_step,
                                   split_teacher)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the term(s)."""


@dataclasses.dataclass
class VerificationSet:
    """A verification set for periodic evaluation: images [2P, H, W, 3] uint8, issame [P]."""
    name: str
    images: np.ndarray
    issame: np.ndarray


def data_mesh() -> jax.sharding.Mesh:
    """A 1-D ``data`` mesh over every device (Auto axis type: ``jax.make_mesh`` defaults to
    Explicit axes)."""
    return jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Places this process's share of the global batch onto the mesh's ``data`` axis."""
    return device_put_batch(batch, NamedSharding(mesh, P("data")))


def build_teacher(config: TrainConfig, num_classes: int, recipe: Recipe) -> FaceNetwork | None:
    """The frozen teacher: the network of the kdface run in ``--teacher_checkpoint``, rebuilt
    from that run's config.json (``restore_run``), or a third-party pretrained one named
    ``pth:[ARCH:]PATH`` / ``onnx:[ARCH:]PATH`` (kdface.interop). ``--teacher`` and
    ``--teacher_options`` may restate the run's architecture but never contradict it."""
    if not recipe.needs_teacher:
        return None
    from kdface import interop
    if config.teacher and interop.is_imported_teacher(config.teacher):
        return interop.imported_teacher(config.teacher, recipe, num_classes=num_classes,
                                        input_size=tuple(config.input_size),
                                        options=config.teacher_options)
    if not config.teacher_checkpoint:
        raise ValueError(f"recipe {recipe.name!r} needs --teacher_checkpoint (the workdir of a "
                         f"kdface run of the teacher) or --teacher=pth:PATH / onnx:PATH")
    if not os.path.isdir(config.teacher_checkpoint):
        raise FileNotFoundError(f"teacher checkpoint {config.teacher_checkpoint} not found")
    teacher_config, _ = read_run_config(config.teacher_checkpoint)
    check_teacher_flags(config, teacher_config)
    teacher = restore_run(config.teacher_checkpoint).network
    teacher.eval()
    return teacher


def _check_shapes(config: TrainConfig, recipe: Recipe, student: DistillStudent,
                  teacher: FaceNetwork | None) -> None:
    """Config mistakes that would otherwise surface deep inside compilation."""
    n_dev = jax.device_count()
    if config.batch_size % n_dev:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                         f"{n_dev} devices")
    if teacher is None:
        return
    s_size = student.network.backbone.embedding_size
    t_size = teacher.backbone.embedding_size
    same_embedding = recipe.requiring("same_embedding")
    if s_size != t_size and same_embedding:
        raise ValueError(f"student embedding {s_size} != teacher embedding {t_size}: the "
                         f"recipe's terms {list(same_embedding)} compare embeddings directly")
    same_classes = recipe.requiring("same_classes")
    s_classes, t_classes = student.network.num_classes, teacher.num_classes
    if s_classes != t_classes and same_classes:
        raise ValueError(f"terms {list(same_classes)} compare class logits, which needs the same "
                         f"classes: student {s_classes}, teacher {t_classes}")


def init_key(seed: int) -> jax.Array:
    """The key networks are initialized from: the 'rbg' generator, whose initializers compile
    in a fraction of threefry's time on CPU (measured here: ~0.8 s vs ~14 s per new parameter
    shape under load) and which is the recommended generator on TPU."""
    return jax.random.key(seed, impl="rbg")


def make_student(config: TrainConfig, num_classes: int, recipe: Recipe,
                 teacher: FaceNetwork | None) -> DistillStudent:
    """The freshly initialized student (``build_run_student``), or, with ``--init_checkpoint``,
    initialized from that run (Nikitin et al. 2020 / Wang et al. 2017: a pretrained student)."""
    shapes = teacher_stage_shapes(config, recipe, teacher)
    student = build_run_student(config, num_classes=num_classes, head=recipe.head,
                                landmark_head=recipe.landmark_head,
                                rngs=nnx.Rngs(init_key(config.seed)),
                                teacher_stage_shapes=shapes)
    if config.init_checkpoint:
        copied = init_from_run(student, config.init_checkpoint)
        present = {"head": student.network.head, "adapters": student.adapters,
                   "landmark_head": student.network.landmark_head}
        skipped = [n for n, part in present.items() if part is not None and n not in copied]
        if skipped:
            logging.warning("--init_checkpoint %s: %s keep their fresh initialization (not in "
                            "that run, or of other shapes)", config.init_checkpoint, skipped)
    return student


def teacher_stage_shapes(config: TrainConfig, recipe: Recipe, teacher: FaceNetwork | None):
    """The teacher's four stage shapes at ``--input_size`` when the recipe adapts the student's
    stages to them, else None."""
    if not recipe.adapters:
        return None
    if teacher is None:
        raise ValueError(f"recipe {recipe.name!r} adapts the student's stages to the teacher's, "
                         f"so it needs a teacher (--teacher_checkpoint)")
    return [list(s) for s in teacher.backbone.stage_shapes(tuple(config.input_size))]


def _embed_fn(graphdef):
    @jax.jit
    def embed(params, rest, images):
        student = nnx.merge(graphdef, params, rest, copy=True)
        student.eval()
        return student.network(images)["embedding"]
    return embed


def check_health(health: dict[str, Any], *, start: int, step: int, last_good: int | None,
                 factor: float) -> None:
    """Raises ``NonFiniteLossError`` when the steps since the last check (``start`` < s <=
    ``step``) met a non-finite or runaway loss; the step's state is the last good one."""
    first_bad, first_runaway = int(health["first_bad"]), int(health["first_runaway"])
    if first_bad < 0 and first_runaway < 0:
        return
    base = step - int(health["steps"])  # the loop step before the first step of this process
    values = {k: float(v) for k, v in health["bad_values"].items()}
    last_applied = min(s for s in (first_bad, first_runaway) if s >= 0) + base - 1
    resume = (f"nothing after step {last_applied}"
              f" was applied or saved; last good checkpoint: {last_good}. Rerun the same "
              f"command with a lower --learning_rate or a --clip_norm to resume from it")
    if first_bad >= 0 and (first_runaway < 0 or first_bad <= first_runaway):
        bad = [k for k, v in values.items() if not np.isfinite(v)]
        if not bad and not bool(health["grads_finite"]):
            bad = ["gradients"]
        raise NonFiniteLossError(
            f"non-finite loss at step {first_bad + base} (checked at step {step}, last check "
            f"{start}) in term(s) {bad or ['gradients']}; {resume}")
    raise NonFiniteLossError(
        f"the loss ran away at step {first_runaway + base}: {values['loss']:.4g} > "
        f"--runaway_factor={factor:g} x the first step's {float(health['reference_loss']):.4g}"
        f" (terms {({k: round(v, 4) for k, v in values.items() if k != 'loss'})}); {resume}")


def steady_state_guard(level: str):
    """The context steady-state steps run in: ``jax.transfer_guard_device_to_host(level)``
    ('disallow' turns any hidden device-to-host read into an error on accelerators; on the CPU
    backend JAX reads device buffers in place, so tests add their own check of host reads)."""
    return jax.transfer_guard_device_to_host(level)


def evaluate_verification(embed: Callable, params, rest, sets: Sequence[VerificationSet], *,
                          batch_size: int = 64, step: int | None = None) -> dict[str, float]:
    """10-fold verification accuracy of the current student on each set; embeddings that are
    not finite end in ``NonFiniteLossError`` naming the set and the step."""
    from kdface import metrics
    from kdface._progress import progress
    out = {}
    for vs in sets:
        chunks = []
        # thousands of pairs take minutes on a CPU: a bar that disappears when done
        bar = progress(total=len(vs.images), desc=f"verifying on {vs.name}", unit="img",
                       leave=False)
        for i in range(0, len(vs.images), batch_size):
            chunk = normalize_images(vs.images[i:i + batch_size])
            chunks.append(np.asarray(embed(params, rest, jnp.asarray(chunk))))
            bar.update(len(chunk))
        bar.close()
        emb = np.concatenate(chunks)
        if not np.all(np.isfinite(emb)):
            raise NonFiniteLossError(
                f"the student's embeddings of {vs.name} are not finite at step {step}: the "
                f"weights diverged; rerun with a lower --learning_rate or --clip_norm")
        result = metrics.verification(emb[0::2], emb[1::2], vs.issame)
        out[f"{vs.name}_accuracy"] = float(result["accuracy"])
    return out


def fit(config: TrainConfig, batches, *, num_classes: int,
        val_sets: Sequence[VerificationSet] = (), teacher_cache=None,
        num_examples: int | None = None) -> dict[str, Any]:
    """Trains ``config.recipe`` for its steps (``--steps``, or ``--epochs`` over
    ``num_examples`` training images, by default ``batches.num_examples``), resuming if a
    checkpoint exists.

    Returns a summary: final step, last metrics, validation metrics, images/s, workdir.
    """
    recipe = build_recipe(config.recipe, config)
    teacher = build_teacher(config, num_classes, recipe)
    student = make_student(config, num_classes, recipe, teacher)
    _check_shapes(config, recipe, student, teacher)
    if config.teacher_cache and teacher_cache is None and recipe.needs_teacher:
        raise ValueError("teacher_cache=True needs a TeacherCache (see kdface.training)")

    if num_examples is None:
        num_examples = getattr(batches, "num_examples", None)
    plan = resolve_schedule(config, num_examples)
    total_steps = plan.steps
    schedule = learning_rate_schedule(
        base_lr=config.learning_rate, total_steps=total_steps, schedule=config.schedule,
        warmup_steps=plan.warmup_steps, decay_steps=plan.decay_steps,
        decay_factor=config.decay_factor)
    optimizer = make_optimizer(**{
        "optimizer": config.optimizer, "learning_rate": schedule, "momentum": config.momentum,
        "nesterov": config.nesterov, "weight_decay": config.weight_decay,
        "clip_norm": config.clip_norm or None, **recipe.optimizer})
    mesh = data_mesh()
    # Before the split: a sharded head carries its output placement in the graphdef.
    param_shardings = student_shardings(config, student, mesh, num_classes)
    graphdef, state = init_state(student, optimizer)
    teacher_def, teacher_state = split_teacher(teacher) if teacher is not None else (None, None)

    main = jax.process_index() == 0
    check_workdir(config, {"num_classes": num_classes, "head_used": recipe.head})
    os.makedirs(config.workdir, exist_ok=True)
    if main:
        with open(os.path.join(config.workdir, "config.json"), "w") as f:
            json.dump({**config.as_dict(), "head_used": recipe.head,
                       "num_classes": num_classes, "landmark_head": recipe.landmark_head,
                       "adapters": recipe.adapters,
                       "teacher_stage_shapes": teacher_stage_shapes(config, recipe, teacher),
                       "resolved_steps": total_steps, "resolved_decay_steps": plan.decay_steps,
                       "resolved_warmup_steps": plan.warmup_steps},
                      f, indent=1, default=list)
    checkpoints = Checkpoints(os.path.join(config.workdir, "checkpoints"), keep=config.keep,
                              keep_best=config.keep_best if val_sets else 0,
                              async_save=config.async_checkpoints)
    start = checkpoints.latest_step()
    if start is not None:
        state, meta = checkpoints.restore(start, state)
        batches.set_state(meta["data"])
    start = start or 0

    replicated = NamedSharding(mesh, P())
    state = place_state(state, param_shardings, optimizer, replicated)
    device_lr = None
    if config.lr_on_device and recipe.student_view == "low_resolution":
        from kdface.data import DeviceLowResolution
        device_lr = DeviceLowResolution(tuple(config.input_size), tuple(config.lr_sizes))
    if teacher_cache is not None and teacher is not None:
        teacher_def, teacher_state = split_teacher(teacher, cached=True)
    if teacher_state is not None:
        teacher_state = jax.device_put(teacher_state, replicated)
    step_config = StepConfig(
        relation_groups=config.relation_groups,
        compute_dtype=jnp.bfloat16 if config.bf16 else jnp.float32,
        teacher_cached=teacher_cache is not None, device_lr=device_lr,
        runaway_factor=float(config.runaway_factor))
    step_fn = jax.jit(make_train_step(recipe, graphdef, teacher_def, optimizer, step_config),
                      donate_argnums=(0, 1))
    embed = _embed_fn(graphdef)
    log = RunLog(os.path.join(config.workdir, "logs"), enabled=main and config.progress,
                 total_steps=total_steps, hparams=config.as_dict())
    keep = {"student_image", "teacher_image", "label", "landmarks"}
    if device_lr is not None:
        keep.add("student_size")
    if teacher_cache is not None:
        keep.discard("teacher_image")

    def place(batch):
        if teacher_cache is not None and recipe.needs_teacher:
            batch = teacher_cache.attach(batch)
            keep.add("teacher_embedding")
        return shard_batch({k: v for k, v in batch.items() if k in keep}, mesh)

    feed = DevicePrefetcher(batches, place, depth=max(1, config.prefetch))
    health = jax.device_put(init_health(recipe), replicated)
    last, val, images_seen, t0, excluded = {}, {}, 0, None, 0.0
    checked = start
    if main and config.progress and start < total_steps:
        # the first step compiles the networks and the loss: minutes for a full-size teacher
        print("kdface.train: compiling the train step (first step)...", file=sys.stderr,
              flush=True)
    try:
        for step in range(start + 1, total_steps + 1):
            is_log = step % config.log_every == 0 or step == total_steps
            is_eval = bool(val_sets) and (step % config.eval_every == 0 or step == total_steps)
            is_save = step % config.save_every == 0 or step == total_steps
            steady = t0 is not None and not (is_log or is_eval or is_save)
            # Steady state: take a placed batch and dispatch; nothing comes back to the host.
            with steady_state_guard(config.transfer_guard) if steady else nullcontext():
                batch = next(feed)
                state, health, metrics = step_fn(state, health, teacher_state, batch)
            if t0 is None:
                jax.block_until_ready(metrics["loss"])
                t0 = time.perf_counter()  # after the first (compiling) step
            else:
                images_seen += config.batch_size
            if not (is_log or is_eval or is_save):
                continue
            check_health(jax.device_get(health), start=checked, step=step,
                         last_good=checkpoints.latest_step(), factor=config.runaway_factor)
            checked = step
            if is_log:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()
                        if k != "finite"}
                if images_seen:
                    last["images_per_s"] = images_seen / (time.perf_counter() - t0 - excluded)
                log.log(step, last)
                log.progress(step, last)
            paused = time.perf_counter()
            if is_eval:
                val = evaluate_verification(embed, state["params"], state["rest"], val_sets,
                                            step=step)
                val["val_accuracy"] = float(np.mean(list(val.values())))
                log.log(step, val, kind="val")
            if is_save:
                checkpoints.save(step, state, {"data": feed.get_state(), "step": step},
                                 metrics=dict(val) if is_eval else None,
                                 force=step == total_steps)
            excluded += time.perf_counter() - paused  # images/s counts training time only
    finally:
        feed.close()
        checkpoints.close()
        log.close()
    return {"step": int(state["step"]), "metrics": last, "val": val,
            "workdir": config.workdir, "recipe": recipe.name}
