"""Where the train state lives on the mesh: the parameters replicated, except a margin head's class
axis split over the ``data`` devices (``--shard_head``), and the optimizer slots of a split weight
split with it; the frozen teacher's margin head is split the same way.

A class count the devices do not divide is padded with zero columns to the next multiple
(``kdface.models.padded_class_count``: MS1M's 85,742 classes become 85,744 on 4 chips, 85,760 on
64). The padding columns never reach a loss (the head drops their cosines), so they get no
gradient and stay zero. Checkpoints store the real classes (``_checkpoint``): a resume on another
device count pads them again, export and evaluate read ``[E, C]``.

A loss term's state with a class axis (``TermState.class_axis``, e.g. AdaDistill's centres) is
placed the same way: split with the head, padded to the same columns, saved unpadded.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import jax
from jax.sharding import NamedSharding, PartitionSpec

from kdface.distill import DistillStudent, Recipe, StateShapes


@dataclasses.dataclass(frozen=True)
class HeadPlacement:
    """The plan's head placement: margin heads with at least ``min_classes`` classes are split
    over the ``devices`` of the ``data`` axis (padded to a multiple of them)."""
    devices: int
    min_classes: int

    def columns(self, num_classes: int) -> int:
        """The weight's columns for a head of ``num_classes``: padded when it is split."""
        from kdface.models import padded_class_count
        if num_classes < self.min_classes:
            return num_classes
        return padded_class_count(num_classes, self.devices)


def head_placement(shard_head: str, min_classes: int, num_classes: int | None,
                   devices: int) -> HeadPlacement | None:
    """``--shard_head`` as a placement: ``off`` or one device keeps every head replicated (None);
    ``on`` splits every margin head; ``auto`` splits those from ``min_classes`` classes, on any
    device count (padding where the count does not divide). None also when the run's
    ``num_classes`` is below the threshold: nothing would be split."""
    if shard_head == "off" or devices == 1:
        return None
    threshold = 1 if shard_head == "on" else int(min_classes)
    if num_classes is not None and num_classes < threshold:
        return None
    return HeadPlacement(devices=devices, min_classes=threshold)


def student_shardings(head: HeadPlacement | None, student: DistillStudent, mesh):
    """The params' placement under the plan's ``head``: replicated, except a margin head's
    (padded) class axis split over the devices; None when nothing is split. Pads the student's
    head weight in place: call it before ``nnx.split``."""
    from kdface.models import shard_margin_heads
    if head is None:
        return None
    _check_mesh(head, mesh)
    return shard_margin_heads(student, mesh, axis="data", min_classes=head.min_classes)


def teacher_shardings(head: HeadPlacement | None, teacher, mesh, *, cached: bool):
    """The placement of the frozen teacher's state as ``split_teacher(teacher, cached=cached)``
    gives it: its margin head split like the student's (3.8 GiB replicated on every chip at 2 M
    classes otherwise), everything else replicated; None when nothing is split."""
    from kdface.models import MarginHead, shard_margin_heads
    if head is None or not isinstance(getattr(teacher, "head", None), MarginHead):
        return None
    if teacher.head.num_classes < head.min_classes:
        return None
    _check_mesh(head, mesh)
    module = teacher.head if cached else teacher
    return shard_margin_heads(module, mesh, axis="data", min_classes=head.min_classes,
                              variables=...)


def _check_mesh(head: HeadPlacement, mesh) -> None:
    if mesh.shape["data"] != head.devices:
        raise ValueError(f"the head placement is for {head.devices} devices, the mesh has "
                         f"{mesh.shape['data']}")


def class_sharding(head: HeadPlacement | None, mesh, classes: int):
    """Where a class axis of ``classes`` lives: split over ``data`` as the margin head's weight
    (``P(None, 'data')``), or None (replicated) when the placement splits no head that size."""
    if head is None or classes < head.min_classes:
        return None
    _check_mesh(head, mesh)
    return NamedSharding(mesh, PartitionSpec(None, "data"))


def term_state_shapes(head: HeadPlacement | None, classes: int,
                      embedding_size: int) -> StateShapes:
    """The shapes the recipe's term states are built from: a class axis as wide as the head's
    weight under this placement (padded when split)."""
    columns = head.columns(classes) if head is not None else classes
    return StateShapes(embedding_size=int(embedding_size), classes=int(classes),
                       columns=int(columns))


def term_shardings(recipe: Recipe, terms, split, replicated):
    """The placement of ``terms`` (``{term: {name: array}}``): the class axes as ``split`` (a
    sharding, or None for replicated), everything else replicated."""
    class_axes = set(recipe.class_axis_states())
    return {name: {leaf: split if split is not None and (name, leaf) in class_axes
                   else replicated for leaf in state}
            for name, state in terms.items()}


def place_state(state, param_shardings, optimizer, replicated, terms_placement=None):
    """The train state on the mesh: replicated, or with the head (and its optimizer slots)
    split as ``param_shardings`` says; term states as ``terms_placement`` says (replicated when
    None)."""
    placed = {}
    if "terms" in state:
        placed["terms"] = jax.device_put(state["terms"], terms_placement or replicated)
    if param_shardings is None:
        rest = {k: v for k, v in state.items() if k != "terms"}
        return {**jax.device_put(rest, replicated), **placed}
    params = jax.device_put(state["params"], param_shardings)
    slots = slot_shardings(params, state["opt_state"], replicated)
    return {"params": params, "rest": jax.device_put(state["rest"], replicated),
            "opt_state": jax.device_put(state["opt_state"], slots),
            "step": jax.device_put(state["step"], replicated), **placed}


def slot_shardings(params, opt_state, replicated):
    """Optimizer slots (momentum, Adam moments) of a split weight are split the same way; the
    (padded) head weight [E, C_pad] is the only parameter of its shape. ``params`` hold placed
    arrays or ``ShapeDtypeStruct``s with shardings."""
    split = {tuple(p.shape): p.sharding for p in jax.tree.leaves(params)
             if not p.sharding.is_fully_replicated}
    return jax.tree.map(lambda a: split.get(tuple(np.shape(a)), replicated), opt_state)
