"""The general ONNX teacher: any face-recognition graph interpreted in JAX (kdface.interop).

The reference is ONNX Runtime running the same file. Graphs: two written here node by node
(every op of the table the face models use, NCHW with a dynamic batch and NHWC with the batch
fixed at 1), insightface-style MobileFaceNet and IResNet networks exported by both PyTorch
exporters, and OpenCV Zoo's int8 SFace in the trainer's and the evaluator's teacher paths (on
real photographs in tests/test_real_faces.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from flax import nnx
from onnx import TensorProto, helper, numpy_helper

from kdface import interop

from _real_faces import SFACE, model_path
from _tolerance import assert_close


def _forward(backbone, images):
    graph, state = nnx.split(backbone)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graph, s)(x))(state, jnp.asarray(images)))


def _session(model_or_path):
    data = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _path_terms(backbone) -> int:
    """The reductions along the graph's longest path, bounded by the sum of each weight's
    reduction length (conv ``[O, I/g, k, k]``: I/g*k*k; matrix: its longer side)."""
    terms = 0
    for w in backbone.weights:
        shape = w[...].shape
        terms += int(np.prod(shape[1:])) if len(shape) == 4 else max(shape) if len(shape) == 2 \
            else 1
    return terms


def _assert_match(got, want, backbone):
    """Two float32 evaluations of one graph in another order: the rule of tests/_tolerance.py
    with 2 x the path's reductions, sqrt growth (random weights and inputs: independent
    rounding errors of both signs), scale max|want|."""
    assert got.shape == want.shape
    assert_close(got, want, terms=2 * _path_terms(backbone), scale=float(np.max(np.abs(want))),
                 growth="sqrt")


def _init(rng, name, shape, scale=0.3, dtype=np.float32):
    return numpy_helper.from_array((rng.normal(0, scale, shape)).astype(dtype), name)


def _coverage_graph(rng) -> onnx.ModelProto:
    """NCHW ``[N, 3, 16, 16]`` (N dynamic) -> ``[N, 16]`` through the op table's face-model ops:
    Sub/Mul input normalization, QuantizeLinear + DequantizeLinear (per axis) conv weights,
    strided / asymmetrically padded / depthwise dilated Conv, BatchNormalization, PRelu, Relu,
    Sigmoid, Concat, MaxPool, AveragePool (count_include_pad 0), Pad, Div by a Constant,
    Transpose, GlobalAveragePool, Shape -> Gather -> Unsqueeze -> Concat -> Reshape, Dropout,
    Identity, MatMul + Add, Flatten, Gemm (transB, alpha, beta)."""
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    scales = (np.abs(w1).reshape(8, -1).max(1) / 127).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.asarray([[[[120.0]], [[128.0]], [[110.0]]]], np.float32),
                                "mean"),
        numpy_helper.from_array(np.asarray(1 / 128, np.float32), "inv_std"),
        numpy_helper.from_array(w1, "w1_float"), numpy_helper.from_array(scales, "w1_scale"),
        numpy_helper.from_array(np.zeros(8, np.int8), "w1_zp"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_scale"),
        _init(rng, "bn_bias", (8,), 0.2), _init(rng, "bn_mean", (8,), 0.2),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_var"),
        numpy_helper.from_array(rng.uniform(0, 0.5, (8, 1, 1)).astype(np.float32), "slope"),
        _init(rng, "w_dw", (8, 1, 3, 3)), _init(rng, "w_pw", (8, 16, 1, 1)),
        _init(rng, "b_pw", (8,), 0.1),
        numpy_helper.from_array(np.asarray([0, 0, 1, 0, 0, 0, 0, 1], np.int64), "pads"),
        numpy_helper.from_array(np.asarray([-1], np.int64), "minus_one"),
        numpy_helper.from_array(np.asarray(0, np.int64), "zero"),
        numpy_helper.from_array(np.asarray([0], np.int64), "axes0"),
        _init(rng, "w_mm", (200, 12), 0.1), _init(rng, "b_mm", (12,), 0.1),
        _init(rng, "w_gemm", (4, 8)), _init(rng, "b_gemm", (4,), 0.1),
        _init(rng, "shift", (16,), 0.1),
    ]
    n = helper.make_node
    nodes = [
        n("Sub", ["data", "mean"], ["centered"]), n("Mul", ["centered", "inv_std"], ["x"]),
        n("QuantizeLinear", ["w1_float", "w1_scale", "w1_zp"], ["w1_q"], axis=0),
        n("DequantizeLinear", ["w1_q", "w1_scale", "w1_zp"], ["w1"], axis=0),
        n("Conv", ["x", "w1"], ["c1"], strides=[2, 2], pads=[1, 0, 1, 1], kernel_shape=[3, 3]),
        n("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"],
          epsilon=1e-3),
        n("PRelu", ["bn", "slope"], ["p1"]),
        n("Conv", ["p1", "w_dw"], ["dw"], group=8, pads=[2, 2, 2, 2], dilations=[2, 2]),
        n("Relu", ["dw"], ["r"]), n("Sigmoid", ["dw"], ["s"]),
        n("Concat", ["r", "s"], ["cat"], axis=1),
        n("MaxPool", ["cat"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
        n("AveragePool", ["mp"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
          count_include_pad=0),
        n("Add", ["mp", "ap"], ["pooled"]),
        n("Pad", ["pooled", "pads"], ["padded"]),
        n("Conv", ["padded", "w_pw", "b_pw"], ["pw"]),
        n("Constant", [], ["two"], value=numpy_helper.from_array(np.asarray(2.0, np.float32))),
        n("Div", ["pw", "two"], ["half"]),
        n("Transpose", ["half"], ["nhwc"], perm=[0, 2, 3, 1]),
        n("Shape", ["nhwc"], ["shape"]), n("Gather", ["shape", "zero"], ["rows"], axis=0),
        n("Unsqueeze", ["rows", "axes0"], ["rows1"]),
        n("Concat", ["rows1", "minus_one"], ["flat_shape"], axis=0),
        n("Reshape", ["nhwc", "flat_shape"], ["flat"]),
        n("Dropout", ["flat"], ["dropped"]), n("Identity", ["dropped"], ["same"]),
        n("MatMul", ["same", "w_mm"], ["mm"]), n("Add", ["mm", "b_mm"], ["fc1"]),
        n("GlobalAveragePool", ["half"], ["gap"]), n("Flatten", ["gap"], ["gap_flat"]),
        n("Gemm", ["gap_flat", "w_gemm", "b_gemm"], ["fc2"], transB=1, alpha=0.5, beta=2.0),
        n("Concat", ["fc1", "fc2"], ["both"], axis=1),
        n("Sub", ["both", "shift"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes, "coverage",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_every_face_model_op_matches_onnxruntime(tmp_path):
    model = _coverage_graph(np.random.default_rng(0))
    path = str(tmp_path / "coverage.onnx")
    onnx.save(model, path)
    arch, backbone = interop.load_teacher_backbone(f"onnx:{path}", input_size=(16, 16))
    assert arch == "onnx_graph" and backbone.embedding_size == 16
    c = backbone.contract
    # the graph subtracts ~120 and scales by 1/128 itself: it is fed raw 0..255 pixels, RGB
    assert (c.size, c.layout, c.order, c.mean, c.std) == ((16, 16), "nchw", "rgb", (0.0,) * 3,
                                                          (1.0,) * 3)
    assert dict(c.origin) == {"size": "graph", "layout": "graph", "order": "default",
                              "mean": "graph", "std": "graph"}
    ops = {node.op for node in backbone.program.nodes}
    assert not ops & {"QuantizeLinear", "DequantizeLinear", "Constant"}  # folded at load
    pixels = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
    x = pixels.astype(np.float32) / 127.5 - 1.0  # kdface's input
    want = _session(model).run(None, {"data": pixels.astype(np.float32).transpose(0, 3, 1, 2)})[0]
    _assert_match(_forward(backbone, x), want, backbone)


def _nhwc_batch1_graph(rng) -> onnx.ModelProto:
    """NHWC ``[1, 16, 16, 3]`` -> Transpose -> Conv -> Relu -> Reshape ``[1, -1]`` -> Gemm: the
    shape a TensorFlow conversion writes, batch fixed at 1."""
    n = helper.make_node
    inits = [_init(rng, "w", (4, 3, 3, 3)), _init(rng, "fc", (1024, 6), 0.05),
             numpy_helper.from_array(np.asarray([1, -1], np.int64), "flat")]
    nodes = [n("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
             n("Conv", ["nchw", "w"], ["c"], pads=[1, 1, 1, 1]), n("Relu", ["c"], ["r"]),
             n("Reshape", ["r", "flat"], ["f"]), n("Gemm", ["f", "fc"], ["out"])]
    graph = helper.make_graph(
        nodes, "nhwc", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 16, 16, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_nhwc_graph_of_batch_one_runs_batched(tmp_path):
    model = _nhwc_batch1_graph(np.random.default_rng(2))
    path = str(tmp_path / "nhwc.onnx")
    onnx.save(model, path)
    backbone = interop.onnx_graph_backbone(path)
    c = backbone.contract
    assert (c.layout, c.mean, c.std) == ("nhwc", (127.5,) * 3, (127.5,) * 3)  # insightface's
    x = np.random.default_rng(3).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    session = _session(model)
    want = np.concatenate([session.run(None, {"image": x[i:i + 1]})[0] for i in range(3)])
    _assert_match(_forward(backbone, x), want, backbone)
    # the contract options: BGR, another normalization, stated in the spec
    _, bgr = interop.load_teacher_backbone(f"onnx:order=bgr,mean=127.5,std=128:{path}",
                                           input_size=(16, 16))
    assert (bgr.contract.order, bgr.contract.std) == ("bgr", (128.0,) * 3)
    feed = ((x[..., ::-1] + 1) * 127.5 - 127.5) / 128
    want = np.concatenate([session.run(None, {"image": feed[i:i + 1].astype(np.float32)})[0]
                           for i in range(3)])
    _assert_match(_forward(bgr, x), want, bgr)
    with pytest.raises(ValueError, match="takes 16x16 images, the run feeds 112x112"):
        interop.load_teacher_backbone(f"onnx:{path}", input_size=(112, 112))


def test_unsupported_ops_and_inputs_are_one_line_errors(tmp_path):
    n = helper.make_node
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])
    for name, node, inputs in (
            ("lrn", n("LRN", ["x"], ["y"], name="norm_7", size=3), [x]),
            ("ms", n("FusedConv", ["x"], ["y"], name="fused", domain="com.microsoft"), [x])):
        model = helper.make_model(helper.make_graph([node], name, inputs, [y]))
        path = str(tmp_path / f"{name}.onnx")
        onnx.save(model, path)
        with pytest.raises(ValueError) as err:
            interop.load_teacher_backbone(f"onnx:{path}")
        assert "\n" not in str(err.value)
        assert f"ONNX op {node.op_type}" in str(err.value) and repr(node.name) in str(err.value)
    two = helper.make_graph([n("Add", ["x", "z"], ["y"])], "two",
                            [x, helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])], [y])
    path = str(tmp_path / "two.onnx")
    onnx.save(helper.make_model(two), path)
    with pytest.raises(ValueError, match=r"expected one image input.*\['x', 'z'\]"):
        interop.onnx_graph_backbone(path)
    with pytest.raises(ValueError, match="unknown arch"):
        interop.parse_teacher_spec(f"onnx:iresnet7:{path}")
    with pytest.raises(ValueError, match="options .* apply to onnx"):
        interop.parse_teacher_spec(f"pth:order=bgr:{path}")


def _torch_exports(net, path_stem, hw):
    """The network exported by ``torch.onnx.export`` as insightface's torch2onnx does, with the
    TorchScript exporter (batch dynamic) and the torch.export-based one (opset 18, batch 1)."""
    import torch
    dummy = torch.zeros(1, 3, *hw)
    out = {}
    legacy = f"{path_stem}_legacy.onnx"
    torch.onnx.export(net, dummy, legacy, dynamo=False, input_names=["data"],
                      output_names=["embedding"], dynamic_axes={"data": {0: "batch"}},
                      opset_version=11)
    out["legacy"] = legacy
    dynamo = f"{path_stem}_dynamo.onnx"
    torch.onnx.export(net, dummy, dynamo, input_names=["data"], output_names=["embedding"])
    out["dynamo"] = dynamo
    return out


def _randomized(net, seed):
    """Eval mode with non-trivial BatchNorm statistics and PReLU slopes."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.rand(c, generator=g) - 0.1)
                m.running_mean.copy_(0.2 * torch.rand(c, generator=g) - 0.1)
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            elif isinstance(m, torch.nn.PReLU):
                m.weight.copy_(0.5 * torch.rand(m.weight.shape, generator=g))
    return net.eval()


