"""Teacher cache: the frozen teacher's embeddings of its deterministic view, computed once.

When the teacher sees the original image (recipes with ``teacher_view='original'``), its output
is a function of (record, flipped) only. The cache stores the teacher's *embedding* of every
record, as stored and mirrored (``[N, 2, E]``, float16 by default), on disk and memory-mapped
(``kdface.training._embedding_store``); the train step recomputes the logits a term needs from
the teacher head's weights (a ``[B, E] x [E, C]`` product, tiny next to the backbone), so no
``[N, C]`` array ever exists: MS1M (5.8 M records, 85 k classes) needs 11.9 GB of float16
embeddings on disk instead of 4 TB of float32 logits in memory.

The cache is computed with the teacher's forward pass sharded over every local device (one
jitted call per global batch); in a multi-host job each process computes and stores the
records it reads (its contiguous slice of the dataset), so no process waits for another. Its
key covers the teacher (run and checkpoint step, or the imported file), the dataset (size and
the records' own fingerprint), the input size and the storage dtype; generations of one run
share it. It is written atomically and a damaged file is named and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kdface._progress import progress
from kdface.data import decode_image
from kdface.training._config import TrainConfig
from kdface.training._embedding_store import BadStoreError, build_store, open_store
from kdface.training._networks import build_teacher
from kdface.training._plan import FitPlan
from kdface.training._step import normalize_on_device


class TeacherCache:
    """``embedding`` [N_host, 2, E] (memory-mapped), axis 1 = (as stored, flipped); rows are
    this process's records ``first .. first + N_host - 1``."""

    def __init__(self, embedding: np.ndarray, *, first: int = 0):
        self.embedding, self.first = embedding, int(first)

    def attach(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Adds ``teacher_embedding`` rows for the batch's records (``index``, ``flipped``)."""
        if "index" not in batch:
            raise ValueError("the teacher cache needs batches with 'index' (record index)")
        index = np.asarray(batch["index"]) - self.first
        if index.size and (index.min() < 0 or index.max() >= len(self.embedding)):
            raise ValueError(f"records {index.min() + self.first}..{index.max() + self.first} "
                             f"are outside this process's cached records {self.first}.."
                             f"{self.first + len(self.embedding) - 1}")
        flipped = np.asarray(batch.get("flipped", np.zeros(len(index), bool))).astype(np.int64)
        out = dict(batch)
        out["teacher_embedding"] = np.asarray(self.embedding[index, flipped])
        out.pop("teacher_image", None)
        return out

    @classmethod
    def for_run(cls, plan: FitPlan, source, *, batch_size: int = 64,
                records: tuple[int, int] | None = None) -> "TeacherCache":
        """Opens the cache for the planned run's teacher and data, computing it first if needed.

        ``records``: the ``(start, stop)`` slice this process reads (default: its even share of
        the dataset, as the training pipeline splits it; all of it on one host).
        """
        config = plan.config
        reason = plan.recipe.uncacheable_reason()
        if reason is not None:
            raise ValueError(reason)
        start, stop = records if records is not None else host_records(len(source))
        directory = os.path.join(cache_root(config),
                                 cache_key(config, source, start, stop))
        try:
            return cls(open_store(directory), first=start)
        except FileNotFoundError:
            pass
        except BadStoreError as e:
            print(f"teacher cache {e.problem}; rebuilding it", flush=True)
        teacher = build_teacher(plan)
        rows = teacher_embedding_rows(teacher, source, config.input_size, first=start,
                                      batch_size=batch_size)
        width = teacher.backbone.embedding_size
        item = np.dtype(config.teacher_cache_dtype).itemsize
        size_gb = (stop - start) * 2 * width * item / 1e9
        print(f"teacher cache: computing {stop - start} records x 2 views x {width} "
              f"({config.teacher_cache_dtype}, {size_gb:.3g} GB) -> {directory}", flush=True)
        t0 = time.perf_counter()
        bar = progress(total=stop - start, desc="teacher cache", unit="img",
                       enabled=config.progress)
        try:
            store = build_store(directory, num_rows=stop - start, width=width,
                                dtype=config.teacher_cache_dtype, rows=rows,
                                chunk=rows.chunk, progress=bar.update,
                                description=cache_description(config, source, start, stop))
        finally:
            bar.close()
        written_gb = os.path.getsize(os.path.join(directory, "embedding.npy")) / 1e9
        print(f"teacher cache: {written_gb:.3g} GB written in {time.perf_counter() - t0:.1f} s",
              flush=True)
        return cls(store, first=start)


def host_records(n: int) -> tuple[int, int]:
    """The records this process reads: the training pipeline's contiguous split of ``n`` over
    the processes, wide enough for both of its rules (with and without ``drop_remainder``)."""
    count, index = jax.process_count(), jax.process_index()
    per, extra = divmod(n, count)
    return index * per, (index + 1) * per + min(index + 1, extra)


def cache_root(config: TrainConfig) -> str:
    """Where this run's caches live (generations of one run pass their parent's)."""
    return config.teacher_cache_dir or os.path.join(config.workdir, "teacher_cache")


def _latest_step(directory: str) -> int | None:
    checkpoints = os.path.join(directory, "checkpoints")
    if not os.path.isdir(checkpoints):
        return None
    steps = [int(d) for d in os.listdir(checkpoints) if d.isdigit()]
    return max(steps) if steps else None


def _source_fingerprint(source) -> str:
    """A cheap fingerprint of the records' content: their count and a few records' labels and
    image bytes (first, middle, last), so a rebuilt dataset of the same size is told apart."""
    digest = hashlib.sha256(str(len(source)).encode())
    for i in sorted({0, len(source) // 2, len(source) - 1}):
        record = source[i]
        digest.update(str(int(np.asarray(record["label"]).reshape(-1)[0])).encode())
        image = record["image"]
        digest.update(image if isinstance(image, bytes) else np.asarray(image).tobytes())
    return digest.hexdigest()[:16]


def cache_description(config: TrainConfig, source, start: int, stop: int) -> dict:
    teacher = config.teacher_checkpoint
    return {"teacher": config.teacher,
            "teacher_options": json.loads(json.dumps(config.teacher_options, default=list)),
            "teacher_checkpoint": os.path.abspath(teacher) if teacher else None,
            "teacher_step": _latest_step(teacher) if teacher else None,
            "records": [start, stop], "source": _source_fingerprint(source),
            "input_size": list(config.input_size), "dtype": config.teacher_cache_dtype}


def cache_key(config: TrainConfig, source, start: int, stop: int) -> str:
    description = cache_description(config, source, start, stop)
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode())
    return f"{digest.hexdigest()[:16]}_{start}-{stop}"


class teacher_embedding_rows:
    """``rows(a, b) -> float32 [b - a, 2, E]``: the eval-mode teacher's embeddings of records
    ``first + a .. first + b - 1``, as stored and mirrored, computed on every local device."""

    def __init__(self, teacher, source, input_size, *, first: int = 0, batch_size: int = 64):
        teacher.eval()
        graphdef, state = nnx.split(teacher.backbone)
        devices = jax.local_device_count()
        self.batch = max(devices, -(-batch_size // devices) * devices)
        self.chunk = self.batch * 16
        mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                             devices=jax.local_devices())
        self.sharding = NamedSharding(mesh, P("data"))
        self.state = jax.device_put(state, NamedSharding(mesh, P()))
        self.source, self.input_size, self.first = source, tuple(input_size), int(first)
        self.pool = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)))

        @jax.jit
        def forward(state, images):
            images = normalize_on_device(images)
            backbone = nnx.merge(graphdef, state, copy=True)
            both = jnp.concatenate([images, images[:, :, ::-1]], axis=0)
            emb = backbone(both)
            n = images.shape[0]
            return jnp.stack([emb[:n], emb[n:]], axis=1)

        self.forward = forward

    def _image(self, i: int) -> np.ndarray:
        image = decode_image(self.source[self.first + i]["image"], name=f"record {self.first + i}")
        if image.shape[:2] != self.input_size:
            image = cv2.resize(image, self.input_size[::-1], interpolation=cv2.INTER_AREA)
        return image

    def __call__(self, a: int, b: int) -> np.ndarray:
        out = []
        for s in range(a, b, self.batch):
            e = min(b, s + self.batch)
            images = np.stack(list(self.pool.map(self._image, range(s, e))))
            pad = self.batch - len(images)
            if pad:  # the last batch: pad to the compiled shape, drop the rows after
                images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
            placed = jax.device_put(images, self.sharding)
            out.append(np.asarray(self.forward(self.state, placed))[:e - s])
        return np.concatenate(out).astype(np.float32)


__all__ = ["TeacherCache", "cache_key", "host_records", "teacher_embedding_rows"]
