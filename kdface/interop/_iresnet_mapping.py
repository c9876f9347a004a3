"""insightface IResNet state dicts (``arcface_torch/backbones/iresnet.py`` names) -> kdface IResNet.

The two implementations have the same layers in the same order (see ``kdface.models._iresnet``),
so the mapping is one-to-one by name:

=================================================  ==========================================
insightface key                                    kdface IResNet variable
=================================================  ==========================================
``conv1.weight``, ``bn1.*``, ``prelu.weight``      ``stem_conv``, ``stem_bn``, ``stem_prelu``
``layer{L}.{i}.{bn1,conv1,bn2,prelu,conv2,bn3}``   ``stages[L-1][i].{same name}``
``layer{L}.{i}.downsample.{0,1}``                  ``stages[L-1][i].{down_conv,down_bn}``
``bn2.*``, ``fc.*``, ``features.*``                ``bn_out``, ``fc``, ``features``
=================================================  ==========================================

Layouts: a convolution weight ``[O, I, kh, kw]`` becomes ``[kh, kw, I, O]``; BatchNorm ``weight,
bias, running_mean, running_var`` become ``scale, bias, mean, var`` (``num_batches_tracked`` is
ignored); PReLU ``weight [C]`` becomes ``alpha``. PyTorch flattens the last ``[C, H, W]`` feature
map before the FC while kdface flattens ``[H, W, C]``, so the FC weight ``[O, C*H*W]`` is
reshaped to ``[O, C, H, W]``, transposed to ``[H, W, C, O]`` and flattened to ``[H*W*C, O]``.

insightface fixes the embedding BN's scale (``features.weight``) to 1 and kdface's IResNet has no
such scale; a state dict whose ``features.weight`` is not 1 is still loaded exactly (for inference)
by folding it into the FC and the BN mean: ``g*(y - m)/s + b == (g*y - g*m)/s + b`` with
``y = W x + c``, i.e. ``W <- g*W``, ``c <- g*c``, ``m <- g*m``. BatchNorm epsilon is 1e-5 in both
(arcface_torch's value).
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdface import models
from kdface.models import IRESNET_UNITS

__all__ = ["IRESNET_ARCHS", "infer_iresnet_arch", "iresnet_from_state_dict"]

IRESNET_ARCHS = {f"iresnet{d}": units for d, units in IRESNET_UNITS.items()}
_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_UNIT_LAYERS = {"bn1": "bn1", "conv1": "conv1", "bn2": "bn2", "prelu": "prelu", "conv2": "conv2",
                "bn3": "bn3", "downsample.0": "down_conv", "downsample.1": "down_bn"}
_LIST_LIMIT = 12


def _listing(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_LIST_LIMIT])
    more = len(names) - _LIST_LIMIT
    return shown + (f", ... ({more} more)" if more > 0 else "")


def infer_iresnet_arch(state: dict[str, np.ndarray]) -> str:
    """The IResNet depth name (``'iresnet50'``, ...) from the ``layer{L}.{i}`` keys present."""
    units = []
    for layer in range(1, 5):
        found = {int(m.group(1)) for k in state
                 if (m := re.match(rf"layer{layer}\.(\d+)\.", k))}
        units.append(max(found) + 1 if found else 0)
    for name, depths in IRESNET_ARCHS.items():
        if tuple(units) == depths:
            return name
    raise ValueError(f"the state dict's units per stage {tuple(units)} match no insightface "
                     f"IResNet ({', '.join(f'{n}: {d}' for n, d in IRESNET_ARCHS.items())}); "
                     f"is it an IResNet state dict?")


def _expected(model) -> dict[str, tuple[tuple, str]]:
    """insightface key -> (kdface variable path, conversion kind)."""
    out: dict[str, tuple[tuple, str]] = {}

    def bn(prefix: str, path: tuple, scale: bool = True) -> None:
        for t_name, k_name in _BN.items():
            out[f"{prefix}.{t_name}"] = (path + (k_name,), "vector")
        if not scale:
            out[f"{prefix}.weight"] = ((), "features_scale")

    out["conv1.weight"] = (("stem_conv", "kernel"), "conv")
    bn("bn1", ("stem_bn",))
    out["prelu.weight"] = (("stem_prelu", "alpha"), "vector")
    for s, stage in enumerate(model.stages):
        for i, unit in enumerate(stage):
            for t_name, k_name in _UNIT_LAYERS.items():
                if getattr(unit, k_name) is None:
                    continue
                prefix, path = f"layer{s + 1}.{i}.{t_name}", ("stages", s, i, k_name)
                if "conv" in k_name:
                    out[f"{prefix}.weight"] = (path + ("kernel",), "conv")
                elif k_name == "prelu":
                    out[f"{prefix}.weight"] = (path + ("alpha",), "vector")
                else:
                    bn(prefix, path)
    bn("bn2", ("bn_out",))
    out["fc.weight"] = (("fc", "kernel"), "fc")
    out["fc.bias"] = (("fc", "bias"), "vector")
    bn("features", ("features",), scale=False)
    return out


def _variable(model, path: tuple) -> nnx.Variable:
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "conv":
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if kind == "fc":
        return (shape[1], shape[0])
    return shape


def _fc_kernel(weight: np.ndarray, final_hw: tuple[int, int]) -> np.ndarray:
    """``[O, C*H*W]`` (NCHW flatten) -> ``[H*W*C, O]`` (NHWC flatten)."""
    h, w = final_hw
    out_size, in_size = weight.shape
    channels = in_size // (h * w)
    return (weight.reshape(out_size, channels, h, w).transpose(2, 3, 1, 0)
            .reshape(h * w * channels, out_size))


def iresnet_from_state_dict(state: dict[str, np.ndarray], *, arch: str | None = None,
                            input_size: tuple[int, int] = (112, 112),
                            source: str = "state dict") -> tuple[str, Any]:
    """Builds a kdface IResNet holding the weights of an insightface-layout state dict.

    state: ``{key: array}`` with insightface ``iresnet.py`` keys (``conv1.weight`` ...
    ``features.running_var``; ``num_batches_tracked`` ignored). arch: ``'iresnet18'`` /
    ``'34'`` / ``'50'`` / ``'100'``, or None to infer it from the keys (a given arch is checked).
    input_size: the ``(H, W)`` the network is built for; it fixes the FC input size and must
    agree with the state dict's ``fc.weight`` (112x112 -> 512 x 7 x 7). The embedding size is
    read from ``fc.weight``. source: names the file in error messages.

    Returns ``(arch, model)`` with ``model`` an eval-mode ``kdface.models`` IResNet: images
    ``[B, H, W, 3]`` -> embeddings ``[B, E]``. Raises ValueError listing missing tensors,
    unexpected tensors and shape mismatches (in PyTorch layout).
    """
    state = {k: np.asarray(v) for k, v in state.items()
             if not k.endswith("num_batches_tracked")}
    inferred = infer_iresnet_arch(state)
    if arch is not None and arch != inferred:
        if arch not in IRESNET_ARCHS:
            raise ValueError(f"arch must be one of {sorted(IRESNET_ARCHS)}, got {arch!r}")
        raise ValueError(f"{source}: asked for {arch} but the tensors are those of {inferred} "
                         f"(units per stage {IRESNET_ARCHS[inferred]})")
    fc = state.get("fc.weight")
    embedding_size = int(fc.shape[0]) if fc is not None and fc.ndim == 2 else 512
    # Built abstractly (no random init: seconds saved for IResNet-100), then filled below.
    model = nnx.eval_shape(lambda: models.create(
        inferred, rngs=nnx.Rngs(0), input_size=tuple(input_size),
        embedding_size=embedding_size))
    expected = _expected(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = []
    for key, (path, kind) in expected.items():
        if key not in state:
            continue
        want = ((embedding_size,) if kind == "features_scale"
                else _torch_shape(kind, tuple(_variable(model, path).shape)))
        if tuple(state[key].shape) != want:
            mismatched.append(f"{key}: file {tuple(state[key].shape)}, network {want}")
        elif not np.issubdtype(state[key].dtype, np.floating):
            mismatched.append(f"{key}: dtype {state[key].dtype} is not floating point")
    if missing or unexpected or mismatched:
        lines = [f"{source} does not fit kdface {inferred} (input_size={tuple(input_size)}, "
                 f"embedding {embedding_size}):"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): {_listing(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
        if any(m.startswith("fc.weight") for m in mismatched):
            lines.append(f"  (the FC input size depends on input_size; this network's last "
                         f"feature map is {model.final_hw})")
        raise ValueError("\n".join(lines))

    values = {key: state[key].astype(np.float32) for key in expected}
    gain = values.pop("features.weight")
    fc_w, fc_b = values["fc.weight"], values["fc.bias"]
    values["fc.weight"] = fc_w * gain[:, None]
    values["fc.bias"] = fc_b * gain
    values["features.running_mean"] = values["features.running_mean"] * gain
    for key, value in values.items():
        path, kind = expected[key]
        if kind == "conv":
            value = value.transpose(2, 3, 1, 0)
        elif kind == "fc":
            value = _fc_kernel(value, model.final_hw)
        _variable(model, path).set_value(jnp.asarray(value))
    left = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(
        nnx.state(model)) if isinstance(v, jax.ShapeDtypeStruct)]
    if left:  # every variable comes from the file; guards against a kdface layout change
        raise ValueError(f"kdface {inferred} variables without a source tensor: {left}")
    model.eval()
    return inferred, model
