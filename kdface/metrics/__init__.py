"""Evaluation metrics: pair verification, identification with distractors, alignment.

Pure NumPy (no JAX needed at evaluation time); see each module for the seed paper and protocol.
"""
from __future__ import annotations

from kdface.metrics._verification import (
    DEFAULT_FAR_TARGETS,
    auc,
    best_threshold,
    embeddings_with_flip,
    far_threshold,
    fold_bounds,
    l2_normalize,
    pair_scores,
    roc_curve,
    split_interleaved,
    threshold_candidates,
    verification,
)
