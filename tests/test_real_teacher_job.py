"""The real teacher in a job: OpenCV Zoo's SFace distilled into a MobileFaceNet, real photos.

A tiny ``make demo-real-teacher`` (``kdface.demo_teacher``): synthetic faces at 112x112, the
real photographs of ``tests/_real_faces.PHOTO_FOLDERS`` (Obama x3, Biden, Tom Hanks, Eileen
Collins) built into a training set and a 6-pair list of 3 folds by ``data_prep.build photos``,
the student trained from the real SFace (``--teacher=onnx:``) with ``--val_data`` on the photos
and their 3 folds, then both evaluated. Material as in tests/test_real_faces.py (installed by
``make test``; a missing photo fails, never skips). Also the trainer's ``--folds``: a pair list
smaller than the folds is refused before the first step, in one line naming the fix (it used to
train every step and fail at the evaluation).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kdface import demo_teacher
from kdface import train as train_cli

from _real_faces import SFACE, model_path, photo_folders

TEACHER = f"onnx:{model_path(SFACE)}"


@pytest.fixture(scope="module")
def job_data(tmp_path_factory):
    """``(out, data_dir, folds)``: 8 synthetic identities x 4 images, 40 synthetic pairs and the
    real photos' sets, built as the job builds them."""
    out = tmp_path_factory.mktemp("job")
    photos = photo_folders(str(out / "photos"))
    data_dir, folds = demo_teacher.build_data(str(out), photos, identities=8,
                                              images_per_identity=4, verification_pairs=40)
    return out, data_dir, folds


def test_sface_teaches_a_mobilefacenet_checked_on_real_photos(job_data):
    from kdface.training import run
    out, data_dir, folds = job_data
    assert folds == 3  # 6 pairs: 3 genuine (Obama), 3 impostors
    workdir = str(out / "runs" / "student")
    config = demo_teacher.train_config(workdir, TEACHER, folds=folds, steps=12, batch_size=8)
    summary = run(config.replace(log_every=1), data_dir=data_dir)
    assert summary["step"] == 12
    # --val_data on the photos with their 3 folds ran at the last step
    assert set(summary["val"]) == {"photos_accuracy", "val_accuracy"}
    assert 0.0 <= summary["val"]["photos_accuracy"] <= 1.0

    # the student learned the teacher: the normalized-L2 term fell, agreement rose
    with open(os.path.join(workdir, "logs", "log.jsonl")) as f:
        l2 = [r["normalized_l2"] for r in map(json.loads, f) if r.get("kind") == "train"]
    assert len(l2) == 12 and np.all(np.isfinite(l2))
    assert np.mean(l2[-3:]) < np.mean(l2[:3]) - 0.05, l2
    first, last = demo_teacher.term_agreement(workdir)
    assert last > first + 0.025

    results = demo_teacher.evaluate(TEACHER, workdir, data_dir, folds)
    photos, synth = results["photos"], results["synth_val"]
    assert photos["teacher"]["pairs"] == 6 and synth["teacher"]["pairs"] == 40
    # SFace separates the real photos: every genuine pair above every impostor pair
    assert photos["teacher"]["accuracy"] == 1.0
    assert photos["teacher"]["genuine_min"] > photos["teacher"]["impostor_max"] + 0.3
    assert photos["teacher"]["agreement"] == pytest.approx(1.0)
    for rows in (photos, synth):
        assert -1.0 <= rows["student"]["agreement"] <= 1.0
    text = demo_teacher.table(results, (first, last), folds)
    assert "| teacher | photos (6 pairs, 3-fold) | 1.000 | 1.000 |" in text


def test_val_data_smaller_than_the_folds_is_refused_before_training(job_data, tmp_path,
                                                                    capfd):
    _, data_dir, _ = job_data
    workdir = tmp_path / "run"
    argv = ["kdface.train", "--recipe=pwr", f"--teacher={TEACHER}", "--student=mobilefacenet",
            f"--data_dir={data_dir}", "--train_data=photos", "--val_data=photos",
            f"--workdir={workdir}", "--steps=2", "--batch_size=4"]
    assert train_cli.main(argv) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["kdface.train: error: verification set 'photos' has 6 pairs, fewer than "
                   "--folds=10 verification folds: pass --folds=3 (the folds of its pair "
                   "list)"]
    assert not (workdir / "checkpoints").exists()  # refused before any step
    assert train_cli.main([*argv[:1], "--folds=1", *argv[1:]]) == 2
    assert "folds must be an int >= 2" in capfd.readouterr().err


def test_evaluate_names_the_set_and_the_flag_when_folds_exceed_the_pairs(job_data, tmp_path,
                                                                         capfd):
    from kdface import evaluate as evaluate_cli
    _, data_dir, _ = job_data
    status = evaluate_cli.main(["kdface.evaluate", f"--runs=teacher={TEACHER}",
                                f"--data_dir={data_dir}", "--val_data=photos",
                                f"--out={tmp_path / 'eval'}"])
    assert status == 1
    assert capfd.readouterr().err.strip().splitlines() == [
        "kdface.evaluate: error: verification set 'photos' has 6 pairs, fewer than --folds=10 "
        "verification folds: pass --folds=K with 2 <= K <= 6"]
