r"""`python -m kdface.train --flagfile=kdface/configs/<recipe>.flags`: every recipe, one trainer.

Examples (each flagfile in kdface/configs/ carries its paper's settings):

  python -m kdface.train --flagfile=kdface/configs/scratch_teacher.flags --workdir=runs/teacher
  python -m kdface.train --flagfile=kdface/configs/kd_im.flags --workdir=runs/kd_im \
      --teacher_checkpoint=runs/teacher

Rerunning the same command resumes from the latest checkpoint in --workdir (or says the run is
finished). ``--student_options`` / ``--teacher_options`` given both in a flagfile and on the
command line are merged key by key (the later occurrence wins a key; an empty value clears the
earlier keys), and one line says where each key came from. Every field of
``kdface.training.TrainConfig`` is a flag of the same name, generated from the field (its type,
default, help text and choices): the dataclass is the only place an option is declared.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing
from typing import Any

from absl import app, flags

from kdface._cli import UsageError, parse_key_values, run_main, silence_logs, wants_verbose
# The config module alone (not kdface.training): flags and --help must not import JAX.
from kdface.training._config import TrainConfig, option_fields

F = flags.FLAGS

# Flags that are not run options (where the data lives, how processes find each other).
flags.DEFINE_string("data_dir", "data", "tfds data directory of built datasets.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 "
                    "(SLURM/OpenMPI/TPU are auto-detected without it).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")
flags.DEFINE_string("plan_topology", None, "Compile-only: compile the step this command trains "
                    "for a TPU topology (e.g. v5e:8x8) or GPU slice (h100:8, h100:2x8, "
                    "a100:8) without data or a device and print its plan (HBM, fits, estimated "
                    "img/s); needs libtpu (jax[tpu]) or the CUDA plugin "
                    "(.ci/install-gpu-compiler).")
flags.DEFINE_integer("plan_classes", None, "Compile-only: the class count (default: the built "
                     "--train_data's).")
flags.DEFINE_integer("plan_examples", None, "Compile-only: the training set's size, for the "
                     "epoch time (default: the built --train_data's).")
flags.DEFINE_bool("plan_search_batch", False, "Compile-only: also search the largest per-chip "
                  "batch that fits (more compiles).")
flags.DEFINE_bool("verbose", False, "Show tracebacks of errors and the INFO logging of orbax, "
                  "absl and tfds.")

# Dict-valued flags (k=v,k=v): absl keeps only the last occurrence, so a command-line
# --student_options would silently drop a flagfile's keys; merge_option_flags merges them.
DICT_FLAGS = ("student_options", "teacher_options")


def _optional(hint) -> tuple[Any, bool]:
    """``(type, allows None)`` of a field annotation such as ``int | None``."""
    args = typing.get_args(hint)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _flag_default(value) -> Any:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v!r}" for k, v in value.items())
    return value


def define_config_flags(flag_values: flags.FlagValues = F) -> None:
    """One flag per ``TrainConfig`` field, with the field's default, help text and choices."""
    for field, hint in option_fields():
        kind, _ = _optional(hint)
        default = (None if field.default is dataclasses.MISSING and field.default_factory is
                   dataclasses.MISSING else field.default_factory()
                   if field.default is dataclasses.MISSING else field.default)
        help_text = field.metadata.get("help") or field.name
        choices = field.metadata.get("choices")
        origin = typing.get_origin(kind) or kind
        if choices is not None:
            flags.DEFINE_enum(field.name, default, list(choices), help_text,
                              flag_values=flag_values)
        elif kind is bool:
            flags.DEFINE_bool(field.name, default, help_text, flag_values=flag_values)
        elif kind is int:
            flags.DEFINE_integer(field.name, default, help_text, flag_values=flag_values)
        elif kind is float:
            flags.DEFINE_float(field.name, default, help_text, flag_values=flag_values)
        elif kind is str:
            flags.DEFINE_string(field.name, default, help_text, flag_values=flag_values)
        elif origin in (tuple, dict):
            flags.DEFINE_string(field.name, _flag_default(default), help_text,
                                flag_values=flag_values)
        else:
            raise TypeError(f"TrainConfig.{field.name}: no flag type for {hint!r}")


