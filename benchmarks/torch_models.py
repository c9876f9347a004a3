"""PyTorch peers of kdface's students for the train-step benchmarks (CPU, eager).

``MobileFaceNet`` follows the module layout of insightface's ``arcface_torch`` MobileFaceNet
(``ConvBlock`` = conv + BN + PReLU, ``LinearBlock`` = conv + BN, ``DepthWise`` = 1x1 expand ->
3x3 depthwise -> 1x1 linear projection with an optional residual, ``GDC`` = 7x7 linear
depthwise conv + BN + linear + BN1d), written here from that description in NCHW. With
``scale=1`` and ``blocks=(1, 4, 6, 2)`` it is the network of Chen et al., MobileFaceNets
(CCBR 2018) and exactly kdface's ``mobilefacenet`` (64/128 channels, expansions 2 and 4, 221 M
multiply-adds at 112x112 for a 128-d embedding); insightface's ``mbf`` model is ``scale=2``.

``CosFaceHead``: ``s * (cos θ - m [j == y])`` on L2-normalized embeddings and class weights
``[E, C]``, followed by cross-entropy (Wang et al., CosFace, CVPR 2018), as kdface's
``MarginHead`` + ``cosface_logits`` + ``margin_cross_entropy``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ConvBlock(nn.Sequential):
    def __init__(self, c_in, c_out, kernel=1, stride=1, padding=0, groups=1):
        super().__init__(nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups,
                                   bias=False),
                         nn.BatchNorm2d(c_out), nn.PReLU(c_out))


class LinearBlock(nn.Sequential):
    def __init__(self, c_in, c_out, kernel=1, stride=1, padding=0, groups=1):
        super().__init__(nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups,
                                   bias=False),
                         nn.BatchNorm2d(c_out))


class DepthWise(nn.Module):
    """1x1 expand to ``hidden`` -> 3x3 depthwise (``stride``) -> 1x1 linear to ``c_out``."""

    def __init__(self, c_in, c_out, hidden, *, stride, residual):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(ConvBlock(c_in, hidden),
                                    ConvBlock(hidden, hidden, 3, stride, 1, groups=hidden),
                                    LinearBlock(hidden, c_out))

    def forward(self, x):
        y = self.layers(x)
        return x + y if self.residual else y


class MobileFaceNet(nn.Module):
    """``[B, 3, 112, 112] -> [B, embedding_size]``."""

    def __init__(self, embedding_size=512, blocks=(1, 4, 6, 2), scale=1):
        super().__init__()
        c64, c128 = 64 * scale, 128 * scale
        if blocks[0] != 1:
            raise ValueError("only blocks[0] == 1 (one depthwise conv after the stem)")
        layers = [ConvBlock(3, c64, 3, 2, 1), ConvBlock(c64, c64, 3, 1, 1, groups=c64),
                  DepthWise(c64, c64, 2 * c64, stride=2, residual=False)]
        layers += [DepthWise(c64, c64, 2 * c64, stride=1, residual=True)
                   for _ in range(blocks[1])]
        layers.append(DepthWise(c64, c128, 4 * c64, stride=2, residual=False))
        layers += [DepthWise(c128, c128, 2 * c128, stride=1, residual=True)
                   for _ in range(blocks[2])]
        layers.append(DepthWise(c128, c128, 4 * c128, stride=2, residual=False))
        layers += [DepthWise(c128, c128, 2 * c128, stride=1, residual=True)
                   for _ in range(blocks[3])]
        layers.append(ConvBlock(c128, 512))
        self.body = nn.Sequential(*layers)
        self.gdc = LinearBlock(512, 512, 7, 1, 0, groups=512)
        self.linear = nn.Linear(512, embedding_size, bias=False)
        self.bn = nn.BatchNorm1d(embedding_size)

    def forward(self, x):
        h = self.gdc(self.body(x)).flatten(1)
        return self.bn(self.linear(h))


class CosFaceHead(nn.Module):
    """Mean CosFace loss of ``embeddings [B, E]`` against ``labels [B]`` over ``num_classes``."""

    def __init__(self, embedding_size, num_classes, *, scale=64.0, margin=0.35):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(embedding_size, num_classes) * 0.01)
        self.scale, self.margin = scale, margin

    def forward(self, embeddings, labels):
        cos = F.normalize(embeddings, dim=1) @ F.normalize(self.weight, dim=0)
        cos = cos.clamp(-1.0, 1.0)
        onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return F.cross_entropy(self.scale * (cos - self.margin * onehot), labels)
