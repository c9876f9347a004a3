"""The five papers' methods, each one ``RecipeSpec`` declaration (data only; see ``_recipes``).

Every value a paper states is cited beside it with the paper's words; every value it leaves open
says "kdface's choice". The numbers themselves are run options (``TrainConfig`` fields) whose
values the flagfiles in ``kdface/configs/`` set; docs/RECIPES.md tabulates all of them and maps
each paper's ablation rows to flags.

References:
  wang2019: Mengjiao Wang, Rujie Liu, Nada Hajime, Narishige Abe, Hidetsugu Uchida, Tomoaki
    Matsunami, Improved Knowledge Distillation for Training Fast Low Resolution Face Recognition
    Model, ICCV Workshops 2019.
  nikitin2020: Mikhail Nikitin, Vadim Konushin, Anton Konushin, Pairwise Ranking Distillation for
    Deep Face Recognition, 2020.
  kd_transfer: Chong Wang, Xipeng Lan, Yangang Zhang, Model Distillation with Knowledge Transfer
    from Face Classification to Alignment and Verification, arXiv:1709.02929, 2017.
  yan2019: Mengjia Yan, Mengao Zhao, Zining Xu, Qian Zhang, Guoli Wang, Zhizhong Su,
    VarGFaceNet: An Efficient Variable Group Convolutional Neural Network for Lightweight Face
    Recognition, ICCV Workshops 2019, arXiv:1910.04985.
  duong2019: Chi Nhan Duong, Khoa Luu, Kha Gia Quach, Ngan Le, ShrinkTeaNet: Million-scale
    Lightweight Face Recognition via Shrinking Teacher-Student Networks, arXiv:1905.10620, 2019.
"""
from __future__ import annotations

from kdface.distill._recipes import (HEAD, Option, RecipeSpec, TeacherPhase, TermDecl,
                                     register_recipe)

