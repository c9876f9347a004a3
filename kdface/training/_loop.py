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
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kdface import models
from kdface.distill._networks import DistillStudent, FaceNetwork, build_student
from kdface.distill._recipes import Recipe, build_recipe
from kdface.training._checkpoint import Checkpoints, load_model_weights
from kdface.training._config import TrainConfig
from kdface.training._logging import RunLog
from kdface.training._optim import learning_rate_schedule, make_optimizer
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
    """The frozen teacher, loaded params-only from a ``scratch`` run's checkpoint, or a
    third-party pretrained one named ``pth:[ARCH:]PATH`` / ``onnx:[ARCH:]PATH`` (kdface.interop)."""
    if not recipe.needs_teacher:
        return None
    if not config.teacher:
        raise ValueError(f"recipe {recipe.name!r} needs --teacher (a backbone name)")
    from kdface import interop
    if interop.is_imported_teacher(config.teacher):
        return interop.imported_teacher(config.teacher, recipe, num_classes=num_classes,
                                        input_size=tuple(config.input_size),
                                        options=config.teacher_options)
    if not config.teacher_checkpoint:
        raise ValueError(f"recipe {recipe.name!r} needs --teacher_checkpoint (the workdir of a "
                         f"'scratch' run of the teacher)")
    if not os.path.isdir(config.teacher_checkpoint):
        raise FileNotFoundError(f"teacher checkpoint {config.teacher_checkpoint} not found")
    meta_head = _checkpoint_head(config.teacher_checkpoint)
    # Built abstractly: random initialization would only be overwritten (and on CPU it
    # compiles one initializer per parameter shape).
    shell = nnx.eval_shape(lambda: build_student(
        config.teacher, num_classes=num_classes, head=meta_head, rngs=nnx.Rngs(0),
        backbone_options=config.teacher_options, logit_scale=config.margin_scale))
    graphdef, params, rest = nnx.split(shell, nnx.Param, ...)
    weights, _ = load_model_weights(config.teacher_checkpoint, {"params": params, "rest": rest})
    teacher = nnx.merge(graphdef, weights["params"], weights["rest"]).network
    teacher.eval()
    return teacher


def _checkpoint_head(directory: str) -> str:
    """The classifier head a checkpointed run was trained with (from its run config)."""
    import json
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} missing: is {directory} a kdface training workdir?")
    with open(path) as f:
        return json.load(f)["head_used"]


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
    student = build_student(
        config.student, num_classes=num_classes, head=recipe.head,
        rngs=nnx.Rngs(init_key(config.seed)), backbone_options=config.student_options,
        logit_scale=config.margin_scale, landmark_head=recipe.landmark_head,
        adapt_to=teacher.backbone if recipe.adapters else None, input_hw=config.input_size)
    if config.init_checkpoint:
        # Seed nikitin2020 / kd_transfer: start from a pretrained student (params-only).
        _, params, rest = nnx.split(student, nnx.Param, ...)
        weights, _ = load_model_weights(config.init_checkpoint,
                                        {"params": params, "rest": rest})
        nnx.update(student, weights["params"], weights["rest"])
    return student


def _embed_fn(graphdef):
    @jax.jit
    def embed(params, rest, images):
        student = nnx.merge(graphdef, params, rest, copy=True)
        student.eval()
        return student.network(images)["embedding"]
    return embed


def normalize_images(images: np.ndarray) -> np.ndarray:
    """uint8 [.., H, W, 3] -> float32 ((x / 255) - 0.5) / 0.5, the pipeline's normalization."""
    return (images.astype(np.float32) / 255.0 - 0.5) / 0.5


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
        val_sets: Sequence[VerificationSet] = (), teacher_cache=None) -> dict[str, Any]:
    """Trains ``config.recipe`` for ``config.steps`` steps (resuming if a checkpoint exists).

    Returns a summary: final step, last metrics, validation metrics, images/s, workdir.
    """
    import json
    recipe = build_recipe(config.recipe, config)
    teacher = build_teacher(config, num_classes, recipe)
    student = make_student(config, num_classes, recipe, teacher)
    _check_shapes(config, recipe, student, teacher)
    if config.teacher_cache and teacher_cache is None and recipe.needs_teacher:
        raise ValueError("teacher_cache=True needs a TeacherCache (see kdface.training)")

    schedule = learning_rate_schedule(
        base_lr=config.learning_rate, total_steps=config.steps, schedule=config.schedule,
        warmup_steps=config.warmup_steps, decay_steps=config.decay_steps,
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
                       "num_classes": num_classes}, f, indent=1, default=list)
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
                 total_steps=config.steps)
    last, val, images_seen, t0 = {}, {}, 0, None
    try:
        for step in range(start + 1, config.steps + 1):
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
            if step % config.log_every == 0 or step == config.steps:
                last = {k: float(v) for k, v in metrics.items() if k != "finite"}
                if images_seen:
                    last["images_per_s"] = images_seen / (time.perf_counter() - t0)
                log.log(step, last)
                log.progress(step, last)
            is_eval = val_sets and (step % config.eval_every == 0 or step == config.steps)
            if is_eval:
                val = evaluate_verification(embed, state["params"], state["rest"], val_sets)
                val["val_accuracy"] = float(np.mean(list(val.values())))
                log.log(step, val, kind="val")
            if step % config.save_every == 0 or step == config.steps:
                checkpoints.save(step, state, {"data": batches.get_state(), "step": step},
                                 metrics=dict(val) if is_eval else None,
                                 force=step == config.steps)
    finally:
        checkpoints.close()
        log.close()
    return {"step": int(state["step"]), "metrics": last, "val": val,
            "workdir": config.workdir, "recipe": recipe.name}
