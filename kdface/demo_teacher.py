r"""`make demo-real-teacher`: a real pretrained ONNX teacher distilled into a MobileFaceNet.

    python -m kdface.demo_teacher --teacher=onnx:face_recognition_sface_2021dec_int8bq.onnx \
        --photos=my_photos/

1. Renders the synthetic identities at 112x112 (``kdface.data.make_synthetic_dataset``; held-out
   identities make the verification pairs) and builds them.
2. Turns ``--photos`` (one sub-folder of photographs per person) into a training set and a
   pair list with ``python -m data_prep.build photos`` (YuNet, 5-point alignment to 112x112);
   the pair list's own fold count (``min(10, pairs / 2)``: 3 for six photos of four people) is
   the ``--folds`` of every verification on it.
3. Trains a MobileFaceNet (128-d embedding, the size of SFace's) from the teacher on the
   synthetic set, ``--recipe=vargface`` by default (ArcFace + 7 x normalized L2 to the teacher's
   embedding: an embeddings-only teacher needs no head), verifying on the photos at the end.
4. Prints one table: teacher and student on the photos' pairs and the synthetic pairs (accuracy,
   AUC, lowest genuine and highest impostor cosine, and the student-teacher agreement: the mean
   cosine of their embeddings of the same faces), then that agreement on the training batches
   at the first and the last logged step (from the normalized-L2 term: cos = 1 - L / 2).

The teacher is any ``--teacher=onnx:PATH`` a run accepts (its input size must be 112x112, as
the synthetic faces and the photo crops are); a recipe whose terms compare embeddings needs a
128-d teacher, ``--recipe=pwr`` (relations only) takes any size. A rerun reuses the data and a
finished student (``--out``).
"""
from __future__ import annotations

import json
import os
import sys
import time

from kdface._cli import UsageError, parse_command_line, run_main, silence_logs

PROG = "kdface.demo_teacher"
INPUT = (112, 112)


def define_flags(fv):
    """The command's flags on their own ``FlagValues`` (kdface.train's share names)."""
    from absl import flags
    d = dict(flag_values=fv)
    flags.DEFINE_string("teacher", None, "The teacher: onnx:PATH (or any --teacher a run "
                        "takes). Required.", **d)
    flags.DEFINE_string("photos", None, "Folder of photographs, one sub-folder per person. "
                        "Required.", **d)
    flags.DEFINE_string("out", "demo_out/real_teacher", "Output directory (data, student run).",
                        **d)
    flags.DEFINE_integer("identities", 100, "Synthetic training identities.", **d)
    flags.DEFINE_integer("images_per_identity", 10, "Images per synthetic training identity.",
                         **d)
    flags.DEFINE_integer("steps", 150, "Student training steps.", **d)
    flags.DEFINE_integer("batch_size", 32, "Batch size.", **d)
    flags.DEFINE_float("learning_rate", 0.1, "Base learning rate (cosine schedule, SGD).", **d)
    flags.DEFINE_string("recipe", "vargface", "Distillation recipe (vargface, pwr, ...).", **d)
    flags.DEFINE_integer("seed", 0, "Seed of the data and the student.", **d)
    return fv


def build_data(out: str, photos: str, *, identities: int, images_per_identity: int,
               verification_pairs: int = 200, seed: int = 0) -> tuple[str, int]:
    """Renders (or reuses) the synthetic set ``synth_train`` / ``synth_val`` and builds the
    photos' ``photos`` training and verification sets in ``out/tfds``; returns (data_dir, the
    photos pair list's fold count)."""
    import numpy as np
    from data_prep import build as data_prep_build
    from kdface.data import load_verification_source, make_verification_arrays
    from kdface.data import make_synthetic_dataset
    data_dir = os.path.join(out, "tfds")
    params = {"identities": identities, "images_per_identity": images_per_identity,
              "verification_pairs": verification_pairs, "seed": seed, "version": 1}
    marker = os.path.join(out, "data", "params.json")
    if not (os.path.exists(marker) and json.load(open(marker)) == params):
        make_synthetic_dataset(os.path.join(out, "data"), num_identities=identities,
                               images_per_identity=images_per_identity,
                               num_verification_identities=20,
                               num_verification_pairs=verification_pairs,
                               seed=seed, data_dir=data_dir)
        with open(marker, "w") as f:
            json.dump(params, f)
    status = data_prep_build.main(["photos", photos, "--data-dir", data_dir, "--name", "photos",
                                   "--quiet"])
    if status:
        raise ValueError(f"data_prep.build photos {photos} failed (exit {status})")
    folds = make_verification_arrays(load_verification_source(data_dir, "photos"))[3]
    return data_dir, len(np.unique(folds))


