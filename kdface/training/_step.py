"""The pure, jitted train step shared by every recipe.

State is a plain pytree ``{'params', 'rest', 'opt_state', 'step'}`` obtained from
``nnx.split(student, nnx.Param, ...)`` so the step composes with ``jax.jit`` over a device mesh
and with orbax; a recipe whose terms carry non-gradient state (``TermSpec.state``) adds
``'terms'``, ``{term name: its state}``, which each step passes to the terms and replaces by
what they return, under the same health rule as the parameters. The step never looks inside.
The frozen teacher enters as an argument (its eval-mode state), never as part of
the state, so it is never differentiated, updated or checkpointed.

Images may arrive as uint8 (a quarter of float32's bytes on the host-to-device link) and are
normalized here; the low-resolution student view can be made here too (``device_lr``).

Health without waiting for the host: the step carries a small ``health`` record on the device
(steps run, the first step whose loss, a term or a gradient was not finite, which terms, the
first runaway step). A step after the first bad one changes nothing, so the state the host finds
at its next log / eval / save check is the last good one; the host reads ``health`` only then.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kdface import losses
from kdface.distill import (DistillStudent, FaceNetwork, Recipe, TermInputs, cast_floating,
                            class_logits, objective)
from kdface.distill._networks import MARGIN_HEADS


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the step.

    relation_groups: relational terms see the batch in this many contiguous groups (1 = global
    batch relations; the device count = per-device relations). compute_dtype: bfloat16 runs the
    networks in bf16 (parameters are kept in float32; losses are computed in float32).
    teacher_cached: the teacher's embedding comes in the batch as ``teacher_embedding`` (the
    teacher cache) instead of a teacher forward pass; logits, when a term reads them, are the
    teacher head applied to it (``teacher_state`` is then the head's state).
    device_lr: a ``kdface.data.DeviceLowResolution`` applied to ``student_image`` by the
    per-sample ``student_size`` (the host only drew the sizes), or None.
    runaway_factor: a finite loss above this multiple of the first step's loss counts as a
    runaway (0 = off).
    classes: the data's class count, for terms whose state has a (possibly padded) class axis.
    class_sharding: the placement of such a class axis when it is split over the devices (the
    margin head's, ``P(None, 'data')``), None when replicated.
    """
    relation_groups: int = 1
    compute_dtype: Any = jnp.float32
    teacher_cached: bool = False
    device_lr: Any = None
    runaway_factor: float = 0.0
    classes: int | None = None
    class_sharding: Any = None


