"""Wang et al. 2017's classification top-1 (`kdface.evaluate --top1_data`): the held-out split
against a plain-Python re-implementation of its definition, its independence of the storage
format, the trainer reading the split's training side only, and the top-1 figure of restored
tiny runs against a NumPy argmax over the checkpoint's own head weights.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil

import cv2
import numpy as np
import pytest

from kdface import evaluate, evaluation
from kdface.data import build_training_dataset, decode_image, encode_image, write_recordio

from _train_helpers import CLASSES, tiny_config

SIZE = 24                      # stored images; the runs' input is 16x16
CROP = (20, 20)                # the cosface run's --crop_from
PER_IDENTITY = (8, 11, 14, 17)  # images of identities 0..3
FRACTION = 0.25


def _faces(seed=7):
    """``[(label, uint8 [SIZE, SIZE, 3])]``: brightness by identity (something to learn), and
    identity 0's last image an exact copy of its first (a duplicate)."""
    rng = np.random.default_rng(seed)
    out = []
    for label, n in enumerate(PER_IDENTITY):
        for _ in range(n):
            base = rng.random((SIZE, SIZE, 3)) * 60 + 30 + 45 * label
            out.append((label, base.clip(0, 255).astype(np.uint8)))
    out[PER_IDENTITY[0] - 1] = (0, out[0][1].copy())
    return out


def _records(faces):
    return [{"image": encode_image(im, format="png"), "label": int(y)} for y, im in faces]


class LoggedSource(list):
    """A list source that records which records were read."""
    read: list

    def __getitem__(self, i):
        self.read.append(int(i))
        return super().__getitem__(i)


def _reference_key(label, data, seed):
    """The split key as its docstring defines it, written out here."""
    h = hashlib.blake2b(digest_size=8, person=b"kdface-heldout",
                        salt=int(seed).to_bytes(16, "little"))
    h.update(int(label).to_bytes(8, "little", signed=True))
    h.update(bytes(data))
    return int.from_bytes(h.digest(), "little")


