"""Networks named by the papers and built from presets: ShrinkTeaNet's ResNet-90 teacher and
VarGFaceNet's y2 baseline, against the figures the papers print and hand counts."""
from __future__ import annotations

from kdface.models import count_macs, count_params, names

from tests._model_helpers import abstract_model


def _iresnet_params(units, planes=(64, 128, 256, 512), hw=(112, 112), emb=512) -> int:
    """Trainable scalars of an insightface IResNet, counted layer by layer from its layout."""
    total = 9 * 3 * 64 + 2 * 64 + 64                     # stem conv, BN, PReLU
    cin = 64
    for c, n in zip(planes, units):
        for k in range(n):
            i = cin if k == 0 else c
            total += 2 * i + 9 * i * c + 2 * c + c + 9 * c * c + 2 * c   # BN conv BN PReLU conv BN
            if k == 0:
                total += i * c + 2 * c                   # 1x1 stride-2 shortcut + BN
        cin = c
    h, w = hw[0] // 16, hw[1] // 16
    return total + 2 * cin + cin * h * w * emb + emb + emb   # BN, FC + bias, bias-only BN


def test_resnet90_is_registered_with_the_hand_count():
    assert "iresnet90" in names()
    assert count_params(abstract_model("iresnet90")) == _iresnet_params((3, 8, 30, 3))


def test_resnet90_has_the_papers_parameter_count():
    # Duong et al. 2019, Table 2: "ResNet90 [4] 63.67M 100% Teacher". The paper prints two
    # decimals; 63,676,608 shows as 63.67 M truncated (the figure is not from a rounding).
    params = count_params(abstract_model("iresnet90"))
    assert params // 10_000 == 6367
    # One unit fewer or more in any stage moves the count by >= 0.29 M: the layout is pinned.
    for units in [(3, 7, 30, 3), (3, 8, 29, 3), (2, 8, 30, 3), (3, 8, 30, 2)]:
        assert _iresnet_params(units) // 10_000 != 6367


def test_y2_matches_the_flops_yan2019_prints():
    # Yan et al. 2019, Table 2: "y2 ... 933M" FLOPs, "VarGFaceNet ... 1022M"; FLOPs there are
    # 2 x multiply-adds. kdface's y2 (insightface's net_blocks [2, 8, 16, 4], 256-d embedding).
    y2 = abstract_model("mobilefacenet_y2")
    assert "mobilefacenet_y2" in names() and y2.embedding_size == 256
    flops = 2 * count_macs(y2)
    assert abs(flops - 933e6) / 933e6 < 0.01
    # Deeper than MobileFaceNet: the residual groups carry 2, 8, 16, 4 blocks (+ stride-2 ones).
    assert [len(s.layers) for s in y2.stages] == [2, 9, 17, 5]
