"""Identity-balanced batches: positives per anchor, epoch coverage, determinism, resume, hosts,
the three sources (in-memory, RecordIO, tfds built from .rec and the synthetic set), errors; and
the fixed vs redrawn low-resolution subset."""
from __future__ import annotations

import json
from collections import Counter

import grain
import numpy as np
import pytest
from _tolerance import assert_close

from kdface.data import _balanced as bal
from kdface.data import _pipeline as pipe
from kdface.data import _synthetic as syn
from kdface.data import _tfds_builders as builders
from kdface.data._degrade import LowResolutionAugment
from kdface.data._images import encode_image
from kdface.data._recordio import RecordIO, write_recordio

SIZE = 8
# Identity sizes that exercise every case: 1 image, fewer than K, exactly K, a multiple of K,
# one over a multiple (K = 4).
COUNTS = (1, 3, 4, 8, 5, 2, 7, 4, 1, 6)


def _labels(counts=COUNTS, *, interleave=True):
    labels = np.repeat(np.arange(len(counts)), counts)
    if interleave:  # records of one identity need not be contiguous
        labels = labels[np.random.default_rng(5).permutation(len(labels))]
    return labels


def _records(labels, size=SIZE):
    rng = np.random.default_rng(0)
    return [{"image": encode_image(rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                                   format="png"), "label": np.int64(label)} for label in labels]


def _pipeline(source, **kwargs):
    base = dict(global_batch_size=8, num_devices=1, batch_sampler="balanced",
                images_per_identity=4, image_size=(SIZE, SIZE), student_view="original",
                num_threads=0, seed=3)
    base.update(kwargs)
    return pipe.make_training_pipeline(source, **base)


def _epoch(pipeline, epochs=1):
    it = iter(pipeline)
    return [next(it) for _ in range(epochs * pipeline.batches_per_epoch)]


def _positives(labels):
    """Per row: how many other rows of the batch share its label."""
    labels = np.asarray(labels)
    return (labels[:, None] == labels[None, :]).sum(axis=1) - 1


def _assert_balanced_epoch(batches, labels, k, balanced_rows):
    """Every balanced row has >= K - 1 positives, rows come in groups of K of one identity,
    each record is visited at least once, and only repeats beyond the first are top-ups."""
    labels = np.asarray(labels)
    visits = Counter()
    for batch in batches:
        rows = batch["label"][:balanced_rows]
        np.testing.assert_array_equal(rows, labels[batch["index"][:balanced_rows]])
        assert (_positives(rows) >= k - 1).all()
        groups = rows.reshape(-1, k)
        assert (groups == groups[:, :1]).all(), groups  # whole groups of one identity
        visits.update(int(i) for i in batch["index"][:balanced_rows])
    assert set(visits) == set(range(len(labels)))  # every image at least once
    return visits


