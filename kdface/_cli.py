"""What every kdface command line shares: one ``error: ...`` line per failure, quiet logs.

``run_main(body, prog=..., verbose=...)`` calls ``body()`` and turns the errors a user can cause
or meet (a bad flag, a missing file, a checkpoint of another architecture, a full disk, a
diverged loss) into one line on stderr and an exit code: 2 for an unusable command line, 1 for
inputs or faults met while running. The traceback, and the INFO logging of orbax / absl / tfds
that would bury the message, are shown only with ``--verbose``. Also the shared parsing:
``key=value`` option lists and absl flag parsing with ``--help``.

Kept free of JAX and absl at import time: the commands import it before deciding whether they
only print ``--help``.
"""
from __future__ import annotations

import ast
import errno
import logging as py_logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["UsageError", "error_message", "parse_command_line", "parse_key_values",
           "report_usage_error", "run_main", "silence_logs", "wants_verbose"]

USAGE, RUNTIME = 2, 1
HELP_FLAGS = ("--help", "-h", "--helpfull", "-?")

# Third-party loggers that write INFO lines on every checkpoint read or dataset open.
_CHATTY_LOGGERS = ("absl", "orbax", "etils", "tensorflow_datasets", "jax", "grain")


class UsageError(ValueError):
    """The command line cannot be run as given (exit code 2); the message names the flag."""


def silence_logs(verbose: bool) -> None:
    """WARNING and above only (absl and the Python loggers of orbax, etils, tfds), unless
    ``verbose``."""
    from absl import logging as absl_logging
    level = py_logging.INFO if verbose else py_logging.WARNING
    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    for name in _CHATTY_LOGGERS:
        py_logging.getLogger(name).setLevel(level)
    absl_logger = py_logging.getLogger("absl")
    if not verbose and not any(isinstance(f, _OrbaxNotes) for f in absl_logger.filters):
        absl_logger.addFilter(_OrbaxNotes())


class _OrbaxNotes(py_logging.Filter):
    """Drops orbax's warnings below ERROR ("Given directory is read only", "Metadata file does
    not exist" on every params-only load): they describe orbax's own bookkeeping, not the run.
    orbax logs through absl, so a logger level cannot tell them from kdface's warnings."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.ERROR or "orbax" not in record.pathname


def wants_verbose(argv) -> bool:
    """Whether ``--verbose`` is on in ``argv`` (read before the flags are parsed, so that the
    log level is set before anything can log)."""
    return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1")
               for a in argv[1:])


def error_message(err: BaseException) -> tuple[str, int]:
    """``(one-line message, exit code)`` for an error a user can meet; re-raises the rest."""
    from absl import app, flags
    if isinstance(err, (UsageError, app.UsageError, flags.Error)):
        return str(err), USAGE
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"no space left on the device: {err.filename or err}", RUNTIME
    if isinstance(err, ImportError):
        return str(err), RUNTIME
    if isinstance(err, (ValueError, TypeError, OSError, KeyError, FloatingPointError)):
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        return text or type(err).__name__, RUNTIME
    raise err


def run_main(body: Callable[[], int | None], *, prog: str, verbose: bool) -> int:
    """Runs ``body`` and returns its exit code (0 if it returns None); errors become
    ``<prog>: error: <message>`` on stderr (with the traceback only when ``verbose``)."""
    try:
        return int(body() or 0)
    except (Exception, SystemExit) as err:  # noqa: BLE001 (sorted by error_message)
        if isinstance(err, SystemExit):
            raise
        try:
            message, code = error_message(err)
        except BaseException:
            raise err from None
        if verbose:
            traceback.print_exception(err, file=sys.stderr)
        lines = message.strip().splitlines() or [type(err).__name__]
        print(f"{prog}: error: {lines[0]}", file=sys.stderr)
        for line in lines[1:5]:  # a message's own short explanation, never a tree dump
            print(f"  {line}", file=sys.stderr)
        if code == USAGE:
            print(f"Run python -m {prog} --help for the flags.", file=sys.stderr)
        return code


def parse_key_values(text: str, flag: str) -> dict[str, Any]:
    """``'a=1,b=(2,3),c=x'`` -> ``{'a': 1, 'b': (2, 3), 'c': 'x'}``.

    Values are Python literals; a value that is not one is kept as a string. Commas inside
    brackets do not split. An entry without ``=`` raises :class:`UsageError` naming ``--flag``.
    """
    parts, depth, current = [], 0, ""
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
    out = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--{flag}: {part!r} is not key=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def parse_command_line(define_flags: Callable, argv: Sequence[str], doc: str):
    """The parsed absl ``FlagValues`` of ``argv``, or None after printing ``doc`` and the flags'
    help when ``argv`` asks for help. Raises absl's ``flags.Error`` or :class:`UsageError`."""
    from absl import flags  # the commands import this module before they know they need absl
    fv = define_flags(flags.FlagValues())
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(doc)
        print(fv.get_help())
        return None
    rest = fv(list(argv))
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments {rest[1:]} (flags are --name=value)")
    return fv


def report_usage_error(prog: str, err: Exception) -> int:
    """Prints a usage error and where the flags are documented; returns exit status 2."""
    print(f"{prog}: usage error: {err}\nRun python -m {prog} --help for the flags.",
          file=sys.stderr)
    return 2
