"""Every method of the comparison as data: a recipe plus TrainConfig overrides, and its citation.

A row of the comparison is one ``Method``: the trainer fields it sets on top of the settings
every row shares (same student, data, steps, batch, learning rate, seeds), the paper and equation
it runs, and what it adds to the common student. Nothing here builds a network or a loss: the
trainer does, from ``TrainConfig(**fields)``, exactly as ``python -m kdface.train`` would.

The papers (cited once here, by short key in the table):

* wang2019: Wang, Liu et al., Improved Knowledge Distillation for Training Fast Low Resolution
  Face Recognition Model, ICCV Workshops 2019.
* nikitin2020: Nikitin, Konushin, Konushin, Pairwise Ranking Distillation for Deep Face
  Recognition, 2020; its baselines RKD (Park et al., Relational Knowledge Distillation, CVPR
  2019), DarkRank (Chen et al., DarkRank: Accelerating Deep Metric Learning via Cross Sample
  Similarities Transfer, AAAI 2018) and HKD (Hinton et al., Distilling the Knowledge in a Neural
  Network, 2015), as its Table 1 runs them.
* kd_transfer: Wang, Lan, Zhang, Model Distillation with Knowledge Transfer from Face
  Classification to Alignment and Verification, 2017 (arXiv:1709.02929).
* yan2019: Yan et al., VarGFaceNet: An Efficient Variable Group Convolutional Neural Network for
  Lightweight Face Recognition, ICCV Workshops 2019.
* duong2019: Duong et al., ShrinkTeaNet: Million-scale Lightweight Face Recognition via Shrinking
  Teacher-Student Networks, 2019.

Beyond the five papers:

* huang2022: Huang, Wu, Xu, Ding, Evaluation-oriented Knowledge Distillation for Deep Face
  Recognition, CVPR 2022 (EKD).
* boutros2024: Boutros, Štruc, Damer, AdaDistill: Adaptive Knowledge Distillation for Deep Face
  Recognition, ECCV 2024.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

PAPERS = {
    "self": "— (no teacher)",
    "wang2019": "Wang et al., Improved Knowledge Distillation for Training Fast Low Resolution "
                "Face Recognition Model, ICCVW 2019",
    "nikitin2020": "Nikitin et al., Pairwise Ranking Distillation for Deep Face Recognition, 2020",
    "kd_transfer": "Wang, Lan, Zhang, Model Distillation with Knowledge Transfer from Face "
                   "Classification to Alignment and Verification, 2017 (arXiv:1709.02929)",
    "yan2019": "Yan et al., VarGFaceNet, ICCVW 2019",
    "duong2019": "Duong et al., ShrinkTeaNet, 2019",
    "huang2022": "Huang et al., Evaluation-oriented Knowledge Distillation for Deep Face "
                 "Recognition, CVPR 2022",
    "boutros2024": "Boutros et al., AdaDistill: Adaptive Knowledge Distillation for Deep Face "
                   "Recognition, ECCV 2024",
}
# The paper column of the tables: authors and year (the full reference is in PAPERS).
PAPER_LABELS = {"self": "—", "wang2019": "Wang et al. 2019", "nikitin2020": "Nikitin et al. 2020",
                "kd_transfer": "Wang et al. 2017", "yan2019": "Yan et al. 2019",
                "duong2019": "Duong et al. 2019", "huang2022": "Huang et al. 2022",
                "boutros2024": "Boutros et al. 2024"}


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the comparison.

    name: row key and workdir name. paper: a ``PAPERS`` key. equation: the paper's equation or
    table row the row runs. overrides: ``TrainConfig`` fields on top of the shared settings
    (``recipe`` included); a field this kdface's ``TrainConfig`` lacks makes the row unavailable
    (reported, not run). uses_teacher: the row distils from the comparison's teacher.
    init_from: another row whose student (same seed) initializes this one (its training budget
    adds to this row's; the table says so). adds: architectural parts added to the common
    student. needs: inputs beyond verification pairs ('alignment_data'). note: a deviation from
    the paper the row cannot avoid in this kdface build.
    """
    name: str
    paper: str
    equation: str
    overrides: Mapping[str, Any]
    uses_teacher: bool = True
    init_from: str | None = None
    adds: str = ""
    needs: tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self):
        if self.paper not in PAPERS:
            raise ValueError(f"method {self.name!r}: unknown paper {self.paper!r}; known: "
                             f"{sorted(PAPERS)}")
        if "recipe" not in self.overrides:
            raise ValueError(f"method {self.name!r}: overrides must name the recipe")


_PWR_BASE = {"recipe": "pwr", "temperature": 4.0, "gamma": 0.0}


def _nikitin_baseline(name: str, kd_loss: str, alpha: float, beta: float,
                      weights: str) -> Method:
    """A Nikitin et al. 2020 Table 1 baseline: eq. 12, CosFace + ``kd_loss`` weighted ``alpha``
    (``beta`` on CosFace), initialized from the self-studied student like PWR."""
    return Method(name, "nikitin2020", f"eq. 12, CosFace + {weights} (Table 1)",
                  {**_PWR_BASE, "kd_loss": kd_loss, "alpha": alpha, "beta": beta},
                  init_from="self_studied")


