"""Third-party pretrained teachers: ``--teacher=pth:...`` / ``--teacher=onnx:...`` specs.

Wang et al. 2019's teacher is a network the student's trainer did not train. Users have
insightface's IResNet teachers as PyTorch state dicts and ONNX files; a teacher spec names one:

* ``pth:/path/backbone.pth`` - an ``arcface_torch`` IResNet state dict (depth inferred from the
  tensors), or arcface_torch's resume file ``checkpoint_gpu_<rank>.pt`` (its
  ``state_dict_backbone``), read without PyTorch (:func:`read_torch_state_dict`);
* ``onnx:/path/model.onnx`` - any face-recognition ONNX graph (needs the ``onnx`` package). An
  insightface IResNet graph (``torch2onnx.py``, either PyTorch exporter) becomes kdface's
  IResNet, with stage features for the recipes that read them; any other graph (OpenCV Zoo's
  SFace, insightface's MobileFaceNet ``w600k_mbf.onnx``, a quantized graph, one with its own
  preprocessing) becomes an :class:`~kdface.interop.OnnxGraphBackbone`, the graph itself
  interpreted in JAX (embeddings only);
* ``pth:iresnet50:/path/...`` / ``onnx:iresnet100:/path/...`` - the same with the depth stated,
  checked against the tensors (an ONNX graph must then be an IResNet);
* ``onnx:OPTIONS:/path/model.onnx`` - the general graph with its input contract stated where the
  graph cannot say it: comma-separated ``order=rgb|bgr``, ``mean=M`` or ``mean=M1/M2/M3`` and
  ``std=...`` (on 0..255 pixels: the graph is fed ``(p - mean) / std``), ``size=HxW``,
  ``layout=nchw|nhwc``, and the word ``graph`` (read an IResNet graph as a general one too),
  e.g. ``onnx:order=bgr,mean=127.5,std=128:/models/r50.onnx``.

Everything after the format (and optional arch and options) is the path, colons included. kdface
feeds every teacher its RGB images normalized as ``(x / 255 - 0.5) / 0.5`` (kdface's pipeline and
arcface_torch's training) at the run's ``input_size``; a general graph converts them to its own
contract (``OnnxGraphBackbone.contract``) inside. ``python -m kdface.evaluate --runs=NAME=SPEC``
evaluates such a teacher directly.
"""
from __future__ import annotations

from typing import Any

import re

import jax.numpy as jnp
from flax import nnx

from kdface.distill import FaceNetwork
from kdface.interop._iresnet_mapping import IRESNET_ARCHS, iresnet_from_state_dict
from kdface.interop._onnx_import import NotIResNetGraphError, iresnet_state_from_onnx
from kdface.interop._onnx_teacher import OnnxGraphBackbone, onnx_graph_backbone
from kdface.interop._torch_state import read_torch_state_dict

__all__ = ["TEACHER_FORMATS", "imported_teacher", "is_imported_teacher",
           "load_teacher_backbone", "parse_teacher_spec", "state_input_size",
           "teacher_spec_options"]

TEACHER_FORMATS = ("pth", "onnx")
_OPTION = r"(?:graph|(?:order|layout|mean|std|size)=[^,:]+)"
_OPTIONS = re.compile(rf"{_OPTION}(?:,{_OPTION})*")


def is_imported_teacher(spec: Any) -> bool:
    """True for a ``pth:...`` / ``onnx:...`` teacher spec (not a kdface backbone name)."""
    return isinstance(spec, str) and spec.split(":", 1)[0] in TEACHER_FORMATS and ":" in spec


def _split_spec(spec: str) -> tuple[str, str | None, str, str]:
    """``(format, arch, options text, path)`` of a teacher spec."""
    if not is_imported_teacher(spec):
        raise ValueError(f"a teacher spec is 'pth:[ARCH:]PATH' or 'onnx:[ARCH:][OPTIONS:]PATH', "
                         f"got {spec!r}")
    fmt, rest = spec.split(":", 1)
    arch = None
    head, sep, tail = rest.partition(":")
    if sep and head in IRESNET_ARCHS:
        arch, rest = head, tail
    elif sep and head.startswith("iresnet"):
        raise ValueError(f"unknown arch {head!r} in teacher spec {spec!r}; choose one of "
                         f"{sorted(IRESNET_ARCHS)}")
    options = ""
    head, sep, tail = rest.partition(":")
    if sep and _OPTIONS.fullmatch(head):
        if fmt != "onnx":
            raise ValueError(f"teacher spec {spec!r}: options ({head}) apply to onnx: graphs")
        if arch is not None:
            raise ValueError(f"teacher spec {spec!r}: {arch} names an IResNet, whose input "
                             f"kdface knows; options ({head}) are for a general ONNX graph")
        options, rest = head, tail
    if not rest:
        raise ValueError(f"teacher spec {spec!r} names no file")
    return fmt, arch, options, rest


def parse_teacher_spec(spec: str) -> tuple[str, str | None, str]:
    """``'pth:iresnet50:/a/b.pth'`` -> ``('pth', 'iresnet50', '/a/b.pth')`` (arch may be None;
    ONNX options are left out: :func:`teacher_spec_options`)."""
    fmt, arch, _, path = _split_spec(spec)
    return fmt, arch, path


