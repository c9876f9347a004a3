"""Each flagfile runs its paper as written: what it builds, pinned against the paper's values.

For every flagfile in kdface/configs/ a table below lists the values the paper states, each with
the sentence it comes from, and the values the paper leaves open, marked "kdface's choice". The
test parses the flagfile exactly as ``python -m kdface.train`` does and compares the run options
and the resolved recipe (terms, weights, head and margins, optimizer and Nesterov, schedule in
epochs, input size, views, low-resolution augmentation) with the table. docs/RECIPES.md is the
same information for readers, with the ablation map whose rows ``test_ablation_rows_build`` and
``test_ablation_rows_train_two_steps`` build and train.

References: Wang et al. 2019 (ICCV Workshops), Nikitin et al. 2020, Wang, Lan, Zhang 2017
(arXiv:1709.02929), Yan et al. 2019 (ICCV Workshops), Duong et al. 2019 (arXiv:1905.10620); full
titles in kdface/distill/_paper_recipes.py.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from absl import flags

from _tolerance import assert_close
from kdface.distill import build_recipe
from kdface.training import TrainConfig

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "kdface", "configs")
CHOICE = "kdface's choice"


@dataclasses.dataclass(frozen=True)
class Pin:
    """One value a flagfile must carry: ``what`` is a TrainConfig field or a recipe property
    (``term:<name>`` = ``(weight, options)`` of an active term, ``terms`` = the active term
    names, ``nesterov``, ``head``, ``student_view`` ...); ``source`` is the paper's sentence or
    "kdface's choice: why"."""
    what: str
    value: object
    source: str


def config_from_flagfile(name: str, *extra: str) -> TrainConfig:
    """The ``TrainConfig`` ``python -m kdface.train --flagfile=kdface/configs/<name> *extra``
    runs with (workdir and training data are placeholders)."""
    from kdface import train  # defines the flags
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["kdface.train", f"--flagfile={os.path.join(CONFIGS, name)}", "--workdir=w",
                 "--train_data=t", *extra])
    try:
        return train.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()


def _resolved(config: TrainConfig, what: str):
    recipe = build_recipe(config.recipe, config)
    if what == "terms":
        return tuple(t.name for t in recipe.terms)
    if what.startswith("term:"):
        term = {t.name: t for t in recipe.terms}[what[5:]]
        return term.weight, dict(term.options)
    if what == "nesterov":
        return bool(recipe.optimizer.get("nesterov", config.nesterov))
    if what in ("head", "student_view", "teacher_view", "adapters", "landmark_head",
                "generations", "needs_teacher"):
        return getattr(recipe, what)
    if what == "phases":
        return tuple((p.subdir, p.recipe, p.student_view) for p in recipe.phases)
    return getattr(config, what)


# --- Wang et al. 2019 ----------------------------------------------------------------------

W_LR = ("wang2019 §2.2: '40 percent of the training set are randomly selected for downscaling as "
        "LR samples. The size of the LR samples includes 8 × 8, 12 × 12, 16 × 16, 20 × 20 and "
        "30 × 30'")
W_FLIP = (f"{CHOICE}: wang2019's only augmentation is the LR one (§2.2: '40 percent of the "
          "training set are randomly selected for downscaling as LR samples'); it names no flip")
W_SOFT = ("wang2019 eq. 3: 'The soft loss is the cross entropy between X_T^τ and X_S^τ' — no τ²; "
          "λ2 = 1 and τ = 4 are kdface's choice")
WANG = [
    Pin("student", "sphereface36_thin", "wang2019 §2.1: 'we adopted a 36-layer thinner ResNet "
        "network as our student model' (Table 2)"),
    Pin("teacher", "sphereface64", "wang2019 §3.2: 'a pre-trained 64-layer ResNet network trained "
        "with Sphreface loss [22] as teacher model'"),
    Pin("input_size", (112, 96), "wang2019 §2.2: 'MTCNN [17] is used to detect and align the face "
        "region as 112 × 96 image'"),
    Pin("lr_fraction", 0.4, W_LR),
    Pin("lr_sizes", (8, 12, 16, 20, 30), W_LR),
    Pin("student_view", "low_resolution", W_LR),
    Pin("batch_size", 512, "wang2019 §3.3.1: 'we use 4 Nvidia Titan Xp GPUs with batchsize as "
        "512'"),
    Pin("epochs", 20, "wang2019 §3.3.1: 'the process will last for 20 epochs'"),
    Pin("terms", ("sphereface", "soft_prediction", "mk_mmd"),
        "wang2019 eq. 9: 'L = λ1 L_Hard + λ2 L_Soft + λ3 L^{MK-MMD}_{Feature_Norm}'"),
    Pin("term:sphereface", (1.0, {"margin": 4, "anneal": True}),
        f"{CHOICE}: A-Softmax m = 4 and λ annealing from SphereFace's public solver; λ1 = 1"),
    Pin("term:soft_prediction", (1.0, {"temperature": 4.0}), W_SOFT),
    Pin("term:mk_mmd", (1.0, {}), "wang2019 eq. 9 with λ3 = 1 (kdface's choice)"),
    Pin("nesterov", False, f"{CHOICE}: plain SGD momentum (the paper names no optimizer)"),
    Pin("margin_scale", 64.0, f"{CHOICE}: soft-loss logits s·cos θ, s = 64, where 'the final "
        "score output' Z of an A-Softmax network is ||x||·cos θ"),
    Pin("flip", True, W_FLIP),
    Pin("learning_rate", 0.1, f"{CHOICE}: SphereFace's base rate"),
    Pin("decay_epochs", (11.0, 17.0), f"{CHOICE}: SphereFace's 16 k / 24 k of 28 k iterations "
        "scaled to 20 epochs"),
]
KD_IM = WANG + [Pin("teacher_view", "original", "wang2019 §1: 'only the student's trainset is "
                    "LR-augmented, while the teacher's input stays unchanged'"),
                Pin("phases", (), "KD_im: 'a single step'")]
KD = WANG + [Pin("teacher_view", "low_resolution", "wang2019 §3.3.1 KD: 'Step2, use same train "
                 "set to train student model'"),
             Pin("phases", (("teacher_lr", "scratch", "low_resolution"),),
                 "wang2019 §3.3.1 KD: 'Step1, use LR augmented data to update teacher's "
                 "weights'")]
SCRATCH_TEACHER = [
    Pin("student", "sphereface64", "wang2019 §3.2: the 64-layer SphereFace teacher (Table 1)"),
    Pin("terms", ("sphereface",), "wang2019 §3.2: 'trained with Sphreface loss [22]'"),
    Pin("term:sphereface", (1.0, {"margin": 4, "anneal": True}),
        f"{CHOICE}: SphereFace's m = 4 and λ schedule"),
    Pin("input_size", (112, 96), "wang2019 §2.2: '112 × 96 image'"),
    Pin("steps", 28000, f"{CHOICE}: SphereFace's published 28 k iterations"),
    Pin("decay_steps", (16000, 24000), f"{CHOICE}: SphereFace's published solver"),
    Pin("margin_scale", 64.0, f"{CHOICE}: the scale of the logits its KD students read"),
    Pin("flip", True, W_FLIP),
]
SCRATCH_STUDENT = [
    Pin("student", "sphereface36_thin", f"{CHOICE}: the kd_im student without a teacher"),
    Pin("terms", ("sphereface",), f"{CHOICE}: its hard loss alone"),
    Pin("student_view", "low_resolution", W_LR),
    Pin("input_size", (112, 96), "wang2019 §2.2: '112 × 96 image'"),
    Pin("epochs", 20, "wang2019 §3.3.1: '20 epochs' (as kd_im)"),
    Pin("flip", True, W_FLIP),
]

# --- Nikitin et al. 2020 -------------------------------------------------------------------

N_SCHED = ("nikitin2020 §4.2: 'Learning rate is initially set to 0.1, and during training it is "
           "divided by 10 each 2 epochs. The total number of epochs is 13.'")
N_COSFACE = "nikitin2020 §4.2: 'we set its parameters to be margin = 0.35 and scale = 64.0'"
NIKITIN_COMMON = [
    Pin("batch_size", 552, "nikitin2020 §4.2: 'Batch size is fixed to 552(92 × 6)'"),
    Pin("optimizer", "sgd", "nikitin2020 §4.2: 'Stochastic gradient descent (SGD) optimizer is "
        "used in all experiments'"),
    Pin("learning_rate", 0.1, N_SCHED),
    Pin("epochs", 13, N_SCHED),
    Pin("decay_epochs", (2.0, 4.0, 6.0, 8.0, 10.0, 12.0), N_SCHED),
    Pin("input_size", (112, 112), "nikitin2020 §4.1: 'cropped to the size of 112×112'"),
    Pin("margin", 0.35, N_COSFACE),
    Pin("margin_scale", 64.0, N_COSFACE),
    Pin("flip", True, f"{CHOICE}: nikitin2020 §4.1 'All faces are aligned by five facial "
        "landmarks detected using MTCNN [37] and then cropped to the size of 112×112' names no "
        "flip"),
]
PWR = NIKITIN_COMMON + [
    Pin("student", "iresnet18", "nikitin2020 §4.2: 'we use ResNet18 [26] as a student model'"),
    Pin("teacher", "iresnet50", "nikitin2020 §4.2: 'and ResNet50 [26] as a teacher model'"),
    Pin("terms", ("pwr",), "nikitin2020 §4.3: 'proposed PWR approach demonstrates quality "
        "improvement when used alone ... the effect of inversion loss function used in PWR "
        "distillation was explored only in such setting'"),
    Pin("term:pwr", (100.0, {"relation": "cosine", "inversion": "exp", "margin": "teacher_diff",
                             "margin_value": 0.0, "power": 1.0, "beta": 1.0, "method": "auto"}),
        "nikitin2020 §4.2: 'we found α = 100 to be a good option for PWR-Diff and PWR-Exp'; §4.3: "
        "'the best ... is PWR-Exp with adaptively chosen margin (teacher-std or teacher-diff)'; "
        "§3.1: 'cosine similarity performs slightly better'; eq. 6's β = 1 is kdface's choice"),
    Pin("relation_group_size", 92, "nikitin2020 §4.2: 'Batch size is fixed to 552(92 × 6)'; "
        f"relations within each GPU's 92 images is {CHOICE}, fixed whatever the device count"),
]
PWR_BASELINE = NIKITIN_COMMON + [
    Pin("student", "iresnet18", "nikitin2020 Table 1: 'Student, CosFace'"),
    Pin("terms", ("cosface",), "nikitin2020 §4.2: 'Teacher model and baseline student model are "
        "trained using CosFace [28, 29] loss'"),
    Pin("term:cosface", (1.0, {"scale": 64.0, "margin": 0.35}), N_COSFACE),
]

# --- Wang, Lan, Zhang 2017 -----------------------------------------------------------------

T_NAG = "kd_transfer §5.1: 'the Nesterov Accelerated Gradient(NAG) is adopted'"
T_CROP = ("kd_transfer §5.1: 'we resize it to [...] wherein a sub-image with [...] is randomly "
          "cropped and flipped' (sizes lost in the text: 128 -> 112 is kdface's choice)")
T_NET = ("kd_transfer §5.1: 'we remain the same depth but divide the number of convolution "
         "kernels in each layer by 2, 4 and 8'")
TRANSFER_COMMON = [
    Pin("student", "resnet50", T_NET),
    Pin("student_options", {"width_divisor": 8}, T_NET + " (ResNet-50/8, Tables 1 and 3)"),
    Pin("head", "softmax", "kd_transfer eq. 2: 'the first term is the softmax loss'"),
    Pin("nesterov", True, T_NAG),
    Pin("crop_from", (128, 128), T_CROP),
    Pin("input_size", (112, 112), T_CROP),
    Pin("flip", True, "kd_transfer §5.1: 'a sub-image with [...] is randomly cropped and "
        "flipped'"),
]
T_SOFT = ("kd_transfer eq. 2: 'the cross-entropy between the soft predictions of the teacher and "
          "student network' — no τ²; τ = 4 (value lost) is kdface's choice")
TRANSFER_PRETRAIN = TRANSFER_COMMON + [
    Pin("terms", ("softmax",), "kd_transfer eq. 3: 'we first train it with softmax loss'"),
    Pin("learning_rate", 0.1, f"{CHOICE}: the rate 'if the network is trained from scratch' is "
        "lost"),
    Pin("epochs", 30, f"{CHOICE}: '[...] epochs are used in each rate' (value lost), 3 rates"),
]
TRANSFER_CLASSIFICATION = TRANSFER_COMMON + [
    Pin("terms", ("softmax", "soft_prediction"), "kd_transfer eqs. 2, 4"),
    Pin("term:soft_prediction", (1.0, {"temperature": 4.0}), T_SOFT),
    Pin("learning_rate", 0.01, f"{CHOICE}: 'if the network is initialized, [...] is used to "
        "continue' (value lost)"),
    Pin("batch_size", 256, f"{CHOICE}: the classification batch is lost in the text"),
]
TRANSFER_CLASSIFICATION_SCRATCH = TRANSFER_COMMON + [
    Pin("terms", ("softmax", "soft_prediction"), "kd_transfer eq. 2 (Table 1 'Targets', Table 2 "
        "'Scratch [9]': '(1): student networks are not initialized')"),
    Pin("term:soft_prediction", (1.0, {"temperature": 4.0}), T_SOFT),
    Pin("learning_rate", 0.1, f"{CHOICE}: the rate 'if the network is trained from scratch' is "
        "lost; transfer_pretrain.flags' from-scratch schedule"),
    Pin("epochs", 30, f"{CHOICE}: '[...] epochs are used in each rate' (value lost), 3 rates"),
    Pin("decay_epochs", (10, 20), f"{CHOICE}: 10 epochs per rate, as transfer_pretrain.flags"),
    Pin("init_checkpoint", None, "kd_transfer: 'student networks are not initialized'"),
]
TRANSFER_ALIGNMENT = TRANSFER_COMMON + [
    Pin("terms", ("landmark", "hidden"), "kd_transfer §4.2.1: 'in face alignment, the hidden "
        "layer is preferred for distillation, which gives Eqn.(7) by setting [α = 0]'"),
    Pin("term:hidden", (1.0, {}), "kd_transfer §4.2.1: 'the hidden layer [H] ... satisfies "
        "[P = f(H)] with [f] being a fully-connected mapping'; β = 1 is kdface's choice"),
    Pin("landmark_head", True, "kd_transfer eq. 6: landmark regression"),
    Pin("adapters", False, "the hidden layer is the embedding: no stage adapters"),
    Pin("learning_rate", 0.01, f"{CHOICE}: initialized networks continue at a lower rate"),
]
TRANSFER_VERIFICATION = TRANSFER_COMMON + [
    Pin("terms", ("triplet", "soft_prediction", "softmax"), "kd_transfer §4.2.2: 'we discard the "
        "hidden layer and only use the soft prediction'; Table 5: with the additional softmax"),
    Pin("term:triplet", (1.0, {"margin": 0.2, "mining": "batch_hard"}),
        "kd_transfer eq. 8 (margin 'set to be [...] by cross-validation', lost: 0.2 is kdface's "
        "choice)"),
    Pin("term:soft_prediction", (1.0, {"temperature": 4.0}), T_SOFT),
    Pin("term:softmax", (1.0, {}), "kd_transfer §5.5: 'with the additional softmax loss ... [it] "
        "can get the best performance' (weight 1: kdface's choice)"),
]

# --- Yan et al. 2019 -----------------------------------------------------------------------

Y_FLIP = (f"{CHOICE}: yan2019 §3.1 'aligned by five facial landmarks predicted from "
          "RetinaFace[5] then resized to 112 × 112' names no flip")
Y_ARC = ("yan2019 eq. 6: 'we employ arcface [3] as our classification loss' (s and m printed "
         "without values: 64 and 0.5 are kdface's choice)")
VARGFACE = [
    Pin("student", "vargfacenet", "yan2019 Table 1"),
    Pin("teacher", "se_iresnet100", "yan2019 §3.3: 'We employ ResNet 100 [9] with SE as our "
        "teacher model'"),
    Pin("terms", ("arcface", "normalized_l2"), "yan2019 eq. 7: 'L = L_Arc + α L_s'"),
    Pin("term:arcface", (1.0, {"scale": 64.0, "margin": 0.5}), Y_ARC),
    Pin("term:normalized_l2", (7.0, {}), "yan2019 §2.4: 'We empirically set α = 7'"),
    Pin("generations", 2, "yan2019 §2.5: 'employs the first generation of student to initialize "
        "the second generation of student' (Table 5: recursive=2)"),
    Pin("input_size", (112, 112), "yan2019 §3.1: 'resized to 112 × 112'"),
    Pin("epochs", 20, f"{CHOICE}: the paper states no schedule"),
    Pin("flip", True, Y_FLIP),
]
VARGFACE_SCRATCH = [
    Pin("student", "vargfacenet", "yan2019 §3.2: 'we first train our network from scratch'"),
    Pin("terms", ("arcface",), "yan2019 §3.2: 'We employ arcface loss as the objective function'"),
    Pin("term:arcface", (1.0, {"scale": 64.0, "margin": 0.5}), Y_ARC),
    Pin("flip", True, Y_FLIP),
]
VARGFACE_Y2 = [
    Pin("student", "mobilefacenet_y2", "yan2019 §3: 'y2 network(a deeper mobilefacenet[2, 3])'"),
    Pin("terms", ("arcface",), "yan2019 §3.2: trained from scratch with ArcFace, as VarGFaceNet"),
    Pin("term:arcface", (1.0, {"scale": 64.0, "margin": 0.5}), Y_ARC),
    Pin("flip", True, Y_FLIP),
]

# --- Duong et al. 2019 ---------------------------------------------------------------------

D_CONF = ("duong2019 §4.2: 'the batch size is set to 512. The learning rate starts from 0.1 and "
          "the momentum is 0.9'")
SHRINKTEA = [
    Pin("student", "mobilefacenet_r", "duong2019 §4.2: 'A modified version of MobileFacenet, "
        "namely MobileFacenet-R'"),
    Pin("teacher", "iresnet90", "duong2019 §4.2: 'we use the Resnet-90 structure [4] as the "
        "teacher network'"),
    Pin("terms", ("arcface", "angular_stages"), "duong2019 eq. 7: L_SM + Σ_i λ_i L_i over 'all "
        "four blocks' (ArcFace for L_SM is kdface's choice)"),
    Pin("term:arcface", (1.0, {"scale": 64.0, "margin": 0.5}),
        f"{CHOICE}: ArcFace's defaults (the paper's head is unnamed)"),
    Pin("term:angular_stages", (1.0, {"final_weight": 1.0, "distance": "angular"}),
        "duong2019 §4.2: 'The λ_n is experimentally set to 1 in case of Angular Distillation "
        "Loss ... For the intermediate layers, λ_i = λ_{i+1}/2'"),
    Pin("adapters", True, "duong2019 §3.3: '1×1 convolution followed by batch normalization "
        "layer is adopted for G_i^s'"),
    Pin("batch_size", 512, D_CONF),
    Pin("learning_rate", 0.1, D_CONF),
    Pin("momentum", 0.9, D_CONF),
    Pin("input_size", (112, 112), "duong2019 §4.2: 'cropped to the size of 112×112'"),
    Pin("flip", True, f"{CHOICE}: duong2019 §4.2 'aligned to a predefined template using "
        "similarity transformation. They are then cropped to the size of 112×112' names no flip"),
]

# --- beyond the five papers: Huang et al. 2022 (EKD), Boutros et al. 2024 (AdaDistill) -----------
# (their values quote the official code: Tencent/TFace recognition/tasks/ekd, fdbtrs/AdaDistill)

E_YAML = "TFace ekd train.yaml"
EKD = [
    Pin("student", "mobilefacenet", f"{E_YAML}: \"BACKBONE_NAME: 'MobileFaceNet'\""),
    Pin("teacher", "iresnet50", f"{E_YAML}: \"T_BACKBONE_NAME: 'IR_50'\""),
    Pin("terms", ("arcface", "ekd"), "TFace ekd train.py: 'loss = softmax_loss + kd_loss'"),
    Pin("term:arcface", (1.0, {"scale": 64.0, "margin": 0.4}),
        f"{E_YAML}: 'HEAD_NAME: \"ArcFace\"', 'scale: 64', 'margin: 0.4'"),
    Pin("term:ekd", (1.0, {}), "TFace ekd.py's constants are the term's defaults"),
    Pin("batch_size", 64, f"{E_YAML}: 'GENERAL_BATCH_SIZE: 32', 'BALANCED_BATCH_SIZE: 32'"),
    Pin("batch_sampler", "balanced", "TFace ekd dataset.py: BalancedBatchSampler"),
    Pin("uniform_images", 32, f"{E_YAML}: 'GENERAL_BATCH_SIZE: 32'"),
    Pin("images_per_identity", 4, "TFace ekd dataset.py: 4 images per identity"),
    Pin("relation_groups", 1, "TFace ekd train.py: AllGather before the loss (global batch)"),
    Pin("learning_rate", 0.1, f"{E_YAML}: 'LRS: [0.1, 0.01, 0.001, 0.0001]'"),
    Pin("decay_epochs", (10.0, 18.0, 22.0), f"{E_YAML}: 'STAGES: [10, 18, 22]'"),
    Pin("epochs", 26, f"{E_YAML}: 'NUM_EPOCH: 26'"),
    Pin("weight_decay", 5e-4, f"{E_YAML}: 'WEIGHT_DECAY: 0.0005'"),
    Pin("momentum", 0.9, f"{E_YAML}: 'MOMENTUM: 0.9'"),
    Pin("flip", True, "TFace ekd train.py: 'transforms.RandomHorizontalFlip()'"),
]
A_CONFIG = "AdaDistill config.py"
A_COMMON = [
    Pin("student", "mobilefacenet", f"{A_CONFIG}: 'config.network = \"mobilefacenet\"'"),
    Pin("teacher", "iresnet50", f"{A_CONFIG}: 'config.teacher = \"iresnet50\"'"),
    Pin("batch_size", 512, f"{CHOICE}: 4 GPUs of {A_CONFIG}'s 'config.batch_size = 128'"),
    Pin("learning_rate", 0.1, "AdaDistill train_AdaDistill.py: 'lr=cfg.lr / 512 * "
        "cfg.batch_size * world_size' at a global batch of 512"),
    Pin("clip_norm", 5.0, "AdaDistill train_AdaDistill.py: 'clip_grad_norm_(..., max_norm=5'"),
    Pin("epochs", 26, f"{A_CONFIG}: 'config.num_epoch =  26'"),
    Pin("decay_epochs", (7.0, 13.0, 19.0, 24.0), f"{A_CONFIG}: lr_step_func, '[8, 14,20,25] "
        "if m - 1 <= epoch'"),
    Pin("weight_decay", 5e-4, f"{A_CONFIG}: 'config.weight_decay = 5e-4'"),
    Pin("flip", True, f"{CHOICE}: random horizontal flip"),
]
ADADISTILL_ARC = A_COMMON + [
    Pin("terms", ("adadistill",), "AdaDistill train_AdaDistill.py: 'loss_v= criterion(thetas, "
        "label)', the only loss"),
    Pin("term:adadistill", (1.0, {"head": "arcface", "scale": 64.0, "margin": 0.45}),
        f"{A_CONFIG}: 'config.s=64.0', 'config.m=0.45', 'config.loss=\"ArcFace\"'"),
]
ADADISTILL_COS = A_COMMON + [
    Pin("terms", ("adadistill",), "AdaDistill train_AdaDistill.py: the only loss"),
    Pin("term:adadistill", (1.0, {"head": "cosface", "scale": 64.0, "margin": 0.35}),
        f"{CHOICE}: m = 0.35, AdaptiveACosFace's default; s = 64 from {A_CONFIG}"),
]

PAPER_TABLES = {
    "kd_im.flags": KD_IM, "kd.flags": KD, "scratch_teacher.flags": SCRATCH_TEACHER,
    "scratch_student.flags": SCRATCH_STUDENT, "pwr.flags": PWR,
    "pwr_baseline.flags": PWR_BASELINE, "transfer_pretrain.flags": TRANSFER_PRETRAIN,
    "transfer_classification.flags": TRANSFER_CLASSIFICATION,
    "transfer_classification_scratch.flags": TRANSFER_CLASSIFICATION_SCRATCH,
    "transfer_alignment.flags": TRANSFER_ALIGNMENT,
    "transfer_verification.flags": TRANSFER_VERIFICATION, "vargface.flags": VARGFACE,
    "vargface_scratch.flags": VARGFACE_SCRATCH, "vargface_y2.flags": VARGFACE_Y2,
    "shrinktea.flags": SHRINKTEA, "ekd.flags": EKD, "adadistill_arc.flags": ADADISTILL_ARC,
    "adadistill_cos.flags": ADADISTILL_COS,
}


def test_every_flagfile_has_a_paper_table():
    shipped = sorted(f for f in os.listdir(CONFIGS) if f.endswith(".flags"))
    assert shipped == sorted(PAPER_TABLES)
    for pins in PAPER_TABLES.values():
        assert all(p.source for p in pins)
        assert "flip" in {p.what for p in pins}


@pytest.mark.parametrize("flagfile", sorted(PAPER_TABLES))
def test_flip_is_explicit_and_labelled(flagfile):
    """The random horizontal flip (TrainConfig's default) is written in every flagfile, under a
    comment that quotes the paper or says kdface's choice."""
    with open(os.path.join(CONFIGS, flagfile), encoding="utf-8") as f:
        lines = f.read().splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith("--flip") or
          line.startswith("--noflip")]
    assert len(at) == 1 and lines[at[0]] == "--flip=true", flagfile
    comment = []
    for line in reversed(lines[:at[0]]):
        if not line.startswith("#"):
            break
        comment.append(line)
    text = " ".join(reversed(comment))
    assert "flip" in text and (CHOICE in text or "flipped" in text), (flagfile, text)


