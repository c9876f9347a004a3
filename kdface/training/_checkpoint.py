"""Orbax checkpoints for the trainer: resume, keep-latest + keep-best, params-only teachers.

A checkpoint step directory holds three items:

* ``model``: ``{'params', 'rest'}`` — the student's weights and BatchNorm statistics. This is all a
  later run needs to use the network as a frozen teacher (loaded "params-only").
* ``optimizer``: ``{'opt_state', 'step'}``, and ``'terms'`` (``{term: {name: array}}``) when the
  recipe's loss terms carry non-gradient state (EKD's thresholds, AdaDistill's centres).
* ``meta``: JSON — the data iterator's state, the metrics of the step, the run's config.

The teacher a run distils from is never written here (frozen teachers are inputs, not state).
Saves are asynchronous; ``close()`` waits for them.

A margin head split over the devices trains as ``[E, C_pad]``, its class axis padded with zero
columns to a multiple of the run's devices (``kdface.training._placement``). Checkpoints store
the real classes, ``[E, C]`` for the weight and its optimizer slots (``head_classes``), whatever
the device count; restores read the head's class axis into the width the reader needs
(:func:`class_axis_restore`: a resume on 4 devices pads the 21 saved columns to 24 with zeros,
export and evaluate read ``[E, C]`` as saved). A term state's class axis (``class_axes``) is
stored and read the same way. Every other shape must match exactly.
"""
from __future__ import annotations

import errno
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

_policy = ocp.checkpoint_managers.preservation_policy


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the message names the latest
    intact checkpoint, which a rerun of the same command resumes from."""


def _is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a full disk: orbax and TensorStore report it as
    ENOSPC or as RESOURCE_EXHAUSTED text."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        text = str(err)
        if "No space left" in text or "RESOURCE_EXHAUSTED" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def finished_steps(directory: str) -> list[int]:
    """Steps of the checkpoints in ``directory`` whose write finished (orbax writes into a
    temporary ``<step>.orbax-checkpoint-tmp-*`` directory and renames it to ``<step>`` last)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _abstract(tree: Any) -> Any:
    """Restore targets. Leaves without a concrete sharding (e.g. from ``nnx.eval_shape``) are
    placed on this process's first device: otherwise orbax falls back to the sharding saved in
    the checkpoint, which fails ("topology mismatch") when the run that wrote it had a different
    number of devices than the one reading it (train on 4 GPUs, evaluate on a CPU)."""
    device = jax.local_devices()[0]

    def target(x):
        struct = ocp.utils.to_shape_dtype_struct(x)
        sharding = getattr(x, "sharding", None)
        if not isinstance(sharding, jax.sharding.Sharding):
            sharding = jax.sharding.SingleDeviceSharding(device)
        return jax.ShapeDtypeStruct(struct.shape, struct.dtype, sharding=sharding)

    return jax.tree.map(target, tree)


def _is_head_weight(key: str) -> bool:
    """A flat path (``flat_param_shapes``) of a margin head's weight, or of an optimizer slot of
    it (``opt_state/0/trace/network/head/weight``)."""
    return key.endswith("head/weight")


def class_axis_restore(saved: dict[str, tuple[int, ...]],
                       like: dict[str, tuple[int, ...]],
                       class_axes: frozenset[str] = frozenset()) -> bool | str:
    """Whether a checkpoint with flat shapes ``saved`` restores into ``like`` exactly (True),
    only by reading a margin head's (or a ``class_axes`` path's) class axis into another width
    (False: restore with ``strict=False``), or not at all (the first difference, in words)."""
    exact = True
    for key in sorted(set(saved) | set(like)):
        if key not in like or key not in saved:
            return (f"the checkpoint has {key} {saved[key]}, the network has none" if key in saved
                    else f"the network has {key} {like[key]}, the checkpoint has none")
        a, b = saved[key], like[key]
        if a == b:
            continue
        if (_is_head_weight(key) or key in class_axes) and len(a) == len(b) == 2 \
                and a[0] == b[0]:
            exact = False  # the class axis padded for another device count
            continue
        return f"{key}: checkpoint {a}, network {b}"
    return exact


def _item_shapes(metadata) -> dict[str, tuple[int, ...]]:
    """Flat shapes of a checkpoint item's metadata tree."""
    tree = getattr(metadata, "tree", metadata)

    out = {}

    def walk(node, path):
        if isinstance(node, dict):
            items = node.items()
        elif isinstance(node, (list, tuple)):
            items = ((str(i), v) for i, v in enumerate(node))
        else:  # an array's metadata; empty optimizer states have none
            if hasattr(node, "shape"):
                out["/".join(k for k in path if k != "value")] = tuple(node.shape)
            return
        for k, v in items:
            walk(v, path + [str(k)])
    walk(tree, [])
    return out


