"""MobileNetV1 and MobileNetV2 for 112x112 faces (Duong et al. 2019's "MV1" / "MV2" students).

Duong et al. 2019 names the students and their sizes (Table 2: MV1 3.53 M, MV2 2.15 M parameters)
but not how they were adapted to faces. Our adaptation, one rule for both:

* The stem conv has stride 1 instead of 2, so a 112x112 face passes through the same feature
  sizes as a 224x224 ImageNet image (final map 7x7; insightface's face MobileNet does the same),
  and the four stages are exactly the networks' four stride-2 steps (56/28/14/7).
* The ImageNet classifier (average pool + FC 1000) is replaced by MobileFaceNet's global
  depthwise (GDConv) embedding: linear depthwise conv over the whole final map, BN, linear to D,
  BN (insightface's "GDC" output). The kernel follows the final size (7x6 at 112x96).
* MobileNetV2's 1x1 widening conv before pooling goes to 512 channels rather than 1280 (as
  MobileFaceNet's), since 1280 would put the network at 2.9 M parameters, 37% over the paper's.
* Activations are the originals: ReLU (V1), ReLU6 (V2).

Measured at D = 512 and 112x112: MV1 3.78 M parameters (paper 3.53 M, +7%: the paper does not
describe its head; a 1024 -> 512 linear alone is 0.52 M) and 568 M multiply-adds; MV2 2.27 M
parameters (paper 2.15 M, +5%) and 288 M multiply-adds (the ImageNet networks' 569 M / 300 M at
224x224, as the feature sizes are the same).
"""
from __future__ import annotations

import jax
from flax import nnx

from kdface.models._base import Backbone
from kdface.models._layers import check_input_size
from kdface.models._mobilefacenet import (ConvBNAct, GDCEmbedding, bottleneck_stage,
                                          bottleneck_stages_and_head, final_spatial)
from kdface.models._registry import register