def _reference_test_set(records, fraction, seed):
    """Plain Python: per identity, its floor(f * d) smallest distinct keys (at most d - 1)."""
    keys = [_reference_key(r["label"], r["image"], seed) for r in records]
    held = set()
    for label in {r["label"] for r in records}:
        distinct = sorted({k for k, r in zip(keys, records) if r["label"] == label})
        quota = min(math.floor(fraction * len(distinct) + 1e-9), len(distinct) - 1)
        held |= {(label, k) for k in distinct[:quota]}
    return [i for i, (k, r) in enumerate(zip(keys, records)) if (r["label"], k) in held]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The data as a list, a .rec and the tfds set built from it; a CosFace run trained on the
    split's training side only (through the real pipeline, with --crop_from), and a softmax run
    trained on every image."""
    from kdface.training._run import run
    tmp = tmp_path_factory.mktemp("top1")
    faces = _faces()
    records = _records(faces)
    write_recordio(tmp / "train.rec", [(y, r["image"]) for (y, _), r in zip(faces, records)])
    build_training_dataset(str(tmp / "train.rec"), str(tmp / "tfds"), name="top1_train")
    source = LoggedSource(records)
    source.read = []
    view = evaluation.TrainingView(source, fraction=FRACTION, seed=0)
    source.read = []
    run(tiny_config(tmp / "cos", crop_from=CROP, steps=40, input_size=(16, 16)),
        data_dir=str(tmp), source=view, num_classes=CLASSES)
    trained_on = sorted(set(source.read))
    run(tiny_config(tmp / "soft", head="softmax", steps=4), data_dir=str(tmp),
        source=records, num_classes=CLASSES)
    return {"tmp": tmp, "faces": faces, "records": records, "view": view,
            "trained_on": trained_on, "cos": str(tmp / "cos"), "soft": str(tmp / "soft")}


# --- the split -----------------------------------------------------------------------------

def test_split_equals_its_definition_written_out(env):
    records = env["records"]
    for seed in (0, 1, 12345):
        split = evaluation.records_split(evaluation.open_face_records(records),
                                         fraction=FRACTION, seed=seed)
        assert split.test.tolist() == _reference_test_set(records, FRACTION, seed)
        assert sorted(split.test.tolist() + split.train.tolist()) == list(range(len(records)))


def test_split_size_coverage_duplicates_and_seed(env):
    records = env["records"]
    opened = evaluation.open_face_records(records)
    split = evaluation.records_split(opened, fraction=FRACTION, seed=0)
    labels = np.asarray([r["label"] for r in records])
    test_labels = labels[split.test]
    # identity 0 has 8 images of which 7 distinct (a duplicate): floor(0.25 * 7) = 1 held out,
    # plus its copy if that one is the duplicate; the others floor(0.25 * n)
    counts = np.bincount(test_labels, minlength=CLASSES)
    assert counts[1:].tolist() == [2, 3, 4]
    dup = {0, PER_IDENTITY[0] - 1}
    assert counts[0] == (2 if dup <= set(split.test.tolist()) else 1)
    assert len(dup & set(split.test.tolist())) in (0, 2)  # a duplicate pair never straddles
    assert all((labels[split.train] == c).any() for c in range(CLASSES))  # all keep training
    again = evaluation.records_split(opened, fraction=FRACTION, seed=0)
    np.testing.assert_array_equal(again.test, split.test)
    other = evaluation.records_split(opened, fraction=FRACTION, seed=1)
    assert other.test.tolist() != split.test.tolist()
    assert np.bincount(labels[other.test], minlength=CLASSES)[1:].tolist() == [2, 3, 4]
    assert split.num_classes == CLASSES and split.test_identities == CLASSES


def test_split_is_the_same_content_in_a_rec_its_built_tfds_set_and_folders(env):
    tmp = env["tmp"]
    for i, r in enumerate(env["records"]):
        os.makedirs(tmp / "folders" / f"id{r['label']}", exist_ok=True)
        (tmp / "folders" / f"id{r['label']}" / f"{i:03d}.png").write_bytes(r["image"])
    rec = evaluation.open_face_records(str(tmp / "train.rec"))
    built = evaluation.open_face_records("top1_train", data_dir=str(tmp / "tfds"))
    folders = evaluation.open_face_records(str(tmp / "folders"))
    contents = []
    for records in (rec, built, folders):
        split = evaluation.records_split(records, fraction=FRACTION, seed=3)
        contents.append(sorted((records.read_encoded(int(i))[0],
                                bytes(records.read_encoded(int(i))[1])) for i in split.test))
    assert contents[0] == contents[1] == contents[2]
    assert len(contents[0]) == 10  # 1 + 2 + 3 + 4: at seed 3 the duplicate pair trains


def test_training_view_is_the_complement_and_the_trainer_read_only_it(env):
    view, records = env["view"], env["records"]
    test = set(view.split.test.tolist())
    assert len(view) == len(records) - len(test)
    assert [view[i] for i in range(len(view))] == [records[i] for i in view.split.train]
    assert env["trained_on"], "the trainer read nothing"
    assert set(env["trained_on"]) <= set(view.split.train.tolist())
    assert not test & set(env["trained_on"])
    again = pickle.loads(pickle.dumps(view))
    assert len(again) == len(view) and again[3] == view[3]
    with pytest.raises(IndexError):
        view[len(view)]


def test_split_arguments_are_checked():
    labels, keys = np.array([0, 0, 1]), np.array([3, 1, 2], np.uint64)
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        evaluation.heldout_split(labels, keys, fraction=1.0)
    with pytest.raises(ValueError, match="keys must be uint64"):
        evaluation.heldout_split(labels, keys.astype(np.int64), fraction=0.5)
    with pytest.raises(ValueError, match="labels must be int"):
        evaluation.heldout_split(labels.astype(float), keys, fraction=0.5)
    # d = 2 -> floor(0.5 * 2) = 1 held out (the smaller key); d = 1 -> none (keeps training)
    assert evaluation.heldout_split(labels, keys, fraction=0.5).test.tolist() == [1]


# --- the figure ----------------------------------------------------------------------------

def _test_images(records, test, crop):
    """The test view written out: resize to --crop_from and cut the centre 16x16, or resize."""
    images = []
    for i in test:
        image = decode_image(records[i]["image"])
        if crop:
            image = cv2.resize(image, crop[::-1], interpolation=cv2.INTER_AREA)
            top, left = (crop[0] - 16) // 2, (crop[1] - 16) // 2
            image = image[top:top + 16, left:left + 16]
        else:
            image = cv2.resize(image, (16, 16), interpolation=cv2.INTER_AREA)
        images.append(image)
    return np.stack(images)


def _head_logits(workdir, emb):
    """Logits of the checkpoint's head on embeddings ``emb`` [N, E], in NumPy."""
    from flax import nnx
    from kdface.training import restore_run
    restored = restore_run(workdir)
    head = nnx.state(restored.network.head, nnx.Param)
    cfg = restored.run
    if cfg["head_used"] == "softmax":
        w = np.asarray(head["linear"]["kernel"][...], np.float64)
        b = np.asarray(head["linear"]["bias"][...], np.float64)
        return emb @ w + b
    w = np.asarray(head["weight"][...], np.float64)
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return float(cfg["margin_scale"]) * (x @ (w / np.linalg.norm(w, axis=0, keepdims=True)))


