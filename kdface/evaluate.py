r"""`python -m kdface.evaluate`: compare a teacher and its students under the papers' protocols.

  python -m kdface.evaluate --runs=teacher=runs/teacher,student=runs/kd_im \
      --val_data=lfw.bin,cfp_fp.bin,lfw/pairs.txt=lfw/images --lr_sizes=8,12,16,20 --flip \
      --identification_data=scface_like.rec --distractors=megaface_emb.npy \
      --top1_data=casia_webface.rec --alignment_data=celeba_landmarks --out=report

Runs (``--runs=name=PATH,...``): a kdface training workdir (``config.json`` + ``checkpoints/``;
the latest checkpoint's student network is rebuilt as trained; a ``generations`` parent uses its
last ``gen_k``); a third-party teacher ``pth:[ARCH:]FILE`` / ``onnx:[ARCH:]FILE`` (an insightface
IResNet: ``backbone.pth``, arcface_torch's ``checkpoint_gpu_0.pt``, or a ``torch2onnx.py``
export; or any face-recognition ONNX graph, run as the graph: OpenCV Zoo's SFace, insightface's
``w600k_mbf.onnx``; read as the trainer's ``--teacher`` reads it); or an
``.npz`` of exported embeddings, so a model without a checkpoint (another framework's, or a run
exported earlier) is compared side by side.

Protocols, each optional:

* Verification (``--val_data``: insightface ``.bin``, ``pairs.txt[=IMAGE_ROOT]``, or a
  verification set built in ``--data_dir``): 10-fold accuracy mean ± std (threshold chosen on
  nine folds, applied to the tenth; folds = contiguous blocks in file order), best-threshold
  accuracy, ROC/AUC, TAR@FAR for ``--far_targets`` (a FAR is "n/s", not supported, when some
  nine-fold training split has fewer than 1/FAR negative pairs; the markdown says which);
  ``--flip`` sums the image and mirrored-image embeddings. ``--protocol=insightface`` gives the
  numbers of insightface's verification script instead (0.01 squared-distance grid, TAR@FAR
  interpolated in the training FAR table, flip on unless ``--flip=false``); the report states
  which protocol was used.
* IJB-B/C 1:1 verification (``--ijb=IJBC:ROOT``): insightface's IJB protocol (crops aligned by
  their landmarks, image + mirror features times the face score, media-averaged template
  features, TAR at the ROC point nearest each of ``--ijb_far_targets``).
* LR protocol (Wang et al. 2019 §3.1): one row per ``--lr_sizes`` entry; the gallery image (first
  of each pair) is kept, the probe is blurred, downscaled to N px and scaled back.
* Identification (``--identification_data``: a labelled dataset, see below): per identity the
  first image in dataset order is the gallery image and the rest are probes (dataset order:
  record order of a ``.rec``; sorted file names of a folder; for a built set, the order tfds
  stored, which is fixed but not the source's); optional
  distractors from ``--distractors`` (one ``.npy`` float [M, D] shared by all runs, memory-
  mapped) or ``--distractor_data`` (a dataset embedded by each run; labels ignored). Rank-k
  accuracy, TPR at FPR (all probe-item pairs), DIR at FPIR, computed in probe x item chunks
  (``--probe_chunk`` x ``--item_chunk``) so a million distractors fit in memory: measured on
  synthetic D=512 embeddings, 100k probes x 1M distractors took 1,420 s and 2.0 GiB of working
  memory (4.3 GiB process peak with the 2.2 GiB of inputs) on the 2-core CPU
  (benchmarks/IDENTIFICATION_SCALE.md), and Wang et al. 2017's
  nearest-neighbour top-1 verification (Euclidean, leave-one-out over gallery + probes:
  give a dataset of identities held out from training).
* Classification top-1 (``--top1_data``: the runs' training data; Wang et al. 2017 Tables 1-2
  "Top1 acc"): a held-out split of the training identities' images, per identity the
  ``floor(--top1_fraction x d)`` images (of ``d`` distinct ones, at most ``d - 1``) whose seeded
  content hash (``--top1_seed``; label + stored image bytes, so a ``.rec`` and the tfds set built
  from it split alike) is smallest; the argmax over each run's own trained head (its class count
  must be the data's) is compared with the label; top-1 = the fraction equal. The paper's
  proportion is not given ("we randomly split them into training and testing samples"): 0.1 is
  kdface's choice. A run whose ``config.json`` records no ``holdout_fraction`` trained on the
  test images too: its row says "held out: no" (a training-set figure). Test view: a
  ``--crop_from`` run's centre crop, else the resized image; no flip.
* Alignment (``--alignment_data``: a labelled dataset with 5-point landmarks): NRMSE of runs
  trained with ``--recipe=transfer --transfer_task=alignment`` (Wang et al. 2017). Predictions
  and ground truth are compared in pixels of the network input, the frame the training targets
  use (the pipeline scales landmarks with the image resize); normalized by the inter-ocular
  distance (points 0, 1) of the ground truth; failure rate at 0.1 and the CED.
* Model facts of checkpoint runs: backbone parameters, MACs (multiply-accumulates of one forward
  pass at the run's input size) and median batch-1 CPU latency.

Labelled datasets: a training set built in ``--data_dir`` (by name) or its directory, an
insightface ``.rec`` (+ ``.idx``), or a folder per identity; ``--landmarks=CSV`` adds landmarks to
a ``.rec`` / folder source (keys as ``kdface.data.build_training_dataset`` uses them).

Exported embeddings (``.npz``; ``--export_embeddings=FILE.npz`` for one run, or a directory for
``<run>.npz`` per run, writes them from the configured sets and datasets):

* ``<set>/emb`` float [2P, D]: embeddings of the set's images in file order (pair i = rows
  2i, 2i + 1) and ``<set>/issame`` bool [P]; plain ``emb`` / ``issame`` serve any set.
  ``<set>/lr<N>/emb``: the same with the probes degraded to N px.
* ``gallery_emb`` [G, D], ``gallery_labels`` int [G], ``probe_emb`` [Q, D], ``probe_labels`` int
  [Q], optional ``distractor_emb`` [M, D] (used before a shared ``--distractors``).
* ``flip`` bool: whether the embeddings are image + flip (noted when it differs from --flip).

Output in ``--out``: ``report.json``, ``report.md``, ``roc_<set>.png`` (every run on one figure),
``lr_<set>.png`` (accuracy vs probe size), ``ced_alignment.png``.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from kdface._cli import UsageError, parse_command_line, report_usage_error
from kdface.evaluation import (Alignment, Classification, IjbVerification, Identification,
                               ModelFacts, Verification, compare, export_embeddings, load_sets,
                               markdown_table, open_face_records, open_run, parse_ijb_spec)

PROG = "kdface.evaluate"


def define_flags(fv):
    """Defines the command's flags on an absl ``FlagValues`` (not the global one, so that
    importing this module next to another command's flags never clashes)."""
    from absl import flags
    d = dict(flag_values=fv)
    flags.DEFINE_list("runs", [], "name=PATH,...: kdface training workdirs, third-party "
                      "teachers pth:[ARCH:]FILE (insightface IResNets) / onnx:[ARCH:]FILE (any "
                      "face-recognition ONNX graph), or "
                      "exported embedding .npz files. Required.", **d)
    flags.DEFINE_list("val_data", [], "Verification sets: .bin paths, pairs.txt[=IMAGE_ROOT] "
                      "paths, or names of sets built in --data_dir.", **d)
    flags.DEFINE_string("data_dir", "data", "tfds data directory of built datasets.", **d)
    flags.DEFINE_string("pairs_image_root", None, "Image root of pairs.txt entries without "
                        "=ROOT (default: the pairs file's folder).", **d)
    flags.DEFINE_string("pairs_ext", "jpg", "Image extension of pairs.txt sets.", **d)
    flags.DEFINE_list("lr_sizes", ["8", "12", "16", "20"], "LR probe sizes in px, one row "
                      "each (Wang et al. 2019 §3.1: 8, 12, 16, 20); empty for none.", **d)
    flags.DEFINE_enum("protocol", "exact", ["exact", "insightface"], "Verification protocol: "
                      "'exact' (kdface's: every distinct threshold, exact TAR@FAR) or "
                      "'insightface' (insightface's verification script number for number: "
                      "0.01 distance grid, interpolated TAR@FAR, flip on by default).", **d)
    flags.DEFINE_bool("flip", None, "Embed image + mirrored image (insightface's "
                      "'Accuracy-Flip'). Default: on with --protocol=insightface, off with "
                      "exact.", **d)
    flags.DEFINE_integer("folds", 10, "Verification folds (10, the LFW protocol).", **d)
    flags.DEFINE_list("far_targets", ["1e-1", "1e-2", "1e-3", "1e-4", "1e-5", "1e-6"],
                      "FARs of the TAR@FAR table.", **d)
    flags.DEFINE_string("identification_data", None, "Labelled dataset for identification: "
                        "first image per identity = gallery, the rest = probes.", **d)
    flags.DEFINE_string("distractors", None, "Shared distractor embeddings .npy [M, D].", **d)
    flags.DEFINE_string("distractor_data", None, "Distractor images (a dataset) embedded by "
                        "each run.", **d)
    flags.DEFINE_list("ranks", ["1", "5", "10"], "Ranks k of rank-k identification accuracy "
                      "(Nikitin et al. 2020 MegaFace: 1 and 10).", **d)
    flags.DEFINE_list("fpr_targets", ["1e-3", "1e-4", "1e-5", "1e-6"], "FPRs of the "
                      "identification TPR@FPR (Nikitin et al. 2020 MegaFace: 1e-6).", **d)
    flags.DEFINE_integer("probe_chunk", 1024, "Probes per similarity block.", **d)
    flags.DEFINE_integer("item_chunk", 16384, "Gallery/distractor items per similarity block.",
                         **d)
    flags.DEFINE_list("ijb", [], "IJB-B/C 1:1 verification sets NAME:ROOT (NAME IJBB or "
                      "IJBC; ROOT holds meta/ and loose_crop/ as insightface's IJB evaluation "
                      "expects), e.g. IJBC:/data/IJB_release/IJBC.", **d)
    flags.DEFINE_list("ijb_far_targets", ["1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"],
                      "FARs of the IJB TAR@FAR table.", **d)
    flags.DEFINE_string("top1_data", None, "The runs' training data (built set name or "
                        "directory, .rec, folder per identity) for Wang et al. 2017's "
                        "classification top-1: argmax of each run's own head on a held-out "
                        "split of its training identities' images.", **d)
    flags.DEFINE_float("top1_fraction", 0.1, "Held-out fraction of each identity's images "
                       "for --top1_data (Wang et al. 2017: \"we randomly split them into "
                       "training and testing samples\", proportion not given: kdface's "
                       "choice 0.1).", **d)
    flags.DEFINE_integer("top1_seed", 0, "Seed of the --top1_data split (a seeded hash of "
                         "each image's label and bytes).", **d)
    flags.DEFINE_string("alignment_data", None, "Labelled dataset with 5-point landmarks for "
                        "the NRMSE of landmark-head runs (Wang et al. 2017).", **d)
    flags.DEFINE_string("landmarks", None, "Landmarks CSV for a .rec/folder alignment "
                        "dataset.", **d)
    flags.DEFINE_bool("model_facts", True, "Report parameters, MACs and batch-1 CPU "
                      "latency.", **d)
    flags.DEFINE_integer("latency_repeats", 20, "Timed batch-1 forward passes (median).", **d)
    flags.DEFINE_integer("batch_size", 128, "Images per forward pass.", **d)
    flags.DEFINE_string("export_embeddings", None, "Write embeddings instead of a report: "
                        "FILE.npz (one run) or a directory (<run>.npz per run).", **d)
    flags.DEFINE_string("out", "report", "Output directory of the report.", **d)
    return fv