def _real_classes(x, classes: int):
    """A padded head weight (or slot) ``[E, C_pad]``, split on its class axis, as its first
    ``classes`` columns: split on the embedding axis when the devices divide E (an all-to-all;
    each device keeps 1/devices of it), else replicated (JAX places only evenly divided arrays).
    The sliced copy lives until orbax has read it."""
    from jax.sharding import NamedSharding, PartitionSpec
    sharding = x.sharding
    axis = sharding.spec[1] if isinstance(sharding, NamedSharding) and len(sharding.spec) > 1 \
        else None
    spec = PartitionSpec()
    if axis is not None and x.shape[0] % sharding.mesh.shape[axis] == 0:
        spec = PartitionSpec(axis, None)
    out = NamedSharding(sharding.mesh, spec) if isinstance(sharding, NamedSharding) else None
    return _slice_columns(classes, out)(x)


_SLICES: dict[Any, Any] = {}


def _slice_columns(classes: int, out_sharding):
    key = (classes, out_sharding)
    if key not in _SLICES:  # one compiled slice per (classes, placement), not one per save
        _SLICES[key] = jax.jit(lambda a: a[:, :classes], out_shardings=out_sharding)
    return _SLICES[key]


def saved_layout(tree: Any, classes: int | None, class_axes: frozenset[str] = frozenset()) -> Any:
    """``tree`` (params, optimizer state or term states) as checkpoints store it: every margin
    head weight (and slot), and every array at a ``class_axes`` path of ``tree``, wider than the
    run's ``classes`` cut to its real classes; None leaves it."""
    if classes is None:
        return tree

    def cut(path, x):
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        key = "/".join(k for k in keys if k != "value")
        if (_is_head_weight(key) or key in class_axes) and getattr(x, "ndim", 0) == 2 \
                and x.shape[1] > classes:
            return _real_classes(x, classes)
        return x
    return jax.tree_util.tree_map_with_path(cut, tree)


def _tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """Flat shapes of a tree of arrays (or ``ShapeDtypeStruct``s), paths spelled as
    :func:`_item_shapes` spells a checkpoint's (keys, indices and field names)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        out["/".join(k for k in keys if k != "value")] = tuple(getattr(leaf, "shape", ()))
    return out


def _restore_args(directory: str, step: int, likes: dict[str, Any],
                  class_axes: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``StandardRestore`` args for the items in ``likes``: strict unless only a head's (or a
    ``class_axes`` path's) class axis differs. Raises ValueError naming the first other
    difference."""
    checkpointer = ocp.StandardCheckpointer()
    try:
        saved = {name: _item_shapes(checkpointer.metadata(
            os.path.join(directory, str(step), name)).item_metadata) for name in likes}
    finally:
        checkpointer.close()
    args = {}
    for name, like in likes.items():
        verdict = class_axis_restore(saved[name], _tree_shapes(like), class_axes)
        if isinstance(verdict, str):
            raise ValueError(verdict)
        args[name] = ocp.args.StandardRestore(_abstract(like), strict=verdict)
    return args


