"""AdaDistill, adaptive knowledge distillation in the margin loss (Boutros, Štruc, Damer, ECCV
2024), as a kdface method: its loss term (the class centres as term state, a class axis placed
like the margin head's) and its two recipe declarations, ``adadistill_arc`` and
``adadistill_cos``.

The formulas are ``kdface.losses`` (``adadistill_centres``, ``adadistill_centres_sharded``, the
ArcFace / CosFace margins); this module gives them the trainer's inputs and settings.

Centres across devices: the official training script wraps its header in
``DistributedDataParallel`` but updates ``kernel`` under ``torch.no_grad`` from each GPU's own
batch, so its GPUs' centres drift apart. kdface's choice: one set of centres, updated from the
whole global batch (duplicate labels: the last in global batch order), identical on any device
count. With the head split over the devices (``--shard_head``) the centres are split the same
way and each device writes only the columns it owns (``adadistill_centres_sharded`` in
``jax.shard_map``); padding columns are never written and never predicted.

References:
  Boutros, F., Štruc, V., Damer, N. AdaDistill: Adaptive Knowledge Distillation for Deep Face
  Recognition. ECCV 2024. https://arxiv.org/abs/2407.01332
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from kdface import losses
from kdface.distill._recipes import Option, RecipeSpec, TermDecl, register_recipe
from kdface.distill._terms import StateShapes, TermInputs, TermState, _teacher, term
from kdface.losses._adadistill import HEADS, MARGINS, SCALE

# The official header's init: ``nn.init.normal_(self.kernel, std=0.01)`` (AdaptiveAArcFace /
# AdaptiveACosFace in fdbtrs/AdaDistill ``utils/losses.py``), as kdface's MarginHead.
CENTRE_STD = 0.01


def _centres_init(shapes: StateShapes, key: jax.Array) -> dict[str, jax.Array]:
    """``centres [E, columns]``: N(0, 0.01) on the real classes, zero padding columns."""
    real = CENTRE_STD * jax.random.normal(key, (shapes.embedding_size, shapes.classes),
                                          shapes.dtype)
    return {"centres": jnp.pad(real, ((0, 0), (0, shapes.columns - shapes.classes)))}


def _updated(centres, student, teacher, labels, class_sharding):
    """The centres after this batch's update: replicated, or split as ``class_sharding`` says
    (``P(None, axis)``), each device writing its own columns."""
    if class_sharding is None:
        return losses.adadistill_centres(centres, student, teacher, labels)
    axis = class_sharding.spec[1]
    update = jax.shard_map(
        functools.partial(losses.adadistill_centres_sharded, axis_name=axis),
        mesh=class_sharding.mesh,
        in_specs=(PartitionSpec(None, axis), PartitionSpec(), PartitionSpec(), PartitionSpec()),
        out_specs=PartitionSpec(None, axis))
    return update(centres, jax.lax.stop_gradient(student), jax.lax.stop_gradient(teacher),
                  labels)


@term("adadistill", teacher_outputs={"embedding"}, same_embedding=True,
      state=TermState(init=_centres_init, class_axis={"centres"}))
def adadistill_term(inputs: TermInputs, *, head: str = "arcface", scale: float = SCALE,
                    margin: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """AdaDistill's loss (Boutros et al. 2024): the centres of the batch's labels move towards
    the teacher's normalized embeddings by the adaptive alpha, then the student's ArcFace /
    CosFace cross-entropy against the updated centres (``losses.adadistill_loss``'s value on
    unpadded, replicated centres). State ``{'centres': [E, columns]}``; returns ``(loss, new
    state)``. ``margin`` None: the head's AdaDistill default (ArcFace 0.45, CosFace 0.35)."""
    teacher = _teacher(inputs, "adadistill")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    s, t, labels = inputs.student["embedding"], teacher["embedding"], inputs.labels
    centres = _updated(inputs.state["centres"], s, t, labels, inputs.class_sharding)
    cos = losses.normalized_cosines(s, centres)
    classes = inputs.classes or centres.shape[1]
    if inputs.class_sharding is not None:
        cos = jax.lax.with_sharding_constraint(cos, inputs.class_sharding)
    m = MARGINS[head] if margin is None else margin
    margin_logits = losses.arcface_logits if head == "arcface" else losses.cosface_logits
    # padding columns are masked, never predicted (kept, not cut: see models.MarginHead)
    logits = margin_logits(cos, labels, scale=scale, margin=m, classes=classes)
    return losses.softmax_cross_entropy(logits, labels), {"centres": centres}


def _recipe(name: str, head: str, margin: Option, quote: str) -> RecipeSpec:
    return RecipeSpec(
        name=name,
        summary=f"Boutros et al. 2024 (AdaDistill, {head}): KD inside the margin loss, class "
                f"centres moved towards the teacher by an adaptive weight",
        terms=(TermDecl("adadistill", 1.0,
                        options={"head": head, "scale": Option("margin_scale"),
                                 "margin": margin},
                        cite=f"AdaDistill train_AdaDistill.py: 'loss_v = criterion(thetas, "
                             f"label)', the only loss (CrossEntropyLoss on the adaptive "
                             f"header); config.py s = 64; {quote}"),),
        # The student's own margin head is built but no term reads it (the centres are the
        # term's state): the official header is not in the optimizer either.
        head=head,
        cite={"networks": "config.py: network mobilefacenet, teacher iresnet50, embedding 512",
              "optimizer": "train_AdaDistill.py: SGD lr cfg.lr / 512 * batch * GPUs, momentum "
                           "0.9, weight decay 5e-4, clip_grad_norm_ 5; config.py: lr 0.1, "
                           "batch 128 per GPU, 26 epochs, x0.1 from epochs 8, 14, 20, 25 "
                           "(kdface/configs/adadistill_*.flags)"})


register_recipe(_recipe("adadistill_arc", "arcface", Option("arcface_margin"),
                        "config.py m = 0.45 with config.loss = 'ArcFace' (AdaptiveAArcFace)"))
register_recipe(_recipe("adadistill_cos", "cosface", Option("margin"),
                        "AdaptiveACosFace; m = 0.35 is its default, kdface's choice (the "
                        "official config.py sets one m = 0.45 for whichever loss it runs)"))
