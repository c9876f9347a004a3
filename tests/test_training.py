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

from _tolerance import assert_close, bound
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
    # float32 vs the exact decimal: a handful of float32 roundings per value (the constants,
    # the warmup ratio step/10, the decay product): 3 terms of magnitude base_lr
    for step, want in [(0, 0.0), (5, 0.05), (10, 0.1), (49, 0.1), (50, 0.01), (80, 0.001)]:
        assert_close(float(sched(step)), want, terms=3, scale=0.1, what=f"step {step}: ")


def test_cosine_schedule_ends_at_floor():
    sched = learning_rate_schedule(base_lr=1.0, total_steps=20, schedule="cosine",
                                   final_lr_fraction=0.1)
    # float32 vs the exact value: cos(pi * step / total) rounds its argument and itself, then
    # the floor's affine map (a product and a sum): 4 roundings of magnitude base_lr = 1
    for step, want in [(0, 1.0), (10, 0.1 + 0.9 * 0.5), (20, 0.1)]:
        assert_close(float(sched(step)), want, terms=4, scale=1.0, what=f"step {step}: ")


def test_weight_decay_skips_vectors():
    opt = make_optimizer(optimizer="sgd", learning_rate=1.0, momentum=0.0, weight_decay=0.5)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero, opt.init(params), params)
    # exact: -lr * wd * w = -0.5 * 1 is representable, and the vector gets no decay at all
    np.testing.assert_array_equal(updates["w"], -0.5 * np.ones((2, 2)))
    np.testing.assert_array_equal(updates["b"], np.zeros(2))


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


# --- the step: all devices == 1 device ---------------------------------------------------------

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


def _forward_terms() -> int:
    """The forward path of the TINY net as a chain of float32 reductions (case 4 of
    tests/_tolerance.py): each 3x3 conv sums k*k*C_in terms, summed over depth, then the
    embedding FC over the flattened last map and the head's two 8-term sums (norm, cosine)."""
    c_in, side, path = 3, HW[0], 0
    for c, units in zip(TINY["channels"], TINY["units"]):
        path += 9 * c_in + units * 2 * 9 * c     # the stride-2 conv, then 2 convs per unit
        c_in, side = c, side // 2
    return path + side * side * c_in + 2 * TINY["embedding_size"]


def _step_terms(batch: int) -> int:
    """The longest chain of float32 reductions behind one SGD step of the TINY net: the forward
    path, the backward path through the same layers, and the longest weight-gradient reduction
    (the stem: batch x its 8x8 output positions), the softmax sum and the batch mean."""
    stem_grad = batch * (HW[0] // 2) * (HW[1] // 2)
    return 2 * _forward_terms() + stem_grad + CLASSES + batch


@pytest.mark.shards
def test_all_device_step_equals_one_device_step(n_devices):
    if n_devices == 1:
        pytest.skip("one forced device: the data-parallel step has nothing to split")
    assert jax.device_count() == n_devices
    steps, batch = 3, 16                       # 16 samples: 2 per device on 8 devices
    losses_n, state_n = _run_steps(jax.devices(), steps)
    losses_1, state_1 = _run_steps(jax.devices()[:1], steps)
    # float32 vs float32 in another order (the batch reductions split over devices, case 3):
    # 2 x (each of the `steps` steps adds one step's rounding, see _step_terms); scale: the
    # loss itself (its terms are the per-sample losses) and, per leaf, max|param| (the final
    # value is init + the accumulated updates, rounded at the parameter's magnitude). Measured
    # on 4 and 8 CPU devices the parameter errors are <= 7 eps x max|leaf|: the bound is a
    # worst case, a sharding bug (a per-device mean, a dropped shard) is off by O(1).
    terms = 2 * steps * _step_terms(batch)
    assert_close(np.asarray(losses_n), np.asarray(losses_1), terms=terms, what="loss: ")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state_n["params"]),
                            jax.tree.leaves(state_1["params"])):
        assert_close(np.asarray(a), np.asarray(b), terms=terms,
                     what=f"{jax.tree_util.keystr(path)}: ")
    # BatchNorm-free net here; the step still carries `rest` (RNG counters) consistently.
    assert int(state_n["step"]) == steps


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
    # exact: the same float32 loss written twice (the event stores float32, the JSON the
    # float32 value printed in full)
    assert losses[4] == np.float32(records[-1]["loss"])


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


def test_the_soft_loss_of_margin_heads_is_told_their_logit_bound(tmp_path, teacher_dir,
                                                                  monkeypatch):
    # kd_im's soft loss reads both networks' s·cos θ logits: the step passes s, so the softmaxes
    # skip the row maximum (tests/test_bounded_softmax.py); a softmax head would pass None
    from kdface import losses
    from kdface.distill import _terms
    seen = []
    original = losses.soft_prediction_loss

    def recording(*args, **kwargs):
        seen.append(kwargs.get("logit_bound"))
        return original(*args, **kwargs)
    monkeypatch.setattr(_terms.losses, "soft_prediction_loss", recording)
    images, labels = _data()
    cfg = _config(tmp_path, "bound", recipe="kd_im", teacher="sphereface_custom",
                  teacher_options=TINY, teacher_checkpoint=teacher_dir, steps=1,
                  feature_loss="normalized_l2")
    fit(cfg, ArrayBatches(images, labels, batch_size=8), num_classes=CLASSES)
    assert seen and set(seen) == {float(cfg.margin_scale)}


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
    ("pwr", {"kd_loss": "rkd_da", "relation_group_size": 4, "batch_size": 16}),
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
        # max|ort - jax| / max|jax| of the embeddings: two float32 forwards in another order,
        # 2 x the forward path's reductions (case 4), scale = max|jax| (already divided out)
        assert checked["max_rel_diff"] <= bound(terms=2 * _forward_terms(), scale=1.0)


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
        # the cached teacher outputs come from another compiled program than the fused step:
        # float32 vs float32 (case 3/4), 2 x (the teacher's forward path + the loss's class
        # sum and batch mean); scale: the metric itself, a mean of non-negative per-sample
        # terms (KL, squared distance, CE), so no cancellation. Measured: ~140 eps x value.
        assert_close(cached["metrics"][term], plain["metrics"][term],
                     terms=2 * (_forward_terms() + CLASSES + 8), what=f"{term}: ")
    assert os.listdir(tmp_path / "cache" / "teacher_cache")
    with pytest.raises(ValueError, match="cannot be cached"):
        run(base.replace(workdir=str(tmp_path / "kdc"), recipe="kd", teacher_cache=True),
            data_dir="", source=_source(), num_classes=CLASSES, val_sets=[])
