"""The pipeline's random crop (``crop_from``): a window of the resized face, shared by both
views, deterministic per (seed, epoch, record), landmarks moved with it."""
from __future__ import annotations

import numpy as np
import pytest

from kdface.data import _pipeline as pipe
from kdface.data._images import encode_image

POINTS = np.array([[5, 6], [10, 6], [8, 9], [6, 12], [10, 12]], np.float32)


def _source(n, size=16):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    records = [{"image": encode_image(raw[i], format="png"), "label": np.int64(i % 2),
                "landmarks": POINTS.copy()} for i in range(n)]
    return records, raw


def _offset(window, image):
    """The (top, left) where ``window`` sits in ``image``, by exhaustive search."""
    h, w = window.shape[:2]
    hits = [(t, l) for t in range(image.shape[0] - h + 1) for l in range(image.shape[1] - w + 1)
            if np.array_equal(image[t:t + h, l:l + w], window)]
    assert len(hits) == 1, hits
    return hits[0]


def _batch(records, seed=0, **kwargs):
    p = pipe.make_training_pipeline(records, global_batch_size=8, num_devices=4, flip=False,
                                    num_threads=0, normalize=False, shuffle=False, seed=seed,
                                    student_view="original", image_size=(12, 12), **kwargs)
    return next(iter(p))


def test_crop_is_a_window_shared_by_both_views_with_landmarks_moved():
    records, raw = _source(8)
    batch = _batch(records, crop_from=(16, 16))
    assert batch["student_image"].shape == (8, 12, 12, 3)
    offsets = []
    for row, index in enumerate(batch["index"]):
        top, left = _offset(batch["student_image"][row], raw[index])
        np.testing.assert_array_equal(batch["teacher_image"][row], batch["student_image"][row])
        # integer points minus an integer offset: exact in float32
        np.testing.assert_array_equal(batch["landmarks"][row], POINTS - [left, top])
        offsets.append((top, left))
    assert len(set(offsets)) > 1  # 25 possible windows: 8 records do not all share one
    again = _batch(records, crop_from=(16, 16))
    np.testing.assert_array_equal(again["student_image"], batch["student_image"])
    other = _batch(records, seed=1, crop_from=(16, 16))
    assert not np.array_equal(other["student_image"], batch["student_image"])


def test_without_crop_the_face_is_resized_and_crop_must_not_be_smaller():
    records, _ = _source(8)
    batch = _batch(records)
    # integer points x 0.75 (16 -> 12 px) are multiples of 1/4: exact in float32
    np.testing.assert_array_equal(batch["landmarks"][0], POINTS * 12 / 16)
    with pytest.raises(ValueError, match="crop_from"):
        _batch(records, crop_from=(10, 16))
