"""Parameter and multiply-accumulate (MAC) counts of a backbone, without running it.

``count_macs`` walks the jaxpr of one eval-mode forward pass (traced abstractly, so nothing is
computed and no memory is used) and adds, for every

* ``conv_general_dilated``: ``prod(output shape) * kh * kw * (C_in / groups)`` — every kernel tap
  of every output element, *including taps that fall on zero padding*, the convention of the
  papers' "FLOPs"/"MAdds" tables (e.g. Yan et al. 2019's 1 G FLOPs for VarGFaceNet) and of the
  common counters (thop, ptflops);
* ``dot_general`` (FC layers, matmuls): ``prod(output shape) * prod(contracted dims)``.

Element-wise work (BN, activations, residual additions, pooling, SE scaling) is not counted: it
is a small fraction and the papers do not count it either. Sub-jaxprs (jit, custom_jvp/vjp,
remat) are followed; ``scan`` bodies are multiplied by their length; ``cond`` takes the most
expensive branch; ``while`` loops have no static trip count and raise.

``xla_flops`` is the independent cross-check: XLA's own ``cost_analysis()['flops']`` of the
compiled-for-CPU forward pass, which counts 2 flops per MAC but *skips taps on padding* and adds
element-wise ops, so ``xla_flops / 2`` is a little below ``count_macs`` for padded convolutions
(equal for a 'VALID' convolution or a matmul; tests check both cases).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def count_params(model: nnx.Module, *, include_batch_stats: bool = False) -> int:
    """Number of scalars in ``model``'s ``nnx.Param`` variables (trainable parameters).

    Works on an abstract model from ``nnx.eval_shape`` (nothing is allocated). With
    ``include_batch_stats`` the BN running means/variances are added. RNG state is never counted.
    """
    filt = (nnx.Param, nnx.BatchStat) if include_batch_stats else nnx.Param
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, filt)))


def _conv_macs(eqn) -> int:
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feat, in feat, *spatial)
    if eqn.params.get("batch_group_count", 1) != 1:
        raise NotImplementedError("batch_group_count > 1 (a convolution's weight gradient) is "
                                  "not counted; count a forward pass")
    taps = math.prod(rhs[d] for d in rhs_spec[2:]) * rhs[rhs_spec[1]]
    return math.prod(out) * taps


def _dot_macs(eqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)


def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def jaxpr_macs(jaxpr) -> int:
    """MACs of convolutions and dot products in a (Closed)Jaxpr (module docstring rules)."""
    if isinstance(jaxpr, jax.extend.core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_macs(eqn)
        elif name == "dot_general":
            total += _dot_macs(eqn)
        elif name == "while":
            raise NotImplementedError("a while loop has no static trip count; cannot count MACs")
        elif name == "cond":
            total += max(jaxpr_macs(b) for b in eqn.params["branches"])
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_macs(eqn.params["jaxpr"])
        else:
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    total += jaxpr_macs(sub)
    return total


def count_fn_macs(fn: Callable, *args) -> int:
    """MACs of ``fn(*args)``; ``args`` may be arrays or ``jax.ShapeDtypeStruct``."""
    return jaxpr_macs(jax.make_jaxpr(fn)(*args))


def _eval_forward(model: nnx.Module, input_hw: tuple[int, int], batch: int):
    """A pure ``(state, x) -> model(x)`` of the eval-mode model and its abstract arguments."""
    if (len(input_hw) != 2 or not all(isinstance(v, int) and v > 0 for v in input_hw)
            or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"input_hw must be (H, W) positive ints and batch a positive int, got "
                         f"{input_hw!r}, {batch!r}")
    graphdef, state = nnx.split(model)

    def forward(state, x):
        m = nnx.merge(graphdef, state)
        m.eval()
        return m(x)

    abstract_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    x = jax.ShapeDtypeStruct((batch, *input_hw, 3), jnp.float32)
    return forward, abstract_state, x


def count_macs(model: nnx.Module, input_hw: tuple[int, int] = (112, 112), *,
               batch: int = 1) -> int:
    """Multiply-accumulates of one eval-mode forward pass on ``[batch, H, W, 3]`` images.

    Counted from the jaxpr (module docstring); ``model`` may be abstract (``nnx.eval_shape``).
    """
    forward, state, x = _eval_forward(model, tuple(input_hw), batch)
    return count_fn_macs(forward, state, x)


def xla_flops(model: nnx.Module, input_hw: tuple[int, int] = (112, 112), *,
              batch: int = 1) -> float:
    """XLA's ``cost_analysis()['flops']`` of the lowered eval-mode forward pass (see module
    docstring for how it differs from ``2 * count_macs``)."""
    forward, state, x = _eval_forward(model, tuple(input_hw), batch)
    cost = jax.jit(forward).lower(state, x).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])