def _reference(workdir, records, test, crop):
    """(predicted, top-1) from the run's embeddings, its head in NumPy and a Python count."""
    embedder = evaluation.Embedder(workdir, batch_size=32)
    emb = np.asarray(embedder(_test_images(records, test, crop)), np.float64)
    predicted = np.argmax(_head_logits(workdir, emb), axis=1)
    labels = [records[i]["label"] for i in test]
    return predicted, sum(int(p == y) for p, y in zip(predicted, labels)) / len(labels)


@pytest.mark.parametrize("run_name,crop", [("cos", CROP), ("soft", None)])
def test_top1_equals_numpy_argmax_over_the_checkpoints_head(env, run_name, crop):
    records = env["records"]
    opened = evaluation.open_face_records(records)
    split = evaluation.records_split(opened, fraction=FRACTION, seed=0)
    run = evaluation.Embedder(env[run_name])
    shown = []
    run.predictions = lambda images, f=run.predictions: shown.extend(images) or f(images)
    result = evaluation.classification_report(run, opened, split)
    # the network saw the test view written out here (argmax alone hardly tells views apart)
    np.testing.assert_array_equal(np.stack(shown), _test_images(records, split.test, crop))
    predicted, top1 = _reference(env[run_name], records, split.test, crop)
    np.testing.assert_array_equal(result["predicted"], predicted)
    assert result["top1_accuracy"] == pytest.approx(top1, abs=1e-12)
    assert result["num_images"] == split.test.size == 11
    assert result["held_out"] is False  # the runs' config.json records no held-out split


def test_a_planted_wrong_label_costs_one_test_image(env):
    """Record t (label a, predicted a) is given the image of a test record predicted b != a:
    labelled a, it shows b's face, so exactly one more test image is wrong."""
    records = [dict(r) for r in env["records"]]
    opened = evaluation.open_face_records(records)
    split = evaluation.records_split(opened, fraction=FRACTION, seed=0)
    run = evaluation.Embedder(env["cos"])
    base = evaluation.classification_report(run, opened, split)
    pred, labels = base["predicted"], base["labels"]
    t = next((j for j in range(pred.size) if pred[j] == labels[j]), None)
    assert t is not None, f"the trained run gets no test image right: {pred} vs {labels}"
    u = next((j for j in range(pred.size) if pred[j] != labels[t]), None)
    assert u is not None, f"the trained run predicts one identity only: {pred}"
    records[split.test[t]] = {"image": records[split.test[u]]["image"],
                              "label": records[split.test[t]]["label"]}
    planted = evaluation.classification_report(run, evaluation.open_face_records(records), split)
    assert planted["num_correct"] == base["num_correct"] - 1
    assert planted["top1_accuracy"] == pytest.approx(base["top1_accuracy"] - 1 / pred.size)


def test_a_run_recording_the_split_is_held_out_and_another_split_is_refused(env, tmp_path):
    run_dir = tmp_path / "cos"
    shutil.copytree(env["cos"], run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    opened = evaluation.open_face_records(env["records"])
    split = evaluation.records_split(opened, fraction=FRACTION, seed=0)
    for fraction, seed, held in ((FRACTION, 0, True), (0.5, 0, None), (FRACTION, 2, None)):
        (run_dir / "config.json").write_text(json.dumps(
            {**cfg, "holdout_fraction": fraction, "holdout_seed": seed}))
        run = evaluation.Embedder(str(run_dir))
        if held:
            assert evaluation.classification_report(run, opened, split)["held_out"] is True
        else:
            with pytest.raises(ValueError, match="evaluate on the run's own split"):
                evaluation.classification_report(run, opened, split)


def test_the_trainers_holdout_flags_leave_the_test_images_out(env, tmp_path):
    """--holdout_fraction / --holdout_seed: the trainer reads kdface.data.TrainingView of its
    data (every record is read once to hash it, then only the training side), its epochs count
    the training images, config.json records the split, and evaluate calls it held out."""
    from kdface.training._run import run
    records = env["records"]
    split = evaluation.records_split(evaluation.open_face_records(records), fraction=FRACTION,
                                     seed=0)
    source = LoggedSource(records)
    source.read = []
    cfg = tiny_config(tmp_path / "held", steps=None, epochs=1, holdout_fraction=FRACTION,
                      holdout_seed=0)
    run(cfg, data_dir=str(tmp_path), source=source, num_classes=CLASSES)
    saved = json.loads((tmp_path / "held" / "config.json").read_text())
    assert saved["holdout_fraction"] == FRACTION and saved["holdout_seed"] == 0
    # one epoch of the training side only: ceil(len(train) / batch) steps
    assert saved["resolved_steps"] == math.ceil(split.train.size / cfg.batch_size)
    hashed, trained = source.read[:len(records)], source.read[len(records):]
    assert sorted(hashed) == list(range(len(records)))
    assert trained and not set(trained) & set(split.test.tolist())
    report = evaluation.classification_report(evaluation.Embedder(str(tmp_path / "held")),
                                              evaluation.open_face_records(records), split)
    assert report["held_out"] is True


def test_bad_inputs_are_one_line_errors(env, tmp_path):
    records = env["records"]
    run = evaluation.Embedder(env["cos"])
    more = records + [{"image": records[0]["image"], "label": CLASSES}]  # a fifth class
    with pytest.raises(ValueError, match="head has 4 classes but records has 5") as err:
        evaluation.classification_report(run, more, fraction=FRACTION)
    assert "\n" not in str(err.value)
    np.savez(tmp_path / "e.npz", emb=np.zeros((2, 8)), issame=np.ones(1, bool))
    with pytest.raises(ValueError, match="has no classification head") as err:
        evaluation.classification_report(evaluation.EmbeddingFile(str(tmp_path / "e.npz")),
                                          records, fraction=FRACTION)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="split of records is empty: no identity has the 20 "
                                         "distinct images"):
        evaluation.classification_report(run, records, fraction=0.05)
    with pytest.raises(ValueError, match="is empty"):
        evaluation.Classification([])


