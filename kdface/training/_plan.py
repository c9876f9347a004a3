"""The run plan: what a command will train, as one frozen value, checked before anything runs.

``make_plan(config, data=...)`` turns a ``TrainConfig`` (flags + flagfile) and the state of the
workdirs it names into a ``RunPlan``: the runs in order (a recipe's teacher phases, its
generations, the run itself), each a ``FitPlan`` holding the resolved recipe, the teacher's
source, the class count and schedule, the head's placement on the devices, the stage shapes the
adapters fit, and the resume decision, plus the ``config.json`` it writes. Every check of the
configuration happens here, in this file; each failure is one ``ValueError`` /
``FileNotFoundError`` line naming both sides and the flag to change. ``run`` executes the plan,
``fit`` one ``FitPlan``; neither reads a workdir's ``config.json`` nor re-derives what the plan
says. Nothing here builds a network's weights or touches data or a device: abstract shapes come
from ``nnx.eval_shape``, the device count is the plan's input (the local devices by default, a
TPU topology's for a compile-only plan).

The checks:

* ``check_workdir``: rerunning a workdir resumes it, so the command must describe the same run;
  only ``RESUMABLE`` options may change.
* ``finished_message``: a rerun of a finished run says so instead of training again.
* ``check_networks``: the teacher / init checkpoints exist, hold the architecture their
  ``config.json`` names, and fit the recipe (same embedding size where a term compares
  embeddings), from abstract networks (``nnx.eval_shape``; no weight is loaded).
* ``check_classes``: terms comparing class logits need the teacher trained on the data's classes.
* the global batch splits evenly over the devices.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax

from kdface.distill import Recipe, build_recipe
from kdface.training._config import TrainConfig
from kdface.training._optim import DEFAULT_STEPS, StepSchedule, epochs_to_steps
from kdface.training._placement import HeadPlacement, head_placement

# Options a rerun of a workdir may change: they extend or re-pace the same run (more steps, a
# lower learning rate after a divergence, other eval/save/log frequencies, verification
# sets or their folds) and leave the networks, the recipe, the optimizer state and the data
# order as they are.
# train_data may be spelled differently (a .rec path, then its built name); a different class
# count is refused when the run resumes, before config.json is rewritten. The teacher cache,
# prefetching, the divergence guard, where the LR view is made (same draws), how the head is
# placed on the devices (same parameters), and how many worker processes make the batches (same
# stream) are ways of running the same computation.
RESUMABLE = frozenset({
    "workdir", "steps", "epochs", "learning_rate", "clip_norm", "decay_steps", "decay_epochs",
    "decay_factor", "save_every", "keep", "keep_best", "eval_every", "log_every", "val_data",
    "folds", "progress", "async_checkpoints", "train_data", "teacher_cache", "teacher_cache_dir",
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


def _read_run(path: str, *, flag: str) -> tuple[TrainConfig, dict[str, Any]]:
    """``(config, config.json)`` of the kdface run in ``path`` (its last generation for a
    recursive-KD run); a missing run is refused naming ``flag``."""
    from kdface.training._restore import read_run_config
    try:
        return read_run_config(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{flag}: {e}") from None


def _run_config(path: str, planned: dict[str, TrainConfig], *,
                flag: str) -> tuple[TrainConfig, dict[str, Any] | None]:
    """``(config, config.json or None)`` of the run in ``path``: a run this command trains
    first (``planned``, by absolute workdir; no config.json yet), else the one its
    ``config.json`` records."""
    if os.path.abspath(path) in planned:
        return planned[os.path.abspath(path)], None
    return _read_run(path, flag=flag)


def check_networks(config: TrainConfig, recipe,
                   planned: dict[str, TrainConfig] | None = None) -> TeacherSource:
    """The teacher and init checkpoints exist and fit this run (see module docstring); returns
    where the teacher comes from.

    planned: runs this command trains before ``config`` (a teacher phase, earlier generations)
    by absolute workdir; a checkpoint naming one of them is checked against its config.
    """
    planned = planned or {}
    if config.init_checkpoint:
        init, _ = _run_config(config.init_checkpoint, planned, flag="--init_checkpoint")
        if not _same_backbone(config, init):
            raise ValueError(
                f"--init_checkpoint {config.init_checkpoint} holds a {_describe(init)} at "
                f"--input_size={_flag('x', init.input_size)[4:]}; --student says "
                f"{_describe(config)} at {_flag('x', config.input_size)[4:]}: use a checkpoint "
                f"of the same --student/--student_options, or leave --init_checkpoint out")
        if os.path.abspath(config.init_checkpoint) not in planned:
            check_checkpoint_fits(config.init_checkpoint, init, flag="--init_checkpoint")
    if not recipe.needs_teacher:
        return TeacherSource("none")
    from kdface import interop
    if config.teacher and interop.is_imported_teacher(config.teacher):
        return TeacherSource("imported", spec=config.teacher)
    if not config.teacher_checkpoint:
        raise ValueError(f"recipe {recipe.name!r} needs --teacher_checkpoint (the workdir of a "
                         f"kdface run of the teacher) or --teacher=pth:PATH / onnx:PATH")
    teacher, teacher_run = _run_config(config.teacher_checkpoint, planned,
                                       flag="--teacher_checkpoint")
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
    return TeacherSource("run", spec=config.teacher_checkpoint, config=teacher, run=teacher_run,
                         planned=teacher_run is None)


def check_classes(config: TrainConfig, recipe, num_classes: int,
                  teacher: TeacherSource) -> None:
    """Terms comparing class logits need the teacher trained on as many classes as the data (a
    teacher run this command trains first is trained on this data)."""
    same_classes = recipe.requiring("same_classes")
    if not same_classes or teacher.kind != "run" or teacher.run is None:
        return
    if int(teacher.run["num_classes"]) != int(num_classes):
        raise ValueError(f"--teacher_checkpoint {config.teacher_checkpoint} was trained on "
                         f"{teacher.run['num_classes']} classes, --train_data "
                         f"{config.train_data} has {num_classes}; the terms "
                         f"{list(same_classes)} compare class logits: distil on the teacher's "
                         f"training set")


# ------------------------------------------------------------------------------------ the plan

@dataclasses.dataclass(frozen=True)
class DataFacts:
    """What the plan needs of the training set: its class count and size (from the built
    dataset's metadata or the caller; no image is read)."""
    num_classes: int
    num_examples: int | None = None


@dataclasses.dataclass(frozen=True)
class TeacherSource:
    """Where a run's frozen teacher comes from. ``kind``: 'none' (the recipe needs no teacher),
    'run' (the kdface run in ``spec``, whose config is ``config`` and config.json ``run``;
    ``planned`` when this command trains it first), 'imported' (``spec`` is ``pth:...`` /
    ``onnx:...``, kdface.interop) or, in a compile-only plan, 'flags' (a teacher run that does
    not exist here, described by ``--teacher``/``--teacher_options`` as ``config``)."""
    kind: str
    spec: str | None = None
    config: TrainConfig | None = None
    run: Any = None
    planned: bool = False


@dataclasses.dataclass(frozen=True)
class FitPlan:
    """One call of the training loop, fully resolved. ``role``: 'teacher_phase', 'generation'
    or 'student'. ``schedule`` and ``num_classes`` are None until the data's facts are known
    (``make_plan(..., data=None)``: the data-free checks only). ``resume_step``: the latest
    checkpoint in the workdir (None: a new run); ``finished``: the line saying the run is done,
    or None. ``head``: which margin heads are split over the devices (``--shard_head``), or
    None."""
    config: TrainConfig
    recipe: Recipe
    role: str
    teacher: TeacherSource
    devices: int
    num_classes: int | None
    num_examples: int | None
    schedule: StepSchedule | None
    head: HeadPlacement | None
    teacher_stage_shapes: tuple[tuple[int, int, int], ...] | None
    resume_step: int | None
    finished: str | None

    @property
    def workdir(self) -> str:
        return self.config.workdir

    def resolved(self) -> dict[str, Any]:
        """What the trainer adds to config.json next to the TrainConfig fields."""
        out = {"head_used": self.recipe.head, "num_classes": self.num_classes,
               "landmark_head": self.recipe.landmark_head, "adapters": self.recipe.adapters,
               "teacher_stage_shapes": (None if self.teacher_stage_shapes is None
                                        else [list(s) for s in self.teacher_stage_shapes])}
        if self.schedule is not None:
            out.update(resolved_steps=self.schedule.steps,
                       resolved_decay_steps=self.schedule.decay_steps,
                       resolved_warmup_steps=self.schedule.warmup_steps)
        return out

    def config_json(self) -> dict[str, Any]:
        """The run's ``config.json``: its TrainConfig and what the plan resolved."""
        return {**self.config.as_dict(), **self.resolved()}


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A command's runs in the order ``run`` trains them (teacher phases, generations or the
    student); ``data``: the training set's facts, None before they are known."""
    fits: tuple[FitPlan, ...]
    data: DataFacts | None

    @property
    def final(self) -> FitPlan:
        return self.fits[-1]

    @property
    def finished(self) -> str | None:
        """The line saying the command's last run is finished, or None."""
        return self.final.finished


