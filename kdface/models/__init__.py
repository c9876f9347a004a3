"""Flax NNX backbones, heads and adapters for face recognition distillation.

``create(name, *, rngs, **kwargs)`` builds any registered backbone by name; see ``names()``.
"""
from kdface.models._base import Backbone, NUM_STAGES
from kdface.models._registry import create, names, register

__all__ = ["Backbone", "NUM_STAGES", "create", "names", "register"]
