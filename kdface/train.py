r"""`python -m kdface.train --flagfile=kdface/configs/<recipe>.flags`: every recipe, one trainer.

Examples (each flagfile in kdface/configs/ carries its paper's settings):

  python -m kdface.train --flagfile=kdface/configs/scratch_teacher.flags --workdir=runs/teacher
  python -m kdface.train --flagfile=kdface/configs/kd_im.flags --workdir=runs/kd_im \
      --teacher_checkpoint=runs/teacher

Rerunning the same command resumes from the latest checkpoint in --workdir.
"""
from __future__ import annotations

import ast
import json
import os
import sys

from absl import app, flags, logging

from kdface.training._config import TrainConfig

F = flags.FLAGS

# --- what to train --------------------------------------------------------------------------
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, config.json. Required.")
flags.DEFINE_enum("recipe", "scratch", ["scratch", "kd_im", "kd", "pwr", "transfer", "vargface",
                                        "shrinktea"],
                  "Method: scratch (no teacher) | kd_im, kd (seed wang2019) | pwr (seed "
                  "nikitin2020) | transfer (seed kd_transfer) | vargface (seed yan2019) | "
                  "shrinktea (seed duong2019).")
flags.DEFINE_string("student", "iresnet18", "Student backbone name (kdface.models.names()).")
flags.DEFINE_string("student_options", "", "Backbone kwargs as k=v,k=v (Python literals), "
                    "e.g. embedding_size=512,width_divisor=4.")
flags.DEFINE_string("teacher", None, "Teacher backbone name (weights from "
                    "--teacher_checkpoint), or a third-party insightface IResNet: "
                    "pth:[ARCH:]PATH (PyTorch state dict) or onnx:[ARCH:]PATH.")
flags.DEFINE_string("teacher_options", "", "Teacher backbone kwargs as k=v,k=v.")
flags.DEFINE_string("teacher_checkpoint", None, "Workdir of a finished 'scratch' run of the "
                    "teacher (loaded params-only, never written into this run).")
flags.DEFINE_string("init_checkpoint", None, "Initialize the student from this run's weights "
                    "(seed nikitin2020 starts from the pretrained baseline student; seed "
                    "kd_transfer's full-initialization trick).")
flags.DEFINE_enum("head", "cosface", ["softmax", "cosface", "arcface", "sphereface"],
                  "Classifier head of the hard loss (seed nikitin2020: CosFace; seed wang2019 "
                  "teachers: SphereFace; seed yan2019: ArcFace).")
flags.DEFINE_float("margin_scale", 64.0, "Scale s of CosFace/ArcFace (64 in seeds nikitin2020 "
                   "and yan2019); also the logit scale s*cos for Hinton KD on margin heads.")
flags.DEFINE_float("margin", 0.35, "CosFace margin m (0.35, seed nikitin2020 §4.2).")
flags.DEFINE_float("arcface_margin", 0.5, "ArcFace margin m (0.5, seed yan2019).")
flags.DEFINE_integer("sphereface_m", 4, "A-Softmax angular margin m (4, SphereFace).")
flags.DEFINE_string("input_size", "112,112", "Network input H,W (112x112; seed wang2019 used "
                    "112x96).")

# --- loss weights -----------------------------------------------------------------------------
flags.DEFINE_float("lambda_hard", 1.0, "λ1, hard (classification) loss weight (seed wang2019 "
                   "eq. 6/9; the paper does not print values: 1.0).")
flags.DEFINE_float("lambda_soft", 1.0, "λ2, Hinton soft loss weight (seed wang2019 eq. 6/9).")
flags.DEFINE_float("lambda_feature", 1.0, "λ3, feature loss weight (seed wang2019 eq. 6/9); "
                   "hidden-layer hint weight in transfer/alignment.")
flags.DEFINE_float("temperature", 4.0, "Softmax temperature τ of Hinton KD (4.0, seed "
                   "nikitin2020 HKD).")
flags.DEFINE_enum("feature_loss", "mk_mmd", ["mk_mmd", "normalized_l2"],
                  "Feature term of kd/kd_im: MK-MMD on normalized features (seed wang2019 "
                  "eq. 9) or normalized L2 (eq. 6, the ablation).")
flags.DEFINE_enum("kd_loss", "pwr", ["pwr", "rkd_d", "rkd_a", "rkd_da", "darkrank", "hinton"],
                  "L_KD of the pwr recipe (seed nikitin2020 eq. 12).")
