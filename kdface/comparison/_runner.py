"""Trains and evaluates every (method, seed) row of a comparison, resumably.

Each row is an ordinary training run (``kdface.training._run.run`` on a ``TrainConfig`` built
from the shared settings + the method's overrides) in ``out/runs/<method>/seed_<s>``, evaluated
by ``kdface.evaluation.compare`` — the function behind ``python -m kdface.evaluate`` — so every
number of the comparison is what ``kdface.evaluate`` prints for that workdir. A finished row's
result is written to ``out/rows/<method>/seed_<s>.json``; a rerun reuses it (after checking the
row's settings are the same) and an unfinished row resumes from its workdir's checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kdface.comparison._methods import METHODS, Method, select_methods

# TrainConfig fields that do not change what a run computes: ignored when a stored row's
# settings are compared with the current ones, and left out of the rendered command.
_BOOKKEEPING = ("progress", "async_checkpoints", "log_every", "keep", "keep_best")
_EVALUATION_KEYS = ("val_data", "lr_sizes", "far_targets", "flip", "folds", "alignment_data")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """What every row shares.

    teacher: a kdface training workdir (its config.json gives the architecture) or a
    third-party network as the trainer accepts it, ``pth:[ARCH:]PATH`` / ``onnx:[ARCH:]PATH``
    (then ``teacher_options`` are its backbone options). common: ``TrainConfig`` fields every row
    gets (steps, batch_size, learning_rate, input_size, head, student_view, ...); a method's
    overrides come on top. val_data: verification sets as ``kdface.evaluate --val_data`` takes
    them. alignment_data: a labelled dataset with landmarks for the alignment row's NRMSE.
    """
    out: str
    train_data: str
    data_dir: str
    val_data: tuple[str, ...]
    teacher: str
    student: str
    student_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    teacher_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    methods: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2)
    common: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    lr_sizes: tuple[int, ...] = (8, 12, 16, 20)
    far_targets: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4)
    flip: bool = False
    folds: int = 10
    alignment_data: str | None = None
    batch_size_eval: int = 256
    latency_repeats: int = 5


def enable_compilation_cache(directory: str) -> None:
    """Keeps compiled XLA programs on disk: every seed of a method (and every row's evaluation
    forward pass) reuses the first one's compilation, which dominates short CPU runs (measured
    on the 2-core CPU: a tiny student's run + evaluation went from 26 s + 9 s to 5 s + 3 s)."""
    import jax
    if jax.config.jax_compilation_cache_dir:  # the user chose one already
        return
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _literal(value: Any) -> Any:
    """JSON lists back to the tuples the networks' options are written with."""
    if isinstance(value, list):
        return tuple(_literal(v) for v in value)
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    return value


def teacher_fields(spec: Comparison) -> dict[str, Any]:
    """``teacher``, ``teacher_options``, ``teacher_checkpoint`` of every distilling row."""
    from kdface import interop
    if interop.is_imported_teacher(spec.teacher):
        return {"teacher": spec.teacher, "teacher_options": dict(spec.teacher_options),
                "teacher_checkpoint": None}
    path = os.path.join(spec.teacher, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher {spec.teacher}: no config.json; give a kdface "
                                f"training workdir or pth:[ARCH:]PATH / onnx:[ARCH:]PATH")
    with open(path) as f:
        cfg = json.load(f)
    size = tuple(spec.common.get("input_size", ()))
    if size and tuple(cfg["input_size"]) != size:
        raise ValueError(f"teacher {spec.teacher} was trained at input_size "
                         f"{tuple(cfg['input_size'])} but the comparison's input_size is {size};"
                         f" one pipeline feeds both networks, so make them equal")
    return {"teacher": cfg["student"], "teacher_options": _literal(cfg["student_options"]),
            "teacher_checkpoint": os.path.abspath(spec.teacher)}


def row_workdir(spec: Comparison, method: str, seed: int) -> str:
    return os.path.join(os.path.abspath(spec.out), "runs", method, f"seed_{seed}")


def row_fields(spec: Comparison, method: Method, seed: int,
               teacher: Mapping[str, Any]) -> dict[str, Any]:
    """The ``TrainConfig`` fields of one row: shared settings, then the method's overrides."""
    fields: dict[str, Any] = {"train_data": spec.train_data, "val_data": (),
                              "student": spec.student,
                              "student_options": dict(spec.student_options),
                              "progress": False, **spec.common, **method.overrides,
                              "seed": seed, "workdir": row_workdir(spec, method.name, seed)}
    if method.uses_teacher:
        fields.update(teacher)
    if method.init_from is not None:
        fields["init_checkpoint"] = row_workdir(spec, method.init_from, seed)
    return fields


def missing_fields(fields: Mapping[str, Any]) -> list[str]:
    """Fields this kdface's ``TrainConfig`` does not have (a method it cannot run yet)."""
    from kdface.training import TrainConfig
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return sorted(set(fields) - known)


