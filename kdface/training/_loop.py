"""The training loop: one loop for every recipe, data-parallel over all devices.

``fit(config, batches, ...)`` builds the networks the recipe names, loads the frozen teacher
params-only, resumes from the latest checkpoint in ``config.workdir`` if there is one, and runs
the jitted step over a ``data`` mesh (DESIGN.md: jit over NamedSharding(mesh, P('data')); the
global batch is split across devices and, under jit, BatchNorm statistics and relational losses
see the global batch unless ``relation_scope='device'``).

``batches`` is any iterator of dicts of host NumPy arrays (this process's share of the global
batch) with ``get_state()`` / ``set_state(state)`` (the data iterator's resumable position).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kdface.data import normalize_images
from kdface.distill._networks import DistillStudent, FaceNetwork
from kdface.distill._recipes import Recipe, build_recipe
from kdface.training._checkpoint import Checkpoints
from kdface.training._config import TrainConfig
from kdface.training._logging import RunLog
from kdface.training._optim import learning_rate_schedule, make_optimizer, resolve_schedule
from kdface.training._restore import (build_run_student, init_from_run, read_run_config,
                                      restore_run)
from kdface.training._step import StepConfig, init_state, make_train_step, split_teacher


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the term(s)."""


@dataclasses.dataclass
class VerificationSet:
    """A verification set for periodic evaluation: images [2P, H, W, 3] uint8, issame [P]."""
    name: str
    images: np.ndarray
    issame: np.ndarray


def data_mesh() -> jax.sharding.Mesh:
    """A 1-D ``data`` mesh over every device (Auto axis type: DESIGN.md pitfall)."""
    return jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Places this process's share of the global batch onto the mesh's ``data`` axis."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


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


def _comparable(options: dict[str, Any]) -> dict[str, Any]:
    """Options as JSON sees them (tuples and lists alike), without the input size."""
    out = json.loads(json.dumps(dict(options or {}), default=list))
    out.pop("input_size", None)
    return out


def check_teacher_flags(config: TrainConfig, teacher: TrainConfig) -> None:
    """Refuses ``--teacher`` / ``--teacher_options`` / ``--input_size`` that contradict the
    teacher run ``teacher`` (the architecture comes from the run; the flags may restate it)."""
    where = config.teacher_checkpoint
    if config.teacher and config.teacher != teacher.student:
        raise ValueError(f"--teacher={config.teacher} contradicts the teacher run {where}, which "
                         f"trained --student={teacher.student}; leave --teacher out")
    if config.teacher_options and (_comparable(config.teacher_options)
                                   != _comparable(teacher.student_options)):
        raise ValueError(f"--teacher_options={config.teacher_options} contradict the teacher run "
                         f"{where}, trained with --student_options={teacher.student_options}; "
                         f"leave --teacher_options out")
    if tuple(teacher.input_size) != tuple(config.input_size):
        raise ValueError(f"the teacher run {where} was trained at --input_size="
                         f"{','.join(map(str, teacher.input_size))}, this run feeds "
                         f"{','.join(map(str, config.input_size))}; use the teacher's size")


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
    initialized from that run (seed nikitin2020 / kd_transfer: a pretrained student)."""
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


def evaluate_verification(embed: Callable, params, rest, sets: Sequence[VerificationSet], *,
                          batch_size: int = 64) -> dict[str, float]:
    """10-fold verification accuracy of the current student on each set."""
    from kdface import metrics
    out = {}
    for vs in sets:
        chunks = []
        for i in range(0, len(vs.images), batch_size):
            chunk = normalize_images(vs.images[i:i + batch_size])
            chunks.append(np.asarray(embed(params, rest, jnp.asarray(chunk))))
        emb = np.concatenate(chunks)
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
    graphdef, state = init_state(student, optimizer)
    teacher_def, teacher_state = split_teacher(teacher) if teacher is not None else (None, None)

    main = jax.process_index() == 0
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

    mesh = data_mesh()
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(state, replicated)
    if teacher_state is not None:
        teacher_state = jax.device_put(teacher_state, replicated)
    n_dev = jax.device_count()
    step_config = StepConfig(
        relation_groups=n_dev if config.relation_scope == "device" else 1,
        compute_dtype=jnp.bfloat16 if config.bf16 else jnp.float32,
        teacher_cached=teacher_cache is not None)
    step_fn = jax.jit(make_train_step(recipe, graphdef, teacher_def if teacher_cache is None
                                      else None, optimizer, step_config),
                      donate_argnums=(0,))
    embed = _embed_fn(graphdef)
    log = RunLog(os.path.join(config.workdir, "logs"), enabled=main and config.progress,
                 total_steps=total_steps)
    last, val, images_seen, t0 = {}, {}, 0, None
    try:
        for step in range(start + 1, total_steps + 1):
            batch = next(batches)
            if teacher_cache is not None and recipe.needs_teacher:
                batch = teacher_cache.attach(batch)
            batch.pop("index", None)
            batch.pop("flipped", None)
            state, metrics = step_fn(state, teacher_state, shard_batch(batch, mesh))
            if not bool(metrics["finite"]):
                bad = [k for k, v in metrics.items() if k not in ("finite",)
                       and not np.isfinite(float(v))]
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} in term(s) {bad or ['gradients']}; "
                    f"stopped without saving (last good checkpoint: "
                    f"{checkpoints.latest_step()})")
            if t0 is None:
                t0 = time.perf_counter()  # after the first (compiling) step
            else:
                images_seen += config.batch_size
            if step % config.log_every == 0 or step == total_steps:
                last = {k: float(v) for k, v in metrics.items() if k != "finite"}
                if images_seen:
                    last["images_per_s"] = images_seen / (time.perf_counter() - t0)
                log.log(step, last)
                log.progress(step, last)
            is_eval = val_sets and (step % config.eval_every == 0 or step == total_steps)
            if is_eval:
                val = evaluate_verification(embed, state["params"], state["rest"], val_sets)
                val["val_accuracy"] = float(np.mean(list(val.values())))
                log.log(step, val, kind="val")
            if step % config.save_every == 0 or step == total_steps:
                checkpoints.save(step, state, {"data": batches.get_state(), "step": step},
                                 metrics=dict(val) if is_eval else None,
                                 force=step == total_steps)
    finally:
        checkpoints.close()
        log.close()
    return {"step": int(state["step"]), "metrics": last, "val": val,
            "workdir": config.workdir, "recipe": recipe.name}
