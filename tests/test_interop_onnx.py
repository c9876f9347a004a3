"""Shipping students as ONNX: ``python -m kdface.export`` and the jaxpr -> ONNX translator.

The reference is JAX itself (``kdface.evaluation.Embedder`` for a trained run, the module's own
forward pass elsewhere); ONNX Runtime must agree to 1e-4 (relative to the output scale) at batch
1 and 3 from one file, which checks that the batch dimension is really dynamic.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

onnx = pytest.importorskip("onnx", reason="ONNX export needs the optional onnx package")
ort = pytest.importorskip("onnxruntime", reason="the checks run the exported file in ONNX Runtime")

from kdface import interop  # noqa: E402
from kdface.interop import UnsupportedExportError, backbone_to_onnx  # noqa: E402

from _tolerance import assert_close, bound  # noqa: E402
from _train_helpers import CLASSES, HW, TINY, labelled_images, tiny_config  # noqa: E402


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _path_terms(model) -> int:
    """The reductions on a forward path through ``model`` (case 4 of tests/_tolerance.py): the
    sum over its conv/linear kernels of their reduction length (k*k*C_in, or the FC's input
    size); the shortcut convs are counted too, so it bounds the longest path from above."""
    kernels = [v for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
               if "kernel" in jax.tree_util.keystr(p) and v.ndim >= 2]
    return int(sum(np.prod(k.shape[:-1]) for k in kernels))


def _tiny_path() -> int:
    """_path_terms of the TINY sphereface_custom student of the trained run."""
    from kdface import models
    return _path_terms(models.create("sphereface_custom", rngs=nnx.Rngs(0), **TINY))


def _assert_match(got, want, *, terms):
    """Two float32 forwards of the same network in another order (case 3/4): ``terms`` is
    2 x the path's reductions; scale = max|want|. Growth is sqrt: with random weights, BN
    statistics and inputs the per-layer rounding errors are independent and of both signs, so
    they add like a random walk (the linear worst case over ~1e5 terms would be ~1e-2 and miss
    a wrong BN epsilon); measured here (CPU, AVX-512) the error is at most 0.12 x that bound."""
    scale = float(np.max(np.abs(want)))
    assert scale > 0
    assert_close(got, want, terms=terms, scale=scale, growth="sqrt")


def _randomize_batch_stats(module, seed=0):
    """Non-trivial BatchNorm running statistics, so eval-mode folding is really exercised."""
    rng = np.random.default_rng(seed)
    stats = nnx.state(module, nnx.BatchStat)
    stats = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(
            rng.uniform(0.5, 1.5, a.shape) if "var" in jax.tree_util.keystr(path)
            else rng.normal(0.0, 0.2, a.shape), jnp.float32), stats)
    nnx.update(module, stats)
    return module


def _ort_vs_jax(module, input_size, *, layout="nchw", optimize=True, batches=(1, 3)):
    model = backbone_to_onnx(module, input_size=input_size, input_layout=layout,
                             optimize=optimize)
    session = _session(model)
    module.eval()
    graphdef, state = nnx.split(module)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    rng = np.random.default_rng(1)
    for b in batches:
        x = rng.uniform(-1, 1, (b, *input_size, 3)).astype(np.float32)
        want = np.asarray(forward(state, jnp.asarray(x)))
        feed = x.transpose(0, 3, 1, 2) if layout == "nchw" else x
        got = session.run(["embedding"], {"input": np.ascontiguousarray(feed)})[0]
        assert got.shape == want.shape
        _assert_match(got, want, terms=2 * _path_terms(module))
    return model


# --- a trained run through the command line ---------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from kdface.training import ArrayBatches, fit
    tmp = tmp_path_factory.mktemp("run")
    images, labels = labelled_images(16)
    config = tiny_config(tmp / "student", steps=2)
    fit(config, ArrayBatches(images, labels, batch_size=8), num_classes=CLASSES)
    return config.workdir


def test_cli_export_of_trained_run_matches_jax_at_batch_1_and_3(trained_run, tmp_path):
    from kdface.evaluation import Embedder
    from kdface.data import normalize_images
    out = tmp_path / "student.onnx"
    # A fresh single-device process (the run was trained on 4 devices here).
    result = subprocess.run(
        [sys.executable, "-m", "kdface.export", f"--checkpoint={trained_run}", "--format=onnx",
         f"--out={out}"], capture_output=True, text=True, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["student"] == "sphereface_custom" and summary["embedding_size"] == 8
    # max|ort - jax| / max|jax| of the TINY student: 2 x its path (see _assert_match)
    assert summary["max_rel_diff"] <= bound(terms=2 * _tiny_path(), scale=1.0, growth="sqrt")

    model = onnx.load(str(out))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, *HW]
    embed = Embedder(trained_run)  # JAX reference: the evaluation path, weights loaded its way
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    for batch in (1, 3):
        images = rng.integers(0, 256, (batch, *HW, 3), dtype=np.uint8)
        feed = normalize_images(images).transpose(0, 3, 1, 2)
        got = session.run(["embedding"], {"input": np.ascontiguousarray(feed)})[0]
        _assert_match(got, embed(images), terms=2 * _tiny_path())

    with pytest.raises(ValueError, match="not an insightface IResNet graph"):
        interop.iresnet_state_from_onnx(str(out))


def test_export_checkpoint_errors(tmp_path, trained_run):
    from kdface.export import export_checkpoint
    with pytest.raises(FileNotFoundError, match="not a kdface training workdir"):
        export_checkpoint(str(tmp_path), str(tmp_path / "x.onnx"))
    with pytest.raises(ValueError, match="format must be one of"):
        export_checkpoint(trained_run, str(tmp_path / "x.tflite"), format="tflite")


# --- the translator on every kind of layer ----------------------------------------------------

def test_layouts_optimizer_and_nhwc_agree_on_sphereface():
    from kdface import models
    net = _randomize_batch_stats(models.create("sphereface_custom", rngs=nnx.Rngs(3), **TINY))
    fast = _ort_vs_jax(net, HW)
    ops = {n.op_type for n in fast.graph.node}
    assert "PRelu" in ops and not ops & {"Where", "GreaterOrEqual", "Sub"}
    plain = _ort_vs_jax(net, HW, layout="nhwc", optimize=False, batches=(2,))
    assert "Where" in {n.op_type for n in plain.graph.node}
    assert sum(n.op_type == "Transpose" for n in fast.graph.node) == 1  # before the flatten


class _SENet(nnx.Module):
    """kdface's own blocks: ConvBN-PReLU, an SE-IResNet unit (SE with PReLU inside), flatten,
    FC + BN (the IResNet head), small enough to compile quickly."""

    def __init__(self, rngs):
        from kdface.models._iresnet import IBasicUnit
        from kdface.models._layers import ConvBN, batch_norm
        self.stem = ConvBN(3, 16, 3, stride=2, rngs=rngs)
        self.unit = IBasicUnit(16, 32, 2, se=True, rngs=rngs)
        self.fc = nnx.Linear(4 * 4 * 32, 8, rngs=rngs)
        self.features = batch_norm(8, use_scale=False, rngs=rngs)

    def __call__(self, x):
        h = self.unit(self.stem(x))
        return self.features(self.fc(h.reshape(h.shape[0], -1)))


def test_kdface_blocks_with_squeeze_excitation():
    model = _ort_vs_jax(_randomize_batch_stats(_SENet(nnx.Rngs(0))), HW)
    # BatchNorms after convolutions fold into them; the unit's first BN (before a convolution)
    # is one Mul + Add; the head's FC + BN are one Gemm; one Transpose, before the flatten.
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops == {"Conv": 6, "PRelu": 3, "Mul": 2, "Add": 2, "ReduceSum": 1, "Unsqueeze": 1,
                   "Div": 1, "Sigmoid": 1, "Transpose": 1, "Reshape": 1, "Gemm": 1,
                   "Identity": 1}


class _Mixed(nnx.Module):
    """Exercises the layout-sensitive translations: strided / dilated / grouped convs,
    concatenate, pad, strided slice, transpose, reductions, broadcasting, batched einsum.
    (``h[:, 1:8:2]`` would be a gather under a symbolic batch, which is not translated.)"""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 6, (3, 3), strides=(2, 2), padding=((1, 1), (0, 1)),
                             rngs=rngs)
        self.dw = nnx.Conv(6, 6, (3, 3), feature_group_count=6, padding="SAME",
                           kernel_dilation=(2, 2), rngs=rngs)
        self.w = nnx.Param(jax.random.normal(rngs.params(), (4 * 7 * 12, 8)) * 0.1)

    def __call__(self, x):
        h = self.dw(self.conv(x))                                       # [B, 8, 8, 6]
        h = jnp.concatenate([jax.nn.relu(h), jax.nn.sigmoid(h) ** 2], axis=-1)
        h = jnp.pad(h, ((0, 0), (1, 0), (0, 1), (0, 0)))                # [B, 9, 9, 12]
        h = jax.lax.slice(h, (0, 1, 0, 0), (h.shape[0], 8, 7, 12), (1, 2, 1, 1))  # [B,4,7,12]
        m = jnp.max(jnp.transpose(h, (0, 2, 1, 3)), axis=1)             # [B, 4, 12]
        s = jnp.mean(h, axis=(1, 2), keepdims=True)                     # [B, 1, 1, 12]
        h = h * jax.lax.rsqrt(s * s + 1.0) - jnp.min(h)
        e = jnp.einsum("bij,bkj->bik", m, m)                            # [B, 4, 4]
        f = jnp.clip(h.reshape(h.shape[0], -1), -0.5, 0.5) @ self.w[...]
        return jnp.concatenate([f, e.reshape(e.shape[0], -1)], axis=1)  # [B, 24]


def test_translator_layout_sensitive_ops():
    _ort_vs_jax(_Mixed(nnx.Rngs(0)), (16, 16))
    _ort_vs_jax(_Mixed(nnx.Rngs(1)), (16, 16), layout="nhwc", batches=(2,))


class _Cumsum(nnx.Module):
    def __call__(self, x):
        return jnp.cumsum(x.reshape(x.shape[0], -1), axis=1)


class _Gather(nnx.Module):
    def __call__(self, x):
        return x[:, ::2].reshape(x.shape[0], -1)


def test_unsupported_primitive_is_named():
    with pytest.raises(UnsupportedExportError, match="cumsum"):
        backbone_to_onnx(_Cumsum(), input_size=(2, 2))
    with pytest.raises(UnsupportedExportError, match="'gather'"):
        backbone_to_onnx(_Gather(), input_size=(4, 2))
    with pytest.raises(ValueError, match="input_layout"):
        backbone_to_onnx(_Cumsum(), input_size=(2, 2), input_layout="chw")
    with pytest.raises(ValueError, match="input_size"):
        backbone_to_onnx(_Cumsum())