class Checkpoints:
    """Save every K steps / at the end; keep the latest ``keep`` and the ``keep_best`` best by
    ``best_metric`` (higher is better); restore the latest to resume."""

    def __init__(self, directory: str, *, keep: int = 2, keep_best: int = 1,
                 best_metric: str | None = "val_accuracy", async_save: bool = True,
                 head_classes: int | None = None, class_axes: tuple[tuple[str, str], ...] = ()):
        self.directory = os.path.abspath(directory)
        self.head_classes = head_classes  # a padded head is saved as its real classes
        # (term, state name) of the term states with a class axis, saved like the head
        self.class_axes = frozenset(f"{term}/{name}" for term, name in class_axes)
        policies = [_policy.LatestN(n=keep)]
        if best_metric and keep_best:
            policies.append(_policy.BestN(get_metric_fn=lambda m: m[best_metric], n=keep_best,
                                          reverse=True, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_policy.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("model", "optimizer", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any],
             metrics: dict[str, float] | None = None, *, force: bool = False) -> bool:
        params = saved_layout(state["params"], self.head_classes)
        opt_state = saved_layout(state["opt_state"], self.head_classes)
        optimizer = {"opt_state": opt_state, "step": state["step"]}
        if "terms" in state:
            optimizer["terms"] = saved_layout(state["terms"], self.head_classes, self.class_axes)
        args = ocp.args.Composite(
            model=ocp.args.StandardSave({"params": params, "rest": state["rest"]}),
            optimizer=ocp.args.StandardSave(optimizer), meta=ocp.args.JsonSave(meta))
        try:
            return self.manager.save(step, args=args, metrics=metrics, force=force)
        except Exception as e:  # noqa: BLE001 (only a full disk is translated)
            self._raise_if_disk_full(e, step)
            raise

    def _raise_if_disk_full(self, err: BaseException, step: int | None) -> None:
        if not _is_disk_full(err):
            return
        done = [s for s in finished_steps(self.directory) if step is None or s != step]
        intact = (f"the latest intact checkpoint is step {done[-1]} in {self.directory}, "
                  f"which a rerun of the same command resumes from" if done else
                  f"no checkpoint was finished in {self.directory}")
        writing = f"checkpoint step {step}" if step is not None else "a checkpoint"
        raise CheckpointWriteError(f"no space left on the device while writing {writing}; "
                                   f"{intact}: free disk space and rerun") from err

    def restore(self, step: int | None, like_state: dict[str, Any]):
        """Restores ``(state, meta)`` at ``step`` (latest if None) shaped like ``like_state``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        model_like = {"params": like_state["params"], "rest": like_state["rest"]}
        opt_like = {"opt_state": like_state["opt_state"], "step": like_state["step"]}
        if "terms" in like_state:
            opt_like["terms"] = like_state["terms"]
        try:
            args = _restore_args(self.directory, step, {"model": model_like,
                                                      "optimizer": opt_like},
                                 frozenset(f"terms/{p}" for p in self.class_axes))
        except ValueError as e:
            raise ValueError(f"checkpoint {self.directory} step {step} does not fit this run's "
                             f"train state ({e})") from None
        restored = self.manager.restore(step, args=ocp.args.Composite(
            **args, meta=ocp.args.JsonRestore()))
        state = {**restored["model"], **restored["optimizer"]}
        return state, restored["meta"]

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 (an async write's error surfaces here)
            self._raise_if_disk_full(e, None)
            raise

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def load_model_weights(directory: str, like_model: dict[str, Any], *, step: int | None = None
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Params-only load of a run's ``model`` item (e.g. a frozen teacher or a student init).

    directory: a run's workdir or its ``checkpoints`` directory.

    like_model: ``{'params', 'rest'}`` of a network built with the same architecture. Returns the
    restored tree and the checkpoint's meta. Raises FileNotFoundError when there is no checkpoint
    and ValueError naming the mismatch when the architecture does not fit.
    """
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    if os.path.isdir(os.path.join(directory, "checkpoints")):  # a run's workdir
        directory = os.path.join(directory, "checkpoints")
    manager = ocp.CheckpointManager(directory, item_names=("model", "optimizer", "meta"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint found in {directory}")
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                **_restore_args(directory, step, {"model": like_model}),
                meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            # orbax's message dumps both trees (hundreds of lines); name the first difference.
            where = param_tree_difference(model_param_shapes(directory, step=step),
                                      like_model["params"])
            raise ValueError(f"checkpoint {directory} step {step} holds another network "
                             f"architecture than the one it is loaded into ({where})") from e
        return restored["model"], restored["meta"]
    finally:
        manager.close()


def model_param_shapes(directory: str, *, step: int | None = None) -> dict[str, Any]:
    """The ``params`` tree of a run's ``model`` item as nested dicts of shape tuples, read from
    the checkpoint's metadata (no array is loaded): what parts a saved network has.

    directory: a run's workdir or its ``checkpoints`` directory; step: latest if None.
    """
    directory = os.path.abspath(directory)
    if os.path.isdir(os.path.join(directory, "checkpoints")):  # a run's workdir
        directory = os.path.join(directory, "checkpoints")
    if step is None:
        steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(
            directory) else []
        if not steps:
            raise FileNotFoundError(f"no checkpoint found in {directory}")
        step = max(steps)
    checkpointer = ocp.StandardCheckpointer()
    try:
        metadata = checkpointer.metadata(os.path.join(directory, str(step), "model"))
    finally:
        checkpointer.close()
    tree = metadata.item_metadata.tree

    def shapes(node):
        if isinstance(node, dict):
            return {k: shapes(v) for k, v in node.items()}
        return tuple(getattr(node, "shape", ()))
    return shapes(tree["params"])


def flat_param_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{'a/b/kernel': shape}`` of a nested dict of shapes or of an ``nnx.State`` of arrays
    (the ``value`` level of variable states left out, so both spell paths alike)."""
    if not isinstance(tree, dict):
        from flax import nnx
        tree = nnx.to_pure_dict(tree)
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(
            tree, is_leaf=lambda x: isinstance(x, tuple) or hasattr(x, "shape")):
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        keys = [k for k in keys if k != "value"]
        out["/".join(keys)] = tuple(getattr(leaf, "shape", leaf))
    return out


def param_tree_difference(saved: dict[str, Any], like: Any) -> str:
    """The first parameter that differs between a checkpoint and a network, in words."""
    try:
        a, b = flat_param_shapes(saved), flat_param_shapes(like)
    except Exception:  # noqa: BLE001 (the summary is a courtesy; the load already failed)
        return "parameter trees differ"
    for key in sorted(set(a) | set(b)):
        if key not in b:
            return f"the checkpoint has {key} {a[key]}, the network has none"
        if key not in a:
            return f"the network has {key} {b[key]}, the checkpoint has none"
        if a[key] != b[key]:
            return f"{key}: checkpoint {a[key]}, network {b[key]}"
    return "parameter trees differ"
