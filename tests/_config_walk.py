"""The walk of a run's configuration through kdface (issue 22): which modules ("rooms") receive a
``TrainConfig`` as an argument, in call order, while ``kdface.training.run`` trains.

``walk(fn)`` runs ``fn()`` under ``sys.setprofile`` and records, for every call of a kdface
function one of whose arguments is a ``TrainConfig`` or a plan holding one (``FitPlan``,
``RunPlan``), the function's module. Consecutive calls in
the same module are one stay; entering a module that the walk already left is a return.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

from kdface.training import TrainConfig
from kdface.training._plan import FitPlan, RunPlan


def _holds_config(value) -> bool:
    return isinstance(value, (TrainConfig, FitPlan, RunPlan))


def walk(fn: Callable[[], object]) -> list[tuple[str, str]]:
    """``[(module, function), ...]``: the configuration's entries into modules, in order."""
    calls: list[tuple[str, str]] = []

    def profile(frame, event, _arg):
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("kdface."):
            return
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
        if caller == module:
            return
        code = frame.f_code
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        if any(_holds_config(frame.f_locals.get(n)) for n in names if n != "self"):
            calls.append((module, code.co_name))

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def summary(calls: list[tuple[str, str]]) -> dict[str, object]:
    """``stays`` (entries, consecutive ones into the same module merged), ``rooms`` (distinct
    modules), ``returns`` (stays in a module the walk had entered before) and the sequence."""
    stays: list[str] = []
    for module, _ in calls:
        if not stays or stays[-1] != module:
            stays.append(module)
    seen: set[str] = set()
    returns = 0
    for module in stays:
        returns += module in seen
        seen.add(module)
    return {"stays": len(stays), "rooms": len(seen), "returns": returns, "sequence": stays}
