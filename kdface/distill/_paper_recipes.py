"""The five papers' methods, each one ``RecipeSpec`` declaration (data only; see ``_recipes``).

References:
  wang2019: Wang, Liu, Hajime et al., Improved Knowledge Distillation for Training Fast Low Resolution Face
    Recognition Model, ICCV Workshops 2019.
  nikitin2020: Nikitin, Konushin, Konushin, Pairwise Ranking Distillation for Deep Face Recognition, 2020.
  kd_transfer: Model Distillation with Knowledge Transfer from Face Classification to Alignment
    and Verification (C. Wang, X. Lan, Y. Zhang, 2017, arXiv:1709.02929).
  yan2019: Yan et al., VarGFaceNet: An Efficient Variable Group Convolutional Neural Network for
    Lightweight Face Recognition, ICCV Workshops 2019.
  duong2019: Duong, Luu, Quach, Le, ShrinkTeaNet: Million-scale Lightweight Face Recognition via
    Shrinking Teacher-Student Networks, 2019.
"""
from __future__ import annotations

from kdface.distill._recipes import (HEAD, Option, RecipeSpec, TeacherPhase, TermDecl,
                                     register_recipe)

# The margin options each head term reads (CosFace and ArcFace share --margin_scale/--margin).
HEAD_OPTIONS = {
    "softmax": {},
    "cosface": {"scale": Option("margin_scale"), "margin": Option("margin")},
    "arcface": {"scale": Option("margin_scale"), "margin": Option("margin")},
    "sphereface": {"margin": Option("sphereface_m")},
}

FEATURE_LOSSES = ("mk_mmd", "normalized_l2")
KD_LOSSES = ("pwr", "rkd_d", "rkd_a", "rkd_da", "darkrank", "hinton")
TRANSFER_TASKS = ("classification", "alignment", "verification")

PWR_OPTIONS = {"relation": Option("pwr_relation"), "inversion": Option("pwr_inversion"),
               "margin": Option("pwr_margin"), "margin_value": Option("pwr_margin_value"),
               "power": Option("pwr_power"), "beta": Option("pwr_beta"),
               "method": Option("pwr_method")}
TEMPERATURE = {"temperature": Option("temperature")}

register_recipe(RecipeSpec(
    name="scratch",
    summary="no teacher: the head's classification loss alone (teachers, baselines)",
    terms=(TermDecl(HEAD, 1.0, options_for=HEAD_OPTIONS),),
))


def _wang2019(name: str, teacher_view: str, phases=(), summary=""):
    # wang2019 eq. 9: λ1·hard + λ2·soft + λ3·MK-MMD (or eq. 6 with normalized L2).
    return RecipeSpec(
        name=name, summary=summary,
        terms=(TermDecl(HEAD, Option("lambda_hard"), options_for=HEAD_OPTIONS,
                        cite="wang2019 eq. 9, λ1 (the paper prints no value: kdface's choice 1)"),
               TermDecl("hinton", Option("lambda_soft"), options=TEMPERATURE,
                        cite="wang2019 eq. 9, λ2 soft loss"),
               TermDecl(Option("feature_loss"), Option("lambda_feature"),
                        options_for={f: {} for f in FEATURE_LOSSES},
                        cite="wang2019 eq. 9 (MK-MMD) / eq. 6 (normalized L2), λ3")),
        student_view="low_resolution", teacher_view=teacher_view, phases=phases)


# kd_im: the untouched teacher sees the original image, the student the LR one.
register_recipe(_wang2019("kd_im", "original",
                          summary="wang2019 KD_im: HR teacher, LR student"))
# kd: the teacher was fine-tuned on LR data first and sees the student's (LR) view.
register_recipe(_wang2019(
    "kd", "low_resolution", summary="wang2019 KD: LR-fine-tuned teacher, LR student",
    phases=(TeacherPhase("teacher_lr", recipe="scratch", student_view="low_resolution",
                         cite="wang2019 §2.2: the teacher is fine-tuned on LR-augmented data"),)))

register_recipe(RecipeSpec(
    name="pwr",
    summary="nikitin2020: α·L_KD + β·CosFace + γ·HKD (eq. 12)",
    terms=(TermDecl(Option("kd_loss"), Option("alpha"),
                    options_for={**{k: {} for k in KD_LOSSES}, "pwr": PWR_OPTIONS,
                                 "hinton": TEMPERATURE},
                    cite="nikitin2020 eq. 12, α·L_KD"),
           TermDecl(HEAD, Option("beta"), options_for=HEAD_OPTIONS,
                    cite="nikitin2020 eq. 12, β·CosFace"),
           TermDecl("hinton", Option("gamma"), options=TEMPERATURE,
                    when={"kd_loss": tuple(k for k in KD_LOSSES if k != "hinton")},
                    cite="nikitin2020 eq. 12, γ·HKD")),
))

register_recipe(RecipeSpec(
    name="transfer",
    summary="kd_transfer: knowledge transfer to classification, alignment or verification",
    head="softmax",
    choices={"transfer_task": TRANSFER_TASKS},
    terms=(
        # classification: full initialization from a softmax-pretrained student
        # (--init_checkpoint), then the teacher's soft predictions + the hard loss.
        TermDecl("softmax", Option("lambda_hard"), when={"transfer_task": ("classification",)}),
        TermDecl("hinton", Option("lambda_soft"), options=TEMPERATURE,
                 when={"transfer_task": ("classification", "verification")}),
        # alignment: landmark regression + a hidden-layer hint.
        TermDecl("landmark", 1.0, when={"transfer_task": ("alignment",)}),
        TermDecl("hint_stages", Option("lambda_feature"), when={"transfer_task": ("alignment",)}),
        # verification: triplet loss (+ soft predictions, + an optional extra softmax).
        TermDecl("triplet", 1.0, options={"margin": Option("triplet_margin"),
                                          "mining": Option("triplet_mining")},
                 when={"transfer_task": ("verification",)}),
        TermDecl("softmax", Option("extra_softmax"), when={"transfer_task": ("verification",)}),
    ),
))

register_recipe(RecipeSpec(
    name="vargface",
    summary="yan2019: ArcFace + α·normalized L2 to the teacher's embedding, recursive KD",
    head="arcface",
    terms=(TermDecl(HEAD, 1.0, options_for={"arcface": {"scale": Option("margin_scale"),
                                                        "margin": Option("arcface_margin")}},
                    cite="yan2019: ArcFace"),
           TermDecl("normalized_l2", Option("vargface_alpha"), cite="yan2019 eq. 5, α")),
))

register_recipe(RecipeSpec(
    name="shrinktea",
    summary="duong2019: angular distillation at the embedding and every stage (eq. 7)",
    terms=(TermDecl(HEAD, 1.0, options_for=HEAD_OPTIONS),
           TermDecl("angular", Option("shrinktea_lambda"), cite="duong2019 eq. 7, λ_n"),
           TermDecl("angular_stages", 1.0, options={"final_weight": Option("shrinktea_lambda")},
                    cite="duong2019 eq. 7, λ_i = λ_{i+1}/2")),
))
