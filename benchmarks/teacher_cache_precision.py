r"""What storing the teacher cache in float16 does to the distilled losses.

  python -m benchmarks.teacher_cache_precision [--n=512] [--classes=10000] [--trials=5]

The cache keeps the teacher's embeddings (``--teacher_cache_dtype``, float16 by default); the
step reads them back as float32 and recomputes logits with the teacher head. For each loss that
reads the teacher, this compares the value and the student gradient computed from float16-
rounded teacher embeddings with those from the float32 embeddings (teacher and student: unit-
norm-scale Gaussian embeddings, the student a noisy copy of the teacher so the losses sit where
training holds them; logits ``64 cos θ`` from a random CosFace head as ``class_logits`` makes
them). Reports the largest relative difference over ``--trials`` draws: value ``|Δ| / |value|``
and gradient ``max |Δg| / max |g|``. Writes the section "float16 storage" of
benchmarks/TEACHER_CACHE_SCALE.md.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

from benchmarks._markdown_section import write_section

flags.DEFINE_integer("n", 512, "Batch rows.")
flags.DEFINE_integer("embedding", 512, "Embedding width.")
flags.DEFINE_integer("classes", 10000, "Classes of the teacher head (logit-reading losses).")
flags.DEFINE_integer("trials", 5, "Random draws (the largest difference is reported).")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "TEACHER_CACHE_SCALE.md"),
                    "Markdown file whose section is (re)written.")
F = flags.FLAGS
SECTION = "## float16 storage: effect on the distilled losses"


def _losses():
    from kdface import losses as L
    emb = {
        "MK-MMD (Wang et al. 2019 eq. 8)": lambda s, t: L.mk_mmd(s, t),
        "normalized L2 (Wang et al. 2019 eq. 6; Yan et al. 2019 eq. 5)":
            lambda s, t: L.normalized_l2_loss(s, t),
        "PWR exp / teacher_diff (Nikitin et al. 2020)":
            lambda s, t: L.pwr_loss(s, t, inversion="exp", margin="teacher_diff"),
        "RKD-D": lambda s, t: L.rkd_distance_loss(s, t),
        "RKD-A": lambda s, t: L.rkd_angle_loss(s, t),
        "DarkRank-hard": lambda s, t: L.darkrank_hard_loss(s, t),
    }
    logit = {
        "soft predictions, τ=4 (Wang et al. 2019 eq. 3)":
            lambda s, t: L.soft_prediction_loss(s, t, temperature=4.0),
        "Hinton KD, τ=4": lambda s, t: L.hinton_kd_loss(s, t, temperature=4.0),
    }
    return emb, logit


def measure(n: int, width: int, classes: int, trials: int) -> list[tuple[str, float, float]]:
    import jax
    import jax.numpy as jnp
    emb_losses, logit_losses = _losses()
    rows = {name: [0.0, 0.0] for name in [*emb_losses, *logit_losses]}
    for trial in range(trials):
        rng = np.random.default_rng(trial)
        teacher = rng.normal(size=(n, width)).astype(np.float32)
        student = teacher + 0.5 * rng.normal(size=(n, width)).astype(np.float32)
        weight = rng.normal(size=(width, classes)).astype(np.float32)
        w = weight / np.linalg.norm(weight, axis=0, keepdims=True)
        stored = teacher.astype(np.float16).astype(np.float32)

        def logits(e):
            e = e / jnp.linalg.norm(e, axis=1, keepdims=True)
            return 64.0 * (e @ w)

        cases = [(name, fn, student, lambda t: t) for name, fn in emb_losses.items()]
        cases += [(name, fn, np.asarray(logits(student)), logits)
                  for name, fn in logit_losses.items()]
        for name, fn, s, prep in cases:
            vg = jax.jit(jax.value_and_grad(lambda s_, t_: fn(s_, prep(t_))))
            v32, g32 = vg(s, teacher)
            v16, g16 = vg(s, stored)
            dv = abs(float(v16) - float(v32)) / max(abs(float(v32)), 1e-30)
            dg = float(jnp.max(jnp.abs(g16 - g32)) / jnp.maximum(jnp.max(jnp.abs(g32)), 1e-30))
            rows[name] = [max(rows[name][0], dv), max(rows[name][1], dg)]
    return [(name, v, g) for name, (v, g) in rows.items()]


def _reading(rows: list[tuple[str, float, float]]) -> str:
    step = 2.0 ** -11
    worst_value = max(v for _, v, _ in rows)
    worst_grad = max(g for _, _, g in rows)
    return ("float16 keeps 11 significant bits (relative rounding <= 2^-11 = 4.9e-4 per entry). "
            f"The losses move by at most {worst_value:.1e} in value and {worst_grad:.1e} of the "
            f"largest gradient entry, i.e. within {max(worst_value, worst_grad) / step:.1f} "
            "rounding steps of their input. kdface keeps float16 as the default (half the disk "
            "and page cache of float32); `--teacher_cache_dtype=float32` stores the exact "
            "float32 embeddings where that difference matters.")


def main(argv):
    del argv
    rows = measure(F.n, F.embedding, F.classes, F.trials)
    lines = [
        SECTION,
        "",
        f"Command: `python -m benchmarks.teacher_cache_precision --n={F.n} "
        f"--embedding={F.embedding} --classes={F.classes} --trials={F.trials}`.  ",
        f"Teacher embeddings [{F.n}, {F.embedding}] rounded to float16 (as the cache stores "
        "them) against float32; student = teacher + 0.5 x noise; logit losses read "
        f"64 cos θ from a {F.classes:,}-class head applied to the embedding, as the step does. "
        f"Largest relative difference over {F.trials} draws.",
        "",
        "| loss | value | student gradient |",
        "|---|---|---|",
        *[f"| {name} | {v:.1e} | {g:.1e} |" for name, v, g in rows],
        "",
        _reading(rows),
        "",
    ]
    write_section(F.out, SECTION, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
