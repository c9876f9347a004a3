"""Small building blocks shared by every kdface backbone (NHWC layout throughout).

Choices that hold for every network built from these blocks (each network may override):

* Convolutions pad symmetrically by ``k // 2`` on each side (Caffe / MXNet / PyTorch ``pad=k//2``),
  not Flax's ``'SAME'`` (which pads ``(0, 1)`` for stride 2 on even inputs), so that a weight
  converted from the reference implementations gives the same output, and ``112 -> 56 -> 28 -> 14
  -> 7`` with stride-2 3x3 convolutions.
* BatchNorm: ``momentum=0.9`` (Flax convention: running = 0.9 * running + 0.1 * batch, the same
  as PyTorch's ``momentum=0.1`` and MXNet's ``momentum=0.9``) and ``epsilon=1e-5`` (insightface's
  PyTorch ``arcface_torch`` value; its older MXNet models used 2e-5: the difference is far below
  the batch-variance scale of a trained network).
* Convolution weights: He (Kaiming) normal with fan-out, as torchvision ResNets; networks that
  follow a reference with another initializer pass ``kernel_init``.
* PReLU: one learnable slope per channel, initialised to 0.25 (PyTorch ``nn.PReLU`` and the MXNet
  ``LeakyReLU(act_type='prelu')`` used by SphereFace / insightface / VarGFaceNet).
* Convolutions go through ``kdface.models._conv.conv_general_dilated``: on the CPU, pointwise,
  depthwise and grouped ones train with formulations several times faster than XLA's.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from kdface.models._conv import conv_general_dilated

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

he_normal_fan_out = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")

_ACTIVATIONS = ("prelu", "relu", "sigmoid", "none")


def _check_channels(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def conv(in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
         groups: int = 1, use_bias: bool = False, rngs: nnx.Rngs,
         kernel_init: Callable | None = None) -> nnx.Conv:
    """A ``kernel_size`` x ``kernel_size`` convolution, ``[B, H, W, in] -> [B, H', W', out]``.

    Pads ``kernel_size // 2`` on every side, so ``H' = (H + 2*(k//2) - k) // stride + 1``.
    ``groups`` is the number of channel groups (``groups == in_channels`` is depthwise).
    """
    _check_channels("in_channels", in_channels)
    _check_channels("out_channels", out_channels)
    _check_channels("groups", groups)
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"groups={groups} must divide in_channels={in_channels} and "
                         f"out_channels={out_channels}")
    pad = kernel_size // 2
    return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size),
                    strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                    feature_group_count=groups, use_bias=use_bias,
                    kernel_init=kernel_init or he_normal_fan_out, rngs=rngs,
                    conv_general_dilated=conv_general_dilated)


def batch_norm(num_features: int, *, rngs: nnx.Rngs, use_scale: bool = True,
               use_bias: bool = True) -> nnx.BatchNorm:
    """``nnx.BatchNorm`` over the last axis with the project-wide momentum and epsilon."""
    _check_channels("num_features", num_features)
    return nnx.BatchNorm(num_features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                         use_scale=use_scale, use_bias=use_bias, rngs=rngs)


class PReLU(nnx.Module):
    """Parametric ReLU (He et al. 2015) with one slope per channel: ``[..., C] -> [..., C]``.

    ``y = x`` where ``x >= 0`` and ``alpha_c * x`` elsewhere; ``alpha: [C]`` is an ``nnx.Param``
    initialised to ``init`` (0.25). The slope is reshaped to the input's rank explicitly, so the
    block works under ``jax_numpy_rank_promotion='raise'``.
    """

    def __init__(self, num_channels: int, *, init: float = 0.25, rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init; accepted so every block has the same signature
        _check_channels("num_channels", num_channels)
        self.num_channels = num_channels
        self.alpha = nnx.Param(jnp.full((num_channels,), init, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.num_channels:
            raise ValueError(f"PReLU expects {self.num_channels} channels on the last axis, "
                             f"got shape {tuple(x.shape)}")
        alpha = self.alpha[...].astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
        return jnp.where(x >= 0, x, alpha * x)


def activation(kind: str, num_channels: int, *, rngs: nnx.Rngs) -> Callable[[jax.Array],
                                                                               jax.Array]:
    """An activation by name: ``'prelu'`` (per-channel, learnable), ``'relu'``, ``'sigmoid'``,
    ``'none'`` (identity)."""
    if kind == "prelu":
        return PReLU(num_channels, rngs=rngs)
    if kind == "relu":
        return jax.nn.relu
    if kind == "sigmoid":
        return jax.nn.sigmoid
    if kind == "none":
        return _identity
    raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {kind!r}")


def _identity(x: jax.Array) -> jax.Array:
    return x


class ConvBN(nnx.Module):
    """Conv -> BatchNorm -> activation: ``[B, H, W, in] -> [B, H', W', out]``.

    ``act`` is ``'prelu'``, ``'relu'`` or ``'none'``; the convolution has no bias (BN supplies
    it). Padding, BN and init conventions are the module docstring's.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *,
                 stride: int = 1, groups: int = 1, act: str = "prelu", rngs: nnx.Rngs,
                 kernel_init: Callable | None = None):
        self.conv = conv(in_channels, out_channels, kernel_size, stride=stride, groups=groups,
                         rngs=rngs, kernel_init=kernel_init)
        self.bn = batch_norm(out_channels, rngs=rngs)
        self.act = activation(act, out_channels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.act(self.bn(self.conv(x)))


class SqueezeExcite(nnx.Module):
    """Squeeze-and-Excitation (Hu et al. 2018): ``[B, H, W, C] -> [B, H, W, C]``.

    ``s = sigmoid(W2 act(W1 mean_hw(x) + b1) + b2)``, ``y = x * s`` per channel, with ``W1:
    C -> max(1, C // reduction)`` and ``W2`` back to ``C`` as 1x1 convolutions with bias (the
    form of insightface's SE-ResNet and VarGFaceNet). ``act`` is ``'prelu'`` (insightface /
    Yan et al. 2019 use PReLU inside SE) or ``'relu'`` (the SE paper).
    """

    def __init__(self, channels: int, reduction: int = 16, *, act: str = "prelu",
                 rngs: nnx.Rngs):
        _check_channels("channels", channels)
        _check_channels("reduction", reduction)
        hidden = max(1, channels // reduction)
        self.channels = channels
        self.fc1 = nnx.Conv(channels, hidden, (1, 1), use_bias=True, rngs=rngs)
        self.act = activation(act, hidden, rngs=rngs)
        self.fc2 = nnx.Conv(hidden, channels, (1, 1), use_bias=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.channels:
            raise ValueError(f"SE expects [B, H, W, {self.channels}], got {tuple(x.shape)}")
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = jax.nn.sigmoid(self.fc2(self.act(self.fc1(s))))
        return x * s


SE = SqueezeExcite


def flatten(x: jax.Array) -> jax.Array:
    """``[B, ...] -> [B, prod(...)]`` in NHWC order (a converted PyTorch FC weight, which
    flattens NCHW, must be permuted accordingly)."""
    return x.reshape(x.shape[0], -1)


def conv_output_size(size: int, kernel_size: int, stride: int) -> int:
    """Spatial size after :func:`conv` with ``pad = kernel_size // 2``."""
    pad = kernel_size // 2
    return (size + 2 * pad - kernel_size) // stride + 1


def check_input_size(input_size) -> tuple[int, int]:
    """Validates an ``(H, W)`` input size (the ``input_size`` keyword of every backbone)."""
    if (not isinstance(input_size, (tuple, list)) or len(input_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                       for v in input_size)):
        raise ValueError(f"input_size must be (H, W) positive ints, got {input_size!r}")
    return int(input_size[0]), int(input_size[1])
