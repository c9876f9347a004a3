"""Two processes on localhost train together (jax.distributed, gloo CPU collectives) and end
with the same parameters as one process with the same 4 devices and the same global batch."""
import os
import socket
import subprocess
import sys

import numpy as np

from _tolerance import assert_close

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)
    return env


def test_two_processes_agree_with_one(tmp_path):
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), "2", port,
                               str(tmp_path / "multi"), str(tmp_path / "multi.npz")],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    single = subprocess.run([sys.executable, WORKER, "0", "1", port, str(tmp_path / "single"),
                             str(tmp_path / "single.npz")], env=_env(), capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, (single.stdout + single.stderr)[-3000:]
    multi = np.load(tmp_path / "multi.npz")
    one = np.load(tmp_path / "single.npz")
    assert int(multi["step"]) == int(one["step"]) == 4
    # The same program over the same 4 devices; only the cross-process all-reduce (gloo) sums
    # the devices' partial gradients in another order. The rule (tests/_tolerance.py), both
    # sides float32: per step, the 4-device all-reduce and the update's own rounding (5 terms),
    # over the 4 steps, against each tensor's magnitude; the loss adds the batch mean's 8 terms.
    steps, devices, batch = 4, 4, 8
    assert_close(multi["loss"], one["loss"], terms=2 * (batch + steps * (devices + 1)),
                 what="loss: ")
    keys = [k for k in one.files if k.startswith("p")]
    assert keys and sorted(keys) == sorted(k for k in multi.files if k.startswith("p"))
    for k in keys:
        assert_close(multi[k], one[k], terms=2 * steps * (devices + 1), what=f"param {k}: ")
