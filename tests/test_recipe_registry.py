"""A new method is a declaration: recipes and terms registered from this file alone train.

Also: unknown names list the registered ones, duplicates are refused, and what the trainer prepares
(teacher, stages, adapters, cache) follows the terms' declared contracts.
"""
from __future__ import annotations

import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdface import distill
from kdface.distill import (HEAD, RECIPES, TERMS, Option, RecipeSpec, TermDecl, TermInputs,
                            TermSpec, build_recipe, register_recipe, register_term, term)
from kdface.training import ArrayBatches, fit

from _train_helpers import CLASSES, labelled_images, tiny_config, tiny_teacher

SIXTH = "test_sixth_method"
COSINE = "test_embedding_cosine"


def _embedding_cosine(inputs: TermInputs) -> jax.Array:
    """Mean ``1 - cos(student, teacher)`` over the batch: [B, E] x [B, E] -> scalar."""
    s, t = inputs.student["embedding"], jax.lax.stop_gradient(inputs.teacher["embedding"])
    cos = jnp.sum(s * t, -1) / (jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1))
    return jnp.mean(1.0 - cos)


# Registered once per process, here and nowhere in kdface.
if COSINE not in TERMS:
    register_term(COSINE, TermSpec(_embedding_cosine, teacher_outputs=frozenset({"embedding"}),
                                   same_embedding=True))
if SIXTH not in RECIPES:
    register_recipe(RecipeSpec(
        name=SIXTH, summary="CosFace + RKD-D + a cosine term (a test's own method)",
        terms=(TermDecl(HEAD, 1.0, options_for={"cosface": {"scale": Option("margin_scale"),
                                                            "margin": Option("margin")}}),
               TermDecl("rkd_d", Option("alpha"), cite="kdface's choice: a test"),
               TermDecl(COSINE, 0.5)),
        optimizer={"nesterov": True}))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("teacher") / "teacher")


def test_a_recipe_declared_in_a_test_trains_for_two_steps(tmp_path, teacher_dir):
    config = tiny_config(tmp_path / "sixth", recipe=SIXTH, teacher_checkpoint=teacher_dir,
                         steps=2, alpha=2.0)
    recipe = build_recipe(SIXTH, config)
    assert [(t.name, t.weight) for t in recipe.terms] == [("cosface", 1.0), ("rkd_d", 2.0),
                                                         (COSINE, 0.5)]
    assert recipe.needs_teacher and recipe.cacheable and not recipe.adapters
    assert recipe.requiring("same_embedding") == (COSINE,)
    images, labels = labelled_images()
    summary = fit(config, ArrayBatches(images, labels, batch_size=8), num_classes=CLASSES)
    assert summary["step"] == 2 and summary["recipe"] == SIXTH
    for name in ("loss", "cosface", "rkd_d", COSINE):
        assert np.isfinite(summary["metrics"][name]), name
    with open(tmp_path / "sixth" / "config.json") as f:
        assert json.load(f)["recipe"] == SIXTH


def test_the_declared_optimizer_setting_reaches_the_optimizer(tmp_path, teacher_dir):
    # nesterov=True is the recipe's, not the config's: with momentum 0 the optimizer refuses it.
    config = tiny_config(tmp_path / "nag", recipe=SIXTH, teacher_checkpoint=teacher_dir,
                         momentum=0.0)
    images, labels = labelled_images()
    with pytest.raises(ValueError, match="nesterov=True needs a non-zero momentum"):
        fit(config, ArrayBatches(images, labels, batch_size=8), num_classes=CLASSES)


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown recipe 'magic'; registered: .*kd_im.*pwr"):
        build_recipe("magic", {})
    with pytest.raises(ValueError, match=r"unknown loss term 'l7'; known: .*hinton.*pwr"):
        register_recipe(RecipeSpec(name="uses_unknown_term", terms=(TermDecl("l7"),)))
    with pytest.raises(ValueError, match=r"kd_loss must be one of .*'pwr'.*got 'l7'"):
        build_recipe("pwr", {"kd_loss": "l7"})
    assert "uses_unknown_term" not in RECIPES


def test_duplicates_and_bad_declarations_are_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_recipe(RecipeSpec(name="pwr", terms=(TermDecl("softmax"),)))
    with pytest.raises(ValueError, match="already registered"):
        register_term("hinton", TermSpec(_embedding_cosine))
    with pytest.raises(ValueError, match="unknown entries"):
        TermSpec(_embedding_cosine, teacher_outputs=frozenset({"feelings"}))
    with pytest.raises(ValueError, match=r"not a run option \(a TrainConfig field\)"):
        register_recipe(RecipeSpec(name="reads_a_missing_option",
                                   terms=(TermDecl("softmax", Option("no_such_option")),)))
        build_recipe("reads_a_missing_option", {})
    with pytest.raises(ValueError, match=r"weights term\(s\) \['hinton'\] twice"):
        register_recipe(RecipeSpec(name="hinton_twice", terms=(
            TermDecl("hinton", 1.0), TermDecl(Option("kd_loss"), 1.0))))
        build_recipe("hinton_twice", {"kd_loss": "hinton"})


def test_what_the_trainer_prepares_follows_the_term_contracts():
    @term("test_stage_probe", student_outputs={"stages"}, teacher_outputs={"stages"},
          adapters=True)
    def probe(inputs):
        return jnp.zeros(())
    register_recipe(RecipeSpec(name="test_stage_recipe", head="softmax", terms=(
        TermDecl("softmax", 1.0), TermDecl("test_stage_probe", Option("lambda_feature")))))
    staged = build_recipe("test_stage_recipe", {})
    assert staged.needs_teacher and staged.student_stages and staged.teacher_stages
    assert staged.adapters and not staged.landmark_head
    assert "only embeddings and logits" in staged.uncacheable_reason()
    # The ablation of its only teacher term leaves a recipe with no teacher and no adapters.
    ablated = build_recipe("test_stage_recipe", {"lambda_feature": 0.0})
    assert [t.name for t in ablated.terms] == ["softmax"]
    assert not ablated.needs_teacher and not ablated.adapters and ablated.teacher_view is None


def test_the_trainer_never_names_a_term():
    # The trainer's modules mention no registered term's name as a string.
    from kdface.training import (_checkpoint, _compile, _loop, _placement, _plan, _restore, _run,
                                 _step, _teacher_cache)
    for module in (_checkpoint, _compile, _loop, _placement, _plan, _restore, _run, _step,
                   _teacher_cache):
        source = inspect.getsource(module)
        named = [n for n in TERMS if f'"{n}"' in source or f"'{n}'" in source]
        assert not named, (module.__name__, named)


def test_registered_recipes_are_listed():
    assert {"scratch", "kd_im", "kd", "pwr", "transfer", "vargface", "shrinktea", SIXTH} <= set(
        distill.recipe_names())


def test_recipes_and_pipeline_share_one_view_vocabulary():
    import kdface.data
    from kdface.distill._recipes import VIEWS
    assert VIEWS == kdface.data.VIEWS
