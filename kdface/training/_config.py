"""Everything a training run is configured by, as one frozen dataclass.

The command line (``kdface/train.py``) fills it from flags; tests and the demo build it directly.
Defaults are the papers' where a paper gives one (see the flag help texts).
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    workdir: str
    recipe: str = "scratch"
    # networks
    student: str = "iresnet18"
    student_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    teacher: str | None = None
    teacher_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    teacher_checkpoint: str | None = None
    init_checkpoint: str | None = None
    head: str = "cosface"
    margin_scale: float = 64.0
    margin: float = 0.35
    arcface_margin: float = 0.5
    sphereface_m: int = 4
    sphereface_anneal: bool = False
    input_size: tuple[int, int] = (112, 112)
    # loss weights (recipes read the ones they use)
    lambda_hard: float = 1.0
    lambda_soft: float = 1.0
    lambda_feature: float = 1.0
    temperature: float = 4.0
    feature_loss: str = "mk_mmd"
    kd_loss: str = "pwr"
    alpha: float = 100.0
    beta: float = 1.0
    gamma: float = 0.0
    pwr_relation: str = "cosine"
    pwr_inversion: str = "exp"
    pwr_margin: str = "teacher_diff"
    pwr_margin_value: float = 0.0
    pwr_power: float = 1.0
    pwr_beta: float = 1.0
    pwr_method: str = "auto"
    transfer_task: str = "classification"
    triplet_margin: float = 0.2
    triplet_mining: str = "batch_hard"
    extra_softmax: float = 0.0
    vargface_alpha: float = 7.0
    generations: int = 1
    shrinktea_lambda: float = 1.0
    shrinktea_distance: str = "angular"
    relation_scope: str = "global"
    # data
    train_data: str = ""
    val_data: tuple[str, ...] = ()
    student_view: str = "original"
    lr_sizes: tuple[int, ...] = (8, 12, 16, 20, 30)
    lr_fraction: float = 0.4
    crop_from: tuple[int, int] | None = None
    flip: bool = True
    seed: int = 0
    # optimization
    batch_size: int = 128
    steps: int = 1000
    optimizer: str = "sgd"
    learning_rate: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "step"
    warmup_steps: int = 0
    decay_steps: tuple[int, ...] = ()
    decay_factor: float = 0.1
    clip_norm: float = 0.0
    bf16: bool = False
    # bookkeeping
    save_every: int = 500
    keep: int = 2
    keep_best: int = 1
    eval_every: int = 500
    log_every: int = 10
    teacher_cache: bool = False
    async_checkpoints: bool = True
    progress: bool = True

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
