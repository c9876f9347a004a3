"""The trainer: schedules, the data-parallel step, resume, checkpoints, errors, every recipe.

Networks are tiny SphereFace-layout nets on 16x16 inputs so that every compile stays cheap.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kdface.data import decode_image, encode_image
from kdface.distill import build_recipe, build_student
from kdface.training import (ArrayBatches, NonFiniteLossError, StepConfig, fit, init_health,
                             init_state,
                             learning_rate_schedule, make_optimizer, make_train_step,
                             read_events)
from kdface.training._checkpoint import load_model_weights
from kdface.training._run import run

from _train_helpers import CLASSES, HW, TINY, labelled_images, tiny_config

_data = labelled_images


def _config(tmp_path, name, **changes):
    return tiny_config(tmp_path / name, **{"progress": True, **changes})


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    images, labels = _data()
    fit(_config(tmp, "teacher", steps=3), ArrayBatches(images, labels, batch_size=8),
        num_classes=CLASSES)
    return str(tmp / "teacher")


# --- schedules and optimizers ----------------------------------------------------------------

def test_step_schedule_with_warmup_matches_hand_values():
    sched = learning_rate_schedule(base_lr=0.1, total_steps=100, schedule="step",
                                   warmup_steps=10, decay_steps=(50, 80), decay_factor=0.1)
    assert float(sched(0)) == pytest.approx(0.0)
    assert float(sched(5)) == pytest.approx(0.05)
    assert float(sched(10)) == pytest.approx(0.1)
    assert float(sched(49)) == pytest.approx(0.1)
    assert float(sched(50)) == pytest.approx(0.01)
    assert float(sched(80)) == pytest.approx(0.001)


def test_cosine_schedule_ends_at_floor():
    sched = learning_rate_schedule(base_lr=1.0, total_steps=20, schedule="cosine",
                                   final_lr_fraction=0.1)
    assert float(sched(0)) == pytest.approx(1.0)
    assert float(sched(10)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
    assert float(sched(20)) == pytest.approx(0.1, rel=1e-5)


def test_weight_decay_skips_vectors():
    opt = make_optimizer(optimizer="sgd", learning_rate=1.0, momentum=0.0, weight_decay=0.5)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero, opt.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.5 * np.ones((2, 2)))
    np.testing.assert_allclose(updates["b"], np.zeros(2))


@pytest.mark.parametrize("bad", [dict(schedule="linear"), dict(warmup_steps=100),
                                 dict(base_lr=-0.1)])
def test_schedule_rejects_bad_arguments(bad):
    kwargs = dict(base_lr=0.1, total_steps=100, schedule="step")
    kwargs.update(bad)
    with pytest.raises(ValueError):
        learning_rate_schedule(**kwargs)


# --- schedules in epochs ------------------------------------------------------------------

def test_epochs_resolve_against_the_training_set_and_the_global_batch():
    from kdface.training import TrainConfig, resolve_schedule
    # Nikitin et al., Pairwise Ranking Distillation for Deep Face Recognition, 2020: cleaned
    # MS-Celeb-1M "consists of 5.8 million photos"; "Batch size is fixed to 552 (92 x 6)";
    # "during training it is divided by 10 each 2 epochs. The total number of epochs is 13."
    n, batch = 5_800_000, 552
    config = TrainConfig(workdir="unused", batch_size=batch, epochs=13,
                         decay_epochs=(2, 4, 6, 8, 10, 12), warmup_epochs=0.5)
    plan = resolve_schedule(config, n)
    ceil_div = lambda a, b: -(-a // b)  # integer ceiling: no float rounding in the reference
    assert plan.steps == ceil_div(13 * n, batch) == 136_595  # 136,594.2 steps of 552 images
    assert plan.decay_steps == tuple(ceil_div(e * n, batch) for e in (2, 4, 6, 8, 10, 12))
    assert plan.decay_steps[0] == 21_015 and plan.warmup_steps == ceil_div(n, 2 * batch)
    assert resolve_schedule(TrainConfig(workdir="unused"), None).steps == 1000  # the default
    steps = resolve_schedule(TrainConfig(workdir="unused", steps=7, decay_steps=(3,)), None)
    assert (steps.steps, steps.decay_steps, steps.warmup_steps) == (7, (3,), 0)


@pytest.mark.parametrize("both,flags", [
    (dict(steps=10, epochs=1.0), "--steps and --epochs"),
    (dict(decay_steps=(5,), decay_epochs=(1.0,)), "--decay_steps and --decay_epochs"),
    (dict(warmup_steps=2, warmup_epochs=0.5), "--warmup_steps and --warmup_epochs")])
def test_steps_and_epochs_of_one_setting_are_refused_together(both, flags):
    from kdface.training import TrainConfig, resolve_schedule
    with pytest.raises(ValueError, match=flags):
        resolve_schedule(TrainConfig(workdir="unused", **both), 1000)
    with pytest.raises(ValueError, match="training set's size"):
        resolve_schedule(TrainConfig(workdir="unused", epochs=2.0), None)


def test_fit_runs_the_steps_its_epochs_give(tmp_path):
    images, labels = _data(24)
    # 1.5 epochs of 24 images at batch 8 = 4.5 -> 5 steps; decay after 1 epoch = step 3.
    summary = fit(_config(tmp_path, "ep", steps=None, epochs=1.5, decay_epochs=(1,),
                          schedule="step"),
                  ArrayBatches(images, labels, batch_size=8), num_classes=CLASSES)
    assert summary["step"] == 5
    with open(tmp_path / "ep" / "config.json") as f:
        cfg = json.load(f)
    assert cfg["resolved_steps"] == 5 and cfg["resolved_decay_steps"] == [3]


# --- the step: 4 devices == 1 device ---------------------------------------------------------

def _run_steps(devices, steps=3):
    from jax.sharding import NamedSharding, PartitionSpec as P
    recipe = build_recipe("scratch", {"head": "cosface", "margin_scale": 16.0, "margin": 0.1})
    student = build_student("sphereface_custom", num_classes=CLASSES, head="cosface",
                            rngs=nnx.Rngs(0), backbone_options=TINY, logit_scale=16.0)
    opt = optax.sgd(0.05, momentum=0.9)
    graphdef, state = init_state(student, opt)
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    state = jax.device_put(state, NamedSharding(mesh, P()))
    step = jax.jit(make_train_step(recipe, graphdef, None, opt, StepConfig()))
    health = jax.device_put(init_health(recipe), NamedSharding(mesh, P()))
    images, labels = _data(n=16)
    losses = []
    for _ in range(steps):
        batch = {"student_image": images, "label": labels.astype(np.int32)}
        batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
        state, health, metrics = step(state, health, None, batch)
        losses.append(float(metrics["loss"]))
    return losses, state


def test_four_device_step_equals_one_device_step():
    assert jax.device_count() == 4
    losses4, state4 = _run_steps(jax.devices())
    losses1, state1 = _run_steps(jax.devices()[:1])
    np.testing.assert_allclose(losses4, losses1, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(state4["params"]), jax.tree.leaves(state1["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
    # BatchNorm-free net here; the step still carries `rest` (RNG counters) consistently.
    assert int(state4["step"]) == 3


# --- fit: logs, resume, checkpoints -----------------------------------------------------------

def test_fit_logs_jsonl_and_tensorboard_events(tmp_path):
    images, labels = _data()
    summary = fit(_config(tmp_path, "run"), ArrayBatches(images, labels, batch_size=8),
                  num_classes=CLASSES)
    assert summary["step"] == 4
    logs = tmp_path / "run" / "logs"
    records = [json.loads(line) for line in open(logs / "log.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    event_files = [f for f in os.listdir(logs) if f.startswith("events.out.tfevents")]
    events = read_events(str(logs / event_files[0]))
    losses = {step: value for step, tag, value in events if tag == "train/loss"}
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses[4] == pytest.approx(records[-1]["loss"], rel=1e-6)


def test_killed_then_resumed_run_equals_uninterrupted(tmp_path):
    images, labels = _data()
    whole = _config(tmp_path, "whole", steps=6, save_every=3)
    fit(whole, ArrayBatches(images, labels, batch_size=8), num_classes=CLASSES)
    part = _config(tmp_path, "part", steps=3, save_every=3)
    fit(part, ArrayBatches(images, labels, batch_size=8), num_classes=CLASSES)
    # "Rerunning the same command": a fresh iterator and process state, more steps.
    fit(part.replace(steps=6), ArrayBatches(images, labels, batch_size=8), num_classes=CLASSES)
    student = build_student("sphereface_custom", num_classes=CLASSES, head="cosface",
                            rngs=nnx.Rngs(1), backbone_options=TINY)
    _, params, rest = nnx.split(student, nnx.Param, ...)
    like = {"params": params, "rest": rest}
    a, meta_a = load_model_weights(whole.workdir, like)
    b, meta_b = load_model_weights(part.workdir, like)
    assert meta_a["step"] == meta_b["step"] == 6
    assert meta_a["data"] == meta_b["data"]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoints_keep_latest_and_never_hold_the_teacher(tmp_path, teacher_dir):
    images, labels = _data()
    cfg = _config(tmp_path, "kd", recipe="kd_im", teacher="sphereface_custom",
                  teacher_options=TINY, teacher_checkpoint=teacher_dir, steps=6, save_every=1,
                  keep=2, feature_loss="normalized_l2")
    fit(cfg, ArrayBatches(images, labels, batch_size=8), num_classes=CLASSES)
    ckpt = tmp_path / "kd" / "checkpoints"
    steps = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())
    assert steps == [5, 6]
    items = {d for d in os.listdir(ckpt / "6") if (ckpt / "6" / d).is_dir()}
    assert items == {"meta", "model", "optimizer"}
    # The model item has exactly the student's leaves (the teacher has the same architecture
    # here, so a stored teacher would double them).
    student = build_student("sphereface_custom", num_classes=CLASSES, head="cosface",
                            rngs=nnx.Rngs(0), backbone_options=TINY)
    _, params, rest = nnx.split(student, nnx.Param, ...)
    restored, _ = load_model_weights(str(tmp_path / "kd"), {"params": params, "rest": rest})
    assert len(jax.tree.leaves(restored)) == len(jax.tree.leaves((params, rest)))


def test_non_finite_loss_names_the_term_and_keeps_the_checkpoint(tmp_path):
    images, labels = _data()
    cfg = _config(tmp_path, "nan", steps=2, save_every=1)
    fit(cfg, ArrayBatches(images, labels, batch_size=8), num_classes=CLASSES)
    bad = images.copy()
    bad[:] = np.nan
    with pytest.raises(NonFiniteLossError, match="cosface"):
        fit(cfg.replace(steps=4), ArrayBatches(bad, labels, batch_size=8), num_classes=CLASSES)
    steps = sorted(int(d) for d in os.listdir(tmp_path / "nan" / "checkpoints") if d.isdigit())
    assert max(steps) == 2


# --- config mistakes fail before compiling ----------------------------------------------------

def test_config_errors(tmp_path, teacher_dir):
    images, labels = _data()
    batches = lambda: ArrayBatches(images, labels, batch_size=8)
    with pytest.raises(ValueError, match="unknown recipe"):
        fit(_config(tmp_path, "a", recipe="magic"), batches(), num_classes=CLASSES)
    with pytest.raises(ValueError, match="divisible"):
        fit(_config(tmp_path, "b", batch_size=6), ArrayBatches(images, labels, batch_size=6),
            num_classes=CLASSES)
    with pytest.raises(ValueError, match="teacher_checkpoint"):
        fit(_config(tmp_path, "c", recipe="kd_im", teacher="sphereface_custom"), batches(),
            num_classes=CLASSES)
    with pytest.raises(FileNotFoundError):
        fit(_config(tmp_path, "d", recipe="kd_im", teacher="sphereface_custom",
                    teacher_checkpoint=str(tmp_path / "missing")), batches(),
            num_classes=CLASSES)
    with pytest.raises(ValueError, match="unknown backbone"):
        fit(_config(tmp_path, "e", student="resnet7"), batches(), num_classes=CLASSES)
    wide = dict(TINY, embedding_size=16)
    with pytest.raises(ValueError, match="embedding"):
        fit(_config(tmp_path, "f", recipe="vargface", student_options=wide,
                    teacher="sphereface_custom", teacher_options=TINY,
                    teacher_checkpoint=teacher_dir), batches(), num_classes=CLASSES)


# --- every recipe trains through run() on an encoded in-memory source -------------------------

def _source(n=32):
    images, labels = _data(n)
    rng = np.random.default_rng(1)
    out = []
    for label in labels:
        image = (rng.random((*HW, 3)) * 80 + 40 + 30 * label).clip(0, 255).astype(np.uint8)
        out.append({"image": encode_image(image), "label": int(label),
                    "landmarks": rng.random((5, 2)).astype(np.float32) * 16})
    return out


@pytest.mark.parametrize("recipe,extra", [
    ("kd_im", {"bf16": True}),
    ("pwr", {"kd_loss": "rkd_da", "relation_scope": "device", "batch_size": 16}),
    ("pwr", {"kd_loss": "darkrank"}),
    ("vargface", {}),
    ("shrinktea", {}),
    ("transfer", {"transfer_task": "classification", "head": "softmax"}),
    ("transfer", {"transfer_task": "verification", "head": "softmax", "extra_softmax": 1.0}),
    ("transfer", {"transfer_task": "alignment", "head": "softmax"}),
])
def test_every_recipe_runs(tmp_path, teacher_dir, recipe, extra):
    teacher = teacher_dir
    if extra.get("head") == "softmax":  # Hinton KD needs a teacher head with the same classes
        teacher = str(tmp_path / "softmax_teacher")
        run(_config(tmp_path, "softmax_teacher", head="softmax", steps=2), data_dir="",
            source=_source(), num_classes=CLASSES, val_sets=[])
    cfg = _config(tmp_path, "r", recipe=recipe, teacher="sphereface_custom",
                  teacher_options=TINY, teacher_checkpoint=teacher, steps=2,
                  feature_loss="normalized_l2", **extra)
    summary = run(cfg, data_dir="", source=_source(), num_classes=CLASSES, val_sets=[])
    assert summary["step"] == 2
    assert np.isfinite(summary["metrics"]["loss"])
    # Every recipe's run evaluates (kdface.evaluation's Embedder) and exports to ONNX.
    from kdface.evaluation import Embedder
    from kdface.export import export_checkpoint
    images = np.stack([decode_image(r["image"]) for r in _source(4)])
    emb = Embedder(str(tmp_path / "r"))(images)
    assert emb.shape == (4, TINY["embedding_size"]) and np.all(np.isfinite(emb))
    checked = export_checkpoint(str(tmp_path / "r"), str(tmp_path / "r.onnx"))
    assert os.path.getsize(tmp_path / "r.onnx") > 0
    if checked.get("max_rel_diff") is not None:  # ONNX Runtime vs JAX on random images
        assert checked["max_rel_diff"] < 1e-4


def test_kd_finetunes_the_teacher_first_and_generations_chain(tmp_path, teacher_dir):
    cfg = _config(tmp_path, "kd", recipe="kd", teacher="sphereface_custom",
                  teacher_options=TINY, teacher_checkpoint=teacher_dir, steps=2,
                  feature_loss="normalized_l2")
    run(cfg, data_dir="", source=_source(), num_classes=CLASSES, val_sets=[])
    assert os.path.isdir(tmp_path / "kd" / "teacher_lr" / "checkpoints")
    with open(tmp_path / "kd" / "teacher_lr" / "config.json") as f:
        tuned = json.load(f)
    assert tuned["init_checkpoint"] == teacher_dir and tuned["student_view"] == "low_resolution"
    gens = _config(tmp_path, "gens", recipe="vargface", teacher="sphereface_custom",
                   teacher_options=TINY, teacher_checkpoint=teacher_dir, steps=2, generations=2)
    run(gens, data_dir="", source=_source(), num_classes=CLASSES, val_sets=[])
    with open(tmp_path / "gens" / "gen_2" / "config.json") as f:
        assert json.load(f)["init_checkpoint"] == str(tmp_path / "gens" / "gen_1")


def test_teacher_cache_gives_the_same_losses_and_refuses_random_views(tmp_path, teacher_dir):
    base = _config(tmp_path, "nocache", recipe="kd_im", teacher="sphereface_custom",
                   teacher_options=TINY, teacher_checkpoint=teacher_dir, steps=3,
                   feature_loss="normalized_l2", learning_rate=0.0)
    plain = run(base, data_dir="", source=_source(), num_classes=CLASSES, val_sets=[])
    cached = run(base.replace(workdir=str(tmp_path / "cache"), teacher_cache=True), data_dir="",
                 source=_source(), num_classes=CLASSES, val_sets=[])
    for term in ("soft_prediction", "normalized_l2", "loss"):
        assert cached["metrics"][term] == pytest.approx(plain["metrics"][term], rel=1e-4)
    assert os.listdir(tmp_path / "cache" / "teacher_cache")
    with pytest.raises(ValueError, match="cannot be cached"):
        run(base.replace(workdir=str(tmp_path / "kdc"), recipe="kd", teacher_cache=True),
            data_dir="", source=_source(), num_classes=CLASSES, val_sets=[])
