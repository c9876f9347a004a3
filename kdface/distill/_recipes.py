"""The five papers' methods as data: which networks, which views, which weighted loss terms.

``build_recipe(name, config)`` turns a flat option mapping (the trainer's flags) into a
``Recipe``. Nothing here runs a network; the trainer reads the recipe and the objective
(``objective``) sums its terms.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from kdface.distill._terms import TEACHER_TERMS, TERMS, TermInputs

RECIPES = ("scratch", "kd_im", "kd", "pwr", "transfer", "vargface", "shrinktea")
HEADS = ("softmax", "cosface", "arcface", "sphereface")
VIEWS = ("original", "low_resolution")
KD_LOSSES = ("pwr", "rkd_d", "rkd_a", "rkd_da", "darkrank", "hinton")
TRANSFER_TASKS = ("classification", "alignment", "verification")


@dataclasses.dataclass(frozen=True)
class Term:
    """One weighted loss term: ``weight * TERMS[name](inputs, **options)``."""
    name: str
    weight: float
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.name not in TERMS:
            raise ValueError(f"unknown loss term {self.name!r}; known: {sorted(TERMS)}")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A distillation method as data.

    head: the student's classifier head kind ('softmax' logits or a margin head's cos θ).
    student_view / teacher_view: what each network sees ('original' image, or the
    'low_resolution' augmented one of seed wang2019 §2.2); teacher_view None = no teacher.
    adapters: the student needs stage adapters to the teacher's stage shapes.
    landmark_head: the student carries a 5-point landmark head.
    """
    name: str
    terms: tuple[Term, ...]
    head: str = "cosface"
    student_view: str = "original"
    teacher_view: str | None = None
    adapters: bool = False
    landmark_head: bool = False

    @property
    def needs_teacher(self) -> bool:
        return any(t.name in TEACHER_TERMS for t in self.terms if t.weight != 0)


def _head_term(head: str, cfg: Mapping[str, Any], weight: float) -> Term:
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    options: dict[str, Any] = {}
    if head in ("cosface", "arcface"):
        options = {"scale": float(cfg["margin_scale"]), "margin": float(cfg["margin"])}
    elif head == "sphereface":
        options = {"margin": int(cfg.get("sphereface_m", 4))}
    return Term(head, weight, options)


def _pwr_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {"relation": cfg["pwr_relation"], "inversion": cfg["pwr_inversion"],
            "margin": cfg["pwr_margin"], "margin_value": float(cfg["pwr_margin_value"]),
            "power": float(cfg["pwr_power"]), "beta": float(cfg["pwr_beta"]),
            "method": cfg["pwr_method"]}


def build_recipe(name: str, cfg: Mapping[str, Any]) -> Recipe:
    """Builds recipe ``name`` from the trainer's option mapping ``cfg`` (flag name -> value)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {RECIPES}")
    head = cfg["head"]
    lr_view = cfg.get("student_view", "original")
    if lr_view not in VIEWS:
        raise ValueError(f"student_view must be one of {VIEWS}, got {lr_view!r}")
    if name == "scratch":
        return Recipe(name, (_head_term(head, cfg, 1.0),), head=head, student_view=lr_view)
    if name in ("kd_im", "kd"):
        # Seed wang2019 eq. 9: λ1·hard + λ2·soft + λ3·MK-MMD (or eq. 6 with normalized L2).
        feature = cfg["feature_loss"]
        if feature not in ("mk_mmd", "normalized_l2"):
            raise ValueError(f"feature_loss must be 'mk_mmd' or 'normalized_l2', got {feature!r}")
        terms = (_head_term(head, cfg, float(cfg["lambda_hard"])),
                 Term("hinton", float(cfg["lambda_soft"]),
                      {"temperature": float(cfg["temperature"])}),
                 Term(feature, float(cfg["lambda_feature"])))
        # kd_im: the untouched teacher sees the original image, the student the LR one.
        # kd: the teacher was fine-tuned on LR data and sees the student's (LR) view.
        teacher_view = "original" if name == "kd_im" else "low_resolution"
        return Recipe(name, terms, head=head, student_view="low_resolution",
                      teacher_view=teacher_view)
    if name == "pwr":
        # Seed nikitin2020 eq. 12: α·L_KD + β·CosFace + γ·HKD.
        kd = cfg["kd_loss"]
        if kd not in KD_LOSSES:
            raise ValueError(f"kd_loss must be one of {KD_LOSSES}, got {kd!r}")
        kd_options = _pwr_options(cfg) if kd == "pwr" else {}
        if kd == "hinton":
            kd_options = {"temperature": float(cfg["temperature"])}
        terms = [Term(kd, float(cfg["alpha"]), kd_options),
                 _head_term(head, cfg, float(cfg["beta"]))]
        if float(cfg["gamma"]) and kd != "hinton":
            terms.append(Term("hinton", float(cfg["gamma"]),
                              {"temperature": float(cfg["temperature"])}))
        return Recipe(name, tuple(t for t in terms if t.weight != 0), head=head,
                      student_view=lr_view, teacher_view="original")
    if name == "transfer":
        task = cfg["transfer_task"]
        if task not in TRANSFER_TASKS:
            raise ValueError(f"transfer_task must be one of {TRANSFER_TASKS}, got {task!r}")
        temperature = {"temperature": float(cfg["temperature"])}
        if task == "classification":
            # Full initialization: the student was pretrained with softmax (--init_checkpoint),
            # then distils the teacher's soft predictions (+ the hard loss).
            terms = (_head_term("softmax", cfg, float(cfg["lambda_hard"])),
                     Term("hinton", float(cfg["lambda_soft"]), temperature))
            return Recipe(name, terms, head="softmax", student_view=lr_view,
                          teacher_view="original")
        if task == "alignment":
            terms = (Term("landmark", 1.0),
                     Term("hint_stages", float(cfg["lambda_feature"])))
            return Recipe(name, terms, head="softmax", student_view=lr_view,
                          teacher_view="original", adapters=True, landmark_head=True)
        terms = [Term("triplet", 1.0, {"margin": float(cfg["triplet_margin"]),
                                       "mining": cfg["triplet_mining"]}),
                 Term("hinton", float(cfg["lambda_soft"]), temperature)]
        if float(cfg["extra_softmax"]):
            terms.append(_head_term("softmax", cfg, float(cfg["extra_softmax"])))
        return Recipe(name, tuple(terms), head="softmax", student_view=lr_view,
                      teacher_view="original")
    if name == "vargface":
        # Seed yan2019 eq. 5 objective: ArcFace + α·normalized L2, α = 7.
        terms = (_head_term("arcface", {**cfg, "margin": cfg["arcface_margin"]}, 1.0),
                 Term("normalized_l2", float(cfg["vargface_alpha"])))
        return Recipe(name, terms, head="arcface", student_view=lr_view,
                      teacher_view="original")
    # shrinktea: seed duong2019 eq. 7: L_SM + λ_n·angular(final) + Σ_i λ_i·angular(stage i).
    lam = float(cfg["shrinktea_lambda"])
    terms = (_head_term(head, cfg, 1.0), Term("angular", lam),
             Term("angular_stages", 1.0, {"final_weight": lam}))
    return Recipe(name, terms, head=head, student_view=lr_view, teacher_view="original",
                  adapters=True)


def objective(recipe: Recipe, inputs: TermInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of the recipe's terms; returns (total, {term name: unweighted value})."""
    values = {}
    total = jnp.zeros((), jnp.float32)
    for term in recipe.terms:
        value = TERMS[term.name](inputs, **term.options).astype(jnp.float32)
        values[term.name] = value
        total = total + term.weight * value
    return total, values
