"""Loss terms: the vocabulary recipes are written in, each with its declared contract.

A term is a pure function ``term(inputs, **options) -> scalar`` over one batch's network outputs,
registered under a name with a ``TermSpec`` that says what it reads (teacher outputs, stage
features, adapters, landmarks ...) and what it requires (same embedding size, same classes). A
recipe (``_recipes.py``) is a list of ``(term name, weight, options)``; the objective is the
weighted sum, and everything the trainer must prepare (a teacher, stage features, adapters, a
landmark head, a cacheable teacher) is computed from the contracts of the recipe's terms, so the
trainer never names a term. A new term is a function here (or anywhere) plus ``register_term``.

A term may carry state the step updates without gradients (EKD's running thresholds, AdaDistill's
class centres): its contract's ``state`` (a ``TermState``) says how to build it from the run's
shapes (``StateShapes``) and which of its arrays have a class axis. The trainer keeps it in the
train state under the term's name, gives it to the term as ``TermInputs.state``, and the term
returns ``(value, new_state)``; the step keeps or drops the new state by the same health rule as
the parameters, and checkpoints it with them (class axes unpadded, as a margin head's).

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
from kdface._math import l2_normalize


@dataclasses.dataclass(frozen=True)
class TermInputs:
    """One batch as the loss terms see it.

    labels: [B] int identity labels. student / teacher: output dicts (teacher None when the recipe
    has no teacher; teacher outputs are constants — gradients never reach the teacher).
    teacher_tail: ``(i, feature) -> embedding``, the frozen teacher run from stage i+1 to the end
    (Duong et al. 2019 eq. 6). adapters: ``(i, student_stage) -> teacher-shaped feature``.
    landmarks: [B, 5, 2] ground-truth landmarks when the data has them.
    relation_groups: relational terms split the batch into this many equal groups (1 = the whole
    global batch; the device count = per-device relations, as the papers' multi-GPU code did).
    step: the optimizer step of this batch (int32 scalar), for terms with a schedule (A-Softmax's
    λ annealing); None outside training.
    state: the term's own state (``TermSpec.state``), a dict of arrays; None for stateless terms.
    logit_bound: a bound on both networks' ``logits`` when both are margin heads (``s·cos θ``,
    ``|logits| <= s``: the larger scale), None otherwise; lets a softmax over them skip the
    row maximum (``losses.soft_prediction_loss(logit_bound=...)``).
    classes: the data's class count (a class axis of the state, and the student's ``cos`` and
    ``logits`` when its head is split over devices that do not divide it, may be padded beyond
    it: ``cos`` consumers pass it as ``classes=``, ``logits`` come masked).
    class_sharding: where a state's class axis lives when it is split over the devices (the
    ``NamedSharding`` of the margin head's weight, ``P(None, 'data')``), None when replicated.
    """
    labels: jax.Array
    student: dict[str, Any]
    teacher: dict[str, Any] | None = None
    teacher_tail: Callable[[int, jax.Array], jax.Array] | None = None
    adapters: Callable[[int, jax.Array], jax.Array] | None = None
    landmarks: jax.Array | None = None
    relation_groups: int = 1
    step: jax.Array | None = None
    state: Mapping[str, jax.Array] | None = None
    logit_bound: float | None = None
    classes: int | None = None
    class_sharding: Any = None


@dataclasses.dataclass(frozen=True)
class StateShapes:
    """What a term's state is sized from: the student's ``embedding_size``, the data's
    ``classes``, ``columns`` (the width of a class axis: ``classes``, or more when the axis is
    split over devices that do not divide it; the extra columns are padding), the ``dtype``."""
    embedding_size: int
    classes: int
    columns: int
    dtype: Any = jnp.float32


@dataclasses.dataclass(frozen=True)
class TermState:
    """A term's non-gradient state: ``init(shapes: StateShapes, key) -> {name: array}`` builds it
    (``key``: a PRNG key of the run's seed, for a random init); ``class_axis`` names the arrays
    of shape ``[X, columns]`` whose last axis is the class axis: placed like the margin head's
    weight (split over the devices with it), their padding columns zero at init and never
    written, saved in checkpoints as their ``classes`` real columns. Every other array is
    replicated and saved as is."""
    init: Callable[[StateShapes, jax.Array], Mapping[str, jax.Array]]
    class_axis: frozenset[str] = frozenset()

    def __post_init__(self):
        if not callable(self.init):
            raise TypeError(f"TermState.init must be callable, got {self.init!r}")
        object.__setattr__(self, "class_axis", frozenset(self.class_axis))

    def build(self, shapes: StateShapes, key: jax.Array) -> dict[str, jax.Array]:
        """The initial state, checked against the declaration."""
        # own buffers: the step donates the state, and one array twice in it cannot be donated
        state = {k: jnp.array(v, copy=True) for k, v in self.init(shapes, key).items()}
        missing = self.class_axis - set(state)
        if missing:
            raise ValueError(f"TermState.class_axis names {sorted(missing)}, which init does not "
                             f"return (it returns {sorted(state)})")
        for name in self.class_axis:
            shape = tuple(state[name].shape)
            if len(shape) != 2 or shape[1] != shapes.columns:
                raise ValueError(f"state {name!r} has a class axis, so it must be [X, "
                                 f"{shapes.columns}] (columns last), got {shape}")
        return state


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
    state: the term's non-gradient state (``TermState``); such a term returns ``(value,
    new_state)`` and reads its state from ``TermInputs.state``.
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
    state: TermState | None = None

    def __post_init__(self):
        if self.state is not None and not isinstance(self.state, TermState):
            raise TypeError(f"TermSpec.state must be a TermState, got {type(self.state).__name__}")
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


# --- classification (the "hard" loss; Wang et al. 2019 eq. 3) -------------------------------------

@term("softmax", student_outputs={"logits"})
def softmax_term(inputs: TermInputs) -> jax.Array:
    """Softmax cross-entropy on the student's class logits."""
    return losses.softmax_cross_entropy(inputs.student["logits"], inputs.labels)


@term("cosface", student_outputs={"cos"})
def cosface_term(inputs: TermInputs, *, scale: float = 64.0, margin: float = 0.35) -> jax.Array:
    """CosFace (Nikitin et al. 2020 §4.2: s=64, m=0.35) on the student's cos θ."""
    logits = losses.cosface_logits(inputs.student["cos"], inputs.labels, scale=scale,
                                   margin=margin, classes=inputs.classes)
    # s (cos θ_j - m [j = y]) <= s, and each row's non-target logits are >= -s
    return losses.softmax_cross_entropy(logits, inputs.labels, logit_bound=scale)


@term("arcface", student_outputs={"cos"})
def arcface_term(inputs: TermInputs, *, scale: float = 64.0, margin: float = 0.5) -> jax.Array:
    """ArcFace (Yan et al. 2019: s=64, m=0.5) on the student's cos θ."""
    logits = losses.arcface_logits(inputs.student["cos"], inputs.labels, scale=scale,
                                   margin=margin, classes=inputs.classes)
    # s cos(θ + m [j = y]) lies in [-s, s]
    return losses.softmax_cross_entropy(logits, inputs.labels, logit_bound=scale)


@term("sphereface", student_outputs={"cos", "embedding"})
def sphereface_term(inputs: TermInputs, *, margin: int = 4, lambda_: float = 0.0,
                    anneal: bool = False) -> jax.Array:
    """A-Softmax (Liu et al., SphereFace, CVPR 2017) on cos θ and feature norms: the loss of
    Wang et al. 2019's teacher ("trained with Sphreface loss").

    ``anneal=True`` replaces the fixed ``lambda_`` by SphereFace's schedule
    ``losses.sphereface_lambda(step)`` (λ = max(5, 1000 (1 + 0.12 step)^-1), its public training
    configuration), read from ``inputs.step``; without a step (evaluation) λ is the floor, 5.
    """
    norm = jnp.linalg.norm(inputs.student["embedding"].astype(jnp.float32), axis=-1)
    if anneal:
        step = inputs.step if inputs.step is not None else jnp.asarray(10**9, jnp.int32)
        lambda_ = losses.sphereface_lambda(step)
    logits = losses.sphereface_logits(inputs.student["cos"], inputs.labels, feature_norm=norm,
                                      margin=margin, lambda_=lambda_, classes=inputs.classes)
    return losses.softmax_cross_entropy(logits, inputs.labels)


# --- logit and feature distillation ------------------------------------------------------------

@term("hinton", student_outputs={"logits"}, teacher_outputs={"logits"}, same_classes=True)
def hinton_term(inputs: TermInputs, *, temperature: float = 4.0,
                tau_squared: bool = True) -> jax.Array:
    """Hinton et al.'s soft loss ``τ²·KL(p_t ‖ p_s)`` (``losses.hinton_kd_loss``).

    ``tau_squared=False`` drops the τ² factor, giving ``KL(p_t ‖ p_s)``: the HKD term of
    Nikitin et al. 2020 (eq. 12, τ = 4) as the authors' public KD-PWR code computes it; their
    paper prints no formula for it.
    """
    teacher = _teacher(inputs, "hinton")
    value = losses.hinton_kd_loss(inputs.student["logits"], teacher["logits"],
                                  temperature=temperature, logit_bound=inputs.logit_bound)
    return value if tau_squared else value / (temperature * temperature)


@term("soft_prediction", student_outputs={"logits"}, teacher_outputs={"logits"},
      same_classes=True)
def soft_prediction_term(inputs: TermInputs, *, temperature: float = 4.0) -> jax.Array:
    """Cross-entropy between the softened distributions ``H(p_t, p_s)``, no τ²
    (``losses.soft_prediction_loss``): the soft loss of Wang et al. 2019 eq. (3) ("the cross
    entropy between X_T^τ and X_S^τ") and the soft-prediction target of Wang, Lan, Zhang 2017
    eqs. (2), (5), (9)."""
    teacher = _teacher(inputs, "soft_prediction")
    return losses.soft_prediction_loss(inputs.student["logits"], teacher["logits"],
                                       temperature=temperature, logit_bound=inputs.logit_bound)


@term("hidden", teacher_outputs={"embedding"}, same_embedding=True)
def hidden_term(inputs: TermInputs) -> jax.Array:
    """Hidden-layer target of Wang, Lan, Zhang 2017 (eqs. 5, 7): the layer H with P = f(H), f
    fully connected, is the embedding feeding the classifier head; the student regresses the
    teacher's with the Euclidean loss ``1/2 ||H_s - H_t||²`` (batch mean), the same Caffe
    "Euclidean loss" the paper trains landmarks with (eq. 6)."""
    teacher = _teacher(inputs, "hidden")
    return 0.5 * losses.l2_hint_loss(inputs.student["embedding"], teacher["embedding"])


@term("mk_mmd", teacher_outputs={"embedding"}, same_embedding=True, relational=True)
def mk_mmd_term(inputs: TermInputs, *, estimator: str = "biased",
                multipliers: tuple[float, ...] = (1, 2, 4, 8, 16)) -> jax.Array:
    """MK-MMD between normalized student and teacher embeddings (Wang et al. 2019 eqs. 7-8)."""
    teacher = _teacher(inputs, "mk_mmd")
    fn = lambda s, t: losses.mk_mmd(s, t, multipliers=multipliers, estimator=estimator)
    return _grouped(fn, inputs.relation_groups, inputs.student["embedding"], teacher["embedding"])


@term("normalized_l2", teacher_outputs={"embedding"}, same_embedding=True)
def normalized_l2_term(inputs: TermInputs) -> jax.Array:
    """L2 between L2-normalized embeddings (Wang et al. 2019 eqs. 5-6, Yan et al. 2019 eq. 5)."""
    teacher = _teacher(inputs, "normalized_l2")
    return losses.normalized_l2_loss(inputs.student["embedding"], teacher["embedding"])


@term("angular", teacher_outputs={"embedding"}, same_embedding=True)
def angular_term(inputs: TermInputs) -> jax.Array:
    """ShrinkTeaNet angular loss at the final embedding (Duong et al. 2019 eqs. 4-5)."""
    teacher = _teacher(inputs, "angular")
    return losses.angular_distillation_loss(inputs.student["embedding"], teacher["embedding"])


# ShrinkTeaNet's last level, the two readings (see ``angular_stages_term``).
LAST_LEVELS = ("embedding", "through_teacher")


def _shrinktea_levels(inputs: TermInputs, term_name: str, *, final_weight: float,
                      distance: str, last_level: str) -> jax.Array:
    """Σ_{i=1..4} λ_i L_i of Duong et al. 2019 eq. 7, levels 1-3 through the adapters and the
    teacher's remaining blocks (eq. 6), level 4 as ``last_level`` says."""
    if distance not in ("angular", "l2"):
        raise ValueError(f"distance must be 'angular' or 'l2', got {distance!r}")
    if last_level not in LAST_LEVELS:
        raise ValueError(f"last_level must be one of {LAST_LEVELS}, got {last_level!r}")
    teacher = _teacher(inputs, term_name)
    if inputs.teacher_tail is None or inputs.adapters is None:
        raise ValueError(f"{term_name} needs the teacher's tail and stage adapters")
    d = losses.angular_distillation_loss if distance == "angular" else losses.l2_hint_loss
    stages = inputs.student["stages"]
    target = teacher["embedding"]
    last = len(stages) - 1
    total = jnp.zeros((), jnp.float32)
    weight = final_weight
    for i in reversed(range(len(stages))):
        if i == last and last_level == "embedding":
            student = inputs.student["embedding"]
            if student.shape != target.shape:
                raise ValueError(
                    f"{term_name}: the last level compares the student's embedding "
                    f"{tuple(student.shape)} with the teacher's {tuple(target.shape)}; give "
                    f"both networks the same embedding size, or route block 4 through the "
                    f"teacher's embedding layer (recipe shrinktea_through_teacher)")
        else:
            student = inputs.teacher_tail(i, inputs.adapters(i, stages[i]))
        total = total + weight * d(student, target)
        weight = weight / 2
    return total


@term("angular_stages", student_outputs={"stages", "embedding"}, teacher_outputs={"embedding"},
      teacher_tail=True, adapters=True, same_embedding=True)
def angular_stages_term(inputs: TermInputs, *, final_weight: float = 1.0,
                        distance: str = "angular") -> jax.Array:
    """ShrinkTeaNet's distillation sum Σ_{i=1..4} λ_i L_i (Duong et al. 2019, eqs. 4-7).

    Level 4 (i = n) is eq. 4 on the student's own embedding F_n^s, the one its classifier head
    reads and the one evaluated, against the teacher's, T(x): L_SM and L_n both act on F_n^s
    (eqs. 3, 5; Fig. 2: "the feature directions provided by the student is optimized using both
    directions of the class' representative and the teacher embedding"; §3.1: "as long as F_n^s
    and F_n^t have similar direction, these features can freely distributed on different
    hyperspheres"). G_n^t is the identity ("we choose identity transformation for T"); G_n^s is
    the identity too — kdface's reading: the paper's H_n^s exists "such that the dimension of
    F_n^s is increased to match the dimension of F_n^t", and the embedding sizes agree (the
    term requires it), so an adapter would only let the matched direction differ from F_n^s's.

    Levels i = 1..3 take student block i's output F_i^s through its 1x1 conv + BN adapter G_i^s
    ("1×1 convolution followed by batch normalization layer is adopted for G_i^s") and then
    through the frozen teacher's remaining blocks and embedding layer, T_{i+1..n} (eq. 6); the
    target is T_{i+1..n}(F_i^t) = T(x) (G_i^t is the identity). The student's fourth stage
    adapter is built but unused here. λ_4 = ``final_weight`` ("λ_n is experimentally set to 1"),
    λ_i = λ_{i+1}/2 ("For the intermediate layers, λ_i = λ_{i+1}/2"): λ, λ/2, λ/4, λ/8.

    distance: ``'angular'`` (eq. 4, ``(1 - cos)²``) or ``'l2'``, the paper's "Student-1"
    baseline: the same sum with the squared ℓ2 distance ``||a - b||²`` summed over features
    (batch mean; the paper weights it by λ_n = 0.001 "due to the large value of the loss").
    """
    return _shrinktea_levels(inputs, "angular_stages", final_weight=final_weight,
                             distance=distance, last_level="embedding")


@term("angular_stages_through_teacher", student_outputs={"stages"},
      teacher_outputs={"embedding"}, teacher_tail=True, adapters=True)
def angular_stages_through_teacher_term(inputs: TermInputs, *, final_weight: float = 1.0,
                                        distance: str = "angular") -> jax.Array:
    """``angular_stages`` with the other reading of the last level (kdface's earlier one): level
    4 takes student block 4's output map through its adapter G_4^s and the teacher's embedding
    layer, i.e. eq. 6 at i = 4 with F_4^s the block's map rather than the embedding. The
    student's own embedding then gets no distillation term (only L_SM reaches it); embedding
    sizes may differ. Recipe ``shrinktea_through_teacher``."""
    return _shrinktea_levels(inputs, "angular_stages_through_teacher",
                             final_weight=final_weight, distance=distance,
                             last_level="through_teacher")


@term("hint_stages", student_outputs={"stages"}, teacher_outputs={"stages"}, adapters=True)
def hint_stages_term(inputs: TermInputs, *, stages: tuple[int, ...] = (1, 2)) -> jax.Array:
    """Hidden-layer L2 hint on adapted stage features (Wang et al. 2017, alignment transfer)."""
    teacher = _teacher(inputs, "hint_stages")
    if inputs.adapters is None:
        raise ValueError("hint_stages needs stage adapters")
    total = jnp.zeros((), jnp.float32)
    for i in stages:
        adapted = inputs.adapters(i, inputs.student["stages"][i])
        total = total + losses.l2_hint_loss(adapted, teacher["stages"][i])
    return total / len(stages)


# --- relational (Nikitin et al. 2020) -------------------------------------------------------------

@term("pwr", teacher_outputs={"embedding"}, relational=True)
def pwr_term(inputs: TermInputs, **options) -> jax.Array:
    """PWR on the embeddings' pair scores (Nikitin et al. 2020 eqs. 3-11); options go to
    pwr_loss."""
    teacher = _teacher(inputs, "pwr")
    fn = lambda s, t: losses.pwr_loss(s, t, **options)
    return _grouped(fn, inputs.relation_groups, inputs.student["embedding"], teacher["embedding"])


def _embeddings(inputs: TermInputs, term_name: str, normalize: bool):
    teacher = _teacher(inputs, term_name)
    s, t = inputs.student["embedding"], teacher["embedding"]
    if not normalize:
        return s, t
    return l2_normalize(s.astype(jnp.float32)), l2_normalize(t.astype(jnp.float32))


@term("rkd_d", teacher_outputs={"embedding"}, relational=True)
def rkd_distance_term(inputs: TermInputs, *, normalize: bool = False) -> jax.Array:
    """RKD-D (Park et al. 2019), a Nikitin et al. 2020 §4 baseline; ``normalize`` L2-normalizes
    both embeddings first, as the authors' public KD-PWR code does."""
    s, t = _embeddings(inputs, "rkd_d", normalize)
    return _grouped(losses.rkd_distance_loss, inputs.relation_groups, s, t)


@term("rkd_a", teacher_outputs={"embedding"}, relational=True)
def rkd_angle_term(inputs: TermInputs, *, normalize: bool = False) -> jax.Array:
    """RKD-A (Park et al. 2019), a Nikitin et al. 2020 §4 baseline; ``normalize`` as RKD-D."""
    s, t = _embeddings(inputs, "rkd_a", normalize)
    return _grouped(losses.rkd_angle_loss, inputs.relation_groups, s, t)


@term("rkd_da", teacher_outputs={"embedding"}, relational=True)
def rkd_distance_angle_term(inputs: TermInputs, *, angle_weight: float = 2.0,
                            normalize: bool = False) -> jax.Array:
    """RKD-DA: RKD-D + 2·RKD-A (Park et al.'s weights 25 and 50, relative 1:2; at Nikitin et
    al.'s α = 100 that is their α's for RKD-D and RKD-A, 100 and 200)."""
    return (rkd_distance_term(inputs, normalize=normalize)
            + angle_weight * rkd_angle_term(inputs, normalize=normalize))


@term("darkrank", teacher_outputs={"embedding"}, relational=True)
def darkrank_term(inputs: TermInputs, *, alpha: float = 3.0, beta: float = 3.0,
                  list_length: int | None = None, normalize: bool = False) -> jax.Array:
    """DarkRank-hard (Chen et al. 2018), a Nikitin et al. 2020 §4 baseline ("we use hard version
    of DarkRank"). ``list_length``: each anchor ranks its teacher-nearest ``list_length`` others
    (None: all); ``normalize``: L2-normalized embeddings first."""
    s, t = _embeddings(inputs, "darkrank", normalize)
    fn = lambda a, b: losses.darkrank_hard_loss(a, b, alpha=alpha, beta=beta,
                                                list_length=list_length)
    return _grouped(fn, inputs.relation_groups, s, t)


# --- verification and alignment (Wang et al. 2017) ---------------------------------------------

@term("triplet", relational=True)
def triplet_term(inputs: TermInputs, *, margin: float = 0.2, mining: str = "batch_hard"
                 ) -> jax.Array:
    """Triplet loss on the student's embeddings (Wang et al. 2017, verification transfer)."""
    fn = lambda e, y: losses.triplet_loss(e, y, margin=margin, mining=mining)
    return _grouped(fn, inputs.relation_groups, inputs.student["embedding"], inputs.labels)


@term("landmark", student_outputs={"landmarks"}, batch_fields={"landmarks"})
def landmark_term(inputs: TermInputs) -> jax.Array:
    """Landmark regression L2 (Wang et al. 2017, alignment transfer)."""
    if inputs.landmarks is None or "landmarks" not in inputs.student:
        raise ValueError("the landmark term needs data with landmarks and a landmark head")
    return losses.landmark_l2_loss(inputs.student["landmarks"], inputs.landmarks)


