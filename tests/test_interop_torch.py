"""Third-party teachers: PyTorch state dicts (and ONNX files exported from PyTorch) -> kdface.

The reference is an IResNet written here in PyTorch from the ArcFace paper's description of the
improved residual unit (BN-Conv-BN-PReLU-Conv-BN + shortcut, "option E" head BN-FC-BN), with
insightface's parameter names; random weights with non-trivial BatchNorm statistics. Tests that
need PyTorch skip without it (it is in the ``bench`` extra); the reader's safety tests do not.
"""
from __future__ import annotations

import functools
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdface import interop
from kdface.interop import UnsafeTorchPickleError, read_torch_state_dict

from _tolerance import assert_close

UNITS18 = (2, 2, 2, 2)


def _torch():
    return pytest.importorskip("torch", reason="the IResNet reference is written in PyTorch "
                                               "(pip install kdface[bench])")


# --- a PyTorch IResNet in insightface's layout and parameter names --------------------------

def _torch_iresnet(units, *, embedding=512, final_hw=(7, 7), seed=0):
    """``benchmarks.torch_models.IResNet`` (insightface's ``backbones/iresnet.py`` layout) with
    random BN statistics and PReLU slopes, in eval mode."""
    torch = _torch()
    nn = torch.nn
    from benchmarks.torch_models import IResNet

    torch.manual_seed(seed)
    net = IResNet(units, embedding=embedding, final_hw=final_hw)
    g = torch.Generator().manual_seed(seed)
    u = lambda n, lo, hi: lo + (hi - lo) * torch.rand(n, generator=g)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                c = m.num_features
                m.weight.copy_(u(c, 0.5, 1.5))  # also features.weight != 1: exercises the fold
                m.bias.copy_(u(c, -0.2, 0.2))
                m.running_mean.copy_(u(c, -0.2, 0.2))
                m.running_var.copy_(u(c, 0.5, 1.5))
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(u(m.weight.shape[0], 0.0, 0.5))
    return net.eval()


def _torch_embed(net, images_nhwc):
    torch = _torch()
    with torch.no_grad():
        return net(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


@functools.lru_cache(maxsize=4)
def _jitted(graphdef):
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))


def _kdface_embed(model, images):
    """One compile per architecture: models built alike share their graphdef."""
    graphdef, state = nnx.split(model)
    return np.asarray(_jitted(graphdef)(state, jnp.asarray(images)))


def _path_terms(model) -> int:
    """The reductions on a forward path through ``model`` (case 4 of tests/_tolerance.py): the
    sum over its conv/linear kernels of their reduction length (k*k*C_in, or the FC's input
    size); the shortcut convs are counted too, so it bounds the longest path from above."""
    kernels = [v for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
               if "kernel" in jax.tree_util.keystr(p) and v.ndim >= 2]
    return int(sum(np.prod(k.shape[:-1]) for k in kernels))


def _assert_match(got, want, *, terms):
    """Two float32 forwards of the same network in another order (case 3/4): ``terms`` is
    2 x the path's reductions; scale = max|want|. Growth is sqrt: with random weights, BN
    statistics and inputs the per-layer rounding errors are independent and of both signs, so
    they add like a random walk (the linear worst case over ~1e5 terms would be ~1e-2 and miss
    a wrong BN epsilon); measured here (CPU, AVX-512) the error is at most 0.12 x that bound."""
    scale = float(np.max(np.abs(want)))
    assert_close(got, want, terms=terms, scale=scale, growth="sqrt")


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """IResNet-18 at 112x112: the PyTorch net, its .pth, inputs and PyTorch embeddings."""
    net = _torch_iresnet(UNITS18)
    path = str(tmp_path_factory.mktemp("r18") / "backbone.pth")
    _torch().save(net.state_dict(), path)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 112, 112, 3)).astype(np.float32)
    return net, path, images, _torch_embed(net, images)


# --- importing: embeddings match PyTorch -----------------------------------------------------

def test_onnx_iresnet18_matches_pytorch(r18, tmp_path):
    pytest.importorskip("onnx", reason="reading .onnx files needs the onnx package")
    torch = _torch()
    net, _, images, want = r18
    path = str(tmp_path / "r18.onnx")
    torch.onnx.export(net, torch.zeros(1, 3, 112, 112), path, dynamo=False,
                      input_names=["input"], output_names=["embedding"],
                      dynamic_axes={"input": {0: "batch"}})
    arch, model = interop.load_teacher_backbone(f"onnx:iresnet18:{path}")
    assert arch == "iresnet18"
    _assert_match(_kdface_embed(model, images), want, terms=2 * _path_terms(model))


