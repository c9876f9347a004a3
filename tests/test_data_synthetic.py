"""Synthetic identities: determinism, landmarks, file outputs, and that the task is learnable but
not solved by raw pixels (independent NumPy references: a 10-fold threshold accuracy and a
PCA + LDA projection fitted on training identities)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from kdface.data import _synthetic as syn
from kdface.data._recordio import RecordIO
from kdface.data._verification_bin import read_verification_bin

TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                     [41.5493, 92.3655], [70.7299, 92.2041]])


def test_render_is_deterministic_and_seed_dependent():
    a = syn.render_identity_images(0, 3, 2)
    b = syn.render_identity_images(0, 3, 2)
    assert a.dtype == np.uint8 and a.shape == (2, 112, 112, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, syn.render_identity_images(1, 3, 2))
    assert not np.array_equal(a[0], a[1])  # samples of one identity differ
    assert syn.identity_params(0, 3) == syn.identity_params(0, 3)
    assert syn.identity_params(0, 3) != syn.identity_params(0, 4)


def test_landmarks_follow_the_pose_near_the_template():
    for k in range(8):
        image, points = syn.render_identity_sample_with_landmarks(
            syn.identity_params(5, k), syn.sample_rng(5, k, 0))
        assert image.shape == (112, 112, 3) and points.shape == (5, 2)
        assert points.dtype == np.float32
        # Identity geometry and pose move points, but they stay near the aligned template.
        assert np.abs(points - TEMPLATE).max() < 30
        assert points[0, 0] < points[1, 0] and points[3, 0] < points[4, 0]
        assert points[0, 1] < points[2, 1] < points[3, 1]


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="IdentityParams"):
        syn.render_identity_sample({"face": 1}, np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        syn.render_identity_sample(syn.identity_params(0, 0), 0)
    with pytest.raises(ValueError, match="2 \\* num_folds"):
        syn.make_synthetic_dataset("/nonexistent", num_verification_identities=5, build=False)
    with pytest.raises(ValueError, match="multiple of"):
        syn.make_synthetic_dataset("/nonexistent", num_verification_pairs=30, build=False)


def test_dataset_files_are_deterministic_and_fold_structured(tmp_path):
    kwargs = dict(num_identities=3, images_per_identity=2, num_verification_identities=4,
                  num_verification_pairs=8, num_folds=2, seed=7, build=False)
    first = syn.make_synthetic_dataset(tmp_path / "a", **kwargs)
    second = syn.make_synthetic_dataset(tmp_path / "b", **kwargs)
    for key in ("train_rec", "train_idx", "train_landmarks", "verification_bin"):
        with open(first[key], "rb") as f, open(second[key], "rb") as g:
            assert f.read() == g.read(), key
    rec = RecordIO(first["train_rec"])
    np.testing.assert_array_equal(rec.labels, [0, 0, 1, 1, 2, 2])
    images, issame = read_verification_bin(first["verification_bin"])
    assert images.shape == (16, 112, 112, 3)
    # Two contiguous folds of 4 pairs: 2 same then 2 different.
    np.testing.assert_array_equal(issame, [1, 1, 0, 0, 1, 1, 0, 0])
    # Held-out: verification pairs are renderings of identities 3.. (not training ones).
    pairs = list(syn._verification_pairs(7, 3, 4, 8, 2))
    assert all(a >= 3 and b >= 3 for a, _, b, _, _ in pairs)
    assert all((a == b) == same for a, _, b, _, same in pairs)
    # Folds are identity-disjoint, like LFW's.
    fold_ids = [{a for a, _, b, _, _ in pairs[:4]} | {b for _, _, b, _, _ in pairs[:4]},
                {a for a, _, b, _, _ in pairs[4:]} | {b for _, _, b, _, _ in pairs[4:]}]
    assert not fold_ids[0] & fold_ids[1]


def _small_features(images: np.ndarray) -> np.ndarray:
    small = [cv2.resize(im, (32, 32), interpolation=cv2.INTER_AREA) for im in images]
    return np.stack(small).reshape(len(images), -1).astype(np.float64)


def _ten_fold_accuracy(emb1, emb2, issame) -> float:
    """Independent reference of the LFW protocol: best threshold on 9 folds, tested on 1."""
    emb1 = emb1 / np.linalg.norm(emb1, axis=1, keepdims=True)
    emb2 = emb2 / np.linalg.norm(emb2, axis=1, keepdims=True)
    scores = np.sum(emb1 * emb2, axis=1)
    folds = np.arange(len(scores)) * 10 // len(scores)
    accs = []
    for f in range(10):
        train = folds != f
        candidates = np.sort(scores[train])
        train_acc = [np.mean((scores[train] >= t) == issame[train]) for t in candidates]
        t = candidates[int(np.argmax(train_acc))]
        accs.append(np.mean((scores[~train] >= t) == issame[~train]))
    return float(np.mean(accs))


def test_raw_pixels_fail_but_a_fitted_linear_projection_learns():
    seed, num_train, per_id, num_heldout, num_pairs = 0, 40, 8, 20, 300
    x = np.concatenate([_small_features(syn.render_identity_images(seed, i, per_id))
                        for i in range(num_train)])
    y = np.repeat(np.arange(num_train), per_id)
    heldout = {i: _small_features(syn.render_identity_images(seed, 1000 + i, 10))
               for i in range(num_heldout)}
    rng = np.random.default_rng(1)
    a, b, same = [], [], []
    for p in range(num_pairs):
        if p % 2 == 0:
            i = int(rng.integers(num_heldout))
            k1, k2 = rng.choice(10, 2, replace=False)
            j = i
        else:
            i, j = rng.choice(num_heldout, 2, replace=False)
            k1, k2 = rng.integers(10, size=2)
        a.append(heldout[i][k1])
        b.append(heldout[j][k2])
        same.append(i == j)
    a, b, same = np.stack(a), np.stack(b), np.asarray(same)

    raw = _ten_fold_accuracy(a, b, same)
    # PCA whitening then LDA, fitted on the training identities only.
    mean = x.mean(0)
    centered = x - mean
    # PCA through the small Gram matrix (N x N, N << pixels): X X^T = U S^2 U^T.
    eigval, u = np.linalg.eigh(centered @ centered.T)
    k = 150
    top = np.argsort(eigval)[::-1][:k]
    s = np.sqrt(eigval[top])
    vt = (u[:, top].T @ centered) / s[:, None]
    pca = vt.T / s
    z = (x - mean) @ pca
    class_means = np.stack([z[y == c].mean(0) for c in range(num_train)])
    within = sum((z[y == c] - class_means[c]).T @ (z[y == c] - class_means[c])
                 for c in range(num_train)) / len(z)
    between = np.cov(class_means.T)
    reg = within + 1e-4 * np.trace(within) / k * np.eye(k)
    # Generalized eigenproblem between v = w within v via the Cholesky factor of `within`.
    chol = np.linalg.cholesky(reg)
    inv = np.linalg.inv(chol)
    w, v = np.linalg.eigh(inv @ between @ inv.T)
    lda = inv.T @ v[:, ::-1][:, :num_train - 1]
    proj = pca @ lda
    learned = _ten_fold_accuracy((a - mean) @ proj, (b - mean) @ proj, same)
    print(f"raw-pixel cosine {raw:.3f}, PCA+LDA {learned:.3f}")
    assert raw < 0.70, raw  # raw pixels are near chance
    assert learned > 0.75 and learned > raw + 0.12, (raw, learned)
