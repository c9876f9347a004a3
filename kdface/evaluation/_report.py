"""Side-by-side comparison of runs: ``compare`` computes, ``markdown_table`` and the PNG plots
present. The report layout is documented in :mod:`kdface.evaluate`."""
from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kdface import metrics
from kdface.evaluation._embedder import Embedder, EmbeddingFile
from kdface.evaluation._ijb import ijb_report, parse_ijb_spec
from kdface.evaluation._imported import TeacherEmbedder
from kdface.evaluation._protocols import (alignment_report, check_lr_sizes,
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


def open_run(spec: Any, *, batch_size: int = 128) -> Embedder | EmbeddingFile:
    """A run from a training workdir (:class:`Embedder`), a third-party teacher file
    ``pth:[ARCH:]PATH`` / ``onnx:[ARCH:]PATH`` (:class:`TeacherEmbedder`, an Embedder), an
    ``.npz`` of exported embeddings (:class:`EmbeddingFile`), or either object as is."""
    from kdface.interop import is_imported_teacher
    if isinstance(spec, (Embedder, EmbeddingFile)):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"a run must be a workdir, a pth:/onnx: teacher file, an .npz path, an "
                        f"Embedder or an EmbeddingFile, got {type(spec).__name__}")
    if is_imported_teacher(os.fspath(spec)):
        return TeacherEmbedder(os.fspath(spec), batch_size=batch_size)
    if os.fspath(spec).endswith(".npz"):
        return EmbeddingFile(spec)
    return Embedder(spec, batch_size=batch_size)


def _ijb_sets(ijb: Any) -> list[tuple[str, str]]:
    """``[(name, root)]`` from None, one ``(name, root)``, a ``'NAME:ROOT'`` string or a list."""
    if ijb is None:
        return []
    items = [ijb] if isinstance(ijb, (str, tuple)) else list(ijb)
    out = []
    for item in items:
        name, root = parse_ijb_spec(item) if isinstance(item, str) else item
        out.append((str(name).upper(), os.fspath(root)))
    if len({n for n, _ in out}) != len(out):
        raise ValueError(f"IJB sets named twice: {[n for n, _ in out]}")
    return out


def _pick(result: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: result[k] for k in keys if k in result}


def _min_train_negatives(issame: np.ndarray, folds: int) -> int:
    neg = ~np.asarray(issame, bool)
    return int(min(neg.sum() - neg[a:b].sum() for a, b in fold_bounds(neg.size, folds)))


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