def _torch2onnx(net, path, hw, **legacy):
    """The export of insightface ``arcface_torch/torch2onnx.py`` (``convert_onnx``): one
    normalized random image as the dummy input, its ``torch.onnx.export`` arguments (opset 11
    asked), then the input's batch dimension renamed ``'None'`` and the file saved again.
    ``legacy`` (``dynamo=False``) selects the TorchScript exporter, the default before 2.9."""
    torch = _torch()
    onnx = pytest.importorskip("onnx", reason="reading .onnx files needs the onnx package")
    img = np.random.default_rng(5).integers(0, 255, (*hw, 3)).astype(np.float32)
    img = torch.from_numpy(((img / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)).unsqueeze(0).float()
    torch.onnx.export(net, img, path, input_names=["data"], keep_initializers_as_inputs=False,
                      verbose=False, opset_version=11, **legacy)
    model = onnx.load(path)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "None"
    onnx.save(model, path)
    return model


def test_torch2onnx_exports_of_both_exporters_match_pytorch(tmp_path):
    """insightface's torch2onnx.py under PyTorch >= 2.9 (the torch.export-based exporter folds
    the embedding BatchNorm ``features`` into the FC Gemm and writes opset 18) and under the
    TorchScript exporter (BN kept): both import and embed as the PyTorch net."""
    pytest.importorskip("onnxscript", reason="PyTorch's default ONNX exporter needs onnxscript "
                                             "(the hand-folded test below runs without it)")
    hw = (16, 16)
    net = _torch_iresnet(UNITS18, embedding=16, final_hw=(1, 1), seed=3)
    images = np.random.default_rng(1).uniform(-1, 1, (3, *hw, 3)).astype(np.float32)
    want = _torch_embed(net, images)
    graphs = {}
    for name, legacy in (("dynamo", {}), ("torchscript", {"dynamo": False})):
        path = str(tmp_path / f"{name}.onnx")
        graphs[name] = _torch2onnx(net, path, hw, **legacy)
        arch, model = interop.load_teacher_backbone(f"onnx:{path}", input_size=hw)
        assert arch == "iresnet18"
        _assert_match(_kdface_embed(model, images), want, terms=2 * _path_terms(model))
    # The two graph shapes the importer must accept really differ as described.
    last = {name: [n.op_type for n in g.graph.node][-1] for name, g in graphs.items()}
    assert last == {"dynamo": "Gemm", "torchscript": "BatchNormalization"}
    assert graphs["dynamo"].opset_import[0].version >= 18


def test_embedding_bn_folded_by_hand_into_the_gemm_imports(tmp_path):
    """The folded head without the new exporter: the TorchScript export with its last
    BatchNorm folded into the Gemm here (W' = s W, b' = s (b - mean) + beta, s = gamma /
    sqrt(var + eps)) and removed, the Gemm now the graph output."""
    onnx = pytest.importorskip("onnx", reason="reading .onnx files needs the onnx package")
    from onnx import numpy_helper
    hw = (16, 16)
    net = _torch_iresnet(UNITS18, embedding=16, final_hw=(1, 1), seed=6)
    path = str(tmp_path / "folded.onnx")
    model = _torch2onnx(net, path, hw, dynamo=False)
    graph = model.graph
    bn, gemm = graph.node[-1], graph.node[-2]
    assert (bn.op_type, gemm.op_type) == ("BatchNormalization", "Gemm")
    init = {t.name: t for t in graph.initializer}
    arr = lambda name: numpy_helper.to_array(init[name]).astype(np.float64)  # noqa: E731
    eps = next(a.f for a in bn.attribute if a.name == "epsilon")
    scale = arr(bn.input[1]) / np.sqrt(arr(bn.input[4]) + eps)
    folded = {gemm.input[1]: arr(gemm.input[1]) * scale[:, None],
              gemm.input[2]: (arr(gemm.input[2]) - arr(bn.input[3])) * scale + arr(bn.input[2])}
    for name, value in folded.items():
        init[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    gemm.output[0] = bn.output[0]
    graph.node.remove(bn)
    onnx.save(model, path)
    images = np.random.default_rng(1).uniform(-1, 1, (3, *hw, 3)).astype(np.float32)
    _, imported = interop.load_teacher_backbone(f"onnx:iresnet18:{path}", input_size=hw)
    _assert_match(_kdface_embed(imported, images), _torch_embed(net, images),
                  terms=2 * _path_terms(imported))


def test_folded_head_refuses_what_is_not_an_iresnet(tmp_path):
    """An FC followed by something other than the embedding BN (here a ReLU before the output)
    is not an IResNet head: refused with the node named, not read with the ReLU dropped."""
    onnx = pytest.importorskip("onnx", reason="reading .onnx files needs the onnx package")
    from onnx import helper
    hw = (16, 16)
    net = _torch_iresnet(UNITS18, embedding=16, final_hw=(1, 1), seed=3)
    path = str(tmp_path / "ts.onnx")
    model = _torch2onnx(net, path, hw, dynamo=False)
    graph = model.graph
    bn = graph.node[-1]
    assert bn.op_type == "BatchNormalization"
    relu = helper.make_node("Relu", [bn.input[0]], [bn.output[0]], name="extra_relu")
    graph.node.remove(bn)
    graph.node.append(relu)
    onnx.save(model, path)
    with pytest.raises(ValueError, match=r"not an insightface IResNet graph.*embedding "
                                         r"BatchNorm.*Relu"):
        interop.load_teacher_backbone(f"onnx:iresnet18:{path}", input_size=hw)
    # Without the arch it is any ONNX graph: read as it is, the ReLU kept.
    arch, general = interop.load_teacher_backbone(f"onnx:{path}", input_size=hw)
    assert arch == "onnx_graph" and isinstance(general, interop.OnnxGraphBackbone)
    images = np.random.default_rng(1).uniform(-1, 1, (3, *hw, 3)).astype(np.float32)
    got = _kdface_embed(general, images)
    ort = pytest.importorskip("onnxruntime", reason="the graph's reference is ONNX Runtime")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    want = session.run(None, {"data": images.transpose(0, 3, 1, 2).copy()})[0]
    assert np.any(want == 0) and np.all(got >= 0)
    weights = [w[...] for w in general.weights]  # conv [O, I, k, k], FC [E, C] or [C, E]
    path = sum(int(np.prod(w.shape[1:])) for w in weights if w.ndim == 4)
    path += max(max(w.shape) for w in weights if w.ndim == 2)
    _assert_match(got, want, terms=2 * path)


def test_arcface_torch_resume_checkpoint_loads_its_backbone(tmp_path):
    """arcface_torch's train loop saves ``checkpoint_gpu_<rank>.pt``: epoch and step counters,
    the backbone's and the partial-FC classifier's state dicts, the SGD optimizer's and the
    polynomial LR scheduler's states (and an AMP grad scaler's). ``pth:`` reads its backbone."""
    torch = _torch()
    hw = (16, 16)
    net = _torch_iresnet(UNITS18, embedding=16, final_hw=(1, 1), seed=4)
    partial_fc = torch.nn.Module()
    partial_fc.weight = torch.nn.Parameter(torch.randn(10, 16) * 0.01)
    opt = torch.optim.SGD([{"params": net.parameters()}, {"params": partial_fc.parameters()}],
                          lr=0.1, momentum=0.9, weight_decay=5e-4)

    class PolynomialLRWarmup(torch.optim.lr_scheduler.LRScheduler):
        def __init__(self, optimizer, warmup_iters, total_iters, power=2, last_epoch=-1):
            self.warmup_iters, self.total_iters, self.power = warmup_iters, total_iters, power
            super().__init__(optimizer, last_epoch)

        def get_lr(self):
            return [b * (1 - self.last_epoch / self.total_iters) ** self.power
                    for b in self.base_lrs]

    scheduler = PolynomialLRWarmup(opt, warmup_iters=1, total_iters=10)
    x = torch.from_numpy(np.random.default_rng(2).uniform(-1, 1, (4, 3, *hw)).astype(np.float32))
    loss = (net.train()(x) @ partial_fc.weight.t()).square().mean()
    loss.backward()
    opt.step()
    scheduler.step()
    net.eval()
    checkpoint = {"epoch": 1, "global_step": 1,
                  "state_dict_backbone": net.state_dict(),
                  "state_dict_softmax_fc": partial_fc.state_dict(),
                  "state_optimizer": opt.state_dict(),
                  "state_lr_scheduler": scheduler.state_dict(),
                  "grad_amp": torch.amp.GradScaler("cpu", growth_interval=100).state_dict()}
    path = str(tmp_path / "checkpoint_gpu_0.pt")
    torch.save(checkpoint, path)
    state = read_torch_state_dict(path)
    assert sorted(state) == sorted(net.state_dict())
    images = np.random.default_rng(1).uniform(-1, 1, (2, *hw, 3)).astype(np.float32)
    arch, model = interop.load_teacher_backbone(f"pth:{path}", input_size=hw)
    assert arch == "iresnet18"
    _assert_match(_kdface_embed(model, images), _torch_embed(net, images),
                  terms=2 * _path_terms(model))
    torch.save({"epoch": 1, "state_optimizer": opt.state_dict()}, path)
    with pytest.raises(ValueError, match="no backbone state dict.*state_dict_backbone"):
        read_torch_state_dict(path)


def test_read_torch_state_dict_equals_torch_load(tmp_path):
    torch = _torch()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"t": base.t(), "view": base[1:, 2:], "half": torch.randn(5).half(),
               "bf16": torch.randn(3).bfloat16(), "step": torch.tensor(7),
               "mask": torch.tensor([True, False])}
    path = tmp_path / "sd.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tensors.items()}, "epoch": 3}, path)
    got = read_torch_state_dict(path)
    assert sorted(got) == sorted(tensors)
    for k, v in tensors.items():
        want = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
        assert got[k].dtype == want.dtype, k
        np.testing.assert_array_equal(got[k], want)


def test_legacy_format_goes_through_torch_weights_only(tmp_path):
    torch = _torch()
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
    np.testing.assert_array_equal(read_torch_state_dict(path)["w"], [0.0, 1.0, 2.0])
    evil = tmp_path / "evil_legacy.pth"
    marker = tmp_path / "pwned_legacy"
    evil.write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(UnsafeTorchPickleError):
        read_torch_state_dict(evil)
    assert not marker.exists()


# --- the teacher inside the trainer ------------------------------------------------------------

def test_pth_teacher_matches_pytorch_through_build_teacher(r18):
    """``--teacher=pth:PATH``: the trainer's teacher embeds as the PyTorch net, zero logits."""
    from kdface.training import TrainConfig
    from kdface.training._networks import build_teacher
    from kdface.training._plan import DataFacts, plan_fit
    net, path, images, want = r18
    assert want.shape == (2, 512) and float(np.std(want)) > 1e-2  # a non-degenerate output
    assert interop.infer_iresnet_arch(read_torch_state_dict(path)) == "iresnet18"
    config = TrainConfig(workdir="unused", recipe="vargface", teacher=f"onnx:{path}")

    def build(config):  # the plan, then the loop's teacher
        return build_teacher(plan_fit(config, data=DataFacts(5), devices=1))

    with pytest.raises(ValueError, match="PyTorch file|ONNX"):
        build(config)  # a .pth given as onnx: is not readable as ONNX
    teacher = build(config.replace(teacher=f"pth:{path}"))
    embedding = _kdface_embed(teacher.backbone, images)
    _assert_match(embedding, want, terms=2 * _path_terms(teacher.backbone))
    np.testing.assert_array_equal(np.asarray(teacher.head(jnp.asarray(embedding))),
                                  np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError,
                       match=r"term 'soft_prediction', weight 0\.5.*no classifier head"):
        build(config.replace(teacher=f"pth:{path}", recipe="kd_im", lambda_soft=0.5))


def test_imported_teacher_trains_kd_im_and_refuses_teacher_logits(tmp_path):
    from kdface.training import ArrayBatches, TrainConfig, fit
    hw = (16, 16)  # IResNet strides 16: a 1x1 final map
    net = _torch_iresnet(UNITS18, embedding=16, final_hw=(1, 1), seed=1)
    path = str(tmp_path / "teacher.pth")
    _torch().save(net.state_dict(), path)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (16, *hw, 3)).astype(np.float32)
    labels = np.arange(16) % 4
    tiny = {"channels": (4, 8, 8, 8), "units": (0, 1, 0, 0), "embedding_size": 16,
            "input_size": hw}
    # Wang et al. 2019 KD_im with the soft (logit) term off: hard loss + normalized-feature term.
    config = TrainConfig(workdir=str(tmp_path / "run"), recipe="kd_im",
                         student="sphereface_custom", student_options=tiny,
                         teacher=f"pth:iresnet18:{path}", feature_loss="normalized_l2",
                         lambda_soft=0.0, head="cosface", margin_scale=16.0, margin=0.1,
                         input_size=hw, batch_size=8, steps=2, learning_rate=0.01,
                         schedule="constant", save_every=2, log_every=1,
                         async_checkpoints=False, progress=False)
    summary = fit(config, ArrayBatches(images, labels, batch_size=8), num_classes=4)
    assert summary["step"] == 2
    assert np.isfinite(summary["metrics"]["normalized_l2"]) and summary["metrics"]["loss"] > 0
    with pytest.raises(ValueError, match="no classifier head"):
        fit(config.replace(workdir=str(tmp_path / "kd"), lambda_soft=1.0),
            ArrayBatches(images, labels, batch_size=8), num_classes=4)
    with pytest.raises(ValueError, match="teacher_options"):
        fit(config.replace(workdir=str(tmp_path / "opt"), teacher_options={"dropout": 0.1}),
            ArrayBatches(images, labels, batch_size=8), num_classes=4)