def test_balanced_epoch_has_positives_and_covers_every_image():
    labels = _labels()
    p = _pipeline(_records(labels), num_epochs=1)
    groups = sum(-(-c // 4) for c in COUNTS)  # 14 groups of 4; P = 2 identities per batch
    assert p.batches_per_epoch == -(-groups // 2) == 7
    batches = list(iter(p))  # num_epochs=1: exactly one epoch
    assert len(batches) == 7
    visits = _assert_balanced_epoch(batches, labels, 4, 8)
    # Per identity: ceil(n/K) K rows (so one with n % K == 0 shows each image once).
    per_identity = Counter()
    for index, count in visits.items():
        per_identity[int(labels[index])] += count
    assert dict(per_identity) == {i: -(-c // 4) * 4 for i, c in enumerate(COUNTS)}
    # Topped up by going round the identity: each image floor or ceil of slots / n times.
    for index, count in visits.items():
        n = COUNTS[labels[index]]
        slots = -(-n // 4) * 4
        assert slots // n <= count <= -(-slots // n), (n, count)


def test_a_last_batch_short_of_groups_is_refilled_and_coverage_holds():
    counts = (3, 4, 5)  # 1 + 1 + 2 = 4 groups; P = 3: two batches, the second refilled
    labels = _labels(counts)
    p = _pipeline(_records(labels), global_batch_size=12, num_epochs=1)
    assert p.batches_per_epoch == 2
    _assert_balanced_epoch(list(iter(p)), labels, 4, 12)


def test_uniform_part_follows_the_groups_and_is_a_permutation_stream():
    labels = _labels()
    p = _pipeline(_records(labels), global_batch_size=12, uniform_images=4)
    batches = _epoch(p, epochs=2)
    _assert_balanced_epoch(batches[:p.batches_per_epoch], labels, 4, 8)
    uniform = np.concatenate([b["index"][8:] for b in batches])
    n = len(labels)
    # The uniform rows run through whole permutations of the records, across epochs.
    for start in range(0, len(uniform) - n + 1, n):
        assert sorted(uniform[start:start + n]) == list(range(n))


def test_anchors_of_uniform_batches_rarely_have_positives_balanced_ones_always():
    # The point of the sampler: CASIA-like identities (many images each), batch 32.
    labels = np.repeat(np.arange(60), 20)
    source = _records(labels)
    uniform = _pipeline(source, batch_sampler="uniform", global_batch_size=32)
    balanced = _pipeline(source, global_batch_size=32)
    with_positive = lambda b: np.mean(_positives(b["label"]) >= 1)
    assert np.mean([with_positive(b) for b in _epoch(uniform)]) < 0.6
    assert all((_positives(b["label"]) >= 3).all() for b in _epoch(balanced))


def test_repeats_draw_their_own_flip():
    labels = np.arange(16)  # one image per identity: every group is one image four times
    batches = _epoch(_pipeline(_records(labels), global_batch_size=64, flip=True))
    flips = np.concatenate([b["flipped"] for b in batches]).reshape(-1, 4)
    # With the copy ignored the four flips of a group would always agree.
    assert not (flips == flips[:, :1]).all()


def test_order_is_seeded_and_epochs_differ():
    records = _records(_labels())
    first = _epoch(_pipeline(records), epochs=2)
    again = _epoch(_pipeline(records), epochs=2)
    other = _epoch(_pipeline(records, seed=4), epochs=2)
    index = lambda batches: np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(index(first), index(again))
    assert not np.array_equal(index(first), index(other))
    half = len(index(first)) // 2
    assert not np.array_equal(index(first)[:half], index(first)[half:])  # epoch 1 is redrawn


def test_resume_mid_epoch_continues_identically():
    records = _records(_labels())
    kwargs = dict(uniform_images=4, global_batch_size=12, flip=True)
    p = _pipeline(records, num_threads=2, **kwargs)
    it = iter(p)
    for _ in range(p.batches_per_epoch - 2):  # the continuation crosses an epoch boundary
        next(it)
    state = p.get_state()
    assert json.loads(json.dumps(state)) == state
    want = [next(it) for _ in range(5)]
    got_it = _pipeline(records, **kwargs).iter_from(state)
    for x in want:
        y = next(got_it)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    with pytest.raises(ValueError, match="different pipeline"):
        _pipeline(records, batch_sampler="uniform", global_batch_size=12).set_state(state)
    with pytest.raises(ValueError, match="different pipeline"):
        _pipeline(records, global_batch_size=12, flip=True).set_state(state)


def test_host_shares_concatenate_to_the_single_process_batch():
    records = _records(_labels())
    kwargs = dict(global_batch_size=16, uniform_images=4, flip=True)
    whole = _epoch(_pipeline(records, **kwargs), epochs=2)
    for hosts in (2, 4):
        shares = []
        for host in range(hosts):
            shard = grain.sharding.ShardOptions(shard_index=host, shard_count=hosts,
                                                drop_remainder=True)
            p = _pipeline(records, shard_options=shard, **kwargs)
            assert p.batches_per_epoch == len(whole) // 2
            shares.append(_epoch(p, epochs=2))
        for step, batch in enumerate(whole):
            for key in batch:
                np.testing.assert_array_equal(
                    np.concatenate([s[step][key] for s in shares]), batch[key])


def test_worker_processes_make_the_same_balanced_stream():
    records = _records(_labels())
    want = _epoch(_pipeline(records, num_threads=1))
    got = _epoch(_pipeline(records, num_threads=1, num_workers=2))
    for x, y in zip(want, got):
        np.testing.assert_array_equal(x["index"], y["index"])


def test_recordio_source_labels_from_headers_only(tmp_path, monkeypatch):
    labels = _labels()
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (len(labels), SIZE, SIZE, 3), dtype=np.uint8)
    write_recordio(tmp_path / "t.rec", zip(labels.tolist(), images), image_format="png")
    rec = RecordIO(tmp_path / "t.rec")
    reads = []
    original = RecordIO.read_encoded
    monkeypatch.setattr(RecordIO, "read_encoded",
                        lambda self, i: reads.append(i) or original(self, i))
    np.testing.assert_array_equal(bal.record_labels(rec), labels)
    assert not reads  # the order's labels came from the headers, no image was read
    p = _pipeline(rec, num_epochs=1)
    batches = list(iter(p))
    _assert_balanced_epoch(batches, labels, 4, 8)
    for batch in batches[:2]:  # the pixels are the record's own
        for row, index in enumerate(batch["index"]):
            want = (images[index].astype(np.float32) / 255.0 - 0.5) / 0.5
            # (x / 255 - 0.5) / 0.5 in float32: three rounded operations on values <= 1
            assert_close(batch["teacher_image"][row][:, ::-1]
                         if batch["flipped"][row] else batch["teacher_image"][row],
                         want, terms=3, scale=1.0)


def test_tfds_source_built_from_recordio_caches_its_labels(tmp_path, monkeypatch):
    labels = _labels()
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (len(labels), SIZE, SIZE, 3), dtype=np.uint8)
    write_recordio(tmp_path / "t.rec", zip(labels.tolist(), images), image_format="png")
    builders.build_training_dataset(tmp_path / "t.rec", tmp_path / "data", name="t")
    source = builders.load_training_source(tmp_path / "data", "t")
    tfds_labels = np.array([int(source[i]["label"]) for i in range(len(source))])
    assert sorted(tfds_labels) == sorted(labels)
    p = _pipeline(source, num_epochs=1)
    _assert_balanced_epoch(list(iter(p)), tfds_labels, 4, 8)
    cache = tmp_path / "data" / "kdface_training" / "t" / "1.0.0" / "labels-train.npy"
    np.testing.assert_array_equal(np.load(cache), tfds_labels)
    # A second run reads the cached labels, not the records.
    again = builders.load_training_source(tmp_path / "data", "t")
    monkeypatch.setattr(type(again), "__getitems__",
                        lambda self, keys: pytest.fail("records read again"))
    np.testing.assert_array_equal(bal.record_labels(again), tfds_labels)


def test_synthetic_set_through_the_trainers_pipeline(tmp_path):
    from kdface.training._config import TrainConfig
    from kdface.training._run import _pipeline as run_pipeline
    out = syn.make_synthetic_dataset(tmp_path / "syn", num_identities=6, images_per_identity=3,
                                     num_verification_identities=4, num_verification_pairs=4,
                                     num_folds=2, data_dir=tmp_path / "data")
    source = builders.load_training_source(tmp_path / "data", out["train"]["name"])
    config = TrainConfig(workdir=str(tmp_path / "w"), batch_size=8, batch_sampler="balanced",
                         images_per_identity=4, input_size=(32, 32), seed=1)
    batches = run_pipeline(config, source, "low_resolution", "original")
    labels = bal.record_labels(source)
    first = [next(batches) for _ in range(batches.pipeline.batches_per_epoch)]
    _assert_balanced_epoch(first, labels, 4, 8)
    assert batches.pipeline.batches_per_epoch == 3  # 6 identities x 1 group, 2 per batch
    # --lr_subset reaches the student view: fixed degrades the same images in epoch 0 and 1.
    for subset, same in (("fixed", True), ("redrawn", False)):
        it = run_pipeline(config.replace(lr_subset=subset), source, "low_resolution",
                          "original")
        sizes = []
        for _ in range(2):
            epoch = [next(it) for _ in range(3)]
            sizes.append({int(i): int(s) for b in epoch
                          for i, s in zip(b["index"], b["student_size"])})
        assert set(sizes[0]) == set(sizes[1]) == set(range(18))
        assert any(sizes[0].values())  # 32 px faces: the 8, 12, 16, 20, 30 px views apply
        assert (sizes[0] == sizes[1]) == same


def test_argument_errors():
    records = _records(_labels())
    with pytest.raises(ValueError, match="multiple of images_per_identity 4"):
        _pipeline(records, global_batch_size=10)
    with pytest.raises(ValueError, match="images_per_identity must be an int >= 2"):
        _pipeline(records, images_per_identity=1)
    with pytest.raises(ValueError, match="uniform_images must be"):
        _pipeline(records, uniform_images=8)
    with pytest.raises(ValueError, match="at least 16 identities; the source has 10"):
        _pipeline(records, global_batch_size=64)
    with pytest.raises(ValueError, match="shuffle=False"):
        _pipeline(records, shuffle=False)
    with pytest.raises(ValueError, match="batch_sampler must be one of"):
        _pipeline(records, batch_sampler="stratified")
    with pytest.raises(ValueError, match="one entry per record"):
        _pipeline(records, labels=np.zeros(3, np.int64))
    from kdface.training._config import TrainConfig
    with pytest.raises(ValueError, match="multiple of images_per_identity"):
        TrainConfig(workdir="w", batch_sampler="balanced", batch_size=130)
    with pytest.raises(ValueError, match="relation_group_size 6"):
        TrainConfig(workdir="w", batch_sampler="balanced", batch_size=12, relation_group_size=6)
    with pytest.raises(ValueError, match="lr_subset must be one of"):
        TrainConfig(workdir="w", lr_subset="once")
    TrainConfig(workdir="w", batch_sampler="uniform", batch_size=130)  # K only binds balanced


# --- the low-resolution subset: fixed or redrawn ----------------------------------------------

def test_fixed_lr_subset_degrades_the_same_images_every_epoch():
    fixed = LowResolutionAugment(seed=2, subset="fixed")
    redrawn = LowResolutionAugment(seed=2)
    n = 2000
    for augment, same in ((fixed, True), (redrawn, False)):
        epoch0 = np.array([augment.decide(epoch=0, index=i) for i in range(n)])
        epoch1 = np.array([augment.decide(epoch=1, index=i) for i in range(n)])
        assert abs(np.mean(epoch0 > 0) - 0.4) < 0.04  # the paper's 40 %
        assert np.array_equal(epoch0, epoch1) == same
        assert np.array_equal(epoch0 > 0, epoch1 > 0) == same
    # Redrawn keeps its draws: the default's decisions are the ones kdface always made.
    rng = np.random.default_rng(np.random.SeedSequence([0x4C52, 2, 1, 7]))
    want = 0 if rng.random() >= 0.4 else redrawn.sizes[int(rng.integers(5))]
    assert redrawn.decide(epoch=1, index=7) == want
    with pytest.raises(ValueError, match="subset must be one of"):
        LowResolutionAugment(subset="once")


@pytest.mark.parametrize("subset", ["fixed", "redrawn"])
def test_pipeline_lr_subset_across_epochs(subset):
    records = _records(np.arange(40) // 2, size=32)
    p = pipe.make_training_pipeline(
        records, global_batch_size=8, num_devices=1, image_size=(32, 32), num_threads=0,
        student_augment=LowResolutionAugment(seed=1, subset=subset, sizes=(8, 12)), seed=1)
    it = iter(p)
    sizes = [{}, {}]
    for epoch in range(2):
        for _ in range(p.batches_per_epoch):
            batch = next(it)
            sizes[epoch].update(zip(batch["index"].tolist(), batch["student_size"].tolist()))
    assert set(sizes[0]) == set(sizes[1]) == set(range(40))
    degraded = [{i for i, s in d.items() if s} for d in sizes]
    assert degraded[0]
    assert (degraded[0] == degraded[1]) == (subset == "fixed")


def test_transfer_verification_flagfile_trains_on_balanced_batches():
    from test_recipes_papers import config_from_flagfile
    config = config_from_flagfile("transfer_verification.flags")
    assert (config.batch_sampler, config.images_per_identity, config.uniform_images) == (
        "balanced", 4, 0)
    assert config.batch_size % config.images_per_identity == 0
    for name in ("kd.flags", "pwr.flags", "transfer_classification.flags"):
        assert config_from_flagfile(name).batch_sampler == "uniform"  # the others unchanged


def test_killed_then_resumed_balanced_run_equals_uninterrupted(tmp_path):
    # The trainer's resume (checkpointed iterator state) on the balanced order: 32 images of 4
    # identities, batches of 2 identities x 4, 4 batches per epoch; the restart at step 3 is
    # mid-epoch and its continuation crosses into epoch 1.
    import jax
    from flax import nnx
    from kdface.distill import build_student
    from kdface.training._checkpoint import load_model_weights
    from kdface.training._run import run
    from _train_helpers import CLASSES, TINY, encoded_source, tiny_config

    source = encoded_source()
    balanced = dict(batch_sampler="balanced", images_per_identity=4, save_every=3)
    whole = tiny_config(tmp_path / "whole", steps=6, **balanced)
    run(whole, data_dir="", source=source, num_classes=CLASSES, val_sets=[])
    part = tiny_config(tmp_path / "part", steps=3, **balanced)
    run(part, data_dir="", source=source, num_classes=CLASSES, val_sets=[])
    run(part.replace(steps=6), data_dir="", source=source, num_classes=CLASSES, val_sets=[])
    student = build_student("sphereface_custom", num_classes=CLASSES, head="cosface",
                            rngs=nnx.Rngs(1), backbone_options=TINY)
    _, params, rest = nnx.split(student, nnx.Param, ...)
    like = {"params": params, "rest": rest}
    a, meta_a = load_model_weights(whole.workdir, like)
    b, meta_b = load_model_weights(part.workdir, like)
    assert meta_a["step"] == meta_b["step"] == 6
    assert meta_a["data"] == meta_b["data"]
    assert meta_a["data"]["pipeline"]["batch_sampler"] == "balanced"
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_uniform_default_keeps_its_order_and_flips():
    # The uniform sampler is what it was: epoch e is permutation(default_rng([seed, 11, e])) of
    # the records, each flipped when default_rng([seed, 12, e, record]).random() < 0.5.
    records = _records(_labels())
    n, seed = len(records), 3
    p = _pipeline(records, batch_sampler="uniform", flip=True, seed=seed)
    assert "batch_sampler" not in p.get_state()["pipeline"]  # old states still load
    it = iter(p)
    batches = [next(it) for _ in range(-(-2 * n // 8))]
    # The stream runs on across epochs: positions [e n, (e + 1) n) are epoch e.
    index = np.concatenate([b["index"] for b in batches])[:2 * n]
    flipped = np.concatenate([b["flipped"] for b in batches])[:2 * n]
    for epoch in range(2):
        want = np.random.default_rng([seed, 11, epoch]).permutation(n)
        got = index[epoch * n:(epoch + 1) * n]
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(
            flipped[epoch * n:(epoch + 1) * n],
            [np.random.default_rng([seed, 12, epoch, int(i)]).random() < 0.5 for i in got])