def resolve_schedule(config, num_examples: int | None) -> StepSchedule:
    """The run's steps, warmup and decay points, from ``--steps``/``--decay_steps``/
    ``--warmup_steps`` or from their epoch forms resolved against the training set's size
    ``num_examples`` and the global batch. Giving both forms of one setting is refused."""
    pairs = (("steps", config.steps is not None, "epochs", config.epochs is not None),
             ("decay_steps", bool(config.decay_steps), "decay_epochs", bool(config.decay_epochs)),
             ("warmup_steps", bool(config.warmup_steps), "warmup_epochs",
              bool(config.warmup_epochs)))
    for steps_name, has_steps, epochs_name, has_epochs in pairs:
        if has_steps and has_epochs:
            raise ValueError(f"--{steps_name} and --{epochs_name} both set the same thing; "
                             f"give one of them")
    uses_epochs = (config.epochs is not None or bool(config.decay_epochs)
                   or bool(config.warmup_epochs))
    if uses_epochs and not num_examples:
        raise ValueError("--epochs/--decay_epochs/--warmup_epochs need the training set's size, "
                         "which this data source does not report; give --steps/--decay_steps/"
                         "--warmup_steps instead")
    to_steps = lambda e: epochs_to_steps(e, num_examples, config.batch_size)
    if config.epochs is not None:
        if config.epochs <= 0:
            raise ValueError(f"--epochs must be > 0, got {config.epochs}")
        steps = to_steps(config.epochs)
    else:
        steps = DEFAULT_STEPS if config.steps is None else int(config.steps)
    decay = (tuple(to_steps(e) for e in config.decay_epochs) if config.decay_epochs
             else tuple(int(s) for s in config.decay_steps))
    warmup = to_steps(config.warmup_epochs) if config.warmup_epochs else int(config.warmup_steps)
    return StepSchedule(steps=steps, warmup_steps=warmup, decay_steps=decay)


