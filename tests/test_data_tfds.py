"""tfds builders: round trips from every source format, skip/error behaviour, and a build + read
in a subprocess where TensorFlow cannot be imported."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kdface.data import _tfds_builders as builders
from kdface.data._images import encode_image
from kdface.data._pairs import write_lfw_pairs
from kdface.data._recordio import RecordIO, write_recordio
from kdface.data._verification_bin import write_verification_bin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n, seed=0, size=16):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture
def rec_path(tmp_path):
    images = _images(7)
    path = tmp_path / "faces.rec"
    write_recordio(path, [(i % 3, images[i]) for i in range(7)])
    return path


def test_training_round_trip_from_recordio(rec_path, tmp_path):
    summary = builders.build_training_dataset(rec_path, tmp_path / "data")
    name = summary["name"]  # <folder>_<stem>_<8 hex digits of the content fingerprint>
    assert name == f"{tmp_path.name}_faces_{summary['fingerprint'][:8]}"
    assert summary["images"] == 7
    assert summary["identities"] == 3 and summary["num_classes"] == 3 and summary["skipped"] == 0
    assert summary["features"] == ["image", "label"]
    source = builders.load_training_source(tmp_path / "data", name)
    assert len(source) == 7
    got = sorted((int(source[i]["label"]), source[i]["image"]) for i in range(len(source)))
    rec = RecordIO(rec_path)
    want = sorted(rec.read_encoded(i) for i in range(len(rec)))
    assert got == want  # same labels, byte-identical encoded images (nothing re-compressed)
    # Built datasets are reused, and can be rebuilt.
    again = builders.build_training_dataset(rec_path, tmp_path / "data")
    assert again["images"] == 7
    assert builders.build_training_dataset(rec_path, tmp_path / "data",
                                           overwrite=True)["images"] == 7


def test_training_landmarks_and_folders(tmp_path):
    root = tmp_path / "people"
    images = _images(5, seed=1)
    names = ["bob", "alice", "alice", "carol", "bob"]
    keys = []
    for i, (name, image) in enumerate(zip(names, images)):
        os.makedirs(root / name, exist_ok=True)
        with open(root / name / f"{i}.png", "wb") as f:
            f.write(encode_image(image, format="png"))
        keys.append(f"{name}/{i}.png")
    points = np.arange(50, dtype=np.float32).reshape(5, 5, 2)
    csv_path = tmp_path / "landmarks.csv"
    builders.write_landmarks_csv(csv_path, keys, points)
    summary = builders.build_training_dataset(root, tmp_path / "data", name="people",
                                              landmarks=csv_path)
    assert summary["source_format"] == "folders"
    assert summary["identities"] == 3 and summary["images"] == 5
    assert summary["features"] == ["image", "label", "landmarks"]
    source = builders.load_training_source(tmp_path / "data", "people")
    by_bytes = {source[i]["image"]: source[i] for i in range(len(source))}
    label_of = {"alice": 0, "bob": 1, "carol": 2}  # sorted folder names
    for i, (name, image) in enumerate(zip(names, images)):
        record = by_bytes[encode_image(image, format="png")]
        assert int(record["label"]) == label_of[name]
        np.testing.assert_array_equal(record["landmarks"], points[i])


def test_undecodable_records_fail_or_are_skipped(tmp_path):
    images = _images(3)
    path = tmp_path / "bad.rec"
    write_recordio(path, [(0, images[0]), (1, b"definitely not a jpeg"), (1, images[2])])
    with pytest.raises(ValueError, match="not a decodable image"):
        builders.build_training_dataset(path, tmp_path / "data")
    summary = builders.build_training_dataset(path, tmp_path / "data", skip_undecodable=True,
                                              overwrite=True)
    assert summary["images"] == 2 and summary["skipped"] == 1


def test_verification_round_trip_from_bin(tmp_path):
    images = _images(40, seed=2)
    issame = np.arange(20) % 3 == 0
    path = tmp_path / "lfw.bin"
    write_verification_bin(path, images, issame)
    summary = builders.build_verification_dataset(path, tmp_path / "data")
    assert summary["name"] == "lfw" and summary["pairs"] == 20
    assert summary["same"] == int(issame.sum()) and summary["num_folds"] == 10
    source = builders.load_verification_source(tmp_path / "data", "lfw")
    from kdface.data._verification_bin import read_verification_bin_encoded
    encoded, _ = read_verification_bin_encoded(path)
    for i in range(20):  # source order is kept
        record = source[i]
        assert record["image1"] == encoded[2 * i] and record["image2"] == encoded[2 * i + 1]
        assert bool(record["issame"]) == issame[i]
        assert int(record["pair"]) == i and int(record["fold"]) == i // 2  # contiguous folds


def test_verification_from_pairs_txt_with_missing_images(tmp_path):
    root = tmp_path / "lfw"
    images = _images(4, seed=3)
    for k, (name, n) in enumerate([("ann", 1), ("ann", 2), ("ben", 1), ("cat", 1)]):
        os.makedirs(root / name, exist_ok=True)
        with open(root / name / f"{name}_{n:04d}.jpg", "wb") as f:
            f.write(encode_image(images[k]))
    pairs = tmp_path / "pairs.txt"
    write_lfw_pairs(pairs, [("ann", 1, 2), ("ben", 1, 3), ("ann", 1, "ben", 1),
                            ("ann", 2, "cat", 1)], num_folds=1)
    with pytest.raises(FileNotFoundError, match="missing"):
        builders.build_verification_dataset(pairs, tmp_path / "data", images_root=root)
    summary = builders.build_verification_dataset(pairs, tmp_path / "data", images_root=root,
                                                  skip_missing=True, name="lfw_pairs")
    assert summary["pairs"] == 3 and summary["skipped"] == 1 and summary["same"] == 1
    source = builders.load_verification_source(tmp_path / "data", "lfw_pairs")
    assert [bool(source[i]["issame"]) for i in range(3)] == [True, False, False]
    with open(root / "ann" / "ann_0001.jpg", "rb") as f:
        assert source[0]["image1"] == f.read()


def test_bad_arguments(tmp_path, rec_path):
    with pytest.raises(FileNotFoundError):
        builders.build_training_dataset(tmp_path / "nope.rec", tmp_path / "data")
    with pytest.raises(ValueError, match="source_format"):
        builders.build_training_dataset(rec_path, tmp_path / "data", source_format="tfrecord")
    with pytest.raises(ValueError, match="name"):
        builders.build_training_dataset(rec_path, tmp_path / "data", name="a/b")
    with pytest.raises(ValueError, match="images_root"):
        (tmp_path / "p.txt").write_text("1 1\n")
        builders.build_verification_dataset(tmp_path / "p.txt", tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="no training dataset named 'missing'"):
        builders.load_training_source(tmp_path / "data", "missing")


_NO_TF_SCRIPT = """
import importlib.abc, importlib.machinery, sys
attempts = []

