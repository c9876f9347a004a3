"""The images per second one core of this host makes with a flagfile's input pipeline, for the
compile-only plan (issue 23: the input each host must sustain "next to the pipeline's measured
rate per core").

The pipeline measured is the trainer's own (``_run._pipeline``: the recipe's views, the flip, the
low-resolution student view with its sizes and fraction, the crop, the batch sampler), run in
this process with no grain threads and OpenCV on one thread, so that all of its work is on the
calling thread. The rate is images per CPU-second of that thread (``time.thread_time``), not
per wall second: a busy, shared machine slows the wall clock, not the CPU time one image needs.
Not the process's CPU time either: after the plan's compile, libtpu's own threads keep running
in the process, and ``time.process_time`` counted them (1,573 img/s for kd_im.flags measured
after a v5e:8x8 compile, 3,270 in a process that compiled nothing).
It reads the flagfile's training set when it is built in ``--data_dir`` (its JPEGs are what the
pod will decode), else a small synthetic set written through insightface's ``.rec`` format
(112 x 112 JPEG q95, the format MS1M ships in) into a temporary directory. The figure is this
host's CPU, not the pod hosts'; it says roughly how many cores per host the input needs.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from typing import Any

from kdface._platform import cpu_model

# the synthetic stand-in: enough identities for a balanced sampler's batches
_SYNTHETIC = {"num_identities": 16, "images_per_identity": 8, "num_verification_identities": 20,
              "num_verification_pairs": 20}
# one untimed batch, then at least this many and this much CPU time
_BATCH, _MIN_BATCHES, _MIN_SECONDS = 32, 4, 0.5


def _rate(config, source, recipe) -> float:
    import cv2

    from kdface.training._run import _pipeline
    # a batch the flagfile's sampler and groups accept: EKD's uniform part and its balanced
    # part (32 + 32), PWR's relation group (92)
    batch = (2 * config.uniform_images if config.uniform_images
             else config.relation_group_size or _BATCH)
    small = config.replace(batch_size=batch, data_workers=0)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        batches = _pipeline(small, source, recipe.student_view,
                            recipe.teacher_view or "original", num_threads=0, num_devices=1)
        next(batches)
        start, made = time.thread_time(), 0
        while made < _MIN_BATCHES or time.thread_time() - start < _MIN_SECONDS:
            next(batches)
            made += 1
        seconds = time.thread_time() - start
    finally:
        cv2.setNumThreads(threads)
    return made * batch / max(seconds, 1e-9)


def measured_input_rate(config, recipe, *, data_dir: str | None) -> dict[str, Any]:
    """``{'images_per_core_s': rate, 'measured_on': what and where}`` for ``config``'s pipeline
    (``recipe``: its views), or ``{'measured_on': why not}`` when it cannot be run."""
    import tensorflow_datasets as tfds
    from absl import logging as absl_logging

    from kdface.data import load_dataset_metadata, load_training_source, make_synthetic_dataset
    tfds.disable_progress_bar()  # the plan's output is its table
    absl_logging.set_verbosity(absl_logging.ERROR)
    name = os.path.splitext(os.path.basename(config.train_data))[0]
    try:
        built = data_dir and load_dataset_metadata(data_dir, "kdface_training", name)
    except Exception:  # not built here
        built = None
    where = f"{cpu_model()}, images per CPU-second"
    try:
        if built:
            rate = _rate(config, load_training_source(data_dir, name), recipe)
            return {"images_per_core_s": rate, "measured_on": f"{name} (built here); {where}"}
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
            make_synthetic_dataset(tmp, seed=0, **_SYNTHETIC)
            rate = _rate(config, load_training_source(os.path.join(tmp, "tfds"), "synth_train"),
                         recipe)
        return {"images_per_core_s": rate,
                "measured_on": f"synthetic 112x112 JPEGs ({name} is not built here); {where}"}
    except Exception as e:  # the plan stands without it; say why
        return {"measured_on": f"not measured ({type(e).__name__}: {str(e)[:120]})"}
