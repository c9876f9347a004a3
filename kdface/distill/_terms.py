"""Loss terms: the vocabulary recipes are written in, each with its declared contract.

A term is a pure function ``term(inputs, **options) -> scalar`` over one batch's network outputs,
registered under a name with a ``TermSpec`` that says what it reads (teacher outputs, stage
features, adapters, landmarks ...) and what it requires (same embedding size, same classes). A
recipe (``_recipes.py``) is a list of ``(term name, weight, options)``; the objective is the
weighted sum, and everything the trainer must prepare (a teacher, stage features, adapters, a
landmark head, a cacheable teacher) is computed from the contracts of the recipe's terms, so the
trainer never names a term. A new term is a function here (or anywhere) plus ``register_term``.

``TermInputs`` holds what a term may read. Network outputs are dicts with ``embedding`` [B, E],
``logits`` [B, C] (class logits without any margin: the softmax head's logits, or scale * cos for a
margin head), ``cos`` [B, C] (margin heads only), ``stages`` (four stage features) and
``landmarks`` [B, 5, 2] (when the network has a landmark head).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp

from kdface import losses


@dataclasses.dataclass(frozen=True)
class TermInputs:
    """One batch as the loss terms see it.

    labels: [B] int identity labels. student / teacher: output dicts (teacher None when the recipe
    has no teacher; teacher outputs are constants — gradients never reach the teacher).
    teacher_tail: ``(i, feature) -> embedding``, the frozen teacher run from stage i+1 to the end
    (seed duong2019 eq. 6). adapters: ``(i, student_stage) -> teacher-shaped feature``.
    landmarks: [B, 5, 2] ground-truth landmarks when the data has them.
    relation_groups: relational terms split the batch into this many equal groups (1 = the whole
    global batch; the device count = per-device relations, as the papers' multi-GPU code did).
    """
    labels: jax.Array
    student: dict[str, Any]
    teacher: dict[str, Any] | None = None
    teacher_tail: Callable[[int, jax.Array], jax.Array] | None = None
    adapters: Callable[[int, jax.Array], jax.Array] | None = None
    landmarks: jax.Array | None = None
    relation_groups: int = 1


# Outputs a network may return (``FaceNetwork.__call__``) and the batch fields a term may read.
NETWORK_OUTPUTS = frozenset({"embedding", "logits", "cos", "stages", "landmarks"})
BATCH_FIELDS = frozenset({"landmarks"})


@dataclasses.dataclass(frozen=True)
class TermSpec:
    """A loss term's function and its contract with the trainer.

    fn: ``fn(inputs: TermInputs, **options) -> scalar``.
    student_outputs / teacher_outputs: which network outputs (``NETWORK_OUTPUTS``) the term reads
    from the student / the frozen teacher; any teacher output means the term needs a teacher.
    ``'stages'`` asks for the four stage features, ``'cos'`` for a margin head, ``'landmarks'``
    (student) for a landmark head.
    teacher_tail: runs features through the teacher's remaining blocks (needs a teacher forward
    pass; a teacher cache cannot serve it).
    adapters: needs the student's stage adapters onto the teacher's stage shapes.
    batch_fields: extra batch fields it reads (``'landmarks'``: ground-truth landmarks).
    same_embedding / same_classes: compares student and teacher embeddings / class logits
    element-wise, so their sizes must agree.
    relational: computed over relation groups of the batch (``TermInputs.relation_groups``).
    """
    fn: Callable[..., jax.Array]
    student_outputs: frozenset[str] = frozenset({"embedding"})
    teacher_outputs: frozenset[str] = frozenset()
    teacher_tail: bool = False
    adapters: bool = False
    batch_fields: frozenset[str] = frozenset()
    same_embedding: bool = False
    same_classes: bool = False
    relational: bool = False

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"TermSpec.fn must be callable, got {self.fn!r}")
        for field, allowed in (("student_outputs", NETWORK_OUTPUTS),
                               ("teacher_outputs", NETWORK_OUTPUTS),
                               ("batch_fields", BATCH_FIELDS)):
            value = frozenset(getattr(self, field))
            if not value <= allowed:
                raise ValueError(f"TermSpec.{field} has unknown entries {sorted(value - allowed)}; "
                                 f"allowed: {sorted(allowed)}")
            object.__setattr__(self, field, value)

    @property
    def needs_teacher(self) -> bool:
        return bool(self.teacher_outputs) or self.teacher_tail

    @property
    def student_stages(self) -> bool:
        return "stages" in self.student_outputs

    @property
    def teacher_stages(self) -> bool:
        return "stages" in self.teacher_outputs


_TERMS: dict[str, TermSpec] = {}
TERMS: Mapping[str, TermSpec] = MappingProxyType(_TERMS)  # read-only view of the registry


def register_term(name: str, spec: TermSpec) -> TermSpec:
    """Adds loss term ``name`` to the registry recipes are written in; a name is registered once."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a term name must be a non-empty string, got {name!r}")
    if not isinstance(spec, TermSpec):
        raise TypeError(f"register_term({name!r}, ...) needs a TermSpec, got {type(spec).__name__}")
    if name in _TERMS:
        raise ValueError(f"loss term {name!r} is already registered")
    _TERMS[name] = spec
    return spec


