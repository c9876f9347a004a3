"""SphereFace-style residual networks: sphereface20/36/64 and the thin sphereface36_thin.

Wang et al. 2019 Tables 1-2 (the layout of the SphereFace paper, Liu et al. 2017, Table 2). Each of
the four stages ``Conv{k}.x`` is one 3x3 stride-2 convolution (with bias) + PReLU followed by
``n_k`` residual units ``x + PReLU(Conv3x3(PReLU(Conv3x3(x))))`` (no bias, identity shortcut, no
activation after the addition); after the last stage a fully connected layer gives the 512-d
embedding. For a 112x112 input the stage features are 56x56, 28x28, 14x14, 7x7 (56x48 ... 7x6 at
the 112x96 input Wang et al. 2019 uses: pass ``input_size=(112, 96)``); the FC input size is
``C4 * H/16 * W/16`` computed from ``input_size``.

==================  ===================  ============  ================================
name                channels             units         source
==================  ===================  ============  ================================
sphereface20        64/128/256/512       1/2/4/1       SphereFace paper
sphereface36        64/128/256/512       2/4/8/2       SphereFace paper
sphereface64        64/128/256/512       3/8/16/3      Wang et al. 2019 Table 1 (teacher)
sphereface36_thin   18/36/72/144         2/4/8/2       Wang et al. 2019 Table 2 (student)
==================  ===================  ============  ================================

Choices the papers leave open, following SphereFace's public Caffe prototxt: there is no
BatchNorm (``batch_norm=True`` adds Conv -> BN -> PReLU everywhere, an option for training from
scratch at large learning rates; the stem is then an identity either way); stride-2 convolutions
and the FC use Xavier-uniform init, convolutions inside residual units use N(0, 0.01) so that
every unit starts close to the identity; PReLU slopes start at 0.25.
"""
from __future__ import annotations

import jax
from flax import nnx

from kdface.models._base import NUM_STAGES, Backbone
from kdface.models._layers import (PReLU, batch_norm, check_input_size, conv, conv_output_size,
                                   flatten)
from kdface.models._registry import register

_XAVIER = jax.nn.initializers.xavier_uniform()
_UNIT_INIT = jax.nn.initializers.normal(0.01)


class _ConvAct(nnx.Module):
    """3x3 conv (+ optional BN) + PReLU: ``[B, H, W, in] -> [B, H/stride, W/stride, out]``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, use_bias: bool,
                 bn: bool, kernel_init, rngs: nnx.Rngs):
        self.conv = conv(in_channels, out_channels, 3, stride=stride, use_bias=use_bias and not bn,
                         kernel_init=kernel_init, rngs=rngs)
        self.bn = batch_norm(out_channels, rngs=rngs) if bn else None
        self.prelu = PReLU(out_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv(x)
        if self.bn is not None:
            h = self.bn(h)
        return self.prelu(h)


class SphereUnit(nnx.Module):
    """Residual unit ``[B, H, W, C] -> [B, H, W, C]``: ``x + PReLU(Conv(PReLU(Conv(x))))``."""

    def __init__(self, channels: int, *, bn: bool, rngs: nnx.Rngs):
        self.a = _ConvAct(channels, channels, 1, use_bias=False, bn=bn, kernel_init=_UNIT_INIT,
                          rngs=rngs)
        self.b = _ConvAct(channels, channels, 1, use_bias=False, bn=bn, kernel_init=_UNIT_INIT,
                          rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.b(self.a(x))


class SphereNet(Backbone):
    """SphereFace-style residual network (module docstring): ``[B, H, W, 3] -> [B, E]``.

    Args:
      channels: output channels of the four stages.
      units: residual units per stage.
      embedding_size: FC output size (512 in Wang et al. 2019).
      input_size: ``(H, W)`` the network is built for; fixes the FC input size.
      batch_norm: adds BN after every convolution (not in the paper).
    """

    def __init__(self, channels: tuple[int, ...], units: tuple[int, ...], *, rngs: nnx.Rngs,
                 embedding_size: int = 512, input_size: tuple[int, int] = (112, 112),
                 batch_norm: bool = False):
        if len(channels) != NUM_STAGES or len(units) != NUM_STAGES:
            raise ValueError(f"channels and units need {NUM_STAGES} entries, got "
                             f"{channels!r}, {units!r}")
        if not all(isinstance(u, int) and u >= 0 for u in units):
            raise ValueError(f"units must be non-negative ints, got {units!r}")
        if not isinstance(embedding_size, int) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        h, w = check_input_size(input_size)
        self.embedding_size = embedding_size
        self.input_size = (h, w)
        self.channels = tuple(channels)
        stages = []
        in_channels = 3
        for c, n in zip(channels, units):
            down = _ConvAct(in_channels, c, 2, use_bias=True, bn=batch_norm, kernel_init=_XAVIER,
                            rngs=rngs)
            stages.append(nnx.List([down] + [SphereUnit(c, bn=batch_norm, rngs=rngs)
                                             for _ in range(n)]))
            in_channels = c
            h, w = conv_output_size(h, 3, 2), conv_output_size(w, 3, 2)
        self.stages = nnx.List(stages)
        self.final_hw = (h, w)
        self.fc = nnx.Linear(in_channels * h * w, embedding_size, kernel_init=_XAVIER, rngs=rngs)

    def stem(self, x: jax.Array) -> jax.Array:
        return x  # Conv1.x's stride-2 convolution belongs to stage 0 (Wang et al. 2019 Table 1)

    def embed(self, h: jax.Array) -> jax.Array:
        self.check_final_map(h)
        return self.fc(flatten(h))


_WIDE = (64, 128, 256, 512)
_THIN = (18, 36, 72, 144)


@register("sphereface20")
def sphereface20(*, rngs: nnx.Rngs, **kwargs) -> SphereNet:
    """SphereFace-20: channels 64/128/256/512, units 1/2/4/1; kwargs as :class:`SphereNet`."""
    return SphereNet(_WIDE, (1, 2, 4, 1), rngs=rngs, **kwargs)


@register("sphereface36")
def sphereface36(*, rngs: nnx.Rngs, **kwargs) -> SphereNet:
    """SphereFace-36: channels 64/128/256/512, units 2/4/8/2; kwargs as :class:`SphereNet`."""
    return SphereNet(_WIDE, (2, 4, 8, 2), rngs=rngs, **kwargs)


@register("sphereface64")
def sphereface64(*, rngs: nnx.Rngs, **kwargs) -> SphereNet:
    """Wang et al. 2019 Table 1 teacher: channels 64/128/256/512, units 3/8/16/3, FC 512."""
    return SphereNet(_WIDE, (3, 8, 16, 3), rngs=rngs, **kwargs)


@register("sphereface36_thin")
def sphereface36_thin(*, rngs: nnx.Rngs, **kwargs) -> SphereNet:
    """Wang et al. 2019 Table 2 student: channels 18/36/72/144, units 2/4/8/2, FC 512."""
    return SphereNet(_THIN, (2, 4, 8, 2), rngs=rngs, **kwargs)


@register("sphereface_custom")
def sphereface_custom(*, rngs: nnx.Rngs, channels: tuple[int, ...] = _THIN,
                      units: tuple[int, ...] = (1, 1, 1, 1), **kwargs) -> SphereNet:
    """A SphereFace-style net of any stage widths and depths (e.g. the demo's small teacher and
    student, which keep the Wang et al. 2019 layout at a width that trains on a CPU in minutes)."""
    return SphereNet(tuple(channels), tuple(units), rngs=rngs, **kwargs)
