"""Parameter and MAC counting against hand-computed counts."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from kdface.models import count_macs, count_params, create, xla_flops
from kdface.models._iresnet import IResNet
from kdface.models._layers import PReLU, batch_norm, conv
from kdface.models._stats import count_fn_macs


def _conv_fn(stride, pad, groups=1):
    def f(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (stride, stride), ((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    return f


@pytest.mark.parametrize("stride,pad,groups", [(1, 1, 1), (2, 1, 1), (1, 0, 1), (2, 1, 8)])
def test_single_conv_macs(stride, pad, groups):
    x = jnp.ones((1, 16, 16, 8))
    w = jnp.ones((3, 3, 8 // groups, 16))
    ho = (16 + 2 * pad - 3) // stride + 1
    expected = ho * ho * 16 * 3 * 3 * (8 // groups)   # out elements x taps per output
    assert count_fn_macs(_conv_fn(stride, pad, groups), x, w) == expected


def test_xla_flops_is_two_per_mac_without_padding():
    x, w = jnp.ones((1, 16, 16, 8)), jnp.ones((3, 3, 8, 12))
    f = _conv_fn(1, 0)
    cost = jax.jit(f).lower(x, w).cost_analysis()
    assert cost["flops"] == 2 * count_fn_macs(f, x, w) == 2 * 14 * 14 * 12 * 72
    a, b = jnp.ones((3, 5)), jnp.ones((5, 7))
    assert count_fn_macs(jnp.matmul, a, b) == 3 * 5 * 7
    assert jax.jit(jnp.matmul).lower(a, b).cost_analysis()["flops"] == 2 * 3 * 5 * 7


def test_xla_skips_padding_taps():
    # XLA counts only taps that land on real input; count them by brute force.
    x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 4))
    f = _conv_fn(1, 1)
    inside = sum(1 for i, j, di, dj in itertools.product(range(6), range(6), range(3), range(3))
                 if 0 <= i + di - 1 < 6 and 0 <= j + dj - 1 < 6)
    assert jax.jit(f).lower(x, w).cost_analysis()["flops"] == 2 * inside * 2 * 4
    assert count_fn_macs(f, x, w) == 6 * 6 * 9 * 2 * 4


class _TinyNet(nnx.Module):
    def __init__(self, rngs):
        self.c1 = conv(3, 4, 3, stride=2, rngs=rngs)
        self.bn = batch_norm(4, rngs=rngs)
        self.act = PReLU(4)
        self.c2 = conv(4, 8, 1, rngs=rngs, use_bias=True)
        self.dw = conv(8, 8, 3, groups=8, rngs=rngs)
        self.fc = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        h = self.dw(self.c2(self.act(self.bn(self.c1(x)))))
        return self.fc(jnp.mean(h, axis=(1, 2)))


def test_tiny_net_macs_and_params():
    net = _TinyNet(nnx.Rngs(0))
    # 10x10 input: c1 -> 5x5x4 (27 taps), c2 1x1 -> 5x5x8 (4 taps), dw -> 5x5x8 (9 taps), fc 8x10.
    expected = 5 * 5 * 4 * 27 + 5 * 5 * 8 * 4 + 5 * 5 * 8 * 9 + 8 * 10
    assert count_macs(net, (10, 10)) == expected
    assert count_macs(net, (10, 10), batch=3) == 3 * expected
    params = 3 * 3 * 3 * 4 + 2 * 4 + 4 + 4 * 8 + 8 + 9 * 8 + 8 * 10 + 10
    assert count_params(net) == params
    assert count_params(net, include_batch_stats=True) == params + 2 * 4
    # XLA's count (2 flops per MAC, padding skipped, element-wise ops added) is close.
    assert 0.8 < xla_flops(net, (10, 10)) / (2 * expected) < 1.2


def test_sphereface_macs_from_table():
    # Wang et al. 2019 Table 2 student at its 112x96 input, summed by hand.
    channels, units, (h, w) = (18, 36, 72, 144), (2, 4, 8, 2), (112, 96)
    expected, cin = 0, 3
    for c, n in zip(channels, units):
        h, w = h // 2, w // 2
        expected += h * w * c * 9 * cin + n * 2 * h * w * c * 9 * c
        cin = c
    expected += cin * h * w * 512
    model = nnx.eval_shape(lambda: create("sphereface36_thin", rngs=nnx.Rngs(0),
                                          input_size=(112, 96)))
    assert count_macs(model, (112, 96)) == expected


def _iresnet_macs(depths, se, hw=112):
    total, cin, h = hw * hw * 64 * 27, 64, hw
    for planes, n in zip((64, 128, 256, 512), depths):
        for k in range(n):
            stride = 2 if k == 0 else 1
            total += h * h * planes * 9 * cin                      # conv1 at input size
            h_out = h // stride
            total += h_out * h_out * planes * 9 * planes           # conv2 (stride)
            if k == 0:
                total += h_out * h_out * planes * cin              # projection shortcut
            if se:
                total += 2 * planes * (planes // 16)               # SE 1x1 convs on 1x1
            h, cin = h_out, planes
    return total + 512 * h * h * 512


def test_iresnet_macs_from_layout():
    model = nnx.eval_shape(lambda: create("iresnet50", rngs=nnx.Rngs(0)))
    assert count_macs(model) == _iresnet_macs((3, 4, 14, 3), False)
    se = nnx.eval_shape(lambda: IResNet((2, 1, 1, 1), se=True, rngs=nnx.Rngs(0)))
    assert count_macs(se) == _iresnet_macs((2, 1, 1, 1), True)


def test_while_loop_is_refused_and_bad_sizes():
    def f(x):
        return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ c[1]),
                                  (0, x))[1]
    with pytest.raises(NotImplementedError, match="while"):
        count_fn_macs(f, jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="input_hw"):
        count_macs(_TinyNet(nnx.Rngs(0)), (10,))