@pytest.mark.parametrize("flagfile", sorted(PAPER_TABLES))
def test_flagfile_builds_what_its_paper_states(flagfile):
    config = config_from_flagfile(flagfile)
    for pin in PAPER_TABLES[flagfile]:
        got = _resolved(config, pin.what)
        assert got == pin.value, f"{flagfile}: {pin.what} = {got!r}, expected {pin.value!r} " \
                                 f"({pin.source})"


def test_transfer_scratch_rows_are_the_distillation_on_the_from_scratch_schedule():
    """transfer_classification_scratch.flags = transfer_classification.flags but the schedule,
    which is transfer_pretrain.flags' (kd_transfer: 'if the network is trained from scratch,
    [...] is used; while if the network is initialized, [...] is used to continue')."""
    schedule = ("learning_rate", "schedule", "epochs", "decay_epochs", "steps", "decay_steps",
                "warmup_steps")
    scratch = config_from_flagfile("transfer_classification_scratch.flags")
    distill = config_from_flagfile("transfer_classification.flags")
    pretrain = config_from_flagfile("transfer_pretrain.flags")
    for f in dataclasses.fields(TrainConfig):
        want = pretrain if f.name in schedule else distill
        assert getattr(scratch, f.name) == getattr(want, f.name), f.name
    assert scratch.learning_rate != distill.learning_rate and scratch.epochs != distill.epochs