def teacher_spec_options(spec: str) -> dict:
    """The options of an ``onnx:OPTIONS:PATH`` spec: ``{'order': 'bgr', 'mean': (127.5,),
    'size': (112, 112), 'graph': True, ...}`` (empty without options)."""
    _, _, text, _ = _split_spec(spec)
    out: dict = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key == "graph":
            out["graph"] = True
        elif key in ("mean", "std"):
            try:
                out[key] = tuple(float(v) for v in value.split("/"))
            except ValueError:
                raise ValueError(f"teacher spec {spec!r}: {key}={value} is not a number or "
                                 f"three numbers M1/M2/M3") from None
        elif key == "size":
            m = re.fullmatch(r"(\d+)x(\d+)", value)
            if not m:
                raise ValueError(f"teacher spec {spec!r}: size={value} is not HxW")
            out[key] = (int(m.group(1)), int(m.group(2)))
        else:
            out[key] = value
    return out


def load_teacher_backbone(spec: str, *, input_size: tuple[int, int] | None = (112, 112)):
    """Loads the third-party network named by ``spec`` (module docstring) into kdface.

    Returns ``(arch_name, backbone)``: for a ``.pth`` or an IResNet ``.onnx`` graph an eval-mode
    ``kdface.models`` IResNet (``[B, H, W, 3]`` images -> ``[B, 512]`` embeddings, stage
    features, ``forward_from``) built for ``input_size`` ``(H, W)``, None reading it from the
    file (:func:`state_input_size`); for any other ONNX graph ``('onnx_graph',``
    :class:`~kdface.interop.OnnxGraphBackbone` ``)``, whose size is the graph's.
    Raises ValueError listing missing / unexpected tensors and shape mismatches,
    :class:`UnsafeTorchPickleError` for a ``.pth`` whose pickle wants to run code, ImportError
    when ``onnx:`` is used without the ``onnx`` package; for an unsupported ONNX op, ValueError
    naming the op and its node.
    """
    fmt, arch, path = parse_teacher_spec(spec)
    options = teacher_spec_options(spec)
    if fmt == "pth":
        state = read_torch_state_dict(path)
    else:
        general = options.pop("graph", False) or bool(options)
        state = None
        if not general:
            try:
                state = iresnet_state_from_onnx(path)
            except NotIResNetGraphError:
                if arch is not None:
                    raise
        if state is None:
            return "onnx_graph", onnx_graph_backbone(path, input_size=input_size,
                                                     options=options)
    if input_size is None:
        input_size = state_input_size(state, source=path)
    return iresnet_from_state_dict(state, arch=arch, input_size=tuple(input_size), source=path)


def state_input_size(state: dict[str, Any], *, source: str = "state dict") -> tuple[int, int]:
    """The square input ``(H, H)`` an insightface IResNet state dict was trained at.

    The FC reads the last feature map flattened, ``fc.weight: [E, C * h * w]`` with ``C`` the
    channels of ``bn2``, and IResNets stride 16, so ``H = 16 * sqrt(h * w)`` (112 for insightface's
    released models: a 7x7 map). Raises ValueError when the map is not square.
    """
    fc, bn = state.get("fc.weight"), state.get("bn2.weight")
    if fc is None or bn is None or getattr(fc, "ndim", 0) != 2:
        raise ValueError(f"{source}: no fc.weight [E, C*h*w] / bn2.weight to read the input "
                         f"size from; not an insightface IResNet")
    cells, rest = divmod(int(fc.shape[1]), int(bn.shape[0]))
    side = int(round(cells ** 0.5))
    if rest or side * side != cells:
        raise ValueError(f"{source}: the FC reads {fc.shape[1]} values, not {bn.shape[0]} "
                         f"channels of a square feature map; the input size cannot be inferred")
    return 16 * side, 16 * side


def imported_teacher(spec: str, recipe, *, num_classes: int, input_size: tuple[int, int],
                     options: dict[str, Any] | None = None):
    """The frozen ``FaceNetwork`` teacher of a recipe around an imported backbone.

    An imported network has no classifier, so its head is a zero softmax layer (logits
    ``[B, num_classes]`` all 0): terms on the teacher's embedding / stage features work, and a
    recipe that gives the teacher's logits a non-zero weight (``hinton``, ``soft_prediction``) is
    refused here, before any compilation. ``options`` (``--teacher_options``) must be empty: the
    file fixes the architecture.
    """
    if options:
        raise ValueError(f"--teacher_options {dict(options)} do not apply to an imported "
                         f"teacher ({spec}): the file fixes the architecture")
    logit_terms = [t for t in recipe.terms
                   if "logits" in t.spec.teacher_outputs and t.weight != 0]
    if logit_terms:
        raise ValueError(
            f"recipe {recipe.name!r} distils the teacher's class logits (term "
            f"{logit_terms[0].name!r}, weight {logit_terms[0].weight}), but the imported "
            f"teacher {spec} has no classifier head; "
            f"set that weight to 0 (--lambda_soft=0 / --gamma=0) or use a recipe on "
            f"embeddings (pwr, vargface, shrinktea, kd_im with feature terms)")
    _, backbone = load_teacher_backbone(spec, input_size=input_size)
    if isinstance(backbone, OnnxGraphBackbone):
        needs = [t.name for t in recipe.terms if t.weight != 0 and (
            t.spec.teacher_stages or t.spec.teacher_tail)]
        if needs or recipe.adapters:
            raise ValueError(
                f"recipe {recipe.name!r} reads the teacher's stage features (terms "
                f"{needs or 'with stage adapters'}), but the ONNX graph teacher {spec} gives "
                f"only its embedding; use an embedding recipe (pwr, vargface, kd_im with "
                f"feature terms) or an insightface IResNet / kdface teacher")
    network = FaceNetwork(backbone, num_classes=num_classes, head="softmax", rngs=nnx.Rngs(0))
    linear = network.head.linear
    linear.kernel.set_value(jnp.zeros_like(linear.kernel[...]))
    linear.bias.set_value(jnp.zeros_like(linear.bias[...]))
    network.eval()
    return network
