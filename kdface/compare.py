r"""`python -m kdface.compare`: every method, one teacher, one student, one table.

  python -m kdface.compare --out=comparison --data_dir=data --train_data=casia \
      --val_data=lfw.bin --teacher=runs/teacher --student=sphereface36_thin \
      --common=steps=28000,batch_size=512,head=sphereface,student_view=low_resolution \
      --seeds=0,1,2 --lr_sizes=8,12,16,20

  python -m kdface.compare --flagfile=kdface/configs/compare_demo.flags   # after `make demo`

Trains each method (``--methods``, default all; ``--list_methods`` prints them with their
paper and equation) into the same student with the same budget (``--common``: TrainConfig
fields every row shares, as name=value Python literals) and seeds, evaluates every run with
the code of ``python -m kdface.evaluate``, and writes ``--out/comparison.{md,json}`` and the
plots: mean ± std over seeds of 10-fold accuracy at full resolution and at each LR probe size,
TAR@FAR where the set supports it, alignment NRMSE, params/MACs, training images/s, and the
``python -m kdface.train`` command that reruns each row alone.

The teacher is a kdface training workdir (its architecture comes from its config.json), or a
third-party network as the trainer takes it, ``pth:[ARCH:]PATH`` / ``onnx:[ARCH:]PATH`` (with
``--teacher_options``). Rerunning the same command continues: finished rows
(``--out/rows/<method>/seed_<s>.json``) are reused, an unfinished run resumes from its
checkpoints (``--out/runs/<method>/seed_<s>``).

Exit status: 0 when every row ran, 1 when a row failed (the report still lists it and the
error), 2 for an unusable command line.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from kdface._cli import UsageError, parse_command_line, parse_key_values, report_usage_error

PROG = "kdface.compare"


def define_flags(fv):
    """Defines the command's flags on an absl ``FlagValues`` of its own."""
    from absl import flags
    d = dict(flag_values=fv)
    flags.DEFINE_string("out", None, "Output directory: runs/, rows/, comparison.md/.json, "
                        "plots. Required.", **d)
    flags.DEFINE_string("data_dir", "data", "tfds data directory of built datasets.", **d)
    flags.DEFINE_string("train_data", None, "Training set: a built name in --data_dir, or a "
                        ".rec / identity-folder path (built on first use). Required.", **d)
    flags.DEFINE_list("val_data", [], "Verification sets: .bin, pairs.txt[=ROOT] or built "
                      "names. Required.", **d)
    flags.DEFINE_string("teacher", None, "A kdface training workdir, or pth:[ARCH:]PATH / "
                        "onnx:[ARCH:]PATH. Required.", **d)
    flags.DEFINE_string("teacher_options", "", "Backbone options of an imported teacher, "
                        "k=v,k=v (Python literals).", **d)
    flags.DEFINE_string("student", None, "Student backbone name (kdface.models.names()). "
                        "Required.", **d)
    flags.DEFINE_string("student_options", "", "Student backbone options, k=v,k=v.", **d)
    flags.DEFINE_list("methods", [], "Rows to run (default: all; see --list_methods). A row "
                      "initialized from another row brings that row along.", **d)
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every row (>= 3 for a spread).", **d)
    flags.DEFINE_string("common", "", "TrainConfig fields every row shares, k=v,k=v (e.g. "
                        "steps=2000,batch_size=128,input_size=(112,112),student_view="
                        "low_resolution).", **d)
    flags.DEFINE_list("lr_sizes", ["8", "12", "16", "20"], "LR probe sizes in px (Wang "
                      "et al. 2019 §3.1).", **d)
    flags.DEFINE_list("far_targets", ["1e-1", "1e-2", "1e-3", "1e-4"], "FARs of TAR@FAR "
                      "(reported where the set supports them).", **d)
    flags.DEFINE_bool("flip", False, "Embed image + mirrored image.", **d)
    flags.DEFINE_integer("folds", 10, "Verification folds.", **d)
    flags.DEFINE_string("alignment_data", None, "Labelled dataset with 5-point landmarks: "
                        "NRMSE of the alignment row (Wang et al. 2017).", **d)
    flags.DEFINE_bool("compilation_cache", True, "Keep compiled programs in --out/jax_cache "
                      "so that seeds and evaluations reuse them.", **d)
    flags.DEFINE_bool("list_methods", False, "Print the methods and exit.", **d)
    return fv


def _numbers(flag: str, values: Sequence[str], kind):
    try:
        return tuple(kind(v) for v in values)
    except ValueError:
        raise UsageError(f"--{flag}: {values} are not all {kind.__name__} values") from None


def spec_from_flags(fv):
    """The ``Comparison`` the parsed flags describe."""
    from kdface.comparison import Comparison
    for name in ("out", "train_data", "teacher", "student"):
        if not getattr(fv, name):
            raise UsageError(f"--{name} is required")
    if not fv.val_data:
        raise UsageError("--val_data is required (verification sets)")
    seeds = _numbers("seeds", fv.seeds, int)
    if fv.folds < 2:
        raise UsageError(f"--folds must be >= 2, got {fv.folds}")
    return Comparison(
        out=fv.out, train_data=fv.train_data, data_dir=fv.data_dir,
        val_data=tuple(fv.val_data), teacher=fv.teacher,
        teacher_options=parse_key_values(fv.teacher_options, "teacher_options"),
        student=fv.student, student_options=parse_key_values(fv.student_options,
                                                          "student_options"),
        methods=tuple(fv.methods), seeds=seeds,
        common=parse_key_values(fv.common, "common"),
        lr_sizes=_numbers("lr_sizes", fv.lr_sizes, int),
        far_targets=_numbers("far_targets", fv.far_targets, float), flip=fv.flip,
        folds=fv.folds, alignment_data=fv.alignment_data)


def list_methods() -> str:
    from kdface.comparison import METHODS, PAPERS
    lines = []
    for m in METHODS:
        lines.append(f"{m.name}: {PAPERS[m.paper]} — {m.equation}")
        lines.append(f"    overrides: {dict(m.overrides)}"
                     + (f"; initialized from {m.init_from}" if m.init_from else "")
                     + (f"; adds {m.adds}" if m.adds else ""))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit status (see the module docstring)."""
    from absl import flags, logging
    argv = list(sys.argv if argv is None else argv)
    try:
        fv = parse_command_line(define_flags, argv, __doc__)
        if fv is None:
            return 0
        if fv.list_methods:
            print(list_methods())
            return 0
        spec = spec_from_flags(fv)
    except (flags.Error, UsageError) as err:
        return report_usage_error(PROG, err)
    logging.set_verbosity(logging.ERROR)  # orbax/tfds INFO lines would bury the progress
    from kdface.comparison import enable_compilation_cache, markdown_report, run_comparison
    try:
        if fv.compilation_cache:
            enable_compilation_cache(os.path.join(spec.out, "jax_cache"))
        report = run_comparison(spec)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    print(markdown_report(report))
    print(f"comparison written to {os.path.abspath(spec.out)} (comparison.md, comparison.json, "
          f"plots)")
    return 1 if any(r["status"] == "failed" for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
