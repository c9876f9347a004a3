r"""`python -m kdface.export`: ship a trained student's embedding network as ONNX.

  python -m kdface.export --checkpoint=runs/pwr --format=onnx --out=student.onnx

Reads the run's ``config.json`` and its latest checkpoint (params-only), takes the student's
backbone in eval mode (BatchNorm running statistics, no dropout; the classifier head is not
exported) and writes it with a dynamic batch dimension:

* input ``input``: float32 ``[batch, 3, H, W]`` (``--input_layout=nchw``, the insightface / ONNX
  convention) or ``[batch, H, W, 3]`` (``nhwc``), RGB normalized as ``(x / 255 - 0.5) / 0.5``;
* output ``embedding``: float32 ``[batch, E]`` (not L2-normalized; normalize before cosine).

The graph is translated from the network's jaxpr (``kdface.interop._onnx_export``), so every
kdface backbone exports. With ONNX Runtime installed, ``--check`` (default on) runs the file on
random images and reports the largest difference from JAX.

The run is rebuilt by ``kdface.training.restore_run`` (abstractly, so exporting is quick), for
every recipe: runs with stage adapters or a landmark head included.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

FORMATS = ("onnx",)


def load_student_backbone(checkpoint: str):
    """``(backbone, config)``: the eval-mode student backbone of a training workdir and the run's
    config.json dict.

    The whole student (head, landmark head and stage adapters included, so the checkpoint tree
    matches whatever recipe trained it) is rebuilt abstractly and filled params-only by
    ``kdface.training.restore_run``; only its backbone is exported.
    """
    from kdface.training import restore_run
    restored = restore_run(checkpoint)
    backbone = restored.network.backbone
    backbone.eval()
    return backbone, restored.run


def export_checkpoint(checkpoint: str, out: str, *, format: str = "onnx",
                      input_layout: str = "nchw", check: bool = True) -> dict[str, Any]:
    """Exports the student of training workdir ``checkpoint`` to ``out``; returns a summary.

    The summary holds ``out``, ``student``, ``input_shape``, ``embedding_size``, ``nodes``,
    ``bytes`` and, when ``check`` and ONNX Runtime is available, ``max_abs_diff`` /
    ``max_rel_diff`` between ONNX Runtime and JAX on 3 random images.
    """
    from kdface.interop import export_onnx
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    backbone, config = load_student_backbone(checkpoint)
    h, w = (int(v) for v in config["input_size"])
    model = export_onnx(backbone, out, input_size=(h, w), input_layout=input_layout)
    summary: dict[str, Any] = {
        "out": os.path.abspath(out), "student": config["student"],
        "input_shape": ["batch", 3, h, w] if input_layout == "nchw" else ["batch", h, w, 3],
        "embedding_size": int(backbone.embedding_size), "nodes": len(model.graph.node),
        "bytes": os.path.getsize(out)}
    if check:
        summary.update(_check(out, backbone, (h, w), input_layout))
    return summary


def _check(path: str, backbone, input_size, input_layout: str) -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError:
        return {"check": "skipped (onnxruntime not installed)"}
    import jax
    from flax import nnx
    images = np.random.default_rng(0).uniform(-1, 1, (3, *input_size, 3)).astype(np.float32)
    graphdef, state = nnx.split(backbone)
    expected = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, images))
    feed = images.transpose(0, 3, 1, 2) if input_layout == "nchw" else images
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(["embedding"], {"input": np.ascontiguousarray(feed)})[0]
    diff = float(np.max(np.abs(got - expected)))
    return {"max_abs_diff": diff,
            "max_rel_diff": diff / max(float(np.max(np.abs(expected))), 1e-12)}


def main(argv=None) -> int:
    from absl import app, flags
    flags.DEFINE_string("checkpoint", None, "A kdface training workdir (its latest checkpoint).")
    flags.DEFINE_enum("format", "onnx", list(FORMATS), "Output format.")
    flags.DEFINE_string("out", "student.onnx", "Output file.")
    flags.DEFINE_enum("input_layout", "nchw", ["nchw", "nhwc"],
                      "Input layout: nchw = [batch, 3, H, W] (insightface/ONNX), nhwc = "
                      "[batch, H, W, 3].")
    flags.DEFINE_bool("check", True, "Compare ONNX Runtime with JAX on random images "
                      "(needs onnxruntime).")

    def run(_):
        F = flags.FLAGS
        if not F.checkpoint:
            raise app.UsageError("--checkpoint is required")
        summary = export_checkpoint(F.checkpoint, F.out, format=F.format,
                                    input_layout=F.input_layout, check=F.check)
        print(json.dumps(summary, indent=1))
        return 0
    app.run(run, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
