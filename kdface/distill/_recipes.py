"""The five papers' methods as data: which views, which head, which weighted loss terms.

A recipe is one declaration, a ``RecipeSpec`` in a registry (``register_recipe``), and nothing
else: the trainer never branches on a recipe's or a term's name. ``build_recipe(name, config)``
resolves a declaration against the run's options (``TrainConfig`` fields, i.e. the flags) into a
concrete ``Recipe``; what the trainer must prepare (a teacher, stage features, adapters, a
landmark head, whether a teacher cache can serve it, which sizes must agree) is computed from the
contracts its terms declare (``kdface.distill._terms.TermSpec``).

Values in a declaration are literals or ``Option('field')``: the value of that run option, so a
paper's numbers live in the option defaults and the flagfiles, and each declaration says which
option feeds which term option. ``cite`` fields carry the paper's sentence a value comes from, or
"kdface's choice" where the paper is silent.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp

from kdface.distill._terms import StateShapes, TermInputs, term_spec

HEADS = ("softmax", "cosface", "arcface", "sphereface")
# The views of kdface.data.VIEWS (the pipeline's vocabulary), spelled out so that declaring
# recipes does not import the data stack (grain, OpenCV); a test keeps the two equal.
VIEWS = ("original", "low_resolution")
TEACHER_CACHE_OUTPUTS = frozenset({"embedding", "logits"})  # what a teacher cache stores


@dataclasses.dataclass(frozen=True)
class Option:
    """A declaration value read from the run option ``name`` (a ``TrainConfig`` field).

    choices: the values the recipe accepts (None = any); anything else is refused by name.
    """
    name: str
    choices: tuple[Any, ...] | None = None


HEAD = "<head>"  # a TermDecl name: the term of the recipe's classifier head


@dataclasses.dataclass(frozen=True)
class TermDecl:
    """One weighted loss term of a recipe, as declared.

    name: a registered term, ``HEAD`` (the recipe's head: 'softmax', 'cosface', ...), or an
    ``Option`` naming the term (e.g. ``Option('kd_loss')``).
    weight: a number or an ``Option``; a term whose weight resolves to 0 is left out.
    options: keyword options of the term function (literals or ``Option``s).
    options_for: extra options by the resolved term name (the head's margins, the options of the
    term an ``Option`` picked); when ``name`` is not a fixed string and ``options_for`` is given,
    its keys are the names accepted.
    when: ``{option: accepted values}``: the term is part of the recipe only when every listed
    option has one of those values (e.g. one task of a multi-task recipe).
    cite: the paper's sentence(s) behind this term, its weight and its options.
    """
    name: str | Option
    weight: float | Option = 1.0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    options_for: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    when: Mapping[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    cite: str = ""


@dataclasses.dataclass(frozen=True)
class TeacherPhase:
    """A run before the distillation: the teacher is trained again (from ``teacher_checkpoint``)
    with recipe ``recipe`` on ``student_view`` data in ``workdir/<subdir>``, and the
    distillation then uses that run as its teacher (Wang et al. 2019's KD fine-tunes the teacher on
    low-resolution data first)."""
    subdir: str
    recipe: str = "scratch"
    student_view: str = "original"
    cite: str = ""


@dataclasses.dataclass(frozen=True)
class RecipeSpec:
    """A distillation method as one declaration (see the module docstring).

    head: the student's classifier head kind ('softmax' logits or a margin head's cos θ).
    student_view / teacher_view: what each network sees ('original' image, or the
    'low_resolution' augmented one of Wang et al. 2019 §2.2).
    adapters / landmark_head: None = built when a term's contract asks for them.
    phases: runs before this one (``TeacherPhase``).
    generations: student generations (Yan et al. 2019's recursive KD), each from the previous one.
    optimizer: keyword settings of ``kdface.training.make_optimizer`` the method fixes (e.g.
    ``{'nesterov': True}``), literals or ``Option``s.
    choices: ``{option: accepted values}`` for options the recipe branches on (``when``).
    cite: ``{what: sentence}`` for values outside the terms (head, margins, views, schedule ...).
    """
    name: str
    terms: tuple[TermDecl, ...]
    summary: str = ""
    head: str | Option = Option("head", HEADS)
    student_view: str | Option = Option("student_view", VIEWS)
    teacher_view: str | Option = "original"
    adapters: bool | None = None
    landmark_head: bool | None = None
    phases: tuple[TeacherPhase, ...] = ()
    generations: int | Option = Option("generations")
    optimizer: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    choices: Mapping[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    cite: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Term:
    """One resolved weighted loss term: ``weight * TERMS[name].fn(inputs, **options)``."""
    name: str
    weight: float
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    cite: str = ""

    def __post_init__(self):
        term_spec(self.name)  # unknown names fail here, listing the known ones

    @property
    def spec(self):
        return term_spec(self.name)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A declaration resolved against a run's options: what the trainer runs.

    Everything the trainer asks (``needs_teacher``, ``student_stages``, ``teacher_stages``,
    ``teacher_outputs``, ``teacher_tail``, ``cacheable``, ``requiring``) is computed from the
    terms' contracts.
    """
    name: str
    terms: tuple[Term, ...]
    head: str = "cosface"
    student_view: str = "original"
    teacher_view: str | None = "original"
    adapters: bool = False
    landmark_head: bool = False
    phases: tuple[TeacherPhase, ...] = ()
    generations: int = 1
    optimizer: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    cite: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def needs_teacher(self) -> bool:
        return any(t.spec.needs_teacher for t in self.terms)

    @property
    def student_stages(self) -> bool:
        """The student's forward pass must return its stage features."""
        return any(t.spec.student_stages for t in self.terms)

    @property
    def teacher_stages(self) -> bool:
        """The teacher's forward pass must return its stage features."""
        return any(t.spec.teacher_stages for t in self.terms)

    @property
    def teacher_outputs(self) -> frozenset[str]:
        """Every teacher output the terms read."""
        return frozenset().union(*(t.spec.teacher_outputs for t in self.terms))

    @property
    def teacher_tail(self) -> bool:
        """Some term runs features through the teacher's remaining blocks."""
        return any(t.spec.teacher_tail for t in self.terms)

    @property
    def stateful_terms(self) -> tuple[Term, ...]:
        """The terms that carry non-gradient state (``TermSpec.state``)."""
        return tuple(t for t in self.terms if t.spec.state is not None)

    def init_term_states(self, shapes: StateShapes, key: jax.Array
                         ) -> dict[str, dict[str, jax.Array]]:
        """``{term name: its initial state}`` of the stateful terms (empty when none); each
        term's init gets its own key, folded from ``key`` by the term's position."""
        return {t.name: t.spec.state.build(shapes, jax.random.fold_in(key, i))
                for i, t in enumerate(self.terms) if t.spec.state is not None}

    def class_axis_states(self) -> tuple[tuple[str, str], ...]:
        """``(term name, state name)`` of every state array with a class axis."""
        return tuple((t.name, name) for t in self.stateful_terms
                     for name in sorted(t.spec.state.class_axis))

    @property
    def batch_fields(self) -> frozenset[str]:
        return frozenset().union(*(t.spec.batch_fields for t in self.terms))

    def requiring(self, requirement: str) -> tuple[str, ...]:
        """Names of the terms whose contract sets ``requirement`` (a boolean ``TermSpec``
        field, e.g. 'same_embedding', 'same_classes')."""
        return tuple(t.name for t in self.terms if getattr(t.spec, requirement))

    def uncacheable_reason(self) -> str | None:
        """Why a teacher cache (embedding and logits of the teacher's original view, computed
        once) cannot serve this recipe, or None when it can."""
        if not self.needs_teacher:
            return f"recipe {self.name!r} has no teacher"
        if self.teacher_view != "original":
            return (f"recipe {self.name!r} shows the teacher a random ({self.teacher_view}) "
                    f"view; its outputs cannot be cached")
        extra = self.teacher_outputs - TEACHER_CACHE_OUTPUTS
        users = [t.name for t in self.terms
                 if t.spec.teacher_tail or t.spec.teacher_outputs - TEACHER_CACHE_OUTPUTS]
        if extra or self.teacher_tail:
            return (f"recipe {self.name!r} has terms {users} that run the teacher beyond its "
                    f"embedding and logits; the cache holds only embeddings and logits")
        return None

    @property
    def cacheable(self) -> bool:
        return self.uncacheable_reason() is None


# --- the registry --------------------------------------------------------------------------

_RECIPES: dict[str, RecipeSpec] = {}
RECIPES: Mapping[str, RecipeSpec] = MappingProxyType(_RECIPES)  # read-only view


def register_recipe(spec: RecipeSpec) -> RecipeSpec:
    """Adds a method; its name becomes a valid ``--recipe``. A name is registered once."""
    if not isinstance(spec, RecipeSpec):
        raise TypeError(f"register_recipe needs a RecipeSpec, got {type(spec).__name__}")
    if spec.name in _RECIPES:
        raise ValueError(f"recipe {spec.name!r} is already registered")
    if not spec.terms:
        raise ValueError(f"recipe {spec.name!r} declares no terms")
    for decl in spec.terms:  # unknown term names fail here, listing the known ones
        if isinstance(decl.name, str) and decl.name != HEAD:
            term_spec(decl.name)
        for name in decl.options_for:
            term_spec(name)
    _RECIPES[spec.name] = spec
    return spec


def recipe_spec(name: str) -> RecipeSpec:
    """The declaration of recipe ``name``; unknown names list the registered ones."""
    if name not in _RECIPES:
        raise ValueError(f"unknown recipe {name!r}; registered: {', '.join(sorted(_RECIPES))}")
    return _RECIPES[name]


def recipe_names() -> list[str]:
    return sorted(_RECIPES)


# --- resolution ----------------------------------------------------------------------------

# The run options' defaults, registered by the layer that declares the options (the trainer's
# ``TrainConfig`` registers its fields' defaults when it is imported): the recipe layer reads
# options by name and does not know who declares them.
_OPTION_DEFAULTS: list[Mapping[str, Any]] = []


def register_option_defaults(defaults: Mapping[str, Any]) -> None:
    """Declares the run options' defaults (name -> value) that ``build_recipe`` falls back to
    for options a partial mapping leaves out. Called once by ``kdface.training``."""
    _OPTION_DEFAULTS[:] = [MappingProxyType(dict(defaults))]


class _Options:
    """Option lookup: the run's value, else the registered default (so partial mappings, e.g. a
    benchmark's few options, still resolve)."""

    def __init__(self, recipe: str, config: Any):
        self.recipe = recipe
        self.values = config.as_dict() if hasattr(config, "as_dict") else dict(config)
        self.defaults = _OPTION_DEFAULTS[0] if _OPTION_DEFAULTS else {}

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, Option):
            return value
        if value.name in self.values:
            got = self.values[value.name]
        elif value.name in self.defaults:
            got = copy.deepcopy(self.defaults[value.name])  # a dict default is not shared
        else:
            raise ValueError(f"recipe {self.recipe!r} reads option {value.name!r}, which is not "
                             f"a run option (a TrainConfig field)" if self.defaults else
                             f"recipe {self.recipe!r} reads option {value.name!r}, which this "
                             f"mapping leaves out (import kdface.training for the defaults)")
        if value.choices is not None and got not in value.choices:
            raise ValueError(f"{value.name} must be one of {tuple(value.choices)} for recipe "
                             f"{self.recipe!r}, got {got!r} (--{value.name})")
        return got


