"""`python -m kdface.compare`: a 2-method, 1-seed comparison end to end on tiny nets, its numbers
against `kdface.evaluation.compare` (behind `kdface.evaluate`) on the same workdirs, resuming
after an interruption between rows, the rendered commands against the trainer's own flag
parsing, and rows this kdface cannot run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kdface import comparison, evaluation
from kdface.comparison import _report as comparison_report
from kdface.comparison import _runner
from kdface.data import make_synthetic_dataset
from kdface.training import TrainConfig
from kdface.training._run import resolve_training_data, run

from _figure_checks import (assert_distinct_colour_and_marker, assert_legends_outside_the_axes,
                            assert_reference_styles, line_styles)
from _tolerance import assert_close
from _train_helpers import HW, TINY

F64 = np.float64

LR_SIZES = (8, 12)
FARS = (1e-1, 1e-2)
COMMON = dict(head="cosface", margin_scale=16.0, margin=0.1, input_size=HW, batch_size=8,
              steps=3, learning_rate=0.05, schedule="constant", save_every=2,
              student_view="low_resolution", async_checkpoints=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny synthetic training set (4 identities, with landmarks), 40 verification pairs of
    held-out identities, and a tiny teacher trained on it for 3 steps."""
    tmp = tmp_path_factory.mktemp("compare")
    made = make_synthetic_dataset(str(tmp / "data"), num_identities=4, images_per_identity=8,
                                  num_verification_identities=20, num_verification_pairs=40,
                                  data_dir=str(tmp / "tfds"))
    data_dir = made["data_dir"]
    source, classes = resolve_training_data("synth_train", data_dir)
    teacher = str(tmp / "teacher")
    run(TrainConfig(workdir=teacher, student="sphereface_custom", student_options=TINY,
                    train_data="synth_train", progress=False,
                    **{**COMMON, "student_view": "original"}),
        data_dir=data_dir, source=source, num_classes=classes, val_sets=[])
    return {"tmp": tmp, "data_dir": data_dir, "bin": made["verification_bin"],
            "teacher": teacher}


def _spec(data, out, methods=("self_studied", "kd_im")):
    return comparison.Comparison(
        out=str(out), train_data="synth_train", data_dir=data["data_dir"],
        val_data=(data["bin"],), teacher=data["teacher"], student="sphereface_custom",
        student_options=TINY, methods=tuple(methods), seeds=(0,), common=COMMON,
        lr_sizes=LR_SIZES, far_targets=FARS, latency_repeats=1)


