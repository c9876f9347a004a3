r"""Per-device memory of a margin head replicated vs class-sharded (compiled, nothing allocated).

  python -m benchmarks.sharded_head [--devices=4] [--classes=2000000] [--embedding=512]
                                    [--batch=512]

Compiles one CosFace + SGD-momentum step of ``kdface.models.MarginHead`` from abstract inputs
(``jax.ShapeDtypeStruct`` with shardings) on ``--devices`` forced CPU devices, once with every
parameter replicated and once after ``shard_margin_heads`` (class axis over the ``data`` axis),
and reports XLA's per-device memory analysis. Writes the section "Sharded margin head" of
benchmarks/TRAIN_STEP.md.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

from benchmarks._markdown_section import write_section

flags.DEFINE_integer("devices", 4, "Forced CPU devices (the mesh's data axis).")
flags.DEFINE_integer("classes", 2_000_000, "Classes of the head.")
flags.DEFINE_integer("embedding", 512, "Embedding size.")
flags.DEFINE_integer("batch", 512, "Global batch.")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "TRAIN_STEP.md"),
                    "Markdown file whose sharded-head section is (re)written.")
F = flags.FLAGS
SECTION = "## Sharded margin head"
GIB = 2**30


def _memory(shard):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from kdface.losses import cosface_logits, margin_cross_entropy
    from kdface.models import MarginHead, shard_margin_heads

    mesh = jax.make_mesh((F.devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    head = nnx.eval_shape(lambda: MarginHead(F.embedding, F.classes, rngs=nnx.Rngs(0)))
    if shard:
        shardings = shard_margin_heads(head, mesh)
    else:
        shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), nnx.state(head, nnx.Param))
    graphdef, params = nnx.split(head)
    opt = optax.sgd(0.1, momentum=0.9)

    def step(params, opt_state, embeddings, labels):
        def loss_fn(p):
            cos = nnx.merge(graphdef, p)(embeddings)
            return margin_cross_entropy(cosface_logits(cos, labels), labels)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          params, shardings)
    by_batch = NamedSharding(mesh, P("data"))
    args = (params, jax.eval_shape(opt.init, params),
            jax.ShapeDtypeStruct((F.batch, F.embedding), jnp.float32, sharding=by_batch),
            jax.ShapeDtypeStruct((F.batch,), jnp.int32, sharding=by_batch))
    m = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile().memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)
    return m.argument_size_in_bytes, m.temp_size_in_bytes, peak


def main(argv):
    del argv
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", F.devices)
    rows = [("replicated", *_memory(False)), ("class-sharded", *_memory(True))]
    head_gib = F.embedding * F.classes * 4 / GIB
    logits_gib = F.batch * F.classes * 4 / GIB
    lines = [
        SECTION,
        "",
        f"Command: `python -m benchmarks.sharded_head --devices={F.devices} "
        f"--classes={F.classes} --embedding={F.embedding} --batch={F.batch}`.  ",
        f"One CosFace + SGD-momentum step of a {F.classes:,}-class x {F.embedding} margin head "
        f"(weight {head_gib:.2f} GiB, [B, C] float32 logits {logits_gib:.2f} GiB at batch "
        f"{F.batch}) compiled from abstract inputs for {F.devices} CPU devices; XLA's per-device "
        "memory analysis (arguments = weight + momentum + batch, donated and updated in place; "
        "peak = arguments + outputs + temporaries - aliased).",
        "",
        "| head | arguments GiB / device | temporaries GiB / device | peak GiB / device |",
        "|---|---|---|---|",
        *[f"| {name} | {a / GIB:.2f} | {t / GIB:.2f} | {p / GIB:.2f} |"
          for name, a, t, p in rows],
        "",
        f"Sharded / replicated peak: {rows[1][3] / rows[0][3]:.2f} "
        f"(ideal 1/{F.devices} = {1 / F.devices:.2f}).",
        "",
    ]
    write_section(F.out, SECTION, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
