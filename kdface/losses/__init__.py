"""Distillation and face-recognition losses as pure JAX functions (one family per module).

Every function takes arrays and keyword-only options and returns a scalar (or a per-example array
with ``reduction=None`` where offered). Docstrings name shapes and the paper's equation.
"""
# Each loss family adds its own import block below.

# Non-relational losses: classification / margin heads, logit KD, feature hints, task losses.
from kdface.losses._classification import (PADDING_LOGIT, arcface_logits, cosface_logits,
                                           margin_cross_entropy, mask_padding_classes,
                                           softmax_cross_entropy, sphereface_lambda,
                                           sphereface_logits)
from kdface.losses._feature import angular_distillation_loss, l2_hint_loss, normalized_l2_loss
from kdface.losses._logit import hinton_kd_loss, soft_prediction_loss
from kdface.losses._metric import landmark_l2_loss, nrmse, triplet_loss

# PWR, pairwise ranking distillation (Nikitin et al. 2020): dense / tiled / sorted / sharded.
from kdface.losses._pwr import pairwise_scores, pwr_loss, pwr_loss_from_scores
from kdface.losses._pwr_sharded import pwr_loss_sharded

# MK-MMD (Wang et al. 2019) and the relational baselines RKD-D, RKD-A, DarkRank-hard
# (Nikitin et al. 2020 §4), plus their batch-global versions across devices (call inside
# jax.shard_map, or via a mesh).
from kdface.losses._mmd import mk_mmd
from kdface.losses._relational import darkrank_hard_loss, rkd_angle_loss, rkd_distance_loss
from kdface.losses._sharded import (darkrank_hard_loss_sharded, mk_mmd_sharded,
                                    rkd_angle_loss_sharded, rkd_distance_loss_sharded,
                                    sharded_relational_loss)

__all__ = ["angular_distillation_loss", "arcface_logits", "cosface_logits", "darkrank_hard_loss",
           "darkrank_hard_loss_sharded", "hinton_kd_loss", "l2_hint_loss", "landmark_l2_loss",
           "margin_cross_entropy", "mask_padding_classes", "mk_mmd", "mk_mmd_sharded",
           "normalized_l2_loss", "nrmse", "pairwise_scores", "pwr_loss", "pwr_loss_from_scores",
           "pwr_loss_sharded", "rkd_angle_loss", "rkd_angle_loss_sharded", "rkd_distance_loss",
           "rkd_distance_loss_sharded", "sharded_relational_loss", "soft_prediction_loss",
           "softmax_cross_entropy", "sphereface_lambda", "sphereface_logits", "triplet_loss",
           "PADDING_LOGIT"]

# EKD, evaluation-oriented KD (Huang et al. 2022): a loss with running thresholds as state.
from kdface.losses._ekd import EkdState, ekd_batch_thresholds, ekd_init_state, ekd_loss

__all__ += ["EkdState", "ekd_batch_thresholds", "ekd_init_state", "ekd_loss"]

# AdaDistill (Boutros et al. 2024): KD in the margin loss, class centres moved towards the
# teacher before each step (the centres are state: an input and an output).
from kdface.losses._adadistill import (adadistill_alpha, adadistill_centres,
                                       adadistill_centres_sharded, adadistill_logits,
                                       adadistill_loss, normalized_cosines)

__all__ += ["adadistill_alpha", "adadistill_centres", "adadistill_centres_sharded",
            "adadistill_logits", "adadistill_loss", "normalized_cosines"]