def resolve_recipe(config: TrainConfig) -> Recipe:
    """The recipe ``config`` names, resolved against its options (the recipe layer sees the
    options as a mapping, not the trainer's config type)."""
    return build_recipe(config.recipe, config.as_dict())


def make_plan(config: TrainConfig, *, data: DataFacts | None = None,
              devices: int | None = None, compile_only: bool = False) -> RunPlan:
    """The plan of ``config`` (see module docstring): every check, nothing written.

    data: the training set's facts; None checks everything that needs no data (call again with
    them once the dataset is built). devices: the data-parallel device count the runs will use
    (default: every device of this process's JAX backend). compile_only: a plan to compile, not
    to train (``--plan_topology``): checkpoints that do not exist here are planned from the
    flags (the teacher from ``--teacher``; ``--init_checkpoint`` only sets weights, which do not
    change the program).
    """
    devices = jax.device_count() if devices is None else int(devices)
    saved_run(config.workdir)  # refuses a workdir that is a file
    recipe = resolve_recipe(config)
    runs: list[tuple[TrainConfig, str]] = []
    for phase in recipe.phases:
        tune, config = _phase_configs(config, phase)
        runs.append((tune, "teacher_phase"))
    if recipe.generations > 1:
        previous = config.init_checkpoint
        for k in range(1, recipe.generations + 1):
            gen = _generation_config(config, k, previous)
            runs.append((gen, "generation"))
            previous = gen.workdir
    else:
        runs.append((config, "student"))
    planned: dict[str, TrainConfig] = {}
    fits = []
    for run_config, role in runs:
        fits.append(plan_fit(run_config, data=data, devices=devices, planned=planned,
                             role=role, compile_only=compile_only))
        planned[os.path.abspath(run_config.workdir)] = run_config
    return RunPlan(fits=tuple(fits), data=data)


def plan_fit(config: TrainConfig, *, data: DataFacts | None, devices: int,
             planned: dict[str, TrainConfig] | None = None, role: str = "student",
             compile_only: bool = False) -> FitPlan:
    """The plan of one training-loop run (``fit``): the checks of the module docstring for
    ``config`` alone. planned: runs this command trains before it, by absolute workdir."""
    planned = planned or {}
    recipe = resolve_recipe(config)
    if config.batch_size % devices:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {devices} "
                         f"devices")
    num_classes = None if data is None else int(data.num_classes)
    num_examples = None if data is None else data.num_examples
    resolved = None if num_classes is None else {"num_classes": num_classes,
                                                 "head_used": recipe.head}
    check_workdir(config, resolved)
    if compile_only:
        planned = {**planned, **_absent_runs(config)}
    teacher = check_networks(config, recipe, planned)
    if teacher.kind == "run" and teacher.config.workdir == _FROM_FLAGS:
        teacher = TeacherSource("flags", spec=config.teacher, config=teacher.config)
    if num_classes is not None:
        check_classes(config, recipe, num_classes, teacher)
    schedule = None if data is None else resolve_schedule(config, num_examples)
    head = head_placement(config.shard_head, config.shard_head_min_classes, num_classes, devices)
    return FitPlan(config=config, recipe=recipe, role=role, teacher=teacher, devices=devices,
                   num_classes=num_classes, num_examples=num_examples, schedule=schedule,
                   head=head, teacher_stage_shapes=_teacher_stage_shapes(config, recipe,
                                                                         teacher),
                   resume_step=_latest_checkpoint(config.workdir),
                   finished=finished_message(config))