def term_spec(name: str) -> TermSpec:
    """The registered contract of term ``name``; unknown names list the known ones."""
    if name not in _TERMS:
        raise ValueError(f"unknown loss term {name!r}; known: {', '.join(sorted(_TERMS))}")
    return _TERMS[name]


def term(name: str, *, student_outputs: Iterable[str] = ("embedding",),
         teacher_outputs: Iterable[str] = (), **contract) -> Callable:
    """Decorator: registers the decorated function as term ``name`` with its contract
    (the keyword arguments of ``TermSpec``)."""
    def wrap(fn):
        register_term(name, TermSpec(fn, student_outputs=frozenset(student_outputs),
                                     teacher_outputs=frozenset(teacher_outputs), **contract))
        return fn
    return wrap


def _teacher(inputs: TermInputs, term: str) -> dict[str, Any]:
    if inputs.teacher is None:
        raise ValueError(f"loss term {term!r} needs a teacher, but the recipe has none")
    return jax.tree.map(jax.lax.stop_gradient, inputs.teacher)


def _grouped(fn: Callable[..., jax.Array], groups: int, *arrays: jax.Array) -> jax.Array:
    """Mean of ``fn`` over ``groups`` contiguous equal slices of the batch (1 = whole batch)."""
    if groups == 1:
        return fn(*arrays)
    n = arrays[0].shape[0]
    if n % groups:
        raise ValueError(f"batch {n} is not divisible into {groups} relation groups")
    split = [a.reshape(groups, n // groups, *a.shape[1:]) for a in arrays]
    return jnp.mean(jax.vmap(fn)(*split))


# --- classification (the "hard" loss; seed wang2019 eq. 3) -------------------------------------

@term("softmax", student_outputs={"logits"})
def softmax_term(inputs: TermInputs) -> jax.Array:
    """Softmax cross-entropy on the student's class logits."""
    return losses.softmax_cross_entropy(inputs.student["logits"], inputs.labels)


@term("cosface", student_outputs={"cos"})
def cosface_term(inputs: TermInputs, *, scale: float = 64.0, margin: float = 0.35) -> jax.Array:
    """CosFace (seed nikitin2020 §4.2: s=64, m=0.35) on the student's cos θ."""
    logits = losses.cosface_logits(inputs.student["cos"], inputs.labels, scale=scale,
                                   margin=margin)
    return losses.margin_cross_entropy(logits, inputs.labels)


@term("arcface", student_outputs={"cos"})
def arcface_term(inputs: TermInputs, *, scale: float = 64.0, margin: float = 0.5) -> jax.Array:
    """ArcFace (seed yan2019: s=64, m=0.5) on the student's cos θ."""
    logits = losses.arcface_logits(inputs.student["cos"], inputs.labels, scale=scale,
                                   margin=margin)
    return losses.margin_cross_entropy(logits, inputs.labels)


@term("sphereface", student_outputs={"cos", "embedding"})
def sphereface_term(inputs: TermInputs, *, margin: int = 4, lambda_: float = 0.0) -> jax.Array:
    """A-Softmax (seed wang2019's networks are SphereFace nets) on cos θ and feature norms."""
    norm = jnp.linalg.norm(inputs.student["embedding"].astype(jnp.float32), axis=-1)
    logits = losses.sphereface_logits(inputs.student["cos"], inputs.labels, feature_norm=norm,
                                      margin=margin, lambda_=lambda_)
    return losses.margin_cross_entropy(logits, inputs.labels)


# --- logit and feature distillation ------------------------------------------------------------

@term("hinton", student_outputs={"logits"}, teacher_outputs={"logits"}, same_classes=True)
def hinton_term(inputs: TermInputs, *, temperature: float = 4.0) -> jax.Array:
    """Hinton soft loss τ²·KL (seed wang2019 eq. 4; seed nikitin2020 HKD with τ=4)."""
    teacher = _teacher(inputs, "hinton")
    return losses.hinton_kd_loss(inputs.student["logits"], teacher["logits"],
                                 temperature=temperature)


@term("mk_mmd", teacher_outputs={"embedding"}, same_embedding=True, relational=True)
def mk_mmd_term(inputs: TermInputs, *, estimator: str = "biased",
                multipliers: tuple[float, ...] = (1, 2, 4, 8, 16)) -> jax.Array:
    """MK-MMD between normalized student and teacher embeddings (seed wang2019 eqs. 7-8)."""
    teacher = _teacher(inputs, "mk_mmd")
    fn = lambda s, t: losses.mk_mmd(s, t, multipliers=multipliers, estimator=estimator)
    return _grouped(fn, inputs.relation_groups, inputs.student["embedding"], teacher["embedding"])


@term("normalized_l2", teacher_outputs={"embedding"}, same_embedding=True)
def normalized_l2_term(inputs: TermInputs) -> jax.Array:
    """L2 between L2-normalized embeddings (seed wang2019 eqs. 5-6, seed yan2019 eq. 5)."""
    teacher = _teacher(inputs, "normalized_l2")
    return losses.normalized_l2_loss(inputs.student["embedding"], teacher["embedding"])


@term("angular", teacher_outputs={"embedding"}, same_embedding=True)
def angular_term(inputs: TermInputs) -> jax.Array:
    """ShrinkTeaNet angular loss at the final embedding (seed duong2019 eqs. 4-5)."""
    teacher = _teacher(inputs, "angular")
    return losses.angular_distillation_loss(inputs.student["embedding"], teacher["embedding"])


@term("angular_stages", student_outputs={"stages"}, teacher_outputs={"embedding"},
      teacher_tail=True, adapters=True)
def angular_stages_term(inputs: TermInputs, *, final_weight: float = 1.0) -> jax.Array:
    """Σ_i λ_i angular(T_{i+1..n}(G_i(S_i(x))), T(x)) over the four stages (seed duong2019 eq. 7).

    Student stage i goes through its 1x1 conv + BN adapter G_i and then the frozen teacher's
    remaining blocks; λ_i = λ_{i+1}/2 with λ_n = ``final_weight`` at the embedding (which is the
    ``angular`` term, weighted separately by the recipe), so the stages get λ/2, λ/4, λ/8, λ/16
    from the last stage down.
    """
    teacher = _teacher(inputs, "angular_stages")
    if inputs.teacher_tail is None or inputs.adapters is None:
        raise ValueError("angular_stages needs the teacher's tail and stage adapters")
    stages = inputs.student["stages"]
    total = jnp.zeros((), jnp.float32)
    weight = final_weight
    for i in reversed(range(len(stages))):
        weight = weight / 2
        emb = inputs.teacher_tail(i, inputs.adapters(i, stages[i]))
        total = total + weight * losses.angular_distillation_loss(emb, teacher["embedding"])
    return total


@term("hint_stages", student_outputs={"stages"}, teacher_outputs={"stages"}, adapters=True)
def hint_stages_term(inputs: TermInputs, *, stages: tuple[int, ...] = (1, 2)) -> jax.Array:
    """Hidden-layer L2 hint on adapted stage features (seed kd_transfer, alignment transfer)."""
    teacher = _teacher(inputs, "hint_stages")
    if inputs.adapters is None:
        raise ValueError("hint_stages needs stage adapters")
    total = jnp.zeros((), jnp.float32)
    for i in stages:
        adapted = inputs.adapters(i, inputs.student["stages"][i])
        total = total + losses.l2_hint_loss(adapted, teacher["stages"][i])
    return total / len(stages)


# --- relational (seed nikitin2020) -------------------------------------------------------------

@term("pwr", teacher_outputs={"embedding"}, relational=True)
def pwr_term(inputs: TermInputs, **options) -> jax.Array:
    """PWR on the embeddings' pair scores (seed nikitin2020 eqs. 3-11); options go to pwr_loss."""
    teacher = _teacher(inputs, "pwr")
    fn = lambda s, t: losses.pwr_loss(s, t, **options)
    return _grouped(fn, inputs.relation_groups, inputs.student["embedding"], teacher["embedding"])


@term("rkd_d", teacher_outputs={"embedding"}, relational=True)
def rkd_distance_term(inputs: TermInputs) -> jax.Array:
    """RKD-D (nikitin2020 §4 baseline)."""
    teacher = _teacher(inputs, "rkd_d")
    return _grouped(losses.rkd_distance_loss, inputs.relation_groups,
                    inputs.student["embedding"], teacher["embedding"])


@term("rkd_a", teacher_outputs={"embedding"}, relational=True)
def rkd_angle_term(inputs: TermInputs) -> jax.Array:
    """RKD-A (nikitin2020 §4 baseline)."""
    teacher = _teacher(inputs, "rkd_a")
    return _grouped(losses.rkd_angle_loss, inputs.relation_groups,
                    inputs.student["embedding"], teacher["embedding"])


@term("rkd_da", teacher_outputs={"embedding"}, relational=True)
def rkd_distance_angle_term(inputs: TermInputs, *, angle_weight: float = 2.0) -> jax.Array:
    """RKD-DA: RKD-D + 2·RKD-A (Park et al.'s weights 25 and 50, relative 1:2)."""
    return rkd_distance_term(inputs) + angle_weight * rkd_angle_term(inputs)


@term("darkrank", teacher_outputs={"embedding"}, relational=True)
def darkrank_term(inputs: TermInputs, *, alpha: float = 3.0, beta: float = 3.0) -> jax.Array:
    """DarkRank-hard (nikitin2020 §4 baseline)."""
    teacher = _teacher(inputs, "darkrank")
    fn = lambda s, t: losses.darkrank_hard_loss(s, t, alpha=alpha, beta=beta)
    return _grouped(fn, inputs.relation_groups, inputs.student["embedding"], teacher["embedding"])


# --- verification and alignment (seed kd_transfer) ---------------------------------------------

@term("triplet", relational=True)
def triplet_term(inputs: TermInputs, *, margin: float = 0.2, mining: str = "batch_hard"
                 ) -> jax.Array:
    """Triplet loss on the student's embeddings (seed kd_transfer, verification transfer)."""
    fn = lambda e, y: losses.triplet_loss(e, y, margin=margin, mining=mining)
    return _grouped(fn, inputs.relation_groups, inputs.student["embedding"], inputs.labels)


@term("landmark", student_outputs={"landmarks"}, batch_fields={"landmarks"})
def landmark_term(inputs: TermInputs) -> jax.Array:
    """Landmark regression L2 (seed kd_transfer, alignment transfer)."""
    if inputs.landmarks is None or "landmarks" not in inputs.student:
        raise ValueError("the landmark term needs data with landmarks and a landmark head")
    return losses.landmark_l2_loss(inputs.student["landmarks"], inputs.landmarks)


