"""What the command-line modules share: usage errors, ``key=value`` option lists, flag parsing.

Kept free of JAX and absl at import time: the commands import it before deciding whether they
only print ``--help``.
"""
from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["UsageError", "parse_command_line", "parse_key_values", "report_usage_error"]

HELP_FLAGS = ("--help", "-h", "--helpfull", "-?")


class UsageError(ValueError):
    """A command-line value that cannot be used; the message says which and why."""


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
