"""MobileFaceNet and MobileFaceNet-R (Duong et al. 2019's students), plus the mobile blocks.

MobileFaceNet (Chen et al. 2018, Duong et al. 2019 ref. [34]) at a 112x112 input:

=========  ==================================================  ===============
part       layers (t = expansion, c = out channels, n, s)      output (H,W,C)
=========  ==================================================  ===============
stem       3x3 conv 64, stride 2                                56 x 56 x 64
stage 0    3x3 depthwise conv                                   56 x 56 x 64
stage 1    bottleneck t=2 c=64 n=5 s=2                          28 x 28 x 64
stage 2    bottleneck t=4 c=128 n=1 s=2; t=2 c=128 n=6 s=1      14 x 14 x 128
stage 3    bottleneck t=4 c=128 n=1 s=2; t=2 c=128 n=2 s=1      7 x 7 x 128
embed      1x1 conv 512; linear 7x7 depthwise conv (GDConv);    [B, D]
           linear 512 -> D + BN
=========  ==================================================  ===============

PReLU everywhere except the linear layers (as in Chen et al.); BN after every conv and after the
final linear layer (insightface's "GDC" output, with BN scale fixed to 1). The GDConv kernel equals
the final spatial size (7x7 at 112x112, 7x6 at 112x96).

Embedding size: Chen et al. use D = 128 (0.99 M parameters, 221 M multiply-adds; we measure
1.00 M and 221.0 M). Duong et al. 2019 reports 1.2 M parameters for its MobileFaceNet student
(Table 2), which is exactly what D = 512 gives (1.20 M measured), so kdface's default of 512
agrees with the paper that uses it.

MobileFaceNet-R (Duong et al. 2019 sec. 4.2: "similar to MobileFacenet except the feature size of
each resnet-block is equal to the size of its corresponding features in the teacher network") is
specified by the paper only by that sentence and its size, 3.73 M parameters. Our reading: the
stages keep MobileFaceNet's spatial sizes (already 56/28/14/7, as the ResNet teacher) and take the
teacher's widths, 64/128/256/512 by default. MobileFaceNet widens 128 -> 512 channels with a 1x1
conv after its 7x7 stage; MFN-R's 7x7 stage already has 512 channels, so that conv is dropped and
the stage's three bottlenecks use expansion t = 1, keeping the 1x1 expansion conv every
MobileFaceNet block has (with MobileFaceNet's t = 2 and 4 at 512 channels the 7x7 stage alone
would exceed 3 M parameters). Stages 1-2 keep MobileFaceNet's expansions and depths. This gives
3.69 M parameters at D = 512, 1% under the paper's 3.73 M, and 723 M multiply-adds at 112x112.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kdface.models._base import Backbone
from kdface.models._conv import conv_general_dilated
from kdface.models._layers import (activation, batch_norm, check_input_size, conv,
                                   conv_output_size, flatten)
from kdface.models._registry import register

_ACTS = ("prelu", "relu", "relu6", "none")


def _relu6(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0.0, 6.0)


def mobile_activation(kind: str, channels: int, *, rngs: nnx.Rngs):
    """``'prelu'`` / ``'relu'`` / ``'none'`` from ``_layers.activation``, plus MobileNetV2's
    ``'relu6'`` (``min(max(x, 0), 6)``)."""
    if kind not in _ACTS:
        raise ValueError(f"activation must be one of {_ACTS}, got {kind!r}")
    if kind == "relu6":
        return _relu6
    return activation(kind, channels, rngs=rngs)


class ConvBNAct(nnx.Module):
    """Conv (pad ``k // 2``, no bias) -> BN -> activation: ``[B, H, W, in] -> [B, H', W', out]``.

    Like ``_layers.ConvBN`` but also accepts ``act='relu6'``.
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, *, stride: int = 1,
                 groups: int = 1, act: str = "prelu", rngs: nnx.Rngs):
        self.conv = conv(c_in, c_out, kernel_size, stride=stride, groups=groups, rngs=rngs)
        self.bn = batch_norm(c_out, rngs=rngs)
        self.act = mobile_activation(act, c_out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.act(self.bn(self.conv(x)))


class InvertedResidual(nnx.Module):
    """MobileNetV2 bottleneck (Sandler et al. 2018), also MobileFaceNet's block.

    ``[B, H, W, c_in] -> [B, H/stride, W/stride, c_out]``: 1x1 expansion to ``t * c_in`` (skipped
    when ``t == 1`` unless ``expand_at_1``: MobileNetV2 skips it, a MobileFaceNet block always has
    it) -> 3x3 depthwise conv with ``stride`` -> linear 1x1 projection (BN, no activation); the
    input is added when ``stride == 1`` and ``c_in == c_out``.
    """

    def __init__(self, c_in: int, c_out: int, *, expansion: int, stride: int,
                 act: str = "prelu", expand_at_1: bool = False, rngs: nnx.Rngs):
        if not isinstance(expansion, int) or expansion < 1:
            raise ValueError(f"expansion must be a positive int, got {expansion!r}")
        hidden = c_in * expansion
        self.expand = (None if expansion == 1 and not expand_at_1 else
                       ConvBNAct(c_in, hidden, 1, act=act, rngs=rngs))
        self.depthwise = ConvBNAct(hidden, hidden, 3, stride=stride, groups=hidden, act=act,
                                   rngs=rngs)
        self.project = ConvBNAct(hidden, c_out, 1, act="none", rngs=rngs)
        self.residual = stride == 1 and c_in == c_out

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x if self.expand is None else self.expand(x)
        h = self.project(self.depthwise(h))
        return x + h if self.residual else h


def bottleneck_stage(c_in: int, spec: Sequence[tuple[int, int, int, int]], *, act: str,
                     expand_at_1: bool = False,
                     rngs: nnx.Rngs) -> tuple[nnx.Sequential, int]:
    """Bottleneck groups ``(t, c, n, s)`` (MobileNetV2 Table 2 notation: the first of the ``n``
    blocks has stride ``s``, the rest stride 1) -> ``(stage, out_channels)``."""
    layers = []
    for t, c, n, s in spec:
        for j in range(n):
            layers.append(InvertedResidual(c_in, c, expansion=t, stride=s if j == 0 else 1,
                                           act=act, expand_at_1=expand_at_1, rngs=rngs))
            c_in = c
    return nnx.Sequential(*layers), c_in


class GDCEmbedding(nnx.Module):
    """Global depthwise conv embedding (MobileFaceNet's "linear GDConv" + linear 1x1).

    ``[B, h, w, C] -> [B, D]``: optional 1x1 conv to ``last_channels`` (BN, activation), a linear
    depthwise conv whose kernel is the whole ``h x w`` map (BN), then a linear layer to D and BN
    with scale fixed to 1 (insightface's ``fix_gamma=True`` on the embedding BN).
    """

    def __init__(self, c_in: int, final_hw: tuple[int, int], embedding_size: int, *,
                 last_channels: int | None, act: str, rngs: nnx.Rngs):
        if not isinstance(embedding_size, int) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        self.final_hw = tuple(final_hw)
        self.widen = (None if last_channels is None else
                      ConvBNAct(c_in, last_channels, 1, act=act, rngs=rngs))
        c = c_in if last_channels is None else last_channels
        self.gdconv = nnx.Conv(c, c, self.final_hw, padding="VALID", feature_group_count=c,
                               use_bias=False, rngs=rngs,
                               conv_general_dilated=conv_general_dilated)
        self.gd_bn = batch_norm(c, rngs=rngs)
        self.linear = nnx.Linear(c, embedding_size, use_bias=False, rngs=rngs)
        self.bn = batch_norm(embedding_size, use_scale=False, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        if h.ndim != 4 or tuple(h.shape[1:3]) != self.final_hw:
            raise ValueError(f"last stage feature must be [B, {self.final_hw[0]}, "
                             f"{self.final_hw[1]}, C] (the GDConv kernel follows the input_size "
                             f"the network was built for), got {tuple(h.shape)}")
        if self.widen is not None:
            h = self.widen(h)
        h = flatten(self.gd_bn(self.gdconv(h)))
        return self.bn(self.linear(h))


def final_spatial(input_size: tuple[int, int], strides: Sequence[int]) -> tuple[int, int]:
    """Spatial size after 3x3 convs (pad 1) with the given strides."""
    h, w = input_size
    for s in strides:
        h, w = conv_output_size(h, 3, s), conv_output_size(w, 3, s)
    if h < 1 or w < 1:
        raise ValueError(f"input_size {input_size} is too small for this network")
    return h, w


def bottleneck_stages_and_head(c_in: int, stage_specs, input_size: tuple[int, int],
                               strides: Sequence[int], embedding_size: int, *,
                               last_channels: int | None, act: str, expand_at_1: bool = False,
                               rngs: nnx.Rngs) -> tuple[list[nnx.Sequential], GDCEmbedding]:
    """One :func:`bottleneck_stage` per entry of ``stage_specs``, then the
    :class:`GDCEmbedding` head at the resolution they leave (``strides``: those of the layers
    before the first stage). Built in that order, so parameters draw from ``rngs`` as the
    layers stand."""
    stages, c, strides = [], c_in, list(strides)
    for spec in stage_specs:
        stage, c = bottleneck_stage(c, spec, act=act, expand_at_1=expand_at_1, rngs=rngs)
        stages.append(stage)
        strides += [s for _, _, _, s in spec]
    head = GDCEmbedding(c, final_spatial(input_size, strides), embedding_size,
                        last_channels=last_channels, act=act, rngs=rngs)
    return stages, head


_MFN_STAGES = (
    ((2, 64, 5, 2),),
    ((4, 128, 1, 2), (2, 128, 6, 1)),
    ((4, 128, 1, 2), (2, 128, 2, 1)),
)


class MobileFaceNet(Backbone):
    """MobileFaceNet-style network: ``[B, H, W, 3] -> [B, embedding_size]``.

    ``stem_channels`` is the stride-2 stem conv and stage 0's depthwise conv width;
    ``stage_specs`` holds the bottleneck groups ``(t, c, n, s)`` of stages 1-3;
    ``last_channels`` is the 1x1 widening conv before the GDConv (``None``: no such conv).
    See the module docstring for the stage table (56/28/14/7 at 112x112).
    """

    def __init__(self, *, rngs: nnx.Rngs, embedding_size: int = 512,
                 input_size: tuple[int, int] = (112, 112), stem_channels: int = 64,
                 stage_specs=_MFN_STAGES, last_channels: int | None = 512, act: str = "prelu"):
        hw = check_input_size(input_size)
        if len(stage_specs) != 3:
            raise ValueError(f"stage_specs must hold 3 stages (1..3), got {len(stage_specs)}")
        self.embedding_size = embedding_size
        self.input_size = hw
        self.conv1 = ConvBNAct(3, stem_channels, 3, stride=2, act=act, rngs=rngs)
        depthwise = ConvBNAct(stem_channels, stem_channels, 3, groups=stem_channels, act=act,
                              rngs=rngs)
        stages, self.head = bottleneck_stages_and_head(
            stem_channels, stage_specs, hw, [2], embedding_size, last_channels=last_channels,
            act=act, expand_at_1=True, rngs=rngs)
        self.stages = nnx.List([depthwise, *stages])

    def stem(self, x: jax.Array) -> jax.Array:
        return self.conv1(x)


@register("mobilefacenet")
def mobilefacenet(*, rngs: nnx.Rngs, embedding_size: int = 512,
                  input_size: tuple[int, int] = (112, 112), **kwargs) -> MobileFaceNet:
    """MobileFaceNet (Chen et al. 2018; Duong et al. 2019 student "MFN", 1.2 M parameters).

    Stages at 112x112: 56x56x64, 28x28x64, 14x14x128, 7x7x128. ``embedding_size=128`` gives the
    original paper's network (0.99 M parameters).
    """
    return MobileFaceNet(rngs=rngs, embedding_size=embedding_size, input_size=input_size,
                         **kwargs)


@register("mobilefacenet_r")
def mobilefacenet_r(*, rngs: nnx.Rngs, embedding_size: int = 512,
                    input_size: tuple[int, int] = (112, 112),
                    stage_channels: tuple[int, int, int, int] = (64, 128, 256, 512),
                    act: str = "prelu") -> MobileFaceNet:
    """MobileFaceNet-R (Duong et al. 2019 sec. 4.2): stage features sized like the teacher's.

    Stages at 112x112: ``56x56xC0, 28x28xC1, 14x14xC2, 7x7xC3`` with ``stage_channels`` (default
    the IResNet teacher's 64/128/256/512), so ShrinkTeaNet's stage adapters (eq. 6) map equal
    shapes. Construction and parameter count (3.69 M vs the paper's 3.73 M): module docstring.
    """
    if (not isinstance(stage_channels, (tuple, list)) or len(stage_channels) != 4
            or not all(isinstance(c, int) and c > 0 for c in stage_channels)):
        raise ValueError(f"stage_channels must be 4 positive ints, got {stage_channels!r}")
    c0, c1, c2, c3 = stage_channels
    specs = (((2, c1, 5, 2),),
             ((4, c2, 1, 2), (2, c2, 6, 1)),
             ((1, c3, 3, 2),))
    return MobileFaceNet(rngs=rngs, embedding_size=embedding_size, input_size=input_size,
                         stem_channels=c0, stage_specs=specs, last_channels=None, act=act)