def compare(runs: Mapping[str, Any], sets: Mapping[str, tuple[Any, Any]], *,
            lr_sizes: Sequence[int] = (), flip: bool | None = None,
            protocol: str = "exact", out_dir: str | None = None,
            model_facts: bool = True, folds: int = 10,
            far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
            identification_data: Any = None, distractors: Any = None,
            distractor_data: Any = None, ranks: Sequence[int] = DEFAULT_RANKS,
            fpr_targets: Sequence[float] = DEFAULT_FPR_TARGETS, probe_chunk: int = 1024,
            item_chunk: int = 16384, alignment_data: Any = None, landmarks: str | None = None,
            data_dir: str = "data", batch_size: int = 128,
            latency_repeats: int = 20, ijb: Any = None,
            ijb_far_targets: Sequence[float] = IJB_FAR_TARGETS) -> dict[str, Any]:
    """Evaluates every run on every protocol asked for; writes the report to ``out_dir``.

    runs: ``{name: workdir | .npz path | Embedder | EmbeddingFile}``. sets: ``{name: (images
    uint8 [2P, H, W, 3] or None, issame [P])}`` (``kdface.evaluate.load_sets``; images None =
    exported embeddings only). lr_sizes: probe sizes of Wang et al. 2019's LR protocol, one row
    each. identification_data: a labelled dataset (``open_face_records``) split per identity
    into gallery (first image) and probes (the rest), embedded by each checkpoint run;
    embedding-file runs use their own ``gallery_*``/``probe_*`` arrays. distractors: a shared
    ``.npy`` [M, D] (memory-mapped) or array; distractor_data: a dataset embedded per run.
    alignment_data: a dataset with 5-point landmarks (NRMSE of runs with a landmark head).
    protocol: the verification protocol, ``'exact'`` (kdface's) or ``'insightface'``
    (insightface's grids and interpolated TAR@FAR, numbers equal to its script's;
    ``kdface.metrics.verification``); flip: image + mirror embeddings, None = the protocol's
    own choice (on for insightface, whose headline number is "Accuracy-Flip"; off for exact).
    ijb: ``(name, root)`` or a list of them: IJB-B/C 1:1 verification of each checkpoint run
    (:func:`kdface.evaluation.ijb_report`).

    Returns the report dict (also ``report.json``); with ``out_dir``: ``report.json``,
    ``report.md`` (:func:`markdown_table`), ``roc_<set>.png`` (all runs on one figure per set),
    ``lr_<set>.png`` (accuracy vs probe size) and ``ced_alignment.png``.
    """
    t_start = time.perf_counter()
    lr_sizes = check_lr_sizes(lr_sizes)
    if not runs:
        raise ValueError("no runs to compare")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    flip = (protocol == "insightface") if flip is None else bool(flip)
    ijb_sets = _ijb_sets(ijb)
    opened = {name: open_run(spec, batch_size=batch_size) for name, spec in runs.items()}
    has_files = any(isinstance(r, EmbeddingFile) for r in opened.values())
    if not (sets or ijb_sets or has_files) and identification_data is None \
            and alignment_data is None:
        raise ValueError("nothing to evaluate: give verification sets, IJB sets, "
                         "identification data or alignment data")
    shared_distr = _load_distractors(distractors)
    ident_records = (None if identification_data is None else
                     open_face_records(identification_data, data_dir=data_dir))
    distr_records = (None if distractor_data is None else
                     open_face_records(distractor_data, data_dir=data_dir))
    if shared_distr is not None and distr_records is not None:
        raise ValueError("give distractors either as a shared .npy or as a dataset, not both")
    align_records = (None if alignment_data is None else
                     open_face_records(alignment_data, data_dir=data_dir, landmarks=landmarks))

    report: dict[str, Any] = {
        "protocol": {"verification": protocol, "folds": folds, "flip": bool(flip),
                     "score": "cosine" if protocol == "exact" else "squared_l2",
                     "far_targets": list(far_targets), "lr_sizes": lr_sizes,
                     "ranks": list(ranks), "fpr_targets": list(fpr_targets)},
        "lr_sizes": lr_sizes, "sets": {}, "runs": {}}
    for set_name, (images, issame) in sets.items():
        issame = np.asarray(issame).astype(bool)
        report["sets"][set_name] = {
            "num_pairs": int(issame.size), "num_positive": int(issame.sum()),
            "num_negative": int((~issame).sum()),
            "min_train_negatives": _min_train_negatives(issame, folds),
            "image_size": None if images is None else list(np.asarray(images).shape[1:3])}
    if ident_records is not None:
        report["identification"] = {
            "data": ident_records.name, "split": "first image per identity = gallery",
            "distractors": ("shared file" if shared_distr is not None else
                            distr_records.name if distr_records is not None else None)}
    if ijb_sets:
        report["ijb"] = {"sets": [n for n, _ in ijb_sets], "far_targets": list(ijb_far_targets),
                         "flip": True, "face_score": True, "keep_norm": True}
    if align_records is not None:
        report["alignment"] = {"data": align_records.name, "normalization": "inter_ocular",
                               "frame": "network-input pixels"}

    rocs: dict[str, dict[str, Any]] = {name: {} for name in sets}
    ceds: dict[str, Any] = {}
    for run_name, run in opened.items():
        t_run = time.perf_counter()
        entry: dict[str, Any] = {"notes": []}
        if isinstance(run, TeacherEmbedder):
            entry.update(kind="imported teacher", source=run.spec, arch=run.arch)
            if model_facts:
                entry["model"] = run.model_facts(latency_repeats=latency_repeats)
        elif isinstance(run, Embedder):
            entry.update(kind="checkpoint", source=run.workdir, step=run.step)
            if model_facts:
                entry["model"] = run.model_facts(latency_repeats=latency_repeats)
        else:
            entry.update(kind="embeddings", source=run.path)
            if run.flip is not None and run.flip != bool(flip):
                entry["notes"].append(f"embeddings exported with flip={run.flip}, report asks "
                                      f"flip={bool(flip)}; the file's embeddings are used")
        entry["verification"] = {}
        for set_name, (images, issame) in sets.items():
            kw = dict(folds=folds, far_targets=far_targets, protocol=protocol)
            if isinstance(run, Embedder):
                if images is None:
                    raise ValueError(f"set {set_name!r} has no images: run {run_name!r} needs "
                                     f"them (only exported-embedding runs can go without)")
                hr = verification_report(run, images, issame, flip=flip, **kw)
                lr = lr_report(run, images, issame, lr_sizes, flip=flip, **kw)
            else:
                emb = run.pair_embeddings(set_name, issame)
                if emb is None:
                    entry["notes"].append(f"no embeddings for set {set_name!r} in the file")
                    continue
                hr = verification_from_embeddings(emb, issame, **kw)
                lr = {}
                for s in lr_sizes:
                    lr_emb = run.pair_embeddings(set_name, issame, lr_size=s)
                    if lr_emb is None:
                        entry["notes"].append(f"no {s} px probe embeddings for {set_name!r}")
                    else:
                        lr[s] = verification_from_embeddings(lr_emb, issame, **kw)
            rocs[set_name][run_name] = hr["roc"]
            entry["verification"][set_name] = {
                "hr": _pick(hr, _VERIFICATION_KEYS),
                "lr": {str(s): _pick(r, _VERIFICATION_KEYS) for s, r in lr.items()}}

        ident = None
        if isinstance(run, Embedder) and ident_records is not None:
            ident = identification_arrays(run, ident_records, flip=flip,
                                          distractor_records=distr_records)
        elif isinstance(run, EmbeddingFile):
            ident = run.identification_arrays()
            if ident is None and ident_records is not None:
                entry["notes"].append("the embedding file holds no identification arrays")
        if ident is not None:
            distr = ident.get("distractor_emb")
            if distr is None:
                distr = shared_distr
            entry["identification"] = _pick(identification_report(
                ident["probe_emb"], ident["probe_labels"], ident["gallery_emb"],
                ident["gallery_labels"], distractor_emb=distr, ranks=ranks,
                fpr_targets=fpr_targets, probe_chunk=probe_chunk, item_chunk=item_chunk),
                _IDENTIFICATION_KEYS)

        if align_records is not None:
            if isinstance(run, Embedder) and run.has_landmarks:
                data = embed_records(run, align_records, with_landmarks=True)
                result = alignment_report(data["pred_landmarks"], data["landmarks"])
                entry["alignment"] = _pick(result, _ALIGNMENT_KEYS)
                ceds[run_name] = result["ced"]
            else:
                entry["notes"].append("no landmark head: alignment not evaluated")
        for ijb_name, ijb_root in ijb_sets:
            if isinstance(run, Embedder):
                result = ijb_report(run, ijb_root, ijb_name, far_targets=ijb_far_targets)
                entry.setdefault("ijb", {})[ijb_name] = _pick(result, _IJB_KEYS)
                rocs.setdefault(ijb_name, {})[run_name] = {
                    "fpr": result["roc"]["fpr"], "tpr": result["roc"]["tpr"]}
            else:
                entry["notes"].append(f"{ijb_name} needs images: not evaluated for an "
                                      f"embedding file")
        entry["seconds"] = time.perf_counter() - t_run
        report["runs"][run_name] = entry
    report["seconds"] = time.perf_counter() - t_start
    if out_dir:
        write_report(report, out_dir, rocs=rocs, ceds=ceds)
    return report