def train_config(workdir: str, teacher: str, *, folds: int, steps: int, batch_size: int,
                 learning_rate: float = 0.1, recipe: str = "vargface", seed: int = 0):
    """The student's run: MobileFaceNet, 128-d, from ``teacher`` on ``synth_train``, verified on
    the photos with their ``folds`` at the last step."""
    from kdface.training import TrainConfig
    return TrainConfig(
        workdir=workdir, recipe=recipe, teacher=teacher, student="mobilefacenet",
        student_options={"embedding_size": 128}, input_size=INPUT, train_data="synth_train",
        val_data=("photos",), folds=folds, steps=steps, batch_size=batch_size, seed=seed,
        optimizer="sgd", learning_rate=learning_rate, schedule="cosine",
        warmup_steps=max(1, steps // 10), save_every=steps, eval_every=steps,
        log_every=max(1, min(10, steps // 10)), async_checkpoints=False)


def term_agreement(workdir: str) -> tuple[float, float] | None:
    """Student-teacher cosine on the training batches at the first and the last logged step,
    from the normalized-L2 term (mean of ||t/|t| - s/|s| ||^2 = 2 - 2 cos); None without it."""
    with open(os.path.join(workdir, "logs", "log.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r.get("kind") == "train"]
    values = [r["normalized_l2"] for r in rows if "normalized_l2" in r]
    if not values:
        return None
    return 1.0 - values[0] / 2.0, 1.0 - values[-1] / 2.0


def evaluate(teacher: str, student_dir: str, data_dir: str, folds: int) -> dict:
    """``{set: {model: {'accuracy', 'auc', 'genuine_min', 'impostor_max', 'agreement',
    'pairs'}}}`` for the photos (``folds`` folds) and the synthetic pairs (10 folds); agreement
    (mean cosine to the teacher's embedding of the same face) is None for a teacher of another
    embedding size."""
    import numpy as np
    from kdface.evaluation import Embedder, TeacherEmbedder, load_sets, verification_report
    models = {"teacher": TeacherEmbedder(teacher, batch_size=32),
              "student": Embedder(student_dir, batch_size=32)}
    sets = load_sets(["photos", "synth_val"], data_dir=data_dir)
    out = {}
    for name, (images, issame) in sets.items():
        emb = {}
        for model_name, model in models.items():
            e = np.asarray(model(images), np.float64)
            emb[model_name] = e / np.linalg.norm(e, axis=1, keepdims=True)
        out[name] = {}
        for model_name, e in emb.items():
            same = e.shape == emb["teacher"].shape
            report = verification_report(lambda _, e=e: e, images, issame,
                                         folds=folds if name == "photos" else 10)
            scores = np.sum(e[0::2] * e[1::2], axis=1)
            out[name][model_name] = {
                "accuracy": float(report["accuracy"]), "auc": float(report["auc"]),
                "genuine_min": float(scores[issame].min()),
                "impostor_max": float(scores[~issame].max()),
                "agreement": (float(np.mean(np.sum(e * emb["teacher"], axis=1))) if same
                              else None),
                "pairs": int(issame.size)}
    return out


def table(results: dict, agreement: tuple[float, float] | None, folds: int) -> str:
    lines = ["| model | set | accuracy | AUC | genuine min | impostor max | cos(student, "
             "teacher) |", "|---|---|---|---|---|---|---|"]
    for set_name, rows in results.items():
        k = folds if set_name == "photos" else 10
        label = f"{set_name} ({next(iter(rows.values()))['pairs']} pairs, {k}-fold)"
        for model, r in rows.items():
            agree = ("1" if model == "teacher" else "-" if r["agreement"] is None
                     else f"{r['agreement']:.3f}")
            lines.append(f"| {model} | {label} | {r['accuracy']:.3f} | {r['auc']:.3f} | "
                         f"{r['genuine_min']:.3f} | {r['impostor_max']:.3f} | {agree} |")
    if agreement is not None:
        lines.append(f"\nStudent-teacher cosine on the training batches: {agreement[0]:.3f} at "
                     f"the first step, {agreement[1]:.3f} at the last.")
    return "\n".join(lines)


def job(fv) -> int:
    """The four steps (module docstring) for the parsed flags ``fv``."""
    from kdface.training import run
    if not fv.teacher or not fv.photos:
        raise UsageError("--teacher and --photos are required")
    t_start = time.time()
    out = os.path.abspath(fv.out)
    print(f"[1/3] synthetic faces (112x112) and the photos' pairs -> {out}/tfds", flush=True)
    data_dir, folds = build_data(out, fv.photos, identities=fv.identities,
                                 images_per_identity=fv.images_per_identity, seed=fv.seed)
    print(f"    the photos' pair list has {folds} folds; {time.time() - t_start:.0f} s",
          flush=True)
    workdir = os.path.join(out, "runs", "student")
    print(f"[2/3] MobileFaceNet student from {fv.teacher} ({fv.recipe}, {fv.steps} steps of "
          f"{fv.batch_size}) -> {workdir}", flush=True)
    t0 = time.time()
    summary = run(train_config(workdir, fv.teacher, folds=folds, steps=fv.steps,
                               batch_size=fv.batch_size, learning_rate=fv.learning_rate,
                               recipe=fv.recipe, seed=fv.seed), data_dir=data_dir)
    print(f"    {json.dumps(summary.get('metrics', summary), default=str)}; "
          f"{time.time() - t0:.0f} s", flush=True)
    print("[3/3] teacher and student on the photos' pairs and the synthetic pairs", flush=True)
    t0 = time.time()
    results = evaluate(fv.teacher, workdir, data_dir, folds)
    print(f"    {time.time() - t0:.0f} s\n")
    print(table(results, term_agreement(workdir), folds))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{out}/results.json; total {time.time() - t_start:.0f} s")
    return 0


def main(argv=None) -> int:
    """Command-line entry (``argv[0]`` is the program): 0 when done; errors are one line."""
    argv = list(sys.argv if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    silence_logs(verbose)

    def body():
        fv = parse_command_line(define_flags, argv, __doc__)
        return 0 if fv is None else job(fv)
    return run_main(body, prog=PROG, verbose=verbose)


if __name__ == "__main__":
    sys.exit(main())
