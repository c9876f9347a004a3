r"""`make demo`: every method of the five papers distilled into one small student, one table.

1. Renders the synthetic identities (kdface.data.make_synthetic_dataset) through the real formats
   (``train.rec/.idx`` with landmarks, ``synth_val.bin``) and builds them with the tfds builders;
   a second, held-out set of identities with landmarks serves the alignment row's NRMSE. The
   verification pairs are also written at the networks' input size (``synth_val_32px.bin``):
   the LR probes are degraded from that size, which keeps the per-run evaluation at ~2 s
   instead of ~10 s (blurring 112 px probes dominated it, measured).
2. Trains the teacher once from scratch on the original images.
3. Runs ``kdface.compare`` with every method (kdface.comparison.METHODS): each one distils the
   teacher into the same small student, same LR-augmented data, same steps, batch, learning
   rate and seeds; the self-studied student is the baseline every row is read against.
4. Prints the table and writes ``demo_out/comparison/{comparison.md,comparison.json,*.png}``.

Budget (the defaults): 100 identities x 20 images at 32x32, teacher 300 steps, each student
60 steps at batch 64 (cosine schedule, lr 0.1), 3 seeds per row, 1000 verification pairs, LR
probes at 8, 12 and 16 px. The XLA compilation cache (``demo_out/jax_cache``) lets the second
and third seed of a method, and every evaluation, reuse the first one's compiled programs. A
rerun reuses the data, the teacher and every finished row.

The networks are the SphereFace residual family (Wang et al. 2019 Tables 1-2) at demo width; the
full-size recipes are the flagfiles in kdface/configs/.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

flags.DEFINE_string("out", "demo_out", "Output directory (data, runs, comparison).")
flags.DEFINE_integer("identities", 100, "Synthetic training identities.")
flags.DEFINE_integer("images_per_identity", 20, "Images per training identity.")
flags.DEFINE_integer("teacher_steps", 300, "Teacher training steps.")
flags.DEFINE_integer("student_steps", 60, "Training steps of every student row.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every row.")
flags.DEFINE_list("methods", [], "Rows (default: all; python -m kdface.compare "
                  "--list_methods).")
flags.DEFINE_integer("seed", 0, "Seed of the data and the teacher.")

F = flags.FLAGS

SIZE = 32
INPUT = (SIZE, SIZE)
LR_SIZES = (8, 12, 16)
# batch_norm: Wang et al. 2019's SphereFace nets have none, but without it these narrow nets
# barely move in a few hundred CPU steps (teacher cosface loss 10.9 after 500 steps, measured).
# One embedding size for both: MK-MMD, normalized L2 and the angular losses compare embeddings.
TEACHER = ("sphereface_custom", {"channels": (16, 32, 64, 128), "units": (1, 1, 1, 1),
                                 "embedding_size": 64, "input_size": INPUT, "batch_norm": True})
STUDENT = ("sphereface_custom", {"channels": (8, 16, 32, 64), "units": (0, 1, 0, 0),
                                 "embedding_size": 64, "input_size": INPUT, "batch_norm": True})
# What every row shares (and the teacher, but for its steps).
COMMON = dict(head="cosface", margin_scale=16.0, margin=0.1, input_size=INPUT,
              optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=5e-4,
              schedule="cosine", student_view="low_resolution", save_every=10_000,
              eval_every=10_000, log_every=25, async_checkpoints=False)


def _data(out: str) -> tuple[str, str, str]:
    """Renders (or reuses) the training set, the verification pairs at input size and the
    held-out alignment set; returns (data_dir, val .bin, alignment dataset name)."""
    import numpy as np
    from kdface.data import make_synthetic_dataset, make_verification_arrays
    from kdface.data import write_verification_bin
    data_dir = os.path.join(out, "tfds")
    params = {"identities": F.identities, "images_per_identity": F.images_per_identity,
              "seed": F.seed, "size": SIZE, "version": 2}
    marker = os.path.join(out, "data", "params.json")
    val_small = os.path.join(out, "data", f"synth_val_{SIZE}px.bin")
    if os.path.exists(marker) and json.load(open(marker)) == params:
        print("    reusing the dataset built by an earlier run with the same settings")
        return data_dir, val_small, "synth_align_train"
    made = make_synthetic_dataset(
        os.path.join(out, "data"), num_identities=F.identities,
        images_per_identity=F.images_per_identity, num_verification_pairs=1000, seed=F.seed,
        data_dir=data_dir)
    first, second, issame, _ = make_verification_arrays(made["verification_bin"],
                                                        image_size=INPUT)
    write_verification_bin(val_small, np.stack([first, second], 1).reshape(-1, *INPUT, 3),
                           issame, format="png")
    # Held-out identities (another seed) with landmarks, for the alignment row's NRMSE.
    make_synthetic_dataset(os.path.join(out, "align"), num_identities=40,
                           images_per_identity=5, num_verification_identities=20,
                           num_verification_pairs=20, seed=F.seed + 1, data_dir=data_dir,
                           name="synth_align")
    with open(marker, "w") as f:
        json.dump(params, f)
    return data_dir, val_small, "synth_align_train"


def main(argv) -> int:
    del argv
    logging.set_verbosity(logging.ERROR)  # orbax/tfds INFO lines would bury the results
    from kdface.comparison import (Comparison, enable_compilation_cache, markdown_report,
                                   run_comparison)
    from kdface.training import TrainConfig
    from kdface.training import resolve_training_data, run

    t_start = time.time()
    out = os.path.abspath(F.out)
    enable_compilation_cache(os.path.join(out, "jax_cache"))
    print(f"[1/3] synthetic dataset -> {out}/data", flush=True)
    data_dir, val_bin, align = _data(out)
    source, num_classes = resolve_training_data("synth_train", data_dir)
    print(f"    {len(source)} training images of {num_classes} identities; "
          f"{time.time() - t_start:.0f} s", flush=True)

    teacher_dir = os.path.join(out, "runs", "teacher")
    print(f"[2/3] teacher (scratch, original images) -> {teacher_dir}", flush=True)
    t0 = time.time()
    run(TrainConfig(workdir=teacher_dir, recipe="scratch", student=TEACHER[0],
                    student_options=TEACHER[1], train_data="synth_train",
                    steps=F.teacher_steps, batch_size=F.batch_size, seed=F.seed,
                    warmup_steps=F.teacher_steps // 20, progress=False,
                    **{**COMMON, "student_view": "original"}),
        data_dir=data_dir, source=source, num_classes=num_classes, val_sets=[])
    print(f"    {time.time() - t0:.0f} s", flush=True)

    print("[3/3] every method into the same student (kdface.compare)", flush=True)
    spec = Comparison(
        out=os.path.join(out, "comparison"), train_data="synth_train", data_dir=data_dir,
        val_data=(val_bin,), teacher=teacher_dir, student=STUDENT[0],
        student_options=STUDENT[1], methods=tuple(F.methods),
        seeds=tuple(int(s) for s in F.seeds),
        common={**COMMON, "steps": F.student_steps, "batch_size": F.batch_size,
                "warmup_steps": F.student_steps // 10},
        lr_sizes=LR_SIZES, alignment_data=align)
    report = run_comparison(spec)
    print()
    print(markdown_report(report))
    failed = sorted({r["method"] for r in report["rows"] if r["status"] == "failed"})
    if failed:
        print(f"rows that failed (listed in the table with their error): {', '.join(failed)}")
    print(f"comparison: {spec.out} (comparison.md, comparison.json, plots); "
          f"total {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