# --- the ablation map (docs/RECIPES.md): every table row -> flags on top of a flagfile --------

@dataclasses.dataclass(frozen=True)
class Row:
    """A paper's table row: ``flagfile`` + ``flags`` reproduce it; ``terms`` is what the
    recipe must resolve to, ``(name, weight)`` per active term."""
    paper: str
    row: str
    flagfile: str
    flags: tuple[str, ...]
    terms: tuple[tuple[str, float], ...]


def _row(paper, row, flagfile, flags, *terms):
    return Row(paper, row, flagfile, tuple(flags.split()), tuple(terms))


SOFT, HID = ("soft_prediction", 1.0), ("hidden", 1.0)
ABLATION_ROWS = [
    # Wang et al. 2019, Tables 4-7.
    _row("wang2019", "T (teacher)", "scratch_teacher.flags", "", ("sphereface", 1.0)),
    _row("wang2019", "S_KD", "kd.flags", "", ("sphereface", 1.0), SOFT, ("mk_mmd", 1.0)),
    _row("wang2019", "S_KDim = S_M", "kd_im.flags", "", ("sphereface", 1.0), SOFT,
         ("mk_mmd", 1.0)),
    _row("wang2019", "S_L (eq. 6)", "kd_im.flags", "--feature_loss=normalized_l2",
         ("sphereface", 1.0), SOFT, ("normalized_l2", 1.0)),
    # Nikitin et al. 2020, Table 1.
    _row("nikitin2020", "Teacher, CosFace", "pwr_baseline.flags", "--student=iresnet50",
         ("cosface", 1.0)),
    _row("nikitin2020", "Student, CosFace", "pwr_baseline.flags", "", ("cosface", 1.0)),
    _row("nikitin2020", "CosFace + RKD-D", "pwr.flags", "--kd_loss=rkd_d --alpha=100 --beta=1",
         ("rkd_d", 100.0), ("cosface", 1.0)),
    _row("nikitin2020", "CosFace + RKD-A", "pwr.flags", "--kd_loss=rkd_a --alpha=200 --beta=1",
         ("rkd_a", 200.0), ("cosface", 1.0)),
    _row("nikitin2020", "CosFace + RKD-DA", "pwr.flags", "--kd_loss=rkd_da --alpha=100 --beta=1",
         ("rkd_da", 100.0), ("cosface", 1.0)),
    _row("nikitin2020", "CosFace + DarkRank", "pwr.flags",
         "--kd_loss=darkrank --alpha=1 --beta=1", ("darkrank", 1.0), ("cosface", 1.0)),
    _row("nikitin2020", "CosFace + HKD", "pwr.flags", "--kd_loss=hinton --alpha=0.3 --beta=0.7",
         ("hinton", 0.3), ("cosface", 0.7)),
    _row("nikitin2020", "CosFace + HKD + RKD-D", "pwr.flags",
         "--kd_loss=rkd_d --alpha=100 --beta=0.7 --gamma=0.3",
         ("rkd_d", 100.0), ("cosface", 0.7), ("hinton", 0.3)),
    _row("nikitin2020", "CosFace + HKD + RKD-A", "pwr.flags",
         "--kd_loss=rkd_a --alpha=200 --beta=0.7 --gamma=0.3",
         ("rkd_a", 200.0), ("cosface", 0.7), ("hinton", 0.3)),
    _row("nikitin2020", "CosFace + HKD + RKD-DA", "pwr.flags",
         "--kd_loss=rkd_da --alpha=100 --beta=0.7 --gamma=0.3",
         ("rkd_da", 100.0), ("cosface", 0.7), ("hinton", 0.3)),
    _row("nikitin2020", "CosFace + HKD + DarkRank", "pwr.flags",
         "--kd_loss=darkrank --alpha=1 --beta=0.7 --gamma=0.3",
         ("darkrank", 1.0), ("cosface", 0.7), ("hinton", 0.3)),
    _row("nikitin2020", "PWR-Diff (0.1)", "pwr.flags",
         "--pwr_inversion=diff --pwr_margin=const --pwr_margin_value=0.1", ("pwr", 100.0)),
    _row("nikitin2020", "PWR-Diff (teacher-std)", "pwr.flags",
         "--pwr_inversion=diff --pwr_margin=teacher_std", ("pwr", 100.0)),
    _row("nikitin2020", "PWR-Diff (teacher-diff)", "pwr.flags",
         "--pwr_inversion=diff --pwr_margin=teacher_diff", ("pwr", 100.0)),
    _row("nikitin2020", "PWR-Exp (0.1)", "pwr.flags",
         "--pwr_inversion=exp --pwr_margin=const --pwr_margin_value=0.1", ("pwr", 100.0)),
    _row("nikitin2020", "PWR-Exp (teacher-std)", "pwr.flags",
         "--pwr_inversion=exp --pwr_margin=teacher_std", ("pwr", 100.0)),
    _row("nikitin2020", "PWR-Exp (teacher-diff)", "pwr.flags", "", ("pwr", 100.0)),
    _row("nikitin2020", "PWR-RankNet", "pwr.flags",
         "--pwr_inversion=ranknet --pwr_margin=none --alpha=15", ("pwr", 15.0)),
    # Wang, Lan, Zhang 2017, Tables 1-5 (init checkpoints are run options, not recipe values;
    # tests/test_transfer_e2e.py runs the chain of initializations).
    _row("kd_transfer", "teacher ResNet-50 (softmax)", "transfer_pretrain.flags",
         "--student_options=", ("softmax", 1.0)),
    _row("kd_transfer", "softmax-pretrained student (eq. 3)", "transfer_pretrain.flags", "",
         ("softmax", 1.0)),
    _row("kd_transfer", "Table 1 Targets: Hidden", "transfer_classification_scratch.flags",
         "--lambda_soft=0 --lambda_hidden=1", ("softmax", 1.0), HID),
    _row("kd_transfer", "Table 1 Targets: Soft = Initialization: Scratch = Table 2 Scratch",
         "transfer_classification_scratch.flags", "", ("softmax", 1.0), SOFT),
    _row("kd_transfer", "Table 2 ResNet-50/2, Scratch", "transfer_classification_scratch.flags",
         "--student_options=width_divisor=2", ("softmax", 1.0), SOFT),
    _row("kd_transfer", "Table 1 Initialization: Ours = Table 2 Ours",
         "transfer_classification.flags", "", ("softmax", 1.0), SOFT),
    _row("kd_transfer", "Table 2 ResNet-50/2, Ours", "transfer_classification.flags",
         "--student_options=width_divisor=2", ("softmax", 1.0), SOFT),
    _row("kd_transfer", "Table 3 alignment teacher (Euclidean loss)", "transfer_alignment.flags",
         "--student_options= --lambda_hidden=0", ("landmark", 1.0)),
    _row("kd_transfer", "Table 3 no target", "transfer_alignment.flags", "--lambda_hidden=0",
         ("landmark", 1.0)),
    _row("kd_transfer", "Table 3 hidden (β)", "transfer_alignment.flags", "",
         ("landmark", 1.0), HID),
    _row("kd_transfer", "Table 3 soft (α)", "transfer_alignment.flags",
         "--lambda_hidden=0 --lambda_soft=1", ("landmark", 1.0), SOFT),
    _row("kd_transfer", "Table 4 verification teacher (triplet)", "transfer_verification.flags",
         "--student_options= --lambda_soft=0 --extra_softmax=0", ("triplet", 1.0)),
    _row("kd_transfer", "Table 4 no target", "transfer_verification.flags",
         "--lambda_soft=0 --extra_softmax=0", ("triplet", 1.0)),
    _row("kd_transfer", "Table 4 hidden (β)", "transfer_verification.flags",
         "--lambda_soft=0 --lambda_hidden=1 --extra_softmax=0", ("triplet", 1.0), HID),
    _row("kd_transfer", "Table 4 soft (α)", "transfer_verification.flags", "--extra_softmax=0",
         ("triplet", 1.0), SOFT),
    _row("kd_transfer", "Table 5 teacher (triplet + softmax)", "transfer_verification.flags",
         "--student_options= --lambda_soft=0", ("triplet", 1.0), ("softmax", 1.0)),
    _row("kd_transfer", "Table 5 no target", "transfer_verification.flags", "--lambda_soft=0",
         ("triplet", 1.0), ("softmax", 1.0)),
    _row("kd_transfer", "Table 5 hidden (β)", "transfer_verification.flags",
         "--lambda_soft=0 --lambda_hidden=1", ("triplet", 1.0), HID, ("softmax", 1.0)),
    _row("kd_transfer", "Table 5 soft (α)", "transfer_verification.flags", "",
         ("triplet", 1.0), SOFT, ("softmax", 1.0)),
    # Yan et al. 2019, Tables 2-5.
    _row("yan2019", "Table 2 y2", "vargface_y2.flags", "", ("arcface", 1.0)),
    _row("yan2019", "Table 2 VarGFaceNet", "vargface_scratch.flags", "", ("arcface", 1.0)),
    _row("yan2019", "Table 4 r100 (teacher)", "vargface_scratch.flags",
         "--student=se_iresnet100", ("arcface", 1.0)),
    _row("yan2019", "Table 4 VarGNet (student)", "vargface.flags",
         "--student=vargnet --generations=1", ("arcface", 1.0), ("normalized_l2", 7.0)),
    _row("yan2019", "Tables 3, 4 VarGFaceNet (student) = Table 5 recursive=1", "vargface.flags",
         "--generations=1", ("arcface", 1.0), ("normalized_l2", 7.0)),
    _row("yan2019", "Table 5 recursive=2", "vargface.flags", "", ("arcface", 1.0),
         ("normalized_l2", 7.0)),
    # Duong et al. 2019, Table 2 (Tables 3-5 evaluate the same runs).
    _row("duong2019", "ResNet90 teacher", "shrinktea.flags", "--recipe=scratch --student=iresnet90",
         ("arcface", 1.0)),
] + [r for s in ("mobilenet_v1", "mobilenet_v2", "mobilefacenet", "mobilefacenet_r") for r in (
    _row("duong2019", f"{s} Self-Studied", "shrinktea.flags", f"--recipe=scratch --student={s}",
         ("arcface", 1.0)),
    _row("duong2019", f"{s} Student-1 (l2 loss)", "shrinktea.flags",
         f"--student={s} --shrinktea_distance=l2 --shrinktea_lambda=0.001",
         ("arcface", 1.0), ("angular_stages", 1.0)),
    _row("duong2019", f"ShrinkTeaNet-{s}", "shrinktea.flags", f"--student={s}",
         ("arcface", 1.0), ("angular_stages", 1.0)))] + [
    # not a table row: kdface's alternative reading of the last level (docs/RECIPES.md)
    _row("duong2019", "option: last level through the teacher's embedding layer",
         "shrinktea.flags", "--recipe=shrinktea_through_teacher",
         ("arcface", 1.0), ("angular_stages_through_teacher", 1.0)),
]

