"""MXNet RecordIO: round-trips, split records, both layouts, and every error.

The reference here is an independent byte-level parser/writer written from dmlc-core's
recordio.h description (magic 0xced7230a, lrec = cflag << 29 | length, 4-byte padding) and
MXNet's IRHeader ``<IfQQ``; the library's reader and writer are checked against it.
"""
from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest

from kdface.data import (
    RecordIO,
    RecordIOError,
    UndecodableImageError,
    build_recordio_index,
    encode_image,
    write_recordio,
)

MAGIC = 0xCED7230A
MAGIC_LE = struct.pack("<I", MAGIC)


def ref_parts(rec_bytes: bytes):
    """All parts of a .rec as (offset, cflag, payload) by a plain sequential walk."""
    parts, pos = [], 0
    while pos < len(rec_bytes):
        magic, lrec = struct.unpack_from("<II", rec_bytes, pos)
        assert magic == MAGIC
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        parts.append((pos, cflag, rec_bytes[pos + 8:pos + 8 + length]))
        pos += 8 + length + (4 - length % 4) % 4
    return parts


def ref_records(rec_bytes: bytes):
    """Reassembled records: list of (offset, [cflags], payload)."""
    records, current = [], None
    for offset, cflag, data in ref_parts(rec_bytes):
        if cflag in (0, 1):
            current = [offset, [cflag], [data]]
        else:
            current[1].append(cflag)
            current[2].append(data)
        if cflag in (0, 3):
            records.append((current[0], current[1], MAGIC_LE.join(current[2])))
    return records


def ref_header(payload: bytes):
    flag, label, id_, id2 = struct.unpack_from("<IfQQ", payload, 0)
    labels = list(struct.unpack_from(f"<{flag}f", payload, 24)) if flag else [label]
    return flag, labels, payload[24 + 4 * flag:]


def ref_write(rec_path, payloads):
    """Independent writer (no splitting: payloads must not contain aligned magic words)."""
    out, idx = bytearray(), []
    for key, payload in enumerate(payloads):
        idx.append(f"{key}\t{len(out)}\n")
        out += struct.pack("<II", MAGIC, len(payload)) + payload + b"\0" * (-len(payload) % 4)
    rec_path.write_bytes(bytes(out))
    rec_path.with_suffix(".idx").write_text("".join(idx))


def images(n, h=10, w=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def jpeg_with_magic(image, aligned=True):
    """A JPEG with a COM segment holding the magic word twice at 4-aligned payload offsets."""
    data = encode_image(image, format="jpg", quality=90)
    pad = b"\0\0" if aligned else b"\0"
    comment = pad + MAGIC_LE + MAGIC_LE + b"kd"
    segment = b"\xff\xfe" + struct.pack(">H", 2 + len(comment)) + comment
    return data[:2] + segment + data[2:]


def test_flat_round_trip_png_exact_and_idx(tmp_path):
    imgs = images(5)
    labels = [3, 0, 3, 1, 2]
    rec = tmp_path / "train.rec"
    assert write_recordio(rec, zip(labels, imgs), image_format="png") == 5
    idx_lines = (tmp_path / "train.idx").read_text().splitlines()
    records = ref_records(rec.read_bytes())
    assert idx_lines == [f"{k}\t{off}" for k, (off, _, _) in enumerate(records)]
    for (_, cflags, payload), label in zip(records, labels):
        flag, ref_labels, _ = ref_header(payload)
        assert cflags == [0] and flag == 0 and ref_labels == [float(label)]
    ds = RecordIO(rec)
    assert ds.layout == "flat" and len(ds) == 5
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.labels.dtype == np.int64 and ds.num_classes == 4
    for i in range(5):
        label, image = ds[i]
        assert label == labels[i] and image.dtype == np.uint8
        np.testing.assert_array_equal(image, imgs[i])
    assert ds[-1][0] == 2 and [lab for lab, _ in ds[1:3]] == [0, 3]


def test_jpeg_colour_order_survives(tmp_path):
    # A pure-red RGB image must come back red (JPEG keeps colours; BGR swap is internal).
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    write_recordio(tmp_path / "c.rec", [(0, red)], quality=95)
    _, image = RecordIO(tmp_path / "c.rec")[0]
    assert image[..., 0].min() > 240 and image[..., 1:].max() < 15


def test_reads_independently_written_legacy_file(tmp_path):
    # insightface layout: header [first_identity_key, end], images 1..N, identity ranges.
    imgs = images(4, seed=1)
    labels = [0, 0, 1, 1]
    payloads = [struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 5, 7)]
    for label, image in zip(labels, imgs):
        header = struct.pack("<IfQQ", 0, float(label), 0, 0)
        payloads.append(header + encode_image(image, format="png"))
    payloads.append(struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 1, 3))
    payloads.append(struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 3, 5))
    rec = tmp_path / "legacy.rec"
    ref_write(rec, payloads)
    ds = RecordIO(rec)
    assert ds.layout == "legacy" and len(ds) == 4
    np.testing.assert_array_equal(ds.keys, [1, 2, 3, 4])
    np.testing.assert_array_equal(ds.labels, labels)
    np.testing.assert_array_equal(ds.identity_ranges, [[1, 3], [3, 5]])
    np.testing.assert_array_equal(ds[3][1], imgs[3])