# --- the command ---------------------------------------------------------------------------

def test_cli_prints_the_figure_and_writes_it(env, capsys):
    tmp = env["tmp"]
    out = tmp / "report"
    code = evaluate.main(["prog", f"--runs=cos={env['cos']},soft={env['soft']}",
                          f"--top1_data={tmp / 'train.rec'}", f"--top1_fraction={FRACTION}",
                          "--nomodel_facts", f"--out={out}"])
    text = capsys.readouterr().out
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    rec = evaluation.open_face_records(str(tmp / "train.rec"))
    split = evaluation.records_split(rec, fraction=FRACTION, seed=0)
    for name in ("cos", "soft"):
        got = report["runs"][name]["classification"]
        want = evaluation.classification_report(evaluation.Embedder(env[name]), rec, split)
        assert got["top1_accuracy"] == pytest.approx(want["top1_accuracy"], abs=1e-12)
        assert got["num_images"] == 11 and got["held_out"] is False
        assert f"| {name} | 11 | 4 | {want['top1_accuracy']:.4f} | **no** |" in text
    assert "## Classification top-1" in text and "held out of training" in text
    assert report["classification"]["num_test_images"] == 11
    assert "training-set figure" in " ".join(report["runs"]["cos"]["notes"])


@pytest.mark.parametrize("args,code,needle", [
    (["--top1_fraction=1.5"], 2, "--top1_fraction must lie in (0, 1), got 1.5"),
    (["--top1_seed=-1"], 2, "--top1_seed must be >= 0"),
    (["--top1_fraction=0.01"], 1, "is empty: no identity has the 100 distinct images"),
])
def test_cli_errors_are_one_line(env, args, code, needle, capsys):
    tmp = env["tmp"]
    got = evaluate.main(["prog", f"--runs=cos={env['cos']}", f"--top1_data={tmp / 'train.rec'}",
                         "--nomodel_facts", f"--out={tmp / 'bad'}", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert got == code and needle in lines[0]
    # the message is one line; a usage error adds the command's pointer to --help
    assert lines[1:] == ([] if code == 1 else
                         ["Run python -m kdface.evaluate --help for the flags."])


def test_cli_help_lists_the_top1_flags(capsys):
    assert evaluate.main(["prog", "--help"]) == 0
    text = capsys.readouterr().out
    for needle in ("--top1_data", "--top1_fraction", "--top1_seed", "Classification top-1",
                   "we randomly split them into training and testing samples"):
        assert needle in text


def test_cli_refuses_a_run_of_other_classes(env, tmp_path, capsys):
    faces = _faces() + [(CLASSES, np.full((SIZE, SIZE, 3), 9, np.uint8))] * 2
    write_recordio(tmp_path / "five.rec", faces)
    code = evaluate.main(["prog", f"--runs=cos={env['cos']}", f"--top1_data={tmp_path}/five.rec",
                          "--nomodel_facts", f"--out={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "head has 4 classes but" in err and "has 5" in err
    assert len(err.splitlines()) == 1
