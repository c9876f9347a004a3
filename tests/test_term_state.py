"""Loss terms with non-gradient state (EKD's thresholds, AdaDistill's centres): declared by the
term, carried in the train state, updated inside the jitted step exactly as the pure loss
functions update them by hand, kept or dropped by the step's health rule, checkpointed with
their class axis unpadded and resumed bit for bit, and the same on 1, 2 and 4 devices.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from _tolerance import assert_close
from _train_helpers import CLASSES, TINY, labelled_images, tiny_config, tiny_teacher
from kdface import losses
from kdface.distill import (RECIPES, RecipeSpec, StateShapes, TermDecl, TermInputs, TermState,
                            build_recipe, build_student, objective, register_recipe)
from kdface.training import (ArrayBatches, StepConfig, fit, init_health, init_state,
                             make_train_step, split_teacher)

BOTH = "test_two_states"  # a test's own recipe: both stateful terms in one objective
if BOTH not in RECIPES:
    register_recipe(RecipeSpec(
        name=BOTH, summary="AdaDistill (CosFace) + EKD: every kind of term state at once",
        terms=(TermDecl("adadistill", 1.0, options={"head": "cosface", "scale": 16.0,
                                                    "margin": 0.1}),
               TermDecl("ekd", 1.0)),
        head="cosface"))
E = TINY["embedding_size"]


def _shapes(classes=CLASSES, columns=None) -> StateShapes:
    return StateShapes(embedding_size=E, classes=classes, columns=columns or classes)


def test_a_declared_class_axis_must_be_the_last_axis_of_a_matrix():
    bad = TermState(init=lambda shapes, key: {"c": jnp.zeros((shapes.columns, E))},
                    class_axis={"c"})
    with pytest.raises(ValueError, match=r"must be \[X, 6\] \(columns last\)"):
        bad.build(_shapes(columns=6), jax.random.key(0))
    with pytest.raises(ValueError, match="does not return"):
        TermState(init=lambda shapes, key: {}, class_axis={"c"}).build(_shapes(),
                                                                        jax.random.key(0))


def test_initial_states_are_the_papers_and_padding_is_zero():
    recipe = build_recipe(BOTH, {})
    states = recipe.init_term_states(_shapes(classes=5, columns=8), jax.random.key(0))
    # TFace: zero buffers, one per FPR anchor; official AdaDistill: N(0, 0.01) centres
    np.testing.assert_array_equal(states["ekd"]["student"], np.zeros(6, np.float32))
    np.testing.assert_array_equal(states["ekd"]["teacher"], np.zeros(6, np.float32))
    centres = np.asarray(states["adadistill"]["centres"])
    assert centres.shape == (E, 8)
    np.testing.assert_array_equal(centres[:, 5:], 0.0)
    assert 0.0 < centres[:, :5].std() < 0.03
    assert recipe.class_axis_states() == (("adadistill", "centres"),)


def _embeddings(n=16, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, E)).astype(np.float32)
    t = (s + 0.5 * rng.normal(size=(n, E))).astype(np.float32)
    labels = np.array([0, 1, 2, 3] * (n // 4), np.int32)
    labels[-1] = labels[0]  # a duplicate label beside the balanced ones
    return jnp.asarray(s), jnp.asarray(t), jnp.asarray(labels)


def test_the_objective_passes_each_term_its_state_and_returns_the_new_one():
    recipe = build_recipe(BOTH, {})
    s, t, labels = _embeddings()
    states = recipe.init_term_states(_shapes(), jax.random.key(1))
    states["ekd"] = {"student": jnp.linspace(0.1, 0.6, 6), "teacher": jnp.linspace(0.2, 0.7, 6)}
    inputs = TermInputs(labels=labels, student={"embedding": s}, teacher={"embedding": t})
    total, values, new = jax.jit(lambda st: objective(recipe, inputs, st))(states)
    want_ekd, want_thresholds = losses.ekd_loss(
        s, t, labels, losses.EkdState(states["ekd"]["student"], states["ekd"]["teacher"]))
    want_ada, want_centres = losses.adadistill_loss(s, t, labels, states["adadistill"]["centres"],
                                                    head="cosface", scale=16.0, margin=0.1)
    # the same float32 computations, jitted in one program vs eagerly: the longest reductions
    # are the N x N similarity Gram (E terms) and the [N, C] softmax mean (N * C terms)
    n = s.shape[0]
    assert_close(values["ekd"], want_ekd, terms=n * n * E, what="ekd: ")
    assert_close(values["adadistill"], want_ada, terms=n * CLASSES * E, what="adadistill: ")
    assert_close(total, want_ekd + want_ada, terms=n * n * E, what="total: ")
    assert_close(new["ekd"]["student"], want_thresholds.student, terms=E, what="thresholds: ")
    assert_close(new["ekd"]["teacher"], want_thresholds.teacher, terms=E, what="thresholds: ")
    assert_close(new["adadistill"]["centres"], want_centres, terms=E, what="centres: ")
    with pytest.raises(ValueError, match="carries state, but none was given"):
        objective(recipe, inputs)


def _networks():
    student = build_student("sphereface_custom", num_classes=CLASSES, head="cosface",
                            rngs=nnx.Rngs(0), backbone_options=TINY, logit_scale=16.0)
    teacher = build_student("sphereface_custom", num_classes=CLASSES, head="cosface",
                            rngs=nnx.Rngs(1), backbone_options=TINY, logit_scale=16.0).network
    return student, teacher


def test_the_step_updates_the_state_as_the_loss_functions_do_and_keeps_it_on_a_bad_step():
    recipe = build_recipe(BOTH, {})
    student, teacher = _networks()
    opt = optax.sgd(0.05)
    states = recipe.init_term_states(_shapes(), jax.random.key(2))
    graphdef, state = init_state(student, opt, states)
    teacher_def, teacher_state = split_teacher(teacher)
    step = jax.jit(make_train_step(recipe, graphdef, teacher_def, opt,
                                   StepConfig(classes=CLASSES)))
    images, labels = labelled_images(16)
    batch = {"student_image": images, "label": labels.astype(np.int32)}
    # by hand: the networks' embeddings of this batch (student in train mode, as the step runs
    # it), then the pure functions
    s = nnx.merge(graphdef, state["params"], state["rest"], copy=True).network(images)
    t = nnx.merge(teacher_def, teacher_state, copy=True)(images)
    s, t = s["embedding"], t["embedding"]
    _, thresholds = losses.ekd_loss(s, t, labels, losses.EkdState(**states["ekd"]))
    centres = losses.adadistill_centres(states["adadistill"]["centres"], s, t, labels)
    new, health, metrics = step(state, init_health(recipe), teacher_state, batch)
    assert bool(metrics["finite"])
    # the embeddings through the tiny net's layers (k*k*C convolutions, FC) then E-term
    # normalizations and products: ~10^3 terms bound them generously
    assert_close(new["terms"]["ekd"]["student"], thresholds.student, terms=1000,
                 what="student thresholds: ")
    assert_close(new["terms"]["ekd"]["teacher"], thresholds.teacher, terms=1000,
                 what="teacher thresholds: ")
    assert_close(new["terms"]["adadistill"]["centres"], centres, terms=1000, what="centres: ")
    # a non-finite step applies nothing: parameters and term states stay as they were
    bad = {"student_image": np.full_like(images, np.nan), "label": batch["label"]}
    after, health, metrics = step(new, health, teacher_state, bad)
    assert not bool(metrics["finite"]) and int(health["first_bad"]) == 2
    for a, b in zip(jax.tree.leaves(after["terms"]), jax.tree.leaves(new["terms"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("teacher") / "teacher")


def _saved(workdir, step):
    root = os.path.join(workdir, "checkpoints", str(step))
    with ocp.StandardCheckpointer() as checkpointer:
        return {item: checkpointer.restore(os.path.join(root, item))
                for item in ("model", "optimizer")}


def test_a_killed_run_resumes_its_term_states_bit_for_bit(tmp_path, teacher_dir):
    """6 steps at once vs 3 steps, then the same command again with 6 ("kill -9" after the step
    3 checkpoint: a fresh process state and iterator), on the 4 forced devices with the head and
    the centres split over them: 21 classes train as 24 columns and are saved as 21."""
    assert jax.device_count() == 4  # the suite's forced CPU devices (tests/conftest.py)
    images, labels = labelled_images()
    classes = 21

    def config(name, steps):
        return tiny_config(tmp_path / name, recipe=BOTH, teacher_checkpoint=teacher_dir,
                           steps=steps, save_every=3, shard_head="on")

    def train(cfg):
        return fit(cfg, ArrayBatches(images, labels, batch_size=8), num_classes=classes)
    train(config("whole", 6))
    train(config("part", 3))
    train(config("part", 6))
    whole, part = _saved(str(tmp_path / "whole"), 6), _saved(str(tmp_path / "part"), 6)
    assert jax.tree.structure(whole) == jax.tree.structure(part)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(part)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    terms = whole["optimizer"]["terms"]
    assert np.shape(terms["adadistill"]["centres"]) == (E, classes)  # the real classes only
    assert np.shape(terms["ekd"]["student"]) == (6,)
    # the thresholds moved off TFace's zero start
    assert np.all(np.asarray(terms["ekd"]["student"]) != 0.0)
    # the same checkpoint resumed replicated (21 columns, as on one device): it reads the saved
    # real classes as they are and trains on
    moved = fit(config("part", 9).replace(shard_head="off", save_every=9),
                ArrayBatches(images, labels, batch_size=8), num_classes=classes)
    assert moved["step"] == 9 and np.isfinite(moved["metrics"]["loss"])
    assert np.shape(_saved(str(tmp_path / "part"), 9)["optimizer"]["terms"]["adadistill"][
        "centres"]) == (E, classes)


def _mesh(devices):
    return jax.make_mesh((len(devices),), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.shards
@pytest.mark.parametrize("classes", [8, 21])
def test_the_sharded_centre_update_equals_the_replicated_one(n_devices, classes):
    """The centres split over every device (each writing the columns it owns) against one
    replicated update, duplicates included, to the rounding of the E-term cosines behind each
    alpha (the two are different fused programs: bit-equal on AVX-512, not under XLA's SSE4.2
    code generation); the padding columns of a split that does not divide the classes stay
    exactly zero and never reach the loss."""
    from kdface.distill._adadistill import adadistill_term
    from kdface.models import padded_class_count
    mesh = _mesh(jax.devices())
    columns = padded_class_count(classes, n_devices)
    rng = np.random.default_rng(3)
    s = rng.normal(size=(16, E)).astype(np.float32)
    t = (s + rng.normal(size=(16, E))).astype(np.float32)
    labels = rng.integers(0, classes, 16).astype(np.int32)
    labels[5] = labels[11] = labels[2]  # three samples of one class: the last one is kept
    real = rng.normal(size=(E, classes)).astype(np.float32) * 0.01
    padded = np.pad(real, ((0, 0), (0, columns - classes)))
    split = NamedSharding(mesh, P(None, "data"))

    def run(centres, sharding):
        inputs = TermInputs(labels=jnp.asarray(labels), student={"embedding": jnp.asarray(s)},
                            teacher={"embedding": jnp.asarray(t)}, state={"centres": centres},
                            classes=classes, class_sharding=sharding)
        return jax.jit(lambda: adadistill_term(inputs, head="arcface", scale=16.0))()

    loss_split, new_split = run(jax.device_put(padded, split), split)
    loss_one, new_one = run(jnp.asarray(real), None)
    got = np.asarray(new_split["centres"])
    assert_close(got[:, :classes], new_one["centres"], terms=E, what="split centres: ")
    np.testing.assert_array_equal(got[:, classes:], 0.0)
    assert new_split["centres"].sharding.spec == P(None, "data") or n_devices == 1
    # the replicated term is the loss module's update (eager vs one fused program: an E-term
    # normalization apart)
    assert_close(new_one["centres"], losses.adadistill_centres(real, s, t, labels), terms=E,
                 what="centres: ")
    # the class-split softmax sums in another order: C terms of the logits, E of each cosine
    assert_close(loss_split, loss_one, terms=classes * E, what="loss: ")


@pytest.mark.shards
def test_ekd_loss_and_thresholds_are_the_global_batchs_on_1_2_and_4_devices():
    """The batch split over 1, 2 or 4 devices: the pairs, the thresholds and the loss are the
    global batch's (TFace all-gathers every GPU's features before its loss)."""
    from kdface.distill._ekd import ekd_term
    s, t, labels = _embeddings(32, seed=4)
    state = {"student": jnp.linspace(0.0, 0.5, 6), "teacher": jnp.linspace(0.1, 0.6, 6)}
    want, want_state = losses.ekd_loss(s, t, labels, losses.EkdState(**state))
    for count in (1, 2, 4):
        if count > jax.device_count():
            continue
        mesh = _mesh(jax.devices()[:count])
        rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

        def run(s, t, labels, state):
            inputs = TermInputs(labels=labels, student={"embedding": s},
                                teacher={"embedding": t}, state=state)
            return ekd_term(inputs)
        got, got_state = jax.jit(run)(jax.device_put(s, rows), jax.device_put(t, rows),
                                      jax.device_put(labels, rows), jax.device_put(state, rep))
        # the N x N Gram (E terms per similarity) and the means over at most N^2 / 2 pairs
        n = s.shape[0]
        assert_close(got, want, terms=n * n * E, what=f"{count} devices, loss: ")
        for key, value in (("student", want_state.student), ("teacher", want_state.teacher)):
            assert_close(got_state[key], value, terms=E, what=f"{count} devices, {key}: ")