def test_torch_exported_mobilefacenet_and_iresnet_load_through_the_general_path(tmp_path):
    """insightface-style MobileFaceNet (depthwise convs, GDC, linear + BN1d head) and IResNet,
    each from both exporters: the general graph teacher equals ONNX Runtime on the file; the
    IResNet read as a general graph (``onnx:graph:``) equals the IResNet import."""
    torch = pytest.importorskip("torch", reason="the exports need PyTorch (the bench extra)")
    from benchmarks.torch_models import IResNet, MobileFaceNet
    torch.manual_seed(0)
    nets = {"mbf": (_randomized(MobileFaceNet(embedding_size=32, blocks=(1, 1, 1, 1)), 1),
                    (112, 112)),
            "r18": (_randomized(IResNet((2, 2, 2, 2), embedding=16, final_hw=(1, 1)), 2),
                    (16, 16))}
    rng = np.random.default_rng(4)
    for name, (net, hw) in nets.items():
        x = rng.uniform(-1, 1, (2, *hw, 3)).astype(np.float32)
        feed = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        for exporter, path in _torch_exports(net, str(tmp_path / name), hw).items():
            spec = f"onnx:graph:{path}" if name == "r18" else f"onnx:{path}"
            arch, backbone = interop.load_teacher_backbone(spec, input_size=hw)
            assert arch == "onnx_graph", (name, exporter)
            session = _session(path)
            want = np.concatenate([session.run(None, {"data": feed[i:i + 1]})[0]
                                   for i in range(len(x))])
            got = _forward(backbone, x)
            _assert_match(got, want, backbone)
            if name == "r18":
                arch, iresnet = interop.load_teacher_backbone(f"onnx:{path}", input_size=hw)
                assert arch == "iresnet18"
                _assert_match(got, _forward(iresnet, x), backbone)