NOT_REPRODUCIBLE = {
    ("wang2019", "Table 8 DCR, DMDS, MDS"): "other papers' methods, not distillation recipes",
    ("wang2019", "Tables 3, 9 (training and inference time)"): "measurements, not settings",
    ("kd_transfer", "Table 1 Targets: Logits [21]"): "Sau & Balasubramanian's noisy-teacher "
        "logit regression perturbs the teacher's logits; no kdface term does",
    ("kd_transfer", "Table 1 Initialization: Fitnet"): "FitNets' first stage trains only the "
        "layers below the guided one through a regressor; kdface trains whole networks",
    ("yan2019", "Table 3 (three teachers)"): "the paper does not say how its three teachers "
        "differ; the student side is vargface.flags with each --teacher_checkpoint",
    ("duong2019", "Tables 3-5, other methods' rows"): "other papers' systems and training sets",
}


def test_ablation_rows_build():
    assert len({(r.paper, r.row) for r in ABLATION_ROWS}) == len(ABLATION_ROWS)
    for row in ABLATION_ROWS:
        config = config_from_flagfile(row.flagfile, *row.flags)
        recipe = build_recipe(config.recipe, config)
        assert tuple((t.name, t.weight) for t in recipe.terms) == row.terms, row
    assert all(NOT_REPRODUCIBLE.values())


