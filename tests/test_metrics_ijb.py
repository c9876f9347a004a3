"""IJB-B/C 1:1 verification against a re-implementation of insightface's IJB script.

The test writes a small IJB-C layout the way the released meta files are laid out (``meta/
ijbc_face_tid_mid.txt``, ``ijbc_name_5pts_score.txt``, ``ijbc_template_pair_label.txt``,
``loose_crop/``), with loose crops whose faces sit at a known similarity transform of the
112x112 template. The reference below follows insightface's ``eval_ijbc.py`` step by step with
plain loops: cv2.imread (BGR), alignment, BGR -> RGB, [image, mirror] features concatenated then
halves added, times the float32 face scores, ``image2template_feature``, ``verification``,
sklearn's ``roc_curve`` (its rule written out when sklearn is absent) and the nearest-FPR pick.
"""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from kdface import evaluation, metrics
from kdface.data import align_face, face_template

from _tolerance import assert_close

# 6 subjects, 12 templates; template 11 repeats template 10's images under new names, so its
# scores tie with template 10's (ties in the ROC).
SUBJECT_OF_TEMPLATE = [0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 5, 5]
FARS = (1e-6, 1e-4, 1e-2, 0.05, 0.1, 0.2, 0.3, 0.5)


def _model(images):
    """A fixed embedding: 8x8-block means of the normalized image times a fixed matrix, one
    row at a time (a batched float32 product may round differently with the batch size)."""
    x = (np.asarray(images, np.float32) / 255.0 - 0.5) / 0.5
    n, h, w, _ = x.shape
    pooled = x.reshape(n, 8, h // 8, 8, w // 8, 3).mean(axis=(2, 4)).reshape(n, -1)
    proj = np.random.default_rng(42).normal(size=(pooled.shape[1], 16)).astype(np.float32)
    return np.stack([row @ proj for row in pooled]).astype(np.float32)


def _face(subject, rng, size=72):
    """A loose crop: subject-coloured blobs at the template's landmarks under a random
    similarity, plus noise; returns (RGB image, landmarks [5, 2] in crop pixels)."""
    angle = rng.uniform(-0.3, 0.3)
    scale = rng.uniform(0.45, 0.55)
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = (face_template() - 56.0) @ rot.T + size / 2 + rng.uniform(-3, 3, 2)
    colours = np.random.default_rng(100 + subject).integers(40, 255, (5, 3))
    image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    for (x, y), colour in zip(points, colours):
        cv2.circle(image, (int(round(x)), int(round(y))), 4, [int(c) for c in colour], -1)
    return image, points


def _write_ijbc(root, seed=0, *, max_medias=3, max_frames=3):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "meta"))
    os.makedirs(os.path.join(root, "loose_crop"))
    tid_mid, pts = [], []
    media = 100
    images_of = {}
    for template, subject in enumerate(SUBJECT_OF_TEMPLATE[:11]):
        rows = []
        for _ in range(rng.integers(1, max_medias + 1)):  # medias per template
            media += 1
            for _ in range(rng.integers(1, max_frames + 1)):  # frames per media
                image, points = _face(subject, rng)
                score = rng.uniform(0.3, 1.0)
                rows.append((image, points, media, f"{score:.6f}"))
        images_of[template] = rows
    images_of[11] = images_of[10]
    number = 0
    for template, rows in images_of.items():
        for image, points, media_id, score in rows:
            number += 1
            name = f"{number}.jpg"
            cv2.imwrite(os.path.join(root, "loose_crop", name), image[:, :, ::-1])
            tid_mid.append(f"{name} {template + 1} {media_id + 1000 * (template == 11)}")
            coords = " ".join(f"{v:.3f}" for v in points.reshape(-1))
            pts.append(f"{name} {coords} {score}")
    pairs = [f"{a + 1} {b + 1} {int(SUBJECT_OF_TEMPLATE[a] == SUBJECT_OF_TEMPLATE[b])}"
             for a in range(12) for b in range(a + 1, 12)]
    for suffix, lines in (("face_tid_mid", tid_mid), ("name_5pts_score", pts),
                          ("template_pair_label", pairs)):
        with open(os.path.join(root, "meta", f"ijbc_{suffix}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return number


# --- the reference: insightface's eval_ijbc.py rules, loops ----------------------------------

def _reference_roc(label, score):
    try:
        from sklearn.metrics import roc_curve
    except ImportError:
        order = sorted(range(len(score)), key=lambda i: -score[i])  # stable, as mergesort
        fps, tps, thr, tp, fp = [], [], [], 0, 0
        for k, i in enumerate(order):
            tp += label[i]
            fp += 1 - label[i]
            if k == len(order) - 1 or score[order[k + 1]] != score[i]:
                fps.append(fp), tps.append(tp), thr.append(score[i])
        keep = [0] + [k for k in range(1, len(fps) - 1)
                      if fps[k + 1] - 2 * fps[k] + fps[k - 1] != 0
                      or tps[k + 1] - 2 * tps[k] + tps[k - 1] != 0] + [len(fps) - 1]
        fps = np.array([0.0] + [fps[k] for k in keep])
        tps = np.array([0.0] + [tps[k] for k in keep])
        return fps / fps[-1], tps / tps[-1], None
    return roc_curve(label, score)


def _reference_ijb(root, model, far_targets):
    meta = os.path.join(root, "meta")
    tid_mid = [line.split() for line in open(os.path.join(meta, "ijbc_face_tid_mid.txt"))]
    templates = np.array([int(r[1]) for r in tid_mid])
    medias = np.array([int(r[2]) for r in tid_mid])
    pairs = [line.split() for line in open(os.path.join(meta, "ijbc_template_pair_label.txt"))]
    p1 = np.array([int(r[0]) for r in pairs])
    p2 = np.array([int(r[1]) for r in pairs])
    label = np.array([int(r[2]) for r in pairs])
    files = open(os.path.join(meta, "ijbc_name_5pts_score.txt")).readlines()
    img_feats = np.empty((len(files), 32), dtype=np.float32)
    faceness_scores = []
    for i, line in enumerate(files):
        name_lmk_score = line.strip().split(" ")
        img = cv2.imread(os.path.join(root, "loose_crop", name_lmk_score[0]))
        lmk = np.array([float(x) for x in name_lmk_score[1:-1]], dtype=np.float32).reshape(5, 2)
        img = cv2.cvtColor(align_face(img, lmk), cv2.COLOR_BGR2RGB)
        blob = np.stack([img, np.fliplr(img)])
        feat = model(blob)
        img_feats[i] = feat.reshape(1, 2 * feat.shape[1])[0]
        faceness_scores.append(name_lmk_score[-1])
    faceness_scores = np.array(faceness_scores).astype(np.float32)
    half = img_feats.shape[1] // 2
    img_input_feats = img_feats[:, 0:half] + img_feats[:, half:]
    img_input_feats = img_input_feats * faceness_scores[:, np.newaxis]
    # image2template_feature
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), img_input_feats.shape[1]))
    for count_template, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_norm_feats = img_input_feats[ind_t]
        face_medias = medias[ind_t]
        unique_medias, unique_media_counts = np.unique(face_medias, return_counts=True)
        media_norm_feats = []
        for u, ct in zip(unique_medias, unique_media_counts):
            (ind_m,) = np.where(face_medias == u)
            if ct == 1:
                media_norm_feats += [face_norm_feats[ind_m]]
            else:
                media_norm_feats += [np.mean(face_norm_feats[ind_m], axis=0, keepdims=True)]
        media_norm_feats = np.array(media_norm_feats)
        template_feats[count_template] = np.sum(media_norm_feats, axis=0)
    try:
        from sklearn.preprocessing import normalize
        template_norm_feats = normalize(template_feats)
    except ImportError:  # its rule: row norms by einsum, zero norms left as 1
        norms = np.sqrt(np.einsum("ij,ij->i", template_feats, template_feats))
        norms[norms < 10 * np.finfo(np.float64).eps] = 1.0
        template_norm_feats = template_feats / norms[:, np.newaxis]
    # verification
    template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    for count_template, uqt in enumerate(unique_templates):
        template2id[uqt] = count_template
    feat1 = template_norm_feats[template2id[p1]]
    feat2 = template_norm_feats[template2id[p2]]
    score = np.sum(feat1 * feat2, -1).flatten()
    fpr, tpr, _ = _reference_roc(label, score)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    tars = {}
    for x in far_targets:
        _, min_index = min(list(zip(abs(fpr - x), range(len(fpr)))))
        tars[x] = tpr[min_index]
    return score, tars


