"""Low-resolution degradation of faces (Wang et al. 2019 §2.2 and the LR-LFW protocol, §3).

Wang et al. 2019 §2.2 makes low-resolution (LR) students' inputs by Gaussian blur and downscaling:
40% of the training images, chosen at random, become 8x8, 12x12, 16x16, 20x20 or 30x30; the teacher
keeps the original. Its LR-LFW test set keeps the gallery image and degrades the probe. The network
still takes the full input size, so the LR image is scaled back up.

Choices the paper leaves open, made here:

* **Shape of the LR image**: the longer side becomes ``size`` and the aspect ratio is kept
  (a 112x96 face at size 8 becomes 8x7), so the LR image fits a ``size x size`` box and never
  carries more than ``size`` pixels along either axis.
* **Blur**: Gaussian with ``sigma = (f - 1) / 2`` where ``f = max(H, W) / size`` is the
  downscale factor (the anti-aliasing width scikit-image uses), kernel chosen by OpenCV from
  sigma; ``blur_sigma=0`` disables it.
* **Resampling**: down with ``cv2.INTER_AREA`` (each LR pixel averages the pixels it covers),
  back up with ``interpolation`` (default bicubic).
* **Randomness**: one numpy Generator per sample, seeded by ``SeedSequence`` hashing
  ``(stream tag, seed, epoch, index)``; a sample is degraded when ``u < fraction`` and then gets
  a size drawn uniformly from ``sizes``. So the student view is a pure function of
  ``(seed, epoch, index)``: identical across workers, hosts and resumed runs.
* **Which 40 %**: "40 percent of the training set are randomly selected for downscaling as LR
  samples" (§2.2) reads as one subset, chosen once: ``subset='fixed'`` draws each sample's
  decision and size from ``(stream tag, seed, index)`` only, the same in every epoch.
  ``subset='redrawn'`` (the default, kdface's earlier behaviour) draws them anew each epoch, so
  over a run every image is seen at full and at low resolution.
"""
from __future__ import annotations

import cv2
import numpy as np

from kdface.data._images import check_image

__all__ = [
    "LR_SIZES",
    "LR_SUBSETS",
    "LowResolutionAugment",
    "default_blur_sigma",
    "degrade_to_low_resolution",
    "low_resolution_shape",
    "lr_probe",
    "lr_probe_pairs",
]

LR_SIZES = (8, 12, 16, 20, 30)  # Wang et al. 2019 §2.2
_INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR,
                   "bicubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}
_STREAM_TAG = 0x4C52  # "LR": keeps this stream apart from other users of the same seed
_STREAM_TAG_FIXED = 0x4C46  # "LF": the fixed subset's draws, apart from the per-epoch ones
LR_SUBSETS = ("redrawn", "fixed")


def _check_size(size, height: int, width: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if size >= max(height, width):
        raise ValueError(
            f"size {size} must be smaller than the image's longer side {max(height, width)} "
            "to degrade it"
        )
    return int(size)


def low_resolution_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """``(h, w)`` of the LR image: the longer side becomes ``size``, aspect kept, >= 1."""
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def default_blur_sigma(height: int, width: int, size: int) -> float:
    """``(f - 1) / 2`` with ``f = max(H, W) / size``: 6.5 for 112 -> 8, ~1.37 for 112 -> 30."""
    return max(0.0, (max(height, width) / size - 1.0) / 2.0)


def degrade_to_low_resolution(image, size: int, *, blur_sigma: float | None = None,
                              interpolation: str = "bicubic") -> np.ndarray:
    """Blur, downscale to ``size`` px, and scale back up (Wang et al. 2019 §2.2).

    ``image``: uint8 ``[H, W, 3]``; ``size`` < ``max(H, W)``. Returns uint8 ``[H, W, 3]``
    whose detail is that of a ``low_resolution_shape(H, W, size)`` image. ``blur_sigma``:
    Gaussian sigma in input pixels (``None``: :func:`default_blur_sigma`; 0: no blur).
    ``interpolation`` (``'bicubic'``, ``'bilinear'``, ``'nearest'``, ``'area'``) is used for the
    upscaling; downscaling averages areas (module docstring).
    """
    image = check_image(image)
    height, width = image.shape[:2]
    size = _check_size(size, height, width)
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(
            f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}"
        )
    sigma = default_blur_sigma(height, width, size) if blur_sigma is None else float(blur_sigma)
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"blur_sigma must be >= 0, got {blur_sigma!r}")
    if sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma)
    low_h, low_w = low_resolution_shape(height, width, size)
    low = cv2.resize(image, (low_w, low_h), interpolation=cv2.INTER_AREA)
    return cv2.resize(low, (width, height), interpolation=_INTERPOLATIONS[interpolation])