flags.DEFINE_float("alpha", 100.0, "α, weight of L_KD (seed nikitin2020: 100 for PWR-Diff/Exp "
                   "and RKD-D, 15 for PWR-RankNet, 200 for RKD-A, 1 for DarkRank).")
flags.DEFINE_float("beta", 1.0, "β, weight of CosFace in the pwr recipe (1.0, seed "
                   "nikitin2020; 0.7 with HKD).")
flags.DEFINE_float("gamma", 0.0, "γ, weight of Hinton KD in the pwr recipe (0; 0.3 with HKD, "
                   "seed nikitin2020).")
flags.DEFINE_enum("pwr_relation", "cosine", ["cosine", "euclidean"], "PWR relational function "
                  "ψ (cosine, seed nikitin2020).")
flags.DEFINE_enum("pwr_inversion", "exp", ["diff", "power", "exp", "ranknet"],
                  "PWR inversion loss (exp: PWR-Exp, the paper's best).")
flags.DEFINE_enum("pwr_margin", "teacher_diff", ["none", "const", "teacher_std",
                                                 "teacher_diff"],
                  "PWR margin (teacher_diff: the paper's best, eq. 9).")
flags.DEFINE_float("pwr_margin_value", 0.0, "Constant margin for --pwr_margin=const (0.1 in "
                   "the paper's tables).")
flags.DEFINE_float("pwr_power", 1.0, "p of the power difference loss (eq. 5).")
flags.DEFINE_float("pwr_beta", 1.0, "β of the exp / RankNet inversion losses (eqs. 6, 10).")
flags.DEFINE_enum("pwr_method", "auto", ["auto", "dense", "tiled", "sorted"],
                  "PWR algorithm (all exact; auto picks the fastest).")
flags.DEFINE_enum("transfer_task", "classification", ["classification", "alignment",
                                                      "verification"],
                  "Seed kd_transfer task of the transfer recipe.")
flags.DEFINE_float("triplet_margin", 0.2, "Triplet loss margin (seed kd_transfer).")
flags.DEFINE_enum("triplet_mining", "batch_hard", ["batch_all", "batch_hard"],
                  "Triplet mining.")
flags.DEFINE_float("extra_softmax", 0.0, "Weight of an extra softmax loss in transfer/"
                   "verification (seed kd_transfer's optional term).")
flags.DEFINE_float("vargface_alpha", 7.0, "α of the normalized-L2 term (7, seed yan2019).")
flags.DEFINE_integer("generations", 1, "Recursive KD generations (seed yan2019): generation "
                     "k+1 starts from generation k's student; each in workdir/gen_k.")
flags.DEFINE_float("shrinktea_lambda", 1.0, "λ_n of the final angular loss (1, seed duong2019); "
                   "stage weights λ_i = λ_{i+1}/2.")
flags.DEFINE_enum("relation_scope", "global", ["global", "device"],
                  "Relational losses over the global batch, or per device as the papers' "
                  "multi-GPU code did.")

# --- data -------------------------------------------------------------------------------------
flags.DEFINE_string("data_dir", "data", "tfds data directory of built datasets.")
flags.DEFINE_string("train_data", None, "Training set: a built dataset name in --data_dir, or "
                    "a .rec file / identity-folder directory (built on first use).")
flags.DEFINE_list("val_data", [], "Verification sets: .bin paths or built dataset names.")
flags.DEFINE_enum("student_view", "original", ["original", "low_resolution"],
                  "What the student sees in recipes that do not fix it (kd/kd_im always use "
                  "low_resolution).")
flags.DEFINE_bool("flip", True, "Random horizontal flip, identical for both views.")
flags.DEFINE_integer("seed", 0, "Seed of initialization, shuffling, flips and degradation.")

# --- optimization -----------------------------------------------------------------------------
flags.DEFINE_integer("batch_size", 128, "Global batch size (seeds: 512; divisible by devices).")
flags.DEFINE_integer("steps", 1000, "Training steps.")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adamw"], "Optimizer (SGD momentum 0.9 in the "
                  "seeds).")
flags.DEFINE_float("learning_rate", 0.1, "Base learning rate (0.1 in seeds nikitin2020 and "
                   "duong2019).")
flags.DEFINE_float("momentum", 0.9, "SGD momentum (0.9).")
flags.DEFINE_bool("nesterov", False, "Nesterov momentum for SGD.")
flags.DEFINE_float("weight_decay", 5e-4, "Weight decay (5e-4, insightface).")
flags.DEFINE_enum("schedule", "step", ["constant", "step", "cosine"], "LR schedule.")
flags.DEFINE_integer("warmup_steps", 0, "Linear warmup steps.")
flags.DEFINE_list("decay_steps", [], "Steps where the step schedule multiplies the LR by "
                  "--decay_factor (seed nikitin2020: every 2 epochs).")