@pytest.fixture(scope="module")
def ijbc(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("IJBC"))
    count = _write_ijbc(root)
    return root, count


def test_ijb_report_equals_insightface_pipeline(ijbc):
    root, count = ijbc
    got = evaluation.ijb_report(_model, root, "IJBC", far_targets=FARS)
    score, tars = _reference_ijb(root, _model, FARS)
    np.testing.assert_array_equal(got["scores"], score)
    assert got["tar_at_far"] == tars
    assert (got["num_images"], got["num_templates"], got["num_pairs"]) == (count, 12, 66)
    assert len(set(np.round(score, 12))) < score.size  # the repeated template makes ties
    assert got["num_positive"] == sum(SUBJECT_OF_TEMPLATE[a] == SUBJECT_OF_TEMPLATE[b]
                                      for a in range(12) for b in range(a + 1, 12))
    assert got["roc"]["tpr"][-1] == 1.0 and got["roc"]["fpr"][-1] == 1.0
    assert got["auc"] > 0.6  # the subjects' colours make genuine pairs score higher


def test_alignment_brings_the_landmarks_onto_the_template(ijbc):
    root, _ = ijbc
    meta = evaluation.IjbMeta(root, "ijbc")
    crops = evaluation.aligned_crops(meta, 0, 3)
    assert crops.shape == (3, 112, 112, 3) and crops.dtype == np.uint8
    rgb = cv2.imread(os.path.join(root, "loose_crop", meta.names[0]))[:, :, ::-1]
    x, y = meta.landmarks[0][2]  # the nose blob's colour reappears at the template's nose
    u, v = np.round(face_template()[2]).astype(int)
    # Not rounding: a uint8 colour read back at the rounded template point after a bilinear
    # warp of a blob, whose edge is a pixel or so away; +-40 of 255 says "the same colour".
    np.testing.assert_allclose(crops[0][v, u].astype(float), rgb[int(round(y)), int(round(x))],
                               atol=40)


