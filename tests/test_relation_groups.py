"""Relation groups are a sample count, not a device count (issue 24).

nikitin2020 (PWR): "Batch size is fixed to 552(92 × 6)" — the authors' 6-GPU runs related the
92 samples on each GPU. kdface spells that ``--relation_group_size=92``: groups of 92 consecutive
samples of the global batch, whatever the number of devices, so the same flagfile trains the
same loss on one GPU, six or a pod, and a run resumed onto another device count keeps its loss.
"""
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from _tolerance import assert_close
from _train_helpers import CLASSES, HW, TINY, tiny_config
from kdface.distill import build_recipe, build_student
from kdface.training import (StepConfig, TrainConfig, init_health, init_state, make_train_step,
                             split_teacher)

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "kdface", "configs")


def test_pwr_flagfile_relates_92_samples_in_six_groups():
    flags = dict(line.strip()[2:].split("=", 1) for line in open(os.path.join(CONFIGS,
                 "pwr.flags")) if line.startswith("--") and "=" in line)
    assert flags["relation_group_size"] == "92" and flags["batch_size"] == "552"
    config = TrainConfig(workdir="unused", batch_size=552, relation_group_size=92)
    assert config.relation_groups == 6
    assert TrainConfig(workdir="unused", batch_size=552).relation_groups == 1  # the whole batch


@pytest.mark.parametrize("size", [-1, 5])
def test_a_group_size_that_does_not_divide_the_batch_is_refused(size):
    with pytest.raises(ValueError, match=r"relation_group_size .* must be 0 .* or divide "
                                         r"batch_size 16 \(--relation_group_size, --batch_size\)"):
        TrainConfig(workdir="unused", batch_size=16, relation_group_size=size)


def test_a_workdir_trained_per_device_is_not_resumed_with_another_loss(tmp_path):
    from kdface.training._plan import check_workdir
    config = tiny_config(tmp_path / "old")
    os.makedirs(config.workdir)
    with open(os.path.join(config.workdir, "config.json"), "w") as f:
        f.write('{"relation_scope": "device"}')
    with pytest.raises(ValueError, match="--relation_scope=device .* resume with "
                                         "--relation_group_size="):
        check_workdir(config)
    check_workdir(config.replace(relation_group_size=4))  # the user says the group size


def _step_loss(devices, relation_groups: int) -> dict[str, float]:
    """One pwr (RKD-D) step's metrics on a mesh over ``devices``."""
    config = tiny_config("unused", recipe="pwr", kd_loss="rkd_d", alpha=1.0, batch_size=16)
    recipe = build_recipe("pwr", config)
    student = build_student("sphereface_custom", num_classes=CLASSES, head="cosface",
                            rngs=nnx.Rngs(0), backbone_options=TINY, logit_scale=16.0)
    teacher = build_student("sphereface_custom", num_classes=CLASSES, head="cosface",
                            rngs=nnx.Rngs(1), backbone_options=TINY, logit_scale=16.0).network
    opt = optax.sgd(0.05)
    graphdef, state = init_state(student, opt)
    teacher_def, teacher_state = split_teacher(teacher)
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    rep = NamedSharding(mesh, P())
    step = jax.jit(make_train_step(recipe, graphdef, teacher_def, opt,
                                   StepConfig(relation_groups=relation_groups)))
    rng = np.random.default_rng(0)
    batch = {"student_image": rng.normal(size=(16, *HW, 3)).astype(np.float32),
             "label": (np.arange(16) % CLASSES).astype(np.int32)}
    _, _, metrics = step(jax.device_put(state, rep), jax.device_put(init_health(recipe), rep),
                         jax.device_put(teacher_state, rep),
                         jax.device_put(batch, NamedSharding(mesh, P("data"))))
    return {k: float(v) for k, v in metrics.items()}


@pytest.mark.shards
def test_the_grouped_loss_is_the_same_on_one_device_and_on_all():
    groups = TrainConfig(workdir="unused", batch_size=16, relation_group_size=4).relation_groups
    one = _step_loss(jax.devices()[:1], groups)
    every = _step_loss(jax.devices(), groups)
    whole = _step_loss(jax.devices(), 1)
    # float32 vs float32 in another partitioning (both sides carry error: 2x). Reductions on the
    # path of the loss: TINY's 3x3 convs over 3, 4, 8, 8, 8, 8 input channels (27 + 36 + 4 * 72),
    # the 8-wide embedding layer, the 8-wide distances, RKD-D's 6 pairs per group twice (the mean
    # distance, then the mean loss), the mean over 4 groups and over the 16 samples' CosFace.
    terms = 2 * (27 + 36 + 4 * 72 + 8 + 8 + 6 + 6 + 4 + 16)
    assert_close(every["rkd_d"], one["rkd_d"], terms=terms, what="rkd_d: ")
    assert_close(every["loss"], one["loss"], terms=terms, what="loss: ")
    # ... and the grouping takes effect: relating 4 groups of 4 is not relating all 16.
    assert abs(whole["rkd_d"] - every["rkd_d"]) > 1e-3 * abs(every["rkd_d"])