def _field_value(name: str, hint, text: Any) -> Any:
    """A flag's value as the field's type (comma lists and k=v options are parsed here)."""
    kind, _ = _optional(hint)
    origin = typing.get_origin(kind) or kind
    if text is None or origin not in (tuple, dict):
        return text
    if origin is dict:
        return parse_key_values(text, name)
    args = typing.get_args(kind)
    item = args[0] if args else str
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        value = tuple(item(p) for p in parts)
    except ValueError:
        raise app.UsageError(f"--{name}={text}: expected a comma list of "
                             f"{item.__name__} values") from None
    if len(args) > 1 and args[-1] is not Ellipsis and len(value) != len(args):
        raise app.UsageError(f"--{name}={text}: expected {len(args)} comma-separated values")
    return value


define_config_flags()


def _occurrences(argv: list[str], flag_values: flags.FlagValues
                 ) -> list[tuple[str, str]]:
    """``argv`` with every ``--flagfile`` expanded, as ``(argument, where it came from)``."""
    out = []
    for arg in argv:
        if arg.startswith("--flagfile=") or arg.startswith("-flagfile="):
            where = arg.split("=", 1)[1]
            for inner in flag_values.read_flags_from_files([arg], force_gnu=False):
                out.append((inner, where))
        else:
            out.append((arg, "the command line"))
    return out


def merge_option_flags(argv: list[str], flag_values: flags.FlagValues = F
                       ) -> tuple[list[str], list[str]]:
    """``(argv, notes)``: ``argv`` (flagfiles expanded) with every occurrence of a dict flag
    (``--student_options`` ...) merged per key into one, in order; ``notes`` has one line per
    merged flag saying which keys came from where. A ``--NAME=`` with no value clears the keys
    before it (e.g. the ResNet-50 teacher from a flagfile that sets a width divisor)."""
    args = _occurrences(list(argv), flag_values)
    merged: dict[str, dict[str, tuple[Any, str]]] = {}
    count: dict[str, int] = {}
    rest = []
    i = 0
    while i < len(args):
        arg, where = args[i]
        name = next((n for n in DICT_FLAGS if arg.lstrip("-").split("=", 1)[0] == n
                     and arg.startswith("-")), None)
        if name is None:
            rest.append(arg)
            i += 1
            continue
        if "=" in arg:
            text = arg.split("=", 1)[1]
        elif i + 1 < len(args):  # --student_options VALUE
            i += 1
            text = args[i][0]
        else:
            raise app.UsageError(f"--{name} needs a value (k=v,k=v)")
        try:
            values = parse_key_values(text, name)
        except UsageError as e:
            raise app.UsageError(str(e)) from None
        keys = merged.setdefault(name, {})
        count[name] = count.get(name, 0) + 1
        if not values:
            keys.clear()
        keys.update({k: (v, where) for k, v in values.items()})
        i += 1
    notes = []
    for name, keys in merged.items():
        text = ",".join(f"{k}={v!r}" for k, (v, _) in keys.items())
        rest.append(f"--{name}={text}")
        sources = {w for _, w in keys.values()}
        if count[name] > 1 and len(sources) > 1:
            origin = ", ".join(f"{k} from {w}" for k, (_, w) in keys.items())
            notes.append(f"--{name}={text} (merged: {origin})")
    return rest, notes


