r"""`python -m kdface.train --flagfile=kdface/configs/<recipe>.flags`: every recipe, one trainer.

Examples (each flagfile in kdface/configs/ carries its paper's settings):

  python -m kdface.train --flagfile=kdface/configs/scratch_teacher.flags --workdir=runs/teacher
  python -m kdface.train --flagfile=kdface/configs/kd_im.flags --workdir=runs/kd_im \
      --teacher_checkpoint=runs/teacher

Rerunning the same command resumes from the latest checkpoint in --workdir. Every field of
``kdface.training.TrainConfig`` is a flag of the same name, generated from the field (its type,
default, help text and choices): the dataclass is the only place an option is declared.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import sys
import typing
from typing import Any

from absl import app, flags, logging

from kdface.training._config import TrainConfig, option_fields

F = flags.FLAGS

# Flags that are not run options (where the data lives, how processes find each other).
flags.DEFINE_string("data_dir", "data", "tfds data directory of built datasets.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 "
                    "(SLURM/OpenMPI/TPU are auto-detected without it).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")


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
        return parse_options(text)
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


def parse_options(text: str) -> dict:
    """``'a=1,b=(2,3),c=x'`` -> ``{'a': 1, 'b': (2, 3), 'c': 'x'}`` (Python literals)."""
    out, depth, current = {}, 0, ""
    parts = []
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    for part in parts:
        if "=" not in part:
            raise ValueError(f"option {part!r} is not key=value")
        key, value = part.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # keep orbax/tfds INFO chatter out of the progress bar
    import jax
    if F.coordinator_address or os.environ.get("SLURM_JOB_ID") or \
            os.environ.get("OMPI_COMM_WORLD_SIZE"):
        jax.distributed.initialize(coordinator_address=F.coordinator_address,
                                   num_processes=F.num_processes, process_id=F.process_id)
    from kdface.training._run import run
    config = config_from_flags()
    summary = run(config, data_dir=F.data_dir)
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    sys.exit(app.run(main))
