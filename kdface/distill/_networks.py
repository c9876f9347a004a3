"""The networks a recipe trains: a backbone with its classifier head, plus distillation adapters.

``FaceNetwork`` = backbone + classifier head (+ optional landmark head) and returns the output
dict the loss terms read (``kdface.distill._terms``). ``DistillStudent`` adds the 1x1 conv + BN
stage adapters that map student stages onto the teacher's (Duong et al. 2019 §3.3).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kdface import losses, models
from kdface.models import ConvAdapter, LandmarkHead, MarginHead, SoftmaxHead, stage_adapters

MARGIN_HEADS = ("cosface", "arcface", "sphereface")


def class_logits(head_kind: str, logit_scale: float, head_out: jax.Array,
                 classes: int | None = None) -> jax.Array:
    """Class logits from a head's output: the softmax head's own logits, or ``logit_scale *
    cos θ`` for a margin head (what logit terms such as Hinton KD read); a margin head padded
    beyond its ``classes`` (split over devices that do not divide them) gets its padding
    columns masked (``losses.mask_padding_classes``)."""
    if head_kind == "softmax":
        return head_out
    return losses.mask_padding_classes(logit_scale * head_out, classes)


class FaceNetwork(nnx.Module):
    """Backbone + classifier head.

    ``head='softmax'`` gives plain logits; a margin head gives cos θ to normalized class weights
    (the margin is applied by the loss term) and ``logits = logit_scale * cos θ`` for Hinton KD.
    A margin head split over devices that do not divide ``num_classes`` gives ``cos`` and
    ``logits`` as wide as its padded weight; ``logits`` has the padding masked, ``cos`` is
    masked by the margin terms (``classes=``).
    """

    def __init__(self, backbone: models.Backbone, *, num_classes: int, head: str,
                 rngs: nnx.Rngs, logit_scale: float = 64.0, landmark_head: bool = False):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.head_kind = head
        self.logit_scale = float(logit_scale)
        size = backbone.embedding_size
        if head == "softmax":
            self.head = SoftmaxHead(size, num_classes, rngs=rngs)
        elif head in MARGIN_HEADS:
            self.head = MarginHead(size, num_classes, rngs=rngs)
        else:
            raise ValueError(f"head must be 'softmax' or one of {MARGIN_HEADS}, got {head!r}")
        self.landmark_head = (LandmarkHead(size, rngs=rngs) if landmark_head else None)

    def __call__(self, x: jax.Array, *, with_stages: bool = False) -> dict[str, Any]:
        embedding, stages = self.backbone(x, return_stages=True)
        out: dict[str, Any] = {"embedding": embedding}
        if with_stages:
            out["stages"] = stages
        head_out = self.head(embedding)
        if self.head_kind != "softmax":
            out["cos"] = head_out
        out["logits"] = class_logits(self.head_kind, self.logit_scale, head_out,
                                     self.num_classes)
        if self.landmark_head is not None:
            out["landmarks"] = self.landmark_head(embedding)
        return out


class DistillStudent(nnx.Module):
    """The trained side: the student ``FaceNetwork`` and, when a recipe needs them, one
    ``ConvAdapter`` per stage mapping the student's stage shape onto the teacher's."""

    def __init__(self, network: FaceNetwork, *, adapters: list[nnx.Module] | None = None):
        self.network = network
        self.adapters = nnx.List(adapters) if adapters else None

    def adapt(self, i: int, feature: jax.Array) -> jax.Array:
        if self.adapters is None:
            raise ValueError("this student was built without stage adapters")
        return self.adapters[i](feature)


def build_student(backbone_name: str, *, num_classes: int, head: str, rngs: nnx.Rngs,
                  backbone_options: dict[str, Any] | None = None, logit_scale: float = 64.0,
                  landmark_head: bool = False,
                  adapt_to: models.Backbone | Sequence[Sequence[int]] | None = None,
                  input_hw: tuple[int, int] = (112, 112)) -> DistillStudent:
    """Creates the student network, with stage adapters when ``adapt_to`` is given: the teacher
    backbone, or its four stage shapes ``(H, W, C)`` at ``input_hw`` (as a run records them, so
    that a run can be rebuilt without its teacher)."""
    backbone = models.create(backbone_name, rngs=rngs, **(backbone_options or {}))
    network = FaceNetwork(backbone, num_classes=num_classes, head=head, rngs=rngs,
                          logit_scale=logit_scale, landmark_head=landmark_head)
    adapters = None
    if isinstance(adapt_to, models.Backbone):
        adapters = stage_adapters(backbone, adapt_to, input_hw, rngs=rngs)
    elif adapt_to is not None:
        adapters = adapters_to_shapes(backbone, adapt_to, input_hw, rngs=rngs)
    return DistillStudent(network, adapters=adapters)


def adapters_to_shapes(student: models.Backbone, teacher_shapes: Sequence[Sequence[int]],
                       input_hw: tuple[int, int], *, rngs: nnx.Rngs) -> list[ConvAdapter]:
    """The four ``ConvAdapter``s from ``student``'s stages (at ``input_hw``) to stage shapes
    ``(H, W, C)`` of a teacher; the same modules ``stage_adapters`` builds from the teacher."""
    if len(teacher_shapes) != models.NUM_STAGES:
        raise ValueError(f"need {models.NUM_STAGES} teacher stage shapes, got {teacher_shapes!r}")
    out = []
    for (sh, sw, sc), (th, tw, tc) in zip(student.stage_shapes(tuple(input_hw)),
                                         (tuple(int(v) for v in s) for s in teacher_shapes)):
        out.append(ConvAdapter(sc, tc, out_hw=None if (sh, sw) == (th, tw) else (th, tw),
                               rngs=rngs))
    return out


def cast_floating(tree: Any, dtype: jnp.dtype) -> Any:
    """Casts every floating leaf of ``tree`` to ``dtype`` (bf16 compute option)."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
