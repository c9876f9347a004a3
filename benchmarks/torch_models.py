"""PyTorch peers of kdface's students for the train-step benchmarks (CPU, eager).

``MobileFaceNet`` follows the module layout of insightface's ``arcface_torch`` MobileFaceNet
(``ConvBlock`` = conv + BN + PReLU, ``LinearBlock`` = conv + BN, ``DepthWise`` = 1x1 expand ->
3x3 depthwise -> 1x1 linear projection with an optional residual, ``GDC`` = 7x7 linear
depthwise conv + BN + linear + BN1d), written here from that description in NCHW. With
``scale=1`` and ``blocks=(1, 4, 6, 2)`` it is the network of Chen et al., MobileFaceNets
(CCBR 2018) and exactly kdface's ``mobilefacenet`` (64/128 channels, expansions 2 and 4, 221 M
multiply-adds at 112x112 for a 128-d embedding); insightface's ``mbf`` model is ``scale=2``.

``IResNet`` follows insightface's ``backbones/iresnet.py`` layout and parameter names (stem
conv3x3 + BN + PReLU; units BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN plus a 1x1
conv + BN shortcut where the shape changes; BN2d - flatten - FC - BN1d ``features``); units
``(3, 13, 30, 3)`` is IResNet-100 (Deng et al., ArcFace, CVPR 2019), kdface's ``iresnet100``.

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


class IResNetUnit(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, eps=1e-5)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, eps=1e-5)
        self.prelu = nn.PReLU(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out, eps=1e-5)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out, eps=1e-5))

    def forward(self, x):
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """``[B, 3, H, W] -> [B, embedding]``; ``final_hw`` = input size / 16."""

    def __init__(self, units=(3, 13, 30, 3), *, embedding=512, final_hw=(7, 7)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        c_in = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), units)):
            blocks = [IResNetUnit(c_in, planes, 2)]
            blocks += [IResNetUnit(planes, planes, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = planes
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.fc = nn.Linear(512 * final_hw[0] * final_hw[1], embedding)
        self.features = nn.BatchNorm1d(embedding, eps=1e-5)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.features(self.fc(torch.flatten(self.bn2(x), 1)))


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


def cos_logits(embeddings, weight):
    """cos θ of L2-normalized ``embeddings [B, E]`` to L2-normalized class weights ``[E, C]``."""
    return (F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=0)).clamp(-1.0, 1.0)


def kd_im_loss(student_embedding, teacher_embedding, labels, head, teacher_weight, *,
               temperature=4.0):
    """kdface's ``kd_im`` objective (Wang et al. 2019 eq. 9 with λ = 1): the student's CosFace
    loss + the cross-entropy between the teacher's and the student's softened predictions
    (logits ``s cos θ``, eq. 3, no τ²) + biased MK-MMD² of the L2-normalized embeddings
    (``torch_reference.mmd_gemm_torch``, kernels ``(1, 2, 4, 8, 16)`` x the mean distance)."""
    from benchmarks.torch_reference import mmd_gemm_torch
    cos = cos_logits(student_embedding, head.weight)
    onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
    hard = F.cross_entropy(head.scale * (cos - head.margin * onehot), labels)
    with torch.no_grad():
        p_t = F.softmax(head.scale * cos_logits(teacher_embedding, teacher_weight) / temperature,
                        dim=1)
    soft = -(p_t * F.log_softmax(head.scale * cos / temperature, dim=1)).sum(1).mean()
    return hard + soft + mmd_gemm_torch(student_embedding, teacher_embedding.detach())