class DepthwiseSeparable(nnx.Module):
    """MobileNetV1 unit: 3x3 depthwise conv (stride) -> BN -> act -> 1x1 conv -> BN -> act.

    ``[B, H, W, c_in] -> [B, H/stride, W/stride, c_out]``.
    """

    def __init__(self, c_in: int, c_out: int, *, stride: int = 1, act: str = "relu",
                 rngs: nnx.Rngs):
        self.depthwise = ConvBNAct(c_in, c_in, 3, stride=stride, groups=c_in, act=act,
                                   rngs=rngs)
        self.pointwise = ConvBNAct(c_in, c_out, 1, act=act, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.pointwise(self.depthwise(x))


def _check_multiplier(width_multiplier: float) -> None:
    if not isinstance(width_multiplier, (int, float)) or not width_multiplier > 0:
        raise ValueError(f"width_multiplier must be > 0, got {width_multiplier!r}")


# MobileNetV1 (Howard et al. 2017, Table 1) after the stem: (out channels, stride) per stage.
_V1_STAGES = (
    ((128, 2), (128, 1)),
    ((256, 2), (256, 1)),
    ((512, 2),) + ((512, 1),) * 5,
    ((1024, 2), (1024, 1)),
)


class MobileNetV1(Backbone):
    """MobileNetV1 for faces: ``[B, H, W, 3] -> [B, embedding_size]``.

    Stages at 112x112 (``width_multiplier=1``): 56x56x128, 28x28x256, 14x14x512, 7x7x1024. The
    stem (3x3 conv 32, stride 1, and the first separable unit to 64) runs at full resolution.
    Widths are ``int(c * width_multiplier)`` (Howard et al.'s alpha).
    """

    def __init__(self, *, rngs: nnx.Rngs, embedding_size: int = 512,
                 input_size: tuple[int, int] = (112, 112), width_multiplier: float = 1.0,
                 act: str = "relu"):
        hw = check_input_size(input_size)
        _check_multiplier(width_multiplier)
        self.embedding_size = embedding_size
        self.input_size = hw

        def width(c):
            return max(8, int(c * width_multiplier))

        self.conv1 = ConvBNAct(3, width(32), 3, stride=1, act=act, rngs=rngs)
        self.sep1 = DepthwiseSeparable(width(32), width(64), act=act, rngs=rngs)
        c = width(64)
        stages, strides = [], [1]
        for spec in _V1_STAGES:
            layers = []
            for out, s in spec:
                layers.append(DepthwiseSeparable(c, width(out), stride=s, act=act, rngs=rngs))
                c = width(out)
                strides.append(s)
            stages.append(nnx.Sequential(*layers))
        self.stages = nnx.List(stages)
        self.head = GDCEmbedding(c, final_spatial(hw, strides), embedding_size,
                                 last_channels=None, act=act, rngs=rngs)

    def stem(self, x: jax.Array) -> jax.Array:
        return self.sep1(self.conv1(x))


def _make_divisible(v: float, divisor: int = 8) -> int:
    """MobileNetV2's channel rounding: nearest multiple of 8, never below 90% of ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


# MobileNetV2 (Sandler et al. 2018, Table 2) bottleneck groups (t, c, n, s), by stage; the
# (1, 16, 1, 1) group belongs to the stem.
_V2_STAGES = (
    ((6, 24, 2, 2),),
    ((6, 32, 3, 2),),
    ((6, 64, 4, 2), (6, 96, 3, 1)),
    ((6, 160, 3, 2), (6, 320, 1, 1)),
)


class MobileNetV2(Backbone):
    """MobileNetV2 for faces: ``[B, H, W, 3] -> [B, embedding_size]``.

    Stages at 112x112 (``width_multiplier=1``): 56x56x24, 28x28x32, 14x14x96, 7x7x320. The stem
    (3x3 conv 32, stride 1, and the t=1 bottleneck to 16) runs at full resolution. Widths are
    rounded with MobileNetV2's ``make_divisible(c * width_multiplier, 8)``; ``last_channels``
    (default 512, see the module docstring) is the 1x1 conv before the GDConv embedding.
    """

    def __init__(self, *, rngs: nnx.Rngs, embedding_size: int = 512,
                 input_size: tuple[int, int] = (112, 112), width_multiplier: float = 1.0,
                 last_channels: int = 512, act: str = "relu6"):
        hw = check_input_size(input_size)
        _check_multiplier(width_multiplier)
        self.embedding_size = embedding_size
        self.input_size = hw

        def width(c):
            return _make_divisible(c * width_multiplier)

        self.conv1 = ConvBNAct(3, width(32), 3, stride=1, act=act, rngs=rngs)
        self.block1, c = bottleneck_stage(width(32), ((1, width(16), 1, 1),), act=act,
                                          rngs=rngs)
        specs = [tuple((t, width(ch), n, s) for t, ch, n, s in spec) for spec in _V2_STAGES]
        stages, self.head = bottleneck_stages_and_head(
            c, specs, hw, [1, 1], embedding_size, last_channels=last_channels, act=act,
            rngs=rngs)
        self.stages = nnx.List(stages)

    def stem(self, x: jax.Array) -> jax.Array:
        return self.block1(self.conv1(x))


@register("mobilenet_v1")
def mobilenet_v1(*, rngs: nnx.Rngs, embedding_size: int = 512,
                 input_size: tuple[int, int] = (112, 112), **kwargs) -> MobileNetV1:
    """MobileNetV1 face student (Duong et al. 2019 "MV1"); options as :class:`MobileNetV1`."""
    return MobileNetV1(rngs=rngs, embedding_size=embedding_size, input_size=input_size,
                       **kwargs)


@register("mobilenet_v2")
def mobilenet_v2(*, rngs: nnx.Rngs, embedding_size: int = 512,
                 input_size: tuple[int, int] = (112, 112), **kwargs) -> MobileNetV2:
    """MobileNetV2 face student (Duong et al. 2019 "MV2"); options as :class:`MobileNetV2`."""
    return MobileNetV2(rngs=rngs, embedding_size=embedding_size, input_size=input_size,
                       **kwargs)
