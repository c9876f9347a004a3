"""The pure, jitted train step shared by every recipe.

State is a plain pytree ``{'params', 'rest', 'opt_state', 'step'}`` obtained from
``nnx.split(student, nnx.Param, ...)`` so the step composes with ``jax.jit`` over a device mesh
and with orbax (DESIGN.md). The frozen teacher enters as an argument (its eval-mode state), never
as part of the state, so it is never differentiated, updated or checkpointed (STYLE.md rule 8).

A step whose loss or any term is non-finite leaves the state untouched and reports
``finite=False``; the host loop stops and names the term.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kdface.distill._networks import DistillStudent, FaceNetwork, cast_floating
from kdface.distill._recipes import Recipe, objective
from kdface.distill._terms import TermInputs


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the step.

    relation_groups: relational terms see the batch in this many contiguous groups (1 = global
    batch relations; the device count = per-device relations). compute_dtype: bfloat16 runs the
    networks in bf16 (parameters are kept in float32; losses are computed in float32).
    teacher_cached: the teacher's embedding/logits come in the batch as ``teacher_embedding`` and
    ``teacher_logits`` (the teacher cache) instead of a teacher forward pass.
    """
    relation_groups: int = 1
    compute_dtype: Any = jnp.float32
    teacher_cached: bool = False


def split_student(student: DistillStudent):
    """``(graphdef, params, rest)`` of a student in train mode."""
    student.train()
    return nnx.split(student, nnx.Param, ...)


def split_teacher(teacher: FaceNetwork):
    """``(graphdef, state)`` of a teacher in eval mode (BN running statistics, no dropout)."""
    teacher.eval()
    return nnx.split(teacher)


def init_state(student: DistillStudent, optimizer: optax.GradientTransformation):
    """Initial train state and the student's train-mode graphdef."""
    graphdef, params, rest = split_student(student)
    state = {"params": params, "rest": rest, "opt_state": optimizer.init(params),
             "step": jnp.zeros((), jnp.int32)}
    return graphdef, state


def make_train_step(recipe: Recipe, student_def, teacher_def, optimizer, config: StepConfig):
    """Returns ``step(state, teacher_state, batch) -> (state, metrics)`` (not yet jitted).

    batch: ``student_image`` [B, H, W, 3], ``label`` [B], optionally ``teacher_image``,
    ``landmarks``, ``teacher_embedding`` / ``teacher_logits`` (cached teacher).
    metrics: ``loss``, one entry per term, ``finite`` (bool).
    """
    needs_teacher = recipe.needs_teacher
    student_stages, teacher_stages = recipe.student_stages, recipe.teacher_stages
    if needs_teacher and teacher_def is None and not config.teacher_cached:
        raise ValueError(f"recipe {recipe.name!r} needs a teacher")
    if config.teacher_cached and not recipe.cacheable:
        raise ValueError(recipe.uncacheable_reason())
    cdt = config.compute_dtype

    def loss_fn(params, rest, teacher_state, batch, step):
        student = nnx.merge(student_def, cast_floating(params, cdt), rest, copy=True)
        s_out = student.network(batch["student_image"].astype(cdt), with_stages=student_stages)
        s_out = cast_floating(s_out, jnp.float32)
        t_out, tail = None, None
        if needs_teacher:
            if config.teacher_cached:
                t_out = {"embedding": batch["teacher_embedding"],
                         "logits": batch["teacher_logits"]}
            else:
                teacher = nnx.merge(teacher_def, cast_floating(teacher_state, cdt), copy=True)
                t_img = batch.get("teacher_image", batch["student_image"]).astype(cdt)
                t_out = cast_floating(teacher(t_img, with_stages=teacher_stages), jnp.float32)
                tail = lambda i, f: teacher.backbone.forward_from(i, f.astype(cdt)).astype(
                    jnp.float32)
        inputs = TermInputs(
            labels=batch["label"], student=s_out, teacher=t_out, teacher_tail=tail,
            adapters=(lambda i, f: student.adapt(i, f.astype(cdt)).astype(jnp.float32))
            if student.adapters is not None else None,
            landmarks=batch.get("landmarks"), relation_groups=config.relation_groups,
            step=step)
        total, values = objective(recipe, inputs)
        new_rest = nnx.state(student, nnx.Not(nnx.Param))
        new_rest = jax.tree.map(lambda new, old: new.astype(old.dtype), new_rest, rest)
        return total, (values, new_rest)

    def step(state, teacher_state, batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (total, (values, new_rest)), grads = grad_fn(state["params"], state["rest"],
                                                    teacher_state, batch, state["step"])
        updates, new_opt = optimizer.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        grads_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g))
                                          for g in jax.tree.leaves(grads)]))
        finite = jnp.isfinite(total) & grads_finite
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {"params": keep(new_params, state["params"]),
                     "rest": keep(new_rest, state["rest"]),
                     "opt_state": keep(new_opt, state["opt_state"]),
                     "step": state["step"] + finite.astype(jnp.int32)}
        metrics = {"loss": total, "finite": finite, **values}
        return new_state, metrics

    return step


def make_embed_fn(network_def):
    """``embed(state, images) -> [B, E]`` for evaluation (eval-mode graphdef expected)."""
    def embed(state, images):
        network = nnx.merge(network_def, state, copy=True)
        return network(images)["embedding"]
    return embed
