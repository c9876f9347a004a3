"""From a config to a finished run: data resolution, generations, and the KD teacher phase.

``run(config, data_dir=...)`` is what ``python -m kdface.train`` and the demo call:

* ``train_data`` names a built tfds training set in ``data_dir``, or is a ``.rec`` / identity
  folder that is built there on first use; ``val_data`` entries are ``.bin`` files or built
  verification sets.
* a recipe's declared ``phases`` run first: a ``TeacherPhase`` trains the teacher again in
  ``workdir/<subdir>`` (e.g. Wang et al. 2019's ``kd`` fine-tunes it on low-resolution-augmented
  data in ``workdir/teacher_lr``, a ``scratch`` run initialized from ``teacher_checkpoint``),
  and the run then distils from that teacher.
* a recipe's ``generations=K`` (Yan et al. 2019's recursive KD) runs K student generations in
  ``workdir/gen_1 .. gen_K``; generation k+1 starts from generation k's student, same teacher.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from kdface.training._config import TrainConfig
from kdface.training._loop import VerificationSet, check_verification_folds, fit_plan
from kdface.training._plan import DataFacts, FitPlan, RunPlan, make_plan


class PipelineBatches:
    """Adapts a ``kdface.data`` TwoViewPipeline to the trainer's resumable iterator protocol."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self._it = iter(pipeline)

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return self.pipeline.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.pipeline.set_state(state)
        self._it = self.pipeline.iterator


def resolve_training_data(train_data: str, data_dir: str) -> tuple[Any, int]:
    """``(tfds data source, num_classes)``; builds the dataset first if given a source path."""
    from kdface.data import (build_training_dataset, load_dataset_metadata,
                             load_training_source)
    name = train_data
    if os.path.exists(train_data):
        name = build_training_dataset(train_data, data_dir, progress=True)["name"]
    meta = load_dataset_metadata(data_dir, "kdface_training", name)
    return load_training_source(data_dir, name), int(meta["num_classes"])


def resolve_verification_sets(val_data, data_dir: str,
                              input_size: tuple[int, int]) -> list[VerificationSet]:
    """Decodes each ``.bin`` path or built verification set into a ``VerificationSet``."""
    from kdface.data import load_verification_source, make_verification_arrays
    sets = []
    for entry in val_data:
        if os.path.exists(entry):
            source, name = entry, os.path.splitext(os.path.basename(entry))[0]
        else:
            source, name = load_verification_source(data_dir, entry), entry
        images1, images2, issame, folds = make_verification_arrays(source,
                                                                   image_size=input_size)
        interleaved = np.stack([images1, images2], axis=1).reshape(-1, *images1.shape[1:])
        # a built set stores its pair list's folds; a .bin has none of its own
        own = None if os.path.isfile(entry) else len(np.unique(folds))
        sets.append(VerificationSet(name, interleaved, issame, folds=own))
    return sets


def _pipeline(config: TrainConfig, source, student_view: str, teacher_view: str, **options):
    """The two-view pipeline; images stay uint8 (normalized in the step, a quarter of the bytes
    to transfer) and, with ``--lr_on_device``, the host only draws each sample's LR size.
    ``options``: more ``make_training_pipeline`` arguments (the plan's one-core measurement)."""
    from kdface.data import DecideOnlyAugment, LowResolutionAugment, make_training_pipeline
    augment = None
    if student_view == "low_resolution":
        augment = LowResolutionAugment(sizes=tuple(config.lr_sizes), fraction=config.lr_fraction,
                                       seed=config.seed, subset=config.lr_subset)
        if config.lr_on_device:
            augment = DecideOnlyAugment(augment)
    return PipelineBatches(make_training_pipeline(
        source, global_batch_size=config.batch_size, seed=config.seed, flip=config.flip,
        teacher_view="original" if teacher_view == "original" else "augmented",
        student_view=student_view, student_augment=augment, image_size=config.input_size,
        crop_from=config.crop_from or None, normalize=False, num_workers=config.data_workers,
        batch_sampler=config.batch_sampler, images_per_identity=config.images_per_identity,
        uniform_images=config.uniform_images, **options))


def run(config: TrainConfig, *, data_dir: str, source=None, num_classes: int | None = None,
        val_sets: list[VerificationSet] | None = None) -> dict[str, Any]:
    """Plans ``config`` (``make_plan``: every check, before a dataset is built or anything is
    written), then runs the plan's runs in order (see module docstring); returns the last
    run's summary."""
    import sys

    facts = None if num_classes is None else DataFacts(
        num_classes, None if source is None else len(source))
    plan = make_plan(config, data=facts)
    if plan.finished:
        print(f"kdface.train: {plan.finished}", file=sys.stderr)
        return {"finished": True, "workdir": config.workdir, "recipe": plan.final.recipe.name}
    if source is None:
        source, num_classes = resolve_training_data(config.train_data, data_dir)
    if config.holdout_fraction:
        # the top-1 test images (kdface.evaluate --top1_data computes the same split from the
        # same data): epochs count the training images only
        from kdface.data import TrainingView
        source = TrainingView(source, fraction=config.holdout_fraction, seed=config.holdout_seed)
        facts = None
    if facts is None or facts.num_examples is None:
        plan = make_plan(config, data=DataFacts(num_classes, len(source)))
    if val_sets is None:
        val_sets = resolve_verification_sets(config.val_data, data_dir, config.input_size)
    check_verification_folds(val_sets, config.folds)
    return execute(plan, source, val_sets)


def execute(plan: RunPlan, source, val_sets: list[VerificationSet]) -> dict[str, Any]:
    """Trains the plan's runs in order on ``source``; a run already finished is skipped."""
    import sys

    summary: dict[str, Any] = {}
    for fit in plan.fits:
        if fit.finished:
            print(f"kdface.train: {fit.finished}", file=sys.stderr)
            summary = {"finished": True, "workdir": fit.workdir, "recipe": fit.recipe.name}
            continue
        summary = _train(fit, source, val_sets)
    return summary


def _train(fit: FitPlan, source, val_sets: list[VerificationSet]) -> dict[str, Any]:
    config, recipe = fit.config, fit.recipe
    batches = _pipeline(config, source, recipe.student_view, recipe.teacher_view or "original")
    cache = None
    if config.teacher_cache and recipe.needs_teacher and config.batch_sampler == "balanced":
        import jax
        if jax.process_count() > 1:
            # Each process caches its own slice of the records; the balanced order has every
            # process read from all of them.
            raise ValueError("--teacher_cache with --batch_sampler=balanced runs on one process "
                             f"only (this job has {jax.process_count()})")
    if config.teacher_cache and recipe.needs_teacher:
        from kdface.training._teacher_cache import TeacherCache
        cache = TeacherCache.for_run(fit, source)
    return fit_plan(fit, batches, val_sets=val_sets, teacher_cache=cache)