_FROM_FLAGS = "<planned from the flags>"


def _absent_runs(config: TrainConfig) -> dict[str, TrainConfig]:
    """For a compile-only plan: the teacher / init runs that do not exist on this machine, as
    the flags describe them (the teacher's architecture from ``--teacher`` and
    ``--teacher_options``, the init run as the student itself)."""
    out = {}
    teacher = config.teacher_checkpoint
    if teacher and not os.path.isdir(teacher):
        from kdface import interop
        if not config.teacher or interop.is_imported_teacher(config.teacher):
            raise ValueError(f"--teacher_checkpoint {teacher} does not exist here: a "
                             f"compile-only plan then takes the teacher's architecture from "
                             f"--teacher (and --teacher_options)")
        out[os.path.abspath(teacher)] = config.replace(
            workdir=_FROM_FLAGS, student=config.teacher,
            student_options=dict(config.teacher_options or {}))
    init = config.init_checkpoint
    if init and not os.path.isdir(init):
        out[os.path.abspath(init)] = config.replace(workdir=_FROM_FLAGS)
    return out


def _latest_checkpoint(workdir: str) -> int | None:
    checkpoints = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(checkpoints):
        return None
    steps = [int(d) for d in os.listdir(checkpoints) if d.isdigit()]
    return max(steps) if steps else None


def _teacher_stage_shapes(config: TrainConfig, recipe: Recipe, teacher: TeacherSource):
    """The teacher's four stage shapes at ``--input_size`` when the recipe adapts the student's
    stages to them (from the abstract teacher backbone); None when it does not, or when the
    teacher is imported (its shapes are read from the imported network when it is loaded)."""
    if not recipe.adapters:
        return None
    if teacher.kind == "none":
        raise ValueError(f"recipe {recipe.name!r} adapts the student's stages to the teacher's, "
                         f"so it needs a teacher (--teacher_checkpoint)")
    if teacher.kind not in ("run", "flags"):
        return None
    shapes = _abstract_backbone(teacher.config).stage_shapes(tuple(config.input_size))
    return tuple(tuple(int(v) for v in s) for s in shapes)


def _generation_config(config: TrainConfig, k: int, previous: str | None) -> TrainConfig:
    """Generation ``k`` of a recursive-KD run (Yan et al. 2019): ``workdir/gen_k``, from
    ``previous``'s student. Generations share one teacher, so they share its cache (the
    parent's)."""
    return config.replace(workdir=os.path.join(config.workdir, f"gen_{k}"),
                          init_checkpoint=previous, generations=1,
                          teacher_cache_dir=config.teacher_cache_dir or os.path.join(
                              config.workdir, "teacher_cache"))


def _phase_configs(config: TrainConfig, phase) -> tuple[TrainConfig, TrainConfig]:
    """``(teacher run, distillation)``: the config that trains the teacher again as ``phase``
    declares (in ``workdir/<phase.subdir>``, from ``teacher_checkpoint``; e.g. Wang et al.
    2019's ``kd`` fine-tunes it on low-resolution-augmented data) and ``config`` distilling
    from that run instead."""
    if config.teacher and config.teacher.split(":", 1)[0] in ("pth", "onnx"):
        raise ValueError(f"recipe {config.recipe!r} trains the teacher again before distilling "
                         f"({phase.cite or phase.subdir}), which needs a kdface teacher "
                         f"checkpoint (--teacher_checkpoint), not an imported {config.teacher}")
    if not config.teacher_checkpoint:
        raise ValueError(f"recipe {config.recipe!r} trains the teacher again from "
                         f"--teacher_checkpoint (the workdir of a kdface run of the teacher)")
    teacher, teacher_run = _read_run(config.teacher_checkpoint, flag="--teacher_checkpoint")
    check_teacher_flags(config, teacher)
    teacher_dir = os.path.join(config.workdir, phase.subdir)
    tune = config.replace(workdir=teacher_dir, recipe=phase.recipe, student=teacher.student,
                          student_options=teacher.student_options,
                          head=teacher_run["head_used"], init_checkpoint=config.teacher_checkpoint,
                          teacher=None, teacher_options={}, teacher_checkpoint=None,
                          student_view=phase.student_view, generations=1)
    return tune, config.replace(teacher_checkpoint=teacher_dir)
