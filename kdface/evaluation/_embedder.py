"""What a compared model is: a trained run's network (``Embedder``) or an exported embedding file.

``Embedder(workdir)`` rebuilds the student network of a kdface training run with
``kdface.training.restore_run`` (the trainer's own constructor: same backbone, input size, head,
landmark head and stage adapters) and restores a checkpoint's ``model`` item. The network is built
abstractly (``nnx.eval_shape``), so nothing is initialized only to be overwritten.

``EmbeddingFile(path)`` is a run without a checkpoint: an ``.npz`` of exported embeddings (the
format is in :mod:`kdface.evaluate`'s docstring).
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kdface import metrics


def resolve_workdir(workdir: str) -> str:
    """The directory holding the run's ``config.json`` (the last ``gen_k`` of a ``generations=K``
    run, Yan et al. 2019); see ``kdface.training.resolve_run_dir``."""
    from kdface.training import resolve_run_dir
    return resolve_run_dir(workdir)


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


class Embedder:
    """A trained run's student network as ``embedder(uint8 images [N, H, W, 3]) -> [N, E]``.

    workdir: a kdface training workdir (its ``config.json`` and ``checkpoints/``), or the parent
    of ``gen_k`` generations (the last is used). step: checkpoint step (latest if None).

    Images are uint8 RGB; each is resized to the run's ``input_size`` with ``cv2.INTER_AREA`` and
    normalized to ``(x / 255 - 0.5) / 0.5``, as the training pipeline does. Forward passes run
    in chunks of at most ``batch_size`` images; a short chunk is padded (eval mode: BatchNorm uses
    running statistics, so padding rows change nothing) to a power of two so that few shapes are
    compiled.

    Attributes: ``config`` (the run's config dict), ``workdir``, ``step``, ``input_size``
    (H, W), ``embedding_size``, ``has_landmarks`` (the run's network carries Wang et al. 2017's
    landmark head), ``has_head`` and ``num_classes`` (its trained classifier head, which
    :meth:`predictions` reads), ``network`` (the eval-mode ``FaceNetwork``), ``embeds_images``
    (True: the evaluators hand it images).
    """

    embeds_images = True

    def __init__(self, workdir: str, *, batch_size: int = 128, step: int | None = None):
        import jax
        from flax import nnx
        from kdface.training import restore_run
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        restored = restore_run(workdir, step=step)
        self.workdir = restored.workdir
        self.config = restored.run
        self.input_size = restored.input_size
        self.step = restored.step
        self.network = restored.network
        self.network.eval()
        self.has_landmarks = self.network.landmark_head is not None
        self.has_head = True
        self.num_classes = int(restored.num_classes)
        self.embedding_size = int(self.network.backbone.embedding_size)
        self.batch_size = batch_size
        self._graphdef, self._state = nnx.split(self.network)

        graph = self._graphdef

        @jax.jit
        def predict(state, images):
            # argmax on the device: [N] ints leave it, not [N, C] logits (85,742 on MS1M)
            logits = nnx.merge(graph, state, copy=True)(images)["logits"]
            return jax.numpy.argmax(logits, axis=1)
        self._predict = predict

        @jax.jit
        def forward(state, images):
            out = nnx.merge(graph, state, copy=True)(images)
            keep = {"embedding": out["embedding"]}
            if "landmarks" in out:
                keep["landmarks"] = out["landmarks"]
            return keep
        self._forward = forward

    # -- forward passes ------------------------------------------------------------------------

    def prepare(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` (or a list of ``[H_i, W_i, 3]``) -> float32 network input
        ``[N, *input_size, 3]`` (resized with INTER_AREA, normalized as in training)."""
        import cv2
        from kdface.data import normalize_images
        if isinstance(images, np.ndarray):
            if images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"images must be uint8 [N, H, W, 3] RGB, got shape "
                                 f"{images.shape}")
            batch = list(images) if images.shape[1:3] != self.input_size else images
        else:
            batch = list(images)
        if isinstance(batch, list):
            out = np.empty((len(batch), *self.input_size, 3), np.uint8)
            for i, im in enumerate(batch):
                im = np.asarray(im)
                if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
                    raise TypeError(f"image {i} must be uint8 [H, W, 3] RGB, got {im.dtype} "
                                    f"{im.shape}")
                out[i] = (im if im.shape[:2] == self.input_size else
                          cv2.resize(im, self.input_size[::-1], interpolation=cv2.INTER_AREA))
            batch = out
        if batch.dtype != np.uint8:
            raise TypeError(f"images must be uint8 RGB, got dtype {batch.dtype}")
        return normalize_images(batch)

    def outputs(self, images) -> dict[str, np.ndarray]:
        """``{'embedding': [N, E]}`` (+ ``'landmarks'``: [N, 5, 2] in pixels of the network
        input when the run has a landmark head) for uint8 images; float32."""
        n = len(images)
        if n == 0:
            raise ValueError("no images to embed")
        chunk = min(self.batch_size, _next_pow2(n))
        parts: dict[str, list[np.ndarray]] = {}
        for i in range(0, n, chunk):
            x = self.prepare(images[i:i + chunk])
            m = x.shape[0]
            if m < chunk:
                x = np.concatenate([x, np.zeros((chunk - m, *x.shape[1:]), x.dtype)])
            for key, value in self._forward(self._state, x).items():
                parts.setdefault(key, []).append(np.asarray(value, np.float32)[:m])
        return {k: np.concatenate(v) for k, v in parts.items()}

    def predictions(self, images) -> np.ndarray:
        """int64 ``[N]``: the identity of each image's maximum prediction, ``argmax`` over the
        run's own trained classifier head (the softmax head's logits, or a margin head's
        ``logit_scale * cos θ``: the same argmax as cos θ; no margin at test time). Ties go to
        the lowest class index (``argmax``'s rule)."""
        n = len(images)
        if n == 0:
            raise ValueError("no images to classify")
        chunk = min(self.batch_size, _next_pow2(n))
        parts = []
        for i in range(0, n, chunk):
            x = self.prepare(images[i:i + chunk])
            m = x.shape[0]
            if m < chunk:
                x = np.concatenate([x, np.zeros((chunk - m, *x.shape[1:]), x.dtype)])
            parts.append(np.asarray(self._predict(self._state, x), np.int64)[:m])
        return np.concatenate(parts)

    def __call__(self, images) -> np.ndarray:
        """Embeddings ``[N, E]`` float32 (not normalized) of uint8 images."""
        return self.outputs(images)["embedding"]

    def embed(self, images, *, flip: bool = False) -> np.ndarray:
        """``[N, E]`` embeddings; with ``flip`` insightface's "image + flipped image" option:
        ``kdface.metrics.embeddings_with_flip(e(x), e(mirror(x)))`` (float64, unit rows)."""
        emb = self(images)
        if not flip:
            return emb
        mirrored = [np.ascontiguousarray(np.asarray(im)[:, ::-1]) for im in images]
        return metrics.embeddings_with_flip(emb, self(mirrored))

    def landmarks(self, images) -> np.ndarray:
        """Predicted 5-point landmarks ``[N, 5, 2]`` (x, y) in pixels of the network input
        (``input_size``), the frame the training targets use (kdface.data pipeline: landmarks
        scaled with the image resize, Wang et al. 2017 eq. (6) regression targets)."""
        if not self.has_landmarks:
            raise ValueError(f"run {self.workdir} has no landmark head (train it with "
                             f"--recipe=transfer --transfer_task=alignment)")
        return self.outputs(images)["landmarks"]

    def describe(self) -> dict[str, Any]:
        """The run's entry in a report: ``kind``, ``source``, ``step``."""
        return {"kind": "checkpoint", "source": self.workdir, "step": self.step}

    # -- model facts ---------------------------------------------------------------------------

    def model_facts(self, *, latency_repeats: int = 20) -> dict[str, Any]:
        """``params`` (backbone trainable scalars: the deployed embedding network, classifier and
        landmark heads excluded), ``macs`` (multiply-accumulates of one batch-1 forward pass at
        ``input_size``, counted from the jaxpr by ``kdface.models.count_macs``), and
        ``latency_ms``: median wall time of a jitted batch-1 backbone forward pass on the CPU
        (after one compiling call; input already normalized, so image decoding is excluded)."""
        import jax
        from flax import nnx
        from kdface.models import count_macs, count_params
        if isinstance(latency_repeats, bool) or not isinstance(latency_repeats, int) \
                or latency_repeats < 1:
            raise ValueError(f"latency_repeats must be a positive int, got {latency_repeats!r}")
        backbone = self.network.backbone
        facts: dict[str, Any] = {"params": int(count_params(backbone)),
                                 "macs": int(count_macs(backbone, self.input_size)),
                                 "input_size": list(self.input_size)}
        cpu = jax.devices("cpu")[0]
        graph, state = nnx.split(backbone)
        state = jax.device_put(state, cpu)
        forward = jax.jit(lambda s, x: nnx.merge(graph, s)(x))
        x = jax.device_put(np.zeros((1, *self.input_size, 3), np.float32), cpu)
        forward(state, x).block_until_ready()
        times = []
        for _ in range(latency_repeats):
            t0 = time.perf_counter()
            forward(state, x).block_until_ready()
            times.append(time.perf_counter() - t0)
        facts["latency_ms"] = 1000.0 * float(np.median(times))
        facts["latency_repeats"] = latency_repeats
        return facts


