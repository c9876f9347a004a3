"""insightface's own files, written here the way its tools write them, read by kdface.

Every file is produced by a few lines that follow the insightface script named in each test
(``build_eval_pack.py`` / ``agedb2pack2.py`` / ``cfp2pack.py`` for ``.bin``, arcface_mxnet's
``RecBuilder`` and ``face2rec2.py`` for ``.rec``) with plain ``struct``/``pickle``, not with
kdface's writers; MXNet's record framing is re-implemented from dmlc-core's ``recordio.h``
(magic ``0xced7230a``, ``lrec = cflag << 29 | length``, 4-byte padding) and the ``IRHeader``
``<IfQQ`` of ``mx.recordio.pack``. arcface_torch's ``MXFaceDataset`` reading logic is
re-implemented the same way to check that kdface's files read the same in insightface.
"""
from __future__ import annotations

import os
import pickle
import shutil
import struct

import cv2
import numpy as np
import pytest

from data_prep import build as data_prep_build
from kdface.data import (
    RecordIO,
    build_recordio_index,
    build_training_dataset,
    build_verification_dataset,
    kfold_fold_ids,
    load_dataset_metadata,
    load_training_source,
    load_verification_source,
    read_verification_bin,
    read_verification_bin_encoded,
    write_recordio,
    write_verification_bin,
)

MAGIC = 0xCED7230A


