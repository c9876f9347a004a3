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
from kdface.training._loop import VerificationSet, fit


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
        images1, images2, issame, _ = make_verification_arrays(source, image_size=input_size)
        interleaved = np.stack([images1, images2], axis=1).reshape(-1, *images1.shape[1:])
        sets.append(VerificationSet(name, interleaved, issame))
    return sets


def _pipeline(config: TrainConfig, source, student_view: str, teacher_view: str):
    """The two-view pipeline; images stay uint8 (normalized in the step, a quarter of the bytes
    to transfer) and, with ``--lr_on_device``, the host only draws each sample's LR size."""
    from kdface.data import DecideOnlyAugment, LowResolutionAugment, make_training_pipeline
    augment = None
    if student_view == "low_resolution":
        augment = LowResolutionAugment(sizes=tuple(config.lr_sizes), fraction=config.lr_fraction,
                                       seed=config.seed)
        if config.lr_on_device:
            augment = DecideOnlyAugment(augment)
    return PipelineBatches(make_training_pipeline(
        source, global_batch_size=config.batch_size, seed=config.seed, flip=config.flip,
        teacher_view="original" if teacher_view == "original" else "augmented",
        student_view=student_view, student_augment=augment, image_size=config.input_size,
        crop_from=config.crop_from or None, normalize=False, num_workers=config.data_workers))


def planned_runs(config: TrainConfig, recipe) -> list[TrainConfig]:
    """The configs ``fit`` will be called with, in order, as ``run`` derives them (teacher
    phases, then the student or each generation): what the checks compare with the workdirs."""
    runs = []
    for phase in recipe.phases:
        tune, config = _phase_configs(config, phase)
        runs.append(tune)
    if recipe.generations > 1:
        previous = config.init_checkpoint
        for k in range(1, recipe.generations + 1):
            gen = _generation_config(config, k, previous)
            runs.append(gen)
            previous = gen.workdir
        return runs
    return runs + [config]


def validate(config: TrainConfig, recipe) -> str | None:
    """Every check that needs no data, before anything is built or written; returns a line
    saying the run is already finished, or None when there is training to do."""
    from kdface.training._validate import (check_networks, check_workdir, finished_message,
                                           saved_run)
    saved_run(config.workdir)  # refuses a workdir that is a file
    runs = planned_runs(config, recipe)
    for planned in runs:
        check_workdir(planned)
    earlier: dict[str, TrainConfig] = {}
    for planned in runs:
        check_networks(planned, build_recipe_for(planned), earlier)
        earlier[os.path.abspath(planned.workdir)] = planned
    return finished_message(runs[-1])


def build_recipe_for(config: TrainConfig):
    from kdface.distill import build_recipe
    return build_recipe(config.recipe, config)


def run(config: TrainConfig, *, data_dir: str, source=None, num_classes: int | None = None,
        val_sets: list[VerificationSet] | None = None) -> dict[str, Any]:
    """Runs ``config`` end to end (see module docstring); returns the last fit's summary."""
    import sys

    from kdface.training._validate import check_classes
    recipe = build_recipe_for(config)
    finished = validate(config, recipe)
    if finished:
        print(f"kdface.train: {finished}", file=sys.stderr)
        return {"finished": True, "workdir": config.workdir, "recipe": recipe.name}
    if source is None:
        source, num_classes = resolve_training_data(config.train_data, data_dir)
    check_classes(config, recipe, num_classes)
    if val_sets is None:
        val_sets = resolve_verification_sets(config.val_data, data_dir, config.input_size)
    for phase in recipe.phases:
        tune, config = _phase_configs(config, phase)
        run(tune, data_dir=data_dir, source=source, num_classes=num_classes, val_sets=val_sets)
    if recipe.generations > 1:
        summary, previous = {}, config.init_checkpoint
        for k in range(1, recipe.generations + 1):
            gen = _generation_config(config, k, previous)
            summary = run(gen, data_dir=data_dir, source=source, num_classes=num_classes,
                          val_sets=val_sets)
            previous = gen.workdir
        return summary
    batches = _pipeline(config, source, recipe.student_view, recipe.teacher_view or "original")
    cache = None
    if config.teacher_cache and recipe.needs_teacher:
        from kdface.training._teacher_cache import TeacherCache
        cache = TeacherCache.for_run(config, recipe, source, num_classes)
    return fit(config, batches, num_classes=num_classes, val_sets=val_sets,
               teacher_cache=cache, num_examples=len(source))


def _generation_config(config: TrainConfig, k: int, previous: str | None) -> TrainConfig:
    """Generation ``k`` of a recursive-KD run: ``workdir/gen_k``, from ``previous``'s student.
    Generations share one teacher, so they share its cache (the parent's)."""
    return config.replace(workdir=os.path.join(config.workdir, f"gen_{k}"),
                          init_checkpoint=previous, generations=1,
                          teacher_cache_dir=config.teacher_cache_dir or os.path.join(
                              config.workdir, "teacher_cache"))


def _phase_configs(config: TrainConfig, phase) -> tuple[TrainConfig, TrainConfig]:
    """``(teacher run, distillation)``: the config that trains the teacher again as ``phase``
    declares (in ``workdir/<phase.subdir>``, from ``teacher_checkpoint``) and ``config``
    distilling from that run instead."""
    if config.teacher and config.teacher.split(":", 1)[0] in ("pth", "onnx"):
        raise ValueError(f"recipe {config.recipe!r} trains the teacher again before distilling "
                         f"({phase.cite or phase.subdir}), which needs a kdface teacher "
                         f"checkpoint (--teacher_checkpoint), not an imported {config.teacher}")
    if not config.teacher_checkpoint:
        raise ValueError(f"recipe {config.recipe!r} trains the teacher again from "
                         f"--teacher_checkpoint (the workdir of a kdface run of the teacher)")
    from kdface.training._validate import check_teacher_flags
    from kdface.training._restore import read_run_config
    teacher, teacher_run = read_run_config(config.teacher_checkpoint)
    check_teacher_flags(config, teacher)
    teacher_dir = os.path.join(config.workdir, phase.subdir)
    tune = config.replace(workdir=teacher_dir, recipe=phase.recipe, student=teacher.student,
                          student_options=teacher.student_options,
                          head=teacher_run["head_used"], init_checkpoint=config.teacher_checkpoint,
                          teacher=None, teacher_options={}, teacher_checkpoint=None,
                          student_view=phase.student_view, generations=1)
    return tune, config.replace(teacher_checkpoint=teacher_dir)
