"""`python -m benchmarks.tpu_plan --rows=benchmarks/tpu_plan_rows.jsonl --write
benchmarks/TPU_PLAN.md`: the compile-only plan (`python -m kdface.train --plan_topology`, issue
23) of the papers' flagfiles on Cloud TPU slices, one row per (recipe, topology, classes, head
placement), every figure a compiler estimate.

Each row is one `kdface.train` process: the flagfile, bf16, 128 images per chip (the batch is
128 x the slice's devices), `--shard_head=on|off`, `--plan_classes`, and a teacher checkpoint that
does not exist here (planned from `--teacher`). A compile takes one to three minutes on a 2-core
CPU host, the whole grid (150 rows) some four hours: `--rows` keeps every compiled row (with its
commit) so that a later run compiles only the rows missing, `--no_compile` writes the report from
the rows there are and lists the missing ones, `--recipes/--topologies/--classes/--heads` choose
a subset.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from benchmarks._common import commit, write_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (row label, flagfile, extra flags, images per chip). PWR keeps its relation groups of 92
# ("Batch size is fixed to 552(92 x 6)", one group per GPU in the paper): 92 per chip.
RECIPES = {"kd_im": ("kd_im, teacher forward", "kd_im.flags", ["--noteacher_cache"], 128),
           "kd_im_cached": ("kd_im, teacher cache", "kd_im.flags", ["--teacher_cache"], 128),
           "pwr": ("pwr", "pwr.flags", [], 92),
           "shrinktea": ("shrinktea", "shrinktea.flags", [], 128),
           "vargface": ("vargface", "vargface.flags", [], 128)}
TOPOLOGIES = {"v4-8": "v4:2x2x1", "v5e-8": "v5e:2x4", "v5e-64": "v5e:8x8", "v5p-8": "v5p:2x2x1",
              "v6e-8": "v6e:2x4"}
CLASSES = {"MS1M": 85_742, "Glint360K": 360_232, "2M": 2_000_000}
PER_CHIP = 128
MS1M_IMAGES = 5_822_653  # MS1MV2 (insightface), for the epoch column


def plan_row(recipe: str, topology: str, classes: int, head: str) -> dict:
    from kdface.training._compile import chips_in
    label, flagfile, extra, per_chip = RECIPES[recipe]
    name = TOPOLOGIES[topology]
    chips = chips_in(name)
    devices = chips * (2 if name.startswith("v4") else 1)  # JAX shows v4's 2 cores as devices
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "kdface.train",
               f"--flagfile={os.path.join(ROOT, 'kdface', 'configs', flagfile)}", *extra,
               f"--workdir={tmp}/run", f"--teacher_checkpoint={tmp}/teacher_not_here",
               "--train_data=ms1m", f"--plan_topology={name}", f"--plan_classes={classes}",
               f"--plan_examples={MS1M_IMAGES}", "--bf16", f"--batch_size={per_chip * devices}",
               f"--shard_head={head}"]
        t0 = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": ROOT})
        seconds = time.time() - t0
    row = {"recipe": label, "topology": topology, "classes": classes, "head": head,
           "compile_s": seconds}
    if done.returncode != 0:
        error = [ln for ln in done.stderr.splitlines() if "kdface.train: error" in ln]
        if error:
            row["error"] = error[-1][:300]
        elif done.returncode < 0 or "Raising signal" in done.stderr:
            row["error"] = (f"the compiler crashed (exit {done.returncode}: "
                            f"{done.stderr.strip().splitlines()[-1][:200]})")
        else:
            row["error"] = done.stderr.strip().splitlines()[-1][:300]
        return row
    row.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return row


def _read_rows(path: str | None) -> dict:
    """The rows a ``--rows`` file holds, by (recipe, slice, classes, head)."""
    if not path or not os.path.exists(path):
        return {}
    rows = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[(row["recipe"], row["topology"], row["classes"], row["head"])] = row
    return rows


def markdown(rows: list[dict], command: str) -> list[str]:
    lines = ["# TPU plan: the papers' flagfiles compiled for Cloud TPU slices", "",
             f"Command: `{command}` (at commit {commit()})", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"no TPU: every program was compiled here with libtpu for the topology "
             f"(`jax.experimental.topologies`). **Every figure is a compiler estimate, not a "
             f"measurement**: HBM from `memory_analysis()`, flops and bytes from "
             f"`cost_analysis()`, step time (the `estimate` column) from the compiler's "
             f"`optimal_seconds` where it is usable (positive, not below half the roofline); "
             f"else `cycles`: the compiler's own per-op cost model, the `estimated_cycles` it "
             f"writes on every op of the optimized program, summed (loops times their trip "
             f"count) at the clock the chip's published peak implies "
             f"(kdface/training/_hlo_costs.py, _compile.py: MXUS); else the roofline max(flops "
             f"/ peak, bytes / HBM bandwidth) with the chips' published figures (_compile.py: "
             f"CHIPS), also printed for every row. The compiler gives collectives no cycles: "
             f"the `collectives` column is the bytes each chip sends at its published "
             f"interconnect bandwidth (_compile.py: ICI), not in the estimate, and what the "
             f"step would add if none of it overlapped compute (rows compiled before it was "
             f"recorded: blank).", "",
             f"bf16, {PER_CHIP} images per device (PWR: 92, its relation group), epoch of "
             f"MS1MV2 ({MS1M_IMAGES:,} images). v4: JAX shows each chip's two TensorCores as "
             f"devices; its per-device figures are half a chip's.", "",
             "| recipe | slice | classes | head | per-chip HBM | fits | flops/step/chip | "
             "estimate | img/s/chip | img/s slice | MFU | roofline img/s/chip | collectives | "
             "epoch | compile | commit |",
             "|---|---|---:|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        head = f"{r['classes']:,}"
        if "error" in r:
            why = r["error"]
            if "Raising signal" in why and not why.startswith("the compiler crashed"):
                why = f"the compiler crashed ({why.split('] ')[-1]})"
            lines.append(f"| {r['recipe']} | {r['topology']} | {head} | "
                         f"{'replicated' if r['head'] == 'off' else 'sharded'} | "
                         f"| {'' if why.startswith('the compiler') else 'refused: '}{why} "
                         f"| | | | | | | | | {r['compile_s']:.0f} s | "
                         f"{r.get('commit', '')} |")
            continue
        kind = r["estimate"].split(" ")[0]
        kind = "cycles" if r["estimate"].startswith("compiler cycles") else (
            "optimal_seconds" if kind == "compiler" else kind)
        roofline = r["batch_per_chip"] / r["roofline_seconds"]
        comm = r.get("collective_seconds")
        comm = "" if comm is None else f"{comm * 1e3:.2g} ms"
        lines.append(
            f"| {r['recipe']} | {r['topology']} | {head} | "
            f"{'sharded' if r['head_sharded'] else 'replicated'} | {r['total_gib']:.2f} GiB | "
            f"{'yes' if r['fits'] else 'no'} | {r['flops_per_step']:.3g} | "
            f"{kind} | {r['images_per_s_chip']:,.0f} | "
            f"{r['images_per_s_slice']:,.0f} | {100 * r['mfu']:.0f} % | {roofline:,.0f} | "
            f"{comm} | "
            f"{r['epoch_seconds'] / 60:.0f} min | {r['compile_s']:.0f} s | "
            f"{r.get('commit', '')} |")
    return lines + _estimates(rows) + _costliest(rows) + _targets(rows)


def _ok(rows):
    return [r for r in rows if "error" not in r]


def _estimates(rows: list[dict]) -> list[str]:
    """Where the compiler gives both, its cycle sum against its own optimal_seconds."""
    both = [r for r in _ok(rows) if r.get("cycles_seconds") and r["estimate"].startswith(
        "compiler (optimal")]
    if not both:
        return []
    lines = ["", "## The cycle estimate against the compiler's optimal_seconds", "",
             "Where the compiler reports a usable `optimal_seconds` (v5p), the per-op cycle sum "
             "is computed too; it is the estimate the rows of the other generations use:", "",
             "| recipe | slice | classes | head | optimal_seconds | cycles | cycles / optimal |",
             "|---|---|---:|---|---:|---:|---:|"]
    for r in both:
        lines.append(f"| {r['recipe']} | {r['topology']} | {r['classes']:,} | {r['head']} | "
                     f"{r['step_seconds'] * 1e3:.3g} ms | {r['cycles_seconds'] * 1e3:.3g} ms | "
                     f"{r['cycles_seconds'] / r['step_seconds']:.3f} |")
    return lines


def _costliest(rows: list[dict]) -> list[str]:
    """The three ops the compiler expects to cost most in the kd_im step on v5e."""
    picked = [r for r in _ok(rows) if r["recipe"].startswith("kd_im, teacher forward")
              and r["topology"].startswith("v5e") and r.get("top_ops")]
    if not picked:
        return []
    lines = ["", "## The costliest ops of the kd_im step on v5e (compiler cycles)", "",
             "Per op of the optimized program: the compiler's cycles at the chip's clock, the "
             "flops of its convolutions and products (counted from the HLO's shapes, equal to "
             "XLA's own count: tests/test_hlo_costs.py), its HBM bytes (operands and result "
             "outside VMEM), and what bounds it: the MXUs or HBM when their own time is at "
             "least a quarter of the op's, else the vector unit.", "",
             "| slice | classes | head | op | at | time | bound | MXU share | HBM bytes |",
             "|---|---:|---|---|---|---:|---|---:|---:|"]
    for r in picked:
        for op in r["top_ops"]:
            lines.append(f"| {r['topology']} | {r['classes']:,} | {r['head']} | {op['op']} | "
                         f"{op['source']} | {op['ms']:.3g} ms | {op['bound']} | "
                         f"{100 * op['mxu_share']:.0f} % | {op['hbm_bytes']:.3g} |")
    return lines


def _find(rows, recipe, topology, classes, head):
    for r in _ok(rows):
        if (r["recipe"].startswith(recipe) and r["topology"] == topology
                and r["classes"] == classes and r["head"] == head):
            return r
    return None


def _targets(rows: list[dict]) -> list[str]:
    """Issue 23's targets, read from the rows (kd_im with the teacher's forward, bf16, 128 per
    chip)."""
    lines = ["", "## Issue 23's targets, from these rows", ""]
    kd = "kd_im, teacher forward"
    v5p = _find(rows, kd, "v5p-8", CLASSES["MS1M"], "on")
    if v5p:
        lines.append(f"- v5p compiler estimate >= 9,000 img/s/chip: "
                     f"**{v5p['images_per_s_chip']:,.0f}** ({v5p['estimate'].split(' (')[0]}, "
                     f"v5p-8, MS1M, head sharded).")
    v5e = _find(rows, kd, "v5e-8", CLASSES["MS1M"], "on")
    if v5e:
        roofline = v5e["batch_per_chip"] / v5e["roofline_seconds"]
        lines.append(f"- v5e roofline >= 4,000 img/s/chip: **{roofline:,.0f}** (v5e-8, MS1M, "
                     f"head sharded; the cycle estimate {v5e['images_per_s_chip']:,.0f}).")
    for topology in ("v5e-8", "v5p-8"):
        small = _find(rows, kd, topology, CLASSES["MS1M"], "on")
        big = _find(rows, kd, topology, CLASSES["2M"], "on")
        if not (small and big):
            continue
        chip = "v5e" if topology.startswith("v5e") else "v5p"
        from kdface.training._compile import CHIPS
        peak = CHIPS[chip][0] * 1e12
        floor = (small["step_seconds"] + (big["flops_per_step"] - small["flops_per_step"])
                 / peak) / small["step_seconds"]
        verdict = ("No formulation of the same loss can reach 1.25x here" if floor > 1.25
                   else "The flops alone would allow it")
        lines.append(
            f"- 2 M-class sharded step within 1.25x the 85,742-class one ({topology}): "
            f"**{big['step_seconds'] / small['step_seconds']:.2f}x** "
            f"({big['step_seconds'] * 1e3:.3g} vs {small['step_seconds'] * 1e3:.3g} ms). "
            f"{verdict}: the 2 M-class step has "
            f"{big['flops_per_step'] - small['flops_per_step']:.3g} more flops per chip (the "
            f"student's head forward and its two gradient products, the teacher's head "
            f"forward: about 4 x 2 x 128 x (2,000,000 - 85,742) x 512 = 1.0e12), which at the "
            f"chip's peak alone make it >= **{floor:.2f}x** the 85,742-class step.")
    return lines if len(lines) > 3 else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
    parser.add_argument("--classes", default=",".join(CLASSES))
    parser.add_argument("--heads", default="off,on")
    parser.add_argument("--write", default=None, help="markdown file to write")
    parser.add_argument("--rows", default=None,
                        help="JSON-lines file of planned rows: each row is appended as it is "
                             "compiled (with its commit), rows already there are not compiled "
                             "again (with --fresh: unless from another commit), and the "
                             "markdown is written from all of them")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--no_compile", action="store_true",
                        help="report the --rows there are, list the missing ones")
    args = parser.parse_args(argv)
    done = _read_rows(args.rows)
    here = commit()
    rows, missing = [], []
    for recipe in args.recipes.split(","):
        for topology in args.topologies.split(","):
            for classes in args.classes.split(","):
                for head in args.heads.split(","):
                    key = (RECIPES[recipe][0], topology, CLASSES[classes], head)
                    if key in done and (not args.fresh or done[key].get("commit") == here):
                        rows.append(done[key])
                        continue
                    if args.no_compile:
                        missing.append(f"{recipe} {topology} {classes} head {head}")
                        continue
                    row = plan_row(recipe, topology, CLASSES[classes], head)
                    row["commit"] = here
                    print(json.dumps({k: row.get(k) for k in (
                        "recipe", "topology", "classes", "head", "total_gib", "fits",
                        "images_per_s_chip", "compile_s", "error")}), flush=True)
                    rows.append(row)
                    if args.rows:
                        with open(args.rows, "a") as f:
                            f.write(json.dumps(row, default=str) + "\n")
    command = "python -m benchmarks.tpu_plan " + " ".join(argv if argv is not None
                                                          else sys.argv[1:])
    lines = markdown(rows, command)
    if missing:
        lines += ["", f"## Not compiled yet: {len(missing)} of {len(missing) + len(rows)} rows",
                  "", "; ".join(missing) + "."]
    if args.write:
        # a hand-written "## Reading" section (the interpretation) is kept across regenerations
        if os.path.exists(args.write):
            text = open(args.write).read()
            text = "\n" + text
            if "\n## Reading" in text:
                lines += [""] + ("## Reading" + text.split("\n## Reading", 1)[1]).rstrip(
                    "\n").splitlines()
        return write_markdown(args.write, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
