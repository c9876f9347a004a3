"""An in-memory, resumable batch iterator over arrays (tests, small sets, cached features).

Yields the trainer's batch dicts from arrays held in memory. The order is a seeded permutation
per epoch, so ``get_state()`` -> ``{'epoch', 'position', 'seed'}`` is enough to resume exactly.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


class ArrayBatches:
    """Iterator of ``{'student_image', 'teacher_image', 'label', 'index'}`` batches.

    images: [N, H, W, 3] float32 (already normalized) or uint8; labels [N] int.
    student_transform(images, indices, epoch) optionally builds the student view from the
    teacher view (e.g. low-resolution degradation); without it both views are the same array.
    batch_size is the global batch; with ``process_count > 1`` each process yields its own
    contiguous ``batch_size / process_count`` rows of every global batch (multi-host).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                 seed: int = 0, shuffle: bool = True,
                 student_transform: Callable[[np.ndarray, np.ndarray, int], np.ndarray] | None
                 = None, process_index: int = 0, process_count: int = 1):
        if len(images) != len(labels):
            raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) differ in N")
        if batch_size > len(images):
            raise ValueError(f"batch_size {batch_size} exceeds the {len(images)} samples")
        self.images, self.labels = images, np.asarray(labels, np.int32)
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} "
                             f"processes")
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.process_index, self.process_count = process_index, process_count
        self.student_transform = student_transform
        self.epoch, self.position = 0, 0

    @property
    def num_examples(self) -> int:
        """Training-set size (what ``--epochs`` is resolved against)."""
        return len(self.images)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.images))
        return np.random.default_rng((self.seed, epoch)).permutation(len(self.images))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position + self.batch_size > len(self.images):  # drop the remainder
            self.epoch, self.position = self.epoch + 1, 0
        idx = self._order(self.epoch)[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        local = self.batch_size // self.process_count
        idx = idx[self.process_index * local:(self.process_index + 1) * local]
        teacher = self.images[idx]
        student = (teacher if self.student_transform is None
                   else self.student_transform(teacher, idx, self.epoch))
        return {"student_image": student, "teacher_image": teacher,
                "label": self.labels[idx], "index": idx.astype(np.int64)}

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def set_state(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"iterator state is for seed {state['seed']}, not {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
