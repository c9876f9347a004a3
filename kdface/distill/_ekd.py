"""EKD, evaluation-oriented knowledge distillation (Huang et al., CVPR 2022), as a kdface method:
its loss term (with the running thresholds as term state) and its recipe declaration.

The loss itself is ``kdface.losses.ekd_loss``; this module only says what the trainer must give
it (the student's and the teacher's embeddings, the labels, the thresholds carried from the
previous step) and which settings the method runs with.

Across devices: TFace's EKD task (``recognition/tasks/ekd/train.py``) all-gathers the student's
and the teacher's features and the labels of every GPU before the loss, so the official
thresholds and pairs are those of the *global* batch (64 per GPU x the GPUs). kdface's step sees
the global batch under ``jit`` too: with the default ``--relation_group_size=0`` the loss, its
pairs and its thresholds are the global batch's on any device count. A relation group size
splits the batch into groups instead (each group's pairs and thresholds, the loss their mean,
the carried thresholds the mean of the groups' updated ones: the running average is linear in
the batch thresholds, so that is one running average of the groups' mean thresholds).

References:
  Huang, Y., Wu, J., Xu, X., Ding, S. Evaluation-oriented Knowledge Distillation for Deep Face
  Recognition. CVPR 2022. https://arxiv.org/abs/2206.02325
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kdface import losses
from kdface.distill._paper_recipes import HEAD_OPTIONS
from kdface.distill._recipes import HEAD, RecipeSpec, TermDecl, register_recipe
from kdface.distill._terms import StateShapes, TermInputs, TermState, _teacher, term
from kdface.losses._ekd import (INVERSE_FPR, MOMENTUM, NEGATIVE_WEIGHT, POSITIVE_WEIGHT,
                                TEMPERATURE, TOP_NEGATIVES)


def _thresholds_init(shapes: StateShapes, key: jax.Array) -> dict[str, jax.Array]:
    """Both threshold vectors ``[K]`` at 0 (TFace's zero buffers; ``ekd_init_state``)."""
    del key
    state = losses.ekd_init_state(len(INVERSE_FPR), shapes.dtype)
    return {"student": state.student, "teacher": state.teacher}


@term("ekd", teacher_outputs={"embedding"}, relational=True,
      state=TermState(init=_thresholds_init))
def ekd_term(inputs: TermInputs, *, momentum: float = MOMENTUM,
             temperature: float = TEMPERATURE, top_negatives: int = TOP_NEGATIVES,
             positive_weight: float = POSITIVE_WEIGHT, negative_weight: float = NEGATIVE_WEIGHT
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """EKD's rank loss (``losses.ekd_loss``, TFace's constants as defaults) on the student's and
    the teacher's embeddings; state: the running thresholds ``{'student', 'teacher'}`` ``[K]``.
    Returns ``(loss, new thresholds)``; with relation groups, see the module docstring."""
    teacher = _teacher(inputs, "ekd")
    old = losses.EkdState(inputs.state["student"], inputs.state["teacher"])
    options = dict(momentum=momentum, temperature=temperature, top_negatives=top_negatives,
                   positive_weight=positive_weight, negative_weight=negative_weight)
    s, t, y = inputs.student["embedding"], teacher["embedding"], inputs.labels
    groups = inputs.relation_groups
    if groups == 1:
        value, new = losses.ekd_loss(s, t, y, old, **options)
        return value, {"student": new.student, "teacher": new.teacher}
    n = s.shape[0]
    if n % groups:
        raise ValueError(f"batch {n} is not divisible into {groups} relation groups")
    split = [a.reshape(groups, n // groups, *a.shape[1:]) for a in (s, t, y)]
    values, new = jax.vmap(lambda a, b, c: losses.ekd_loss(a, b, c, old, **options))(*split)
    return jnp.mean(values), {"student": jnp.mean(new.student, axis=0),
                              "teacher": jnp.mean(new.teacher, axis=0)}


register_recipe(RecipeSpec(
    name="ekd",
    summary="Huang et al. 2022 (EKD): margin head + the evaluation-oriented rank loss on "
            "identity-balanced batches",
    terms=(TermDecl(HEAD, 1.0, options_for=HEAD_OPTIONS,
                    cite="TFace EKD train.py: 'loss = softmax_loss + kd_loss', the head "
                         "(train.yaml: HEAD_NAME ArcFace, scale 64, margin 0.4) on the "
                         "general (uniform) part of the batch only; kdface's choice: the head "
                         "on the whole batch (uniform and balanced rows)"),
           TermDecl("ekd", 1.0,
                    cite="TFace ekd.py: 'loss = s_pos_kd_loss * 0.02 + s_neg_kd_loss * 0.01' "
                         "over all pairs of the gathered global batch, anchors FPR 1e-1 .. "
                         "1e-6, momentum 0.01, T = 0.01, 2000 hard negatives (the term's "
                         "defaults); weight 1 as 'softmax_loss + kd_loss'")),
    cite={"batches": "train.yaml GENERAL_BATCH_SIZE 32, BALANCED_BATCH_SIZE 32; dataset.py's "
                     "BalancedBatchSampler: 4 images per identity (--batch_sampler=balanced "
                     "--uniform_images=32 --images_per_identity=4)",
          "schedule": "train.yaml LRS [0.1, 0.01, 0.001, 0.0001], STAGES [10, 18, 22], "
                      "NUM_EPOCH 26, WEIGHT_DECAY 0.0005, MOMENTUM 0.9 (kdface/configs/"
                      "ekd.flags)",
          "networks": "train.yaml: teacher IR_50, student MobileFaceNet, embedding 512"},
))
