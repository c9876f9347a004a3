"""restore_run: any run rebuilt from its workdir, for teacher loading, evaluation and export.

Runs are tiny SphereFace-layout nets at 16x16 trained for 2 steps: a softmax classification
"teacher", a ShrinkTeaNet student (stage adapters) and a landmark student (landmark regression +
a stage hint: landmark head + adapters, fully initialized from the classification run; declared
here so that the test does not depend on the papers' recipe values). The reference for every
restored network is built here by hand with ``build_student`` from the architecture the test
knows, and filled with ``load_model_weights``.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdface import models
from kdface.distill import (RECIPES, RecipeSpec, TermDecl, build_recipe, build_student,
                            register_recipe)
from kdface.evaluation import Embedder
from kdface.export import export_checkpoint
from kdface.training import ArrayBatches, fit, restore_run
from kdface.training._checkpoint import load_model_weights
from kdface.data import normalize_images
from kdface.training._networks import build_teacher
from kdface.training._plan import DataFacts, plan_fit
from kdface.training._restore import build_run_student
from kdface.training._run import run

from _tolerance import assert_close, bound
from _train_helpers import CLASSES, HW, TINY, encoded_source, tiny_config


def _forward_terms() -> int:
    """The TINY net's forward path as a chain of float32 reductions (case 4 of
    tests/_tolerance.py): k*k*C_in per 3x3 conv summed over depth, the embedding FC over the
    last map, then 2 x embedding_size for what follows it (the head's norm and cosine, or the
    landmark regression)."""
    c_in, side, path = 3, HW[0], 0
    for c, units in zip(TINY["channels"], TINY["units"]):
        path += 9 * c_in + units * 2 * 9 * c     # the stride-2 conv, then 2 convs per unit
        c_in, side = c, side // 2
    return path + side * side * c_in + 2 * TINY["embedding_size"]


LANDMARKS = "test_restore_landmarks"
if LANDMARKS not in RECIPES:
    register_recipe(RecipeSpec(name=LANDMARKS, head="softmax", terms=(
        TermDecl("softmax", 1.0), TermDecl("landmark", 1.0), TermDecl("hint_stages", 1.0))))


def _run(config):
    return run(config, data_dir="", source=encoded_source(), num_classes=CLASSES, val_sets=[])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("restore")
    teacher = tiny_config(tmp / "teacher", head="softmax", steps=2)
    _run(teacher)
    # Neither student names the teacher's architecture: it comes from the teacher's run.
    shrink = tiny_config(tmp / "shrinktea", recipe="shrinktea", steps=2,
                         teacher_checkpoint=teacher.workdir)
    _run(shrink)
    align = tiny_config(tmp / "align", recipe=LANDMARKS, head="softmax", steps=2,
                        learning_rate=0.0,
                        teacher_checkpoint=teacher.workdir, init_checkpoint=teacher.workdir)
    _run(align)
    return {"teacher": teacher.workdir, "shrinktea": shrink.workdir, "align": align.workdir}


def _reference(workdir, *, head, landmark_head):
    """The run's network built by hand (adapters onto the tiny teacher's stages) and loaded."""
    teacher = models.create("sphereface_custom", rngs=nnx.Rngs(0), **TINY)
    abstract = nnx.eval_shape(lambda: build_student(
        "sphereface_custom", num_classes=CLASSES, head=head, rngs=nnx.Rngs(0),
        backbone_options=TINY, logit_scale=16.0, landmark_head=landmark_head, adapt_to=teacher,
        input_hw=HW))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    weights, _ = load_model_weights(workdir, {"params": params, "rest": rest})
    student = nnx.merge(graphdef, weights["params"], weights["rest"])
    student.eval()
    return student


def _leaves(module):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module))]


@pytest.mark.parametrize("name,head,landmark_head", [("shrinktea", "cosface", False),
                                                     ("align", "softmax", True)])
def test_restore_evaluate_and_export_runs_with_adapters_and_landmark_head(
        runs, tmp_path, name, head, landmark_head):
    ref = _reference(runs[name], head=head, landmark_head=landmark_head)
    restored = restore_run(runs[name])
    assert restored.step == 2 and restored.input_size == HW and restored.head == head
    assert len(restored.student.adapters) == 4
    assert (restored.network.landmark_head is not None) == landmark_head
    for a, b in zip(_leaves(restored.student), _leaves(ref)):
        np.testing.assert_array_equal(a, b)

    images = np.random.default_rng(0).integers(0, 256, (5, *HW, 3), dtype=np.uint8)
    graphdef, state = nnx.split(ref.network)
    want = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state,
                                                          jnp.asarray(normalize_images(images)))
    embedder = Embedder(runs[name], batch_size=8)
    # the Embedder's compiled batches vs one jit of the network: two float32 forwards in
    # another order, 2 x the forward path (case 4), scale = max|want|
    assert_close(embedder(images), np.asarray(want["embedding"]), terms=2 * _forward_terms(),
                 what="embedding: ")
    assert embedder.has_landmarks == landmark_head
    if landmark_head:
        assert_close(embedder.landmarks(images), np.asarray(want["landmarks"]),
                     terms=2 * _forward_terms(), what="landmarks: ")     # as the embedding

    summary = export_checkpoint(runs[name], str(tmp_path / f"{name}.onnx"))
    assert summary["embedding_size"] == TINY["embedding_size"]
    assert summary["input_shape"] == ["batch", 3, *HW]
    # max|ort - jax| / max|jax|: ONNX Runtime vs JAX float32 forwards, 2 x the forward path
    assert summary["max_rel_diff"] <= bound(terms=2 * _forward_terms(), scale=1.0)


def test_run_records_the_teacher_stage_shapes_it_adapted_to(runs):
    with open(os.path.join(runs["shrinktea"], "config.json")) as f:
        cfg = json.load(f)
    teacher = models.create("sphereface_custom", rngs=nnx.Rngs(0), **TINY)
    assert cfg["teacher"] is None and cfg["adapters"] is True
    assert [tuple(s) for s in cfg["teacher_stage_shapes"]] == teacher.stage_shapes(HW)


def test_full_initialization_copies_the_backbone_into_a_student_with_more_parts(runs):
    # The landmark student (landmark head + adapters) starts from the classification run, as
    # kd_transfer's full initialization does; with lr 0 its backbone and head are still exactly
    # the classification run's.
    align, teacher = restore_run(runs["align"]), restore_run(runs["teacher"])
    for part in ("backbone", "head"):
        for a, b in zip(_leaves(getattr(align.network, part)),
                        _leaves(getattr(teacher.network, part))):
            np.testing.assert_array_equal(a, b)


def test_teacher_flags_may_restate_the_run_but_not_contradict_it(runs, tmp_path):
    base = tiny_config(tmp_path / "kd", recipe="kd_im", teacher_checkpoint=runs["teacher"],
                       feature_loss="normalized_l2", lambda_soft=0.0)
    ref = restore_run(runs["teacher"]).network

    def teacher(config):  # the plan checks the flags, the loop's build_teacher loads
        return build_teacher(plan_fit(config, data=DataFacts(CLASSES), devices=1))

    same = teacher(base.replace(teacher="sphereface_custom", teacher_options=TINY))
    for a, b in zip(_leaves(same), _leaves(ref)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="holds a sphereface_custom.*--teacher says "
                                         "sphereface20"):
        teacher(base.replace(teacher="sphereface20"))
    with pytest.raises(ValueError, match="--teacher_options=.*contradict"):
        teacher(base.replace(teacher_options=dict(TINY, embedding_size=16)))
    with pytest.raises(ValueError, match="--input_size=16,16.*16,24"):
        teacher(base.replace(input_size=(16, 24)))
    # A run with a landmark head and adapters loads as a teacher too.
    aligned = teacher(base.replace(teacher_checkpoint=runs["align"]))
    assert aligned.landmark_head is not None


# --- --input_size reaches the networks ----------------------------------------------------------

def test_sphereface36_thin_at_112x96_builds_and_runs_abstractly():
    from kdface.training import TrainConfig
    config = TrainConfig(workdir="unused", student="sphereface36_thin", head="sphereface",
                         input_size=(112, 96))
    student = nnx.eval_shape(lambda: build_run_student(
        config, num_classes=10, head="sphereface", landmark_head=False, rngs=nnx.Rngs(0)))
    backbone = student.network.backbone
    # Four stride-2 3x3 convolutions (padding 1): 112 -> 56 -> 28 -> 14 -> 7, 96 -> 48 -> 24
    # -> 12 -> 6, with Wang et al. 2019's thin widths 18/36/72/144.
    assert backbone.stage_shapes((112, 96)) == [(56, 48, 18), (28, 24, 36), (14, 12, 72),
                                                (7, 6, 144)]
    graphdef, state = nnx.split(student.network)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                         jax.ShapeDtypeStruct((2, 112, 96, 3), jnp.float32))
    assert out["embedding"].shape == (2, 512) and out["logits"].shape == (2, 10)
    # What the trainer used to build: the backbone's default 112x112 FC, which 112x96 breaks.
    default = nnx.eval_shape(lambda: models.create("sphereface36_thin", rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"expects a final \(7, 7\) feature map"):
        default.stage_shapes((112, 96))


def test_tiny_net_trains_and_restores_at_a_non_square_input(tmp_path):
    size = (16, 24)
    options = {k: v for k, v in TINY.items() if k != "input_size"}
    rng = np.random.default_rng(0)
    labels = np.arange(16) % CLASSES
    images = (rng.normal(size=(16, *size, 3)) * 0.5 + labels[:, None, None, None] * 0.3)
    config = tiny_config(tmp_path / "wide", student_options=options, input_size=size, steps=2)
    summary = fit(config, ArrayBatches(images.astype(np.float32), labels, batch_size=8),
                  num_classes=CLASSES)
    assert summary["step"] == 2 and np.isfinite(summary["metrics"]["loss"])
    restored = restore_run(config.workdir)
    # 16 -> 8 -> 4 -> 2 -> 1 and 24 -> 12 -> 6 -> 3 -> 2: the FC reads 8 channels x 1 x 2.
    assert restored.input_size == size and restored.network.backbone.final_hw == (1, 2)
    assert Embedder(config.workdir)(rng.integers(0, 256, (3, *size, 3), np.uint8)).shape == (3, 8)
    with pytest.raises(ValueError, match="--student_options input_size=.*contradicts"):
        fit(config.replace(workdir=str(tmp_path / "bad"), student_options=TINY),
            ArrayBatches(images.astype(np.float32), labels, batch_size=8), num_classes=CLASSES)


def test_the_checkpoint_says_which_parts_a_run_has(runs, tmp_path):
    # A run whose config.json names no recipe this process knows and records none of the parts
    # (as runs written before those keys existed): its tree comes from the checkpoint.
    import shutil
    copy = str(tmp_path / "copy")
    shutil.copytree(runs["align"], copy)
    with open(os.path.join(copy, "config.json")) as f:
        cfg = json.load(f)
    for key in ("adapters", "landmark_head", "teacher_stage_shapes"):
        del cfg[key]
    with open(os.path.join(copy, "config.json"), "w") as f:
        json.dump({**cfg, "recipe": "a_recipe_registered_nowhere"}, f)
    original, restored = restore_run(runs["align"]), restore_run(copy)
    assert len(restored.student.adapters) == 4 and restored.network.landmark_head is not None
    for a, b in zip(_leaves(original.student), _leaves(restored.student)):
        np.testing.assert_array_equal(a, b)