# --- errors ------------------------------------------------------------------------------------

def _insightface_state(units, *, embedding=8, final_hw=(1, 1), seed=0):
    """insightface iresnet.py keys and shapes (from the layer list), random values."""
    rng = np.random.default_rng(seed)
    state = {}

    def bn(prefix, c):
        for name in ("weight", "bias", "running_mean"):
            state[f"{prefix}.{name}"] = rng.normal(size=c).astype(np.float32)
        state[f"{prefix}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        state[f"{prefix}.num_batches_tracked"] = np.asarray(5, np.int64)

    state["conv1.weight"] = rng.normal(size=(64, 3, 3, 3)).astype(np.float32)
    bn("bn1", 64)
    state["prelu.weight"] = np.full(64, 0.25, np.float32)
    cin = 64
    for layer, (planes, n) in enumerate(zip((64, 128, 256, 512), units), start=1):
        for i in range(n):
            p = f"layer{layer}.{i}"
            bn(f"{p}.bn1", cin)
            state[f"{p}.conv1.weight"] = rng.normal(size=(planes, cin, 3, 3)).astype(np.float32)
            bn(f"{p}.bn2", planes)
            state[f"{p}.prelu.weight"] = np.full(planes, 0.25, np.float32)
            state[f"{p}.conv2.weight"] = rng.normal(size=(planes, planes, 3, 3)).astype(
                np.float32)
            bn(f"{p}.bn3", planes)
            if i == 0:
                state[f"{p}.downsample.0.weight"] = rng.normal(size=(planes, cin, 1, 1)).astype(
                    np.float32)
                bn(f"{p}.downsample.1", planes)
            cin = planes
    bn("bn2", 512)
    state["fc.weight"] = rng.normal(size=(embedding, 512 * final_hw[0] * final_hw[1])).astype(
        np.float32)
    state["fc.bias"] = np.zeros(embedding, np.float32)
    bn("features", embedding)
    return state


def test_complete_state_dict_loads_and_infers_depth():
    state = _insightface_state(UNITS18)
    arch, model = interop.iresnet_from_state_dict(state, input_size=(16, 16))
    assert arch == "iresnet18" and model.embedding_size == 8
    np.testing.assert_array_equal(np.asarray(model.stem_conv.kernel[...]),
                                  state["conv1.weight"].transpose(2, 3, 1, 0))
    assert interop.infer_iresnet_arch(_insightface_state((3, 4, 6, 3))) == "iresnet34"


def test_missing_and_unexpected_tensors_are_listed():
    state = _insightface_state(UNITS18)
    del state["layer2.0.bn1.running_var"]
    del state["features.weight"]
    state["head.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as err:
        interop.iresnet_from_state_dict(state, input_size=(16, 16), source="x.pth")
    message = str(err.value)
    assert "missing tensors (2)" in message and "layer2.0.bn1.running_var" in message
    assert "features.weight" in message
    assert "unexpected tensors (1): head.weight" in message


def test_shape_mismatch_names_fc_and_input_size():
    state = _insightface_state(UNITS18)
    with pytest.raises(ValueError, match=r"fc\.weight: file \(8, 512\), network \(8, 25088\)"):
        interop.iresnet_from_state_dict(state, input_size=(112, 112))
    state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"][:, :, :1]
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight: file \(64, 64, 1, 3\)"):
        interop.iresnet_from_state_dict(state, input_size=(16, 16))


def test_wrong_arch_and_non_iresnet_refused():
    state = _insightface_state(UNITS18)
    with pytest.raises(ValueError, match="asked for iresnet50 but the tensors are those of "
                                         "iresnet18"):
        interop.iresnet_from_state_dict(state, arch="iresnet50", input_size=(16, 16))
    with pytest.raises(ValueError, match="match no insightface IResNet"):
        interop.iresnet_from_state_dict({"conv1.weight": np.zeros((64, 3, 3, 3))})


def test_teacher_spec_parsing():
    assert interop.parse_teacher_spec("pth:/a/b.pth") == ("pth", None, "/a/b.pth")
    assert interop.parse_teacher_spec("onnx:iresnet100:/a:b.onnx") == (
        "onnx", "iresnet100", "/a:b.onnx")
    assert interop.parse_teacher_spec("pth:C:/w.pth") == ("pth", None, "C:/w.pth")
    assert interop.is_imported_teacher("onnx:/m.onnx")
    assert not interop.is_imported_teacher("iresnet50")
    with pytest.raises(ValueError, match="unknown arch 'iresnet7'"):
        interop.parse_teacher_spec("pth:iresnet7:/a.pth")
    with pytest.raises(ValueError, match="names no file"):
        interop.parse_teacher_spec("pth:")
    with pytest.raises(ValueError, match="pth:\\[ARCH:\\]PATH"):
        interop.parse_teacher_spec("iresnet50")


# --- the reader without PyTorch: hand-assembled pickles --------------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _unicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tensor_pickle(size: int, stride: int) -> bytes:
    """Protocol-2 opcodes of ``{'w': _rebuild_tensor_v2(storage 0, 0, (size,), (stride,),
    False, OrderedDict())}``, as torch.save writes them."""
    storage = (b"(" + _unicode("storage") + _global("torch", "FloatStorage") + _unicode("0")
               + _unicode("cpu") + b"K\x04" + b"tQ")
    args = (b"(" + storage + b"K\x00" + b"K" + bytes([size]) + b"\x85" + b"M"
            + struct.pack("<H", stride) + b"\x85" + b"\x89"
            + _global("collections", "OrderedDict") + b")R" + b"t")
    return (b"\x80\x02}" + _unicode("w") + _global("torch._utils", "_rebuild_tensor_v2")
            + args + b"Rs.")


def _archive(path, pickled: bytes, storage: bytes = b"") -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", storage)


def test_hand_assembled_state_dict_reads_without_torch(tmp_path):
    path = tmp_path / "ok.pth"
    _archive(path, _tensor_pickle(2, 3), np.arange(4, dtype="<f4").tobytes())
    got = read_torch_state_dict(path)
    np.testing.assert_array_equal(got["w"], [0.0, 3.0])


def test_out_of_bounds_strides_refused(tmp_path):
    path = tmp_path / "oob.pth"
    _archive(path, _tensor_pickle(4, 1000), np.arange(4, dtype="<f4").tobytes())
    with pytest.raises(UnsafeTorchPickleError, match="reaching element 3000"):
        read_torch_state_dict(path)


def test_malicious_pickle_refused_without_side_effect(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _archive(path, pickle.dumps(_Evil(str(marker)), protocol=2))
    with pytest.raises(UnsafeTorchPickleError, match="refusing the global posix.system|"
                                                     "refusing the global os.system"):
        read_torch_state_dict(path)
    assert not marker.exists()
    # BUILD (setting state) is allowed on dicts only (a state dict's _metadata) ...
    sneaky = b"\x80\x02" + _global("collections", "OrderedDict") + b")R}" + b"b."
    _archive(path, sneaky)
    with pytest.raises(ValueError, match="holds no tensors"):
        read_torch_state_dict(path)
    # ... never on the allowed helper functions themselves.
    builder = b"\x80\x02" + _global("torch._utils", "_rebuild_tensor_v2") + b"}b."
    _archive(path, builder)
    with pytest.raises(UnsafeTorchPickleError, match="BUILD"):
        read_torch_state_dict(path)


def test_import_kdface_interop_needs_neither_torch_nor_onnx():
    code = ("import sys, kdface.interop, kdface.export; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', "
            "'onnxruntime')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
