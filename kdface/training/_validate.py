"""Checks of a run's configuration that must pass before anything slow runs or anything is written.

``run()`` calls them first: before a dataset is built, a teacher is fine-tuned or cached, or a
``config.json`` is (re)written. Each failure is one ``ValueError`` / ``FileNotFoundError`` line
naming both sides and the flag to change.

* ``check_workdir``: rerunning a workdir resumes it, so the command must describe the same run;
  only ``RESUMABLE`` options may change.
* ``finished_message``: a rerun of a finished run says so instead of training again.
* ``check_networks``: the teacher / init checkpoints exist, hold the architecture their
  ``config.json`` names, and fit the recipe (same embedding size where a term compares
  embeddings), from abstract networks (``nnx.eval_shape``; no weight is loaded).
"""
from __future__ import annotations

import json
import os
from typing import Any

from kdface.training._config import TrainConfig

# Options a rerun of a workdir may change: they extend or re-pace the same run (more steps, a
# lower learning rate after a divergence, other eval/save/log frequencies or verification
# sets) and leave the networks, the recipe, the optimizer state and the data order as they are.
# train_data may be spelled differently (a .rec path, then its built name); a different class
# count is refused when the run resumes, before config.json is rewritten. The teacher cache,
# prefetching, the divergence guard, where the LR view is made (same draws), how the head is
# placed on the devices (same parameters), and how many worker processes make the batches (same
# stream) are ways of running the same computation.
RESUMABLE = frozenset({
    "workdir", "steps", "epochs", "learning_rate", "clip_norm", "decay_steps", "decay_epochs",
    "decay_factor", "save_every", "keep", "keep_best", "eval_every", "log_every", "val_data",
    "progress", "async_checkpoints", "train_data", "teacher_cache", "teacher_cache_dir",
    "teacher_cache_dtype", "prefetch", "runaway_factor", "transfer_guard", "lr_on_device",
    "shard_head", "shard_head_min_classes", "data_workers"})
_PATHS = ("teacher_checkpoint", "init_checkpoint")


def _comparable(options: dict[str, Any]) -> dict[str, Any]:
    """Options as JSON sees them (tuples and lists alike), without the input size."""
    out = json.loads(json.dumps(dict(options or {}), default=list))
    out.pop("input_size", None)
    return out


def check_teacher_flags(config: TrainConfig, teacher: TrainConfig) -> None:
    """Refuses ``--teacher`` / ``--teacher_options`` / ``--input_size`` that contradict the
    teacher run ``teacher`` (the architecture comes from the run; the flags may restate it)."""
    where = config.teacher_checkpoint
    if config.teacher and config.teacher != teacher.student:
        raise ValueError(f"--teacher={config.teacher} contradicts the teacher run {where}, which "
                         f"trained --student={teacher.student}; leave --teacher out")
    if config.teacher_options and (_comparable(config.teacher_options)
                                   != _comparable(teacher.student_options)):
        raise ValueError(f"--teacher_options={config.teacher_options} contradict the teacher run "
                         f"{where}, trained with --student_options={teacher.student_options}; "
                         f"leave --teacher_options out")
    if tuple(teacher.input_size) != tuple(config.input_size):
        raise ValueError(f"the teacher run {where} was trained at --input_size="
                         f"{','.join(map(str, teacher.input_size))}, this run feeds "
                         f"{','.join(map(str, config.input_size))}; use the teacher's size")


def _normalized(name: str, value: Any) -> Any:
    if name in _PATHS and value:
        return os.path.abspath(value)
    value = json.loads(json.dumps(value, default=list))
    if name in ("student_options", "teacher_options") and isinstance(value, dict):
        value.pop("input_size", None)  # --input_size says it (a contradiction is refused)
    return value


def _tuples(value: Any) -> Any:
    """JSON's lists back as the tuples a flag spells (``channels=(4, 8)``)."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value


def _flag(name: str, value: Any) -> str:
    """``--name=value`` as the command line spells it."""
    if isinstance(value, dict):
        value = ",".join(f"{k}={_tuples(v)!r}" for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return f"--{name}={value}"


def changed_options(config: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """Names of the options (and trainer-resolved keys present in both) that differ between a
    new config and a workdir's ``config.json``, ``RESUMABLE`` ones excepted."""
    names = [k for k in config if k not in RESUMABLE and k in saved]
    return [k for k in names if _normalized(k, config[k]) != _normalized(k, saved[k])]