def _file_part(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_json_and_markdown(out_dir: str, stem: str, report: Mapping[str, Any],
                            markdown: str) -> list[str]:
    """Writes ``<stem>.json`` (strict JSON: NaN/inf refused, see :func:`to_jsonable`) and
    ``<stem>.md`` in ``out_dir`` (created); returns the two paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.join(out_dir, f"{stem}.json"), os.path.join(out_dir, f"{stem}.md")]
    with open(written[0], "w") as f:
        json.dump(to_jsonable(report), f, indent=1, allow_nan=False)
    with open(written[1], "w") as f:
        f.write(markdown)
    return written


def write_report(report: dict[str, Any], out_dir: str, *,
                 rocs: Mapping[str, Any] | None = None,
                 ceds: Mapping[str, Any] | None = None) -> list[str]:
    """Writes ``report.json``, ``report.md`` and the plots; returns the paths written."""
    written = write_json_and_markdown(out_dir, "report", report, markdown_table(report))
    for set_name, curves in (rocs or {}).items():
        finite = {r: c for r, c in curves.items()
                  if np.all(np.isfinite(c["fpr"])) and np.all(np.isfinite(c["tpr"]))}
        if finite:
            path = os.path.join(out_dir, f"roc_{_file_part(set_name)}.png")
            written += metrics.plot_roc(path, finite, title=f"ROC on {set_name}")
    sizes = report["lr_sizes"]
    for set_name, info in report["sets"].items():
        if not sizes:
            break
        series, full = {}, {}
        for run_name, entry in report["runs"].items():
            ver = entry.get("verification", {}).get(set_name)
            if ver is None:
                continue
            series[run_name] = [ver["lr"].get(str(s), {}).get("accuracy") for s in sizes]
            # full-resolution probes are seen at the network's input size (the set's image
            # size only where the run's input size is unknown)
            side = entry.get("model", {}).get("input_size") or info["image_size"]
            if side:
                full[run_name] = (max(side), ver["hr"]["accuracy"])
        if series:
            path = os.path.join(out_dir, f"lr_{_file_part(set_name)}.png")
            written += metrics.plot_accuracy_vs_probe_size(
                path, sizes, series, full_resolution=full,
                title=f"{set_name}: accuracy vs probe size")
    if ceds:
        path = os.path.join(out_dir, "ced_alignment.png")
        written += metrics.plot_ced(path, ceds, title="Alignment: cumulative NRMSE distribution")
    return written


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: arrays -> lists, float keys -> ``'%g'`` strings, NaN/inf -> None."""
    if isinstance(obj, Mapping):
        return {(f"{k:g}" if isinstance(k, float) else str(k)): to_jsonable(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _get(mapping: Mapping[Any, Any], key: float | int) -> Any:
    """A FAR/FPR-keyed value from a live report (float keys) or a parsed one (string keys)."""
    if key in mapping:
        return mapping[key]
    return mapping.get(f"{key:g}")


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def _far_label(f: float) -> str:
    return f"{f:.0e}".replace("e-0", "e-")


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(head: Sequence[str], rows: list[list[str]]) -> list[str]:
    return [_row(head), "|" + "---|" * len(head), *[_row(r) for r in rows]]


def markdown_table(report: Mapping[str, Any]) -> str:
    """The report as markdown: verification accuracy (HR and one column per LR probe size),
    TAR@FAR (unsupported FARs marked and explained), identification, alignment, model facts."""
    proto = report.get("protocol", {})
    sizes = report["lr_sizes"]
    runs = report["runs"]
    lines = ["# kdface evaluation report", ""]
    if proto.get("verification", "exact") == "insightface":
        lines.append(
            f"Verification protocol: **insightface** (the numbers of insightface's "
            f"verification script): {proto.get('folds', 10)}-fold (sklearn KFold: contiguous "
            f"blocks in file order), squared L2 distance of normalized embeddings, threshold "
            f"from the grid 0, 0.01, ..., 3.99 chosen on the other folds; TAR@FAR at the "
            f"threshold interpolated (scipy 'slinear') in the training FAR table on the grid "
            f"0, 0.001, ..., 3.999, so a FAR below one training negative still gets a TAR. "
            f"Image+flip embeddings: {'yes' if proto.get('flip') else 'no'}.")
    else:
        lines.append(
            f"Verification protocol: **exact** (kdface's): {proto.get('folds', 10)}-fold "
            f"(sklearn KFold: contiguous blocks in file order), cosine score, threshold chosen "
            f"among every distinct split of the other folds' scores; TAR@FAR at the exact "
            f"(k+1)-th training negative. Image+flip embeddings: "
            f"{'yes' if proto.get('flip') else 'no'}. (--protocol=insightface gives "
            f"insightface's numbers.)")
    if sizes:
        lines.append("LR columns: Wang et al. 2019 LR protocol, gallery image kept, probe blurred "
                     "and downscaled to N px (longer side), then scaled back.")
    lines.append("")
    acc_rows, tar_rows = [], []
    fars = [float(f) for f in proto.get("far_targets", DEFAULT_FAR_TARGETS)]
    for run_name, entry in runs.items():
        for set_name, ver in entry.get("verification", {}).items():
            hr = ver["hr"]
            acc_rows.append([run_name, set_name,
                             f"{_num(hr['accuracy'])} ± {_num(hr['accuracy_std'])}",
                             _num(hr.get("best_threshold_accuracy")), _num(hr.get("auc")),
                             *[_num(ver["lr"].get(str(s), {}).get("accuracy")) for s in sizes]])
            unsupported = [float(u) for u in hr.get("tar_at_far_unsupported", [])]
            tar_rows.append([run_name, set_name, *[
                "n/s" if f in unsupported else _num(_get(hr["tar_at_far"], f)) for f in fars]])
    if acc_rows:
        lines += ["## Verification accuracy", ""]
        lines += _table(["run", "set", "accuracy (mean ± std)", "best-threshold acc", "AUC",
                         *[f"{s} px probe" for s in sizes]], acc_rows)
        lines += ["", "## TAR at FAR", ""]
        lines += _table(["run", "set", *[f"TAR@FAR={_far_label(f)}" for f in fars]], tar_rows)
        lines.append("")
        for set_name, info in report.get("sets", {}).items():
            if proto.get("verification", "exact") == "insightface":
                lines.append(f"- {set_name}: {info['num_pairs']} pairs, "
                             f"{info['num_negative']} negative.")
                continue
            need = info["min_train_negatives"]
            missing = [_far_label(f) for f in fars if f * need + 1e-9 < 1.0]
            text = (f"- {set_name}: {info['num_pairs']} pairs, {info['num_negative']} negative; "
                    f"the smallest training split (all folds but one) has {need} negatives, so "
                    f"FARs below 1/{need} cannot be set")
            lines.append(text + (f": n/s (not supported) at {', '.join(missing)}."
                                 if missing else " (every FAR asked is supported)."))
        lines.append("")
    ident_rows = []
    ident_ranks = [int(k) for k in proto.get("ranks", DEFAULT_RANKS)]
    fprs = [float(f) for f in proto.get("fpr_targets", DEFAULT_FPR_TARGETS)]
    for run_name, entry in runs.items():
        ident = entry.get("identification")
        if ident is None:
            continue
        tpr_unsup = [float(u) for u in ident.get("tpr_at_fpr_unsupported", [])]
        ident_rows.append([
            run_name, str(ident["num_gallery"]), str(ident["num_probes"]),
            str(ident["num_distractors"]),
            *[_num(_get(ident["rank_accuracy"], k)) for k in ident_ranks],
            *["n/s" if f in tpr_unsup else _num(_get(ident["tpr_at_fpr"], f)) for f in fprs],
            _num(ident.get("nn_top1")), f"{ident.get('seconds', float('nan')):.2f}"])
    if ident_rows:
        info = report.get("identification", {})
        lines += ["## Identification", ""]
        if info:
            lines.append(f"Data: {info.get('data')} ({info.get('split')}); distractors: "
                         f"{info.get('distractors') or 'none'}.")
        lines.append("Rank-k: a mated probe is right when fewer than k non-mates outscore its "
                     "best mate. TPR@FPR over all probe-item pairs (n/s: fewer than 1/FPR "
                     "impostor pairs). NN top-1: Wang et al. 2017 leave-one-out nearest "
                     "neighbour (Euclidean) over gallery + probes.")
        lines.append("")
        lines += _table(["run", "gallery", "probes", "distractors",
                         *[f"rank-{k}" for k in ident_ranks],
                         *[f"TPR@FPR={_far_label(f)}" for f in fprs], "NN top-1", "time (s)"],
                        ident_rows)
        lines.append("")
    ijb_info = report.get("ijb")
    if ijb_info:
        ijb_fars = [float(f) for f in ijb_info.get("far_targets", IJB_FAR_TARGETS)]
        ijb_rows = []
        for run_name, entry in runs.items():
            for ijb_name, r in entry.get("ijb", {}).items():
                ijb_rows.append([run_name, ijb_name, str(r["num_templates"]),
                                 str(r["num_pairs"]),
                                 *[_num(_get(r["tar_at_far"], f)) for f in ijb_fars],
                                 _num(r.get("auc"))])
        if ijb_rows:
            lines += ["## IJB 1:1 template verification", "",
                      "insightface's IJB protocol: crops aligned by their 5 landmarks, image + "
                      "mirror features added, times the face score, media-averaged, summed per "
                      "template and normalized; cosine of template pairs; TAR at the ROC point "
                      "whose FPR is nearest each target (sklearn roc_curve points).", ""]
            lines += _table(["run", "set", "templates", "pairs",
                             *[f"TAR@FAR={_far_label(f)}" for f in ijb_fars], "AUC"], ijb_rows)
            lines.append("")
    align_rows = [[run_name, str(a["num_images"]), _num(a["nrmse"]), _num(a["failure_rate"]),
                   _num(a["ced_auc"])]
                  for run_name, entry in runs.items() if (a := entry.get("alignment"))]
    if align_rows:
        lines += ["## Alignment", "",
                  "Wang et al. 2017 NRMSE: mean point-to-point error / inter-ocular distance of "
                  "the ground truth, 5 points, in network-input pixels.", ""]
        lines += _table(["run", "images", "NRMSE", "failure rate (>0.1)", "CED AUC (0-0.2)"],
                        align_rows)
        lines.append("")
    model_rows = []
    for run_name, entry in runs.items():
        m = entry.get("model")
        if m:
            model_rows.append([run_name, f"{m['params'] / 1e6:.3f} M", f"{m['macs'] / 1e6:.2f} M",
                               f"{m['latency_ms']:.2f}",
                               "x".join(str(v) for v in m.get("input_size", []))])
        elif entry.get("kind") == "embeddings":
            model_rows.append([run_name, "—", "—", "—", "exported embeddings"])
    if any(r[1] != "—" for r in model_rows):
        lines += ["## Models", "",
                  "Parameters of the backbone (heads excluded); MACs = multiply-accumulates of "
                  "one forward pass; latency = median batch-1 CPU forward time.", ""]
        lines += _table(["run", "params", "MACs", "batch-1 CPU latency (ms)", "input"],
                        model_rows)
        lines.append("")
    notes = [f"- {run_name}: {n}" for run_name, entry in runs.items()
             for n in entry.get("notes", [])]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)
