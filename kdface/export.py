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
    _require_onnx()  # before the run is restored: say what is missing at once
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


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'kdface[onnx]' "
                          "(or pip install onnx onnxruntime)") from None


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
    """Command-line entry (``argv[0]`` is the program): 0 when written, 2 for an unusable
    command line, 1 when the run cannot be exported; errors are one ``kdface.export: error:``
    line on stderr (tracebacks with ``--verbose``)."""
    from absl import flags

    from kdface._cli import UsageError, run_main, silence_logs, wants_verbose
    argv = list(sys.argv if argv is None else argv)
    verbose = wants_verbose(argv)
    silence_logs(verbose)
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "A kdface training workdir (its latest checkpoint; "
                        "the last generation of a recursive-KD run).", flag_values=fv)
    flags.DEFINE_enum("format", "onnx", list(FORMATS), "Output format.", flag_values=fv)
    flags.DEFINE_string("out", "student.onnx", "Output file.", flag_values=fv)
    flags.DEFINE_enum("input_layout", "nchw", ["nchw", "nhwc"],
                      "Input layout: nchw = [batch, 3, H, W] (insightface/ONNX), nhwc = "
                      "[batch, H, W, 3].", flag_values=fv)
    flags.DEFINE_bool("check", True, "Compare ONNX Runtime with JAX on random images "
                      "(needs onnxruntime).", flag_values=fv)
    flags.DEFINE_bool("verbose", False, "Show tracebacks and INFO logging.", flag_values=fv)
    if any(a in ("--help", "-h", "--helpfull", "-?") for a in argv[1:]):
        print(__doc__)
        print(fv.get_help())
        return 0

    def body():
        rest = fv(argv)
        if len(rest) > 1:
            raise UsageError(f"unexpected arguments {rest[1:]} (flags are --name=value)")
        if not fv.checkpoint:
            raise UsageError("--checkpoint is required (a kdface training workdir)")
        summary = export_checkpoint(fv.checkpoint, fv.out, format=fv.format,
                                    input_layout=fv.input_layout, check=fv.check)
        print(json.dumps(summary, indent=1))
        return 0
    return run_main(body, prog="kdface.export", verbose=verbose)


if __name__ == "__main__":
    sys.exit(main())
