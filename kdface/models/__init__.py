"""Flax NNX backbones, heads and adapters for face recognition distillation.

``create(name, *, rngs, **kwargs)`` builds any registered backbone by name; see ``names()``.
"""
from kdface.models._base import Backbone, NUM_STAGES
from kdface.models._registry import create, names, register
from kdface.models._iresnet import IRESNET_UNITS
from kdface.models._heads import (LandmarkHead, MarginHead, SoftmaxHead, padded_class_count,
                                  shard_margin_heads)
from kdface.models._adapters import ConvAdapter, LinearAdapter, resize_features, stage_adapters
from kdface.models._stats import count_macs, count_params, xla_flops

__all__ = ["Backbone", "NUM_STAGES", "create", "names", "register"]
__all__ += ["IRESNET_UNITS"]
__all__ += ["LandmarkHead", "MarginHead", "SoftmaxHead", "padded_class_count", "shard_margin_heads"]
__all__ += ["ConvAdapter", "LinearAdapter", "resize_features", "stage_adapters"]
__all__ += ["count_macs", "count_params", "xla_flops"]