def faces(n, size=24, seed=0):
    """Smooth random BGR images (JPEG-friendly), as cv2.imread would hand them over."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        out.append(cv2.GaussianBlur(img, (5, 5), 2))
    return out


def imencode_column(bgr):
    """``cv2.imencode('.jpg', im)[1]`` as OpenCV < 5 returns it: a uint8 ``(N, 1)`` array."""
    ok, s = cv2.imencode(".jpg", bgr)
    assert ok
    return s.reshape(-1, 1)


# -- .bin written by build_eval_pack.py / agedb2pack2.py / cfp2pack.py -----------------------


def write_eval_pack(path, bins, issame_list, protocol=pickle.HIGHEST_PROTOCOL):
    # build_eval_pack.py: `_, s = cv2.imencode('.jpg', im); bins.append(s)`, then
    # `pickle.dump((bins, issame_list), f, protocol=pickle.HIGHEST_PROTOCOL)`.
    with open(path, "wb") as f:
        pickle.dump((bins, issame_list), f, protocol=protocol)


def insightface_load_bin(path):
    """arcface_torch ``load_bin``: pickle.load, then ``mx.image.imdecode(_bin)`` (RGB), whose
    ``np.frombuffer(buf, dtype=np.uint8)`` is reproduced with OpenCV here."""
    with open(path, "rb") as f:
        bins, issame_list = pickle.load(f, encoding="bytes")
    images = [cv2.imdecode(np.frombuffer(b, dtype=np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
              for b in bins]
    return np.stack(images), list(issame_list)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_bin_with_imencode_column_arrays_reads_like_insightface(tmp_path, protocol):
    bgr = faces(6)
    bins = [imencode_column(im) for im in bgr]
    assert bins[0].shape[1] == 1 and bins[0].dtype == np.uint8
    issame = [True, False, True]
    path = tmp_path / "agedb_30.bin"
    write_eval_pack(path, bins, issame, protocol)
    # The pickle holds numpy arrays, rebuilt by numpy's reconstruct functions, not bytes.
    data = path.read_bytes()
    assert (b"_reconstruct" if protocol == 2 else b"_frombuffer") in data

    encoded, flags = read_verification_bin_encoded(path)
    assert encoded == [b.tobytes() for b in bins] and flags.tolist() == issame
    got, flags = read_verification_bin(path)
    want, want_flags = insightface_load_bin(path)
    np.testing.assert_array_equal(got, want)
    assert flags.tolist() == [bool(v) for v in want_flags]

    # ... and through the command line into a built verification set, byte for byte.
    data_dir = tmp_path / "data"
    assert data_prep_build.main(["verification-bin", str(path), "--data-dir", str(data_dir),
                                 "--quiet", "--json"]) == 0
    source = load_verification_source(data_dir, "agedb_30")
    for i in range(3):
        assert source[i]["image1"] == bins[2 * i].tobytes()
        assert source[i]["image2"] == bins[2 * i + 1].tobytes()
        assert bool(source[i]["issame"]) == issame[i]


def py2_imencode_column(data):
    """The pickle Python 2's numpy wrote for ``cv2.imencode`` output ``(N, 1)`` uint8 with
    protocol 2 (``pickle.HIGHEST_PROTOCOL`` there): ``_reconstruct`` + BUILD with the
    ``numpy.dtype('u1')`` state, every string a py2 ``str`` (BINSTRING/SHORT_BINSTRING)."""
    n = struct.pack("<i", len(data))
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
            b"(K\x01J" + n + b"K\x01\x86cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R"
            b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T" + n + data
            + b"tb")


def test_bin_from_agedb2pack2_under_python2(tmp_path):
    jpegs = [imencode_column(im).tobytes() for im in faces(4, seed=8)]
    raw = (b"\x80\x02(](" + b"".join(py2_imencode_column(j) for j in jpegs)
           + b"e](\x88\x89et.")
    bins, issame = pickle.loads(raw, encoding="bytes")  # insightface's load_bin under py3
    assert bins[0].shape == (len(jpegs[0]), 1) and issame == [True, False]
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(raw)
    encoded, flags = read_verification_bin_encoded(path)
    assert encoded == jpegs and flags.tolist() == [True, False]
    want, _ = insightface_load_bin(path)
    np.testing.assert_array_equal(read_verification_bin(path)[0], want)


def test_bin_refuses_arrays_that_are_not_encoded_bytes(tmp_path):
    good = imencode_column(faces(1)[0])
    for bad, match in [(good.astype(np.float32), "refusing numpy data of dtype"),
                       (good.astype(np.int16), "got a int16 array of shape"),
                       (np.array(5, np.uint8), r"got a uint8 array of shape \(\)"),
                       (np.array(["x"], dtype=object), "object arrays|refusing")]:
        path = tmp_path / "bad.bin"
        write_eval_pack(path, [good, bad], [True])
        with pytest.raises(ValueError, match=match):
            read_verification_bin_encoded(path)


def test_write_verification_bin_uses_the_highest_protocol_like_insightface(tmp_path):
    imgs = np.stack([im[..., ::-1] for im in faces(4, seed=1)])
    path = tmp_path / "lfw.bin"
    write_verification_bin(path, imgs, [True, False])
    data = path.read_bytes()
    assert data[0] == pickle.PROTO[0] and data[1] == pickle.HIGHEST_PROTOCOL
    bins, issame_list = pickle.loads(data)  # what insightface's load_bin does first
    assert all(isinstance(b, bytes) for b in bins) and issame_list == [True, False]
    write_verification_bin(path, imgs, [True, False], protocol=2)  # Python 2 readers
    data = path.read_bytes()
    assert data[:2] == bytes([pickle.PROTO[0], 2])
    assert read_verification_bin_encoded(path)[0] == bins
    with pytest.raises(ValueError, match="protocol"):
        write_verification_bin(path, imgs, [True, False], protocol=1)


# -- folds: sklearn KFold(n_splits=10, shuffle=False), as insightface's verification.py ----


def kfold_reference(n, k):
    """sklearn's documented KFold rule as a loop: "The first n_samples % n_splits folds have
    size n_samples // n_splits + 1, other folds have size n_samples // n_splits"."""
    fold_of, start = [None] * n, 0
    for fold in range(k):
        size = n // k + (1 if fold < n % k else 0)
        for i in range(start, start + size):
            fold_of[i] = fold
        start += size
    return fold_of


