"""Verification .bin (incl. malicious pickles), LFW pairs.txt and folder-per-identity readers."""
from __future__ import annotations

import builtins
import os
import pickle
import struct

import numpy as np
import pytest

from kdface.data import (
    UndecodableImageError,
    UnsafePickleError,
    encode_image,
    read_identity_folders,
    read_lfw_pairs,
    read_verification_bin,
    read_verification_bin_encoded,
    write_lfw_pairs,
    write_verification_bin,
)


def images(n, h=12, w=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# -- verification .bin ------------------------------------------------------------------------


def test_bin_round_trip_png_exact_and_jpeg_close(tmp_path):
    imgs = images(6)
    issame = [True, False, True]
    write_verification_bin(tmp_path / "a.bin", imgs, issame, format="png")
    got, same = read_verification_bin(tmp_path / "a.bin")
    assert got.dtype == np.uint8 and got.shape == (6, 12, 10, 3)
    np.testing.assert_array_equal(got, imgs)
    assert same.dtype == bool and same.tolist() == issame
    smooth = np.repeat(np.repeat(images(6, 3, 3, seed=1), 8, axis=1), 8, axis=2)
    write_verification_bin(tmp_path / "b.bin", smooth, issame, quality=98)
    got, _ = read_verification_bin(tmp_path / "b.bin")
    # JPEG (with chroma subsampling) is lossy; a channel swap would be off by far more.
    assert np.abs(got.astype(int) - smooth).mean() < 10.0
    assert np.abs(got.astype(int) - smooth[..., ::-1]).mean() > 40.0
    with open(tmp_path / "a.bin", "rb") as f:  # insightface's own reader sees (bins, issame)
        bins, issame_list = pickle.load(f)
    assert isinstance(bins[0], bytes) and issame_list == issame


def test_bin_accepts_encoded_bytes_and_numpy_variants(tmp_path):
    imgs = images(4, seed=2)
    encoded = [encode_image(im, format="png") for im in imgs]
    write_verification_bin(tmp_path / "e.bin", encoded, np.array([False, True]))
    assert read_verification_bin_encoded(tmp_path / "e.bin")[0] == encoded
    variants = [
        (encoded, np.array([False, True])),
        ([np.frombuffer(b, np.uint8) for b in encoded], [np.bool_(False), np.bool_(True)]),
        (tuple(encoded), (0, 1)),
    ]
    for protocol in (2, 4, 5):
        for bins, same in variants:
            path = tmp_path / f"v{protocol}.bin"
            path.write_bytes(pickle.dumps((bins, same), protocol=protocol))
            got, flags = read_verification_bin(path)
            np.testing.assert_array_equal(got, imgs)
            assert flags.tolist() == [False, True]


def test_bin_written_by_python2_needs_bytes_encoding(tmp_path):
    imgs = images(2, seed=3)
    encoded = [encode_image(im, format="png") for im in imgs]
    # Protocol 2 as Python 2 wrote it: py2 str as BINSTRING ('T' + int32 length + bytes).
    body = b"".join(b"T" + struct.pack("<i", len(b)) + b for b in encoded)
    raw = b"\x80\x02(](" + body + b"e](\x88et."
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(raw)  # why old files need encoding='bytes'
    (tmp_path / "py2.bin").write_bytes(raw)
    got, same = read_verification_bin(tmp_path / "py2.bin")
    np.testing.assert_array_equal(got, imgs)
    assert same.tolist() == [True]


class _OpenFile:
    """Unpickling this calls builtins.open(path, 'w'): creates a file, a visible side effect."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


class _System:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(_OpenFile(str(control)))).close()
    assert control.exists()  # the payload really has a side effect when unpickled plainly
    for i, payload in enumerate([_OpenFile, _System]):
        marker = tmp_path / f"marker_{i}"
        path = tmp_path / f"evil_{i}.bin"
        encoded = [encode_image(images(1)[0], format="png")] * 2
        path.write_bytes(pickle.dumps((encoded + [payload(str(marker))], [True])))
        with pytest.raises(UnsafePickleError, match="refusing the global"):
            read_verification_bin(path)
        assert not marker.exists()


def test_restricted_unpickler_refuses_build_and_object_arrays(tmp_path):
    from kdface.data import _verification_bin as vb

    # GLOBAL numpy.dtype, then BUILD {'evil': 1} on the allowed helper itself.
    path = tmp_path / "build.bin"
    path.write_bytes(b"\x80\x02cnumpy\ndtype\n}X\x04\x00\x00\x00evilK\x01sb.")
    with pytest.raises(UnsafePickleError, match="BUILD"):
        read_verification_bin(path)
    assert not hasattr(vb._safe_dtype, "evil")
    path.write_bytes(pickle.dumps(([b"x", b"y"], np.array([1, "a"], dtype=object)[:1])))
    with pytest.raises(UnsafePickleError, match="dtype"):
        read_verification_bin(path)
    path.write_bytes(pickle.dumps(([b"x", b"y"], np.array([1.5]))))
    with pytest.raises(UnsafePickleError, match="dtype"):
        read_verification_bin(path)


def test_bin_content_errors(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True])))
    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        read_verification_bin(path)
    path.write_bytes(pickle.dumps(([b"a", b"b"], ["yes"])))
    with pytest.raises(ValueError, match="issame_list"):
        read_verification_bin(path)
    path.write_bytes(pickle.dumps({"bins": []}))
    with pytest.raises(ValueError, match="bins, issame_list"):
        read_verification_bin(path)
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a readable"):
        read_verification_bin(path)
    good = encode_image(images(1)[0], format="png")
    path.write_bytes(pickle.dumps(([good, b"garbage"], [False])))
    with pytest.raises(UndecodableImageError, match=r"image 1 \(pair 0\)"):
        read_verification_bin(path)
    other = encode_image(images(1, h=5)[0], format="png")
    path.write_bytes(pickle.dumps(([good, other], [False])))
    with pytest.raises(ValueError, match="one image size"):
        read_verification_bin(path)
    with pytest.raises(ValueError, match="twice as many"):
        write_verification_bin(path, images(3), [True])


# -- LFW pairs.txt ----------------------------------------------------------------------------


def _lfw_tree(root, names=("Ann_A", "Bob_B", "Cid_C"), count=3, seed=0):
    rng = np.random.default_rng(seed)
    truth = {}
    for name in names:
        (root / name).mkdir(parents=True)
        for n in range(1, count + 1):
            image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            (root / name / f"{name}_{n:04d}.png").write_bytes(encode_image(image, format="png"))
            truth[(name, n)] = image
    return truth


PAIRS = [("Ann_A", 1, 2), ("Bob_B", 1, 3), ("Ann_A", 1, "Bob_B", 2), ("Cid_C", 3, "Ann_A", 3),
         ("Cid_C", 1, 2), ("Bob_B", 2, 3), ("Bob_B", 3, "Cid_C", 1), ("Ann_A", 2, "Cid_C", 2)]


def test_lfw_pairs_with_header(tmp_path):
    truth = _lfw_tree(tmp_path / "img")
    write_lfw_pairs(tmp_path / "pairs.txt", PAIRS, num_folds=2)
    assert (tmp_path / "pairs.txt").read_text().splitlines()[:2] == ["2\t2", "Ann_A\t1\t2"]
    result = read_lfw_pairs(tmp_path / "pairs.txt", tmp_path / "img", ext="png")
    imgs, issame, folds = result
    assert result.skipped == 0 and imgs.shape == (16, 8, 8, 3)
    assert issame.tolist() == [True, True, False, False] * 2
    assert folds.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    np.testing.assert_array_equal(imgs[4], truth[("Ann_A", 1)])
    np.testing.assert_array_equal(imgs[5], truth[("Bob_B", 2)])
    np.testing.assert_array_equal(imgs[15], truth[("Cid_C", 2)])
    paths = read_lfw_pairs(tmp_path / "pairs.txt", tmp_path / "img", ext=".png",
                           load_images=False).images
    assert paths[7] == os.path.join(tmp_path / "img", "Ann_A", "Ann_A_0003.png")


def test_lfw_pairs_headerless_and_bad_header(tmp_path):
    _lfw_tree(tmp_path / "img")
    pairs = PAIRS + PAIRS[:2] + PAIRS[2:4]  # 12 pairs -> folds 10*i//12
    write_lfw_pairs(tmp_path / "p.txt", pairs, num_folds=None)
    _, issame, folds = read_lfw_pairs(tmp_path / "p.txt", tmp_path / "img", ext="png",
                                      load_images=False)
    assert folds.tolist() == [10 * i // 12 for i in range(12)]
    assert issame.sum() == 6
    (tmp_path / "bad.txt").write_text("10 300\nAnn_A 1 2\n")
    with pytest.raises(ValueError, match="announces 6000 pairs"):
        read_lfw_pairs(tmp_path / "bad.txt", tmp_path / "img")
    (tmp_path / "bad.txt").write_text("Ann_A 1\n")
    with pytest.raises(ValueError, match=r"bad.txt:1"):
        read_lfw_pairs(tmp_path / "bad.txt", tmp_path / "img")


def test_lfw_pairs_missing_files_fail_or_skip_with_count(tmp_path):
    _lfw_tree(tmp_path / "img")
    os.remove(tmp_path / "img" / "Bob_B" / "Bob_B_0003.png")  # used by 3 pairs
    write_lfw_pairs(tmp_path / "pairs.txt", PAIRS, num_folds=2)
    with pytest.raises(FileNotFoundError, match="3 of 8 pairs refer to 1 missing.*Bob_B_0003.png"):
        read_lfw_pairs(tmp_path / "pairs.txt", tmp_path / "img", ext="png")
    result = read_lfw_pairs(tmp_path / "pairs.txt", tmp_path / "img", ext="png",
                            on_missing="skip")
    assert result.skipped == 3 and result.images.shape[0] == 10
    assert result.folds.tolist() == [0, 0, 0, 1, 1]  # pairs 0, 2, 3, 4, 7 remain
    assert result.issame.tolist() == [True, False, False, True, False]
    assert pickle.loads(pickle.dumps(result)).skipped == 3
    with pytest.raises(ValueError, match="on_missing"):
        read_lfw_pairs(tmp_path / "pairs.txt", tmp_path / "img", on_missing="ignore")


# -- folder per identity ----------------------------------------------------------------------


def test_identity_folders_labels_sorted_and_undecodable(tmp_path):
    root = tmp_path / "train"
    for name, n in (("zed", 2), ("amy", 1), ("Bea", 2), ("empty", 0)):
        (root / name).mkdir(parents=True)
        for k in range(n):
            (root / name / f"{k}.jpg").write_bytes(encode_image(images(1, seed=k)[0]))
    (root / "amy" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    samples, names = read_identity_folders(root)
    assert names == ["Bea", "amy", "zed"]  # code-point order; empty folder has no label
    assert [label for label, _ in samples] == [0, 0, 1, 2, 2]
    assert samples[2][1] == os.path.join(root, "amy", "0.jpg")
    (root / "amy" / "1.png").write_bytes(b"broken png")
    with pytest.raises(UndecodableImageError, match="1.png"):
        read_identity_folders(root)
    result = read_identity_folders(root, on_undecodable="skip")
    assert result.skipped == 1 and len(result.samples) == 5
    assert len(read_identity_folders(root, on_undecodable="unchecked").samples) == 6
    with pytest.raises(ValueError, match="on_undecodable"):
        read_identity_folders(root, on_undecodable="warn")
    with pytest.raises(FileNotFoundError):
        read_identity_folders(tmp_path / "nope")
