"""The platform a program is traced for, which is not always the host's.

kdface picks some formulations at trace time by platform (CPU-tuned convolutions in
``models/_conv.py``, row-blocked soft losses in ``losses/_logit.py``, RKD-A tiles in
``losses/_relational.py``). ``jax.default_backend()`` answers for the host: compiled from a CPU
host for a TPU mesh (``jax.experimental.topologies``) it would build the CPU formulations into
the TPU program. Code that compiles for another target says so::

    with compiling_for(mesh):          # or compiling_for("tpu")
        jax.jit(make_step(...)).lower(*abstract_args).compile()

and every trace-time choice asks :func:`target_platform`. The target is not part of ``jax.jit``'s
trace cache key, so trace a fresh function (a new closure, as ``make_train_step`` returns) under
each target.
"""
from __future__ import annotations

import contextlib
import contextvars
import platform
from collections.abc import Iterator

import jax

__all__ = ["compiling_for", "cpu_model", "target_platform"]

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("kdface_target_platform",
                                                                     default=None)
PLATFORMS = ("cpu", "gpu", "tpu")


def target_platform() -> str:
    """``'cpu'``, ``'gpu'`` or ``'tpu'``: the ``compiling_for`` target, else the host's backend."""
    target = _TARGET.get()
    if target is not None:
        return target
    backend = jax.default_backend()
    return "gpu" if backend in ("cuda", "rocm") else backend


@contextlib.contextmanager
def compiling_for(target) -> Iterator[str]:
    """Traces inside the block choose formulations for ``target``: a platform name or a
    ``jax.sharding.Mesh`` (its devices' platform, e.g. a TPU topology's)."""
    if isinstance(target, jax.sharding.Mesh):
        platforms = {d.platform for d in target.devices.flat}
        if len(platforms) != 1:
            raise ValueError(f"a mesh over one platform, got {sorted(platforms)}")
        target = platforms.pop()
    target = {"cuda": "gpu", "rocm": "gpu"}.get(target, target)
    if target not in PLATFORMS:
        raise ValueError(f"target platform must be one of {PLATFORMS} or a Mesh, got {target!r}")
    token = _TARGET.set(target)
    try:
        yield target
    finally:
        _TARGET.reset(token)


def cpu_model() -> str:
    """This host's CPU, as /proc/cpuinfo names it (else what ``platform`` knows), for the
    machine line of a measurement."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