def test_binary_roc_curve_and_nearest_pick_follow_sklearn_rules():
    rng = np.random.default_rng(1)
    label = (rng.random(300) < 0.3).astype(int)
    score = np.round(rng.normal(size=300) + label, 1)  # many ties
    fpr, tpr, thr = metrics.binary_roc_curve(label, score)
    ref_fpr, ref_tpr, _ = _reference_roc(label, score)
    np.testing.assert_array_equal(fpr, ref_fpr)
    np.testing.assert_array_equal(tpr, ref_tpr)
    assert thr[0] == np.inf and np.all(np.diff(thr[1:]) < 0)
    picked = metrics.tar_at_far_nearest(fpr, tpr, (0.0, 0.013, 0.5, 1.0))
    f, t = np.flipud(fpr), np.flipud(tpr)
    for x, (tar, used) in picked.items():
        _, i = min(zip(abs(f - x), range(len(f))))
        assert (tar, used) == (t[i], f[i])


def test_template_features_hand_example():
    # template 5: media 1 = images 0, 1 (averaged), media 2 = image 2; template 9: image 3.
    feats = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 4.0], [0.0, -1.0]], np.float32)
    out, ids = metrics.template_features(feats, np.array([5, 5, 5, 9]), np.array([1, 1, 2, 3]))
    np.testing.assert_array_equal(ids, [5, 9])
    # media mean and sum are exact on these integers; the float64 normalization rounds a
    # 2-term sum of squares, a sqrt and a divide: terms 4, scale 1 (unit rows)
    assert_close(out, [[2 / np.sqrt(20), 4 / np.sqrt(20)], [0.0, -1.0]], terms=4, scale=1.0,
                 dtype=np.float64)
    scores = metrics.template_pair_scores(out, ids, [5, 9], [9, 9])
    # + a 2-term float64 dot product of unit rows: terms 4 + 2
    assert_close(scores, [-4 / np.sqrt(20), 1.0], terms=6, scale=1.0, dtype=np.float64)
    with pytest.raises(ValueError, match="template 7 of the pair list has no images"):
        metrics.template_pair_scores(out, ids, [5], [7])
    f = metrics.ijb_image_features(feats, feats, np.array([1, 2, 0.5, 1]), keep_norm=False)
    # unit, then scored; float32: the image + mirror add, a 2-term sum of squares, sqrt,
    # divide, the score product (terms 5), scale 2 (the largest feature)
    assert_close(f, [[1, 0], [2, 0], [0, 0.5], [0, -1]], terms=5, scale=2.0)


def test_meta_errors_are_clear(ijbc, tmp_path):
    root, _ = ijbc
    with pytest.raises(FileNotFoundError, match="ijbb_face_tid_mid.txt"):
        evaluation.IjbMeta(root, "IJBB")
    with pytest.raises(ValueError, match="IJBB"):
        evaluation.parse_ijb_spec("LFW:/x")
    bad = tmp_path / "bad"
    os.makedirs(bad / "meta")
    os.makedirs(bad / "loose_crop")
    for suffix in ("face_tid_mid", "name_5pts_score", "template_pair_label"):
        text = open(os.path.join(root, "meta", f"ijbc_{suffix}.txt")).read()
        if suffix == "name_5pts_score":
            lines = text.splitlines()
            text = "\n".join([lines[1], lines[0], *lines[2:]]) + "\n"
        (bad / "meta" / f"ijbc_{suffix}.txt").write_text(text)
    with pytest.raises(ValueError, match="not list the images .* in the same order"):
        evaluation.IjbMeta(str(bad), "IJBC")
