"""Wang, Lan, Zhang 2017's classification protocol (Tables 1-2 "Top1 acc"): the run's own
classifier head on a held-out split of its training identities' images.

Wang, Lan, Zhang 2017, arXiv:1709.02929, §5.1: "In all datasets, we randomly split them into
training and testing samples. In classification, we evaluate the top1 accuracy based on if the
identity of the maximum prediction matches the correct identity label". The split is
:mod:`kdface.data._heldout`'s (10 % of each identity's images, **kdface's choice** of the
proportion the text does not give); the prediction is the ``argmax`` over the trained head's C
logits (:meth:`Embedder.predictions`); the accuracy is ``kdface.metrics.classification_top1``.

Test images are shown as the training pipeline frames them, minus its randomness: a run trained
with ``--crop_from`` (resize, then a random ``input_size`` window) is tested on the *centre*
window of the image resized to ``crop_from``, otherwise on the image resized to ``input_size``
(both ``cv2.INTER_AREA``, as the pipeline), no flip — the usual single-crop test view, **kdface's
choice** (the paper states only the training crop).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kdface import metrics
from kdface.evaluation._evaluator import Evaluator, Run, cell, pick, table
from kdface.evaluation._sources import FaceRecords, open_face_records
from kdface.data._heldout import (HELDOUT_FRACTION, HeldOutSplit, check_fraction,
                                      check_seed, fraction_needed, heldout_split,
                                      source_labels_and_keys, split_description)

_KEYS = ("top1_accuracy", "num_images", "num_correct", "num_identities", "held_out")


def records_split(records: FaceRecords, *, fraction: float = HELDOUT_FRACTION,
                  seed: int = 0) -> HeldOutSplit:
    """The held-out split of a labelled dataset (every record's stored bytes hashed once; see
    :func:`kdface.evaluation.heldout_split`). An empty test split is refused."""
    fraction, seed = check_fraction(fraction), check_seed(seed)
    if len(records) == 0:
        raise ValueError(f"dataset {records.name} is empty")
    labels, keys = source_labels_and_keys(len(records), records.read_encoded, seed=seed)
    split = heldout_split(labels, keys, fraction=fraction, seed=seed)
    if split.test.size == 0:
        raise ValueError(f"the top-1 split of {records.name} is empty: no identity has the "
                         f"{fraction_needed(fraction)} distinct images a held-out fraction of "
                         f"{fraction:g} needs for one test image")
    return split


def centre_view(image: np.ndarray, input_size: tuple[int, int],
              crop_from: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> ``[*input_size, 3]``: resized to ``crop_from`` and its centre
    ``input_size`` window cut out (a run trained with random crops), or resized to
    ``input_size``; ``cv2.INTER_AREA`` as the training pipeline."""
    import cv2
    size = tuple(int(v) for v in (crop_from or input_size))
    if image.shape[:2] != size:
        image = cv2.resize(image, size[::-1], interpolation=cv2.INTER_AREA)
    if crop_from:
        top = (size[0] - input_size[0]) // 2
        left = (size[1] - input_size[1]) // 2
        image = image[top:top + input_size[0], left:left + input_size[1]]
    return np.ascontiguousarray(image)


def _crop_from(run) -> tuple[int, int] | None:
    crop = (getattr(run, "config", None) or {}).get("crop_from") or None
    return None if not crop else (int(crop[0]), int(crop[1]))


def heldout_in_training(run, split: HeldOutSplit) -> bool | None:
    """Whether ``run`` was trained without the split's test images: True when its config
    records the same held-out fraction and seed (``holdout_fraction``, ``holdout_seed``),
    False when it records none (it trained on every image), None when it records another
    split (refused by :func:`classification_report`)."""
    config = getattr(run, "config", None) or {}
    fraction = config.get("holdout_fraction") or 0.0
    if not fraction:
        return False
    same = (abs(float(fraction) - split.fraction) < 1e-12
            and int(config.get("holdout_seed") or 0) == split.seed)
    return True if same else None


