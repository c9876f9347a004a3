r"""`python -m kdface.evaluate`: compare trained networks under the papers' protocols.

  python -m kdface.evaluate --runs=teacher=runs/teacher,student=runs/kd_im \
      --val_data=lfw.bin,cfp_fp.bin --lr_sizes=8,12,16,20 --out=report

For every run (a kdface training workdir) and every verification set: the 10-fold accuracy
(mean ± std), ROC/AUC and TAR@FAR (DESIGN.md protocol; with --flip the image and its mirror
embeddings are summed), and the LR-LFW protocol of seed wang2019 §3.1 (gallery image unchanged,
probe degraded to each --lr_sizes px). Model facts (parameters, multiply-accumulates, batch-1
CPU latency) go in the same report: ``report.json``, ``report.md``, ROC and
accuracy-vs-probe-size PNGs.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np


class Embedder:
    """A trained run's student network as ``embed(uint8 images [N, H, W, 3]) -> [N, E]``."""

    def __init__(self, workdir: str, *, batch_size: int = 128):
        import jax
        from flax import nnx
        from kdface.distill._networks import build_student
        from kdface.training._checkpoint import load_model_weights
        path = os.path.join(workdir, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} missing: {workdir} is not a kdface training workdir")
        with open(path) as f:
            cfg = json.load(f)
        self.config = cfg
        self.input_size = tuple(cfg["input_size"])
        student = build_student(cfg["student"], num_classes=cfg["num_classes"],
                                head=cfg["head_used"], rngs=nnx.Rngs(0),
                                backbone_options=cfg["student_options"])
        _, params, rest = nnx.split(student, nnx.Param, ...)
        weights, _ = load_model_weights(workdir, {"params": params, "rest": rest})
        nnx.update(student, weights["params"], weights["rest"])
        self.network = student.network
        self.network.eval()
        self.batch_size = batch_size
        graphdef, state = nnx.split(self.network)
        self._state = state

        @jax.jit
        def forward(state, images):
            return nnx.merge(graphdef, state, copy=True)(images)["embedding"]
        self._forward = forward

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import cv2
        from kdface.training._loop import normalize_images
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i:i + self.batch_size]
            if chunk.shape[1:3] != self.input_size:
                chunk = np.stack([cv2.resize(im, self.input_size[::-1],
                                             interpolation=cv2.INTER_AREA) for im in chunk])
            out.append(np.asarray(self._forward(self._state, normalize_images(chunk))))
        return np.concatenate(out)

    def model_facts(self, *, latency_repeats: int = 20) -> dict[str, float]:
        """Parameters, MACs (multiply-accumulates) and batch-1 CPU latency (median, ms)."""
        from kdface.models import count_macs, count_params
        backbone = self.network.backbone
        facts = {"params": int(count_params(backbone)),
                 "macs": int(count_macs(backbone, self.input_size))}
        x = np.zeros((1, *self.input_size, 3), np.uint8)
        self(x)  # compile
        times = []
        for _ in range(latency_repeats):
            t0 = time.perf_counter()
            self(x)
            times.append(time.perf_counter() - t0)
        facts["latency_ms"] = 1000 * float(np.median(times))
        return facts


def verification_report(embed, images: np.ndarray, issame: np.ndarray, *, flip: bool = False,
                        folds: int = 10) -> dict[str, Any]:
    """Protocol on interleaved pairs ``images`` [2P, H, W, 3] (pair i = rows 2i, 2i+1)."""
    from kdface import metrics
    if images.ndim != 4 or len(images) % 2:
        raise ValueError(f"images must be interleaved pairs [2P, H, W, 3], got {images.shape}")
    if len(images) // 2 != len(issame):
        raise ValueError(f"{len(images) // 2} pairs of images but {len(issame)} labels")
    emb = embed(images)
    if flip:
        emb = metrics.embeddings_with_flip(emb, embed(np.ascontiguousarray(images[:, :, ::-1])))
    return metrics.verification(emb[0::2], emb[1::2], issame, folds=folds)


def lr_report(embed, images: np.ndarray, issame: np.ndarray, sizes: Sequence[int], *,
              flip: bool = False) -> dict[int, dict[str, Any]]:
    """Seed wang2019 LR-LFW: probe (second image of each pair) degraded to each size."""
    from kdface.data._degrade import lr_probe_pairs
    return {int(s): verification_report(embed, lr_probe_pairs(images, int(s)), issame, flip=flip)
            for s in sizes}


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keep = ("accuracy", "accuracy_std", "auc", "threshold", "tar_at_far",
            "tar_at_far_unsupported", "num_pairs")
    return {k: result[k] for k in keep if k in result}


