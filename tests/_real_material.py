"""Real face photographs for the tests, read from files of PyPI distributions (never committed).

Two source distributions hold them (MIT licence both):

- face_recognition 1.3.0, ``tests/test_images/``: obama.jpg, obama2.jpg, obama3.jpg,
  biden.jpg, obama_partial_face.jpg, obama_partial_face2.jpg, 32bit.png (one face each);
- insightface 0.7.3, ``insightface/data/images/``: t1.jpg (six faces), Tom_Hanks_54745.png (a
  face insightface aligned to 112x112).

They are kept flat, one file per photo, in ``$KDFACE_TEST_MATERIAL`` if set, else
``<sys.prefix>/test-material`` (the folder the install fills). Fetch them (network needed
once) with

    python tests/_real_material.py [DEST]

which ``pip download``s the two sdists into a temporary folder and copies the photos out into
``DEST`` (default: the folder above), leaving other files there alone. Tests call
:func:`photo`, which fails the test (never skips it) in one line naming the make target when a
photo is missing.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile

MAKE_TARGET = "make test-material"
MATERIAL_ENV = "KDFACE_TEST_MATERIAL"
_FACE_RECOGNITION = "face_recognition-1.3.0/tests/test_images/"
_INSIGHTFACE = "insightface-0.7.3/insightface/data/images/"
PHOTOS = {  # file name -> member of its sdist
    **{name: _FACE_RECOGNITION + name for name in (
        "32bit.png", "biden.jpg", "obama.jpg", "obama2.jpg", "obama3.jpg",
        "obama_partial_face.jpg", "obama_partial_face2.jpg")},
    "t1.jpg": _INSIGHTFACE + "t1.jpg",
    "Tom_Hanks_54745.png": _INSIGHTFACE + "Tom_Hanks_54745.png",
}
# One face each (obama3.jpg also holds a small background false detection scoring ~0.5).
ONE_FACE_PHOTOS = ("32bit.png", "biden.jpg", "obama.jpg", "obama2.jpg", "obama3.jpg",
                   "obama_partial_face.jpg", "obama_partial_face2.jpg")
_PIP_ARGS = ["--no-binary", "face_recognition,insightface", "face_recognition==1.3.0",
             "insightface==0.7.3"]


def material_dir() -> str:
    return os.environ.get(MATERIAL_ENV) or os.path.join(sys.prefix, "test-material")


def photo(name: str) -> str:
    """Path of the photo ``name``; fails the calling test in one line when it is missing."""
    path = os.path.join(material_dir(), name)
    if not os.path.isfile(path):
        import pytest
        pytest.fail(f"real test photo missing: {path} (run `{MAKE_TARGET}`, i.e. `python "
                    f"tests/_real_material.py {material_dir()}`, or set {MATERIAL_ENV})",
                    pytrace=False)
    return path


def fetch(dest: str | None = None) -> str:
    """Downloads the two sdists with ``pip download`` and copies ``PHOTOS`` into ``dest``."""
    dest = os.path.abspath(dest or material_dir())
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # --no-binary for these two only: insightface's build dependencies (numpy, cython),
        # needed by pip to read its metadata, may come as wheels.
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "-d", tmp, *_PIP_ARGS], check=True)
        archives = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".tar.gz")]
        for name, member in PHOTOS.items():
            archive = next(a for a in archives
                           if os.path.basename(a).startswith(member.split("/")[0]))
            with tarfile.open(archive) as tar:
                data = tar.extractfile(member).read()
            with open(os.path.join(dest, name + ".part"), "wb") as f:
                f.write(data)
            os.replace(os.path.join(dest, name + ".part"), os.path.join(dest, name))
    return dest


if __name__ == "__main__":
    if len(sys.argv) > 2:
        raise SystemExit("usage: python tests/_real_material.py [DEST]")
    print(fetch(sys.argv[1] if len(sys.argv) > 1 else None))