def saved_run(workdir: str) -> dict[str, Any] | None:
    """The workdir's ``config.json``, or None for a new run; refuses a workdir that is a file."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir} is a file, not a directory: give a new --workdir")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_workdir(config: TrainConfig, resolved: dict[str, Any] | None = None) -> None:
    """Refuses to resume ``config.workdir`` with a command that describes another run.

    resolved: what the trainer adds to config.json (``num_classes``, ``head_used`` ...), known
    once the data and recipe are resolved; compared too.
    """
    saved = saved_run(config.workdir)
    if saved is None:
        return
    if saved.get("relation_scope") == "device" and not config.relation_group_size:
        raise ValueError(f"workdir {config.workdir} was trained with --relation_scope=device "
                         f"(relations within each device's share of the batch), which kdface now "
                         f"spells as a sample count: resume with --relation_group_size=<batch "
                         f"size / the devices it ran on>")
    new = {**config.as_dict(), **(resolved or {})}
    diff = changed_options(new, saved)
    if diff:
        was = " ".join(_flag(k, saved[k]) for k in diff)
        asks = " ".join(_flag(k, new[k]) for k in diff)
        raise ValueError(f"workdir {config.workdir} was trained as {was}; this command asks for "
                         f"{asks}: use a new --workdir (or the same flags)")


def finished_message(config: TrainConfig) -> str | None:
    """A line saying the run in ``config.workdir`` is finished (where its results are), or None
    when there is something to train: no run yet, or a longer ``--steps`` / ``--epochs``."""
    saved = saved_run(config.workdir)
    if saved is None or "resolved_steps" not in saved:
        return None
    if any(_normalized(k, getattr(config, k)) != _normalized(k, saved.get(k))
           for k in ("steps", "epochs")):
        return None
    checkpoints = os.path.join(config.workdir, "checkpoints")
    steps = [int(d) for d in os.listdir(checkpoints) if d.isdigit()] if os.path.isdir(
        checkpoints) else []
    if not steps or max(steps) < int(saved["resolved_steps"]):
        return None
    return (f"{config.workdir} is finished: checkpoint step {max(steps)} in {checkpoints}, logs "
            f"in {os.path.join(config.workdir, 'logs')}; give a larger --steps/--epochs to train "
            f"on, or a new --workdir")


def _describe(config: TrainConfig) -> str:
    options = {k: v for k, v in (config.student_options or {}).items() if k != "input_size"}
    return f"{config.student}" + (f" ({_flag('x', options)[4:]})" if options else "")


def _abstract_backbone(config: TrainConfig):
    """The run's student backbone as shapes only (``nnx.eval_shape``: nothing is computed)."""
    from flax import nnx

    from kdface import models
    from kdface.training._restore import backbone_options
    return nnx.eval_shape(lambda: models.create(
        config.student, rngs=nnx.Rngs(0), **backbone_options(
            config.student_options, config.input_size, flag="student_options")))


def _embedding_size(config: TrainConfig) -> int:
    return int(_abstract_backbone(config).embedding_size)


def check_checkpoint_fits(path: str, config: TrainConfig, *, flag: str) -> None:
    """The latest checkpoint in run ``path`` holds the backbone its ``config.json`` describes
    (``config``), read from the checkpoint's metadata: no weight is loaded."""
    from flax import nnx

    from kdface.training._checkpoint import (param_tree_difference, flat_param_shapes,
                                             model_param_shapes)
    from kdface.training._restore import resolve_run_dir
    saved = model_param_shapes(resolve_run_dir(path)).get("network", {}).get("backbone", {})
    expected = nnx.state(_abstract_backbone(config), nnx.Param)
    if flat_param_shapes(saved) != flat_param_shapes(expected):
        raise ValueError(f"{flag} {path}: its checkpoint does not hold the {_describe(config)} "
                         f"its config.json names ({param_tree_difference(saved, expected)}); give "
                         f"{flag} the workdir of the run that wrote it")