def _files(directory):
    """{path: (mtime_ns, size)} of every file under ``directory``."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            st = os.stat(path)
            out[path] = (st.st_mtime_ns, st.st_size)
    return out


@pytest.fixture(scope="module")
def resumed(data):
    """Methods A (self_studied) and B (kd_im): the first invocation is interrupted when B's
    training starts; the second is a plain rerun. Records what each invocation trained."""
    out = data["tmp"] / "cmp"
    spec = _spec(data, out)
    real = _runner._train
    calls = {"first": [], "second": []}

    def interrupted(config, **kwargs):
        calls["first"].append(config.recipe)
        if config.recipe == "kd_im":
            raise KeyboardInterrupt  # the user's Ctrl-C between rows
        return real(config, **kwargs)

    _runner._train = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            comparison.run_comparison(spec, log=lambda _: None)
    finally:
        _runner._train = real
    row_a = out / "rows" / "self_studied" / "seed_0.json"
    before = {"a_exists": row_a.is_file(),
              "b_exists": (out / "rows" / "kd_im" / "seed_0.json").is_file(),
              "a_files": _files(out / "runs" / "self_studied"),
              "a_result": row_a.read_bytes() if row_a.is_file() else None}

    def spy(config, **kwargs):
        calls["second"].append(config.recipe)
        return real(config, **kwargs)

    _runner._train = spy
    try:
        report = comparison.run_comparison(spec, log=lambda _: None)
    finally:
        _runner._train = real
    return {"out": out, "spec": spec, "calls": calls, "before": before, "report": report,
            "row_a": row_a}


def test_interrupted_comparison_reruns_only_the_unfinished_row(resumed):
    before, calls = resumed["before"], resumed["calls"]
    assert calls["first"] == ["scratch", "kd_im"]
    assert before["a_exists"] and not before["b_exists"]
    assert before["a_files"], "row A's workdir holds its checkpoints"
    # The rerun trained B only; A's checkpoints and result file are untouched.
    assert calls["second"] == ["kd_im"]
    assert _files(resumed["out"] / "runs" / "self_studied") == before["a_files"]
    assert resumed["row_a"].read_bytes() == before["a_result"]
    rows = {r["method"]: r for r in resumed["report"]["rows"]}
    assert rows["self_studied"]["status"] == rows["kd_im"]["status"] == "done"
    assert (resumed["out"] / "rows" / "kd_im" / "seed_0.json").is_file()


def test_report_numbers_equal_kdface_evaluate_on_the_same_runs(resumed, data):
    spec, report = resumed["spec"], resumed["report"]
    workdirs = {m: comparison.row_workdir(spec, m, 0) for m in ("self_studied", "kd_im")}
    workdirs["teacher"] = data["teacher"]
    sets = evaluation.load_sets([data["bin"]])
    # The comparison's own batch size: the same compiled forward on the same checkpoints, so
    # the same embeddings and every number below is exact (a deterministic rerun; JSON keeps
    # a float64 exactly, and the mean of one seed is that seed's value).
    direct = evaluation.compare(workdirs, [
        evaluation.Verification(sets, lr_sizes=LR_SIZES, far_targets=FARS),
        evaluation.ModelFacts(latency_repeats=1)], batch_size=spec.batch_size_eval)
    set_name = next(iter(sets))
    for method in ("self_studied", "kd_im"):
        want = direct["runs"][method]["verification"][set_name]
        tar = {float(k): v for k, v in want["hr"]["tar_at_far"].items()}
        got = report["methods"][method]["verification"][set_name]
        assert got["hr"]["values"] == [want["hr"]["accuracy"]]
        assert got["hr"]["mean"] == want["hr"]["accuracy"]
        assert got["hr"]["std"] == 0.0 and got["hr"]["n"] == 1
        for size in LR_SIZES:
            assert got["lr"][str(size)]["mean"] == want["lr"][str(size)]["accuracy"]
        # TAR@FAR only where the 18 negatives of a nine-fold split can set the FAR.
        assert list(got["tar_at_far"]) == ["0.1"]
        assert got["tar_at_far"]["0.1"]["mean"] == tar[0.1]
        model = direct["runs"][method]["model"]
        assert report["methods"][method]["model"]["params"] == model["params"]
        assert report["methods"][method]["model"]["macs"] == model["macs"]
        ips = report["methods"][method]["train_images_per_s"]["mean"]
        assert np.isfinite(ips) and ips > 0
    teacher = report["teacher"]["verification"][set_name]
    assert teacher["hr"] == \
        direct["runs"]["teacher"]["verification"][set_name]["hr"]["accuracy"]
    # With one seed there is no spread to read a difference against.
    assert report["methods"]["kd_im"]["vs_self_studied"][set_name]["hr"] is None


def test_report_files_and_markdown(resumed):
    out = resumed["out"]
    for name in ("comparison.md", "comparison.json"):
        assert (out / name).is_file()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 2 and pngs[0].startswith("accuracy_") and "vs_probe" in pngs[1]
    for png in pngs:  # each figure also as PDF and SVG
        assert (out / png.replace(".png", ".pdf")).is_file()
        assert (out / png.replace(".png", ".svg")).is_file()
    # 3 series (the two rows and the teacher): one panel, told apart, legend off the data
    report = resumed["report"]
    fig = comparison_report.probe_size_figure(report, next(iter(report["sets"])))
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.get_lines()] == \
        ["self_studied", "teacher (reference)", "kd_im"]
    assert_distinct_colour_and_marker(fig)
    assert_legends_outside_the_axes(fig)
    assert_reference_styles(fig, "self_studied", "teacher (reference)")
    text = (out / "comparison.md").read_text()
    parsed = json.loads((out / "comparison.json").read_text())
    hr = parsed["methods"]["kd_im"]["verification"]
    cell = next(iter(hr.values()))["hr"]
    assert f"{cell['mean'] * 100:.2f} ± 0.00" in text
    assert "python -m kdface.train" in text and "--recipe=kd_im" in text
    assert "Wang et al., Improved Knowledge Distillation" in text


def test_rendered_command_rebuilds_the_rows_config(resumed):
    """Each row's command, parsed by kdface.train's own flags, gives the row's TrainConfig
    (bookkeeping fields aside): the row can be rerun alone."""
    spec = resumed["spec"]
    teacher = comparison.teacher_fields(spec)
    methods = comparison.select_methods(["kd_im", "transfer_soft", "vargface_gen2", "pwr_exp"])
    cases = []
    for m in methods:
        fields = comparison.row_fields(spec, m, 1, teacher)
        cases.append((comparison.train_command(fields, spec.data_dir),
                      _runner._normal({k: v for k, v in TrainConfig(**fields).as_dict().items()
                                       if k not in _runner._BOOKKEEPING})))
    script = (
        "import json, shlex, sys\n"
        "from absl import flags\n"
        "from kdface import train\n"
        "out = []\n"
        "for command in json.loads(sys.argv[1]):\n"
        "    flags.FLAGS.unparse_flags()\n"
        "    args = shlex.split(command)[3:]\n"
        "    flags.FLAGS(['prog', *args])\n"
        "    out.append(train.config_from_flags().as_dict())\n"
        "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps([c for c, _ in cases])],
                          capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    for (command, want), got in zip(cases, parsed):
        got = _runner._normal({k: v for k, v in got.items() if k not in _runner._BOOKKEEPING})
        assert got == want, command
    commands = {m.name: c for m, (c, _) in zip(methods, cases)}
    assert f"--init_checkpoint={comparison.row_workdir(spec, 'softmax_student', 1)}" in \
        commands["transfer_soft"].split()
    assert "--teacher" not in commands["softmax_student"]


def test_rows_this_build_cannot_run_are_reported_not_run(data, tmp_path):
    catalogue = (
        comparison.Method("self_studied", "self", "baseline", {"recipe": "scratch"},
                          uses_teacher=False),
        comparison.Method("future", "duong2019", "eq. 7 with a distance not built yet",
                          {"recipe": "shrinktea", "no_such_field": "l2"}),
        comparison.Method("aligned", "kd_transfer", "needs landmarks",
                          {"recipe": "transfer", "transfer_task": "alignment"},
                          needs=("alignment_data",)),
    )
    calls = []
    real = _runner._train
    _runner._train = lambda config, **kw: calls.append(config.recipe) or real(config, **kw)
    try:
        report = comparison.run_comparison(_spec(data, tmp_path / "c", ["future", "aligned"]),
                                           log=lambda _: None, catalogue=catalogue)
    finally:
        _runner._train = real
    assert calls == []
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["future"]["status"] == "unavailable"
    assert "no_such_field" in rows["future"]["reason"]
    assert rows["aligned"]["reason"] == "needs alignment_data"
    assert "unavailable: this kdface's TrainConfig has no field(s) ['no_such_field']" in \
        comparison.markdown_report(report)


def test_settings_changed_under_a_finished_row_are_refused(resumed):
    spec = resumed["spec"]
    changed = comparison.Comparison(**{**spec.__dict__, "common": {**COMMON, "steps": 5},
                                       "methods": ("self_studied",)})
    with pytest.raises(ValueError, match=r"steps: 3 -> 5"):
        comparison.run_comparison(changed, log=lambda _: None)


def test_methods_table_is_complete_and_consistent():
    names = comparison.method_names()
    for needed in ("self_studied", "kd_im", "kd_mkmmd", "kd_im_l2", "pwr_exp", "rkd_d", "rkd_a",
                   "rkd_da", "darkrank", "hkd", "transfer_soft", "transfer_triplet",
                   "transfer_alignment", "vargface", "vargface_gen2", "shrinktea",
                   "shrinktea_l2"):
        assert needed in names
    # A row asked for alone brings the row it is initialized from, placed before it.
    assert [m.name for m in comparison.select_methods(["vargface_gen2"])] == [
        "vargface", "vargface_gen2"]
    with pytest.raises(ValueError, match="unknown method"):
        comparison.select_methods(["nope"])
    from kdface.training import TrainConfig as Config
    fields = {f for f in Config.__dataclass_fields__}
    # Two rows wait for options of the reworked recipes (ShrinkTeaNet's l2 distance, kd_transfer's
    # hidden-layer weight); every other row names only existing TrainConfig fields.
    waiting = {"shrinktea_l2": {"shrinktea_distance"}, "transfer_alignment": {"lambda_hidden"}}
    for m in comparison.METHODS:
        assert set(m.overrides) - fields <= waiting.get(m.name, set()), m.name


def test_cli_reuses_the_finished_rows_and_prints_the_table(resumed, data, capsys):
    from kdface import compare
    spec = resumed["spec"]
    options = ",".join(f"{k}={v!r}".replace(" ", "") for k, v in TINY.items())
    common = ",".join(f"{k}={v!r}".replace(" ", "") for k, v in COMMON.items())
    before = _files(resumed["out"] / "runs")
    status = compare.main([
        "compare", f"--out={spec.out}", f"--data_dir={spec.data_dir}",
        "--train_data=synth_train", f"--val_data={data['bin']}", f"--teacher={data['teacher']}",
        "--student=sphereface_custom", f"--student_options={options}", f"--common={common}",
        "--methods=self_studied,kd_im", "--seeds=0", "--lr_sizes=8,12",
        "--far_targets=0.1,0.01", "--nocompilation_cache"])
    out = capsys.readouterr().out
    assert status == 0
    assert _files(resumed["out"] / "runs") == before  # nothing retrained
    assert "| kd_im | Wang et al. 2019 |" in out and "comparison written to" in out


@pytest.mark.parametrize("args, needle", [
    ([], "--out is required"),
    (["--out=o", "--train_data=t", "--teacher=t", "--student=s"], "--val_data is required"),
    (["--out=o", "--train_data=t", "--teacher=t", "--student=s", "--val_data=v",
      "--seeds=0,x"], "--seeds"),
    (["--out=o", "--train_data=t", "--teacher=t", "--student=s", "--val_data=v",
      "--common=steps"], "not key=value"),
])
def test_cli_usage_errors(args, needle, capsys):
    from kdface import compare
    assert compare.main(["compare", *args]) == 2
    assert needle in capsys.readouterr().err


def test_cli_lists_the_methods(capsys):
    from kdface import compare
    assert compare.main(["compare", "--list_methods"]) == 0
    text = capsys.readouterr().out
    for m in comparison.METHODS:
        assert f"{m.name}: {comparison.PAPERS[m.paper]}" in text


def test_seed_aggregation_and_spread_rule_against_numpy(tmp_path):
    """build_report on hand-made per-seed results: mean and sample std (ddof 1) over seeds,
    the verdict rule |Δ| > std + std_self, an alignment-only row and a diverged NRMSE."""
    spec = comparison.Comparison(out=str(tmp_path), train_data="t", data_dir="d",
                                 val_data=("v.bin",), teacher="pth:r18:x.pth", student="s",
                                 seeds=(0, 1, 2), lr_sizes=(8,), far_targets=(0.1, 0.001))
    sets = {"v": {"num_pairs": 200, "num_positive": 100, "num_negative": 100,
                  "min_train_negatives": 90, "image_size": [32, 32]}}
    acc = {"self_studied": [0.70, 0.72, 0.74], "good": [0.80, 0.81, 0.82],
           "close": [0.73, 0.75, 0.77]}

    def entry(method, seed, a):
        ver = {"v": {"hr": {"accuracy": a, "tar_at_far": {"0.1": a / 2, "0.001": None}},
                     "lr": {"8": {"accuracy": a - 0.1}}}}
        return {"method": method, "seed": seed, "status": "done", "command": "c", "sets": sets,
                "train": {"images_per_s": 100.0 + seed, "seconds": 1.0},
                "evaluation": {"verification": ver, "model": {"params": 10, "macs": 20}}}
    rows = [entry(m, s, a) for m, accs in acc.items() for s, a in enumerate(accs)]
    rows += [{"method": "aligned", "seed": s, "status": "done", "command": "c", "sets": sets,
              "train": {"images_per_s": None, "seconds": 1.0},
              "evaluation": {"verification": {}, "alignment": {"nrmse": n}}}
             for s, n in enumerate([0.05, 0.07, 0.09])]
    rows += [{"method": "diverged", "seed": 0, "status": "done", "command": "c", "sets": sets,
              "train": {}, "evaluation": {"verification": {}, "alignment": {"nrmse": None}}}]
    methods = [comparison.Method(n, "self", "e", {"recipe": "scratch"})
               for n in (*acc, "aligned", "diverged")]
    report = comparison.build_report(spec, methods, rows, None, seconds=1.0)
    for name, accs in acc.items():
        hr = report["methods"][name]["verification"]["v"]["hr"]
        # exact: the same np.mean / np.std(ddof=1) on the same three floats
        assert hr["mean"] == np.mean(accs)
        assert hr["std"] == np.std(accs, ddof=1)
        lr = report["methods"][name]["verification"]["v"]["lr"]["8"]
        # float64, another order (mean of a - 0.1 vs mean(a) - 0.1): 3 terms + 1 subtraction
        # on each side, scale 1 (accuracies)
        assert_close(lr["mean"], np.mean(accs) - 0.1, terms=2 * (3 + 1), scale=1.0, dtype=F64)
    # Only FAR 0.1 is settable with 90 training negatives; 1e-3 is left out, not averaged.
    assert list(report["methods"]["good"]["verification"]["v"]["tar_at_far"]) == ["0.1"]
    good = report["methods"]["good"]["vs_self_studied"]["v"]["hr"]
    # float64: two 3-term means and their difference vs the literal difference: terms 3 + 3 + 1
    assert_close(good["delta"], 0.81 - 0.72, terms=7, scale=1.0, dtype=F64)
    assert good["verdict"] == "better"   # 0.09 > 0.01 + 0.02
    assert report["methods"]["close"]["vs_self_studied"]["v"]["hr"]["verdict"] == \
        "within spread"                   # 0.03 < 0.02 + 0.02
    # float64 3-term mean of 0.05, 0.07, 0.09 vs 0.07: terms 3, scale 0.09 (the largest term)
    assert_close(report["methods"]["aligned"]["alignment_nrmse"]["mean"], 0.07, terms=3,
                 scale=0.09, dtype=F64)
    assert report["methods"]["diverged"]["alignment_nrmse"] == {"non_finite": 1}
    text = comparison.markdown_report(report)
    assert "| good | — | 81.00 ± 1.00 ▲ |" in text
    assert "| close | — | 75.00 ± 2.00 |" in text
    assert "| aligned | — | alignment only |" in text and "0.07 ± 0.02" in text
    assert "non-finite (1 seeds)" in text


def test_bar_chart_writes_png_and_pdf(tmp_path):
    import cv2

    from kdface import metrics
    bars = {"kd_im": [{"mean": 0.91, "std": 0.01}, {"mean": 0.70, "std": 0.03}],
            "self_studied": [{"mean": 0.88, "std": 0.02}, None]}
    figure = metrics.bar_figure(bars, ["full resolution", "8 px probe"], title="lfw")
    # One bar per (method, label) with a value; the missing one is left out.
    assert len(figure.axes[0].patches) == 3
    assert sorted(round(p.get_width(), 2) for p in figure.axes[0].patches) == [0.7, 0.88, 0.91]
    assert_legends_outside_the_axes(figure)
    written = metrics.save_figure(figure, str(tmp_path / "accuracy_lfw.png"))
    assert [os.path.basename(p) for p in written] == ["accuracy_lfw.png", "accuracy_lfw.pdf",
                                                      "accuracy_lfw.svg"]
    image = cv2.imread(written[0])
    assert image is not None and image.shape[0] > 100
    assert open(written[1], "rb").read(5) == b"%PDF-"


def _twenty_method_report(tmp_path, extra=3):
    """build_report on hand-made results of every catalogue method plus ``extra`` rows (as a
    comparison with ~20 methods has), 2 seeds each, and the teacher."""
    import dataclasses
    spec = comparison.Comparison(out=str(tmp_path), train_data="t", data_dir="d",
                                 val_data=("v.bin",), teacher="pth:r18:x.pth", student="s",
                                 seeds=(0, 1), lr_sizes=(8, 12, 16, 20), far_targets=(0.1,))
    sets = {"v": {"num_pairs": 200, "num_positive": 100, "num_negative": 100,
                  "min_train_negatives": 90, "image_size": [112, 112]}}
    methods = list(comparison.METHODS) + [
        dataclasses.replace(comparison.METHODS[-1], name=f"extra_{i}") for i in range(extra)]
    rng = np.random.default_rng(0)

    def ver():
        return {"v": {"hr": {"accuracy": float(rng.uniform(0.9, 1.0)), "tar_at_far": {}},
                      "lr": {str(s): {"accuracy": float(rng.uniform(0.5, 0.9))}
                             for s in spec.lr_sizes}}}
    rows = []
    for m in methods:
        for seed in spec.seeds:
            evaluation_ = ({"verification": {}, "alignment": {"nrmse": 0.05}}
                           if m.needs else {"verification": ver()})
            rows.append({"method": m.name, "seed": seed, "status": "done", "command": "c",
                         "sets": sets, "train": {"images_per_s": 1.0, "seconds": 1.0},
                         "evaluation": evaluation_})
    teacher = {"sets": sets, "evaluation": {"verification": ver(), "model": None}}
    return comparison.build_report(spec, methods, rows, teacher, seconds=1.0), methods


def test_comparison_plot_with_twenty_methods_is_one_panel_per_paper(tmp_path):
    report, methods = _twenty_method_report(tmp_path)
    drawn = [m for m in methods if not m.needs]  # the alignment row has no verification
    assert len(drawn) >= 20  # the catalogue's rows and three more
    written = comparison.write_comparison(report, str(tmp_path / "out"))
    for ext in ("png", "pdf", "svg"):
        assert str(tmp_path / "out" / f"accuracy_vs_probe_v.{ext}") in written
        assert os.path.getsize(tmp_path / "out" / f"accuracy_vs_probe_v.{ext}") > 0
    fig = comparison_report.probe_size_figure(report, "v")
    # one panel per paper family, in the method list's order, the references in each
    families = {}
    for m in drawn[1:]:
        families.setdefault(report["methods"][m.name]["paper_label"], []).append(m.name)
    assert [ax.get_title() for ax in fig.axes] == list(families)
    for ax, members in zip(fig.axes, families.values()):
        assert [line.get_label() for line in ax.get_lines()] == \
            ["self_studied", "teacher (reference)", *members]
    assert_distinct_colour_and_marker(fig)
    assert_legends_outside_the_axes(fig)
    assert_reference_styles(fig, "self_studied", "teacher (reference)")
    # the darkrank/shrinktea_l2/self_studied blue of the one-cycle plot: three styles now
    styles = line_styles(fig)
    assert len({styles[n][:2] for n in ("self_studied", "darkrank", "shrinktea_l2")}) == 3
    # a set missing some rows draws the others as every other figure does (styles follow the
    # comparison's method list, not the rows drawn)
    for name in ("kd_im", "hkd", "vargface", "extra_0"):
        del report["methods"][name]["verification"]
    fewer = line_styles(comparison_report.probe_size_figure(report, "v"))
    assert "kd_im" not in fewer and all(fewer[n] == styles[n] for n in fewer)
