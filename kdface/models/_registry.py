"""Name -> constructor registry behind ``kdface.models.create``.

Backbone modules register themselves with ``@register('name')`` on a constructor that takes
``rngs`` and keyword options. ``create`` imports every backbone module lazily so that importing
``kdface.models`` stays cheap and a broken network module cannot break the others.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable

from flax import nnx

_REGISTRY: dict[str, Callable[..., nnx.Module]] = {}

# Modules that define backbones; each registers its names when imported.
_BACKBONE_MODULES = (
    "kdface.models._sphereface",
    "kdface.models._iresnet",
    "kdface.models._resnet90",
    "kdface.models._resnet",
    "kdface.models._vargfacenet",
    "kdface.models._mobilenet",
    "kdface.models._mobilefacenet",
    "kdface.models._mobilefacenet_y2",
)


def register(name: str):
    """Decorator: registers ``fn(*, rngs, **kwargs) -> Backbone`` under ``name``."""
    def wrap(fn):
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"backbone name {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn
    return wrap


def _load_all() -> None:
    for module in _BACKBONE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # a real import error inside an existing module
                raise


def names() -> list[str]:
    """All registered backbone names, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def create(name: str, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
    """Builds backbone ``name`` (e.g. ``'iresnet50'``, ``'mobilefacenet'``) with ``rngs``."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](rngs=rngs, **kwargs)