def config_from_flags(flag_values: flags.FlagValues = F) -> TrainConfig:
    """The ``TrainConfig`` the parsed flags describe (every field comes from its flag)."""
    if not flag_values.workdir:
        raise app.UsageError("--workdir is required")
    if not flag_values.train_data:
        raise app.UsageError("--train_data is required")
    values = {field.name: _field_value(field.name, hint, flag_values[field.name].value)
              for field, hint in option_fields()}
    try:
        return TrainConfig(**values)
    except ValueError as e:
        raise app.UsageError(str(e)) from None


def parse_command_line(argv: list[str], flag_values: flags.FlagValues = F) -> list[str]:
    """Parses ``argv`` into ``flag_values`` (dict flags merged, see ``merge_option_flags``),
    printing the merge notes on stderr; returns the arguments that are not flags."""
    argv, notes = merge_option_flags(argv, flag_values)
    rest = flag_values(argv)
    for note in notes:
        print(f"kdface.train: {note}", file=sys.stderr)
    if len(rest) > 1:
        raise app.UsageError(f"unexpected arguments {rest[1:]} (flags are --name=value)")
    return rest


def train(data_dir: str) -> int:
    """Trains the run the parsed flags describe (multi-host aware); prints its summary."""
    import jax
    if F.coordinator_address or os.environ.get("SLURM_JOB_ID") or \
            os.environ.get("OMPI_COMM_WORLD_SIZE"):
        jax.distributed.initialize(coordinator_address=F.coordinator_address,
                                   num_processes=F.num_processes, process_id=F.process_id)
    from kdface.training import run
    config = config_from_flags()
    summary = run(config, data_dir=data_dir)
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=1, default=str))
    return 0


def plan(data_dir: str) -> int:
    """``--plan_topology``: the compile-only plan of the parsed flags' run; prints its table."""
    import jax
    jax.config.update("jax_platforms", "cpu")  # compile for the topology, run nothing locally
    # Compiling holds no TPU: let several plans (or tests) load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # where `make test` installs libtpu and the CUDA compiler plugin (GPU targets)
    for site in (os.path.join(sys.prefix, "tpu-site"), os.path.join(sys.prefix, "gpu-site")):
        if os.path.isdir(site) and site not in sys.path:
            sys.path.append(site)
    config = config_from_flags()
    classes, examples = F.plan_classes, F.plan_examples
    if classes is None or examples is None:
        from kdface.data import load_dataset_metadata
        name = os.path.splitext(os.path.basename(config.train_data))[0]
        try:
            meta = load_dataset_metadata(data_dir, "kdface_training", config.train_data)
        except Exception:  # not built here: the flags must say it
            meta = None
        if meta is None and classes is None:
            raise UsageError(f"--plan_topology: --train_data {config.train_data} is not built "
                             f"in --data_dir {data_dir} ({name}); give --plan_classes (and "
                             f"--plan_examples for the epoch time)")
        if meta is not None:
            classes = int(meta["num_classes"]) if classes is None else classes
            examples = int(meta.get("num_examples") or 0) or examples
    from kdface.training._compile import plan_topology
    fields, table = plan_topology(config, F.plan_topology, num_classes=classes,
                                  num_examples=examples, search=F.plan_search_batch,
                                  measure_input=True, data_dir=data_dir)
    print(table)
    print(json.dumps(fields, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (``argv[0]`` is the program): 0 when trained (or already finished),
    2 for an unusable command line, 1 for inputs or faults met while running; errors are one
    ``kdface.train: error: ...`` line on stderr (tracebacks with ``--verbose``)."""
    argv = list(sys.argv if argv is None else argv)
    verbose = wants_verbose(argv)
    silence_logs(verbose)
    if any(a in ("--help", "-h", "--helpfull", "-?", "--helpshort") for a in argv[1:]):
        print(__doc__)
        print(F.get_help())
        return 0

    def body():
        F.unparse_flags()
        parse_command_line(argv)
        if F.plan_topology:
            return plan(F.data_dir)
        return train(F.data_dir)
    return run_main(body, prog="kdface.train", verbose=verbose)


if __name__ == "__main__":
    sys.exit(main())