def _numbers(name: str, values: Sequence[str], convert, noun: str, accept, rule: str) -> list:
    """``values`` of list flag ``--name`` converted one by one; a value ``convert`` refuses is
    "not ``noun``", one ``accept`` refuses breaks ``rule``."""
    out = []
    for v in values:
        try:
            out.append(convert(v))
        except ValueError:
            raise UsageError(f"--{name}: {v!r} is not {noun}") from None
        if not accept(out[-1]):
            raise UsageError(f"--{name}: {v!r} {rule}")
    return out


def _ints(name: str, values: Sequence[str]) -> list[int]:
    return _numbers(name, values, int, "an integer", lambda v: v >= 1, "must be >= 1")


def _rates(name: str, values: Sequence[str]) -> list[float]:
    return _numbers(name, values, float, "a number", lambda v: 0.0 < v <= 1.0,
                    "must lie in (0, 1]")


def parse_runs(items: Sequence[str]) -> dict[str, str]:
    """``['name=PATH', ...]`` -> ``{name: PATH}`` with clear errors."""
    runs: dict[str, str] = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise UsageError(f"--runs entry {item!r} is not name=PATH")
        if name in runs:
            raise UsageError(f"--runs names {name!r} twice")
        runs[name] = path
    return runs


def _sets_from_files(runs: dict) -> dict:
    """Verification sets named by exported-embedding files (used when --val_data is empty)."""
    if any(run.embeds_images for run in runs.values()):
        return {}
    sets = {}
    for f in runs.values():
        names = f.set_names() or (["embeddings"] if "issame" in f.arrays else [])
        for name in names:
            sets.setdefault(name, (None, f.issame(name)))
    return sets


