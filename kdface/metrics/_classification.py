"""Closed-set classification accuracy over the training identities (Wang, Lan, Zhang 2017,
Tables 1-2 "Top1 acc").

Wang, Lan, Zhang 2017, *Model Distillation with Knowledge Transfer from Face Classification to
Alignment and Verification*, arXiv:1709.02929, §5.1: "In classification, we evaluate the top1
accuracy based on if the identity of the maximum prediction matches the correct identity label".
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _int_vector(name: str, x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be int [N], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must be int [N], got dtype {x.dtype}")
    return x.astype(np.int64)


def classification_top1(predicted: Any, labels: Any, *,
                        num_classes: int | None = None) -> dict[str, Any]:
    """Top-1 accuracy: the fraction of images whose predicted identity is their label.

    predicted: int [N], the identity of each image's maximum prediction (``argmax`` over the
    classifier's C logits); labels: int [N], the true identities. With ``num_classes`` both are
    checked to lie in ``[0, num_classes)``. An empty set is refused (no accuracy to give).

    Returns ``top1_accuracy`` (float in [0, 1]; Wang et al. 2017 print it x100),
    ``num_images`` (N), ``num_correct``, ``num_identities`` (distinct labels) and
    ``per_identity_accuracy`` float [num_identities] in the order of the sorted labels.

    >>> classification_top1([0, 2, 1, 1], [0, 1, 1, 1])["top1_accuracy"]
    0.75
    """
    predicted, labels = _int_vector("predicted", predicted), _int_vector("labels", labels)
    if predicted.shape != labels.shape:
        raise ValueError(f"{predicted.size} predictions but {labels.size} labels")
    if labels.size == 0:
        raise ValueError("no images: top-1 accuracy of an empty set is undefined")
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
                or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        for name, x in (("predicted", predicted), ("labels", labels)):
            if x.min() < 0 or x.max() >= num_classes:
                raise ValueError(f"{name} must lie in [0, {num_classes}), got values in "
                                 f"[{x.min()}, {x.max()}]")
    correct = predicted == labels
    identities, inverse = np.unique(labels, return_inverse=True)
    per_identity = (np.bincount(inverse, weights=correct, minlength=identities.size)
                    / np.bincount(inverse, minlength=identities.size))
    return {"top1_accuracy": float(correct.mean()), "num_images": int(labels.size),
            "num_correct": int(correct.sum()), "num_identities": int(identities.size),
            "per_identity_accuracy": per_identity}
