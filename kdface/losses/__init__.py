"""Distillation and face-recognition losses as pure JAX functions (one family per module).

Every function takes arrays and keyword-only options and returns a scalar (or a per-example array
with ``reduction=None`` where offered). Docstrings name shapes and the seed paper's equation.
"""
# Each loss family adds its own import block below.

# Non-relational losses: classification / margin heads, logit KD, feature hints, task losses.
from kdface.losses._classification import (arcface_logits, cosface_logits, margin_cross_entropy,
                                           softmax_cross_entropy, sphereface_lambda,
                                           sphereface_logits)
from kdface.losses._feature import angular_distillation_loss, l2_hint_loss, normalized_l2_loss
from kdface.losses._logit import hard_loss, hinton_kd_loss, soft_prediction_loss
from kdface.losses._metric import landmark_l2_loss, nrmse, triplet_loss