def parse_settings(fv) -> dict:
    """The flags that carry lists and counts, checked and converted before any file is read."""
    if fv.folds < 2:
        raise UsageError(f"--folds must be >= 2, got {fv.folds}")
    for name in ("batch_size", "latency_repeats", "probe_chunk", "item_chunk"):
        if getattr(fv, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(fv, name)}")
    if not 0.0 < fv.top1_fraction < 1.0:
        raise UsageError(f"--top1_fraction must lie in (0, 1), got {fv.top1_fraction:g}")
    if fv.top1_seed < 0:
        raise UsageError(f"--top1_seed must be >= 0, got {fv.top1_seed}")
    try:
        ijb = [parse_ijb_spec(entry) for entry in fv.ijb]
    except ValueError as err:
        raise UsageError(f"--ijb: {err}") from None
    return {"lr_sizes": _ints("lr_sizes", fv.lr_sizes),
            "far_targets": _rates("far_targets", fv.far_targets), "ijb": ijb,
            "ijb_far_targets": _rates("ijb_far_targets", fv.ijb_far_targets),
            "fpr_targets": _rates("fpr_targets", fv.fpr_targets), "ranks": _ints("ranks", fv.ranks)}


def _records(fv, spec, **kwargs):
    return None if spec is None else open_face_records(spec, data_dir=fv.data_dir, **kwargs)


