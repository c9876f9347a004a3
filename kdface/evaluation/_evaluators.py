"""The evaluation protocols as objects (big_vision's evaluators): each holds its settings, fixed
when it is built, evaluates one run at a time and renders its own markdown sections and plots.

:func:`kdface.evaluation.compare` loops runs x evaluators; :func:`markdown_table` joins the
evaluators' sections. The renderers read the report alone (a live one, or ``report.json``
parsed back), so they are static methods: an evaluator class renders as well as an instance.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kdface import metrics
from kdface.evaluation._classification import Classification
from kdface.evaluation._embedder import Embedder, EmbeddingFile
from kdface.evaluation._evaluator import (Evaluator, Run, cell, far_label, file_part, keyed,
                                          pick, roc_plots, table)
from kdface.evaluation._ijb import ijb_report, parse_ijb_spec
from kdface.evaluation._protocols import (alignment_report, check_fold_count, check_lr_sizes,
                                          identification_arrays, identification_report,
                                          lr_report, verification_from_embeddings,
                                          verification_report)
from kdface.evaluation._sources import embed_records, open_face_records
from kdface.metrics import (DEFAULT_FAR_TARGETS, DEFAULT_FPR_TARGETS, DEFAULT_RANKS,
                            IJB_FAR_TARGETS, PROTOCOLS, fold_bounds)

_VERIFICATION_KEYS = ("accuracy", "accuracy_std", "fold_accuracies", "threshold",
                      "best_threshold_accuracy", "best_threshold", "auc", "tar_at_far",
                      "tar_at_far_std", "far_achieved", "tar_at_far_unsupported", "num_pairs",
                      "num_positive", "num_negative")
_IDENTIFICATION_KEYS = ("rank_accuracy", "cmc", "tpr_at_fpr", "tpr_at_fpr_unsupported",
                        "dir_at_fpir", "dir_at_fpir_unsupported", "num_probes", "num_mated",
                        "num_non_mated", "num_gallery", "num_distractors", "nn_top1",
                        "nn_num_singletons", "seconds")
_ALIGNMENT_KEYS = ("nrmse", "failure_rate", "ced_auc", "num_images")
_IJB_KEYS = ("tar_at_far", "fpr_at_far", "auc", "num_images", "num_templates", "num_pairs",
             "num_positive", "num_negative", "settings")


def _min_train_negatives(issame: np.ndarray, folds: int) -> int:
    neg = ~np.asarray(issame, bool)
    return int(min(neg.sum() - neg[a:b].sum() for a, b in fold_bounds(neg.size, folds)))


# --- verification (HR and LR probes, TAR@FAR) ---------------------------------------------------

class Verification(Evaluator):
    """The 10-fold verification protocol on each set, and Wang et al. 2019's LR protocol.

    sets: ``{name: (images uint8 [2P, H, W, 3] or None, issame [P])}`` (:func:`load_sets`;
    images None = exported embeddings only). lr_sizes: probe sizes of the LR protocol, one row
    each. protocol: ``'exact'`` (kdface's) or ``'insightface'`` (insightface's grids and
    interpolated TAR@FAR, numbers equal to its script's; ``kdface.metrics.verification``).
    flip: image + mirror embeddings; None = the protocol's own choice (on for insightface, whose
    headline number is "Accuracy-Flip"; off for exact). Checkpoint runs embed the images;
    embedding-file runs give their ``<set>/emb`` (and ``<set>/lr<N>/emb``) arrays.
    """

    def __init__(self, sets: Mapping[str, tuple[Any, Any]], *, lr_sizes: Sequence[int] = (),
                 protocol: str = "exact", flip: bool | None = None, folds: int = 10,
                 far_targets: Sequence[float] = DEFAULT_FAR_TARGETS):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.sets = {name: (images, np.asarray(issame).astype(bool))
                     for name, (images, issame) in sets.items()}
        self.lr_sizes = check_lr_sizes(lr_sizes)
        self.protocol = protocol
        self.flip = (protocol == "insightface") if flip is None else bool(flip)
        self.folds = folds
        check_fold_count({name: issame.size for name, (_, issame) in self.sets.items()}, folds)
        self.far_targets = list(far_targets)

    def report_fields(self) -> dict[str, Any]:
        sets = {}
        for name, (images, issame) in self.sets.items():
            sets[name] = {
                "num_pairs": int(issame.size), "num_positive": int(issame.sum()),
                "num_negative": int((~issame).sum()),
                "min_train_negatives": _min_train_negatives(issame, self.folds),
                "image_size": None if images is None else list(np.asarray(images).shape[1:3])}
        score = "cosine" if self.protocol == "exact" else "squared_l2"
        return {"protocol": {"verification": self.protocol, "folds": self.folds,
                             "flip": self.flip, "score": score,
                             "far_targets": self.far_targets, "lr_sizes": self.lr_sizes},
                "lr_sizes": self.lr_sizes, "sets": sets}

    def evaluate(self, run: Run) -> dict[str, Any]:
        notes: list[str] = []
        if not run.embeds_images and run.flip is not None and run.flip != self.flip:
            notes.append(f"embeddings exported with flip={run.flip}, report asks "
                         f"flip={self.flip}; the file's embeddings are used")
        results, rocs = {}, {}
        for set_name, (images, issame) in self.sets.items():
            if run.embeds_images:
                hr, lr = self._from_images(run, set_name, images, issame)
            else:
                hr, lr = self._from_file(run, set_name, issame, notes)
                if hr is None:
                    continue
            rocs[set_name] = hr["roc"]
            results[set_name] = {
                "hr": pick(hr, _VERIFICATION_KEYS),
                "lr": {str(s): pick(r, _VERIFICATION_KEYS) for s, r in lr.items()}}
        return {"verification": results, "notes": notes, "plot": rocs}

    def _options(self) -> dict[str, Any]:
        return dict(folds=self.folds, far_targets=self.far_targets, protocol=self.protocol)

    def _from_images(self, run: Embedder, set_name: str, images: Any, issame: np.ndarray):
        if images is None:
            raise ValueError(f"set {set_name!r} has no images: run {run.describe()['source']} "
                             f"needs them (only exported-embedding runs can go without)")
        hr = verification_report(run, images, issame, flip=self.flip, **self._options())
        lr = lr_report(run, images, issame, self.lr_sizes, flip=self.flip, **self._options())
        return hr, lr

    def _from_file(self, run: EmbeddingFile, set_name: str, issame: np.ndarray,
                   notes: list[str]):
        emb = run.pair_embeddings(set_name, issame)
        if emb is None:
            notes.append(f"no embeddings for set {set_name!r} in the file")
            return None, {}
        hr = verification_from_embeddings(emb, issame, **self._options())
        lr = {}
        for s in self.lr_sizes:
            lr_emb = run.pair_embeddings(set_name, issame, lr_size=s)
            if lr_emb is None:
                notes.append(f"no {s} px probe embeddings for {set_name!r}")
            else:
                lr[s] = verification_from_embeddings(lr_emb, issame, **self._options())
        return hr, lr

    @staticmethod
    def markdown(report: Mapping[str, Any]) -> list[str]:
        proto = report.get("protocol", {})
        sizes = report.get("lr_sizes", [])
        insightface = proto.get("verification", "exact") == "insightface"
        flip = "yes" if proto.get("flip") else "no"
        if insightface:
            lines = [
                f"Verification protocol: **insightface** (the numbers of insightface's "
                f"verification script): {proto.get('folds', 10)}-fold (sklearn KFold: contiguous "
                f"blocks in file order), squared L2 distance of normalized embeddings, threshold "
                f"from the grid 0, 0.01, ..., 3.99 chosen on the other folds; TAR@FAR at the "
                f"threshold interpolated (scipy 'slinear') in the training FAR table on the grid "
                f"0, 0.001, ..., 3.999, so a FAR below one training negative still gets a TAR. "
                f"Image+flip embeddings: {flip}."]
        else:
            lines = [
                f"Verification protocol: **exact** (kdface's): {proto.get('folds', 10)}-fold "
                f"(sklearn KFold: contiguous blocks in file order), cosine score, threshold chosen "
                f"among every distinct split of the other folds' scores; TAR@FAR at the exact "
                f"(k+1)-th training negative. Image+flip embeddings: {flip}. "
                f"(--protocol=insightface gives insightface's numbers.)"]
        if sizes:
            lines.append("LR columns: Wang et al. 2019 LR protocol, gallery image kept, probe "
                         "blurred and downscaled to N px (longer side), then scaled back.")
        lines.append("")
        acc_rows, tar_rows = [], []
        fars = [float(f) for f in proto.get("far_targets", DEFAULT_FAR_TARGETS)]
        for run_name, entry in report["runs"].items():
            for set_name, ver in entry.get("verification", {}).items():
                hr = ver["hr"]
                acc_rows.append([run_name, set_name,
                                 f"{cell(hr['accuracy'])} ± {cell(hr['accuracy_std'])}",
                                 cell(hr.get("best_threshold_accuracy")), cell(hr.get("auc")),
                                 *[cell(ver["lr"].get(str(s), {}).get("accuracy"))
                                   for s in sizes]])
                unsupported = [float(u) for u in hr.get("tar_at_far_unsupported", [])]
                tar_rows.append([run_name, set_name, *[
                    "n/s" if f in unsupported else cell(keyed(hr["tar_at_far"], f))
                    for f in fars]])
        if not acc_rows:
            return lines
        lines += ["## Verification accuracy", ""]
        lines += table(["run", "set", "accuracy (mean ± std)", "best-threshold acc", "AUC",
                        *[f"{s} px probe" for s in sizes]], acc_rows)
        lines += ["", "## TAR at FAR", ""]
        lines += table(["run", "set", *[f"TAR@FAR={far_label(f)}" for f in fars]], tar_rows)
        lines.append("")
        for set_name, info in report.get("sets", {}).items():
            if insightface:
                lines.append(f"- {set_name}: {info['num_pairs']} pairs, "
                             f"{info['num_negative']} negative.")
                continue
            need = info["min_train_negatives"]
            missing = [far_label(f) for f in fars if f * need + 1e-9 < 1.0]
            text = (f"- {set_name}: {info['num_pairs']} pairs, {info['num_negative']} negative; "
                    f"the smallest training split (all folds but one) has {need} negatives, so "
                    f"FARs below 1/{need} cannot be set")
            lines.append(text + (f": n/s (not supported) at {', '.join(missing)}."
                                 if missing else " (every FAR asked is supported)."))
        lines.append("")
        return lines

    @staticmethod
    def plots(report: Mapping[str, Any], curves: Mapping[str, Any], out_dir: str) -> list[str]:
        """``roc_<set>.png`` (every run on one figure) and ``lr_<set>.png`` (accuracy vs probe
        size; full-resolution probes at the network's input size, or the set's image size
        where the run's input size is unknown)."""
        written = roc_plots(curves, out_dir)
        sizes = report.get("lr_sizes", [])
        for set_name, info in report.get("sets", {}).items() if sizes else ():
            series, full = {}, {}
            for run_name, entry in report["runs"].items():
                ver = entry.get("verification", {}).get(set_name)
                if ver is None:
                    continue
                series[run_name] = [ver["lr"].get(str(s), {}).get("accuracy") for s in sizes]
                side = entry.get("model", {}).get("input_size") or info["image_size"]
                if side:
                    full[run_name] = (max(side), ver["hr"]["accuracy"])
            if series:
                path = os.path.join(out_dir, f"lr_{file_part(set_name)}.png")
                written += metrics.plot_accuracy_vs_probe_size(
                    path, sizes, series, full_resolution=full,
                    title=f"{set_name}: accuracy vs probe size")
        return written


# --- identification (with distractors) ---------------------------------------------------------

def _load_distractors(distractors: Any) -> np.ndarray | None:
    if distractors is None or isinstance(distractors, np.ndarray):
        return distractors
    path = os.fspath(distractors)
    if not path.endswith(".npy"):
        raise ValueError(f"shared distractors must be a .npy file of float [M, D] embeddings, "
                         f"got {path!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"distractor file {path} not found")
    return np.load(path, mmap_mode="r")


class Identification(Evaluator):
    """Rank-k identification, TPR@FPR, DIR@FPIR and Wang et al. 2017's nearest-neighbour top-1.

    records: a labelled dataset (anything :func:`open_face_records` opens) split per identity
    into gallery (first image) and probes (the rest), embedded by each checkpoint run;
    embedding-file runs use their own ``gallery_*`` / ``probe_*`` arrays. distractors: a shared
    ``.npy`` [M, D] (memory-mapped) or array; distractor_records: a dataset embedded per run.
    flip: image + mirror embeddings (the verification's choice).
    """

    def __init__(self, records: Any = None, *, distractors: Any = None,
                 distractor_records: Any = None, flip: bool = False,
                 ranks: Sequence[int] = DEFAULT_RANKS,
                 fpr_targets: Sequence[float] = DEFAULT_FPR_TARGETS, probe_chunk: int = 1024,
                 item_chunk: int = 16384):
        self.records = None if records is None else open_face_records(records)
        self.distractor_records = (None if distractor_records is None else
                                   open_face_records(distractor_records))
        self.shared_distractors = _load_distractors(distractors)
        if self.shared_distractors is not None and self.distractor_records is not None:
            raise ValueError("give distractors either as a shared .npy or as a dataset, not both")
        self.flip = bool(flip)
        self.ranks, self.fpr_targets = list(ranks), list(fpr_targets)
        self.chunks = dict(probe_chunk=probe_chunk, item_chunk=item_chunk)

    def report_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"protocol": {"ranks": self.ranks,
                                               "fpr_targets": self.fpr_targets}}
        if self.records is not None:
            distractors = ("shared file" if self.shared_distractors is not None else
                           None if self.distractor_records is None else
                           self.distractor_records.name)
            fields["identification"] = {"data": self.records.name,
                                        "split": "first image per identity = gallery",
                                        "distractors": distractors}
        return fields

    def evaluate(self, run: Run) -> dict[str, Any]:
        notes: list[str] = []
        if run.embeds_images:
            ident = None if self.records is None else identification_arrays(
                run, self.records, flip=self.flip, distractor_records=self.distractor_records)
        else:
            ident = run.identification_arrays()
            if ident is None and self.records is not None:
                notes.append("the embedding file holds no identification arrays")
        if ident is None:
            return {"notes": notes}
        distractors = ident.get("distractor_emb")
        if distractors is None:
            distractors = self.shared_distractors
        result = identification_report(
            ident["probe_emb"], ident["probe_labels"], ident["gallery_emb"],
            ident["gallery_labels"], distractor_emb=distractors, ranks=self.ranks,
            fpr_targets=self.fpr_targets, **self.chunks)
        return {"identification": pick(result, _IDENTIFICATION_KEYS), "notes": notes}

    @staticmethod
    def markdown(report: Mapping[str, Any]) -> list[str]:
        proto = report.get("protocol", {})
        ranks = [int(k) for k in proto.get("ranks", DEFAULT_RANKS)]
        fprs = [float(f) for f in proto.get("fpr_targets", DEFAULT_FPR_TARGETS)]
        rows = []
        for run_name, entry in report["runs"].items():
            ident = entry.get("identification")
            if ident is None:
                continue
            unsupported = [float(u) for u in ident.get("tpr_at_fpr_unsupported", [])]
            rows.append([
                run_name, str(ident["num_gallery"]), str(ident["num_probes"]),
                str(ident["num_distractors"]),
                *[cell(keyed(ident["rank_accuracy"], k)) for k in ranks],
                *["n/s" if f in unsupported else cell(keyed(ident["tpr_at_fpr"], f))
                  for f in fprs],
                cell(ident.get("nn_top1")), f"{ident.get('seconds', float('nan')):.2f}"])
        if not rows:
            return []
        info = report.get("identification", {})
        lines = ["## Identification", ""]
        if info:
            lines.append(f"Data: {info.get('data')} ({info.get('split')}); distractors: "
                         f"{info.get('distractors') or 'none'}.")
        lines.append("Rank-k: a mated probe is right when fewer than k non-mates outscore its "
                     "best mate. TPR@FPR over all probe-item pairs (n/s: fewer than 1/FPR "
                     "impostor pairs). NN top-1: Wang et al. 2017 leave-one-out nearest "
                     "neighbour (Euclidean) over gallery + probes.")
        lines.append("")
        lines += table(["run", "gallery", "probes", "distractors",
                        *[f"rank-{k}" for k in ranks],
                        *[f"TPR@FPR={far_label(f)}" for f in fprs], "NN top-1", "time (s)"],
                       rows)
        lines.append("")
        return lines


# --- IJB-B/C 1:1 template verification ---------------------------------------------------------

def _ijb_sets(ijb: Any) -> list[tuple[str, str]]:
    """``[(name, root)]`` from one ``(name, root)``, a ``'NAME:ROOT'`` string or a list."""
    items = [ijb] if isinstance(ijb, (str, tuple)) else list(ijb)
    out = []
    for item in items:
        name, root = parse_ijb_spec(item) if isinstance(item, str) else item
        out.append((str(name).upper(), os.fspath(root)))
    if len({n for n, _ in out}) != len(out):
        raise ValueError(f"IJB sets named twice: {[n for n, _ in out]}")
    return out


class IjbVerification(Evaluator):
    """IJB-B/C 1:1 verification of each checkpoint run (:func:`kdface.evaluation.ijb_report`).

    sets: ``(name, root)``, ``'NAME:ROOT'`` or a list of them; far_targets: the TAR@FAR table.
    """

    def __init__(self, sets: Any, *, far_targets: Sequence[float] = IJB_FAR_TARGETS):
        self.sets = _ijb_sets(sets)
        self.far_targets = list(far_targets)

    def report_fields(self) -> dict[str, Any]:
        return {"ijb": {"sets": [n for n, _ in self.sets], "far_targets": self.far_targets,
                        "flip": True, "face_score": True, "keep_norm": True}}

    def evaluate(self, run: Run) -> dict[str, Any]:
        if not run.embeds_images:
            return {"notes": [f"{name} needs images: not evaluated for an embedding file"
                              for name, _ in self.sets]}
        results, rocs = {}, {}
        for name, root in self.sets:
            result = ijb_report(run, root, name, far_targets=self.far_targets)
            results[name] = pick(result, _IJB_KEYS)
            rocs[name] = {"fpr": result["roc"]["fpr"], "tpr": result["roc"]["tpr"]}
        return {"ijb": results, "plot": rocs}

    @staticmethod
    def markdown(report: Mapping[str, Any]) -> list[str]:
        info = report.get("ijb")
        if not info:
            return []
        fars = [float(f) for f in info.get("far_targets", IJB_FAR_TARGETS)]
        rows = [[run_name, name, str(r["num_templates"]), str(r["num_pairs"]),
                 *[cell(keyed(r["tar_at_far"], f)) for f in fars], cell(r.get("auc"))]
                for run_name, entry in report["runs"].items()
                for name, r in entry.get("ijb", {}).items()]
        if not rows:
            return []
        lines = ["## IJB 1:1 template verification", "",
                 "insightface's IJB protocol: crops aligned by their 5 landmarks, image + "
                 "mirror features added, times the face score, media-averaged, summed per "
                 "template and normalized; cosine of template pairs; TAR at the ROC point "
                 "whose FPR is nearest each target (sklearn roc_curve points).", ""]
        lines += table(["run", "set", "templates", "pairs",
                        *[f"TAR@FAR={far_label(f)}" for f in fars], "AUC"], rows)
        return lines + [""]

    @staticmethod
    def plots(report: Mapping[str, Any], curves: Mapping[str, Any], out_dir: str) -> list[str]:
        return roc_plots(curves, out_dir)


# --- alignment NRMSE ---------------------------------------------------------------------------

class Alignment(Evaluator):
    """Wang et al. 2017 NRMSE of runs with a landmark head on ``records``, a labelled dataset
    with 5-point landmarks (anything :func:`open_face_records` opens)."""

    def __init__(self, records: Any):
        self.records = open_face_records(records)

    def report_fields(self) -> dict[str, Any]:
        return {"alignment": {"data": self.records.name, "normalization": "inter_ocular",
                              "frame": "network-input pixels"}}

    def evaluate(self, run: Run) -> dict[str, Any]:
        if not run.has_landmarks:
            return {"notes": ["no landmark head: alignment not evaluated"]}
        data = embed_records(run, self.records, with_landmarks=True)
        result = alignment_report(data["pred_landmarks"], data["landmarks"])
        return {"alignment": pick(result, _ALIGNMENT_KEYS), "plot": result["ced"]}

    @staticmethod
    def markdown(report: Mapping[str, Any]) -> list[str]:
        rows = [[run_name, str(a["num_images"]), cell(a["nrmse"]), cell(a["failure_rate"]),
                 cell(a["ced_auc"])]
                for run_name, entry in report["runs"].items() if (a := entry.get("alignment"))]
        if not rows:
            return []
        lines = ["## Alignment", "",
                 "Wang et al. 2017 NRMSE: mean point-to-point error / inter-ocular distance of "
                 "the ground truth, 5 points, in network-input pixels.", ""]
        lines += table(["run", "images", "NRMSE", "failure rate (>0.1)", "CED AUC (0-0.2)"],
                       rows)
        return lines + [""]

    @staticmethod
    def plots(report: Mapping[str, Any], curves: Mapping[str, Any], out_dir: str) -> list[str]:
        if not curves:
            return []
        return metrics.plot_ced(os.path.join(out_dir, "ced_alignment.png"), dict(curves),
                                title="Alignment: cumulative NRMSE distribution")


# --- model facts -------------------------------------------------------------------------------

class ModelFacts(Evaluator):
    """Backbone parameters, MACs and median batch-1 CPU latency of each checkpoint run
    (:meth:`Embedder.model_facts`, ``latency_repeats`` timed forward passes)."""

    def __init__(self, *, latency_repeats: int = 20):
        self.latency_repeats = latency_repeats

    def evaluate(self, run: Run) -> dict[str, Any]:
        if not run.embeds_images:
            return {}
        return {"model": run.model_facts(latency_repeats=self.latency_repeats)}

    @staticmethod
    def markdown(report: Mapping[str, Any]) -> list[str]:
        rows = []
        for run_name, entry in report["runs"].items():
            m = entry.get("model")
            if m:
                rows.append([run_name, f"{m['params'] / 1e6:.3f} M", f"{m['macs'] / 1e6:.2f} M",
                             f"{m['latency_ms']:.2f}",
                             "x".join(str(v) for v in m.get("input_size", []))])
            elif entry.get("kind") == "embeddings":
                rows.append([run_name, "—", "—", "—", "exported embeddings"])
        if not any(r[1] != "—" for r in rows):
            return []
        lines = ["## Models", "",
                 "Parameters of the backbone (heads excluded); MACs = multiply-accumulates of "
                 "one forward pass; latency = median batch-1 CPU forward time.", ""]
        lines += table(["run", "params", "MACs", "batch-1 CPU latency (ms)", "input"], rows)
        return lines + [""]


EVALUATORS = (Verification, Identification, Classification, IjbVerification, Alignment,
              ModelFacts)
"""Every protocol, in the report's order: :func:`markdown_table`'s default renderers."""
