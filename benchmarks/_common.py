"""Pieces several benchmarks share: writing their markdown, and the compiled memory of one
margin-head step (the sharded-head benchmark and its test measure the same program)."""
from __future__ import annotations

import os
import subprocess

from benchmarks._markdown_section import write_section


def commit() -> str:
    """The repository's short HEAD commit, for a result's "at commit" line."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        return "unknown"


def write_markdown(path: str, lines: list[str]) -> int:
    """Writes ``lines`` as the markdown file ``path`` and says so; returns exit status 0."""
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return 0


def publish_section(path: str, title: str, lines: list[str]) -> int:
    """Rewrites section ``title`` of the markdown file ``path`` with ``lines`` and prints them;
    returns exit status 0."""
    write_section(path, title, lines)
    print("\n".join(lines))
    return 0


def head_step_memory(mesh, embedding_size: int, num_classes: int, batch: int, *, shard: bool):
    """XLA's per-device memory analysis of one CosFace + SGD-momentum step of a
    ``MarginHead(embedding_size, num_classes)`` alone on ``mesh`` (axis ``data``), compiled from
    abstract inputs (nothing of that size is allocated): every parameter replicated, or with
    ``shard`` the class axis split by ``kdface.models.shard_margin_heads``."""
    # JAX and kdface are imported here, not at the top: a benchmark sets JAX's platform and
    # device count in main(), before anything that imports JAX runs.
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from kdface.losses import cosface_logits, margin_cross_entropy
    from kdface.models import MarginHead, shard_margin_heads

    head = nnx.eval_shape(lambda: MarginHead(embedding_size, num_classes, rngs=nnx.Rngs(0)))
    if shard:
        shardings = shard_margin_heads(head, mesh)
    else:
        shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), nnx.state(head, nnx.Param))
    graphdef, params = nnx.split(head)
    opt = optax.sgd(0.1, momentum=0.9)

    def step(params, opt_state, embeddings, labels):
        def loss_fn(p):
            cos = nnx.merge(graphdef, p)(embeddings)
            return margin_cross_entropy(cosface_logits(cos, labels, classes=num_classes), labels)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          params, shardings)
    by_batch = NamedSharding(mesh, P("data"))
    args = (params, jax.eval_shape(opt.init, params),
            jax.ShapeDtypeStruct((batch, embedding_size), jnp.float32, sharding=by_batch),
            jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=by_batch))
    return jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile().memory_analysis()


def peak_bytes(memory) -> int:
    """Peak per-device bytes of a memory analysis: arguments + outputs + temporaries - aliased
    (donated buffers updated in place)."""
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