def test_fold_ids_match_kfold():
    try:
        from sklearn.model_selection import KFold
    except ImportError:  # not a dependency; compared against when it happens to be installed
        KFold = None
    from kdface.metrics import fold_bounds
    for n in (10, 23, 29, 600, 6007):
        for k in (2, 10):
            got = kfold_fold_ids(n, k)
            assert got.dtype == np.int64 and got.tolist() == kfold_reference(n, k)
            bounds = fold_bounds(n, k)  # the metrics' own (independent) KFold blocks
            assert all((got[a:b] == f).all() for f, (a, b) in enumerate(bounds))
            if KFold is not None:
                want = np.empty(n, np.int64)
                for f, (_, test) in enumerate(KFold(n_splits=k, shuffle=False).split(
                        np.zeros(n))):
                    want[test] = f
                np.testing.assert_array_equal(got, want)
    assert kfold_fold_ids(23, 10).tolist()[:9] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # 3+3+3+2*7


def test_built_bin_fold_column_is_kfold(tmp_path):
    bgr = faces(46, size=16, seed=2)
    path = tmp_path / "cplfw.bin"
    write_eval_pack(path, [imencode_column(im) for im in bgr], [i % 2 == 0 for i in range(23)])
    build_verification_dataset(path, tmp_path / "data")
    source = load_verification_source(tmp_path / "data", "cplfw")
    assert [int(source[i]["fold"]) for i in range(23)] == kfold_reference(23, 10)


# -- .rec written by arcface_mxnet's RecBuilder and by face2rec2.py --------------------------


def ir_pack(label, payload=b"", *, id_=0, id2=0):
    """``mx.recordio.pack``: a number is stored with flag 0, a list as flag float32 labels."""
    if isinstance(label, (int, float)):
        return struct.pack("<IfQQ", 0, float(label), id_, id2) + payload
    labels = np.asarray(label, np.float32)
    return struct.pack("<IfQQ", labels.size, 0.0, id_, id2) + labels.tobytes() + payload


class MXIndexedRecordIOWriter:
    """``MXIndexedRecordIO(idx, rec, 'w').write_idx(key, s)``: records framed in write order,
    ``key\\toffset`` lines in the ``.idx``. The test payloads hold no aligned magic word, so
    no record needs splitting (asserted)."""

    def __init__(self, rec_path):
        self.rec_path, self.out, self.lines = rec_path, bytearray(), []

    def write_idx(self, key, payload):
        assert all(payload[i:i + 4] != struct.pack("<I", MAGIC)
                   for i in range(0, len(payload) - 3, 4))
        self.lines.append(f"{key}\t{len(self.out)}\n")
        self.out += struct.pack("<II", MAGIC, len(payload)) + payload
        self.out += b"\0" * (-len(payload) % 4)

    def close(self):
        self.rec_path.write_bytes(bytes(self.out))
        self.rec_path.with_suffix(".idx").write_text("".join(self.lines))


def write_like_recbuilder(rec_path, identities):
    """arcface_mxnet ``common/rec_builder.py`` RecBuilder: ``add(label, imgs)`` writes images
    at keys 1.. (IRHeader(0, label, idx, 0)); ``close()`` writes one ``[first, end)`` record
    per identity, then the header ``IRHeader(0, (id_idx, widx), 0, 1)`` at key 0, last."""
    writer, widx, ranges = MXIndexedRecordIOWriter(rec_path), 1, []
    for label, imgs in enumerate(identities):
        first = widx
        for jpeg in imgs:
            writer.write_idx(widx, ir_pack(label, jpeg, id_=widx))
            widx += 1
        ranges.append([first, widx])
    id_idx = widx
    for flag in ranges:
        writer.write_idx(widx, ir_pack(flag, id_=widx))
        widx += 1
    writer.write_idx(0, ir_pack([id_idx, widx], id_=0, id2=1))
    writer.close()


def write_like_face2rec2(rec_path, identities):
    """face2rec2.py ``read_list``: images (``label = [label, aligned]``) at keys 1..N, then the
    header (flag 2, id 0, ``[N + 1, N + 1 + C]``), then the identity records."""
    writer, key, ranges = MXIndexedRecordIOWriter(rec_path), 1, []
    for label, imgs in enumerate(identities):
        first = key
        for jpeg in imgs:
            writer.write_idx(key, ir_pack([label, 1.0], jpeg, id_=key))
            key += 1
        ranges.append((first, key))
    writer.write_idx(0, ir_pack([float(key), float(key + len(ranges))], id_=0))
    for first, end in ranges:
        writer.write_idx(key, ir_pack([float(first), float(end)], id_=key))
        key += 1
    writer.close()