# --- every row trains: 2 steps on tiny networks and a tiny labelled set with landmarks --------

def _tiny_source(n=16, hw=16, classes=4):
    from kdface.data import encode_image
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        label = i % classes
        image = (rng.random((hw, hw, 3)) * 80 + 40 + 30 * label).clip(0, 255).astype(np.uint8)
        out.append({"image": encode_image(image), "label": label,
                    "landmarks": (rng.random((5, 2)) * hw).astype(np.float32)})
    return out


def _tiny(config: TrainConfig, workdir: str, teacher_dir: str) -> TrainConfig:
    """The row's run on tiny networks: everything the row sets except the sizes."""
    from _train_helpers import HW, TINY
    teacher = {}
    if build_recipe(config.recipe, config).needs_teacher:
        teacher = dict(teacher="sphereface_custom", teacher_options=dict(TINY),
                       teacher_checkpoint=teacher_dir)
    return dataclasses.replace(
        config, workdir=workdir, student="sphereface_custom", student_options=dict(TINY),
        input_size=HW, crop_from=None, batch_size=16, steps=2, epochs=None, decay_epochs=(),
        decay_steps=(), warmup_steps=0, margin_scale=16.0, val_data=(), teacher_cache=False,
        save_every=2, log_every=1, async_checkpoints=False, progress=False,
        # a grouped row keeps grouping at the tiny batch: 4 groups of 4, as the paper's 6 of 92
        relation_group_size=4 if config.relation_group_size else 0, **teacher)