flags.DEFINE_float("decay_factor", 0.1, "Step-schedule factor (0.1).")
flags.DEFINE_float("clip_norm", 0.0, "Global gradient-norm clipping (0 = off).")
flags.DEFINE_bool("bf16", False, "Run the networks in bfloat16 (losses stay float32).")

# --- bookkeeping ------------------------------------------------------------------------------
flags.DEFINE_integer("save_every", 500, "Checkpoint every K steps (and at the end).")
flags.DEFINE_integer("keep", 2, "Keep the latest N checkpoints.")
flags.DEFINE_integer("keep_best", 1, "Also keep the best N by mean validation accuracy.")
flags.DEFINE_integer("eval_every", 500, "Verify on --val_data every K steps.")
flags.DEFINE_integer("log_every", 10, "Log every K steps.")
flags.DEFINE_bool("teacher_cache", False, "Compute the frozen teacher's outputs once and skip "
                  "its forward pass (needs a deterministic teacher view).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 "
                    "(SLURM/OpenMPI/TPU are auto-detected without it).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")


def parse_options(text: str) -> dict:
    """``'a=1,b=(2,3),c=x'`` -> ``{'a': 1, 'b': (2, 3), 'c': 'x'}`` (Python literals)."""
    out, depth, current = {}, 0, ""
    parts = []
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    for part in parts:
        if "=" not in part:
            raise ValueError(f"option {part!r} is not key=value")
        key, value = part.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def config_from_flags() -> TrainConfig:
    if not F.workdir:
        raise app.UsageError("--workdir is required")
    if not F.train_data:
        raise app.UsageError("--train_data is required")
    size = tuple(int(v) for v in F.input_size.split(","))
    return TrainConfig(
        workdir=F.workdir, recipe=F.recipe, student=F.student,
        student_options=parse_options(F.student_options), teacher=F.teacher,
        teacher_options=parse_options(F.teacher_options),
        teacher_checkpoint=F.teacher_checkpoint, init_checkpoint=F.init_checkpoint,
        head=F.head, margin_scale=F.margin_scale, margin=F.margin,
        arcface_margin=F.arcface_margin, sphereface_m=F.sphereface_m, input_size=size,
        lambda_hard=F.lambda_hard, lambda_soft=F.lambda_soft, lambda_feature=F.lambda_feature,
        temperature=F.temperature, feature_loss=F.feature_loss, kd_loss=F.kd_loss,
        alpha=F.alpha, beta=F.beta, gamma=F.gamma, pwr_relation=F.pwr_relation,
        pwr_inversion=F.pwr_inversion, pwr_margin=F.pwr_margin,
        pwr_margin_value=F.pwr_margin_value, pwr_power=F.pwr_power, pwr_beta=F.pwr_beta,
        pwr_method=F.pwr_method, transfer_task=F.transfer_task,
        triplet_margin=F.triplet_margin, triplet_mining=F.triplet_mining,
        extra_softmax=F.extra_softmax, vargface_alpha=F.vargface_alpha,
        generations=F.generations, shrinktea_lambda=F.shrinktea_lambda,
        relation_scope=F.relation_scope, train_data=F.train_data,
        val_data=tuple(F.val_data), student_view=F.student_view, flip=F.flip, seed=F.seed,
        batch_size=F.batch_size, steps=F.steps, optimizer=F.optimizer,
        learning_rate=F.learning_rate, momentum=F.momentum, nesterov=F.nesterov,
        weight_decay=F.weight_decay,
        schedule=F.schedule, warmup_steps=F.warmup_steps,
        decay_steps=tuple(int(s) for s in F.decay_steps), decay_factor=F.decay_factor,
        clip_norm=F.clip_norm, bf16=F.bf16, save_every=F.save_every, keep=F.keep,
        keep_best=F.keep_best, eval_every=F.eval_every, log_every=F.log_every,
        teacher_cache=F.teacher_cache)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # keep orbax/tfds INFO chatter out of the progress bar
    import jax
    if F.coordinator_address or os.environ.get("SLURM_JOB_ID") or \
            os.environ.get("OMPI_COMM_WORLD_SIZE"):
        jax.distributed.initialize(coordinator_address=F.coordinator_address,
                                   num_processes=F.num_processes, process_id=F.process_id)
    from kdface.training._run import run
    config = config_from_flags()
    summary = run(config, data_dir=F.data_dir)
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    sys.exit(app.run(main))