def classification_report(run, records: Any, split: HeldOutSplit | None = None, *,
                          fraction: float = HELDOUT_FRACTION, seed: int = 0,
                          chunk: int = 1024) -> dict[str, Any]:
    """Top-1 accuracy of ``run``'s own head on the held-out images of ``records``.

    run: an :class:`Embedder` of a training run (its head must have one class per identity of
    ``records``: the run's own training data); records: anything :func:`open_face_records`
    opens; split: the held-out split (:func:`records_split` with ``fraction``, ``seed`` when
    None). Returns ``kdface.metrics.classification_top1``'s dict plus ``held_out``
    (:func:`heldout_in_training`) and ``predicted`` / ``labels`` int64 [T] in the split's order.
    """
    name = (getattr(run, "describe", lambda: {})() or {}).get("source", "the run")
    if not getattr(run, "has_head", False):
        raise ValueError(f"{name} has no classification head (an embedding file or a backbone "
                         f"without its classifier): top-1 needs a kdface training run")
    records = open_face_records(records)
    split = records_split(records, fraction=fraction, seed=seed) if split is None else split
    if split.labels.size != len(records):
        raise ValueError(f"the split covers {split.labels.size} records but {records.name} has "
                         f"{len(records)}")
    if run.num_classes != split.num_classes:
        raise ValueError(f"{name}'s head has {run.num_classes} classes but {records.name} has "
                         f"{split.num_classes} (labels 0..{split.num_classes - 1}): top-1 is "
                         f"measured on the run's own training identities")
    held_out = heldout_in_training(run, split)
    if held_out is None:
        cfg = run.config
        raise ValueError(f"{name} held out fraction {cfg.get('holdout_fraction'):g} seed "
                         f"{cfg.get('holdout_seed') or 0} of its training data, not the "
                         f"evaluation's {split.fraction:g} seed {split.seed}: evaluate on the "
                         f"run's own split")
    crop = _crop_from(run)
    predicted = np.empty(split.test.size, np.int64)
    labels = split.labels[split.test]
    for start in range(0, split.test.size, chunk):
        rows = split.test[start:start + chunk]
        images = []
        for i in rows:
            label, image, _ = records.read(int(i))
            if label != split.labels[i]:
                raise ValueError(f"{records.name} record {i} changed its label while read")
            images.append(centre_view(image, run.input_size, crop))
        predicted[start:start + rows.size] = run.predictions(images)
    result = metrics.classification_top1(predicted, labels, num_classes=run.num_classes)
    result.update(held_out=held_out, predicted=predicted, labels=labels)
    return result


class Classification(Evaluator):
    """Wang et al. 2017's top-1 classification accuracy of each checkpoint run.

    records: the runs' training data (anything :func:`open_face_records` opens: a built set by
    name or directory, a ``.rec``, a folder per identity); fraction, seed: the held-out split
    (computed once, shared by every run). A run without a head, or whose head's class count is
    not the data's, is refused; a run that trained on the test images is reported with
    ``held_out`` False and a note.
    """

    def __init__(self, records: Any, *, fraction: float = HELDOUT_FRACTION, seed: int = 0):
        self.records = open_face_records(records)
        self.split = records_split(self.records, fraction=fraction, seed=seed)

    def report_fields(self) -> dict[str, Any]:
        return {"classification": {"data": self.records.name,
                                   "split": split_description(self.split),
                                   "fraction": self.split.fraction, "seed": self.split.seed,
                                   "num_test_images": int(self.split.test.size),
                                   "num_records": int(self.split.labels.size),
                                   "num_classes": self.split.num_classes}}

    def evaluate(self, run: Run) -> dict[str, Any]:
        result = classification_report(run, self.records, self.split)
        notes = []
        if not result["held_out"]:
            notes.append(f"top-1: the run trained on every image of {self.records.name}, the "
                         f"{self.split.test.size} test images included (a training-set figure, "
                         f"not the paper's held-out one)")
        return {"classification": pick(result, _KEYS), "notes": notes}

    @staticmethod
    def markdown(report: Mapping[str, Any]) -> list[str]:
        rows = [[run_name, str(c["num_images"]), str(c["num_identities"]),
                 cell(c["top1_accuracy"]), "yes" if c.get("held_out") else "**no**"]
                for run_name, entry in report["runs"].items()
                if (c := entry.get("classification"))]
        if not rows:
            return []
        info = report.get("classification", {})
        lines = ["## Classification top-1", "",
                 f"Wang et al. 2017 top-1: the argmax of the run's own classifier head is the "
                 f"image's identity. Data: {info.get('data')}; {info.get('split')}. Test view: "
                 f"the centre crop of a --crop_from run, else the resized image; no flip.", ""]
        lines += table(["run", "test images", "identities", "top-1", "held out of training"],
                       rows)
        return lines + [""]