# The margin options each head term reads: CosFace --margin, ArcFace --arcface_margin (each
# head its own margin: CosFace's 0.35 is not an ArcFace margin), A-Softmax m and its λ schedule.
HEAD_OPTIONS = {
    "softmax": {},
    "cosface": {"scale": Option("margin_scale"), "margin": Option("margin")},
    "arcface": {"scale": Option("margin_scale"), "margin": Option("arcface_margin")},
    "sphereface": {"margin": Option("sphereface_m"), "anneal": Option("sphereface_anneal")},
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


# --- wang2019 ------------------------------------------------------------------------------

def _wang2019(name: str, teacher_view: str, phases=(), summary=""):
    return RecipeSpec(
        name=name, summary=summary,
        terms=(TermDecl(HEAD, Option("lambda_hard"), options_for=HEAD_OPTIONS,
                        cite="wang2019 eq. 9, λ1·L_Hard: 'The hard loss is the cross entropy "
                             "between unsoften class probability X_S and ground truth y' (eq. 4); "
                             "λ1 = 1 is kdface's choice (the paper prints no value)"),
               TermDecl("soft_prediction", Option("lambda_soft"), options=TEMPERATURE,
                        cite="wang2019 eq. 3: 'The soft loss is the cross entropy between X_T^τ "
                             "and X_S^τ' (no τ², so soft_prediction, not hinton); λ2 = 1 and "
                             "τ = 4 are kdface's choice; the scores: 'Let's denote the final "
                             "score output as Z', for an A-Softmax network ||x||·cos θ, where "
                             "kdface's choice is s·cos θ with s = --margin_scale = 64 for "
                             "teacher and student"),
               TermDecl(Option("feature_loss"), Option("lambda_feature"),
                        options_for={f: {} for f in FEATURE_LOSSES},
                        cite="wang2019 eq. 9: 'we replace the normalized feature L2 loss ... with "
                             "the normalized feature MK-MMD'; 'five Gaussian kernels by setting "
                             "Gaussian distribution variance as σ² × (1, 2^1, 2^2, 2^3, 2^4)', "
                             "'The σ² is set as the mean of squared distance of the pairs': the "
                             "kernels averaged (not summed), σ² over the pooled teacher + "
                             "student batch and held constant (stop-gradient) are kdface's "
                             "choice; eq. 6 (normalized L2) is the ablation, squared where eq. 5 "
                             "prints 'L_Feature = ||F_S − F_T||' (kdface's choice); λ3 = 1 is "
                             "kdface's choice")),
        student_view="low_resolution", teacher_view=teacher_view, phases=phases,
        cite={"student_view": "wang2019 §2.2: '40 percent of the training set are randomly "
                              "selected for downscaling as LR samples. The size of the LR "
                              "samples includes 8 × 8, 12 × 12, 16 × 16, 20 × 20 and 30 × 30'",
              "input_size": "wang2019 §2.2: 'MTCNN [17] is used to detect and align the face "
                            "region as 112 × 96 image'",
              "head": "wang2019 §3.2: 'a pre-trained 64-layer ResNet network trained with "
                      "Sphreface loss [22] as teacher model'; the student's A-Softmax head, m = 4 "
                      "and SphereFace's λ annealing are kdface's choice",
              "schedule": "wang2019 §3.3.1: 'batchsize as 512 ... the process will last for 20 "
                          "epochs'; SGD, lr 0.1 and its decays are kdface's choice",
              "augmentation": "wang2019 §2.2 names only the LR augmentation: the random "
                              "horizontal flip is kdface's choice"})


# kd_im: the untouched teacher sees the original image, the student the LR one.
register_recipe(_wang2019(
    "kd_im", "original", summary="wang2019 KD_im: HR teacher, LR student (eq. 9)"))
# kd: the teacher was fine-tuned on LR data first and sees the student's (LR) view.
register_recipe(_wang2019(
    "kd", "low_resolution", summary="wang2019 KD: LR-fine-tuned teacher, LR student (eq. 9)",
    phases=(TeacherPhase("teacher_lr", recipe="scratch", student_view="low_resolution",
                         cite="wang2019 §3.3.1: 'Step1, use LR augmented data to update "
                              "teacher's weights; Step2, use same train set to train student "
                              "model under updated teacher's guidance'"),)))


# --- nikitin2020 ---------------------------------------------------------------------------

# The baselines' inputs follow the authors' public KD-PWR code (the paper prints no formula for
# them): L2-normalized embeddings for RKD and DarkRank, DarkRank over a list of 4 (the anchor and
# its 3 teacher-nearest neighbours), HKD as KL without τ².
_BASELINE = "kdface's choice, after the authors' public KD-PWR code"
register_recipe(RecipeSpec(
    name="pwr",
    summary="nikitin2020: α·L_KD + β·CosFace + γ·HKD (eq. 12)",
    terms=(TermDecl(Option("kd_loss"), Option("alpha"),
                    options_for={"pwr": PWR_OPTIONS,
                                 "rkd_d": {"normalize": True}, "rkd_a": {"normalize": True},
                                 "rkd_da": {"normalize": True},
                                 "darkrank": {"normalize": True, "list_length": 3},
                                 "hinton": {**TEMPERATURE, "tau_squared": False}},
                    cite="nikitin2020 eq. 12, α·L_KD: 'we set α = 100 for RKD-D, α = 200 for "
                         "RKD-A, and α = 1 for DarkRank ... α = 100 to be a good option for "
                         "PWR-Diff and PWR-Exp, while for PWR-RankNet ... we use α = 15'; "
                         f"baseline inputs: {_BASELINE}; PWR is the mean over the ordered score "
                         "pairs with ψ_i^T > ψ_j^T where eq. 3 sums them (α = 100 on the mean "
                         "is ≈ 1.1e-5 on the sum at 92 samples), and a margin sits inside "
                         "PWR-Exp's exponent where eqs. 7-9 write it for the difference loss "
                         f"only: {_BASELINE}"),
           TermDecl(HEAD, Option("beta"), options_for=HEAD_OPTIONS,
                    cite="nikitin2020 eq. 12, β·CosFace: 'When CosFace loss is used ... its "
                         "weight β is always set to 1.0'; 0 for PWR: 'the effect of inversion "
                         "loss function used in PWR distillation was explored only in such "
                         "setting' (PWR alone)"),
           TermDecl("hinton", Option("gamma"), options={**TEMPERATURE, "tau_squared": False},
                    when={"kd_loss": tuple(k for k in KD_LOSSES if k != "hinton")},
                    cite="nikitin2020 §4.2: 'In case if HKD is used, its softmax temperature is "
                         "set to 4.0, and combination with CosFace is done with β = 0.7 and "
                         f"γ = 0.3'; KL without τ²: {_BASELINE}")),
    cite={"head": "nikitin2020 §4.2: 'we set its parameters to be margin = 0.35 and scale = "
                  "64.0'",
          "schedule": "nikitin2020 §4.2: 'Batch size is fixed to 552(92 × 6) ... Learning rate is "
                      "initially set to 0.1, and during training it is divided by 10 each 2 "
                      "epochs. The total number of epochs is 13'",
          "init": "nikitin2020 §4.2: 'student models in all distillation experiments are "
                  "initialized with pretrained weights of the baseline model'",
          "augmentation": "nikitin2020 §4.1: 'aligned by five facial landmarks ... and then "
                          "cropped to the size of 112×112' names no flip: the random horizontal "
                          "flip is kdface's choice"},
))


# --- kd_transfer ---------------------------------------------------------------------------

register_recipe(RecipeSpec(
    name="transfer",
    summary="kd_transfer: knowledge transfer to classification, alignment or verification",
    head="softmax",
    choices={"transfer_task": TRANSFER_TASKS},
    optimizer={"nesterov": True},
    terms=(
        TermDecl("softmax", Option("lambda_hard"), when={"transfer_task": ("classification",)},
                 cite="kd_transfer eq. 2: 'the first term is the softmax loss'"),
        TermDecl("landmark", 1.0, when={"transfer_task": ("alignment",)},
                 cite="kd_transfer eq. 6: 'we train the teacher network with optimizing the "
                      "Euclidean loss'"),
        TermDecl("triplet", 1.0, options={"margin": Option("triplet_margin"),
                                          "mining": Option("triplet_mining")},
                 when={"transfer_task": ("verification",)},
                 cite="kd_transfer eq. 8: 'triplet loss[22] is a widely used metric learning "
                      "method[22], and we take it'; the margin ('set to be [...] by "
                      "cross-validation', value lost) 0.2 is kdface's choice"),
        TermDecl("soft_prediction", Option("lambda_soft"), options=TEMPERATURE,
                 cite="kd_transfer eqs. 2, 5, 9 (α): 'the cross-entropy between the soft "
                      "predictions of the teacher and student network' (no τ²); τ ('set to be "
                      "[...] by cross-validation', value lost) 4 is kdface's choice"),
        TermDecl("hidden", Option("lambda_hidden"),
                 cite="kd_transfer eqs. 5, 7 (β): 'the hidden layer [H] ... satisfies [P = f(H)] "
                      "with [f] being a fully-connected mapping': the embedding feeding the head"),
        TermDecl("softmax", Option("extra_softmax"), when={"transfer_task": ("verification",)},
                 cite="kd_transfer §4.2.2: 'we also add the softmax loss ... in Eqn.(8) and "
                      "Eqn.(9) respectively for further enhancement'; weight 1 is kdface's "
                      "choice"),
    ),
    cite={"optimizer": "kd_transfer §5.1: 'the Nesterov Accelerated Gradient(NAG) is adopted "
                       "for faster convergence'",
          "targets": "kd_transfer §5.4/§5.5: alignment keeps the hidden layer (α = 0), "
                     "verification the soft prediction (β = 0): 'discard the target with the "
                     "negative impact by setting [α = 0] or [β = 0]'",
          "augmentation": "kd_transfer §5.1: 'we resize it to [...] wherein a sub-image with "
                          "[...] is randomly cropped and flipped' (the flip is the paper's; "
                          "sizes lost: kdface's choice 128 -> 112)",
          "schedule": "kd_transfer §5.1: learning rates, epochs per rate and batch sizes are lost "
                      "in the text: kdface's choice"},
))


# --- yan2019 -------------------------------------------------------------------------------

register_recipe(RecipeSpec(
    name="vargface",
    summary="yan2019: ArcFace + α·normalized L2 to the teacher's embedding, recursive KD",
    head="arcface",
    terms=(TermDecl(HEAD, 1.0, options_for={"arcface": HEAD_OPTIONS["arcface"]},
                    cite="yan2019 eq. 6: 'we employ arcface [3] as our classification loss'; "
                         "s = 64 and m = 0.5 (ArcFace's own defaults) are kdface's choice: the "
                         "paper prints s and m without values"),
           TermDecl("normalized_l2", Option("vargface_alpha"),
                    cite="yan2019 eq. 7: 'L = L_Arc + α L_s ... We empirically set α = 7'; "
                         "eq. 5: L_s = '1/N Σ ||F_t/||F_t|| − F_s/||F_s|| ||_2^2' (squared)")),
    cite={"generations": "yan2019 §2.5: 'employs the first generation of student to initialize "
                         "the second generation of student'; Table 5: recursive=1, 2",
          "teacher": "yan2019 §3.3: 'We employ ResNet 100 [9] with SE as our teacher model'; "
                     "'The teacher model has 24G FLOPs and 108M parameters': se_iresnet100 has 24.2 GFLOPs and 65.5 M "
                     "parameters; 108M is matched with the classifier of the 93K training "
                     "identities (65.5 M + 93,000 × 512 = 113.2 M = 107.9 × 2^20, the units of "
                     "the paper's '12.25M' fc layer)",
          "augmentation": "yan2019 §3.1: 'aligned by five facial landmarks ... then resized to "
                          "112 × 112' names no flip: the random horizontal flip is kdface's "
                          "choice",
          "schedule": "yan2019 states no optimizer, learning rate, batch or epochs: kdface's "
                      "choice"},
))


# --- duong2019 -----------------------------------------------------------------------------

_D_LAST = ("duong2019 eq. 5, 'L = L_SM + λ_n L_n(S, T)', both on F_n^s (eq. 3's L_SM reads "
           "F_n^s); Fig. 2: 'the feature directions provided by the student is optimized using "
           "both directions of the class' representative and the teacher embedding'")


def _shrinktea(name: str, term: str, summary: str, last_level: str) -> RecipeSpec:
    return RecipeSpec(
        name=name, summary=summary,
        terms=(TermDecl(HEAD, 1.0, options_for=HEAD_OPTIONS,
                        cite="duong2019 eq. 7, L_SM: 'this objective function is not limited to "
                             "specific classification loss'; ArcFace is kdface's choice"),
               TermDecl(term, 1.0,
                        options={"final_weight": Option("shrinktea_lambda"),
                                 "distance": Option("shrinktea_distance")},
                        cite="duong2019 eq. 7: 'distilling the knowledge to all four blocks'; "
                             "'The λ_n is experimentally set to 1 in case of Angular "
                             "Distillation Loss while this parameter is set to 0.001 as the "
                             "case of ℓ2 loss ... For the intermediate layers, λ_i = "
                             "λ_{i+1}/2'; '1×1 convolution followed by batch normalization "
                             f"layer is adopted for G_i^s'; last level: {last_level}")),
        cite={"schedule": "duong2019 §4.2: 'the batch size is set to 512. The learning rate "
                          "starts from 0.1 and the momentum is 0.9'; epochs and decays are "
                          "kdface's choice",
              "teacher": "duong2019 §4.2: 'we use the Resnet-90 structure [4] as the teacher "
                         "network' (Table 2: 63.67M parameters)",
              "last_level": last_level,
              "augmentation": "duong2019 §4.2 describes detection, alignment and the 112×112 "
                              "crop and no augmentation: the random horizontal flip is "
                              "kdface's choice"})


register_recipe(_shrinktea(
    "shrinktea", "angular_stages",
    "duong2019 eq. 7: angular distillation at all four blocks, blocks 1-3 through the "
    "teacher's remaining blocks, the last on the student's own embedding",
    f"the student's own embedding F_n^s against the teacher's ({_D_LAST}); G_n^s = identity "
    "at equal embedding sizes is kdface's reading"))
# The other reading of the last level, kept as an option: block 4's map through its adapter and
# the teacher's embedding layer, so that the student's embedding gets no distillation term.
register_recipe(_shrinktea(
    "shrinktea_through_teacher", "angular_stages_through_teacher",
    "duong2019 eq. 7, last level read as block 4 -> adapter -> the teacher's embedding layer",
    "kdface's alternative reading (the shrinktea recipe follows the paper's): block 4's map "
    "through G_4^s and the teacher's embedding layer (eq. 6 at i = 4); the student's own "
    f"embedding gets no distillation term, while {_D_LAST}"))
