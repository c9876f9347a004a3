"""Adapters that map student features into the teacher's feature space (Duong et al. 2019).

ShrinkTeaNet (Duong et al. 2019, Sec. 3.3 and eq. (6)) compares the student's stage ``i`` with the
teacher's, and passes the adapted student stage through the teacher's remaining blocks; the
teacher side is the identity and the student side ``G_i^s`` is "1x1 convolution followed by batch
normalization" to match the teacher's dimension. When the spatial sizes differ too (e.g. a
MobileFaceNet student at 28/14/7/4 against an IResNet teacher at 56/28/14/7), kdface resizes first:

* an integer down-sampling factor per axis -> average pooling with window = stride = factor
  (exact block averages, no interpolation);
* anything else (up-sampling, or a non-integer ratio) -> ``jax.image.resize(method='bilinear')``
  (half-pixel centres; anti-aliased when shrinking).

The resize comes before the 1x1 convolution (both are linear and commute; the BN comes last).
:class:`LinearAdapter` maps embeddings of different sizes (e.g. a 128-d student, 512-d teacher).
"""
from __future__ import annotations

import jax
from flax import nnx

from kdface.models._base import NUM_STAGES
from kdface.models._layers import batch_norm, check_input_size, conv


def _check_size(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def resize_features(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """``[B, H, W, C] -> [B, h, w, C]``: average pooling when ``H/h`` and ``W/w`` are integers,
    else bilinear ``jax.image.resize``; unchanged when the sizes are equal."""
    if x.ndim != 4:
        raise ValueError(f"expected a feature map [B, H, W, C], got shape {tuple(x.shape)}")
    h, w = check_input_size(out_hw)
    H, W = x.shape[1], x.shape[2]
    if (H, W) == (h, w):
        return x
    if H % h == 0 and W % w == 0:
        fh, fw = H // h, W // w
        return x.reshape(x.shape[0], h, fh, w, fw, x.shape[3]).mean(axis=(2, 4))
    return jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), method="bilinear")


class ConvAdapter(nnx.Module):
    """Student stage -> teacher stage: ``[B, H, W, in] -> [B, h, w, out]`` (resize, 1x1 conv, BN).

    Args:
      in_channels: student stage channels.
      out_channels: teacher stage channels.
      out_hw: teacher stage ``(h, w)``; ``None`` keeps the student's spatial size.
    """

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs,
                 out_hw: tuple[int, int] | None = None):
        _check_size("in_channels", in_channels)
        _check_size("out_channels", out_channels)
        self.in_channels = in_channels
        self.out_hw = None if out_hw is None else check_input_size(out_hw)
        self.conv = conv(in_channels, out_channels, 1, rngs=rngs)
        self.bn = batch_norm(out_channels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"ConvAdapter expects [B, H, W, {self.in_channels}], got "
                             f"{tuple(x.shape)}")
        if self.out_hw is not None:
            x = resize_features(x, self.out_hw)
        return self.bn(self.conv(x))


class LinearAdapter(nnx.Module):
    """Embedding adapter ``[B, in_dim] -> [B, out_dim]``: ``x W (+ b)``.

    No bias by default, so the adapter is a pure linear map of directions (what angular and
    normalized-L2 distillation losses compare).
    """

    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs, use_bias: bool = False):
        _check_size("in_dim", in_dim)
        _check_size("out_dim", out_dim)
        self.in_dim = in_dim
        self.linear = nnx.Linear(in_dim, out_dim, use_bias=use_bias, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"LinearAdapter expects [B, {self.in_dim}], got {tuple(x.shape)}")
        return self.linear(x)


def stage_adapters(student, teacher, input_hw: tuple[int, int] = (112, 112), *,
                   rngs: nnx.Rngs, teacher_input_hw: tuple[int, int] | None = None) -> nnx.List:
    """The four :class:`ConvAdapter` s mapping ``student`` stage ``i`` to ``teacher`` stage ``i``.

    Shapes come from ``stage_shapes`` (abstract evaluation, nothing runs). ``teacher_input_hw``
    defaults to ``input_hw`` (Wang et al. 2019 feeds both networks the same size, the student's
    view being degraded and resized back). Returns an ``nnx.List`` indexable by stage.
    """
    s_shapes = student.stage_shapes(check_input_size(input_hw))
    t_shapes = teacher.stage_shapes(check_input_size(teacher_input_hw or input_hw))
    if len(s_shapes) != NUM_STAGES or len(t_shapes) != NUM_STAGES:
        raise ValueError("both networks must expose four stages")
    return nnx.List([ConvAdapter(sc, tc, out_hw=None if (sh, sw) == (th, tw) else (th, tw),
                                 rngs=rngs)
                     for (sh, sw, sc), (th, tw, tc) in zip(s_shapes, t_shapes)])


__all__ = ["ConvAdapter", "LinearAdapter", "resize_features", "stage_adapters"]
