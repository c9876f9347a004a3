"""Test helpers for the trainer: a tiny SphereFace student and images it can learn from.

Shared by the trainer, evaluator, ONNX-export and multi-host tests (``multihost_worker.py``
imports it from its own directory).
"""
from __future__ import annotations

import numpy as np

from kdface.training import TrainConfig

HW = (16, 16)
TINY = {"channels": (4, 8, 8, 8), "units": (0, 1, 0, 0), "embedding_size": 8, "input_size": HW}
CLASSES = 4


def tiny_config(workdir, **changes) -> TrainConfig:
    """A few CosFace steps of the tiny student on 8-image batches; ``changes`` override."""
    base = dict(workdir=str(workdir), student="sphereface_custom", student_options=TINY,
                head="cosface", margin_scale=16.0, margin=0.1, input_size=HW, batch_size=8,
                steps=4, learning_rate=0.05, schedule="constant", save_every=2, log_every=1,
                async_checkpoints=False, progress=False)
    base.update(changes)
    return TrainConfig(**base)


def labelled_images(n: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``[n, *HW, 3]`` float32 Gaussian images whose mean depends on the label (``i % CLASSES``),
    so that training has something to learn."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % CLASSES
    images = rng.normal(size=(n, *HW, 3)).astype(np.float32) * 0.5
    images += labels[:, None, None, None].astype(np.float32) * 0.3
    return images, labels


def encoded_source(n: int = 32, hw: tuple[int, int] = HW, seed: int = 1) -> list[dict]:
    """An in-memory training source (what ``kdface.training._run.run`` reads): encoded uint8
    images whose brightness depends on the label, with 5 random landmarks each."""
    from kdface.data import encode_image
    rng = np.random.default_rng(seed)
    out = []
    for label in np.arange(n) % CLASSES:
        image = (rng.random((*hw, 3)) * 80 + 40 + 30 * label).clip(0, 255).astype(np.uint8)
        out.append({"image": encode_image(image), "label": int(label),
                    "landmarks": rng.random((5, 2)).astype(np.float32) * min(hw)})
    return out


def tiny_teacher(workdir) -> str:
    """Trains the tiny CosFace network for 2 steps in ``workdir`` (a teacher for KD tests);
    returns the workdir."""
    from kdface.training import ArrayBatches, fit
    images, labels = labelled_images()
    fit(tiny_config(workdir, steps=2), ArrayBatches(images, labels, batch_size=8),
        num_classes=CLASSES)
    return str(workdir)
