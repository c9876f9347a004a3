"""The accelerator-grade loop: no host sync in steady state, health checked at log/eval/save
steps, the embeddings-only teacher cache, the LR view on the device, the sharded head."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdface.data import encode_image
from kdface.training import ArrayBatches, NonFiniteLossError, fit
from kdface.training._loop import check_health
from kdface.training._run import run

from _tolerance import assert_close
from _train_helpers import CLASSES, HW, TINY, labelled_images, tiny_config


def _step_terms(batch: int, classes: int = CLASSES) -> int:
    """The longest chain of float32 reductions behind one SGD step of the TINY net (case 4 of
    tests/_tolerance.py): the forward path (k*k*C_in per 3x3 conv summed over depth, the FC,
    the head's norm and cosine), the backward path through the same layers, the stem's
    weight-gradient reduction (batch x its 8x8 output positions), the softmax and batch mean."""
    c_in, side, path = 3, HW[0], 0
    for c, units in zip(TINY["channels"], TINY["units"]):
        path += 9 * c_in + units * 2 * 9 * c
        c_in, side = c, side // 2
    path += side * side * c_in + 2 * TINY["embedding_size"]
    return 2 * path + batch * (HW[0] // 2) * (HW[1] // 2) + classes + batch


def _source(n=32):
    rng = np.random.default_rng(1)
    return [{"image": encode_image((rng.random((*HW, 3)) * 80 + 40 + 30 * (i % CLASSES))
                                   .clip(0, 255).astype(np.uint8)), "label": i % CLASSES}
            for i in range(n)]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    run(tiny_config(tmp / "teacher", steps=3), data_dir="", source=_source(),
        num_classes=CLASSES, val_sets=[])
    return str(tmp / "teacher")


class _HostReads:
    """An equivalent of ``jax.transfer_guard_device_to_host('disallow')`` for the CPU backend,
    where JAX reads device buffers in place and the real guard never fires: every read of an
    array's value on the host (``float``, ``bool``, ``np.asarray``, ``jax.device_get``) goes
    through ``ArrayImpl._value``; inside the guarded context that read raises."""

    def __init__(self, monkeypatch):
        from jax._src import array
        self.active, self.entered = False, 0
        original = array.ArrayImpl._value
        guard = self

        def _value(arr):
            if guard.active:
                raise AssertionError("device-to-host read inside a steady-state step")
            return original.fget(arr)

        monkeypatch.setattr(array.ArrayImpl, "_value", property(_value))

    def __call__(self, level):
        guard = self

        class _Context:
            def __enter__(self):
                guard.active, guard.entered = True, guard.entered + 1

            def __exit__(self, *exc):
                guard.active = False

        return _Context()


def test_the_host_read_guard_catches_a_host_read(monkeypatch):
    guard = _HostReads(monkeypatch)
    x = jnp.ones(()) + 1
    with guard("disallow"):
        with pytest.raises(AssertionError, match="steady-state"):
            float(x)
        with pytest.raises(AssertionError):
            jax.device_get(x)
    assert float(x) == 2.0


def test_steady_state_steps_transfer_nothing_to_the_host(tmp_path, teacher_dir, monkeypatch):
    import kdface.training._loop as loop
    guard = _HostReads(monkeypatch)
    monkeypatch.setattr(loop, "steady_state_guard", guard)
    # Steps 2..5 are steady state (step 1 compiles; log, eval and save only at step 6): any
    # device-to-host read inside them (a metric, the finite flag) would raise.
    cfg = tiny_config(tmp_path / "guarded", recipe="kd_im", teacher_checkpoint=teacher_dir,
                      feature_loss="normalized_l2", steps=6, log_every=6, save_every=6,
                      teacher_cache=True, transfer_guard="disallow", progress=False)
    summary = run(cfg, data_dir="", source=_source(), num_classes=CLASSES, val_sets=[])
    assert summary["step"] == 6 and np.isfinite(summary["metrics"]["loss"])
    assert guard.entered == 4


def test_runaway_loss_stops_the_run_and_names_the_step(tmp_path):
    images, labels = labelled_images()
    cfg = tiny_config(tmp_path / "runaway", steps=4, save_every=1, runaway_factor=1e-3)
    with pytest.raises(NonFiniteLossError, match=r"ran away at step 2: .*runaway_factor=0\.001"):
        fit(cfg, ArrayBatches(images, labels, batch_size=8), num_classes=CLASSES)
    steps = sorted(int(d) for d in os.listdir(tmp_path / "runaway" / "checkpoints")
                   if d.isdigit())
    assert steps == [1]  # nothing after the last good step was saved


def test_health_messages_name_terms_window_and_the_resumable_checkpoint():
    health = {"steps": 7, "first_bad": 5, "first_runaway": -1, "reference_loss": 2.0,
              "grads_finite": True, "bad_values": {"loss": np.nan, "cosface": np.nan,
                                                   "soft_prediction": 0.5}}
    with pytest.raises(NonFiniteLossError) as e:
        check_health(health, start=20, step=30, last_good=20, factor=1000.0)
    message = str(e.value)
    # 30 - 7 = 23 steps ran before this process's first; the 5th of them is step 28.
    assert "step 28" in message and "last check 20" in message
    assert "['loss', 'cosface']" in message and "checkpoint: 20" in message
    assert "--learning_rate" in message
    health.update(bad_values={"loss": 1.0, "cosface": 1.0}, grads_finite=False)
    with pytest.raises(NonFiniteLossError, match=r"\['gradients'\]"):
        check_health(health, start=20, step=30, last_good=20, factor=1000.0)
    check_health({**health, "first_bad": -1}, start=0, step=1, last_good=None, factor=1.0)


def test_teacher_cache_is_embeddings_only_shared_by_generations_and_rebuilt_when_damaged(
        tmp_path, teacher_dir, capsys):
    cfg = tiny_config(tmp_path / "gens", recipe="vargface", teacher_checkpoint=teacher_dir,
                      steps=2, generations=2, teacher_cache=True, progress=False)
    run(cfg, data_dir="", source=_source(), num_classes=CLASSES, val_sets=[])
    root = tmp_path / "gens" / "teacher_cache"
    stores = [d for d in os.listdir(root) if not d.endswith(".partial")]
    assert len(stores) == 1  # both generations used the parent's one cache
    assert not os.path.exists(tmp_path / "gens" / "gen_1" / "teacher_cache")
    path = root / stores[0] / "embedding.npy"
    width = TINY["embedding_size"]
    data_bytes = 32 * 2 * width * 2  # N x 2 views x E x float16: no [N, C] logits
    assert data_bytes < os.path.getsize(path) <= data_bytes + 4096
    with open(path, "r+b") as f:  # a kill during a copy, a full disk
        f.truncate(os.path.getsize(path) - 8)
    summary = run(cfg.replace(workdir=str(tmp_path / "again"),
                              teacher_cache_dir=str(root), generations=1),
                  data_dir="", source=_source(), num_classes=CLASSES, val_sets=[])
    assert np.isfinite(summary["metrics"]["loss"])
    out = capsys.readouterr().out
    assert "embedding.npy is damaged" in out and "rebuilding it" in out
    assert os.path.getsize(path) > data_bytes


def test_lr_view_on_the_device_trains(tmp_path, teacher_dir):
    cfg = tiny_config(tmp_path / "devlr", recipe="kd_im", teacher_checkpoint=teacher_dir,
                      feature_loss="normalized_l2", steps=2, lr_on_device=True,
                      lr_sizes=(4, 8), lr_fraction=1.0, progress=False)
    summary = run(cfg, data_dir="", source=_source(), num_classes=CLASSES, val_sets=[])
    assert summary["step"] == 2 and np.isfinite(summary["metrics"]["loss"])


def test_data_worker_processes_train_exactly_as_in_process(tmp_path, teacher_dir):
    # --data_workers moves batch-making into grain worker processes: the same batches in the
    # same order, so the same trained weights (LR view made on the host, in the workers).
    from flax import nnx
    from kdface.training import restore_run
    params = {}
    for workers in (0, 2):
        cfg = tiny_config(tmp_path / f"w{workers}", recipe="kd_im", teacher_checkpoint=teacher_dir,
                          feature_loss="normalized_l2", steps=3, lr_sizes=(4, 8),
                          lr_fraction=0.5, data_workers=workers, progress=False)
        run(cfg, data_dir="", source=_source(), num_classes=CLASSES, val_sets=[])
        state = nnx.state(restore_run(str(tmp_path / f"w{workers}")).network, nnx.Param)
        params[workers] = jax.tree.leaves(state)
    for a, b in zip(params[0], params[2]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="--data_workers"):
        tiny_config(tmp_path / "bad", data_workers=-1)


@pytest.mark.shards
@pytest.mark.parametrize("classes", [8, 21])
def test_sharded_head_trains_like_the_replicated_one(tmp_path, n_devices, classes):
    # 8 divides 1, 4 and 8 devices; 21 divides none of 4 and 8 (padded to 24 columns)
    images, labels = labelled_images()
    losses = {}
    for mode in ("off", "on"):
        cfg = tiny_config(tmp_path / mode, steps=3, shard_head=mode)
        summary = fit(cfg, ArrayBatches(images, labels, batch_size=8), num_classes=classes)
        losses[mode] = summary["metrics"]["loss"]
    # the head's class-sharded matmul and softmax vs the replicated one: float32 vs float32
    # (case 3), 2 x 3 steps x one step's reductions; scale: the loss (a mean of CE >= 0)
    assert_close(losses["on"], losses["off"], terms=2 * 3 * _step_terms(8, classes),
                 what="loss: ")


def _head(workdir):
    from kdface.training import restore_run
    return np.asarray(restore_run(str(workdir)).student.network.head.weight[...])


def test_a_padded_sharded_head_resumes_on_another_padding(tmp_path):
    """21 classes on the 4 forced devices: the head trains as 24 columns and is saved as its 21
    real classes. A resume that places it otherwise (here: replicated, 21 columns, as on one
    device) reads them as saved; a resume split over the devices pads them to 24 with zeros.
    Either way the run ends where the uninterrupted one does (within the rounding of the split
    reductions), and every reader of the checkpoint gets the [E, 21] head."""
    assert jax.device_count() == 4  # the suite's forced CPU devices (tests/conftest.py)
    images, labels = labelled_images()
    classes, steps = 21, 4

    def train(workdir, modes):
        for i, mode in enumerate(modes):
            cfg = tiny_config(workdir, steps=steps // len(modes) * (i + 1), shard_head=mode)
            summary = fit(cfg, ArrayBatches(images, labels, batch_size=8), num_classes=classes)
        return summary
    whole = train(tmp_path / "whole", ["on"])
    for modes in (["on", "off"], ["off", "on"]):
        part = train(tmp_path / "-".join(modes), modes)
        assert part["step"] == steps
        assert_close(part["metrics"]["loss"], whole["metrics"]["loss"],
                     terms=2 * steps * _step_terms(8, classes), what=f"{modes} loss: ")
        head = _head(tmp_path / "-".join(modes))
        assert head.shape == (TINY["embedding_size"], classes)
        assert_close(head, _head(tmp_path / "whole"), terms=2 * steps * _step_terms(8, classes),
                     what=f"{modes} head: ")
    # the split run trained 24 columns; its checkpoint stores the 21 real classes, for the
    # weight and for its momentum
    import orbax.checkpoint as ocp
    step_dir = tmp_path / "whole" / "checkpoints" / str(steps)
    with ocp.StandardCheckpointer() as checkpointer:
        model = checkpointer.restore(str(step_dir / "model"))
        optimizer = checkpointer.restore(str(step_dir / "optimizer"))
    saved = np.asarray(model["params"]["network"]["head"]["weight"]["value"])
    assert saved.shape == (TINY["embedding_size"], classes)
    np.testing.assert_array_equal(saved, _head(tmp_path / "whole"))
    widths = {np.shape(x) for x in jax.tree.leaves(optimizer) if np.ndim(x) == 2
              and np.shape(x)[0] == TINY["embedding_size"] and np.shape(x)[1] >= classes}
    assert widths == {(TINY["embedding_size"], classes)}


def test_a_margin_head_teacher_is_split_like_the_student(tmp_path):
    """A teacher with a 21-class CosFace head whose logits a term reads (PWR's kd_loss=hinton):
    its head is split over the 4 devices, padded to 24 columns, as the student's, with the
    teacher forward and with the teacher cache (which recomputes logits from the head)."""
    from kdface.training._loop import data_mesh
    from kdface.training._networks import build_networks
    from kdface.training._placement import teacher_shardings
    from kdface.training._plan import DataFacts, plan_fit
    from jax.sharding import PartitionSpec as P
    classes = 21
    teacher = tmp_path / "teacher"
    run(tiny_config(teacher, steps=2), data_dir="", source=_source(), num_classes=classes,
        val_sets=[])
    losses = {}
    for cached in (False, True):
        for mode in ("off", "on"):
            cfg = tiny_config(tmp_path / f"{mode}-{cached}", recipe="pwr", kd_loss="hinton",
                              teacher_checkpoint=str(teacher), steps=2, shard_head=mode,
                              teacher_cache=cached)
            summary = run(cfg, data_dir="", source=_source(), num_classes=classes, val_sets=[])
            losses[mode, cached] = summary["metrics"]["loss"]
        # sharded vs replicated heads of both networks: float32 vs float32, 2 steps
        assert_close(losses["on", cached], losses["off", cached],
                     terms=2 * 2 * 2 * _step_terms(8, classes), what=f"cached={cached}: ")
    plan = plan_fit(cfg, data=DataFacts(classes, 32), devices=jax.device_count())
    _, net = build_networks(plan)
    for cached in (False, True):
        placement = teacher_shardings(plan.head, net, data_mesh(), cached=cached)
        specs = {jax.tree_util.keystr(k): s.spec
                 for k, s in jax.tree_util.tree_leaves_with_path(placement)}
        split = [k for k, spec in specs.items() if spec != P()]
        assert split == (["['weight'].value"] if cached else ["['head']['weight'].value"])
        assert specs[split[0]] == P(None, "data")
    assert net.head.weight[...].shape == (TINY["embedding_size"], 24)


def test_a_diverged_run_resumes_from_the_named_checkpoint_with_a_lower_learning_rate(tmp_path):
    images, labels = labelled_images()
    cfg = tiny_config(tmp_path / "div", steps=8, save_every=2, learning_rate=0.05)
    fit(cfg.replace(steps=2), ArrayBatches(images, labels, batch_size=8), num_classes=CLASSES)
    with pytest.raises(NonFiniteLossError, match=r"last good checkpoint: 2\. Rerun") as e:
        fit(cfg.replace(learning_rate=1e6), ArrayBatches(images, labels, batch_size=8),
            num_classes=CLASSES)
    steps = sorted(int(d) for d in os.listdir(tmp_path / "div" / "checkpoints") if d.isdigit())
    assert max(steps) == 2, str(e.value)  # nothing after the divergence was saved
    # What the message says works: the same run, a lower learning rate, resumes from step 2.
    summary = fit(cfg.replace(learning_rate=0.01), ArrayBatches(images, labels, batch_size=8),
                  num_classes=CLASSES)
    assert summary["step"] == 8 and np.isfinite(summary["metrics"]["loss"])


def test_only_a_heads_class_axis_may_differ_between_a_checkpoint_and_its_reader():
    from kdface.training._checkpoint import class_axis_restore
    saved = {"params/network/head/weight": (8, 21), "params/network/backbone/fc/kernel": (16, 8),
             "opt_state/0/trace/network/head/weight": (8, 21)}
    assert class_axis_restore(saved, dict(saved)) is True
    padded = {**saved, "params/network/head/weight": (8, 24),
              "opt_state/0/trace/network/head/weight": (8, 24)}
    assert class_axis_restore(saved, padded) is False      # read with zero columns appended
    for key, shape in [("params/network/head/weight", (16, 24)),       # another embedding size
                       ("params/network/backbone/fc/kernel", (16, 9))]:  # another backbone
        verdict = class_axis_restore(saved, {**padded, key: shape})
        assert isinstance(verdict, str) and key in verdict
    missing = class_axis_restore(saved, {"params/network/head/weight": (8, 21)})
    assert "the checkpoint has" in missing
