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
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kdface.data import device_put_batch, normalize_images
from kdface.training._checkpoint import Checkpoints
from kdface.training._config import TrainConfig
from kdface.training._logging import RunLog
from kdface.training._optim import learning_rate_schedule, make_optimizer
from kdface.training._placement import (class_sharding, place_state, student_shardings,
                                        teacher_shardings, term_shardings, term_state_shapes)
from kdface.training._prefetch import DevicePrefetcher
from kdface.training._networks import build_networks
from kdface.training._plan import DataFacts, FitPlan, plan_fit
from kdface.training._step import (StepConfig, init_health, init_state, make_train_step,
                                   split_teacher)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the term(s)."""


@dataclasses.dataclass
class VerificationSet:
    """A verification set for periodic evaluation: images [2P, H, W, 3] uint8, issame [P];
    folds: the fold count its pair list declares (None: unknown), named when --folds is too
    large for it."""
    name: str
    images: np.ndarray
    issame: np.ndarray
    folds: int | None = None


def check_verification_folds(sets: Sequence[VerificationSet], folds: int) -> None:
    """Refuses ``--folds`` larger than a set's pair count, in one line naming the set and the
    fix, before any step is trained (``kdface.metrics.verification`` would fail at the first
    evaluation, after the steps)."""
    from kdface.evaluation._protocols import check_fold_count
    check_fold_count({vs.name: int(np.asarray(vs.issame).size) for vs in sets}, folds,
                     own_folds={vs.name: vs.folds for vs in sets})


def data_mesh() -> jax.sharding.Mesh:
    """A 1-D ``data`` mesh over every device (Auto axis type: ``jax.make_mesh`` defaults to
    Explicit axes)."""
    return jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Places this process's share of the global batch onto the mesh's ``data`` axis."""
    return device_put_batch(batch, NamedSharding(mesh, P("data")))


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
                          batch_size: int = 64, step: int | None = None,
                          folds: int = 10) -> dict[str, float]:
    """``folds``-fold verification accuracy of the current student on each set (``--folds``);
    embeddings that are not finite end in ``NonFiniteLossError`` naming the set and the step."""
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
        result = metrics.verification(emb[0::2], emb[1::2], vs.issame, folds=folds)
        out[f"{vs.name}_accuracy"] = float(result["accuracy"])
    return out


def run_optimizer(plan: FitPlan):
    """The plan's optimizer: its schedule, ``--optimizer`` and the recipe's optimizer options."""
    config = plan.config
    schedule = learning_rate_schedule(
        base_lr=config.learning_rate, total_steps=plan.schedule.steps,
        schedule=config.schedule, warmup_steps=plan.schedule.warmup_steps,
        decay_steps=plan.schedule.decay_steps, decay_factor=config.decay_factor)
    return make_optimizer(**{
        "optimizer": config.optimizer, "learning_rate": schedule, "momentum": config.momentum,
        "nesterov": config.nesterov, "weight_decay": config.weight_decay,
        "clip_norm": config.clip_norm or None, **plan.recipe.optimizer})


def device_low_resolution(plan: FitPlan):
    """The on-device LR degradation (``--lr_on_device`` with an LR student view), or None."""
    config = plan.config
    if not (config.lr_on_device and plan.recipe.student_view == "low_resolution"):
        return None
    from kdface.data import DeviceLowResolution
    return DeviceLowResolution(tuple(config.input_size), tuple(config.lr_sizes))


def run_step_config(plan: FitPlan, *, teacher_cached: bool, device_lr,
                    mesh=None) -> StepConfig:
    """What the jitted step is specialized on: relation groups, compute dtype, teacher cache,
    on-device LR, the runaway guard, and (given the ``mesh``) where a term state's class axis
    lives."""
    config = plan.config
    split = None
    if mesh is not None and plan.recipe.class_axis_states() and plan.num_classes:
        split = class_sharding(plan.head, mesh, plan.num_classes)
    return StepConfig(relation_groups=config.relation_groups,
                      compute_dtype=jnp.bfloat16 if config.bf16 else jnp.float32,
                      teacher_cached=teacher_cached, device_lr=device_lr,
                      runaway_factor=float(config.runaway_factor), classes=plan.num_classes,
                      class_sharding=split)


