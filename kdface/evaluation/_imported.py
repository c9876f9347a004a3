"""A third-party teacher as an evaluated run: ``--runs=teacher=pth:[ARCH:]PATH`` / ``onnx:...``.

The first thing done with a downloaded insightface IResNet is to measure it. The file is read as
the trainer reads an imported teacher (:func:`kdface.interop.load_teacher_backbone`: a
``torch.save``'d state dict or arcface_torch checkpoint, read without PyTorch, or an ONNX
graph), at the input size its FC fixes (112x112 for insightface's released models), and embeds
images exactly as a trained run's network does: resized with ``cv2.INTER_AREA`` to that size and
normalized ``(x / 255 - 0.5) / 0.5``, RGB (arcface_torch's training normalization).
"""
from __future__ import annotations

import functools
import types
from typing import Any

import numpy as np

from kdface.evaluation._embedder import Embedder


@functools.lru_cache(maxsize=8)
def _jitted_forward(graphdef):
    """One compiled forward per architecture: files of one IResNet share their graphdef."""
    import jax
    from flax import nnx
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))


class TeacherEmbedder(Embedder):
    """``TeacherEmbedder('pth:backbone.pth')``: an imported IResNet as an :class:`Embedder`.

    spec: a teacher spec ``pth:[ARCH:]PATH`` or ``onnx:[ARCH:]PATH``. Has the Embedder's
    forward API (``embed``, ``outputs``, ``model_facts``) and attributes (``input_size``,
    ``embedding_size``, ``network.backbone``; ``has_landmarks`` False); ``spec``, ``arch`` and
    ``path`` name the file, ``workdir`` is the file's path and ``step`` is -1 (no training step).
    """

    def __init__(self, spec: str, *, batch_size: int = 128):
        from flax import nnx
        from kdface import interop
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        _, _, path = interop.parse_teacher_spec(spec)
        self.spec, self.path, self.workdir, self.step = spec, path, path, -1
        self.arch, backbone = interop.load_teacher_backbone(spec, input_size=None)
        self.input_size = tuple(int(v) for v in backbone.input_size)
        self.config = {"teacher": spec, "arch": self.arch, "input_size": list(self.input_size)}
        self.embedding_size = int(backbone.embedding_size)
        self.has_landmarks = False
        self.has_head = False  # a backbone file: no classifier over the training identities
        self.network = types.SimpleNamespace(backbone=backbone, landmark_head=None)
        self.batch_size = batch_size
        graph, self._teacher_state = nnx.split(backbone)
        self._teacher_forward = _jitted_forward(graph)

    def describe(self) -> dict[str, Any]:
        """The run's entry in a report: ``kind``, ``source``, ``arch``."""
        return {"kind": "imported teacher", "source": self.spec, "arch": self.arch}

    def outputs(self, images) -> dict[str, np.ndarray]:
        """``{'embedding': [N, E]}`` float32 for uint8 images (chunks padded as Embedder's)."""
        n = len(images)
        if n == 0:
            raise ValueError("no images to embed")
        chunk = min(self.batch_size, 1 << max(n - 1, 0).bit_length())  # few compiled shapes
        parts = []
        for i in range(0, n, chunk):
            x = self.prepare(images[i:i + chunk])
            m = x.shape[0]
            if m < chunk:  # eval-mode BatchNorm: padding rows change nothing
                x = np.concatenate([x, np.zeros((chunk - m, *x.shape[1:]), x.dtype)])
            out = self._teacher_forward(self._teacher_state, x)
            parts.append(np.asarray(out, np.float32)[:m])
        return {"embedding": np.concatenate(parts)}
