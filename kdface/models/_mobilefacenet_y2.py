"""MobileFaceNet "y2": the from-scratch baseline of VarGFaceNet's Table 2.

Yan et al., "VarGFaceNet: An Efficient Variable Group Convolutional Neural Network for Lightweight
Face Recognition", ICCV Workshops 2019, compare VarGFaceNet with "y2 network (a deeper
mobilefacenet[2, 3])" at 933 M FLOPs and describe it only as that. y2 is the name of a network in
insightface's MXNet recognition configs (``network.y2``: ``fmobilefacenet`` with ``emb_size =
256``, ``net_output = 'GDC'``, ``net_blocks = [2, 8, 16, 4]``); kdface follows that entry:
MobileFaceNet (``kdface.models._mobilefacenet``) whose four residual groups have 2, 8, 16 and 4
blocks instead of 1, 4, 6, 2 — so stage 0 becomes two residual depthwise blocks (expansion 1,
64 channels) instead of one depthwise conv — and a 256-d embedding. At 112x112 this is 468.8 M
multiply-adds, 937.7 M FLOPs in the paper's convention (FLOPs = 2 x multiply-adds, which gives
VarGFaceNet 1025 M against its printed 1022 M): 0.5 % over the 933 M printed for y2. With
MobileFaceNet's single depthwise conv as stage 0 it would be 880 M.
"""
from __future__ import annotations

from flax import nnx

from kdface.models._mobilefacenet import MobileFaceNet, bottleneck_stage
from kdface.models._registry import register

Y2_BLOCKS = (2, 8, 16, 4)


def _y2_stage_specs(blocks):
    """MobileFaceNet's stages 1-3 ``(t, c, n, s)`` with ``blocks[1:]`` residual blocks after each
    stride-2 block (insightface ``fmobilefacenet``: expansion 2 after 64->64, 4 then 2 at 128)."""
    _, b1, b2, b3 = blocks
    return (((2, 64, 1 + b1, 2),),
            ((4, 128, 1, 2), (2, 128, b2, 1)),
            ((4, 128, 1, 2), (2, 128, b3, 1)))


@register("mobilefacenet_y2")
def mobilefacenet_y2(*, rngs: nnx.Rngs, embedding_size: int = 256,
                     input_size: tuple[int, int] = (112, 112), act: str = "prelu"
                     ) -> MobileFaceNet:
    """insightface's y2 (module docstring): MobileFaceNet with residual groups (2, 8, 16, 4) and
    a 256-d embedding; stages at 112x112: 56x56x64, 28x28x64, 14x14x128, 7x7x128."""
    net = MobileFaceNet(rngs=rngs, embedding_size=embedding_size, input_size=input_size,
                        stage_specs=_y2_stage_specs(Y2_BLOCKS), act=act)
    # Stage 0 of MobileFaceNet is one depthwise conv; with blocks[0] > 1 insightface makes it
    # blocks[0] residual depthwise blocks of expansion 1 (each keeps its 1x1 expansion conv).
    net.stages[0] = bottleneck_stage(64, ((1, 64, Y2_BLOCKS[0], 1),), act=act, expand_at_1=True,
                                     rngs=rngs)[0]
    return net