def normalize_on_device(images: jax.Array) -> jax.Array:
    """uint8 (or float pixel) ``[..., H, W, 3]`` -> float32 ``(x / 255 - 0.5) / 0.5``; float
    images already in [-1, 1] pass through unchanged (the caller normalized them)."""
    if images.dtype == jnp.uint8:
        return (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5
    return images


def head_logits(head_def, head_state, kind: str, scale: float, embedding: jax.Array) -> jax.Array:
    """The teacher's class logits recomputed from its (cached) embedding, as ``FaceNetwork``
    computes them: the softmax head's logits, or ``scale * cos θ`` for a margin head."""
    head = nnx.merge(head_def, head_state, copy=True)
    return class_logits(kind, scale, head(embedding.astype(jnp.float32)),
                        getattr(head, "num_classes", None))


def same_class_width(student: dict[str, Any], teacher: dict[str, Any] | None):
    """The networks' ``logits`` over one class axis: where only one of them is padded (its
    margin head split over devices that do not divide the classes; a softmax head is never
    split), the other gets as many ``PADDING_LOGIT`` columns, which no softmax weighs."""
    if teacher is None or "logits" not in student or "logits" not in teacher:
        return student, teacher
    ws, wt = student["logits"].shape[-1], teacher["logits"].shape[-1]
    if ws == wt:
        return student, teacher
    widen = lambda out, width: {**out, "logits": jnp.pad(
        out["logits"], ((0, 0), (0, width - out["logits"].shape[-1])),
        constant_values=losses.PADDING_LOGIT)}
    return (widen(student, wt), teacher) if ws < wt else (student, widen(teacher, ws))


def init_health(recipe: Recipe) -> dict[str, Any]:
    """The device-side health record a fresh loop starts from (see the module docstring):
    ``bad_values`` keeps the loss and every term's value at the first bad step."""
    names = ["loss"] + [t.name for t in recipe.terms]
    return {"steps": jnp.zeros((), jnp.int32), "first_bad": jnp.full((), -1, jnp.int32),
            "first_runaway": jnp.full((), -1, jnp.int32),
            # No NaN sentinel: multi-process device_put checks the value is equal on every
            # process, and NaN != NaN.
            "has_reference": jnp.zeros((), bool),
            "reference_loss": jnp.zeros((), jnp.float32),
            "grads_finite": jnp.ones((), bool),
            "bad_values": {n: jnp.zeros((), jnp.float32) for n in names}}


def split_student(student: DistillStudent):
    """``(graphdef, params, rest)`` of a student in train mode."""
    student.train()
    return nnx.split(student, nnx.Param, ...)


def split_teacher(teacher: FaceNetwork, *, cached: bool = False):
    """``(teacher_def, teacher_state)`` for :func:`make_train_step`: the whole teacher in eval
    mode (BN running statistics, no dropout); with ``cached`` (``StepConfig.teacher_cached``)
    only its head, ``((head graphdef, head kind, logit scale), head state)``, since the cache
    holds embeddings and the step recomputes logits from them."""
    teacher.eval()
    if cached:
        head_def, head_state = nnx.split(teacher.head)
        return (head_def, teacher.head_kind, teacher.logit_scale), head_state
    return nnx.split(teacher)


def init_state(student: DistillStudent, optimizer: optax.GradientTransformation,
               terms: dict[str, Any] | None = None):
    """Initial train state and the student's train-mode graphdef; ``terms``: the stateful terms'
    initial states (``Recipe.init_term_states``), kept under ``'terms'`` when there are any."""
    graphdef, params, rest = split_student(student)
    state = {"params": params, "rest": rest, "opt_state": optimizer.init(params),
             "step": jnp.zeros((), jnp.int32)}
    if terms:
        state["terms"] = terms
    return graphdef, state


def _margin_scale(head_kind: str, logit_scale) -> float | None:
    """The bound on a network's ``logits``: ``s`` for a margin head (``s·cos θ``, cos θ clipped
    to [-1, 1] by the head), None for a softmax head (unbounded)."""
    return float(logit_scale) if head_kind in MARGIN_HEADS and logit_scale is not None else None


def make_train_step(recipe: Recipe, student_def, teacher_def, optimizer, config: StepConfig):
    """Returns ``step(state, teacher_state, batch) -> (state, metrics)`` (not yet jitted).

    ``step(state, health, teacher_state, batch) -> (state, health, metrics)``.

    batch: ``student_image`` [B, H, W, 3] (uint8 or normalized float), ``label`` [B],
    optionally ``teacher_image``, ``landmarks``, ``student_size`` (with ``device_lr``),
    ``teacher_embedding`` (cached teacher). metrics: ``loss``, one entry per term,
    ``finite`` (bool), all left on the device.
    """
    needs_teacher = recipe.needs_teacher
    student_stages, teacher_stages = recipe.student_stages, recipe.teacher_stages
    if needs_teacher and teacher_def is None and not config.teacher_cached:
        raise ValueError(f"recipe {recipe.name!r} needs a teacher")
    if config.teacher_cached and not recipe.cacheable:
        raise ValueError(recipe.uncacheable_reason())
    cdt = config.compute_dtype
    needs_logits = "logits" in recipe.teacher_outputs
    teacher_sees_student_view = recipe.teacher_view not in (None, "original")
    class_axes = recipe.class_axis_states()

    def placed(new_terms):
        """A class axis stays where it was split (the step's output is its next input)."""
        if config.class_sharding is None:
            return new_terms
        out = {name: dict(state) for name, state in new_terms.items()}
        for name, leaf in class_axes:
            out[name][leaf] = jax.lax.with_sharding_constraint(out[name][leaf],
                                                               config.class_sharding)
        return out

    def views(batch):
        student_image = batch["student_image"]
        if config.device_lr is not None:
            student_image = config.device_lr(student_image, batch["student_size"])
            student_image = (student_image / 255.0 - 0.5) / 0.5
        student_image = normalize_on_device(student_image)
        if teacher_sees_student_view and config.device_lr is not None:
            return student_image, student_image
        teacher_image = normalize_on_device(batch.get("teacher_image", batch["student_image"]))
        return student_image, teacher_image

    def loss_fn(params, rest, terms, teacher_state, batch, step):
        student = nnx.merge(student_def, cast_floating(params, cdt), rest, copy=True)
        student_image, teacher_image = views(batch)
        s_out = student.network(student_image.astype(cdt), with_stages=student_stages)
        s_out = cast_floating(s_out, jnp.float32)
        t_out, tail = None, None
        scales = [_margin_scale(student.network.head_kind, student.network.logit_scale)]
        if needs_teacher:
            if config.teacher_cached:
                embedding = batch["teacher_embedding"].astype(jnp.float32)
                t_out = {"embedding": embedding}
                if needs_logits:
                    head_def, kind, scale = teacher_def
                    t_out["logits"] = head_logits(head_def, teacher_state, kind, scale,
                                                  embedding)
                    scales.append(_margin_scale(kind, scale))
            else:
                teacher = nnx.merge(teacher_def, cast_floating(teacher_state, cdt), copy=True)
                t_img = teacher_image.astype(cdt)
                t_out = cast_floating(teacher(t_img, with_stages=teacher_stages), jnp.float32)
                scales.append(_margin_scale(getattr(teacher, "head_kind", None),
                                            getattr(teacher, "logit_scale", None)))
                tail = lambda i, f: teacher.backbone.forward_from(i, f.astype(cdt)).astype(
                    jnp.float32)
        s_out, t_out = same_class_width(s_out, t_out)
        inputs = TermInputs(
            labels=batch["label"], student=s_out, teacher=t_out, teacher_tail=tail,
            adapters=(lambda i, f: student.adapt(i, f.astype(cdt)).astype(jnp.float32))
            if student.adapters is not None else None,
            landmarks=batch.get("landmarks"), relation_groups=config.relation_groups,
            step=step, classes=config.classes or student.network.num_classes,
            class_sharding=config.class_sharding,
            logit_bound=None if None in scales else max(scales))
        total, values, new_terms = objective(recipe, inputs, terms)
        new_rest = nnx.state(student, nnx.Not(nnx.Param))
        new_rest = jax.tree.map(lambda new, old: new.astype(old.dtype), new_rest, rest)
        new_terms = jax.tree.map(lambda new, old: jax.lax.stop_gradient(new).astype(old.dtype),
                                 new_terms, terms)
        return total, (values, new_rest, placed(new_terms))

    def step(state, health, teacher_state, batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        terms = state.get("terms", {})
        (total, (values, new_rest, new_terms)), grads = grad_fn(
            state["params"], state["rest"], terms, teacher_state, batch, state["step"])
        updates, new_opt = optimizer.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        grads_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g))
                                          for g in jax.tree.leaves(grads)]))
        finite = jnp.isfinite(total) & grads_finite
        healthy = health["first_bad"] < 0
        take = ~health["has_reference"] & finite
        reference = jnp.where(take, total, health["reference_loss"])
        runaway = jnp.zeros((), bool)
        if config.runaway_factor > 0:
            # Against the first step's loss, from the step after it.
            previous = health["reference_loss"]
            runaway = finite & health["has_reference"] & (
                jnp.abs(total) > config.runaway_factor * jnp.maximum(jnp.abs(previous), 1e-6))
        runaway_ok = health["first_runaway"] < 0
        apply = finite & healthy & runaway_ok & ~runaway
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)
        new_state = {"params": keep(new_params, state["params"]),
                     "rest": keep(new_rest, state["rest"]),
                     "opt_state": keep(new_opt, state["opt_state"]),
                     "step": state["step"] + apply.astype(jnp.int32)}
        if "terms" in state:
            new_state["terms"] = keep(new_terms, terms)
        steps = health["steps"] + 1
        metrics = {"loss": total, "finite": finite, **values}
        record = (healthy & ~finite) | (runaway_ok & runaway)
        new_health = {
            "steps": steps,
            "first_bad": jnp.where(healthy & ~finite, steps, health["first_bad"]),
            "first_runaway": jnp.where(runaway_ok & runaway, steps, health["first_runaway"]),
            "has_reference": health["has_reference"] | take,
            "reference_loss": reference,
            "grads_finite": jnp.where(healthy & ~finite, grads_finite, health["grads_finite"]),
            "bad_values": {k: jnp.where(record, metrics[k].astype(jnp.float32), v)
                           for k, v in health["bad_values"].items()}}
        return new_state, new_health, metrics

    return step