class EmbeddingFile:
    """Exported embeddings (``.npz``) standing in for a run without a checkpoint.

    Keys (all optional, by protocol; ``kdface.evaluate`` docstring):
    verification ``<set>/emb`` [2P, D] interleaved pairs (or plain ``emb`` for any set) with
    ``<set>/issame`` [P] (or ``issame``), LR probes ``<set>/lr<size>/emb``; identification
    ``gallery_emb`` [G, D], ``gallery_labels`` [G], ``probe_emb`` [Q, D], ``probe_labels`` [Q],
    ``distractor_emb`` [M, D]; ``flip`` (bool scalar: whether the embeddings are image + flip).
    It embeds no images and has no landmark head (``embeds_images``, ``has_landmarks`` False).
    """

    embeds_images = False
    has_landmarks = False
    has_head = False

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"embedding file {self.path} not found")
        try:
            with np.load(self.path, allow_pickle=False) as z:
                self.arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError) as err:
            raise ValueError(f"{self.path} is not a readable .npz of arrays: {err}") from err
        flip = self.arrays.get("flip")
        self.flip = None if flip is None else bool(np.asarray(flip))

    def describe(self) -> dict[str, Any]:
        """The run's entry in a report: ``kind``, ``source``."""
        return {"kind": "embeddings", "source": self.path}

    def _find(self, set_name: str, suffix: str) -> np.ndarray | None:
        for key in (f"{set_name}/{suffix}", suffix):
            if key in self.arrays:
                return self.arrays[key]
        return None

    def set_names(self) -> list[str]:
        """Verification sets named in the file (``<set>/issame`` keys)."""
        return sorted(k[:-len("/issame")] for k in self.arrays if k.endswith("/issame"))

    def issame(self, set_name: str) -> np.ndarray:
        found = self._find(set_name, "issame")
        if found is None:
            raise KeyError(f"{self.path} holds no '{set_name}/issame' (or 'issame') array")
        return np.asarray(found).astype(bool)

    def pair_embeddings(self, set_name: str, issame: np.ndarray | None, *,
                        lr_size: int | None = None) -> np.ndarray | None:
        """Interleaved ``[2P, D]`` embeddings of set ``set_name`` (HR, or LR probes at
        ``lr_size``); None when the file has none. Checks them against the set's ``issame``
        (and the file's own)."""
        suffix = "emb" if lr_size is None else f"lr{int(lr_size)}/emb"
        emb = self._find(set_name, suffix)
        if emb is None:
            return None
        emb = np.asarray(emb)
        if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.floating):
            raise ValueError(f"{self.path} '{suffix}' must be float [2P, D], got {emb.dtype} "
                             f"{emb.shape}")
        if emb.shape[0] % 2:
            raise ValueError(f"{self.path} '{suffix}' has an odd number of rows "
                             f"({emb.shape[0]}): interleaved pairs need [2P, D]")
        own = self._find(set_name, "issame")
        if own is not None and issame is not None and not np.array_equal(
                np.asarray(own).astype(bool), np.asarray(issame).astype(bool)):
            raise ValueError(f"{self.path}: its pair labels (issame, {len(own)} pairs) differ "
                             f"from set {set_name!r}'s ({len(issame)} pairs)")
        labels = own if issame is None else issame
        if labels is not None and emb.shape[0] // 2 != len(labels):
            raise ValueError(f"{self.path} '{suffix}' has {emb.shape[0] // 2} pairs but set "
                             f"{set_name!r} has {len(labels)} issame labels")
        return emb

    def identification_arrays(self) -> dict[str, np.ndarray] | None:
        """``gallery_emb, gallery_labels, probe_emb, probe_labels`` (+ ``distractor_emb``) or
        None when the file holds no identification arrays."""
        keys = ("gallery_emb", "gallery_labels", "probe_emb", "probe_labels")
        present = [k for k in keys if k in self.arrays]
        if not present:
            return None
        if len(present) != len(keys):
            raise ValueError(f"{self.path} has {present} but identification needs all of "
                             f"{list(keys)}")
        out = {k: self.arrays[k] for k in keys}
        for emb, lab in (("gallery_emb", "gallery_labels"), ("probe_emb", "probe_labels")):
            if out[emb].ndim != 2 or out[lab].shape != (out[emb].shape[0],):
                raise ValueError(f"{self.path}: {lab} {out[lab].shape} must hold one label per "
                                 f"row of {emb} {out[emb].shape}")
        if "distractor_emb" in self.arrays:
            out["distractor_emb"] = self.arrays["distractor_emb"]
        return out