def _resolve_term(decl: TermDecl, head: str, get: _Options) -> Term | None:
    if any(get(Option(k)) not in tuple(v) for k, v in decl.when.items()):
        return None
    weight = float(get(decl.weight))
    if weight == 0:
        return None
    name = head if decl.name == HEAD else get(decl.name)
    if isinstance(decl.name, Option) and decl.options_for and name not in decl.options_for:
        raise ValueError(f"{decl.name.name} must be one of {tuple(decl.options_for)} for recipe "
                         f"{get.recipe!r}, got {name!r}")
    options = {**decl.options, **decl.options_for.get(name, {})}
    return Term(name, weight, {k: get(v) for k, v in options.items()}, cite=decl.cite)


def build_recipe(name: str, config: Any) -> Recipe:
    """Resolves recipe ``name`` against ``config`` (a ``TrainConfig`` or a mapping of its
    fields; missing fields take their defaults)."""
    spec = recipe_spec(name)
    get = _Options(name, config)
    for option, accepted in spec.choices.items():
        get(Option(option, tuple(accepted)))
    head = get(spec.head)
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    terms = [t for t in (_resolve_term(d, head, get) for d in spec.terms) if t is not None]
    if not terms:
        raise ValueError(f"recipe {name!r} has no term with a non-zero weight under these "
                         f"options")
    seen = [t.name for t in terms]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        raise ValueError(f"recipe {name!r} weights term(s) {twice} twice under these options; "
                         f"set one of their weights to 0")
    student_view, teacher_view = get(spec.student_view), get(spec.teacher_view)
    for what, view in (("student_view", student_view), ("teacher_view", teacher_view)):
        if view not in VIEWS:
            raise ValueError(f"{what} must be one of {VIEWS}, got {view!r}")
    recipe = Recipe(
        name=name, terms=tuple(terms), head=head, student_view=student_view,
        teacher_view=teacher_view,
        adapters=(any(t.spec.adapters for t in terms) if spec.adapters is None
                  else bool(spec.adapters)),
        landmark_head=(any("landmarks" in t.spec.student_outputs for t in terms)
                       if spec.landmark_head is None else bool(spec.landmark_head)),
        phases=spec.phases, generations=int(get(spec.generations)),
        optimizer={k: get(v) for k, v in spec.optimizer.items()}, cite=dict(spec.cite))
    if not recipe.needs_teacher:
        recipe = dataclasses.replace(recipe, teacher_view=None, phases=())
    needs_cos = [t.name for t in terms if "cos" in t.spec.student_outputs]
    if needs_cos and head == "softmax":
        raise ValueError(f"terms {needs_cos} of recipe {name!r} need a margin head, but the "
                         f"head is 'softmax'")
    return recipe


def objective(recipe: Recipe, inputs: TermInputs,
              states: Mapping[str, Mapping[str, jax.Array]] | None = None
              ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, dict[str, jax.Array]]]:
    """Weighted sum of the recipe's terms; returns (total, {term name: unweighted value},
    {stateful term name: its new state}). ``states``: each stateful term's state (its
    ``TermInputs.state``), as ``Recipe.init_term_states`` builds them."""
    states = {} if states is None else states
    values, new_states = {}, {}
    total = jnp.zeros((), jnp.float32)
    for term in recipe.terms:
        if term.spec.state is None:
            value = term.spec.fn(inputs, **term.options)
        else:
            if term.name not in states:
                raise ValueError(f"loss term {term.name!r} carries state, but none was given "
                                 f"(Recipe.init_term_states builds it)")
            value, new_states[term.name] = term.spec.fn(
                dataclasses.replace(inputs, state=states[term.name]), **term.options)
        value = value.astype(jnp.float32)
        values[term.name] = value
        total = total + term.weight * value
    return total, values, new_states
