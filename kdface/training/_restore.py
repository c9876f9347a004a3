"""Rebuilding a finished (or running) training run from its workdir, in one place.

A run's workdir holds ``config.json`` (its ``TrainConfig`` plus what the trainer resolved:
``num_classes``, ``head_used``, ``adapters``, ``landmark_head``, ``teacher_stage_shapes``) and
``checkpoints/``. ``restore_run(workdir)`` builds the student exactly as the trainer did (backbone
with its options and input size, head, landmark head, stage adapters) abstractly with
``nnx.eval_shape`` and fills it params-only from a checkpoint. The frozen-teacher loader, the
evaluator's ``Embedder`` and ``python -m kdface.export`` all use it, and the trainer builds its
students with the same ``build_run_student``, so the trees always match.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from kdface import models
from kdface.distill import DistillStudent, FaceNetwork, build_student
from kdface.training._checkpoint import load_model_weights, model_param_shapes
from kdface.training._config import TrainConfig

# Keys the trainer adds to config.json next to the TrainConfig fields.
RUN_KEYS = ("num_classes", "head_used")


def resolve_run_dir(workdir: str) -> str:
    """The directory holding the run's ``config.json``: ``workdir`` itself, or for a
    ``generations=K`` run (Yan et al. 2019), which keeps its students in ``workdir/gen_1..gen_K``,
    the last generation."""
    workdir = os.fspath(workdir)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"run directory {workdir} does not exist")
    if os.path.isfile(os.path.join(workdir, "config.json")):
        return workdir
    gens = sorted((int(d[4:]), d) for d in os.listdir(workdir)
                  if d.startswith("gen_") and d[4:].isdigit()
                  and os.path.isfile(os.path.join(workdir, d, "config.json")))
    if gens:
        return os.path.join(workdir, gens[-1][1])
    raise FileNotFoundError(f"{os.path.join(workdir, 'config.json')} missing: {workdir} is not "
                            f"a kdface training workdir (made by python -m kdface.train)")


def read_run_config(workdir: str) -> tuple[TrainConfig, dict[str, Any]]:
    """``(config, run)`` of a run: its ``TrainConfig`` and the whole ``config.json`` dict."""
    workdir = resolve_run_dir(workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        raw = json.load(f)
    missing = [k for k in ("student", "student_options", "input_size", "recipe", *RUN_KEYS)
               if k not in raw]
    if missing:
        raise ValueError(f"{workdir}/config.json lacks {missing}: not written by kdface.training")
    return TrainConfig.from_dict(raw), raw


def backbone_options(options: dict[str, Any] | None, input_size: Sequence[int], *,
                     flag: str) -> dict[str, Any]:
    """``options`` with ``input_size`` set to the run's ``--input_size``; an ``input_size`` in
    the options that says otherwise is refused (it is given once, by ``--input_size``)."""
    out = dict(options or {})
    size = tuple(int(v) for v in input_size)
    given = out.get("input_size")
    if given is not None and tuple(int(v) for v in given) != size:
        raise ValueError(f"--{flag} input_size={tuple(given)} contradicts --input_size="
                         f"{size[0]},{size[1]}; give the size once, with --input_size")
    out["input_size"] = size
    return out


def build_run_student(config: TrainConfig, *, num_classes: int, head: str,
                      landmark_head: bool, rngs: nnx.Rngs,
                      teacher_stage_shapes: Sequence[Sequence[int]] | None = None
                      ) -> DistillStudent:
    """The student network of a run: the one constructor behind training and restoring."""
    return build_student(
        config.student, num_classes=num_classes, head=head, rngs=rngs,
        backbone_options=backbone_options(config.student_options, config.input_size,
                                          flag="student_options"),
        logit_scale=config.margin_scale, landmark_head=landmark_head,
        adapt_to=teacher_stage_shapes, input_hw=tuple(config.input_size))


@dataclasses.dataclass
class Restored:
    """A rebuilt run. ``student``: the trained side (network + stage adapters, if any);
    ``network``: its eval-mode ``FaceNetwork`` (backbone, head, landmark head); ``config``: the
    run's ``TrainConfig``; ``run``: its whole ``config.json``; ``meta``: the checkpoint's meta;
    ``step``: the checkpoint step; ``workdir``: the directory restored from."""
    student: DistillStudent
    config: TrainConfig
    run: dict[str, Any]
    meta: dict[str, Any]
    step: int
    workdir: str

    @property
    def network(self) -> FaceNetwork:
        return self.student.network

    @property
    def num_classes(self) -> int:
        return int(self.run["num_classes"])

    @property
    def head(self) -> str:
        return self.run["head_used"]

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.config.input_size)


def _student_parts(workdir: str, config: TrainConfig, run: dict[str, Any],
                   step: int | None) -> tuple[bool, Any]:
    """``(landmark_head, teacher_stage_shapes or None)`` of a run's student.

    Which parts exist is read from the checkpoint itself (its parameter tree), so any run
    restores whatever recipe wrote it, even one this process has not registered. The adapters'
    target sizes are the ones config.json records; a run that did not record them gets
    adapters without resizing, which have the same parameters (the resize has none) and serve
    every use of a restored run but re-running the stage terms.
    """
    params = model_param_shapes(workdir, step=step)
    landmark_head = "landmark_head" in params.get("network", {})
    if "adapters" not in params:
        return landmark_head, None
    if run.get("teacher_stage_shapes"):
        return landmark_head, run["teacher_stage_shapes"]
    student = nnx.eval_shape(lambda: models.create(
        config.student, rngs=nnx.Rngs(0), **backbone_options(
            config.student_options, config.input_size, flag="student_options")))
    shapes = []
    for i, (h, w, _) in enumerate(student.stage_shapes(tuple(config.input_size))):
        kernel = params["adapters"][str(i)]["conv"]["kernel"]  # [1, 1, C_student, C_teacher]
        kernel = kernel.get("value", ()) if isinstance(kernel, dict) else kernel
        shapes.append((h, w, int(kernel[-1])))
    return landmark_head, shapes


def restore_run(workdir: str, *, step: int | None = None) -> Restored:
    """Rebuilds the student of the run in ``workdir`` (or its last generation) from its
    ``config.json`` and the checkpoint at ``step`` (latest if None), params-only, eval mode.

    Raises FileNotFoundError when there is no run or checkpoint, ValueError when the checkpoint
    does not fit the architecture the config describes.
    """
    workdir = resolve_run_dir(workdir)
    config, run = read_run_config(workdir)
    landmark_head, shapes = _student_parts(workdir, config, run, step)
    abstract = nnx.eval_shape(lambda: build_run_student(
        config, num_classes=int(run["num_classes"]), head=run["head_used"],
        landmark_head=landmark_head, rngs=nnx.Rngs(0), teacher_stage_shapes=shapes))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    try:
        weights, meta = load_model_weights(workdir, {"params": params, "rest": rest}, step=step)
    except ValueError as e:
        raise ValueError(f"{e}: its config.json describes a {config.student} with "
                         f"--student_options={config.student_options}, so the workdir's "
                         f"checkpoints were written by another run; use a run's own "
                         f"workdir") from e
    student = nnx.merge(graphdef, weights["params"], weights["rest"])
    student.eval()
    meta = meta if isinstance(meta, dict) else {}
    return Restored(student=student, config=config, run=run, meta=meta,
                    step=int(meta.get("step", -1)), workdir=workdir)


def _shapes(module: nnx.Module) -> list[tuple[str, Any, Any]]:
    """(path, shape, dtype) of every leaf: what must agree before weights are copied."""
    return [(jax.tree_util.keystr(path), getattr(x, "shape", None), getattr(x, "dtype", None))
            for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(module))]


def init_from_run(student: DistillStudent, directory: str) -> list[str]:
    """Copies into ``student`` every part of the run in ``directory`` that has the same
    architecture: the backbone (required), and the classifier head, landmark head and stage
    adapters when both have them with the same shapes (Wang et al. 2017's full initialization
    starts an alignment student from a classification run, which has no landmark head or
    adapters). Returns the names of the parts copied."""
    source = restore_run(directory).student
    pairs = [("backbone", student.network.backbone, source.network.backbone),
             ("head", student.network.head, source.network.head),
             ("landmark_head", student.network.landmark_head, source.network.landmark_head),
             ("adapters", student.adapters, source.adapters)]
    copied = []
    for name, target, origin in pairs:
        if target is None or origin is None:
            continue
        if _shapes(target) != _shapes(origin):
            if name == "backbone":
                raise ValueError(f"--init_checkpoint {directory} holds a different backbone "
                                 f"than this run's --student/--student_options/--input_size")
            continue
        nnx.update(target, nnx.state(origin))
        copied.append(name)
    return copied
