"""Two-view grain pipeline: shapes and normalization, the shared flip, determinism, per-host
sharding, checkpointed iterator state, and the verification-array helper."""
from __future__ import annotations

import grain
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kdface.data import _pipeline as pipe
from kdface.data import _tfds_builders as builders
from kdface.data._degrade import LowResolutionAugment
from kdface.data._images import encode_image
from kdface.data._recordio import write_recordio
from kdface.data._verification_bin import write_verification_bin

from _tolerance import assert_close

SIZE = 112


def _source(n, *, asymmetric=False, landmarks=False, size=SIZE, seed=0):
    """In-memory records with PNG (lossless) bytes, so decoded pixels are known exactly."""
    rng = np.random.default_rng(seed)
    records, raw = [], []
    for i in range(n):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        if asymmetric:  # dark left half, bright right half: a flip is visible
            image[:, : size // 2] //= 4
            image[:, size // 2:] = 200 + image[:, size // 2:] // 5
        record = {"image": encode_image(image, format="png"), "label": np.int64(i % 4)}
        if landmarks:
            record["landmarks"] = np.array([[30, 40], [80, 41], [56, 70], [40, 90], [72, 91]],
                                           np.float32) * (size / SIZE)
        records.append(record)
        raw.append(image)
    return records, np.stack(raw)


def _take(iterator, k):
    return [next(iterator) for _ in range(k)]


def _indices(pipeline, k=None):
    it = iter(pipeline)
    batches = list(it) if k is None else _take(it, k)
    return np.concatenate([b["index"] for b in batches])


def test_shapes_dtypes_and_exact_normalization():
    records, raw = _source(8, landmarks=True)
    p = pipe.make_training_pipeline(records, global_batch_size=4, num_devices=4,
                                    student_view="original", num_threads=0)
    batch = next(iter(p))
    assert batch["teacher_image"].shape == (4, SIZE, SIZE, 3)
    assert batch["teacher_image"].dtype == np.float32
    assert batch["student_image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (4,)
    assert batch["landmarks"].shape == (4, 5, 2) and batch["landmarks"].dtype == np.float32
    for row, (index, flipped) in enumerate(zip(batch["index"], batch["flipped"])):
        image = raw[index][:, ::-1] if flipped else raw[index]
        want = (image.astype(np.float64) / 255.0 - 0.5) / 0.5
        # float32 x * f32(2/255) - 1 vs float64: 3 roundings (the constant, the product, the
        # subtraction), each <= eps32 x the product's magnitude (<= 2): terms 3, scale 2
        assert_close(batch["teacher_image"][row], want, terms=3, scale=2.0)
        assert batch["label"][row] == index % 4
    assert batch["teacher_image"].min() >= -1.0 and batch["teacher_image"].max() <= 1.0
    uint8 = next(iter(pipe.make_training_pipeline(records, global_batch_size=4, num_devices=4,
                                                  student_view="original", normalize=False,
                                                  num_threads=0)))
    assert uint8["teacher_image"].dtype == np.uint8


def test_both_views_share_the_flip():
    records, raw = _source(16, asymmetric=True, landmarks=True)
    p = pipe.make_training_pipeline(records, global_batch_size=16, num_devices=4,
                                    student_view="original", num_threads=0, seed=3)
    batch = next(iter(p))
    # Without degradation the two views are the same image, flipped or not.
    np.testing.assert_array_equal(batch["teacher_image"], batch["student_image"])
    bright_left = batch["teacher_image"][:, :, :10].mean((1, 2, 3)) > \
        batch["teacher_image"][:, :, -10:].mean((1, 2, 3))
    np.testing.assert_array_equal(bright_left, batch["flipped"])
    assert 0 < batch["flipped"].sum() < 16  # both cases occur
    # Landmarks are mirrored (x -> W - 1 - x) and left/right points swap names.
    original = records[0]["landmarks"]
    for row in np.flatnonzero(batch["flipped"]):
        want = np.stack([SIZE - 1 - original[:, 0], original[:, 1]], 1)[[1, 0, 2, 4, 3]]
        np.testing.assert_array_equal(batch["landmarks"][row], want)  # integer pixels: exact
        assert batch["landmarks"][row, 0, 0] < batch["landmarks"][row, 1, 0]
    for row in np.flatnonzero(~batch["flipped"]):
        np.testing.assert_array_equal(batch["landmarks"][row], original)

    # With every student image degraded, the student keeps the teacher's flip.
    augment = LowResolutionAugment(sizes=(16,), fraction=1.0, seed=3)
    p = pipe.make_training_pipeline(records, global_batch_size=16, num_devices=4, seed=3,
                                    student_augment=augment, num_threads=0)
    batch = next(iter(p))
    assert (batch["student_size"] == 16).all()
    assert not np.array_equal(batch["student_image"], batch["teacher_image"])
    student_bright_left = batch["student_image"][:, :, :20].mean((1, 2, 3)) > \
        batch["student_image"][:, :, -20:].mean((1, 2, 3))
    np.testing.assert_array_equal(student_bright_left, batch["flipped"])
    # Each student view is exactly the degradation of its (flipped) teacher view.
    for row in range(16):
        teacher = raw[batch["index"][row]]
        teacher = teacher[:, ::-1] if batch["flipped"][row] else teacher
        want = pipe.normalize_images(augment.lr_probe(np.ascontiguousarray(teacher), 16))
        np.testing.assert_array_equal(batch["student_image"][row], want)
    # teacher_view='low_resolution' (legacy name 'augmented'): the teacher sees exactly the
    # student's input.
    for view in ("low_resolution", "augmented"):
        p = pipe.make_training_pipeline(records, global_batch_size=16, num_devices=4, seed=3,
                                        student_augment=augment, teacher_view=view,
                                        num_threads=0)
        batch = next(iter(p))
        np.testing.assert_array_equal(batch["teacher_image"], batch["student_image"])
        assert p.get_state()["pipeline"]["teacher_view"] == "low_resolution"
    with pytest.raises(ValueError, match="needs student_view='low_resolution'"):
        pipe.make_training_pipeline(records, global_batch_size=16, num_devices=4,
                                    teacher_view="low_resolution", student_view="original")


def test_default_degradation_is_deterministic_and_threads_do_not_matter():
    records, _ = _source(20)
    kwargs = dict(global_batch_size=4, num_devices=4, seed=5, num_epochs=1)
    a = list(pipe.make_training_pipeline(records, num_threads=0, **kwargs))
    b = list(pipe.make_training_pipeline(records, num_threads=3, **kwargs))
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    sizes = np.concatenate([x["student_size"] for x in a])
    assert set(sizes) <= {0, 8, 12, 16, 20, 30} and (sizes > 0).any() and (sizes == 0).any()


def test_shuffle_is_seeded_and_each_epoch_is_a_permutation():
    records, _ = _source(12, size=8)
    kwargs = dict(global_batch_size=4, num_devices=4, num_epochs=2, student_view="original",
                  image_size=(8, 8), num_threads=0)
    first = _indices(pipe.make_training_pipeline(records, seed=1, **kwargs))
    again = _indices(pipe.make_training_pipeline(records, seed=1, **kwargs))
    other = _indices(pipe.make_training_pipeline(records, seed=2, **kwargs))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert len(first) == 24
    np.testing.assert_array_equal(np.sort(first[:12]), np.arange(12))
    np.testing.assert_array_equal(np.sort(first[12:]), np.arange(12))
    assert not np.array_equal(first[:12], first[12:])  # a new order every epoch
    ordered = _indices(pipe.make_training_pipeline(records, seed=1, shuffle=False, **kwargs))
    np.testing.assert_array_equal(ordered, np.tile(np.arange(12), 2))


def test_per_host_shards_are_disjoint_and_cover_the_data():
    records, _ = _source(10, size=8)
    seen = []
    for host in range(3):
        shard = grain.sharding.ShardOptions(shard_index=host, shard_count=3,
                                            drop_remainder=False)
        p = pipe.make_training_pipeline(records, global_batch_size=12, num_devices=4,
                                        shard_options=shard, num_epochs=1, seed=4,
                                        drop_remainder=False, student_view="original",
                                        image_size=(8, 8), num_threads=0)
        batches = list(p)
        assert all(len(b["index"]) <= 4 for b in batches)  # 12 rows / 3 hosts
        seen.append(set(np.concatenate([b["index"] for b in batches]).tolist()))
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert seen[0] | seen[1] | seen[2] == set(range(10))
    # drop_remainder trims every host to the same length so hosts step in lockstep.
    lengths = []
    for host in range(3):
        shard = grain.sharding.ShardOptions(shard_index=host, shard_count=3,
                                            drop_remainder=True)
        p = pipe.make_training_pipeline(records, global_batch_size=3, num_devices=1,
                                        shard_options=shard, num_epochs=1, seed=4,
                                        student_view="original", image_size=(8, 8),
                                        num_threads=0)
        lengths.append(len(_indices(p)))
    assert lengths == [3, 3, 3]


def test_restored_state_yields_the_same_batches():
    records, _ = _source(10)
    kwargs = dict(global_batch_size=4, num_devices=4, seed=9)
    p = pipe.make_training_pipeline(records, num_threads=2, **kwargs)
    it = iter(p)
    _take(it, 3)  # crosses an epoch boundary (10 records, batches of 4)
    state = p.get_state()
    want = _take(it, 3)
    resumed = pipe.make_training_pipeline(records, num_threads=0, **kwargs)
    got = _take(resumed.iter_from(state), 3)
    for x, y in zip(want, got):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    import json
    assert json.loads(json.dumps(state)) == state  # JSON-able, for checkpoints
    different = pipe.make_training_pipeline(records, num_threads=0, global_batch_size=4,
                                            num_devices=4, seed=10)
    with pytest.raises(ValueError, match="different pipeline"):
        different.set_state(state)


def test_argument_errors():
    records, _ = _source(4, size=8)
    with pytest.raises(ValueError, match="divisible by the number of devices"):
        pipe.make_training_pipeline(records, global_batch_size=6, num_devices=4)
    with pytest.raises(ValueError, match="teacher_view"):
        pipe.make_training_pipeline(records, global_batch_size=4, num_devices=4,
                                    teacher_view="lr")
    with pytest.raises(ValueError, match="student_view"):
        pipe.make_training_pipeline(records, global_batch_size=4, num_devices=4,
                                    student_view="blurry")
    with pytest.raises(ValueError, match="student_augment"):
        pipe.make_training_pipeline(records, global_batch_size=4, num_devices=4,
                                    student_view="original", student_augment=lambda x: x)
    with pytest.raises(ValueError, match="fewer than one batch"):
        pipe.make_training_pipeline(records, global_batch_size=8, num_devices=4)
    with pytest.raises(TypeError, match="uint8"):
        pipe.normalize_images(np.zeros((2, 2, 3), np.float32))


@pytest.mark.shards
def test_tfds_source_resized_landmarks_and_device_batches(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 56, 56, 3), dtype=np.uint8)
    write_recordio(tmp_path / "t.rec", [(i % 2, images[i]) for i in range(8)])
    points = np.tile(np.array([[10, 12], [40, 12], [25, 30], [14, 45], [38, 45]],
                              np.float32), (8, 1, 1))
    builders.write_landmarks_csv(tmp_path / "lm.csv", [str(i) for i in range(8)], points)
    builders.build_training_dataset(tmp_path / "t.rec", tmp_path / "data", name="t",
                                    landmarks=tmp_path / "lm.csv")
    source = builders.load_training_source(tmp_path / "data", "t")
    devices = jax.devices()  # 1, 4 or 8 forced CPU devices; the batch of 8 divides by each
    p = pipe.make_training_pipeline(source, global_batch_size=8, num_devices=len(devices),
                                    flip=False, num_threads=0)
    batch = next(iter(p))
    assert batch["teacher_image"].shape == (8, SIZE, SIZE, 3)
    # 56 -> 112 px: integer points x 2, exact in float32
    np.testing.assert_array_equal(batch["landmarks"], points * 2.0)
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    on_devices = pipe.device_put_batch(batch, NamedSharding(mesh, P("data")))
    assert on_devices["teacher_image"].shape == (8, SIZE, SIZE, 3)
    assert len(on_devices["label"].sharding.device_set) == len(devices)
    rows = {s.index[0].indices(8) for s in on_devices["label"].addressable_shards}
    assert sorted(rows) == [(i * 8 // len(devices), (i + 1) * 8 // len(devices), 1)
                            for i in range(len(devices))]  # one row block per device
    np.testing.assert_array_equal(np.asarray(on_devices["label"]), batch["label"])
    np.testing.assert_array_equal(np.asarray(on_devices["teacher_image"]),
                                  batch["teacher_image"])


def test_make_verification_arrays_from_bin_source_and_directory(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (20, 24, 24, 3), dtype=np.uint8)
    issame = np.arange(10) % 2 == 0
    path = tmp_path / "v.bin"
    write_verification_bin(path, images, issame, format="png")
    a, b, same, folds = pipe.make_verification_arrays(path, num_folds=5)
    np.testing.assert_array_equal(a, images[0::2])
    np.testing.assert_array_equal(b, images[1::2])
    np.testing.assert_array_equal(same, issame)
    np.testing.assert_array_equal(folds, np.arange(10) // 2)
    summary = builders.build_verification_dataset(path, tmp_path / "data", num_folds=5)
    for src in (builders.load_verification_source(tmp_path / "data", "v"), summary["path"]):
        a2, b2, same2, folds2 = pipe.make_verification_arrays(src)
        np.testing.assert_array_equal(a2, a)
        np.testing.assert_array_equal(b2, b)
        np.testing.assert_array_equal(same2, same)
        np.testing.assert_array_equal(folds2, folds)
    resized = pipe.make_verification_arrays(path, image_size=(12, 12))[0]
    assert resized.shape == (10, 12, 12, 3)


def test_worker_processes_give_the_same_stream_and_resume_exactly():
    # grain worker processes (num_workers) make whole batches in other processes; the batches,
    # their order and a resumed position must be those of the in-process pipeline.
    records, _ = _source(12)
    kwargs = dict(global_batch_size=4, num_devices=1, seed=3, num_threads=1)
    want = _take(iter(pipe.make_training_pipeline(records, **kwargs)), 6)
    p = pipe.make_training_pipeline(records, num_workers=2, **kwargs)
    it = iter(p)
    got = _take(it, 3)
    state = p.get_state()
    got += _take(it, 3)
    resumed = _take(pipe.make_training_pipeline(records, num_workers=2, **kwargs)
                    .iter_from(state), 3)
    for x, y in zip(want, got):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    for x, y in zip(want[3:], resumed):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    with pytest.raises(ValueError, match="num_workers"):
        pipe.make_training_pipeline(records, num_workers=-1, **kwargs)