def build_evaluators(fv, settings: dict, sets: dict, opened: dict) -> list:
    """The protocol objects the flags ask for, in the report's order: verification (with the
    LR probes), identification, classification top-1, IJB, alignment, model facts."""
    verification = Verification(sets, lr_sizes=settings["lr_sizes"], protocol=fv.protocol,
                                flip=fv.flip, folds=fv.folds,
                                far_targets=settings["far_targets"])
    ident = _records(fv, fv.identification_data)
    evaluators = [verification, Identification(
        ident, distractors=fv.distractors, distractor_records=_records(fv, fv.distractor_data),
        flip=verification.flip, ranks=settings["ranks"], fpr_targets=settings["fpr_targets"],
        probe_chunk=fv.probe_chunk, item_chunk=fv.item_chunk)]
    if fv.top1_data is not None:
        evaluators.append(Classification(_records(fv, fv.top1_data), fraction=fv.top1_fraction,
                                         seed=fv.top1_seed))
    if settings["ijb"]:
        evaluators.append(IjbVerification(settings["ijb"],
                                          far_targets=settings["ijb_far_targets"]))
    if fv.alignment_data is not None:
        evaluators.append(Alignment(_records(fv, fv.alignment_data, landmarks=fv.landmarks)))
    if fv.model_facts:
        evaluators.append(ModelFacts(latency_repeats=fv.latency_repeats))
    files = not all(run.embeds_images for run in opened.values())
    if not (sets or settings["ijb"] or files or ident is not None or fv.alignment_data
            or fv.top1_data):
        raise ValueError("nothing to evaluate: give verification sets, IJB sets, "
                         "identification data, top-1 data or alignment data")
    return evaluators