def identity_jpegs(counts, seed=3):
    imgs = iter(faces(sum(counts), size=16, seed=seed))
    return [[cv2.imencode(".jpg", next(imgs))[1].tobytes() for _ in range(c)] for c in counts]


@pytest.mark.parametrize("writer", [write_like_recbuilder, write_like_face2rec2])
def test_legacy_rec_without_idx_finds_the_header_wherever_it_is(tmp_path, writer):
    identities = identity_jpegs([3, 1, 2])
    rec = tmp_path / "faces_webface" / "train.rec"
    rec.parent.mkdir()
    writer(rec, identities)
    idx = rec.with_suffix(".idx")
    written = {int(k): int(v) for k, v in (line.split("\t") for line in
                                           idx.read_text().splitlines())}
    assert written[0] != 0  # the header record is not the first one in the file
    want_labels = [c for c, imgs in enumerate(identities) for _ in imgs]
    want_bytes = [jpeg for imgs in identities for jpeg in imgs]
    with RecordIO(rec) as ds:  # with the writer's .idx
        assert ds.layout == "legacy" and ds.labels.tolist() == want_labels
        ranges = ds.identity_ranges.tolist()

    idx.unlink()
    assert build_recordio_index(rec, write=False) == written  # the writer's keys, rebuilt
    with RecordIO(rec, build_index=True) as ds:
        assert ds.layout == "legacy" and ds.labels.tolist() == want_labels
        assert [ds.read_encoded(i)[1] for i in range(len(ds))] == want_bytes
        assert ds.identity_ranges.tolist() == ranges == [[1, 4], [4, 5], [5, 7]]
    # data_prep builds it without the .idx too.
    assert data_prep_build.main(["recordio", str(rec), "--data-dir", str(tmp_path / "data"),
                                 "--name", "webface", "--quiet"]) == 0
    meta = load_dataset_metadata(tmp_path / "data", "kdface_training", "webface")
    assert meta["images"] == 6 and meta["num_classes"] == 3


def test_flat_rec_without_idx_keeps_file_order(tmp_path):
    rec = tmp_path / "flat.rec"
    jpegs = identity_jpegs([4], seed=4)[0]
    write_recordio(rec, [(i % 2, j) for i, j in enumerate(jpegs)])
    rec.with_suffix(".idx").unlink()
    with RecordIO(rec, build_index=True) as ds:
        assert ds.layout == "flat" and ds.labels.tolist() == [0, 1, 0, 1]
        assert [ds.read_encoded(i)[1] for i in range(4)] == jpegs


# -- kdface's .rec read by arcface_torch's MXFaceDataset ------------------------------------


def mxface_dataset(rec_path):
    """arcface_torch ``MXFaceDataset``: read key 0's header; if ``flag > 0`` the images are
    ``range(1, int(label[0]))``, else every key of the ``.idx``. Items are ``(label[0] or
    label, image bytes)``. The reader parses records through the ``.idx`` offsets."""
    data = rec_path.read_bytes()
    offsets = {}
    for line in rec_path.with_suffix(".idx").read_text().splitlines():
        key, offset = line.split("\t")
        offsets[int(key)] = int(offset)

    def read_idx(key):
        pos, parts = offsets[key], []
        while True:
            magic, lrec = struct.unpack_from("<II", data, pos)
            assert magic == MAGIC
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            parts.append(data[pos + 8:pos + 8 + length])
            pos += 8 + length + (-length % 4)
            if cflag in (0, 3):
                return struct.pack("<I", MAGIC).join(parts)

    def unpack(s):
        flag, label, _, _ = struct.unpack_from("<IfQQ", s, 0)
        if flag > 0:
            label = np.frombuffer(s, np.float32, flag, 24)
        return flag, label, s[24 + 4 * flag:]

    flag, label, _ = unpack(read_idx(0))
    imgidx = range(1, int(label[0])) if flag > 0 else list(offsets)
    items = []
    for key in imgidx:
        flag, label, img = unpack(read_idx(key))
        items.append((int(label if flag == 0 else label[0]), img))
    return items


