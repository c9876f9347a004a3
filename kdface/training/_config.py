"""Everything a training run is configured by, as one frozen dataclass: the only declaration.

Each field is an option: its type, its default and its help text (which paper, which value) are
declared here once; ``python -m kdface.train`` generates one command-line flag per field from
them (``kdface/train.py``), tests and the demo build ``TrainConfig`` directly, and the run's
``config.json`` is ``as_dict()``. Defaults are the papers' where a paper gives one.

Types the flags understand: ``str``, ``int``, ``float``, ``bool`` (each optionally ``| None``),
``tuple[int, int]`` / ``tuple[int, ...]`` / ``tuple[float, ...]`` / ``tuple[str, ...]`` (comma
lists) and ``dict[str, Any]`` (``k=v,k=v`` of Python literals). A field with ``choices`` is an
enum flag and any other value is refused when the config is built.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str = "", *,
           choices: tuple[Any, ...] | None = None) -> Any:
    """A ``TrainConfig`` field with its flag help text and, for enum options, its choices."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (dict, list)):
        factory = (lambda d=default: type(d)(d))
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    workdir: str = option(help="Run directory: checkpoints, logs, config.json. Required.")
    recipe: str = option("scratch", "Method (kdface.distill.recipe_names()): scratch (no "
                         "teacher) | kd_im, kd (Wang et al. 2019) | pwr (Nikitin et al. 2020) | "
                         "transfer (Wang et al. 2017) | vargface (Yan et al. 2019) | shrinktea "
                         "(Duong et al. 2019).")
    # --- networks -----------------------------------------------------------------------------
    student: str = option("iresnet18", "Student backbone name (kdface.models.names()).")
    student_options: dict[str, Any] = option({}, "Backbone kwargs as k=v,k=v (Python literals), "
                                             "e.g. embedding_size=512,width_divisor=4.")
    teacher: str | None = option(None, "Teacher backbone name; with --teacher_checkpoint it may "
                                 "be left out (the teacher run's config.json names it) and must "
                                 "not contradict it. Or a third-party teacher: an insightface "
                                 "IResNet pth:[ARCH:]PATH (PyTorch state dict), or any "
                                 "face-recognition ONNX graph onnx:[ARCH|graph|OPTIONS:]PATH "
                                 "(an IResNet graph becomes a kdface IResNet, any other runs as "
                                 "the graph, embeddings only).")
    teacher_options: dict[str, Any] = option({}, "Teacher backbone kwargs as k=v,k=v; taken "
                                             "from the teacher run when left empty.")
    teacher_checkpoint: str | None = option(None, "Workdir of a finished kdface run of the "
                                            "teacher (its architecture and options come from "
                                            "its config.json; loaded params-only, never "
                                            "written into this run).")
    init_checkpoint: str | None = option(None, "Initialize the student from this run's weights "
                                         "(Nikitin et al. 2020 starts from the pretrained "
                                         "baseline student; Wang et al. 2017's "
                                         "full-initialization trick).")
    head: str = option("cosface", "Classifier head of the hard loss (Nikitin et al. 2020: CosFace; "
                       "Wang et al. 2019 teachers: SphereFace; Yan et al. 2019: ArcFace).",
                       choices=("softmax", "cosface", "arcface", "sphereface"))
    margin_scale: float = option(64.0, "Scale s of CosFace/ArcFace (64 in Nikitin et al. 2020 and "
                                 "Yan et al. 2019); also the logit scale s*cos for Hinton KD on "
                                 "margin heads.")
    margin: float = option(0.35, "CosFace margin m (0.35, Nikitin et al. 2020 §4.2).")
    arcface_margin: float = option(0.5, "ArcFace margin m (0.5: Deng et al.'s ArcFace default; "
                                   "Yan et al. 2019 and Duong et al. 2019 print no value, so "
                                   "kdface's choice there).")
    sphereface_m: int = option(4, "A-Softmax angular margin m (4, SphereFace).")
    sphereface_anneal: bool = option(False, "A-Softmax λ annealing max(5, 1000 (1 + 0.12 "
                                     "step)^-1), SphereFace's public solver (kdface's choice "
                                     "for Wang et al. 2019's SphereFace nets).")
    input_size: tuple[int, int] = option((112, 112), "Network input H,W of the student and the "
                                         "teacher (112x112; Wang et al. 2019 used 112x96).")
    # --- loss weights (recipes read the ones they use) ----------------------------------------
    lambda_hard: float = option(1.0, "λ1, hard (classification) loss weight (Wang et al. 2019 "
                                "eq. 6/9; the paper does not print values: 1.0).")
    lambda_soft: float = option(1.0, "λ2, weight of the soft loss H(p_t, p_s) (Wang et al. 2019 "
                                "eq. 3/9; Wang et al. 2017's soft-prediction target, α of its "
                                "eq. 5). The papers print no value: 1.0 is kdface's choice.")
    lambda_feature: float = option(1.0, "λ3, feature loss weight (Wang et al. 2019 eq. 6/9).")
    lambda_hidden: float = option(0.0, "β of Wang et al. 2017 eq. 5: weight of the hidden-layer "
                                  "target (the embedding feeding the head; 1 in its alignment "
                                  "distillation, eq. 7; 0 in its eqs. 4 and 9).")
    temperature: float = option(4.0, "Softmax temperature τ of the soft losses (4.0, "
                                "Nikitin et al. 2020 HKD; kdface's choice for Wang et al. "
                                "2019 and Wang et al. 2017, which print none).")
    feature_loss: str = option("mk_mmd", "Feature term of kd/kd_im: MK-MMD on normalized "
                               "features (Wang et al. 2019 eq. 9) or normalized L2 (eq. 6, the "
                               "ablation).", choices=("mk_mmd", "normalized_l2"))
    kd_loss: str = option("pwr", "L_KD of the pwr recipe (Nikitin et al. 2020 eq. 12).",
                          choices=("pwr", "rkd_d", "rkd_a", "rkd_da", "darkrank", "hinton"))
    alpha: float = option(100.0, "α, weight of L_KD (Nikitin et al. 2020: 100 for PWR-Diff/Exp and "
                          "RKD-D, 15 for PWR-RankNet, 200 for RKD-A, 1 for DarkRank).")
    beta: float = option(1.0, "β, weight of CosFace in the pwr recipe (1.0, Nikitin et al. 2020; "
                         "0.7 with HKD).")
    gamma: float = option(0.0, "γ, weight of Hinton KD in the pwr recipe (0; 0.3 with HKD, "
                          "Nikitin et al. 2020).")
    pwr_relation: str = option("cosine", "PWR relational function ψ (cosine, Nikitin et al. 2020).",
                               choices=("cosine", "euclidean"))
    pwr_inversion: str = option("exp", "PWR inversion loss (exp: PWR-Exp, the paper's best).",
                                choices=("diff", "power", "exp", "ranknet"))
    pwr_margin: str = option("teacher_diff", "PWR margin (teacher_diff: the paper's best, "
                             "eq. 9).", choices=("none", "const", "teacher_std", "teacher_diff"))
    pwr_margin_value: float = option(0.0, "Constant margin for --pwr_margin=const (0.1 in the "
                                     "paper's tables).")
    pwr_power: float = option(1.0, "p of the power difference loss (eq. 5).")
    pwr_beta: float = option(1.0, "β of the exp / RankNet inversion losses (eqs. 6, 10).")
    pwr_method: str = option("auto", "PWR algorithm (all exact; auto picks the fastest).",
                             choices=("auto", "dense", "tiled", "sorted"))
    transfer_task: str = option("classification", "Wang et al. 2017 task of the transfer "
                                "recipe.", choices=("classification", "alignment",
                                                    "verification"))
    triplet_margin: float = option(0.2, "Triplet loss margin (Wang et al. 2017).")
    triplet_mining: str = option("batch_hard", "Triplet mining.",
                                 choices=("batch_all", "batch_hard"))
    extra_softmax: float = option(1.0, "Weight of the additional softmax loss in transfer/"
                                  "verification (Wang et al. 2017 Table 5, its best result; "
                                  "the weight 1 is kdface's choice; 0 gives its Table 4).")
    vargface_alpha: float = option(7.0, "α of the normalized-L2 term (7, Yan et al. 2019).")
    generations: int = option(1, "Recursive KD generations (Yan et al. 2019): generation k+1 "
                              "starts from generation k's student; each in workdir/gen_k.")
    shrinktea_lambda: float = option(1.0, "λ_n of the final angular loss (1, Duong et al. 2019); "
                                     "stage weights λ_i = λ_{i+1}/2; 0.001 for the ℓ2 "
                                     "baseline).")
    shrinktea_distance: str = option("angular", "Distance of the shrinktea levels: angular "
                                     "(Duong et al. 2019 eq. 4) or l2 (its 'Student-1' baseline).",
                                     choices=("angular", "l2"))
    relation_group_size: int = option(0, "Relational terms (PWR, RKD, DarkRank, the triplet "
                                      "loss) relate the samples within groups of this many "
                                      "consecutive samples of the global batch; 0 = the whole "
                                      "batch. A sample count, not a device count: the same "
                                      "flagfile trains the same loss on one GPU or a pod (PWR's "
                                      "authors: 92 per GPU).")
    # --- data ---------------------------------------------------------------------------------
    train_data: str = option("", "Training set: a built dataset name in --data_dir, or a .rec "
                             "file / identity-folder directory (built on first use). Required "
                             "on the command line.")
    val_data: tuple[str, ...] = option((), "Verification sets: .bin paths or built dataset "
                                       "names, comma-separated.")
    folds: int = option(10, "Verification folds of --val_data (10, the LFW protocol, as "
                        "kdface.evaluate --folds); a set with fewer pairs is refused before "
                        "training: a few photos' pair list needs fewer (data_prep.build photos "
                        "says how many).")
    student_view: str = option("original", "What the student sees in recipes that do not fix it "
                               "(kd/kd_im always use low_resolution).",
                               choices=("original", "low_resolution"))
    lr_sizes: tuple[int, ...] = option((8, 12, 16, 20, 30), "Low-resolution view: side lengths "
                                       "an image is shrunk to before being resized back "
                                       "(Wang et al. 2019 §2.2: 8, 12, 16, 20, 30).")
    lr_fraction: float = option(0.4, "Low-resolution view: fraction of images degraded (0.4, "
                                "Wang et al. 2019 §2.2).")
    crop_from: tuple[int, int] | None = option(None, "Random crop: resize faces to H,W and "
                                               "cut a random --input_size window, shared by "
                                               "both views (Wang et al. 2017: 'randomly "
                                               "cropped and flipped'); unset: resize only.")
    flip: bool = option(True, "Random horizontal flip, identical for both views.")
    seed: int = option(0, "Seed of initialization, shuffling, flips and degradation.")
    batch_sampler: str = option("uniform", "How batches are drawn: uniform (records shuffled, "
                                "each once per epoch) | balanced (groups of "
                                "--images_per_identity images of one identity, P x K as FaceNet "
                                "/ Hermans et al.'s batch-hard triplets; an epoch visits every "
                                "image at least once, identities short of K repeat images).",
                                choices=("uniform", "balanced"))
    images_per_identity: int = option(4, "K of balanced batches: images per identity group (4, "
                                      "Hermans et al. 2017 and TFace's EKD sampler).")
    uniform_images: int = option(0, "Rows of each balanced batch drawn uniformly instead (EKD: "
                                 "32 random + 32 balanced); the rest, batch_size - "
                                 "uniform_images, must be a multiple of --images_per_identity.")
    lr_subset: str = option("redrawn", "Low-resolution view: which images are degraded. "
                            "redrawn: drawn anew every epoch (kdface's earlier behaviour); fixed: "
                            "one subset and size per image for the whole run (Wang et al. 2019 "
                            "§2.2: '40 percent of the training set are randomly selected').",
                            choices=("redrawn", "fixed"))
    holdout_fraction: float = option(0.0, "Leave this fraction of each identity's images out "
                                     "of training: Wang et al. 2017's classification test split "
                                     "('we randomly split them into training and testing "
                                     "samples'; kdface.evaluate --top1_data --top1_fraction "
                                     "tests on them); 0 = train on every image.")
    holdout_seed: int = option(0, "Seed of the --holdout_fraction split (kdface.evaluate "
                               "--top1_seed).")
    # --- optimization -------------------------------------------------------------------------
    batch_size: int = option(128, "Global batch size (seeds: 512; divisible by devices).")
    steps: int | None = option(None, "Training steps (1000 when neither --steps nor --epochs "
                               "is given; not with --epochs).")
    epochs: float | None = option(None, "Training length in passes over the training set: "
                                  "steps = ceil(epochs * N / batch_size) (Nikitin et al. 2020: 13; "
                                  "not with --steps).")
    optimizer: str = option("sgd", "Optimizer (SGD momentum 0.9 in the five papers).",
                            choices=("sgd", "adamw"))
    learning_rate: float = option(0.1, "Base learning rate (0.1 in Nikitin et al. 2020 and "
                                  "Duong et al. 2019).")
    momentum: float = option(0.9, "SGD momentum (0.9).")
    nesterov: bool = option(False, "Nesterov momentum for SGD (Wang et al. 2017 trains with "
                            "NAG).")
    weight_decay: float = option(5e-4, "Weight decay (5e-4, insightface).")
    schedule: str = option("step", "LR schedule.", choices=("constant", "step", "cosine"))
    warmup_steps: int = option(0, "Linear warmup steps (not with --warmup_epochs).")
    warmup_epochs: float = option(0.0, "Linear warmup in epochs (not with --warmup_steps).")
    decay_steps: tuple[int, ...] = option((), "Steps where the step schedule multiplies the LR "
                                          "by --decay_factor (not with --decay_epochs).")
    decay_epochs: tuple[float, ...] = option((), "Epochs where the step schedule multiplies the "
                                             "LR by --decay_factor (Nikitin et al. 2020: every 2 "
                                             "epochs; not with --decay_steps).")
    decay_factor: float = option(0.1, "Step-schedule factor (0.1).")
    clip_norm: float = option(0.0, "Global gradient-norm clipping (0 = off).")
    bf16: bool = option(False, "Run the networks in bfloat16 (losses stay float32).")
    # --- bookkeeping --------------------------------------------------------------------------
    save_every: int = option(500, "Checkpoint every K steps (and at the end).")
    keep: int = option(2, "Keep the latest N checkpoints.")
    keep_best: int = option(1, "Also keep the best N by mean validation accuracy.")
    eval_every: int = option(500, "Verify on --val_data every K steps.")
    log_every: int = option(10, "Log every K steps.")
    teacher_cache: bool = option(False, "Compute the frozen teacher's outputs once and skip its "
                                 "forward pass (needs a deterministic teacher view).")
    teacher_cache_dir: str = option("", "Directory of teacher caches (default: "
                                    "<workdir>/teacher_cache; generations share their parent's)."
                                    )
    teacher_cache_dtype: str = option("float16", "Storage of the cached teacher embeddings "
                                      "(kdface's choice: float16, half of float32's disk and "
                                      "page cache; relative rounding <= 2^-11).",
                                      choices=("float16", "float32"))
    lr_on_device: bool = option(False, "Make the low-resolution student view on the "
                                "accelerator (same sizes, fraction and per-seed draws as the "
                                "host OpenCV version; pixels within one grey level).")
    prefetch: int = option(2, "Batches placed on the devices ahead of the running step.")
    data_workers: int = option(0, "grain worker processes making training batches (0 = in the "
                               "trainer's process, with read threads); see "
                               "benchmarks/INPUT_PIPELINE.md for when they help.")
    runaway_factor: float = option(1000.0, "Stop the run when a finite loss exceeds this "
                                   "multiple of the first step's loss (kdface's choice: 1000; "
                                   "0 = off).")
    shard_head: str = option("auto", "Shard the margin head's class axis (and a margin-head "
                             "teacher's) over the devices: on, off, or auto (from "
                             "--shard_head_min_classes classes). A class count the devices do "
                             "not divide is padded with zero columns to the next multiple.",
                             choices=("auto", "on", "off"))
    shard_head_min_classes: int = option(50_000, "Class count from which --shard_head=auto "
                                         "shards the head (kdface's choice).")
    transfer_guard: str = option("allow", "jax.transfer_guard level for device-to-host "
                                 "transfers inside steady-state steps (a debugging aid: "
                                 "'disallow' proves the loop never waits for the host).",
                                 choices=("allow", "log", "disallow"))
    async_checkpoints: bool = option(True, "Write checkpoints in the background.")
    progress: bool = option(True, "Show the progress line and write logs (process 0).")

    def __post_init__(self):
        hints = _hints()
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            hint = hints[field.name]
            if typing.get_origin(hint) is tuple and isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))  # e.g. from config.json
            choices = field.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ValueError(f"{field.name} must be one of {choices}, got {value!r} "
                                 f"(--{field.name})")
        if len(self.input_size) != 2:
            raise ValueError(f"input_size must be (H, W), got {self.input_size!r} "
                             f"(--input_size=H,W)")
        if self.relation_group_size < 0 or (
                self.relation_group_size and self.batch_size % self.relation_group_size):
            raise ValueError(f"relation_group_size {self.relation_group_size} must be 0 (the "
                             f"whole batch) or divide batch_size {self.batch_size} "
                             f"(--relation_group_size, --batch_size)")
        if self.batch_sampler == "balanced":
            from kdface.data._balanced import balanced_rows
            balanced_rows(self.batch_size, self.images_per_identity, self.uniform_images)
            if self.relation_group_size % self.images_per_identity:
                raise ValueError(f"relation_group_size {self.relation_group_size} must be a "
                                 f"multiple of images_per_identity {self.images_per_identity} "
                                 f"with balanced batches (a group would split an identity's "
                                 f"images) (--relation_group_size, --images_per_identity)")
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2:
            raise ValueError(f"folds must be an int >= 2 (threshold chosen on all folds but "
                             f"one, tested on the other), got {self.folds!r} (--folds)")
        if self.data_workers < 0:
            raise ValueError(f"data_workers must be 0 (batches made in this process) or more "
                             f"worker processes, got {self.data_workers} (--data_workers)")

    @property
    def relation_groups(self) -> int:
        """How many groups the relational terms split the global batch into (any device count)."""
        return self.batch_size // self.relation_group_size if self.relation_group_size else 1

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """A config from ``as_dict()`` output (e.g. a run's ``config.json``); keys that are not
        fields (what the trainer adds: ``num_classes``, ``head_used`` ...) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


_HINTS: dict[str, Any] = {}


def _hints() -> dict[str, Any]:
    """The fields' resolved type annotations (the module uses postponed annotations)."""
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(TrainConfig))
    return _HINTS


def option_fields() -> list[tuple[dataclasses.Field, Any]]:
    """Every option as ``(field, resolved type)``, in declaration order (for flag generation)."""
    hints = _hints()
    return [(f, hints[f.name]) for f in dataclasses.fields(TrainConfig)]


def _defaults() -> dict[str, Any]:
    return {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
            for f in dataclasses.fields(TrainConfig)
            if not (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)}


# The recipe layer resolves options by name; this is where their defaults are declared.
from kdface.distill import register_option_defaults  # noqa: E402

register_option_defaults(_defaults())
