"""The one progress bar of kdface (training, dataset building, teacher caching, evaluation).

A tqdm bar on stderr, shown only where a person is watching: on the main process of a
multi-process JAX run, when the caller enables it, and when stderr is a terminal. Redirected
output (log files, CI) gets no carriage-return noise; ``KDFACE_PROGRESS=1`` shows the bars there
anyway, ``KDFACE_PROGRESS=0`` hides them everywhere.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable

import jax
from tqdm import tqdm

__all__ = ["progress"]


def progress(iterable: Iterable | None = None, *, total: float | None = None,
             desc: str | None = None, unit: str = "it", enabled: bool = True,
             initial: float = 0, leave: bool = True) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one: ``bar.update(n)``), disabled where unseen.

    total: the count the bar fills to (``len(iterable)`` when omitted and available); desc: the
    label in front; unit: what one step counts ("img", "step", "batch"). A disabled bar still
    iterates, counts (``bar.n``) and closes, so callers never branch on it.
    """
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                file=sys.stderr, dynamic_ncols=True, disable=not _shown(enabled))


def _shown(enabled: bool) -> bool:
    forced = os.environ.get("KDFACE_PROGRESS", "").strip()
    if not enabled or forced == "0":
        return False
    # Only ask for the process index once jax.distributed is up: jax.process_index() would
    # otherwise initialize the accelerator backend (and reserve its memory) in a data builder.
    if jax.distributed.is_initialized() and jax.process_index() != 0:
        return False
    return forced == "1" or sys.stderr.isatty()
