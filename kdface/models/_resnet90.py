"""ResNet-90: the ShrinkTeaNet teacher (Duong et al., "ShrinkTeaNet: Million-scale Lightweight Face
Recognition via Shrinking Teacher-Student Networks", arXiv:1905.10620, 2019).

The paper names its teacher "Resnet-90 structure [4]" (citing He et al.) with "63.67M" parameters
(its Table 2) and gives no layout. kdface's choice: insightface's ``fresnet`` 90-layer entry —
the improved residual units of ``kdface.models._iresnet`` with ``units = [3, 8, 30, 3]`` (the
table insightface's MXNet ``get_symbol`` uses for ``num_layers == 90``) and the same "option E"
embedding (BN -> Dropout -> FC 512 -> BN). At 112x112 (the paper's crop, §4.2) it has
63,676,608 trainable parameters: the paper's 63.67 M to the two decimals it prints (truncated;
rounding gives 63.68 M). Being an IResNet, it loads and exports like the other ones.
"""
from __future__ import annotations

from flax import nnx

from kdface.models._iresnet import IResNet
from kdface.models._registry import register

RESNET90_UNITS = (3, 8, 30, 3)


@register("iresnet90")
def iresnet90(*, rngs: nnx.Rngs, **kwargs) -> IResNet:
    """IResNet-90, units (3, 8, 30, 3): ShrinkTeaNet's 63.67 M-parameter teacher (module
    docstring); kwargs as :class:`kdface.models._iresnet.IResNet`."""
    return IResNet(RESNET90_UNITS, rngs=rngs, **kwargs)