def compare(runs: dict[str, str], sets: dict[str, tuple[np.ndarray, np.ndarray]], *,
            lr_sizes: Sequence[int] = (), flip: bool = False, out_dir: str | None = None,
            model_facts: bool = True) -> dict[str, Any]:
    """Evaluates each run on each set (HR and LR probes); writes JSON/markdown/PNGs to out_dir."""
    from kdface import metrics
    report: dict[str, Any] = {"runs": {}, "lr_sizes": list(lr_sizes)}
    rocs: dict[str, dict[str, Any]] = {name: {} for name in sets}
    for run_name, workdir in runs.items():
        embed = Embedder(workdir)
        entry: dict[str, Any] = {"workdir": workdir}
        if model_facts:
            entry["model"] = embed.model_facts()
        for set_name, (images, issame) in sets.items():
            hr = verification_report(embed, images, issame, flip=flip)
            rocs[set_name][run_name] = hr["roc"]
            lr = lr_report(embed, images, issame, lr_sizes, flip=flip)
            entry[set_name] = {"hr": _summary(hr),
                               "lr": {str(s): _summary(r) for s, r in lr.items()}}
        report["runs"][run_name] = entry
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "report.json"), "w") as f:
            json.dump(report, f, indent=1, default=float)
        with open(os.path.join(out_dir, "report.md"), "w") as f:
            f.write(markdown_table(report))
        for set_name in sets:
            metrics.plot_roc(os.path.join(out_dir, f"roc_{set_name}.png"), rocs[set_name],
                             title=f"ROC on {set_name}")
            if lr_sizes:
                series = {}
                for run_name, entry in report["runs"].items():
                    accs = [entry[set_name]["lr"][str(s)]["accuracy"] for s in lr_sizes]
                    series[run_name] = accs
                metrics.plot_accuracy_vs_probe_size(
                    os.path.join(out_dir, f"lr_{set_name}.png"), list(lr_sizes), series,
                    title=f"LR probes on {set_name}")
    return report


def markdown_table(report: dict[str, Any]) -> str:
    """One row per (run, set): HR accuracy, each LR probe size, and the model facts."""
    sizes = report["lr_sizes"]
    head = ["run", "set", "HR acc", *[f"{s}px acc" for s in sizes], "AUC", "params",
            "MACs", "latency b1 (ms)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run_name, entry in report["runs"].items():
        model = entry.get("model", {})
        for set_name, result in entry.items():
            if set_name in ("workdir", "model"):
                continue
            hr = result["hr"]
            cells = [run_name, set_name,
                     f"{hr['accuracy']:.4f} ± {hr['accuracy_std']:.4f}",
                     *[f"{result['lr'][str(s)]['accuracy']:.4f}" for s in sizes],
                     f"{hr['auc']:.4f}", f"{model.get('params', 0) / 1e6:.2f} M",
                     f"{model.get('macs', 0) / 1e6:.1f} M",
                     f"{model.get('latency_ms', float('nan')):.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load_sets(val_data: Sequence[str], *, data_dir: str = "data"):
    """``{name: (images [2P, H, W, 3] uint8, issame [P])}`` from .bin paths or built sets."""
    from kdface.training._run import resolve_verification_sets
    return {vs.name: (vs.images, vs.issame)
            for vs in resolve_verification_sets(val_data, data_dir, None)}


def main(argv=None) -> int:
    from absl import app, flags
    flags.DEFINE_list("runs", [], "name=workdir pairs (kdface training workdirs).")
    flags.DEFINE_list("val_data", [], "Verification sets: .bin paths or built dataset names.")
    flags.DEFINE_string("data_dir", "data", "tfds data directory of built datasets.")
    flags.DEFINE_list("lr_sizes", ["8", "12", "16", "20"], "LR probe sizes in px (seed "
                      "wang2019: 8, 12, 16, 20).")
    flags.DEFINE_bool("flip", False, "Sum image and mirrored-image embeddings.")
    flags.DEFINE_string("out", "report", "Output directory for report.json/.md and plots.")

    def run(_):
        F = flags.FLAGS
        if not F.runs or not F.val_data:
            raise app.UsageError("--runs and --val_data are required")
        runs = {}
        for item in F.runs:
            if "=" not in item:
                raise app.UsageError(f"--runs entry {item!r} is not name=workdir")
            name, path = item.split("=", 1)
            runs[name] = path
        report = compare(runs, load_sets(F.val_data, data_dir=F.data_dir),
                         lr_sizes=[int(s) for s in F.lr_sizes], flip=F.flip, out_dir=F.out)
        print(markdown_table(report))
        return 0
    app.run(run, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
