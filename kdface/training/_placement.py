"""Where the train state lives on the mesh: the parameters replicated, except a margin head's class
axis split over the ``data`` devices (``--shard_head``), and the optimizer slots of a split weight
split with it."""
from __future__ import annotations

import numpy as np
import jax
from absl import logging

from kdface.distill import DistillStudent
from kdface.training._config import TrainConfig


def student_shardings(config: TrainConfig, student: DistillStudent, mesh, num_classes: int):
    """The params' placement: replicated, except a margin head's class axis split over the
    devices with ``--shard_head`` (on, or auto from ``--shard_head_min_classes`` classes when
    the class count divides evenly); None when nothing is split."""
    from kdface.models import shard_margin_heads
    devices = mesh.shape["data"]
    if config.shard_head == "off" or devices == 1:
        return None
    if config.shard_head == "auto" and (num_classes < config.shard_head_min_classes
                                        or num_classes % devices):
        if num_classes >= config.shard_head_min_classes:
            logging.warning("--shard_head=auto: %d classes do not divide over %d devices; the "
                            "head stays replicated", num_classes, devices)
        return None
    try:
        return shard_margin_heads(student, mesh, axis="data")
    except ValueError as e:
        raise ValueError(f"--shard_head=on: {e}") from None


def place_state(state, param_shardings, optimizer, replicated):
    """The train state on the mesh: replicated, or with the head (and its optimizer slots)
    split as ``param_shardings`` says."""
    if param_shardings is None:
        return jax.device_put(state, replicated)
    params = jax.device_put(state["params"], param_shardings)
    # Optimizer slots (momentum, Adam moments) of a split weight are split the same way; the
    # head weight [E, C] is the only parameter of its shape.
    split = {tuple(p.shape): p.sharding for p in jax.tree.leaves(params)
             if not p.sharding.is_fully_replicated}
    slots = jax.tree.map(lambda a: split.get(tuple(np.shape(a)), replicated), state["opt_state"])
    return {"params": params, "rest": jax.device_put(state["rest"], replicated),
            "opt_state": jax.device_put(state["opt_state"], slots),
            "step": jax.device_put(state["step"], replicated)}