def _flag_value(value: Any) -> str:
    if isinstance(value, Mapping):
        return ",".join(f"{k}={_flag_value_literal(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _flag_value_literal(value: Any) -> str:
    return repr(value).replace(" ", "")


def train_command(fields: Mapping[str, Any], data_dir: str) -> str:
    """The ``python -m kdface.train`` command line that runs this row alone: every field that
    differs from the ``TrainConfig`` default, as ``--field=value`` (field names are the flag
    names)."""
    from kdface.training import TrainConfig
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None
                for f in dataclasses.fields(TrainConfig)}
    parts = ["python -m kdface.train", f"--data_dir={shlex.quote(data_dir)}"]
    for name in ["workdir", "recipe", *sorted(k for k in fields if k not in
                                              ("workdir", "recipe"))]:
        value = fields[name]
        if name in _BOOKKEEPING or value is None:
            continue
        default = defaults.get(name)
        if name != "workdir" and _normal(value) == _normal(default):
            continue
        if isinstance(value, bool):
            parts.append(f"--{name}" if value else f"--no{name}")
        else:
            parts.append(f"--{name}={shlex.quote(_flag_value(value))}")
    return " ".join(parts)


def _normal(value: Any) -> Any:
    """Comparable form: tuples and lists alike, mappings as plain dicts."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _normal(v) for k, v in value.items()}
    return value


def _comparable(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _normal(v) for k, v in fields.items() if k not in _BOOKKEEPING}


def _write_json(path: str, payload: Any) -> None:
    """Written to a temporary name, then renamed: an interrupted write leaves no half file
    that a rerun would take for a finished row."""
    from kdface.evaluation import to_jsonable
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(to_jsonable(payload), f, indent=1, allow_nan=False)
    os.replace(tmp, path)


def _train(config, **kwargs) -> dict[str, Any]:
    from kdface.training import run
    return run(config, **kwargs)


class _Evaluators:
    """The comparison's protocol objects, built once from its settings: verification (with the
    LR probes), model facts, and alignment (its dataset opened when a row first needs it)."""

    def __init__(self, spec: Comparison, sets):
        from kdface.evaluation import ModelFacts, Verification
        self.spec = spec
        self.verification = Verification(sets, lr_sizes=spec.lr_sizes, flip=spec.flip,
                                         folds=spec.folds, far_targets=spec.far_targets)
        self.facts = ModelFacts(latency_repeats=spec.latency_repeats)
        self._alignment = None

    def alignment(self):
        from kdface.evaluation import Alignment, open_face_records
        if self._alignment is None:
            self._alignment = Alignment(open_face_records(self.spec.alignment_data,
                                                          data_dir=self.spec.data_dir))
        return self._alignment

    def evaluate(self, label: str, workdir: str, *, alignment: bool,
                 model_facts: bool) -> dict[str, Any]:
        """``kdface.evaluation.compare`` on one workdir: the report ``kdface.evaluate`` writes.
        An alignment row is evaluated on alignment only: its embedding was never trained to
        verify faces."""
        from kdface.evaluation import compare
        chosen = [self.alignment() if alignment else self.verification]
        if model_facts:
            chosen.append(self.facts)
        return compare({label: workdir}, chosen, batch_size=self.spec.batch_size_eval)


def _evaluation_settings(spec: Comparison) -> dict[str, Any]:
    return _normal({k: getattr(spec, k) for k in _EVALUATION_KEYS})


def _print(line: str) -> None:
    print(line, flush=True)


def run_comparison(spec: Comparison, *, log: Callable[[str], None] = _print,
                   catalogue: Sequence[Method] = METHODS) -> dict[str, Any]:
    """Runs every missing row, then aggregates and writes the report (``kdface.comparison.
    write_comparison``). Returns the report dict."""
    from kdface.comparison._report import build_report, write_comparison
    from kdface.evaluation import load_sets
    from kdface.training import TrainConfig
    from kdface.training import resolve_training_data

    t_start = time.perf_counter()
    if not spec.seeds:
        raise ValueError("seeds is empty: give at least one seed (the report's ± needs >= 2)")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise ValueError(f"seeds {spec.seeds} repeat a seed")
    methods = select_methods(spec.methods, catalogue)
    out = os.path.abspath(spec.out)
    os.makedirs(out, exist_ok=True)
    bad = missing_fields(spec.common)
    if bad:
        raise ValueError(f"common settings name unknown TrainConfig field(s) {bad}")
    teacher = teacher_fields(spec)
    source, num_classes = resolve_training_data(spec.train_data, spec.data_dir)
    sets = load_sets(list(spec.val_data), data_dir=spec.data_dir)
    if not sets:
        raise ValueError("no verification sets: give val_data (.bin, pairs.txt or built names)")
    settings = _evaluation_settings(spec)
    evaluators = _Evaluators(spec, sets)

    teacher_result = None
    if teacher["teacher_checkpoint"] is not None:
        path = os.path.join(out, "rows", "teacher.json")
        teacher_result = _load(path, settings=settings)
        if teacher_result is None:
            log(f"evaluating the teacher {spec.teacher}")
            report = evaluators.evaluate("teacher", spec.teacher, alignment=False,
                                         model_facts=True)
            teacher_result = {"evaluation_settings": settings, "sets": report["sets"],
                              "evaluation": report["runs"]["teacher"]}
            _write_json(path, teacher_result)

    rows: list[dict[str, Any]] = []
    total = len(methods) * len(spec.seeds)
    done = 0
    failed: set[str] = set()
    for method in methods:
        for i, seed in enumerate(spec.seeds):
            done += 1
            fields = row_fields(spec, method, seed, teacher)
            base = {"method": method.name, "seed": seed,
                    "command": train_command(fields, spec.data_dir)}
            missing = missing_fields(fields)
            if missing:
                rows.append({**base, "status": "unavailable",
                             "reason": f"this kdface's TrainConfig has no field(s) {missing}"})
                continue
            absent = [n for n in method.needs if not getattr(spec, n, None)]
            if absent:
                rows.append({**base, "status": "unavailable",
                             "reason": f"needs {', '.join(absent)}"})
                continue
            if method.init_from in failed:
                rows.append({**base, "status": "failed",
                             "reason": f"its initialization row {method.init_from!r} failed"})
                failed.add(method.name)
                continue
            if method.name in failed:  # seeds rarely rescue a method; keep the budget
                rows.append({**base, "status": "failed",
                             "reason": "not run: an earlier seed of this method failed"})
                continue
            path = os.path.join(out, "rows", method.name, f"seed_{seed}.json")
            stored = _load(path, fields=fields)
            if stored is not None and stored["evaluation_settings"] == settings:
                rows.append(stored)
                log(f"[{done}/{total}] {method.name} seed {seed}: finished earlier ({path})")
                continue
            label = f"{method.name}/seed_{seed}"
            try:
                train: dict[str, Any]
                if stored is None:
                    log(f"[{done}/{total}] {method.name} seed {seed}: training")
                    t0 = time.perf_counter()
                    summary = _train(TrainConfig(**fields), data_dir=spec.data_dir,
                                     source=source, num_classes=num_classes, val_sets=[])
                    train = {"seconds": time.perf_counter() - t0, "step": summary["step"],
                             "images_per_s": summary["metrics"].get("images_per_s"),
                             "final_losses": {k: v for k, v in summary["metrics"].items()
                                              if k != "images_per_s"}}
                else:  # trained earlier; only the evaluation settings changed
                    train = stored["train"]
                t0 = time.perf_counter()
                report = evaluators.evaluate(label, fields["workdir"],
                                             alignment="alignment_data" in method.needs,
                                             model_facts=i == 0)
            except Exception as err:  # noqa: BLE001  (one broken method must not end the rest)
                failed.add(method.name)
                rows.append({**base, "status": "failed",
                             "reason": f"{type(err).__name__}: {str(err).splitlines()[0]}"
                             if str(err) else type(err).__name__})
                log(f"    FAILED: {rows[-1]['reason']}")
                log("".join(traceback.format_exception_only(type(err), err)).rstrip())
                continue
            entry = {**base, "status": "done", "fields": _normal(fields),
                     "evaluation_settings": settings, "train": train,
                     "evaluation_seconds": time.perf_counter() - t0,
                     "sets": report.get("sets", {}),
                     "evaluation": report["runs"][label]}
            _write_json(path, entry)
            rows.append(json.loads(json.dumps(_jsonable(entry))))
            result = [f"accuracy {s} {v['hr']['accuracy']:.4f}" for s, v in
                      entry["evaluation"].get("verification", {}).items()]
            if "alignment" in entry["evaluation"]:
                result.append(f"NRMSE {entry['evaluation']['alignment'].get('nrmse')}")
            log(f"    {train['seconds']:.0f} s training, {entry['evaluation_seconds']:.0f} s "
                f"evaluation; {', '.join(result)}")
    report = build_report(spec, methods, rows, teacher_result,
                          seconds=time.perf_counter() - t_start)
    write_comparison(report, out)
    return report


def _jsonable(obj: Any) -> Any:
    from kdface.evaluation import to_jsonable
    return to_jsonable(obj)


def _load(path: str, *, fields: Mapping[str, Any] | None = None,
          settings: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """A stored result, or None. A stored row trained with other settings is an error (its
    workdir holds that training): the message says which fields differ and what to do."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        stored = json.load(f)
    if settings is not None and stored.get("evaluation_settings") != settings:
        return None
    if fields is not None:
        old, new = _comparable(stored["fields"]), _comparable(_jsonable(fields))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
            raise ValueError(f"{path} was trained with other settings ({changes}); delete "
                             f"{os.path.dirname(path)} and its runs/ workdir to retrain, or "
                             f"use another --out")
    return stored