@pytest.mark.parametrize("labels,layout", [
    ([0, 1, 1, 2], "flat"),
    ([[0, 0.5], [1, 0.5], [1, 0.25], [2, 1.0]], "flat"),  # array labels on record 0
    ([0, [1, 7], 1, 2], "flat"),
    ([0, 1, 1, 2], "legacy"),
])
def test_kdface_rec_reads_the_same_in_mxface_dataset(tmp_path, labels, layout):
    jpegs = identity_jpegs([4], seed=5)[0]
    rec = tmp_path / "train.rec"
    write_recordio(rec, zip(labels, jpegs), layout=layout)
    with RecordIO(rec) as ds:
        ours = [ds.read_encoded(i) for i in range(len(ds))]
    assert [label for label, _ in ours] == [0, 1, 1, 2] and [b for _, b in ours] == jpegs
    assert mxface_dataset(rec) == ours


# -- one dataset per source: every insightface training set is called train.rec -----------


def test_two_train_rec_files_never_share_a_built_dataset(tmp_path):
    from kdface.training._run import resolve_training_data
    data_dir = tmp_path / "data"
    recs = {}
    for folder, classes in (("faces_webface", 3), ("faces_emore", 5)):
        rec = tmp_path / folder / "train.rec"
        rec.parent.mkdir()
        jpegs = identity_jpegs([2] * classes, seed=classes)
        write_recordio(rec, [(c, j) for c, imgs in enumerate(jpegs) for j in imgs])
        recs[folder] = rec
    first = build_training_dataset(recs["faces_webface"], data_dir)
    second = build_training_dataset(recs["faces_emore"], data_dir)
    assert first["name"].startswith("faces_webface_train_")
    assert second["name"].startswith("faces_emore_train_")
    assert (first["num_classes"], second["num_classes"]) == (3, 5)
    assert first["fingerprint"] != second["fingerprint"]
    # What the trainer does with --train_data=<path>: each path gets its own classes.
    for folder, classes in (("faces_emore", 5), ("faces_webface", 3)):
        source, num_classes = resolve_training_data(str(recs[folder]), str(data_dir))
        assert num_classes == classes and len(source) == 2 * classes

    # The same content elsewhere (a copied folder) reuses the build under an explicit name.
    copy = tmp_path / "copy" / "train.rec"
    copy.parent.mkdir()
    shutil.copy(recs["faces_webface"], copy)
    shutil.copy(recs["faces_webface"].with_suffix(".idx"), copy.with_suffix(".idx"))
    assert build_training_dataset(copy, data_dir, name=first["name"])["num_classes"] == 3
    # Another source under a taken name is refused with both paths; --overwrite replaces it.
    with pytest.raises(ValueError) as err:
        build_training_dataset(recs["faces_emore"], data_dir, name=first["name"])
    assert str(recs["faces_webface"]) in str(err.value)
    assert str(recs["faces_emore"]) in str(err.value) and "--overwrite" in str(err.value)
    assert len(load_training_source(data_dir, first["name"])) == 6  # untouched
    rebuilt = build_training_dataset(recs["faces_emore"], data_dir, name=first["name"],
                                     overwrite=True)
    assert rebuilt["num_classes"] == 5


def test_verification_name_taken_by_another_bin_is_refused(tmp_path):
    data_dir = tmp_path / "data"
    paths = []
    for folder, seed in (("a", 6), ("b", 7)):
        os.makedirs(tmp_path / folder)
        path = tmp_path / folder / "lfw.bin"
        write_eval_pack(path, [imencode_column(im) for im in faces(2, seed=seed)], [True])
        paths.append(path)
    build_verification_dataset(paths[0], data_dir)
    assert build_verification_dataset(paths[0], data_dir)["pairs"] == 1  # reused
    with pytest.raises(ValueError, match="content differs"):
        build_verification_dataset(paths[1], data_dir)
    assert build_verification_dataset(paths[1], data_dir, name="lfw_b")["pairs"] == 1
    shutil.copy(paths[1], paths[0])  # the same path, other content: refused as well
    with pytest.raises(ValueError, match="when it held other content"):
        build_verification_dataset(paths[0], data_dir)
