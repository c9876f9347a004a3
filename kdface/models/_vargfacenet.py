"""VarGFaceNet and the plain VarGNet embedding variant (Yan et al. 2019, Table 1 and Fig. 1).

Layout at a 112x112 input (``multiplier=1.25``, the paper's Table 1 widths 40/80/160/320):

=========  =====================================================  ===============
part       layers                                                 output (H,W,C)
=========  =====================================================  ===============
stem       3x3 conv, stride 1 (seed sec. 2.3.1 head setting)      112 x 112 x 40
stage 0    head block: normal block, stride 2, factor 1           56 x 56 x 40
stage 1    downsampling block + 2 normal blocks                   28 x 28 x 80
stage 2    downsampling block + 6 normal blocks                   14 x 14 x 160
stage 3    downsampling block + 3 normal blocks                   7 x 7 x 320
embed      1x1 conv 320->1024, 7x7 variable-group conv (S=8),     [B, 512]
           1x1 conv 1024->512, FC 512->512 + BN
=========  =====================================================  ===============

For a 112x96 input the stages are 56x48, 28x24, 14x12, 7x6 and the embedding's grouped conv has a
7x6 kernel: the kernel always equals the final spatial size, so it shrinks the map to 1x1.

Choices the paper leaves open, taken from the authors' released MXNet symbol
(github.com/zma-c-137/VarGFaceNet): the "separable" unit is a variable-group 3x3 conv with
``in_channels / 8`` groups and ``factor * in_channels`` outputs, BN, PReLU, then a 1x1 conv and BN
(PReLU unless it ends a block); the normal block expands with ``factor = 2``; SE uses reduction 4
and PReLU inside, and sits only in normal blocks (the head block is a normal block); the
downsampling block sums two separable branches; FC has no bias (BN follows); BN ``momentum 0.9``.

Measured at 112x112 (tests/test_models_mobile.py): 5.20 M parameters with the 512x512 FC (seed:
"5M", 20 MB as float32); 0.513 G multiply-adds in the convolutions and FC, i.e. 1.025 G FLOPs
against the paper's 1022 M (Table 4). The paper's FLOPs are 2 x multiply-adds: its teacher "r100,
24G" is IResNet-100, whose convolutions take 12.1 G multiply-adds at 112x112. The embedding
block's weights (1x1 320->1024, 7x7 grouped, 1x1 1024->512, FC) are 1,515,520 floats = 5.78 MiB,
exactly the paper's "5.78M" (sec. 2.3.2), which pins the block's layout.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdface.models._base import Backbone
from kdface.models._conv import conv_general_dilated
from kdface.models._layers import (ConvBN, SqueezeExcite, activation, batch_norm,
                                   check_input_size, conv_output_size, flatten)
from kdface.models._registry import register

# Seed Table 1: (normal blocks after the downsampling block) per stage 1..3; base widths before
# the 1.25 multiplier, as in the authors' symbol (filter_list = [32, 64, 128, 256]).
_STAGE_UNITS = (2, 6, 3)
_BASE_WIDTHS = (32, 64, 128, 256)


class VarGroupSeparable(nnx.Module):
    """Variable-group conv + pointwise conv (Yan et al. 2019 eqs. 1-2, Fig. 1).

    ``[B, H, W, c_in] -> [B, H/stride, W/stride, c_out]``: a 3x3 conv with ``c_in / group_size``
    groups (``group_size = S`` input channels per group, so a group sees S channels, eq. 2) and
    ``factor * c_in`` outputs, BN, activation; then a 1x1 conv to ``c_out`` and BN, followed by the
    activation only when ``act_out``.
    """

    def __init__(self, c_in: int, c_out: int, *, stride: int, factor: int, group_size: int,
                 act: str, act_out: bool, rngs: nnx.Rngs):
        if c_in % group_size:
            raise ValueError(f"channels {c_in} must be a multiple of group_size {group_size}")
        self.group = ConvBN(c_in, c_in * factor, 3, stride=stride, groups=c_in // group_size,
                            act=act, rngs=rngs)
        self.point = ConvBN(c_in * factor, c_out, 1, act=act if act_out else "none", rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.point(self.group(x))


class NormalBlock(nnx.Module):
    """VarGFaceNet normal block (Yan et al. 2019 Fig. 1a): two separable units, SE, residual, act.

    ``[B, H, W, c_in] -> [B, H/stride, W/stride, c_out]``. The shortcut is the identity when
    ``stride == 1`` and ``c_in == c_out``, else a separable unit without output activation (the
    head block, Fig. 1c, is this block with stride 2 and ``factor = 1``).
    """

    def __init__(self, c_in: int, c_out: int, *, stride: int = 1, factor: int = 2,
                 group_size: int = 8, act: str = "prelu", use_se: bool = True,
                 se_reduction: int = 4, rngs: nnx.Rngs):
        kw = dict(factor=factor, group_size=group_size, act=act, rngs=rngs)
        self.shortcut = (None if stride == 1 and c_in == c_out else
                         VarGroupSeparable(c_in, c_out, stride=stride, act_out=False, **kw))
        self.sep1 = VarGroupSeparable(c_in, c_out, stride=stride, act_out=True, **kw)
        self.sep2 = VarGroupSeparable(c_out, c_out, stride=1, act_out=False, **kw)
        self.se = SqueezeExcite(c_out, se_reduction, act=act, rngs=rngs) if use_se else None
        self.act = activation(act, c_out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        short = x if self.shortcut is None else self.shortcut(x)
        h = self.sep2(self.sep1(x))
        if self.se is not None:
            h = self.se(h)
        return self.act(h + short)


class DownsamplingBlock(nnx.Module):
    """VarGFaceNet downsampling block (Yan et al. 2019 Fig. 1b), stride 2.

    ``[B, H, W, c_in] -> [B, H/2, W/2, c_out]``: two parallel separable units are summed and
    activated, a third separable unit follows, and a separable shortcut is added before the final
    activation. No SE (as in the authors' symbol).
    """

    def __init__(self, c_in: int, c_out: int, *, factor: int = 2, group_size: int = 8,
                 act: str = "prelu", rngs: nnx.Rngs):
        kw = dict(factor=factor, group_size=group_size, act=act, rngs=rngs)
        self.shortcut = VarGroupSeparable(c_in, c_out, stride=2, act_out=False, **kw)
        self.branch1 = VarGroupSeparable(c_in, c_out, stride=2, act_out=False, **kw)
        self.branch2 = VarGroupSeparable(c_in, c_out, stride=2, act_out=False, **kw)
        self.merge_act = activation(act, c_out, rngs=rngs)
        self.sep2 = VarGroupSeparable(c_out, c_out, stride=1, act_out=False, **kw)
        self.act = activation(act, c_out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.merge_act(self.branch1(x) + self.branch2(x))
        return self.act(self.sep2(h) + self.shortcut(x))


class VarGFaceNet(Backbone):
    """VarGFaceNet (Yan et al. 2019 Table 1): ``[B, H, W, 3] -> [B, embedding_size]``.

    Stages at 112x112: 56x56x40, 28x28x80, 14x14x160, 7x7x320 (module docstring table).
    ``embedding='vargface'`` is the paper's embedding block (Fig. 1d); ``embedding='avgpool'`` is
    the plain VarGNet embedding the paper compares against in Table 4: the same 1x1 expansion to
    ``last_channels``, then global average pooling and the FC (see :func:`vargnet`).
    """

    def __init__(self, *, rngs: nnx.Rngs, embedding_size: int = 512,
                 input_size: tuple[int, int] = (112, 112), multiplier: float = 1.25,
                 group_size: int = 8, factor: int = 2, last_channels: int = 1024,
                 use_se: bool = True, act: str = "prelu", se_reduction: int = 4,
                 embedding: str = "vargface"):
        h, w = check_input_size(input_size)
        if embedding not in ("vargface", "avgpool"):
            raise ValueError(f"embedding must be 'vargface' or 'avgpool', got {embedding!r}")
        if not isinstance(embedding_size, int) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        if not multiplier > 0:
            raise ValueError(f"multiplier must be > 0, got {multiplier!r}")
        widths = [int(c * multiplier) for c in _BASE_WIDTHS]
        for c in widths + [last_channels]:
            if c % group_size:
                raise ValueError(f"multiplier={multiplier} gives {c} channels, not a multiple of "
                                 f"group_size={group_size}")
        self.embedding_size = embedding_size
        self.input_size = (h, w)
        self.embedding = embedding
        block = dict(group_size=group_size, act=act, rngs=rngs)

        # Seed sec. 2.3.1: stride-1 first conv keeps 112x112 (VarGNet used stride 2).
        self.conv1 = ConvBN(3, widths[0], 3, stride=1, act=act, rngs=rngs)
        stages = [nnx.Sequential(NormalBlock(widths[0], widths[0], stride=2, factor=1,
                                             use_se=use_se, se_reduction=se_reduction,
                                             **block))]
        for i, units in enumerate(_STAGE_UNITS):
            c_in, c_out = widths[i], widths[i + 1]
            layers = [DownsamplingBlock(c_in, c_out, factor=factor, **block)]
            layers += [NormalBlock(c_out, c_out, factor=factor, use_se=use_se,
                                   se_reduction=se_reduction, **block) for _ in range(units)]
            stages.append(nnx.Sequential(*layers))
        self.stages = nnx.List(stages)

        fh, fw = h, w
        for _ in range(4):
            fh, fw = conv_output_size(fh, 3, 2), conv_output_size(fw, 3, 2)
        self.final_hw = (fh, fw)
        self.expand = ConvBN(widths[3], last_channels, 1, act=act, rngs=rngs)
        if embedding == "vargface":
            # Seed sec. 2.3.2: variable-group conv whose kernel covers the whole final map.
            self.shrink = nnx.Conv(last_channels, last_channels, (fh, fw), padding="VALID",
                                   feature_group_count=last_channels // group_size,
                                   use_bias=False, rngs=rngs,
                               conv_general_dilated=conv_general_dilated)
            self.shrink_bn = batch_norm(last_channels, rngs=rngs)
            self.point = ConvBN(last_channels, last_channels // 2, 1, act=act, rngs=rngs)
            fc_in = last_channels // 2
        else:
            fc_in = last_channels
        self.fc = nnx.Linear(fc_in, embedding_size, use_bias=False, rngs=rngs)
        self.fc_bn = batch_norm(embedding_size, rngs=rngs)

    def stem(self, x: jax.Array) -> jax.Array:
        return self.conv1(x)

    def embed(self, h: jax.Array) -> jax.Array:
        if h.ndim != 4 or tuple(h.shape[1:3]) != self.final_hw:
            raise ValueError(f"stage-3 feature must be [B, {self.final_hw[0]}, "
                             f"{self.final_hw[1]}, C] for input_size={self.input_size}, got "
                             f"{tuple(h.shape)}")
        h = self.expand(h)
        if self.embedding == "vargface":
            h = self.point(self.shrink_bn(self.shrink(h)))
            h = flatten(h)
        else:
            h = jnp.mean(h, axis=(1, 2))
        return self.fc_bn(self.fc(h))


@register("vargfacenet")
def vargfacenet(*, rngs: nnx.Rngs, embedding_size: int = 512,
                input_size: tuple[int, int] = (112, 112), **kwargs) -> VarGFaceNet:
    """VarGFaceNet of Yan et al. 2019 (Table 1, Fig. 1); options as :class:`VarGFaceNet`."""
    return VarGFaceNet(rngs=rngs, embedding_size=embedding_size, input_size=input_size,
                       **kwargs)


@register("vargnet")
def vargnet(*, rngs: nnx.Rngs, embedding_size: int = 512,
            input_size: tuple[int, int] = (112, 112), **kwargs) -> VarGFaceNet:
    """The plain VarGNet student of Yan et al. 2019 Table 4: ``[B, H, W, 3] -> [B, 512]``.

    The paper builds it from VarGNet with VarGFaceNet's stride-1 head "for fair comparison" and
    keeps VarGNet's embedding, "only an average pooling between last conv and fc layer". Since the
    seed adds SE and PReLU to VarGNet's blocks to get VarGFaceNet (sec. 2.2), the plain blocks
    here have neither (``use_se=False``, ``act='relu'``; pass them to override). The last conv is
    the same 1x1 expansion to 1024 channels. Measured: 4.27 M parameters and 0.512 G
    multiply-adds = 1.023 G FLOPs against the paper's 1029 M (Table 4, FLOPs = 2 x multiply-adds
    as for VarGFaceNet); the paper gives no more detail of this variant.
    """
    kwargs.setdefault("use_se", False)
    kwargs.setdefault("act", "relu")
    return VarGFaceNet(rngs=rngs, embedding_size=embedding_size, input_size=input_size,
                       embedding="avgpool", **kwargs)