def _same_backbone(a: TrainConfig, b: TrainConfig) -> bool:
    def key(c):
        options = _normalized("", dict(c.student_options or {}))
        options.pop("input_size", None)
        return c.student, options, tuple(c.input_size)
    return key(a) == key(b)


def _run_config(path: str, planned: dict[str, TrainConfig], *, flag: str) -> TrainConfig:
    """The config of the run in ``path``: a run this command trains first (``planned``, by
    absolute workdir), else the one its ``config.json`` records."""
    from kdface.training._restore import read_run_config
    if os.path.abspath(path) in planned:
        return planned[os.path.abspath(path)]
    try:
        return read_run_config(path)[0]
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{flag}: {e}") from None


def check_networks(config: TrainConfig, recipe,
                   planned: dict[str, TrainConfig] | None = None) -> None:
    """The teacher and init checkpoints exist and fit this run (see module docstring).

    planned: runs this command trains before ``config`` (a teacher phase, earlier generations)
    by absolute workdir; a checkpoint naming one of them is checked against its config.
    """
    planned = planned or {}
    if config.init_checkpoint:
        init = _run_config(config.init_checkpoint, planned, flag="--init_checkpoint")
        if not _same_backbone(config, init):
            raise ValueError(
                f"--init_checkpoint {config.init_checkpoint} holds a {_describe(init)} at "
                f"--input_size={_flag('x', init.input_size)[4:]}; --student says "
                f"{_describe(config)} at {_flag('x', config.input_size)[4:]}: use a checkpoint "
                f"of the same --student/--student_options, or leave --init_checkpoint out")
        if os.path.abspath(config.init_checkpoint) not in planned:
            check_checkpoint_fits(config.init_checkpoint, init, flag="--init_checkpoint")
    if not recipe.needs_teacher:
        return
    from kdface import interop
    if config.teacher and interop.is_imported_teacher(config.teacher):
        return
    if not config.teacher_checkpoint:
        raise ValueError(f"recipe {recipe.name!r} needs --teacher_checkpoint (the workdir of a "
                         f"kdface run of the teacher) or --teacher=pth:PATH / onnx:PATH")
    teacher = _run_config(config.teacher_checkpoint, planned, flag="--teacher_checkpoint")
    if config.teacher and config.teacher != teacher.student:
        raise ValueError(f"--teacher_checkpoint {config.teacher_checkpoint} holds a "
                         f"{_describe(teacher)}; --teacher says {config.teacher}: leave "
                         f"--teacher out (the checkpoint's config.json names it) or give the "
                         f"teacher run of a {config.teacher}")
    check_teacher_flags(config, teacher)
    if os.path.abspath(config.teacher_checkpoint) not in planned:
        check_checkpoint_fits(config.teacher_checkpoint, teacher, flag="--teacher_checkpoint")
    same_embedding = recipe.requiring("same_embedding")
    if same_embedding:
        s_size, t_size = _embedding_size(config), _embedding_size(teacher)
        if s_size != t_size:
            raise ValueError(
                f"the student {_describe(config)} embeds in {s_size} dimensions, the teacher "
                f"{_describe(teacher)} of --teacher_checkpoint {config.teacher_checkpoint} in "
                f"{t_size}; the terms {list(same_embedding)} compare embeddings directly: give "
                f"--student_options=embedding_size={t_size}")


def check_classes(config: TrainConfig, recipe, num_classes: int) -> None:
    """Terms comparing class logits need the teacher trained on as many classes as the data."""
    same_classes = recipe.requiring("same_classes")
    if not same_classes or not recipe.needs_teacher or not config.teacher_checkpoint:
        return
    from kdface import interop
    if config.teacher and interop.is_imported_teacher(config.teacher):
        return
    from kdface.training._restore import read_run_config
    _, teacher_run = read_run_config(config.teacher_checkpoint)
    if int(teacher_run["num_classes"]) != int(num_classes):
        raise ValueError(f"--teacher_checkpoint {config.teacher_checkpoint} was trained on "
                         f"{teacher_run['num_classes']} classes, --train_data "
                         f"{config.train_data} has {num_classes}; the terms "
                         f"{list(same_classes)} compare class logits: distil on the teacher's "
                         f"training set")