def lr_probe(image, size: int, *, blur: bool = True, interpolation: str = "bicubic"):
    """One LR-LFW probe: ``image`` uint8 ``[H, W, 3]`` degraded to ``size`` (Wang et al. 2019
    §3)."""
    return degrade_to_low_resolution(image, size, blur_sigma=None if blur else 0.0,
                                     interpolation=interpolation)


def lr_probe_pairs(images, size: int, *, blur: bool = True,
                   interpolation: str = "bicubic") -> np.ndarray:
    """LR-LFW from a verification set: ``images`` uint8 ``[2P, H, W, 3]``, pair ``i`` being
    rows ``2i`` (gallery, kept) and ``2i + 1`` (probe, degraded to ``size``). Returns a copy.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] % 2:
        raise ValueError(f"images must be [2P, H, W, 3] pairs, got shape {images.shape}")
    out = images.copy()
    for i in range(1, len(out), 2):
        out[i] = lr_probe(out[i], size, blur=blur, interpolation=interpolation)
    return out


class LowResolutionAugment:
    """The student view of Wang et al. 2019 §2.2: degrade ``fraction`` of samples to LR.

    ``sizes``: LR sizes drawn uniformly (default 8, 12, 16, 20, 30); ``fraction``: share of
    samples degraded (0.4); ``seed``: with ``epoch`` and ``index`` fixes every decision
    (module docstring); ``subset``: 'redrawn' (decisions drawn anew each epoch) or 'fixed' (one
    subset and one size per sample for the whole run, ``epoch`` ignored); ``blur``: Gaussian
    blur before downscaling. ``aug(image, epoch=e, index=i)`` returns ``(image uint8 [H, W,
    3], size)`` with ``size`` 0 when the image is returned untouched (the same array, not a
    copy; also when the drawn size is not smaller than the image).
    """

    def __init__(self, sizes=LR_SIZES, fraction: float = 0.4, seed: int = 0, blur: bool = True,
                 interpolation: str = "bicubic", subset: str = "redrawn"):
        sizes = tuple(sizes)
        if not sizes or any(isinstance(s, bool) or not isinstance(s, (int, np.integer))
                            or s < 1 for s in sizes):
            raise ValueError(f"sizes must be a non-empty sequence of positive ints, got {sizes}")
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}")
        if subset not in LR_SUBSETS:
            raise ValueError(f"subset must be one of {LR_SUBSETS}, got {subset!r}")
        self.subset = subset
        self.sizes = tuple(int(s) for s in sizes)
        self.fraction = float(fraction)
        self.seed = int(seed)
        self.blur = bool(blur)
        self.interpolation = interpolation

    def decide(self, *, epoch: int, index: int) -> int:
        """The LR size for sample ``index`` in ``epoch``, or 0 to leave it untouched."""
        for name, value in (("epoch", epoch), ("index", index)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.subset == "fixed":
            entropy = [_STREAM_TAG_FIXED, self.seed, int(index)]
        else:
            entropy = [_STREAM_TAG, self.seed, int(epoch), int(index)]
        rng = np.random.default_rng(np.random.SeedSequence(entropy))
        if rng.random() >= self.fraction:
            return 0
        return self.sizes[int(rng.integers(len(self.sizes)))]

    def __call__(self, image, *, epoch: int, index: int) -> tuple[np.ndarray, int]:
        image = check_image(image)
        size = self.decide(epoch=epoch, index=index)
        if size == 0 or size >= max(image.shape[:2]):
            return image, 0
        return self.lr_probe(image, size), size

    def lr_probe(self, image, size: int) -> np.ndarray:
        """``image`` degraded to ``size`` with this augment's blur and interpolation."""
        return lr_probe(image, size, blur=self.blur, interpolation=self.interpolation)

    def __repr__(self) -> str:
        return (f"LowResolutionAugment(sizes={self.sizes}, fraction={self.fraction}, "
                f"seed={self.seed}, blur={self.blur}, interpolation={self.interpolation!r}, "
                f"subset={self.subset!r})")
