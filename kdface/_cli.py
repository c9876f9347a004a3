"""What every kdface command line shares: one ``error: ...`` line per failure, quiet logs.

``run_main(body, prog=..., verbose=...)`` calls ``body()`` and turns the errors a user can cause
or meet (a bad flag, a missing file, a checkpoint of another architecture, a full disk, a
diverged loss) into one line on stderr and an exit code: 2 for an unusable command line, 1 for
inputs or faults met while running. The traceback, and the INFO logging of orbax / absl / tfds
that would bury the message, are shown only with ``--verbose``.
"""
from __future__ import annotations

import errno
import logging as py_logging
import sys
import traceback
from collections.abc import Callable

USAGE, RUNTIME = 2, 1

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