METHODS: tuple[Method, ...] = (
    Method("self_studied", "self", "the student's own classification loss, same LR-augmented "
           "data (Wang et al. 2019 / Duong et al. 2019 'self-studied' baseline)",
           {"recipe": "scratch"}, uses_teacher=False),
    # wang2019: λ1·hard + λ2·soft + λ3·feature, λ = 1 (the paper prints no values).
    Method("kd_im", "wang2019", "eq. 9, KD_im: untouched teacher on HR, student on LR; hard + "
           "soft + MK-MMD", {"recipe": "kd_im", "feature_loss": "mk_mmd", "lambda_hard": 1.0,
                             "lambda_soft": 1.0, "lambda_feature": 1.0, "temperature": 4.0}),
    Method("kd_mkmmd", "wang2019", "eq. 9, KD: teacher first fine-tuned on LR data, then hard + "
           "soft + MK-MMD", {"recipe": "kd", "feature_loss": "mk_mmd", "lambda_hard": 1.0,
                            "lambda_soft": 1.0, "lambda_feature": 1.0, "temperature": 4.0},
           note="the teacher fine-tuning runs the same steps again per seed (teacher_lr/)"),
    Method("kd_im_l2", "wang2019", "eq. 6 ('L2 loss' row): KD_im with the normalized feature "
           "L2 instead of MK-MMD", {"recipe": "kd_im", "feature_loss": "normalized_l2",
                                    "lambda_hard": 1.0, "lambda_soft": 1.0,
                                    "lambda_feature": 1.0, "temperature": 4.0}),
    # nikitin2020 §4.2: "student models in all distillation experiments are initialized with
    # pretrained weights of the baseline model" (here: row self_studied, CosFace); PWR alone
    # ("explored only in such setting"), α = 100 for PWR-Exp; baselines with CosFace (β = 1):
    # α = 100 RKD-D, 200 RKD-A, 1 DarkRank; HKD β 0.7, γ 0.3, τ 4.
    Method("pwr_exp", "nikitin2020", "eq. 12 with PWR-Exp (teacher-diff) alone: α = 100, β = 0 "
           "(Table 1's best row)", {**_PWR_BASE, "kd_loss": "pwr", "pwr_relation": "cosine",
                                    "pwr_inversion": "exp", "pwr_margin": "teacher_diff",
                                    "alpha": 100.0, "beta": 0.0},
           init_from="self_studied"),
    _nikitin_baseline("rkd_d", "rkd_d", 100.0, 1.0, "RKD-D: α = 100, β = 1"),
    _nikitin_baseline("rkd_a", "rkd_a", 200.0, 1.0, "RKD-A: α = 200, β = 1"),
    _nikitin_baseline("rkd_da", "rkd_da", 100.0, 1.0,
                      "RKD-DA: α = 100 (RKD-D's; the paper gives none for DA), β = 1"),
    _nikitin_baseline("darkrank", "darkrank", 1.0, 1.0, "DarkRank (hard): α = 1, β = 1"),
    _nikitin_baseline("hkd", "hinton", 0.3, 0.7, "HKD: β = 0.7, γ = 0.3, τ = 4"),
    # kd_transfer: the softmax-pretrained student is the full initialization (eq. 3).
    Method("softmax_student", "kd_transfer", "eq. 3: the student pretrained with softmax (the "
           "full initialization of the two rows below; no teacher)",
           {"recipe": "scratch", "head": "softmax"}, uses_teacher=False),
    Method("transfer_soft", "kd_transfer", "eq. 4: full initialization + soft predictions "
           "(+ hard softmax loss)", {"recipe": "transfer", "transfer_task": "classification",
                                     "head": "softmax", "lambda_hard": 1.0, "lambda_soft": 1.0,
                                     "temperature": 4.0},
           init_from="softmax_student"),
    Method("transfer_triplet", "kd_transfer", "eq. 5 for verification: triplet loss + soft "
           "predictions, full initialization", {"recipe": "transfer",
                                                "transfer_task": "verification",
                                                "head": "softmax", "lambda_soft": 1.0,
                                                "temperature": 4.0, "triplet_margin": 0.2,
                                                "triplet_mining": "batch_hard"},
           init_from="softmax_student"),
    # kd_transfer eq. 7 for alignment: the hidden layer is the target ("in face alignment, the
    # hidden layer is preferred"), soft predictions off (α = 0), initialized from the distilled
    # classification student (Table 3's best "Distill" initialization); lr 0.01 for an
    # initialized network is kdface's reading of the paper's lost value. The Euclidean loss on
    # raw pixel landmarks starts in the thousands; without gradient clipping (kdface's choice,
    # norm 1) the run ran away within 6 steps (5.5e6 vs 4.6e3 at step 1, measured).
    Method("transfer_alignment", "kd_transfer", "eq. 7 for alignment: Euclidean landmark loss "
           "+ hidden-layer target (the embedding feeding the head), α = 0, β = 1; lr 0.01",
           {"recipe": "transfer", "transfer_task": "alignment", "head": "softmax",
            "lambda_soft": 0.0, "lambda_hidden": 1.0, "learning_rate": 0.01, "clip_norm": 1.0},
           init_from="transfer_soft", adds="5-point landmark head", needs=("alignment_data",),
           note="the comparison's teacher is the verification teacher (no landmark head); "
                "NRMSE on held-out identities"),
    # yan2019 eq. 7: ArcFace + α·L_s (normalized L2, eq. 5), α = 7; generation 2 starts from
    # generation 1's student with the same teacher (§2.5).
    Method("vargface", "yan2019", "eq. 7: ArcFace + α·normalized L2 (eq. 5), α = 7",
           {"recipe": "vargface", "vargface_alpha": 7.0}),
    Method("vargface_gen2", "yan2019", "§2.5 recursive KD, generation 2: eq. 7 again, "
           "initialized from generation 1 (row vargface)",
           {"recipe": "vargface", "vargface_alpha": 7.0}, init_from="vargface"),
    # duong2019 eq. 7: L_SM + λ_n·angular(F_n^s, the student's own embedding) + Σ λ_i·angular(
    # stage i through the teacher's remaining blocks), λ_n = 1 (angular) or 0.001 (ℓ2),
    # λ_i = λ_{i+1}/2.
    Method("shrinktea", "duong2019", "eq. 7: softmax-family loss + angular distillation on the "
           "student's own embedding and at blocks 1-3 through the teacher's blocks, λ_n = 1",
           {"recipe": "shrinktea", "shrinktea_lambda": 1.0},
           adds="stage adapters (1x1 conv + BN) to the teacher's stages"),
    Method("shrinktea_l2", "duong2019", "eq. 7 with the ℓ2 distance ('Student-1 (ℓ2 loss)' of "
           "Table 2), λ_n = 0.001", {"recipe": "shrinktea", "shrinktea_distance": "l2",
                                     "shrinktea_lambda": 0.001},
           adds="stage adapters (1x1 conv + BN) to the teacher's stages"),
    # huang2022 (EKD): the shared head + the rank loss on the global batch, half of it drawn
    # uniformly and half identity-balanced, 4 images per identity (TFace's 32 + 32 at the
    # demo's batch 64); the loss's constants are TFace's.
    Method("ekd", "huang2022", "the head's loss + EKD's evaluation-oriented rank loss "
           "(positive pairs and 2,000 hardest negatives, thresholds at FPR 1e-1..1e-6 as "
           "running averages); half-balanced batches", {
               "recipe": "ekd", "batch_sampler": "balanced", "uniform_images": 32,
               "images_per_identity": 4},
           note="the comparison's shared head (the paper: ArcFace); uniform_images is 32 of the "
                "demo's batch of 64"),
    # boutros2024 (AdaDistill): the margin loss against class centres moved towards the
    # teacher's embeddings; its own centres (term state), the student's head unused.
    Method("adadistill_arc", "boutros2024", "ArcFace against the adaptively updated centres "
           "(AdaptiveAArcFace): the only loss", {"recipe": "adadistill_arc"},
           note="the comparison's scale and ArcFace margin (the paper: s = 64, m = 0.45)"),
    Method("adadistill_cos", "boutros2024", "CosFace against the adaptively updated centres "
           "(AdaptiveACosFace): the only loss", {"recipe": "adadistill_cos"},
           note="the comparison's CosFace scale and margin (the paper: s = 64)"),
)


def method_names() -> list[str]:
    return [m.name for m in METHODS]


def select_methods(names: Sequence[str] | None = None,
                   catalogue: Sequence[Method] = METHODS) -> list[Method]:
    """The methods named (all when ``names`` is empty/None), in catalogue order, each one's
    ``init_from`` row included before it."""
    by_name = {m.name: m for m in catalogue}
    wanted = set(names or by_name)
    unknown = sorted(wanted - set(by_name))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {list(by_name)}")
    changed = True
    while changed:  # pull in the rows an initialization depends on
        changed = False
        for name in list(wanted):
            parent = by_name[name].init_from
            if parent is not None and parent not in wanted:
                if parent not in by_name:
                    raise ValueError(f"method {name!r} initializes from unknown row {parent!r}")
                wanted.add(parent)
                changed = True
    ordered = [m for m in catalogue if m.name in wanted]
    seen: set[str] = set()
    for m in ordered:
        if m.init_from is not None and m.init_from not in seen:
            raise ValueError(f"method {m.name!r} initializes from {m.init_from!r}, which must "
                             f"come before it in the catalogue")
        seen.add(m.name)
    return ordered
