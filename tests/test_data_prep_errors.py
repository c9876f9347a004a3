"""Damaged JPEGs are refused or skipped, and data_prep / dataset look-ups fail in one line.

The damaged JPEGs are made from a real ``cv2.imencode`` JPEG in the ways libjpeg warns about
("Corrupt JPEG data: premature end of data segment", "... extraneous bytes before marker"),
which OpenCV's ``imdecode`` decodes without complaint (asserted) into grey or garbage blocks.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import cv2
import numpy as np
import pytest

from data_prep import build as data_prep_build
from kdface.data import (
    UndecodableImageError,
    build_training_dataset,
    build_verification_dataset,
    decode_image,
    load_verification_source,
    read_identity_folders,
    read_verification_bin,
    write_recordio,
    write_verification_bin,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clean_jpeg(seed=0, size=48):
    rng = np.random.default_rng(seed)
    bgr = cv2.GaussianBlur((rng.random((size, size, 3)) * 255).astype(np.uint8), (5, 5), 2)
    return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def damaged_jpegs(data):
    """The ways a JPEG inside a .rec gets damaged, each past the start-of-scan marker."""
    scan = data.find(b"\xff\xda")
    mid = (scan + len(data)) // 2
    rng = np.random.default_rng(1)
    garbage = bytearray(data)
    garbage[mid:mid + 48] = rng.integers(0, 256, 48, dtype=np.uint8).tobytes()
    return {
        "entropy data cut, EOI kept": data[:mid] + data[mid + 200:],
        "truncated, EOI re-appended": data[:mid] + b"\xff\xd9",
        "garbage in the middle": bytes(garbage),
        "garbage inserted": data[:mid] + rng.integers(0, 256, 200, np.uint8).tobytes()
        + data[mid:],
        "truncated file": data[:mid],
    }


def test_damaged_jpegs_are_refused_and_clean_ones_pass():
    data = clean_jpeg()
    reference = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    np.testing.assert_array_equal(decode_image(data, strict=True), reference)
    column = np.frombuffer(data, np.uint8).reshape(-1, 1)  # older cv2.imencode output
    np.testing.assert_array_equal(decode_image(column, strict=True), reference)
    np.testing.assert_array_equal(decode_image(data + b"\0\0", strict=True), reference)
    png = cv2.imencode(".png", reference)[1]
    assert decode_image(png, strict=True).shape == reference.shape
    for how, bad in damaged_jpegs(data).items():
        if how != "truncated file":  # OpenCV hands back an image for these ...
            assert cv2.imdecode(np.frombuffer(bad, np.uint8), cv2.IMREAD_COLOR) is not None
        with pytest.raises(UndecodableImageError, match="^x.rec key 7: damaged JPEG"):
            decode_image(bad, name="x.rec key 7", strict=True)  # ... strict refuses them


def test_damaged_jpeg_in_rec_is_refused_with_its_key_or_skipped(tmp_path):
    data = clean_jpeg()
    bad = damaged_jpegs(data)["entropy data cut, EOI kept"]
    rec = tmp_path / "train.rec"
    write_recordio(rec, [(0, data), (0, bad), (1, data)], layout="legacy")
    with pytest.raises(UndecodableImageError, match=r"key 2 \(image 1\): damaged JPEG"):
        build_training_dataset(rec, tmp_path / "data")
    summary = build_training_dataset(rec, tmp_path / "data", skip_undecodable=True)
    assert summary["images"] == 2 and summary["skipped"] == 1


def test_damaged_jpeg_in_folders_and_bin(tmp_path):
    data = clean_jpeg()
    bad = damaged_jpegs(data)["garbage in the middle"]
    os.makedirs(tmp_path / "people" / "ann")
    (tmp_path / "people" / "ann" / "1.jpg").write_bytes(data)
    (tmp_path / "people" / "ann" / "2.jpg").write_bytes(bad)
    with pytest.raises(UndecodableImageError, match="2.jpg: damaged JPEG"):
        read_identity_folders(tmp_path / "people")
    assert read_identity_folders(tmp_path / "people", on_undecodable="skip").skipped == 1
    write_verification_bin(tmp_path / "v.bin", [data, bad], [True])
    with pytest.raises(UndecodableImageError, match=r"image 1 \(pair 0\): damaged JPEG"):
        read_verification_bin(tmp_path / "v.bin")
    assert read_verification_bin(tmp_path / "v.bin", strict=False)[0].shape[0] == 2
    with pytest.raises(UndecodableImageError):
        build_verification_dataset(tmp_path / "v.bin", tmp_path / "data")


def run_cli(capfd, *argv):
    """``data_prep.build`` in this process; (exit status, stdout, stderr) at the fd level."""
    status = data_prep_build.main(list(argv))
    out, err = capfd.readouterr()
    return status, out, err


def test_data_prep_errors_are_one_line(tmp_path, capfd):
    data_dir = str(tmp_path / "data")

    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([_Payload()], [True])))
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    rec = tmp_path / "dmg" / "train.rec"
    rec.parent.mkdir()
    data = clean_jpeg()
    write_recordio(rec, [(0, data), (1, damaged_jpegs(data)["garbage inserted"])])
    tries = [
        (["verification-bin", str(evil)], "refusing the global"),
        (["verification-bin", str(empty)], "empty.bin is empty (0 bytes)"),
        (["verification-bin", str(tmp_path / "lfw.bin")], "verification source not found"),
        (["recordio", str(tmp_path / "none" / "train.rec")], "training source not found"),
        (["recordio", str(rec)], "damaged JPEG"),
    ]
    for argv, cause in tries:
        status, out, err = run_cli(capfd, *argv, "--data-dir", data_dir, "--quiet")
        assert status == 2 and out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and cause in lines[0], err
        assert "Traceback" not in err and "pwned" not in out + err
    assert "--skip-undecodable" in lines[0]  # the damaged-image error names the flag
    status, _, err = run_cli(capfd, "recordio", str(rec), "--data-dir", data_dir, "--quiet",
                             "--skip-undecodable")
    assert status == 0
    with pytest.raises(ValueError, match="empty"):  # --verbose: the exception itself
        data_prep_build.main(["verification-bin", str(empty), "--data-dir", data_dir,
                              "--verbose"])


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_data_prep_refused_pickle_in_a_fresh_process(tmp_path):
    # The real command line: stderr is one line, the exit status non-zero, nothing ran.
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([_Payload()], [True])))
    result = subprocess.run(
        [sys.executable, "-m", "data_prep.build", "verification-bin", str(evil),
         "--data-dir", str(tmp_path / "data"), "--quiet"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {evil}: refusing the global "), lines
    assert "pwned" not in result.stderr


def test_truncated_bin_says_so(tmp_path):
    path = tmp_path / "cut.bin"
    path.write_bytes(pickle.dumps(([b"x", b"y"], [True]))[:-3])
    with pytest.raises(ValueError, match="not a readable verification .bin pickle \\(the "
                                         "pickle ends early: the file is truncated; 27 bytes"):
        read_verification_bin(path)


def test_missing_verification_set_names_the_file_built_sets_and_command(tmp_path):
    data_dir = tmp_path / "data"
    write_verification_bin(tmp_path / "cfp_fp.bin", [clean_jpeg(), clean_jpeg(1)], [False])
    build_verification_dataset(tmp_path / "cfp_fp.bin", data_dir)
    with pytest.raises(FileNotFoundError) as err:
        load_verification_source(data_dir, "lfw.bin")
    message = str(err.value)
    assert message.startswith("file lfw.bin not found")
    assert "built there: cfp_fp" in message and "on_missing" not in message
    assert f"python -m data_prep.build verification-bin PATH.bin --data-dir {data_dir}" in message
    with pytest.raises(FileNotFoundError, match="no verification dataset named 'agedb'"):
        load_verification_source(data_dir, "agedb")
    with pytest.raises(FileNotFoundError, match="none is built there"):
        load_verification_source(tmp_path / "empty_dir", "lfw")
    # The trainer's --val_data resolution raises the same message.
    from kdface.training._run import resolve_verification_sets
    with pytest.raises(FileNotFoundError, match="file lfw.bin not found.*built there: cfp_fp"):
        resolve_verification_sets(["lfw.bin"], str(data_dir), (112, 112))
