r"""The teacher cache at the users' scale: a million records, a 100k-class head, bounded memory.

  python -m benchmarks.teacher_cache_scale --records=1000000 --classes=100000 \
      --write_md=benchmarks/TEACHER_CACHE_SCALE.md

Records are generated on the fly (a few hundred distinct JPEG-encoded 16x16 faces, repeated, with
label ``i % classes``), so the dataset never exists in memory or on disk. A tiny teacher is
trained for a few steps on it (``scratch``, margin head of ``--classes`` classes), then ``kd_im``
and ``pwr`` (PWR alone) train a few cached steps: the first builds the embeddings cache over
every record (both views), the second reuses it. Reported: the cache file's size against
N x 2 x E x itemsize (and the N x 2 x C x 4 bytes a logits cache would have needed), build
time, and the process's peak *anonymous* memory (RssAnon: everything but file-backed pages, so
the memory-mapped cache does not count) sampled every 0.2 s.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time

from absl import app, flags, logging

flags.DEFINE_integer("records", 1_000_000, "Generated training records.")
flags.DEFINE_integer("classes", 100_000, "Identities (head classes).")
flags.DEFINE_integer("steps", 3, "Cached training steps per recipe.")
flags.DEFINE_string("workdir", None, "Where runs and the cache go (default: a temp dir).")
flags.DEFINE_string("write_md", None, "Write the results as markdown here.")
F = flags.FLAGS

HW = (16, 16)
TINY = {"channels": (4, 8, 8, 8), "units": (0, 1, 0, 0), "embedding_size": 16,
        "input_size": HW}


class GeneratedRecords:
    """``source[i] -> {'image': JPEG bytes, 'label': i % classes}`` for ``n`` records."""

    def __init__(self, n: int, classes: int, distinct: int = 512):
        import cv2
        import numpy as np
        rng = np.random.default_rng(0)
        self.n, self.classes = n, classes
        self.images = [cv2.imencode(".jpg", (rng.random((*HW, 3)) * 255).astype(np.uint8))[1]
                       .tobytes() for _ in range(distinct)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return {"image": self.images[i % len(self.images)], "label": i % self.classes}


class AnonMemory:
    """Peak RssAnon (bytes) of this process, sampled in a thread."""

    def __init__(self, every: float = 0.2):
        self.peak, self.every, self._stop = 0, every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from kdface.training import TrainConfig
    from kdface.training import run
    root = F.workdir or tempfile.mkdtemp(prefix="kdface_cache_scale_")
    source = GeneratedRecords(F.records, F.classes)
    common = dict(student="sphereface_custom", student_options=TINY, input_size=HW,
                  head="cosface", margin_scale=16.0, margin=0.1, batch_size=64,
                  learning_rate=0.01, schedule="constant", save_every=10_000, log_every=1,
                  async_checkpoints=False, progress=False, flip=True)
    results = {"records": F.records, "classes": F.classes, "embedding": TINY["embedding_size"],
               "machine": f"{os.cpu_count()} CPU cores", "workdir": root}
    with AnonMemory() as memory:
        t0 = time.perf_counter()
        teacher = os.path.join(root, "teacher")
        run(TrainConfig(workdir=teacher, recipe="scratch", steps=2, **common), data_dir="",
            source=source, num_classes=F.classes, val_sets=[])
        results["teacher_s"] = time.perf_counter() - t0
        cache_dir = os.path.join(root, "teacher_cache")
        for recipe, extra in (("kd_im", {"feature_loss": "normalized_l2"}),
                              ("pwr", {"kd_loss": "pwr"})):
            t0 = time.perf_counter()
            summary = run(TrainConfig(workdir=os.path.join(root, recipe), recipe=recipe,
                                      teacher_checkpoint=teacher, teacher_cache=True,
                                      teacher_cache_dir=cache_dir, steps=F.steps,
                                      **common, **extra),
                          data_dir="", source=source, num_classes=F.classes, val_sets=[])
            results[f"{recipe}_s"] = time.perf_counter() - t0
            results[f"{recipe}_loss"] = summary["metrics"]["loss"]
    stores = [d for d in os.listdir(cache_dir) if not d.endswith(".partial")]
    path = os.path.join(cache_dir, stores[0], "embedding.npy")
    results["cache_bytes"] = os.path.getsize(path)
    results["cache_data_bytes"] = F.records * 2 * TINY["embedding_size"] * 2
    results["logits_cache_bytes"] = F.records * 2 * F.classes * 4
    results["peak_anon_bytes"] = memory.peak
    print(json.dumps(results, indent=1))
    if F.write_md:
        gib = 2.0 ** 30
        lines = [
            "# Teacher cache at scale",
            "",
            f"`python -m benchmarks.teacher_cache_scale --records={F.records} "
            f"--classes={F.classes}` on {results['machine']} (shared).",
            "",
            "| what | figure |", "|---|---|",
            f"| records x classes | {F.records:,} x {F.classes:,} |",
            f"| cache file | {results['cache_bytes']:,} bytes = N x 2 x E x 2 "
            f"({results['cache_data_bytes']:,}) + .npy header |",
            f"| a float32 logits cache (before) | {results['logits_cache_bytes'] / 1e9:,.0f} GB |",
            f"| peak anonymous memory (RssAnon) | {results['peak_anon_bytes'] / gib:.2f} GiB |",
            f"| tiny teacher, 2 steps | {results['teacher_s']:.0f} s |",
            f"| kd_im: build the cache over every record + {F.steps} cached steps | "
            f"{results['kd_im_s']:.0f} s |",
            f"| pwr: reuse the cache + {F.steps} cached steps | {results['pwr_s']:.0f} s |",
            "",
        ]
        with open(F.write_md, "w") as f:
            f.write("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
