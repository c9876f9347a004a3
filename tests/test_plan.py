"""The run plan (issue 22): ``make_plan`` turns a config and the workdirs' state into a frozen
value, checks everything before anything is written, and is what the loop runs and what
config.json records; the configuration's walk through the trainer enters each module once."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

from _config_walk import summary, walk
from _train_helpers import CLASSES, TINY, encoded_source, tiny_config
from kdface.training import DataFacts, make_plan
from kdface.training._run import run


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("plan") / "teacher"
    run(tiny_config(workdir, steps=2), data_dir="", source=encoded_source(),
        num_classes=CLASSES, val_sets=[])
    return str(workdir)


def _kd(tmp_path, name, teacher_dir, **changes):
    return tiny_config(tmp_path / name, recipe="kd_im", teacher_checkpoint=teacher_dir,
                       steps=2, **changes)


def test_plan_resolves_everything_and_writes_nothing(tmp_path, teacher_dir):
    config = _kd(tmp_path, "kd", teacher_dir)
    early = make_plan(config, devices=4)  # before the data is known: the data-free checks
    assert not os.path.exists(config.workdir)
    (fit,) = early.fits
    assert fit.role == "student" and fit.devices == 4 and fit.resume_step is None
    assert fit.schedule is None and fit.num_classes is None and early.finished is None
    assert fit.teacher.kind == "run" and fit.teacher.config.student == "sphereface_custom"
    assert fit.recipe.name == "kd_im" and fit.recipe.needs_teacher
    plan = make_plan(config, data=DataFacts(CLASSES, 32), devices=4)
    assert plan.final.schedule.steps == 2 and plan.final.num_classes == CLASSES
    assert not os.path.exists(config.workdir)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.final.devices = 8  # a value: nothing downstream can change what was checked


def test_every_check_fails_in_the_plan_before_anything_is_written(tmp_path, teacher_dir):
    bad = [(_kd(tmp_path, "a", teacher_dir, batch_size=6), 4, "not divisible by the 4"),
           (_kd(tmp_path, "b", str(tmp_path / "missing")), 1, "--teacher_checkpoint"),
           (_kd(tmp_path, "c", teacher_dir, teacher="sphereface20"), 1, "--teacher says"),
           (_kd(tmp_path, "d", teacher_dir, input_size=(16, 24)), 1, "--input_size=16,16")]
    for config, devices, match in bad:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            make_plan(config, data=DataFacts(CLASSES, 32), devices=devices)
        assert not os.path.exists(config.workdir)


def test_phases_and_generations_are_the_plans_runs(tmp_path, teacher_dir):
    kd = tiny_config(tmp_path / "kd", recipe="kd", teacher="sphereface_custom",
                     teacher_options=TINY, teacher_checkpoint=teacher_dir, steps=2,
                     feature_loss="normalized_l2")
    tune, student = make_plan(kd, data=DataFacts(CLASSES, 32), devices=1).fits
    assert tune.role == "teacher_phase" and tune.workdir == str(tmp_path / "kd" / "teacher_lr")
    assert tune.config.init_checkpoint == teacher_dir
    assert student.teacher.kind == "run" and student.teacher.planned  # trained first
    assert student.teacher.spec == tune.workdir
    gens = tiny_config(tmp_path / "gens", recipe="vargface", teacher="sphereface_custom",
                       teacher_options=TINY, teacher_checkpoint=teacher_dir, steps=2,
                       generations=2)
    first, second = make_plan(gens, data=DataFacts(CLASSES, 32), devices=1).fits
    assert (first.role, second.role) == ("generation", "generation")
    assert second.config.init_checkpoint == first.workdir


def test_config_json_is_the_plan_and_a_rerun_is_planned_as_finished(tmp_path, teacher_dir):
    config = _kd(tmp_path, "kd", teacher_dir)
    plan = make_plan(config, data=DataFacts(CLASSES, 32), devices=1)
    run(config, data_dir="", source=encoded_source(), num_classes=CLASSES, val_sets=[])
    with open(os.path.join(config.workdir, "config.json")) as f:
        written = json.load(f)
    assert written == json.loads(json.dumps(plan.final.config_json(), default=list))
    again = make_plan(config, data=DataFacts(CLASSES, 32), devices=1)
    assert again.final.resume_step == 2 and "is finished" in again.finished


def test_the_configuration_walks_one_way(tmp_path, teacher_dir):
    """Following the config (or a plan holding it) from ``run``, module by module
    (tests/_config_walk.py): the plan first, then the loop and what it calls, each module
    entered once; the recipe layer never receives the trainer's config. (Before the plan, the
    same run entered 6 modules 11 times: run, recipes, validate, recipes, validate, loop,
    recipes, validate, restore, optim, validate.)"""
    config = _kd(tmp_path, "walk", teacher_dir)
    calls = walk(lambda: run(config, data_dir="", source=encoded_source(),
                             num_classes=CLASSES, val_sets=[]))
    walked = summary(calls)
    stays = [m.removeprefix("kdface.") for m in walked["sequence"]]
    assert stays[:3] == ["training._run", "training._plan", "training._loop"], stays
    assert not any(m.startswith("distill.") for m in stays), stays
    assert walked["returns"] == 0, stays
