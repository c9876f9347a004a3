"""`python -m kdface.train ... --plan_topology=v5e:2x2` (issue 23): the step the command trains,
compiled for a TPU slice from this CPU host with libtpu (`make test` installs it in
<venv>/tpu-site), without data, a device or a write; the plan's fields come from the compiled
program (memory_analysis / cost_analysis), and a command the plan refuses is refused in one line.
"""
import json
import os
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_SITE = os.path.join(sys.prefix, "tpu-site")
# The demo's networks (kdface/demo.py), kd_im with a teacher forward, 100 classes.
DEMO = ["--recipe=kd_im", "--student=sphereface_custom",
        "--student_options=channels=(8,16,32,64),units=(0,1,0,0),embedding_size=64,"
        "batch_norm=True", "--teacher=sphereface_custom",
        "--teacher_options=channels=(16,32,64,128),units=(1,1,1,1),embedding_size=64,"
        "batch_norm=True", "--input_size=32,32", "--batch_size=64", "--head=cosface",
        "--feature_loss=mk_mmd", "--train_data=synth_train", "--plan_examples=2000"]


def _plan(tmp_path, *flags):
    if not os.path.isdir(os.path.join(TPU_SITE, "libtpu")):
        pytest.fail(f"libtpu is not installed in {TPU_SITE}: `make test` installs it "
                    f"(.ci/install-libtpu {sys.executable})")
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)  # CPU-only flags (ISA caps, device counts) mean nothing here
    done = subprocess.run(
        [sys.executable, "-m", "kdface.train", f"--workdir={tmp_path / 'run'}",
         f"--teacher_checkpoint={tmp_path / 'no_teacher_here'}", *DEMO, *flags],
        env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    return done


def test_the_demo_step_compiles_for_v5e_and_its_plan_is_read_from_the_program(tmp_path):
    done = _plan(tmp_path, "--plan_topology=v5e:2x2", "--plan_classes=100")
    assert done.returncode == 0, done.stderr[-3000:]
    fields = json.loads(done.stdout.strip().splitlines()[-1])
    assert fields["chip"] == "v5e" and fields["devices"] == 4 and fields["hosts"] == 1
    assert fields["batch_per_chip"] == 16 and fields["fits"] is True
    assert fields["capacity_gib"] == 16.0
    # parameters + optimizer state are a part of the arguments, which are a part of the total
    assert 0 < fields["state_gib"] < fields["arguments_gib"] <= fields["total_gib"] < 16.0
    assert fields["flops_per_step"] > 0 and fields["bytes_per_step"] > 0
    assert fields["step_seconds"] >= 0.5 * fields["roofline_seconds"] > 0
    # the compiler's per-op cycles: a step time of their own and the three costliest ops
    assert fields["cycles_seconds"] > 0 and len(fields["top_ops"]) == 3
    assert all(op["ms"] > 0 and op["source"] for op in fields["top_ops"])
    assert "| costliest op 1 (compiler cycles) |" in done.stdout
    # data parallelism all-reduces the student's gradients: collectives the cycles leave out
    assert fields["collective_bytes"] > 0 and fields["collective_seconds"] > 0
    assert "| collectives (not in the compiler's cycles) |" in done.stdout
    assert fields["images_per_s_slice"] == pytest.approx(4 * fields["images_per_s_chip"])
    assert fields["epoch_seconds"] == pytest.approx(2000 / fields["images_per_s_slice"])
    assert "| per-chip HBM: total |" in done.stdout and "img/s per chip (estimate)" in done.stdout
    # the input pipeline this command trains with, run on one core here (synth_train is not
    # built in the test's data dir: synthetic JPEGs stand in), beside the rate each host needs
    assert fields["input_per_core"] > 0 and "synthetic 112x112 JPEGs" in fields[
        "input_measured_on"]
    assert fields["input_cores_per_host"] == pytest.approx(
        fields["images_per_s_host"] / fields["input_per_core"])
    assert "| input pipeline, one core here (measured) |" in done.stdout
    assert not os.path.exists(tmp_path / "run")  # a plan writes nothing


def _kd_im_on_synthetic(tmp_path):
    """A tiny kd_im config, its recipe, and the data dir where its synth_train is built."""
    from _train_helpers import tiny_config

    from kdface.data import make_synthetic_dataset
    from kdface.distill import build_recipe
    make_synthetic_dataset(tmp_path, num_identities=4, images_per_identity=8,
                           num_verification_identities=20, num_verification_pairs=20)
    config = tiny_config(tmp_path / "run", train_data="synth_train", flip=True)
    recipe = build_recipe("kd_im", config.replace(recipe="kd_im", feature_loss="mk_mmd"))
    return config, recipe, str(tmp_path / "tfds")


def test_the_input_rate_is_measured_on_the_flagfiles_own_data_when_it_is_built(tmp_path):
    from kdface.training._input_rate import measured_input_rate
    config, recipe, data_dir = _kd_im_on_synthetic(tmp_path)
    got = measured_input_rate(config, recipe, data_dir=data_dir)
    assert got["images_per_core_s"] > 0
    assert got["measured_on"].startswith("synth_train (built here)")
    # a pipeline that cannot be made says why instead of failing the plan
    view = types.SimpleNamespace(student_view="sketch", teacher_view=None)
    bad = measured_input_rate(config, view, data_dir=data_dir)
    assert "images_per_core_s" not in bad and bad["measured_on"].startswith("not measured")


def test_the_input_rate_counts_the_pipelines_cpu_time_not_other_threads(tmp_path):
    # After the plan's compile, libtpu's threads keep running in the process; the process's CPU
    # time counted them (kd_im.flags after a v5e:8x8 compile: 1,573 img/s, 3,270 without). A
    # thread hashing outside the GIL through the measurement stands in for them: with the
    # process's CPU time the rate falls to about half (both threads get the same cores), with
    # the pipeline thread's own it stays; 0.75 leaves room for cache and scheduling noise.
    import hashlib
    import threading

    from kdface.training._input_rate import measured_input_rate
    config, recipe, data_dir = _kd_im_on_synthetic(tmp_path)
    quiet = measured_input_rate(config, recipe, data_dir=data_dir)["images_per_core_s"]
    stop, hashed = threading.Event(), []
    block = bytes(1 << 22)  # hashlib releases the GIL for data this long

    def busy():
        while not stop.is_set():
            hashlib.sha256(block).digest()
            hashed.append(1)

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        loaded = measured_input_rate(config, recipe, data_dir=data_dir)["images_per_core_s"]
    finally:
        stop.set()
        worker.join()
    assert len(hashed) > 10  # the other thread did run through the measurement
    assert loaded > 0.75 * quiet, (loaded, quiet)


def test_the_demo_step_compiles_for_eight_h100s_without_a_gpu(tmp_path):
    # XLA:GPU from the device description (kdface/training/_gpu_targets.py) with JAX's CUDA
    # plugin (`make test` installs it in <venv>/gpu-site); its compiler reports no cost
    # analysis, so flops and bytes are the unpartitioned program's over the 8 devices.
    if not os.path.isdir(os.path.join(sys.prefix, "gpu-site", "jax_plugins")):
        pytest.fail(f"the CUDA plugin is not installed in {sys.prefix}/gpu-site: `make test` "
                    f"installs it (.ci/install-gpu-compiler {sys.executable})")
    done = _plan(tmp_path, "--plan_topology=h100:8", "--plan_classes=100")
    assert done.returncode == 0, done.stderr[-3000:]
    fields = json.loads(done.stdout.strip().splitlines()[-1])
    assert fields["chip"] == "h100" and fields["devices"] == 8 and fields["hosts"] == 1
    assert fields["batch_per_chip"] == 8 and fields["fits"] is True
    assert fields["capacity_gib"] == pytest.approx(84_978_434_048 / 2**30)
    assert 0 < fields["state_gib"] < fields["arguments_gib"] <= fields["total_gib"]
    assert fields["cost_source"] == "unpartitioned HLO / devices"
    assert fields["flops_per_step"] > 0 and fields["estimate"].startswith("roofline")
    assert "(unpartitioned HLO / devices)" in done.stdout
    two_hosts = _plan(tmp_path, "--plan_topology=h100:2x8x1", "--plan_classes=100")
    assert two_hosts.returncode != 0 and "h100:2x8" in two_hosts.stderr


def test_a_command_the_plan_refuses_is_refused_in_one_line(tmp_path):
    done = _plan(tmp_path, "--plan_topology=v5e:2x2", "--plan_classes=100", "--batch_size=66")
    assert done.returncode != 0
    assert "kdface.train: error:" in done.stderr and "not divisible by the 4" in done.stderr
    unknown = _plan(tmp_path, "--plan_topology=v9x:2x2", "--plan_classes=100")
    assert unknown.returncode != 0 and "'v9x' is not one of" in unknown.stderr
    no_classes = _plan(tmp_path, "--plan_topology=v5e:2x2")
    assert no_classes.returncode == 2 and "--plan_classes" in no_classes.stderr


def test_ms1m_classes_shard_the_head_over_four_chips_padded(tmp_path):
    # MS1M's 85,742 identities do not divide over 4 chips: --shard_head=auto (from 50k classes)
    # pads the head to 85,744 columns, 21,436 per chip, instead of keeping it replicated.
    fields = {}
    for mode in ("auto", "off"):
        done = _plan(tmp_path, "--plan_topology=v5e:2x2", "--plan_classes=85742",
                     f"--shard_head={mode}")
        assert done.returncode == 0, done.stderr[-3000:]
        fields[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    assert fields["auto"]["head_sharded"] is True and fields["off"]["head_sharded"] is False
    # the teacher's margin head (its forward runs in the step) is placed the same way
    assert fields["auto"]["teacher_head_sharded"] is True
    assert fields["off"]["teacher_head_sharded"] is False
    # the state per chip: the same but the head weight and its momentum, [64, 85,742] replicated
    # against [64, 21,436] per chip (exact: the state's bytes are summed from its shardings)
    saved = 2 * 64 * 4 * (85_742 - 85_744 // 4) / 2**30
    assert fields["off"]["state_gib"] - fields["auto"]["state_gib"] == pytest.approx(saved,
                                                                                     rel=1e-9)


@pytest.mark.parametrize("recipe_flags", [
    # Huang et al. 2022 (EKD): the rank loss on half-balanced global batches (the demo's 32 + 32)
    ("--recipe=ekd", "--head=arcface", "--batch_sampler=balanced", "--uniform_images=32",
     "--images_per_identity=4"),
    # Boutros et al. 2024 (AdaDistill): ArcFace against class centres kept as the term's state
    ("--recipe=adadistill_arc", "--head=arcface")])
def test_the_newer_methods_plan_for_v5e_too(tmp_path, recipe_flags):
    # the relational and stateful terms compile for the TPU slice as they train: the centres'
    # state sharded with the head, EKD's thresholds as running state, the global-batch ranks
    done = _plan(tmp_path, "--plan_topology=v5e:2x2", "--plan_classes=100", *recipe_flags)
    assert done.returncode == 0, done.stderr[-3000:]
    fields = json.loads(done.stdout.strip().splitlines()[-1])
    assert fields["fits"] is True and fields["flops_per_step"] > 0
    assert fields["batch_per_chip"] == 16 and fields["cycles_seconds"] > 0
    recipe = recipe_flags[0].split("=", 1)[1]
    assert f"| recipe, classes | {recipe}, 100 |" in done.stdout  # the flag later in argv won