def test_legacy_write_matches_insightface_layout(tmp_path):
    imgs = images(6, seed=2)
    labels = [1, 1, 0, 2, 2, 2]  # contiguous runs, any order of identities
    rec = tmp_path / "l.rec"
    assert write_recordio(rec, zip(labels, imgs), layout="legacy", image_format="png") == 6
    records = ref_records(rec.read_bytes())
    assert len(records) == 1 + 6 + 3
    flag, head, rest = ref_header(records[0][2])
    assert flag == 2 and head == [7.0, 10.0] and rest == b""
    for key in range(1, 7):
        flag, lab, rest = ref_header(records[key][2])
        assert flag == 0 and lab == [float(labels[key - 1])] and rest
    ranges = [ref_header(records[k][2])[1] for k in range(7, 10)]
    assert ranges == [[3.0, 4.0], [1.0, 3.0], [4.0, 7.0]]  # identity c at key 7 + c
    ds = RecordIO(rec)
    assert ds.layout == "legacy" and ds.num_classes == 3
    np.testing.assert_array_equal(ds.identity_ranges, [[3, 4], [1, 3], [4, 7]])
    for i in range(6):
        assert ds[i][0] == labels[i]
        np.testing.assert_array_equal(ds[i][1], imgs[i])


def test_legacy_write_needs_contiguous_labels_0_to_c(tmp_path):
    imgs = images(3)
    with pytest.raises(ValueError, match="contiguous"):
        write_recordio(tmp_path / "a.rec", zip([0, 1, 0], imgs), layout="legacy")
    with pytest.raises(ValueError, match="0..C-1"):
        write_recordio(tmp_path / "b.rec", zip([0, 2, 2], imgs), layout="legacy")
    with pytest.raises(ValueError, match="layout"):
        write_recordio(tmp_path / "c.rec", [], layout="mxnet")


def test_array_labels_identity_is_first(tmp_path):
    imgs = images(3, seed=3)
    labels = [np.array([4.0, 0.5]), [1, 9, 9], 2]
    rec = tmp_path / "arr.rec"
    write_recordio(rec, zip(labels, imgs), image_format="png")
    records = ref_records(rec.read_bytes())
    # Array labels first: a header record [N + 1, N + 1] without image precedes the images, so
    # insightface's reader (which takes a multi-label record 0 for the header) sees them all.
    assert ref_header(records[0][2]) == (2, [4.0, 4.0], b"")
    assert ref_header(records[1][2])[:2] == (2, [4.0, 0.5])
    assert ref_header(records[2][2])[:2] == (3, [1.0, 9.0, 9.0])
    ds = RecordIO(rec)
    np.testing.assert_array_equal(ds.keys, [1, 2, 3])
    np.testing.assert_array_equal(ds.labels, [4, 1, 2])
    assert ds.identity_ranges.shape == (0, 2)
    header, _ = ds.read_key(2)
    assert header.flag == 3 and header.label.tolist() == [1.0, 9.0, 9.0]
    np.testing.assert_array_equal(ds[0][1], imgs[0])
    # Scalar first, arrays later: stays flat (record 0 has flag 0, which insightface reads so).
    write_recordio(rec, zip([2, [1, 9, 9]], imgs[:2]), image_format="png")
    ds = RecordIO(rec)
    assert ds.layout == "flat" and ds.labels.tolist() == [2, 1]


def test_split_record_round_trip_and_raw_parts(tmp_path):
    imgs = images(3, h=16, w=16, seed=4)
    split_bytes = jpeg_with_magic(imgs[1])
    unaligned = jpeg_with_magic(imgs[2], aligned=False)
    rec = tmp_path / "split.rec"
    write_recordio(rec, [(0, encode_image(imgs[0], format="png")), (1, split_bytes),
                         (2, unaligned)])
    records = ref_records(rec.read_bytes())
    assert len(records) == 3
    assert records[1][1] == [1, 2, 3]  # magic at payload 32 and 36: first, empty middle, last
    parts = [p for p in ref_parts(rec.read_bytes()) if records[1][0] <= p[0] < records[2][0]]
    assert [len(p[2]) for p in parts] == [32, 0, 24 + len(split_bytes) - 32 - 8]
    assert all(MAGIC_LE not in p[2][i:i + 4] for p in parts for i in range(0, len(p[2]), 4))
    assert records[1][2][24:] == split_bytes
    assert records[2][1] == [0]  # an unaligned magic word is not a split point
    ds = RecordIO(rec)
    label, data = ds.read_encoded(1)
    assert label == 1 and data == split_bytes
    assert ds.read_encoded(2)[1] == unaligned
    assert ds.labels.tolist() == [0, 1, 2]
    assert ds[1][1].shape == (16, 16, 3)