def test_sface_is_a_teacher_for_the_trainer_and_the_evaluator():
    """``--teacher=onnx:SFACE`` builds the frozen teacher (zero logits head, 128-d embeddings)
    and ``evaluate --runs=sface=onnx:SFACE`` embeds with the same numbers; a recipe reading the
    teacher's stages is refused before anything compiles."""
    from kdface.evaluation import TeacherEmbedder
    from kdface.training import TrainConfig
    from kdface.training._networks import build_teacher
    from kdface.training._plan import DataFacts, plan_fit
    spec = f"onnx:{model_path(SFACE)}"
    config = TrainConfig(workdir="unused", recipe="pwr", teacher=spec)
    teacher = build_teacher(plan_fit(config, data=DataFacts(5), devices=1))
    assert isinstance(teacher.backbone, interop.OnnxGraphBackbone)
    assert teacher.backbone.embedding_size == 128
    images = np.random.default_rng(5).integers(0, 256, (3, 112, 112, 3)).astype(np.uint8)
    x = images.astype(np.float32) / 127.5 - 1.0
    graph, state = nnx.split(teacher)
    out = jax.jit(lambda s, v: nnx.merge(graph, s)(v))(state, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(out["logits"]), np.zeros((3, 5), np.float32))
    embedder = TeacherEmbedder(spec, batch_size=4)
    assert embedder.input_size == (112, 112) and embedder.embedding_size == 128
    want = embedder.outputs(images)["embedding"]
    assert_close(np.asarray(out["embedding"]), want, terms=2 * _path_terms(teacher.backbone),
                 scale=float(np.max(np.abs(want))), growth="sqrt")
    with pytest.raises(ValueError, match="stage features"):
        build_teacher(plan_fit(config.replace(recipe="shrinktea"), data=DataFacts(5),
                               devices=1))


