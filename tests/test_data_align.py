"""5-point similarity alignment: Umeyama transform, template crops, landmarks CSV."""
from __future__ import annotations

import numpy as np
import pytest

from kdface.data import (
    TEMPLATE_112,
    align_face,
    face_template,
    read_landmarks_csv,
    similarity_transform,
)

from _tolerance import assert_close

F64 = np.float64
# Umeyama in float64: 5-point means, variance and 2x2 covariance (5-term sums), the 2x2 SVD and
# the products u diag vt and scale (~8 steps), apply's 3-term row (3): 16 rounding steps.
UMEYAMA_STEPS = 16


def _row_scale(matrix, points):
    """The magnitude of the terms of ``apply(matrix, points)``'s rows: |a x| + |b y| + |t|."""
    return 2 * np.abs(matrix[:, :2]).max() * np.abs(points).max() + np.abs(matrix[:, 2]).max()


def _lstsq_scale(src, solution):
    """Least squares' forward error grows with the condition number of the design matrix
    (Higham 2002, §20.1: |dx| / |x| <~ kappa(A) x eps x n): the scale is kappa(A) max|x|."""
    rows = []
    for x, y in src:
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
    return np.linalg.cond(np.array(rows)) * np.abs(solution).max()


def similarity(scale, angle_deg, tx, ty):
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.concatenate([scale * rot, [[tx], [ty]]], axis=1)


def apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2][None, :]


def linear_lstsq_similarity(src, dst):
    """Reference: solve x' = a x - b y + tx, y' = b x + a y + ty by ordinary least squares."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def test_template_constants_and_sizes():
    # exact: the same literals, and x 1, x 2, - 8 are the template's own float operations
    np.testing.assert_array_equal(TEMPLATE_112[0], [38.2946, 51.6963])
    np.testing.assert_array_equal(face_template((112, 112)), TEMPLATE_112)
    np.testing.assert_array_equal(face_template((112, 96)), TEMPLATE_112 - [8.0, 0.0])
    np.testing.assert_array_equal(face_template((224, 224)), 2 * TEMPLATE_112)


def test_transform_recovers_known_similarity_exactly():
    template = face_template()
    for params in [(1.7, 23.0, 40.0, -12.0), (0.4, -130.0, 5.5, 300.0), (1.0, 0.0, 0.0, 0.0)]:
        forward = similarity(*params)
        landmarks = apply(forward, template)
        matrix = similarity_transform(landmarks, template)
        assert matrix.shape == (2, 3)
        # float64: the landmarks (one apply from the template) and the Umeyama steps, scale the
        # magnitude of apply's terms
        assert_close(apply(matrix, landmarks), template, terms=UMEYAMA_STEPS + 3,
                     scale=_row_scale(matrix, landmarks), dtype=F64)
        inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]
        # float64 vs np.linalg.inv (both carry error): terms 2 x the Umeyama steps, scale the
        # largest entry (the translation of the inverse)
        assert_close(matrix, inverse, terms=2 * UMEYAMA_STEPS, scale=np.abs(inverse).max(),
                     dtype=F64)


def test_transform_is_the_least_squares_similarity():
    rng = np.random.default_rng(0)
    template = face_template()
    for trial in range(5):
        noisy = apply(similarity(1.3, 10.0 * trial, 3.0, 4.0), template)
        noisy = noisy + rng.normal(0, 2.0, noisy.shape)
        ref = linear_lstsq_similarity(noisy, template)
        # float64 vs float64 least squares in another algorithm (both carry error): terms
        # 2 x 10 equations, scale kappa(A) max|x| (_lstsq_scale)
        assert_close(similarity_transform(noisy, template), ref, terms=2 * 10,
                     scale=_lstsq_scale(noisy, ref), dtype=F64)
    # Mirrored landmarks: the best map must still be a rotation (no reflection).
    mirrored = template * [-1.0, 1.0]
    matrix = similarity_transform(mirrored, template)
    assert np.linalg.det(matrix[:, :2]) > 0
    ref = linear_lstsq_similarity(mirrored, template)
    assert_close(matrix, ref, terms=2 * 10, scale=_lstsq_scale(mirrored, ref), dtype=F64)


def _render_dots(points, shape, sigma=1.5):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    canvas = np.zeros(shape, np.float64)
    for x, y in points:
        canvas += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    image = np.clip(canvas * 255, 0, 255).astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=-1)


def _centroids(image, points, radius=6):
    gray = image[..., 0].astype(np.float64)
    out = []
    for x, y in points:
        x0, y0 = int(round(x)), int(round(y))
        window = gray[y0 - radius:y0 + radius + 1, x0 - radius:x0 + radius + 1]
        yy, xx = np.mgrid[y0 - radius:y0 + radius + 1, x0 - radius:x0 + radius + 1]
        out.append([(window * xx).sum() / window.sum(), (window * yy).sum() / window.sum()])
    return np.array(out)


@pytest.mark.parametrize("output_size", [(112, 112), (112, 96)])
def test_align_face_puts_landmarks_on_the_template(output_size):
    template = face_template(output_size)
    forward = similarity(1.6, 25.0, 60.0, 20.0)  # template -> photo
    landmarks = apply(forward, template)
    photo = _render_dots(landmarks, (260, 240), sigma=1.5 * 1.6)
    aligned = align_face(photo, landmarks, output_size=output_size)
    assert aligned.shape == output_size + (3,) and aligned.dtype == np.uint8
    # Not rounding: the centroid of a Gaussian dot rendered to uint8, warped with bilinear
    # interpolation and re-quantized, lands within 0.15 px of the template point (sub-pixel
    # accuracy of the warp); a wrong transform moves it by pixels.
    np.testing.assert_allclose(_centroids(aligned, template), template, atol=0.15)


def test_landmarks_csv(tmp_path):
    path = tmp_path / "landmarks.csv"
    path.write_text("filename,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5,score\n"
                    "a/1.jpg,1,2,3,4,5,6,7,8,9,10,0.9\n"
                    "b.png,0.5,0,0,0,0,0,0,0,0,0,1\n")
    marks = read_landmarks_csv(path)
    assert list(marks) == ["a/1.jpg", "b.png"]
    assert marks["a/1.jpg"].dtype == np.float32
    np.testing.assert_array_equal(marks["a/1.jpg"], np.arange(1, 11).reshape(5, 2))
    path.write_text("filename,x1,y1\nA,1,2\n")
    with pytest.raises(ValueError, match="missing"):
        read_landmarks_csv(path)
    path.write_text("filename,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\nA,1,2,3,4,5,6,7,8,9,oops\n")
    with pytest.raises(ValueError, match=":2"):
        read_landmarks_csv(path)


def test_bad_arguments():
    image = np.zeros((50, 50, 3), np.uint8)
    with pytest.raises(ValueError, match="landmarks"):
        align_face(image, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="same point"):
        similarity_transform(np.ones((5, 2)), face_template())
    with pytest.raises(ValueError, match="must match"):
        similarity_transform(np.ones((4, 2)), face_template())
    with pytest.raises(ValueError, match="output_size"):
        align_face(image, face_template(), output_size=112)
    with pytest.raises(ValueError, match="finite"):
        similarity_transform(np.full((5, 2), np.nan), face_template())
