"""shard_margin_heads: a margin head whose class axis is split over the 4 forced CPU devices gives
the replicated head's loss and gradients, and holds ~1/4 of the head's memory per device, also
when the devices do not divide the class count (padded with zero columns: 21 -> 24, MS1M's
85,742 -> 85,744)."""
import jax
import jax.numpy as jnp
import numpy as np
from _tolerance import assert_close
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks._common import head_step_memory, peak_bytes
from kdface.distill import build_student
from kdface.losses import arcface_logits, cosface_logits, margin_cross_entropy
from kdface.models import MarginHead, padded_class_count, shard_margin_heads

GIB = 2**30


def _mesh():
    return jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _loss_fn(graphdef, margin, classes=None):
    def loss(params, embeddings, labels):
        cos = nnx.merge(graphdef, params)(embeddings)
        return margin_cross_entropy(margin(cos, labels, classes=classes), labels)
    return loss


@pytest.mark.parametrize("classes", [20, 21])
@pytest.mark.parametrize("margin", [cosface_logits, arcface_logits])
def test_sharded_head_loss_and_gradients_equal_the_replicated_head(margin, classes):
    rng = np.random.default_rng(0)
    embeddings = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, classes, 8), jnp.int32)
    labels = labels.at[0].set(classes - 1)  # the last class, in the padded shard
    replicated_def, params = nnx.split(MarginHead(6, classes, rngs=nnx.Rngs(1)))
    want = jax.value_and_grad(_loss_fn(replicated_def, margin), (0, 1))(params, embeddings,
                                                                          labels)

    mesh = _mesh()
    head = MarginHead(6, classes, rngs=nnx.Rngs(1))
    shardings = shard_margin_heads(head, mesh)
    sharded_def, sharded_params = nnx.split(head)
    sharded_params = jax.device_put(sharded_params, shardings)
    batch = NamedSharding(mesh, P("data"))
    got = jax.jit(jax.value_and_grad(_loss_fn(sharded_def, margin, classes), (0, 1)))(
        sharded_params, jax.device_put(embeddings, batch), jax.device_put(labels, batch))

    # Reductions: logits over 6 embedding dims x 20 classes per example; the weight gradient
    # over 8 examples x 6 dims; the embedding gradient over 20 classes x 6 dims (linear growth,
    # tests/_tolerance.py), against the reference's magnitude.
    assert_close(float(got[0]), float(want[0]), terms=6 * classes)
    got_w, want_w = got[1][0]["weight"][...], want[1][0]["weight"][...]
    columns = -(-classes // 4) * 4
    assert got_w.shape == (6, columns)
    assert_close(np.asarray(got_w)[:, :classes], np.asarray(want_w), terms=8 * 6)
    # the padding columns never reach the loss: exactly zero gradient, so they stay zero
    np.testing.assert_array_equal(np.asarray(got_w)[:, classes:], 0.0)
    assert_close(np.asarray(got[1][1]), np.asarray(want[1][1]), terms=classes * 6)
    assert got_w.sharding.spec == P(None, "data")
    assert {s.data.shape for s in got_w.addressable_shards} == {(6, columns // 4)}


def test_head_output_and_weight_stay_split_on_the_class_axis():
    mesh = _mesh()
    head = MarginHead(4, 8, rngs=nnx.Rngs(0))
    shardings = shard_margin_heads(head, mesh)
    graphdef, params = nnx.split(head)
    params = jax.device_put(params, shardings)
    cos = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(
        params, jax.device_put(jnp.ones((4, 4)), NamedSharding(mesh, P("data"))))
    assert cos.sharding.spec == P(None, "data")
    assert {s.data.shape for s in cos.addressable_shards} == {(4, 2)}
    assert {s.data.shape for s in params["weight"][...].addressable_shards} == {(4, 2)}


def test_student_shardings_split_only_the_margin_head_weight():
    student = build_student("mobilefacenet", num_classes=16, head="cosface", rngs=nnx.Rngs(0),
                            backbone_options={"input_size": (32, 32), "embedding_size": 8})
    before = jax.tree.structure(nnx.state(student, nnx.Param))
    shardings = shard_margin_heads(student, _mesh())
    assert jax.tree.structure(nnx.state(student, nnx.Param)) == before
    specs = {jax.tree_util.keystr(path): s.spec
             for path, s in jax.tree_util.tree_leaves_with_path(shardings)}
    assert len(specs) == len(jax.tree.leaves(nnx.state(student, nnx.Param)))
    split = [k for k, spec in specs.items() if spec != P()]
    assert split == ["['network']['head']['weight'].value"]
    assert specs[split[0]] == P(None, "data")


def test_heads_below_min_classes_stay_replicated_and_bad_inputs_are_refused():
    mesh = _mesh()
    small = MarginHead(4, 8, rngs=nnx.Rngs(0))
    shardings = shard_margin_heads(small, mesh, min_classes=9)
    assert small.class_sharding is None and shardings["weight"].spec == P()
    with pytest.raises(ValueError, match="not 'model'"):
        shard_margin_heads(small, mesh, axis="model")


def test_a_class_count_the_devices_do_not_divide_is_padded_with_zero_columns():
    mesh = _mesh()
    head = MarginHead(4, 10, rngs=nnx.Rngs(0))
    original = np.asarray(head.weight[...])
    shardings = shard_margin_heads(head, mesh)
    weight = np.asarray(head.weight[...])
    assert padded_class_count(10, 4) == 12 and weight.shape == (4, 12)
    np.testing.assert_array_equal(weight[:, :10], original)
    np.testing.assert_array_equal(weight[:, 10:], 0.0)
    shard_margin_heads(head, mesh)  # again: still 12 columns, the same weights
    np.testing.assert_array_equal(np.asarray(head.weight[...]), weight)
    graphdef, params = nnx.split(head)
    params = jax.device_put(params, shardings)
    assert {s.data.shape for s in params["weight"][...].addressable_shards} == {(4, 3)}
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)
    cos = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(
        params, jax.device_put(x, NamedSharding(mesh, P("data"))))
    # as wide as the padded weight, so that it stays split evenly (no [4, 10] array that 4
    # devices do not divide); the consumers mask columns 10 and 11 (classes=10)
    assert cos.shape == (4, 12) and cos.sharding.spec == P(None, "data")
    np.testing.assert_array_equal(np.asarray(cos)[:, 10:], 0.0)
    # against the float64 cosine of the original 10 columns (4-term dot products)
    x64, w64 = np.asarray(x, np.float64), original.astype(np.float64)
    want = (x64 / np.linalg.norm(x64, axis=1, keepdims=True)) @ (
        w64 / np.linalg.norm(w64, axis=0, keepdims=True))
    assert_close(np.asarray(cos)[:, :10], want, terms=4)
    assert [padded_class_count(85_742, d) for d in (1, 4, 6, 64)] == [85_742, 85_744, 85_746,
                                                                     85_760]
    with pytest.raises(ValueError, match="devices must be a positive int"):
        padded_class_count(10, 0)


def test_ms1m_class_count_on_four_devices_holds_a_quarter_per_device():
    """MS1M's 85,742 identities (not a multiple of 4): each device holds 21,436 of the 85,744
    padded columns, loss and gradients are the replicated head's, and the compiled step's
    arguments (weight + momentum) are a quarter."""
    mesh, classes = _mesh(), 85_742
    rng = np.random.default_rng(0)
    embeddings = jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)
    labels = jnp.asarray(np.r_[classes - 1, classes - 2, rng.integers(0, classes, 6)], jnp.int32)
    replicated_def, replicated = nnx.split(MarginHead(8, classes, rngs=nnx.Rngs(0)))
    want = jax.value_and_grad(_loss_fn(replicated_def, cosface_logits), (0, 1))(
        replicated, embeddings, labels)
    head = MarginHead(8, classes, rngs=nnx.Rngs(0))
    shardings = shard_margin_heads(head, mesh)
    graphdef, params = nnx.split(head)
    params = jax.device_put(params, shardings)
    weight = params["weight"][...]
    assert {s.data.shape for s in weight.addressable_shards} == {(8, 21_436)}
    batch = NamedSharding(mesh, P("data"))
    got = jax.jit(jax.value_and_grad(_loss_fn(graphdef, cosface_logits, classes), (0, 1)))(
        params, jax.device_put(embeddings, batch), jax.device_put(labels, batch))
    # the softmax over 85,742 classes of 8-dim cosines; the weight gradient over 8 examples
    assert_close(float(got[0]), float(want[0]), terms=8 * classes)
    got_w = np.asarray(got[1][0]["weight"][...])
    assert_close(got_w[:, :classes], np.asarray(want[1][0]["weight"][...]), terms=8 * 8)
    np.testing.assert_array_equal(got_w[:, classes:], 0.0)
    assert_close(np.asarray(got[1][1]), np.asarray(want[1][1]), terms=classes * 8)
    replicated = _compiled_step_memory(64, 85_742, 32, shard=False)
    sharded = _compiled_step_memory(64, 85_742, 32, shard=True)
    weight_bytes = 64 * 85_742 * 4
    assert replicated.argument_size_in_bytes >= 2 * weight_bytes
    assert sharded.argument_size_in_bytes <= 2 * 64 * 85_744 * 4 / 4 + 64 * 1024
    assert sharded.temp_size_in_bytes <= replicated.temp_size_in_bytes / 3


def _compiled_step_memory(embedding_size, num_classes, batch, *, shard):
    """Per-device memory analysis of one CosFace + SGD-momentum step of the head alone, compiled
    from abstract inputs (nothing of that size is allocated): the program the sharded-head
    benchmark measures."""
    return head_step_memory(_mesh(), embedding_size, num_classes, batch, shard=shard)


def test_per_device_memory_of_head_and_logits_is_about_a_quarter():
    replicated = _compiled_step_memory(64, 4096, 32, shard=False)
    sharded = _compiled_step_memory(64, 4096, 32, shard=True)
    weight = 64 * 4096 * 4
    # Arguments: weight + momentum (+ a few KiB of embeddings and labels).
    assert replicated.argument_size_in_bytes >= 2 * weight
    assert sharded.argument_size_in_bytes <= 2 * weight / 4 + 64 * 1024
    # Temporaries: the [B, C] logits, softmax and gradients, now [B, C / 4] per device.
    assert sharded.temp_size_in_bytes <= replicated.temp_size_in_bytes / 3


def test_two_million_class_head_compiles_within_one_device_budget():
    """A 2 M-class x 512 head with a batch of 512: replicated it needs ~15.3 GiB per device
    (weight, momentum, gradient and the [B, C] logits at 3.8 GiB each); split over 4 devices
    ~5.7 GiB each, within an 8 GiB device."""
    replicated = peak_bytes(_compiled_step_memory(512, 2_000_000, 512, shard=False))
    sharded = peak_bytes(_compiled_step_memory(512, 2_000_000, 512, shard=True))
    assert replicated > 14 * GIB
    assert sharded < 8 * GIB
    assert sharded < 0.4 * replicated