def test_graph_teacher_distils_a_student(tmp_path):
    """``--teacher=onnx:PATH`` with a general graph (the NHWC one, 16x16) in the trainer's
    data-parallel step: two PWR steps (Nikitin et al. 2020, ranking of the teacher's pair
    scores) train."""
    from kdface.training import ArrayBatches, fit
    from _train_helpers import CLASSES, labelled_images, tiny_config
    path = str(tmp_path / "teacher.onnx")
    onnx.save(_nhwc_batch1_graph(np.random.default_rng(6)), path)
    images, labels = labelled_images(16)
    config = tiny_config(tmp_path / "run", recipe="pwr", teacher=f"onnx:{path}", steps=2)
    summary = fit(config, ArrayBatches(images, labels, batch_size=8), num_classes=CLASSES)
    assert summary["step"] == 2
    assert np.isfinite(summary["metrics"]["pwr"]) and summary["metrics"]["loss"] > 0


def test_depthwise_by_shifts_equals_the_grouped_convolution():
    """The CPU form of a depthwise Conv (strided slices times per-channel weights) against
    XLA's grouped convolution, which the other backends run: strides, dilations, asymmetric
    pads. Both sum the same k*k products per output in another order (case 3 of the rule)."""
    from kdface.interop._onnx_layer_ops import _depthwise_by_shifts
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(2, 6, 11, 9)).astype(np.float32))
    for k, strides, dilations, padding in ((3, (1, 1), (1, 1), ((1, 1), (1, 1))),
                                          (3, (2, 2), (2, 1), ((2, 1), (0, 2))),
                                          (7, (1, 1), (1, 1), ((0, 0), (0, 0)))):
        w = jnp.asarray(rng.normal(size=(6, 1, k, k)).astype(np.float32))
        want = jax.lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilations,
                                            dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                            feature_group_count=6)
        got = _depthwise_by_shifts(x, w, strides, padding, dilations)
        assert_close(got, want, terms=2 * k * k,
                     scale=float(np.max(np.abs(x)) * np.max(np.abs(w))) * k * k)
