"""One process of the multi-host training test (run by tests/test_training_multihost.py).

usage: multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR OUT_NPZ
With NUM_PROCESSES == 1 it trains alone on 4 CPU devices; otherwise each process has
4 / NUM_PROCESSES CPU devices and they join through jax.distributed on localhost.
"""
import sys

import jax

pid, nproc, port, workdir, out = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4],
                                  sys.argv[5])
jax.config.update("jax_num_cpu_devices", 4 // nproc)
if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc,
                               process_id=pid)

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from kdface.distill import build_student  # noqa: E402
from kdface.training import ArrayBatches, fit  # noqa: E402
from kdface.training._checkpoint import load_model_weights  # noqa: E402

from _train_helpers import CLASSES, TINY, labelled_images, tiny_config  # noqa: E402

images, labels = labelled_images(32)
config = tiny_config(workdir)
batches = ArrayBatches(images, labels, batch_size=8, process_index=pid, process_count=nproc)
summary = fit(config, batches, num_classes=CLASSES)
# Every process restores (collective in multi-host orbax), process 0 writes the result.
student = build_student("sphereface_custom", num_classes=CLASSES, head="cosface", rngs=nnx.Rngs(1),
                        backbone_options=TINY)
_, params, rest = nnx.split(student, nnx.Param, ...)
weights, meta = load_model_weights(workdir, {"params": params, "rest": rest})
if pid == 0:
    leaves = [np.asarray(x) for x in jax.tree.leaves(weights["params"])]
    np.savez(out, loss=summary["metrics"]["loss"], step=meta["step"],
             **{f"p{i}": leaf for i, leaf in enumerate(leaves)})
print("done", pid, summary["metrics"]["loss"], flush=True)
