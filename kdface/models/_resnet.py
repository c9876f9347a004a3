"""Bottleneck ResNet-50 and its width-divided students ResNet-50/2, /4, /8 (Wang et al. 2017).

Wang et al. 2017 ("Teacher and Student"): the teacher is ResNet-50 (He et al. 2016); students
keep the depth and divide the number of convolution kernels in every layer by 2, 4 or 8
(``width_divisor``). Units are the bottleneck ``Conv1x1 -> BN -> ReLU -> Conv3x3(stride) -> BN ->
ReLU -> Conv1x1(x4) -> BN``, added to the shortcut (Conv1x1(stride) + BN when the shape changes),
then ReLU; stride sits on the 3x3 convolution (torchvision's "v1.5"). Stages have 3/4/6/3 units
of width 64/128/256/512 (divided), outputs 4x the width.

Choices for 112x112 face crops (the paper gives none; documented here):

* the paper puts "batch normalization right after the input data" instead of mean subtraction:
  the stem starts with a BN over the 3 input channels;
* the ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool, /4) is replaced by a 3x3
  stride-1 conv + BN + ReLU, and the first unit of *every* stage has stride 2, as insightface does
  for face ResNets, so the stage features at 112x112 are 56x56, 28x28, 14x14, 7x7 like IResNet's
  (width 256/512/1024/2048, divided);
* embedding: global average pool -> FC(embedding_size) -> BN without scale (the insightface
  features BN). Global pooling keeps the FC at ``2048/d x 512`` for any input size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdface.models._base import Backbone
from kdface.models._layers import batch_norm, check_input_size, conv
from kdface.models._registry import register

_WIDTHS = (64, 128, 256, 512)
_DEPTHS_50 = (3, 4, 6, 3)
_EXPANSION = 4
WIDTH_DIVISORS = (1, 2, 4, 8)


class Bottleneck(nnx.Module):
    """Bottleneck unit ``[B, H, W, in] -> [B, H/stride, W/stride, 4*width]``."""

    def __init__(self, in_channels: int, width: int, stride: int, *, rngs: nnx.Rngs):
        out = width * _EXPANSION
        self.conv1 = conv(in_channels, width, 1, rngs=rngs)
        self.bn1 = batch_norm(width, rngs=rngs)
        self.conv2 = conv(width, width, 3, stride=stride, rngs=rngs)
        self.bn2 = batch_norm(width, rngs=rngs)
        self.conv3 = conv(width, out, 1, rngs=rngs)
        self.bn3 = batch_norm(out, rngs=rngs)
        if stride != 1 or in_channels != out:
            self.down_conv = conv(in_channels, out, 1, stride=stride, rngs=rngs)
            self.down_bn = batch_norm(out, rngs=rngs)
        else:
            self.down_conv = self.down_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.bn1(self.conv1(x)))
        h = jax.nn.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        shortcut = x if self.down_conv is None else self.down_bn(self.down_conv(x))
        return jax.nn.relu(h + shortcut)


class ResNet50(Backbone):
    """ResNet-50 (or /2, /4, /8) face backbone (module docstring): ``[B, H, W, 3] -> [B, E]``.

    Args:
      width_divisor: 1, 2, 4 or 8 — every layer's channel count is divided by it
        (Wang et al. 2017: ResNet-50/2, /4, /8).
      embedding_size: embedding size (512).
      input_size: accepted for a uniform interface; the network works for any input size.
    """

    def __init__(self, *, rngs: nnx.Rngs, width_divisor: int = 1, embedding_size: int = 512,
                 input_size: tuple[int, int] = (112, 112)):
        if width_divisor not in WIDTH_DIVISORS:
            raise ValueError(f"width_divisor must be one of {WIDTH_DIVISORS}, got "
                             f"{width_divisor!r}")
        if not isinstance(embedding_size, int) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        self.input_size = check_input_size(input_size)
        self.embedding_size = embedding_size
        self.width_divisor = width_divisor
        stem_width = 64 // width_divisor
        self.input_bn = batch_norm(3, rngs=rngs)
        self.stem_conv = conv(3, stem_width, 3, rngs=rngs)
        self.stem_bn = batch_norm(stem_width, rngs=rngs)
        stages = []
        in_channels = stem_width
        for width, depth in zip(_WIDTHS, _DEPTHS_50):
            width //= width_divisor
            units = [Bottleneck(in_channels, width, 2, rngs=rngs)]
            in_channels = width * _EXPANSION
            units += [Bottleneck(in_channels, width, 1, rngs=rngs) for _ in range(depth - 1)]
            stages.append(nnx.List(units))
        self.stages = nnx.List(stages)
        self.fc = nnx.Linear(in_channels, embedding_size, rngs=rngs)
        self.features = batch_norm(embedding_size, use_scale=False, rngs=rngs)

    def stem(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.stem_bn(self.stem_conv(self.input_bn(x))))

    def embed(self, h: jax.Array) -> jax.Array:
        return self.features(self.fc(jnp.mean(h, axis=(1, 2))))


@register("resnet50")
def resnet50(*, rngs: nnx.Rngs, **kwargs) -> ResNet50:
    """ResNet-50 face backbone; ``width_divisor=2/4/8`` gives Wang et al. 2017's students."""
    return ResNet50(rngs=rngs, **kwargs)