class _Refuse(importlib.abc.Loader):
    def create_module(self, spec):
        attempts.append(spec.name)
        raise ImportError("TensorFlow is blocked in this test")
    def exec_module(self, module):
        raise ImportError("blocked")

class _BlockTensorFlow(importlib.abc.MetaPathFinder):
    # A spec whose loader refuses: every `import tensorflow` fails, whether or not it exists.
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return importlib.machinery.ModuleSpec(name, _Refuse())
        return None

sys.meta_path.insert(0, _BlockTensorFlow())
import numpy as np
from kdface.data import _tfds_builders as b
from kdface.data._recordio import write_recordio
from kdface.data._verification_bin import write_verification_bin
out = sys.argv[1]
images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
write_recordio(out + "/t.rec", [(i % 2, images[i]) for i in range(4)])
write_verification_bin(out + "/v.bin", images, [True, False])
built = b.build_training_dataset(out + "/t.rec", out + "/data")
assert built["images"] == 4
assert b.build_verification_dataset(out + "/v.bin", out + "/data")["pairs"] == 2
src = b.load_training_source(out + "/data", built["name"])
assert sorted(int(src[i]["label"]) for i in range(4)) == [0, 0, 1, 1]
assert bool(b.load_verification_source(out + "/data", "v")[0]["issame"])
loaded = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
print("OK", loaded, attempts)
"""


def test_build_and_read_without_tensorflow(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_NO_TF_SCRIPT),
                             str(tmp_path)], capture_output=True, text=True, env=env,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("OK [] "), last  # no tensorflow module was ever loaded


def test_data_prep_cli(tmp_path, rec_path, capsys):
    import json

    from data_prep import build
    assert build.main(["recordio", str(rec_path), "--data-dir", str(tmp_path / "d"),
                       "--name", "mine", "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary[0]["name"] == "mine" and summary[0]["images"] == 7
    assert build.main(["synthetic", str(tmp_path / "s"), "--num-identities", "3",
                       "--images-per-identity", "2", "--num-verification-identities", "20",
                       "--num-verification-pairs", "20", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "synth_train: images 6, identities 3, skipped 0, with landmarks" in out
    assert "synth_val: pairs 20 (same 10), folds 10, skipped 0" in out
    assert build.main(["recordio", str(tmp_path / "missing.rec"), "--data-dir",
                       str(tmp_path / "d")]) == 2
    assert "not found" in capsys.readouterr().err
