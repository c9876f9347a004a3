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

from benchmarks._common import head_step_memory, peak_bytes, publish_section

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
    mesh = jax.make_mesh((F.devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    m = head_step_memory(mesh, F.embedding, F.classes, F.batch, shard=shard)
    return m.argument_size_in_bytes, m.temp_size_in_bytes, peak_bytes(m)


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
    return publish_section(F.out, SECTION, lines)


if __name__ == "__main__":
    sys.exit(app.run(main))