def run_command(fv) -> int:
    """Runs the parsed flags ``fv``: the comparison report or, with --export_embeddings, the
    export. Returns the exit status."""
    runs = parse_runs(fv.runs)
    if not runs:
        raise UsageError("--runs is required (name=workdir or name=embeddings.npz)")
    settings = parse_settings(fv)
    sets = load_sets(fv.val_data, data_dir=fv.data_dir, pairs_image_root=fv.pairs_image_root,
                     pairs_ext=fv.pairs_ext)
    if fv.export_embeddings:
        return _export(fv, runs, sets, settings["lr_sizes"])
    opened = {name: open_run(path, batch_size=fv.batch_size) for name, path in runs.items()}
    if not sets and not fv.val_data:
        sets = _sets_from_files(opened)
    evaluators = build_evaluators(fv, settings, sets, opened)
    report = compare(opened, evaluators, out_dir=fv.out)
    print(markdown_table(report, evaluators))
    print(f"report written to {os.path.abspath(fv.out)} (report.md, report.json, plots)")
    return 0


def _export(fv, runs: dict, sets: dict, lr_sizes: list[int]) -> int:
    """Writes each run's embeddings of the configured sets and datasets (``.npz``), with the
    flip the report would use (the verification protocol's)."""
    flip = Verification({}, protocol=fv.protocol, flip=fv.flip).flip
    ident, distr = _records(fv, fv.identification_data), _records(fv, fv.distractor_data)
    target = fv.export_embeddings
    single = target.endswith(".npz")
    if single and len(runs) != 1:
        raise UsageError(f"--export_embeddings={target} is one file but --runs names "
                         f"{len(runs)} runs; give a directory to export <run>.npz for each")
    for name, path in runs.items():
        if path.endswith(".npz"):
            raise UsageError(f"run {name!r} is already an embedding file ({path})")
        out = target if single else os.path.join(target, f"{name}.npz")
        keys = export_embeddings(open_run(path, batch_size=fv.batch_size), out, sets=sets,
                                 lr_sizes=lr_sizes, flip=flip, identification_data=ident,
                                 distractor_data=distr)
        print(f"{name}: wrote {out} ({', '.join(keys)})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: parses ``argv`` (``sys.argv`` if None; ``argv[0]`` is the program).

    Returns 0 on success, 2 for an unusable command line (unknown flag, bad value; the message
    goes to stderr), 1 when the inputs cannot be evaluated (missing files, mismatched labels).
    """
    from absl import flags

    from kdface._cli import silence_logs
    argv = list(sys.argv if argv is None else argv)
    silence_logs(False)  # orbax's INFO lines on every checkpoint read would bury the report
    try:
        fv = parse_command_line(define_flags, argv, __doc__)
        return 0 if fv is None else run_command(fv)
    except (flags.Error, UsageError) as err:
        return report_usage_error(PROG, err)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