def initial_term_states(plan: FitPlan, student) -> dict[str, Any]:
    """The recipe's term states before the first step (empty when no term carries any), sized
    from the student's embedding and the plan's classes and head placement, drawn from the
    run's seed."""
    if not plan.recipe.stateful_terms:
        return {}
    if not plan.num_classes:
        raise ValueError(f"recipe {plan.recipe.name!r} has terms with state; the plan needs the "
                         f"data's class count")
    shapes = term_state_shapes(plan.head, plan.num_classes,
                               student.network.backbone.embedding_size)
    # fold_in: the state's draws differ from the networks' (which start from the same seed)
    key = jax.random.fold_in(jax.random.key(plan.config.seed), 0x7e57a7e)
    return plan.recipe.init_term_states(shapes, key)


def fit(config: TrainConfig, batches, *, num_classes: int,
        val_sets: Sequence[VerificationSet] = (), teacher_cache=None,
        num_examples: int | None = None) -> dict[str, Any]:
    """Plans (``plan_fit``: every check) and trains ``config.recipe`` for its steps
    (``--steps``, or ``--epochs`` over ``num_examples`` training images, by default
    ``batches.num_examples``), resuming if a checkpoint exists (``fit_plan``)."""
    if num_examples is None:
        num_examples = getattr(batches, "num_examples", None)
    plan = plan_fit(config, data=DataFacts(num_classes, num_examples),
                    devices=jax.device_count())
    return fit_plan(plan, batches, val_sets=val_sets, teacher_cache=teacher_cache)


def fit_plan(plan: FitPlan, batches, *, val_sets: Sequence[VerificationSet] = (),
             teacher_cache=None) -> dict[str, Any]:
    """Runs one planned training-loop run (see module docstring). Returns a summary: final
    step, last metrics, validation metrics, images/s, workdir."""
    config, recipe = plan.config, plan.recipe
    check_verification_folds(val_sets, config.folds)
    if plan.devices != jax.device_count():
        raise ValueError(f"the plan is for {plan.devices} devices, this process sees "
                         f"{jax.device_count()}")
    student, teacher = build_networks(plan)
    if config.teacher_cache and teacher_cache is None and recipe.needs_teacher:
        raise ValueError("teacher_cache=True needs a TeacherCache (see kdface.training)")

    total_steps = plan.schedule.steps
    optimizer = run_optimizer(plan)
    mesh = data_mesh()
    # Before the split: a sharded head carries its output placement in the graphdef and its
    # padded weight in the params.
    param_shardings = student_shardings(plan.head, student, mesh)
    graphdef, state = init_state(student, optimizer, initial_term_states(plan, student))
    cached = teacher_cache is not None
    teacher_def = teacher_state = teacher_placement = None
    if teacher is not None:
        teacher_placement = teacher_shardings(plan.head, teacher, mesh, cached=cached)
        teacher_def, teacher_state = split_teacher(teacher, cached=cached)

    main = jax.process_index() == 0
    os.makedirs(config.workdir, exist_ok=True)
    if main:
        with open(os.path.join(config.workdir, "config.json"), "w") as f:
            json.dump(plan.config_json(), f, indent=1, default=list)
    checkpoints = Checkpoints(os.path.join(config.workdir, "checkpoints"), keep=config.keep,
                              keep_best=config.keep_best if val_sets else 0,
                              async_save=config.async_checkpoints,
                              head_classes=plan.num_classes,
                              class_axes=recipe.class_axis_states())
    start = checkpoints.latest_step()
    if start is not None:
        state, meta = checkpoints.restore(start, state)
        batches.set_state(meta["data"])
    start = start or 0

    replicated = NamedSharding(mesh, P())
    step_config = run_step_config(plan, teacher_cached=teacher_cache is not None,
                                  device_lr=device_low_resolution(plan), mesh=mesh)
    state = place_state(state, param_shardings, optimizer, replicated, term_shardings(
        recipe, state.get("terms", {}), step_config.class_sharding, replicated))
    device_lr = step_config.device_lr
    if teacher_state is not None:
        teacher_state = jax.device_put(teacher_state, teacher_placement or replicated)
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
                                            step=step, folds=config.folds)
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
