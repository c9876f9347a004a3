"""A real pretrained face model on real photographs: OpenCV Zoo's int8 SFace run by kdface.

Material (tests/_real_material.py and tests/_real_faces.py, installed by ``make test``): three
photos of Barack Obama, one of Joe Biden (face_recognition 1.3.0's test images), Tom Hanks
(insightface 0.7.3's aligned sample) and the astronaut Eileen Collins (scikit-image), aligned
to 112x112 with YuNet's five landmarks and kdface's similarity alignment.

* kdface's SFace (``onnx:`` teacher, the evaluator's path) equals ONNX Runtime on the aligned
  faces: max |difference| <= 1e-4 of the embedding's norm, all six faces in one batch. ONNX
  Runtime refuses the file as published (its graph declares weights as inputs, without values),
  so the reference removes those inputs first, with ``onnx``.
* Every genuine pair (Obama-Obama) scores above every impostor pair (Obama vs the others).
* dlib's ResNet descriptor, an independent embedder with its own alignment, agrees: every
  genuine distance is below every impostor distance.
* SFace's input contract, measured: RGB 0..255 pixels (BGR separates less, [-1, 1] input not at
  all), which kdface reads from the graph and the default order.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from kdface import interop

from _real_faces import SFACE, aligned_face, dlib_descriptor, model_path

NAMES = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "Tom_Hanks_54745.png",
         "astronaut.png")
GENUINE = NAMES[:3]
IMPOSTORS = NAMES[3:]


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    """uint8 ``[6, 112, 112, 3]`` RGB aligned faces, in ``NAMES`` order."""
    return np.stack([aligned_face(n) for n in NAMES])


@pytest.fixture(scope="module")
def reference():
    """ONNX Runtime on SFace, the graph inputs that only name weights removed; takes NCHW
    float32, batch 1 (the graph's)."""
    model = onnx.load(model_path(SFACE))
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    used = {i for node in graph.node for i in node.input}
    shadow = [i for i in graph.input if i.name in inits or i.name not in used]
    assert len(shadow) >= 145  # as published: 175 inputs, one of them the image
    keep = [i for i in graph.input if i not in shadow]
    del graph.input[:]
    graph.input.extend(keep)
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(nchw: np.ndarray) -> np.ndarray:
        return np.concatenate([session.run(None, {name: nchw[i:i + 1]})[0]
                               for i in range(len(nchw))])
    return run


def _scores(embeddings: np.ndarray):
    """Cosine scores ``(genuine, impostor)`` as ``{(a, b): score}``."""
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    index = {n: i for i, n in enumerate(NAMES)}
    cos = lambda a, b: float(e[index[a]] @ e[index[b]])  # noqa: E731
    genuine = {(a, b): cos(a, b) for i, a in enumerate(GENUINE) for b in GENUINE[i + 1:]}
    impostor = {(a, b): cos(a, b) for a in GENUINE for b in IMPOSTORS}
    return genuine, impostor


def test_kdface_sface_equals_onnxruntime_on_real_faces(faces, reference):
    from kdface.evaluation import TeacherEmbedder
    embedder = TeacherEmbedder(f"onnx:{model_path(SFACE)}", batch_size=8)
    got = embedder.outputs(faces)["embedding"]  # one batch of 6 (padded to 8)
    want = reference(faces.astype(np.float32).transpose(0, 3, 1, 2))
    assert got.shape == want.shape == (6, 128)
    rel = np.max(np.abs(got - want), axis=1) / np.linalg.norm(want, axis=1)
    assert float(rel.max()) <= 1e-4, rel


def test_genuine_pairs_score_above_every_impostor_with_kdface_sface(faces):
    from kdface.evaluation import TeacherEmbedder
    embedder = TeacherEmbedder(f"onnx:{model_path(SFACE)}")
    genuine, impostor = _scores(embedder.outputs(faces)["embedding"])
    assert min(genuine.values()) > max(impostor.values()), (genuine, impostor)
    # measured: genuine 0.73-0.80, impostors at most 0.29 (SFace's published threshold 0.363)
    assert min(genuine.values()) > 0.6 and max(impostor.values()) < 0.363


def test_genuine_pairs_closer_than_every_impostor_with_dlib():
    d = {n: dlib_descriptor(n) for n in NAMES}
    dist = lambda a, b: float(np.linalg.norm(d[a] - d[b]))  # noqa: E731
    genuine = {(a, b): dist(a, b) for i, a in enumerate(GENUINE) for b in GENUINE[i + 1:]}
    impostor = {(a, b): dist(a, b) for a in GENUINE for b in IMPOSTORS}
    assert max(genuine.values()) < min(impostor.values()), (genuine, impostor)
    # dlib's own threshold: distances below 0.6 are the same person
    assert max(genuine.values()) < 0.6 < min(impostor.values()), (genuine, impostor)


def test_sface_input_contract_rgb_pixels_by_experiment(faces, reference):
    """The contract kdface reads: layout and size from the graph, raw pixels because the graph
    normalizes itself ((x - 127.5) / 128 inside), RGB by default. The experiment behind it, on
    ONNX Runtime alone: RGB separates genuine from impostor pairs by the widest gap, BGR by a
    narrower one, [-1, 1] input not at all."""
    c = interop.onnx_graph_backbone(model_path(SFACE)).contract
    assert (c.size, c.layout, c.order, c.mean, c.std) == ((112, 112), "nchw", "rgb", (0.0,) * 3,
                                                          (1.0,) * 3)
    pixels = faces.astype(np.float32)
    gaps = {}
    for name, feed in (("rgb", pixels), ("bgr", pixels[..., ::-1]),
                       ("rgb_pm1", pixels / 127.5 - 1.0)):
        genuine, impostor = _scores(reference(np.ascontiguousarray(feed.transpose(0, 3, 1, 2))))
        gaps[name] = min(genuine.values()) - max(impostor.values())
    # measured: rgb 0.437, bgr 0.408, rgb_pm1 -0.071
    assert gaps["rgb"] > gaps["bgr"] > 0 > gaps["rgb_pm1"], gaps
