"""Evaluation metrics: pair verification, IJB-B/C template verification, identification with
distractors, alignment, closed-set classification top-1.

Pure NumPy (no JAX needed at evaluation time); see each module for the paper and protocol.
"""
from __future__ import annotations

from kdface.metrics._verification import (
    DEFAULT_FAR_TARGETS,
    INSIGHTFACE_ACCURACY_GRID,
    INSIGHTFACE_VAL_GRID,
    PROTOCOLS,
    auc,
    best_threshold,
    embeddings_with_flip,
    far_threshold,
    fold_bounds,
    insightface_verification,
    l2_normalize,
    pair_scores,
    roc_curve,
    slinear_interpolate,
    split_interleaved,
    squared_distances,
    threshold_candidates,
    verification,
)
from kdface.metrics._ijb import (
    IJB_FAR_TARGETS,
    binary_roc_curve,
    ijb_image_features,
    ijb_verification,
    tar_at_far_nearest,
    template_features,
    template_pair_scores,
)
from kdface.metrics._identification import (
    DEFAULT_FPR_TARGETS,
    DEFAULT_RANKS,
    identify,
    megaface_identification,
)
from kdface.metrics._topk import TailOfScores, top_k
from kdface.metrics._alignment import nearest_neighbour_verification, nrmse_dataset
from kdface.metrics._classification import classification_top1
from kdface.metrics._plots import (MAX_SERIES, PALETTE, REFERENCE_STUDENT_STYLE, SERIES_COLORS,
                                   TEACHER_STYLE, SeriesStyle, accuracy_vs_probe_size_figure,
                                   bar_figure, ced_figure, line_figure, line_plot,
                                   plot_accuracy_vs_probe_size, plot_ced, plot_roc, roc_figure,
                                   save_figure, series_styles)

__all__ = ["accuracy_vs_probe_size_figure", "auc", "best_threshold", "binary_roc_curve",
           "bar_figure", "ced_figure", "classification_top1", "DEFAULT_FAR_TARGETS",
           "DEFAULT_FPR_TARGETS", "DEFAULT_RANKS",
           "embeddings_with_flip", "far_threshold", "fold_bounds", "identify", "IJB_FAR_TARGETS",
           "ijb_image_features", "ijb_verification", "INSIGHTFACE_ACCURACY_GRID",
           "INSIGHTFACE_VAL_GRID", "insightface_verification", "l2_normalize", "line_figure",
           "line_plot", "megaface_identification", "nearest_neighbour_verification",
           "nrmse_dataset", "pair_scores", "PALETTE", "plot_accuracy_vs_probe_size", "plot_ced",
           "plot_roc", "PROTOCOLS", "roc_curve", "roc_figure", "save_figure",
           "slinear_interpolate", "split_interleaved", "squared_distances", "TailOfScores",
           "tar_at_far_nearest", "template_features", "template_pair_scores",
           "threshold_candidates", "top_k", "verification", "MAX_SERIES",
           "REFERENCE_STUDENT_STYLE", "SERIES_COLORS", "TEACHER_STYLE", "SeriesStyle",
           "series_styles"]