@pytest.mark.parametrize("paper", sorted({r.paper for r in ABLATION_ROWS}))
def test_ablation_rows_train_two_steps(tmp_path, paper):
    from _train_helpers import tiny_config
    from kdface.training._run import run
    source = _tiny_source(n=32)
    teacher_dir = str(tmp_path / "teacher")
    run(tiny_config(teacher_dir, steps=2, batch_size=16), data_dir="", source=source,
        num_classes=4, val_sets=[])
    seen = set()
    for k, row in enumerate(r for r in ABLATION_ROWS if r.paper == paper):
        config = _tiny(config_from_flagfile(row.flagfile, *row.flags), "", teacher_dir)
        recipe = build_recipe(config.recipe, config)
        key = (recipe.name, tuple((t.name, t.weight, tuple(sorted(t.options.items())))
                                  for t in recipe.terms), recipe.head, recipe.student_view,
               recipe.teacher_view, recipe.generations, config.nesterov)
        if key in seen:  # rows that differ only by the backbone are one tiny run
            continue
        seen.add(key)
        config = dataclasses.replace(config, workdir=str(tmp_path / f"row{k}"))
        summary = run(config, data_dir="", source=source, num_classes=4, val_sets=[])
        assert summary["step"] == 2, row
        assert np.isfinite(summary["metrics"]["loss"]), row
        assert {t.name for t in recipe.terms} <= set(summary["metrics"]), row