def test_frame_edge_cases_match_reference(tmp_path):
    from kdface.data._recordio import _frame

    payloads = [MAGIC_LE + b"abcd", b"abcd" + MAGIC_LE, MAGIC_LE * 3, b"xyz", b"", b"12345"]
    rec = tmp_path / "edge.rec"
    rec.write_bytes(b"".join(_frame(p) for p in payloads))
    got = ref_records(rec.read_bytes())
    assert [r[2] for r in got] == payloads
    assert [r[1] for r in got] == [[1, 3], [1, 3], [1, 2, 2, 3], [0], [0], [0]]
    assert rec.stat().st_size % 4 == 0


def test_missing_idx_and_build_index(tmp_path):
    rec = tmp_path / "noidx.rec"
    write_recordio(rec, zip([0, 1], images(2)), idx_path=tmp_path / "elsewhere.idx")
    with pytest.raises(FileNotFoundError, match="build_index=True"):
        RecordIO(rec)
    ds = RecordIO(rec, build_index=True)
    assert len(ds) == 2 and ds.labels.tolist() == [0, 1]
    index = build_recordio_index(rec)
    assert (tmp_path / "noidx.idx").read_text() == (tmp_path / "elsewhere.idx").read_text()
    assert index == {0: 0, 1: ds._offsets[1]}
    with pytest.raises(FileNotFoundError, match="not found"):
        RecordIO(tmp_path / "absent.rec")


def test_bad_magic_names_offset(tmp_path):
    rec = tmp_path / "bad.rec"
    write_recordio(rec, zip([0, 1, 2], images(3)))
    offset = int((tmp_path / "bad.idx").read_text().splitlines()[1].split("\t")[1])
    raw = bytearray(rec.read_bytes())
    raw[offset:offset + 4] = b"\x00\x01\x02\x03"
    rec.write_bytes(bytes(raw))
    ds = RecordIO(rec)
    assert ds[0][0] == 0
    with pytest.raises(RecordIOError, match=f"bad magic 0x03020100 at byte offset {offset}"):
        ds[1]
    with pytest.raises(RecordIOError, match="bad magic"):
        build_recordio_index(rec, write=False)


def test_truncated_file(tmp_path):
    rec = tmp_path / "cut.rec"
    write_recordio(rec, zip([0, 1], images(2)))
    raw = rec.read_bytes()
    rec.write_bytes(raw[:-20])
    ds = RecordIO(rec)
    with pytest.raises(RecordIOError, match="truncated"):
        ds[1]
    rec.write_bytes(raw[:int((tmp_path / "cut.idx").read_text().split()[3]) + 5])
    with pytest.raises(RecordIOError, match="truncated"):
        RecordIO(rec)[1]
    with pytest.raises(RecordIOError, match="truncated"):
        RecordIO(rec, idx_path=tmp_path / "none.idx", build_index=True)


def test_undecodable_image_names_record(tmp_path):
    rec = tmp_path / "junk.rec"
    write_recordio(rec, [(0, images(1)[0]), (1, b"definitely not a jpeg")])
    ds = RecordIO(rec)
    assert ds[0][0] == 0 and ds.labels.tolist() == [0, 1]
    with pytest.raises(UndecodableImageError, match=r"junk\.rec key 1"):
        ds[1]


def test_idx_pointing_inside_split_record(tmp_path):
    rec = tmp_path / "s.rec"
    write_recordio(rec, [(0, jpeg_with_magic(images(1, 16, 16)[0]))])
    middle = ref_parts(rec.read_bytes())[1][0]
    (tmp_path / "s.idx").write_text(f"0\t{middle}\n")
    with pytest.raises(RecordIOError, match="cflag 2"):
        RecordIO(rec)


def test_index_errors_and_pickling(tmp_path):
    rec = tmp_path / "p.rec"
    write_recordio(rec, zip([5, 6], images(2)), image_format="png")
    ds = RecordIO(rec)
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(TypeError):
        ds["0"]
    clone = pickle.loads(pickle.dumps(ds))  # worker processes receive the reader pickled
    assert clone[1][0] == 6
    np.testing.assert_array_equal(clone[0][1], ds[0][1])
    with pytest.raises(TypeError, match="label, image"):
        write_recordio(tmp_path / "q.rec", [images(1)[0]])
    with pytest.raises(ValueError, match="integer"):
        write_recordio(tmp_path / "q.rec", [(1.5, images(1)[0])])
    with pytest.raises(TypeError, match="uint8"):
        write_recordio(tmp_path / "q.rec", [(1, images(1)[0].astype(np.float32))])
    (tmp_path / "p.idx").write_text("0 0 7\n")
    with pytest.raises(RecordIOError, match="key<TAB>offset"):
        RecordIO(rec)
