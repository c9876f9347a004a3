"""Teacher cache: the frozen teacher's outputs on its deterministic view, computed once.

When the teacher sees the original image (recipes with ``teacher_view='original'``), its
embedding and logits are a function of (record, flipped) only, so they are computed once per
record and orientation, stored in ``workdir/teacher_cache/``, and attached to each batch by its
``index`` / ``flipped`` fields; the step then skips the teacher's forward pass. A teacher that
sees a random view (the ``kd`` recipe's low-resolution view) cannot be cached, and asking for it
is refused.
"""
from __future__ import annotations

import hashlib
import json
import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdface.distill._recipes import Recipe
from kdface.training._config import TrainConfig


class TeacherCache:
    """``embedding`` [N, 2, E] and ``logits`` [N, 2, C] float32, axis 1 = (as stored, flipped)."""

    def __init__(self, embedding: np.ndarray, logits: np.ndarray):
        self.embedding, self.logits = embedding, logits

    def attach(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Adds ``teacher_embedding`` / ``teacher_logits`` rows for the batch's records."""
        if "index" not in batch:
            raise ValueError("the teacher cache needs batches with 'index' (record index)")
        index = np.asarray(batch["index"])
        flipped = np.asarray(batch.get("flipped", np.zeros(len(index), bool))).astype(np.int64)
        out = dict(batch)
        out["teacher_embedding"] = self.embedding[index, flipped]
        out["teacher_logits"] = self.logits[index, flipped]
        out.pop("teacher_image", None)
        return out

    @classmethod
    def for_run(cls, config: TrainConfig, recipe: Recipe, source, num_classes: int,
                *, batch_size: int = 64) -> "TeacherCache":
        """Loads the cache from ``workdir/teacher_cache`` or computes it with the teacher."""
        reason = recipe.uncacheable_reason()
        if reason is not None:
            raise ValueError(reason)
        key = hashlib.sha256(json.dumps(
            [config.teacher, config.teacher_options,
             os.path.abspath(config.teacher_checkpoint) if config.teacher_checkpoint else None,
             _latest_step(config.teacher_checkpoint) if config.teacher_checkpoint else None,
             len(source), list(config.input_size)],
            sort_keys=True, default=str).encode()).hexdigest()[:16]
        directory = os.path.join(config.workdir, "teacher_cache")
        paths = [os.path.join(directory, f"{key}_{n}.npy") for n in ("embedding", "logits")]
        if all(os.path.exists(p) for p in paths):
            return cls(np.load(paths[0]), np.load(paths[1]))
        from kdface.training._loop import build_teacher
        teacher = build_teacher(config, num_classes, recipe)
        embedding, logits = compute_teacher_outputs(teacher, source, config.input_size,
                                                    batch_size=batch_size)
        if jax.process_index() == 0:
            os.makedirs(directory, exist_ok=True)
            np.save(paths[0], embedding)
            np.save(paths[1], logits)
        return cls(embedding, logits)


def _latest_step(directory: str) -> int | None:
    checkpoints = os.path.join(directory, "checkpoints")
    if not os.path.isdir(checkpoints):
        return None
    steps = [int(d) for d in os.listdir(checkpoints) if d.isdigit()]
    return max(steps) if steps else None


def compute_teacher_outputs(teacher, source, input_size, *, batch_size: int = 64):
    """Runs the eval-mode teacher over every record, unflipped and flipped."""
    from kdface.data import decode_image
    from kdface.training._loop import normalize_images
    teacher.eval()
    graphdef, state = nnx.split(teacher)

    @jax.jit
    def forward(state, images):
        out = nnx.merge(graphdef, state, copy=True)(images)
        return out["embedding"], out["logits"]

    n = len(source)
    emb, logits = None, None
    for start in range(0, n, batch_size):
        images = []
        for i in range(start, min(n, start + batch_size)):
            image = decode_image(source[i]["image"], name=f"record {i}")
            if image.shape[:2] != tuple(input_size):
                image = cv2.resize(image, tuple(input_size)[::-1], interpolation=cv2.INTER_AREA)
            images.append(image)
        batch = normalize_images(np.stack(images))
        for flip in (0, 1):
            view = batch[:, :, ::-1] if flip else batch
            e, lg = forward(state, jnp.asarray(np.ascontiguousarray(view)))
            if emb is None:
                emb = np.zeros((n, 2, e.shape[-1]), np.float32)
                logits = np.zeros((n, 2, lg.shape[-1]), np.float32)
            emb[start:start + len(images), flip] = np.asarray(e)
            logits[start:start + len(images), flip] = np.asarray(lg)
    return emb, logits