def test_schedules_in_epochs_resolve_against_the_papers_training_sets():
    from kdface.training._plan import resolve_schedule
    # nikitin2020 §4.1: "It consists of 5.8 million photos from 85,000 subjects"; batch 552,
    # 13 epochs, lr / 10 every 2 epochs: ~136.6 k steps, a decay every ~21 k.
    pwr = resolve_schedule(config_from_flagfile("pwr.flags"), 5_800_000)
    assert pwr.steps == -(-13 * 5_800_000 // 552) == 136_595
    assert pwr.decay_steps == tuple(-(-e * 5_800_000 // 552) for e in (2, 4, 6, 8, 10, 12))
    # wang2019: CASIA-WebFace (494,414 images, Yi et al. 2014), batch 512, "20 epochs".
    kd_im = resolve_schedule(config_from_flagfile("kd_im.flags"), 494_414)
    assert kd_im.steps == -(-20 * 494_414 // 512)


def test_views_crop_and_low_resolution_reach_the_pipeline():
    from kdface.training._run import _pipeline
    source = _tiny_source(hw=16)
    tiny = dict(batch_size=8, input_size=(16, 16))
    kd_im = dataclasses.replace(config_from_flagfile("kd_im.flags"), **tiny)
    recipe = build_recipe(kd_im.recipe, kd_im)
    state = _pipeline(kd_im, source, recipe.student_view, recipe.teacher_view).get_state()
    assert state["pipeline"]["student_view"] == "low_resolution"
    assert state["pipeline"]["teacher_view"] == "original"
    transfer = dataclasses.replace(config_from_flagfile("transfer_classification.flags"),
                                   crop_from=(20, 20), **tiny)
    state = _pipeline(transfer, source, "original", "original").get_state()
    assert state["pipeline"]["crop_from"] == [20, 20]


# --- the terms the papers' forms need, against NumPy --------------------------------------------

def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_paper_terms_match_numpy():
    import jax.numpy as jnp
    from kdface.distill._terms import TERMS, TermInputs
    rng = np.random.default_rng(0)
    zs, zt = rng.normal(size=(6, 5)) * 3, rng.normal(size=(6, 5)) * 3
    es, et = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    inputs = TermInputs(labels=jnp.zeros(6, jnp.int32),
                        student={"logits": jnp.asarray(zs, jnp.float32),
                                 "embedding": jnp.asarray(es, jnp.float32)},
                        teacher={"logits": jnp.asarray(zt, jnp.float32),
                                 "embedding": jnp.asarray(et, jnp.float32)})
    # the float64 references below see the float32 values the terms see
    zs, zt, es, et = (a.astype(np.float32).astype(np.float64) for a in (zs, zt, es, et))
    ps, pt = _softmax(zs / 4), _softmax(zt / 4)
    # float32 vs float64 (case 2) throughout: a log-softmax sums 5 exponentials, the
    # cross-entropy 5 products, the batch mean 6 rows: 16 terms. Scale: the reduced terms'
    # magnitude, mean_b sum_c |p_t log p_s| (+ |p_t log p_t| for KL: its two parts cancel),
    # and at least max|z|/4, the magnitude of a log-probability's own rounding.
    log_mag = float(np.max(np.abs(np.concatenate([zs, zt])))) / 4
    # wang2019 eq. 3 / kd_transfer eq. 2: H(p_t, p_s), no τ².
    ce = -(pt * np.log(ps))
    assert_close(TERMS["soft_prediction"].fn(inputs, temperature=4.0), np.mean(ce.sum(-1)),
                 terms=16, scale=max(np.mean(np.abs(ce).sum(-1)), log_mag))
    # nikitin2020's HKD as the authors' code: KL(p_t ‖ p_s) without τ²; Hinton's with τ².
    kl = np.mean((pt * (np.log(pt) - np.log(ps))).sum(-1))
    kl_mag = max(np.mean((np.abs(pt * np.log(pt)) + np.abs(ce)).sum(-1)), log_mag)
    assert_close(TERMS["hinton"].fn(inputs, temperature=4.0, tau_squared=False), kl,
                 terms=16 + 5, scale=kl_mag)
    assert_close(TERMS["hinton"].fn(inputs, temperature=4.0), 16 * kl, terms=16 + 5,
                 scale=16 * kl_mag)
    # kd_transfer's hidden-layer target: Euclidean loss 1/2 ||H_s - H_t||², batch mean.
    # 4 squared differences + the mean over 6; scale: the squares of |H_s| + |H_t| (the
    # subtraction cancels)
    assert_close(TERMS["hidden"].fn(inputs), np.mean(0.5 * ((es - et) ** 2).sum(-1)),
                 terms=4 + 6, scale=np.mean(0.5 * ((np.abs(es) + np.abs(et)) ** 2).sum(-1)))
    # RKD-D on L2-normalized embeddings = RKD-D of the normalized arrays.
    from kdface import losses
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    # float32 vs float32 (case 3, normalized in JAX vs in NumPy): 2 x (a norm over 4, a
    # distance over 4, the mean over 6 x 6 pairs, the Huber mean over 36); scale the loss
    assert_close(
        TERMS["rkd_d"].fn(inputs, normalize=True),
        losses.rkd_distance_loss(jnp.asarray(unit(es), jnp.float32),
                                 jnp.asarray(unit(et), jnp.float32)),
        terms=2 * (4 + 4 + 36 + 36))


def test_shrinkteanet_levels_weights_and_l2_baseline():
    """duong2019 eq. 7: four levels, λ_4 = λ, λ_i = λ_{i+1}/2; levels 1-3 through the adapter
    G_i^s and the teacher's remaining blocks (eq. 6), level 4 on the student's own embedding F_n^s
    (eqs. 4-5); the shrinktea_through_teacher reading routes level 4 like the others. Against a
    NumPy sum."""
    import jax.numpy as jnp
    from kdface.distill._terms import TERMS, TermInputs
    rng = np.random.default_rng(1)
    stages = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(4)]
    embedding = rng.normal(size=(5, 3)).astype(np.float32)
    target = rng.normal(size=(5, 3)).astype(np.float32)
    gain = np.float32([1.5, -2.0, 0.5, 3.0])          # a distinct "adapter" per level
    tail = lambda i, f: f * (i + 1.0) + 0.25          # a distinct "teacher tail" per level
    inputs = TermInputs(labels=jnp.zeros(5, jnp.int32),
                        student={"stages": [jnp.asarray(s) for s in stages],
                                 "embedding": jnp.asarray(embedding)},
                        teacher={"embedding": jnp.asarray(target)},
                        teacher_tail=tail, adapters=lambda i, f: f * gain[i])

    def angular(a, b):
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        return np.mean((1 - cos) ** 2), 4.0         # (1 - cos)^2 <= 4: the terms' magnitude

    def l2(a, b):                                   # the subtraction cancels: |a| + |b|
        return np.mean(((a - b) ** 2).sum(-1)), np.mean(((np.abs(a) + np.abs(b)) ** 2).sum(-1))

    # float64 references of the float32 inputs (case 2)
    stages64, emb64, target64, gain64 = ([s.astype(np.float64) for s in stages],
                                         embedding.astype(np.float64), target.astype(np.float64),
                                         gain.astype(np.float64))
    through = lambda i: stages64[i] * gain64[i] * (i + 1.0) + 0.25
    readings = {"angular_stages": [through(0), through(1), through(2), emb64],
                "angular_stages_through_teacher": [through(i) for i in range(4)]}
    for name, students in readings.items():
        for distance, d, lam in (("angular", angular, 1.0), ("l2", l2, 0.001)):
            levels = [d(students[i], target64) for i in range(4)]
            weights = (1 / 8, 1 / 4, 1 / 2, 1)
            expected = lam * sum(w * v for w, (v, _) in zip(weights, levels))
            scale = lam * sum(w * m for w, (_, m) in zip(weights, levels))
            got = TERMS[name].fn(inputs, final_weight=lam, distance=distance)
            # per level: the adapter and tail (2 roundings), 3-term dot and norms (+ the
            # divides), the mean over 5 rows; then the 4-level weighted sum: 2 + 3 + 2 + 5 + 4
            assert_close(got, expected, terms=2 + 3 + 2 + 5 + 4, scale=scale,
                         what=f"{name} {distance}")
        with pytest.raises(ValueError, match="distance"):
            TERMS[name].fn(inputs, distance="cosine")
    # the paper's reading compares the embeddings themselves: their sizes must agree
    assert TERMS["angular_stages"].same_embedding
    assert not TERMS["angular_stages_through_teacher"].same_embedding
    wide = dataclasses.replace(inputs, student={**inputs.student,
                                                "embedding": jnp.zeros((5, 4), jnp.float32)})
    with pytest.raises(ValueError, match="shrinktea_through_teacher"):
        TERMS["angular_stages"].fn(wide)


def test_shrinkteanet_last_level_reaches_the_evaluated_embedding():
    """duong2019 eq. 5 / Fig. 2: L_n acts on F_n^s, the embedding the head reads and evaluation
    uses. On real (tiny) networks, the shrinktea term alone gives the student's embedding layer a
    gradient, and its level 4 equals eq. 4 on the two networks' embeddings (NumPy); the
    shrinktea_through_teacher reading leaves that layer without one (only L_SM reaches it)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from _train_helpers import HW, TINY
    from kdface.distill import build_student
    from kdface.distill._networks import FaceNetwork
    from kdface.distill._terms import TERMS, TermInputs
    from kdface import models
    teacher = FaceNetwork(models.create("sphereface_custom", rngs=nnx.Rngs(1), **TINY),
                          num_classes=4, head="cosface", rngs=nnx.Rngs(1))
    teacher.eval()
    student = build_student("sphereface_custom", num_classes=4, head="cosface",
                            rngs=nnx.Rngs(0), backbone_options=dict(TINY),
                            adapt_to=teacher.backbone, input_hw=HW)
    images = jnp.asarray(np.random.default_rng(3).normal(size=(6, *HW, 3)), jnp.float32)
    t_out = teacher(images)
    graphdef, params, rest = nnx.split(student, nnx.Param, ...)

    def term_value(params, name, final_weight=1.0):
        net = nnx.merge(graphdef, params, rest, copy=True)
        s_out = net.network(images, with_stages=True)
        inputs = TermInputs(labels=jnp.zeros(6, jnp.int32), student=s_out, teacher=t_out,
                            teacher_tail=teacher.backbone.forward_from, adapters=net.adapt)
        return TERMS[name].fn(inputs, final_weight=final_weight)

    def fc_grad(name):
        grads = jax.grad(term_value)(params, name)
        fc = grads["network"]["backbone"]["fc"]
        return max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(fc))

    assert fc_grad("angular_stages") > 1e-6
    assert fc_grad("angular_stages_through_teacher") == 0.0
    # the value against NumPy on the networks' own features: levels 1-3 are eq. 4 on
    # T_{i+1..n}(G_i^s(F_i^s)), level 4 eq. 4 on the student's embedding, both against T(x)
    net = nnx.merge(graphdef, params, rest, copy=True)
    s_out = net.network(images, with_stages=True)
    t = np.asarray(t_out["embedding"], np.float64)

    def angular(a):
        a = np.asarray(a, np.float64)
        cos = (a * t).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(t, axis=-1)
        return np.mean((1 - cos) ** 2)

    through = [teacher.backbone.forward_from(i, net.adapt(i, s_out["stages"][i]))
               for i in range(4)]
    weights = (1 / 8, 1 / 4, 1 / 2, 1)
    paper = sum(w * angular(f) for w, f in zip(weights[:3], through[:3])) + angular(
        s_out["embedding"])
    other = sum(w * angular(f) for w, f in zip(weights, through))
    # float32 term vs float64 reference of the same float32 features: per level an 8-d dot and
    # two norms (+ the divides) and the mean over 6 rows, then the 4-level sum; each level <= 4
    for name, expected in (("angular_stages", paper), ("angular_stages_through_teacher", other)):
        assert_close(term_value(params, name), expected, terms=8 + 3 + 6 + 4,
                     scale=4 * sum(weights), what=name)
    assert abs(paper - other) > 1e-4  # the two readings differ on these networks


def test_sphereface_term_anneals_lambda_with_the_step():
    import jax.numpy as jnp
    from kdface import losses
    from kdface.distill._terms import TERMS, TermInputs
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(4, 3)).astype(np.float32)
    cos = np.clip(rng.normal(size=(4, 5)) * 0.3, -1, 1).astype(np.float32)
    labels = jnp.asarray([0, 1, 2, 3], jnp.int32)
    for step in (0, 100, 10_000):
        inputs = TermInputs(labels=labels, step=jnp.asarray(step, jnp.int32),
                            student={"cos": jnp.asarray(cos), "embedding": jnp.asarray(emb)})
        lam = float(losses.sphereface_lambda(step))   # max(5, 1000 / (1 + 0.12 step))
        # float32 vs the exact value: 0.12 * step, + 1, the divide, the max: 3 roundings
        assert_close(lam, max(5.0, 1000.0 / (1 + 0.12 * step)), terms=3, scale=lam)
        # λ computed in the graph vs passed in: float32 vs float32 (case 3), 2 x (5 classes'
        # log-sum-exp + the 4-row mean); scale: the loss (a mean of CE >= 0, no cancellation)
        annealed = TERMS["sphereface"].fn(inputs, anneal=True)
        assert_close(annealed, TERMS["sphereface"].fn(inputs, lambda_=lam), terms=2 * (5 + 4))


def test_vargface_teacher_size_against_the_paper():
    """yan2019 §3.3: 'We employ ResNet 100 [9] with SE as our teacher model. The teacher model
    has 24G FLOPs and 108M parameters'. se_iresnet100's FLOPs agree; its parameters (65.5 M) do
    not, and the 108M is the backbone plus the classifier of the 93K training identities ('5.1M
    images collected from 93K identities', §3.1) in units of 2^20, the paper's units for its
    '12.25M' fc layer (§2.3.2: 7×7×512×512 = 12,845,056 = 12.25 × 2^20). docs/RECIPES.md."""
    from flax import nnx
    from kdface import models
    teacher = nnx.eval_shape(lambda: models.create("se_iresnet100", rngs=nnx.Rngs(0)))
    params = models.count_params(teacher)
    assert round(2 * models.count_macs(teacher) / 1e9) == 24          # "24G FLOPs"
    assert 65.0e6 < params < 66.0e6                                    # not 108M
    assert 7 * 7 * 512 * 512 / 2**20 == 12.25                          # the paper's units
    assert round((params + 93_000 * teacher.embedding_size) / 2**20) == 108
