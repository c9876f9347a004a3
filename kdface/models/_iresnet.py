"""insightface "IResNet" face backbones: iresnet18/34/50/100 and se_iresnet100.

The ArcFace paper's improved residual network (Deng et al. 2019, "ResNet-IR"), as insightface's
``arcface_torch/backbones/iresnet.py`` lays it out:

* stem: 3x3 conv 64, stride 1 (no down-sampling at the start: face crops are small) + BN + PReLU;
* four stages of improved units ``BN -> Conv3x3 -> BN -> PReLU -> Conv3x3(stride) -> BN`` added to
  the shortcut (identity, or Conv1x1(stride) + BN when the shape changes), with no activation
  after the addition; planes 64/128/256/512, the first unit of every stage has stride 2, so a
  112x112 input gives stage features 56x56x64, 28x28x128, 14x14x256, 7x7x512;
* embedding ("option E" of ArcFace): ``BN -> Dropout -> Flatten -> FC(512) -> BN``. As in
  insightface the final (features) BN has no learnable scale (insightface fixes it to 1), only a
  bias; the FC input size is ``512 * H/16 * W/16`` computed from ``input_size``.

Units per stage: 18 -> [2,2,2,2], 34 -> [3,4,6,3], 50 -> [3,4,14,3], 100 -> [3,13,30,3]. Parameter
counts at 112x112 match the published ones (IResNet-50 43.6 M, IResNet-100 65.2 M). ``se=True``
adds a squeeze-excitation block (reduction 16, PReLU inside, the insightface MXNet SE-ResNet) to
every unit after its last BN: the SE-ResNet100 teacher of Yan et al. 2019 (VarGFaceNet).
Nikitin et al. 2020 (ResNet18/50, FC 512), Duong et al. 2019 (ResNet teacher) and Yan et al.
2019 use these nets.
"""
from __future__ import annotations

import jax
from flax import nnx

from kdface.models._base import NUM_STAGES, Backbone
from kdface.models._layers import (PReLU, SqueezeExcite, batch_norm, check_input_size, conv,
                                   conv_output_size, flatten)
from kdface.models._registry import register

_PLANES = (64, 128, 256, 512)
# Residual units per stage of each insightface IResNet depth (public: the weight importer uses it).
IRESNET_UNITS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}


class IBasicUnit(nnx.Module):
    """Improved residual unit ``[B, H, W, in] -> [B, H/stride, W/stride, planes]``.

    ``y = BN(Conv3x3_s(PReLU(BN(Conv3x3(BN(x)))))) [* SE] + shortcut(x)``.
    """

    def __init__(self, in_channels: int, planes: int, stride: int, *, se: bool,
                 rngs: nnx.Rngs):
        self.bn1 = batch_norm(in_channels, rngs=rngs)
        self.conv1 = conv(in_channels, planes, 3, rngs=rngs)
        self.bn2 = batch_norm(planes, rngs=rngs)
        self.prelu = PReLU(planes)
        self.conv2 = conv(planes, planes, 3, stride=stride, rngs=rngs)
        self.bn3 = batch_norm(planes, rngs=rngs)
        self.se = SqueezeExcite(planes, 16, act="prelu", rngs=rngs) if se else None
        if stride != 1 or in_channels != planes:
            self.down_conv = conv(in_channels, planes, 1, stride=stride, rngs=rngs)
            self.down_bn = batch_norm(planes, rngs=rngs)
        else:
            self.down_conv = self.down_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.bn1(x)
        out = self.prelu(self.bn2(self.conv1(out)))
        out = self.bn3(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        shortcut = x if self.down_conv is None else self.down_bn(self.down_conv(x))
        return out + shortcut


class IResNet(Backbone):
    """IResNet backbone (module docstring): ``[B, H, W, 3] -> [B, embedding_size]``.

    Args:
      depths: residual units per stage, e.g. ``(3, 13, 30, 3)`` for IResNet-100.
      embedding_size: size of the embedding (512 in every seed).
      input_size: ``(H, W)`` the network is built for; fixes the FC input size.
      dropout: dropout rate before the FC (insightface ``arcface_torch`` default 0).
      se: adds SE to every unit (SE-IResNet).
    """

    def __init__(self, depths: tuple[int, ...], *, rngs: nnx.Rngs, embedding_size: int = 512,
                 input_size: tuple[int, int] = (112, 112), dropout: float = 0.0,
                 se: bool = False):
        if len(depths) != NUM_STAGES or not all(isinstance(d, int) and d >= 1 for d in depths):
            raise ValueError(f"depths must be {NUM_STAGES} positive ints, got {depths!r}")
        if not isinstance(embedding_size, int) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        h, w = check_input_size(input_size)
        self.embedding_size = embedding_size
        self.input_size = (h, w)
        self.stem_conv = conv(3, 64, 3, rngs=rngs)
        self.stem_bn = batch_norm(64, rngs=rngs)
        self.stem_prelu = PReLU(64)
        stages = []
        in_channels = 64
        for planes, depth in zip(_PLANES, depths):
            units = [IBasicUnit(in_channels, planes, 2, se=se, rngs=rngs)]
            units += [IBasicUnit(planes, planes, 1, se=se, rngs=rngs) for _ in range(depth - 1)]
            stages.append(nnx.List(units))
            in_channels = planes
            h, w = conv_output_size(h, 3, 2), conv_output_size(w, 3, 2)
        self.stages = nnx.List(stages)
        self.final_hw = (h, w)
        self.bn_out = batch_norm(in_channels, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.fc = nnx.Linear(in_channels * h * w, embedding_size, rngs=rngs)
        self.features = batch_norm(embedding_size, use_scale=False, rngs=rngs)

    def stem(self, x: jax.Array) -> jax.Array:
        return self.stem_prelu(self.stem_bn(self.stem_conv(x)))

    def embed(self, h: jax.Array) -> jax.Array:
        self.check_final_map(h)
        h = self.bn_out(h)
        if self.dropout is not None:
            h = self.dropout(h)
        return self.features(self.fc(flatten(h)))


def _make(depth: int, se: bool = False):
    def build(*, rngs: nnx.Rngs, **kwargs) -> IResNet:
        return IResNet(IRESNET_UNITS[depth], rngs=rngs, se=se, **kwargs)
    build.__name__ = f"{'se_' if se else ''}iresnet{depth}"
    build.__doc__ = (f"IResNet-{depth}{' with SE' if se else ''} (insightface layout, "
                     f"units {IRESNET_UNITS[depth]}); kwargs as :class:`IResNet`.")
    return build


iresnet18 = register("iresnet18")(_make(18))
iresnet34 = register("iresnet34")(_make(34))
iresnet50 = register("iresnet50")(_make(50))
iresnet100 = register("iresnet100")(_make(100))
se_iresnet100 = register("se_iresnet100")(_make(100, se=True))
