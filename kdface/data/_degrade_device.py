"""The low-resolution student view made on the accelerator instead of the host.

The host version (:class:`kdface.data.LowResolutionAugment`) blurs, area-downscales and
bicubic-upscales 40 % of the images with OpenCV: the largest cost of the input pipeline. Every
one of those three steps is linear and separable, so for one LR size the whole degradation of an
``[H, W]`` channel is ``M_h(s) @ X @ M_w(s)^T`` with two small fixed matrices. This module
builds those matrices once, *from OpenCV itself* (each operator is applied to the columns of an
identity matrix in float32, so the device reproduces OpenCV's Gaussian kernel, its
``BORDER_REFLECT_101`` border, ``INTER_AREA``'s fractional coverage and ``INTER_CUBIC``'s
a = -0.75 kernel with clamped borders), and applies them on the device as two batched
matrix products, one matrix per sample gathered by its drawn size.

What is decided where: the host still draws, per sample, whether it is degraded and to which size
(:meth:`LowResolutionAugment.decide`, a pure function of ``(seed, epoch, index)``), and ships the
undegraded image with that size (``student_size``, 0 = untouched). So the fraction, the sizes and
their determinism per seed are exactly the host pipeline's; only the pixel arithmetic moves.

The one difference from the host version: OpenCV rounds to uint8 after the blur and after the
downscale; here the intermediate values stay in float32 and only the result is rounded, so a
degraded pixel differs from the host's by about one grey level (measured in the tests).
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from kdface.data._degrade import (LR_SIZES, LowResolutionAugment, _INTERPOLATIONS,
                                  default_blur_sigma, low_resolution_shape)

__all__ = ["DecideOnlyAugment", "DeviceLowResolution", "axis_operator"]


def axis_operator(length: int, other: int, size: int, *, blur: bool = True,
                  interpolation: str = "bicubic", vertical: bool = True) -> np.ndarray:
    """``[length, length]`` float32: OpenCV's blur + area-down + upscale along one axis.

    ``length`` is the axis being resized (H when ``vertical``), ``other`` the other axis (the
    LR shape and the blur sigma depend on both, as in ``degrade_to_low_resolution``). Column k is
    the degraded unit impulse at k, so ``operator @ x`` degrades a column vector ``x``.
    """
    height, width = (length, other) if vertical else (other, length)
    sigma = default_blur_sigma(height, width, size) if blur else 0.0
    low_h, low_w = low_resolution_shape(height, width, size)
    low = low_h if vertical else low_w
    # Impulses along axis 0 of a [length, length] float image; the other image axis indexes them.
    basis = np.eye(length, dtype=np.float32)
    if not vertical:
        basis = basis.T.copy()
    if sigma > 0:
        # cv2.GaussianBlur's own kernel size for 8-bit images (3 sigma each side, odd).
        ksize = int(round(sigma * 3 * 2 + 1)) | 1
        kernel = cv2.getGaussianKernel(ksize, sigma, cv2.CV_32F)
        one = np.ones((1, 1), np.float32)
        kx, ky = (one, kernel) if vertical else (kernel, one)
        basis = cv2.sepFilter2D(basis, cv2.CV_32F, kx, ky, borderType=cv2.BORDER_REFLECT_101)
    down = (length, low) if vertical else (low, length)  # cv2 dsize is (width, height)
    basis = cv2.resize(basis, down, interpolation=cv2.INTER_AREA)
    basis = cv2.resize(basis, (length, length), interpolation=_INTERPOLATIONS[interpolation])
    return basis if vertical else basis.T.copy()


class DeviceLowResolution:
    """Degrades a batch on the device by its per-sample LR sizes.

    ``images``: uint8 or float ``[B, H, W, 3]`` in pixel units (0-255), ``sizes``: int ``[B]``
    with 0 (untouched) or one of ``sizes``. Returns float32 pixels rounded to integers in
    [0, 255], ready for the usual ``(x / 255 - 0.5) / 0.5`` normalization.
    """

    def __init__(self, image_size: Sequence[int], sizes: Sequence[int] = LR_SIZES, *,
                 blur: bool = True, interpolation: str = "bicubic"):
        height, width = (int(v) for v in image_size)
        self.sizes = tuple(int(s) for s in sizes)
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"sizes must be positive ints, got {sizes}")
        # Row 0: identity (size 0 / a size not smaller than the image: left untouched, as the
        # host augment does).
        rows_h, rows_w = [np.eye(height, dtype=np.float32)], [np.eye(width, dtype=np.float32)]
        for s in self.sizes:
            if s >= max(height, width):
                rows_h.append(rows_h[0])
                rows_w.append(rows_w[0])
                continue
            rows_h.append(axis_operator(height, width, s, blur=blur,
                                        interpolation=interpolation, vertical=True))
            rows_w.append(axis_operator(width, height, s, blur=blur,
                                        interpolation=interpolation, vertical=False))
        self.image_size = (height, width)
        self.vertical = np.stack(rows_h)    # [S + 1, H, H]
        self.horizontal = np.stack(rows_w)  # [S + 1, W, W]
        self._lookup = {s: i + 1 for i, s in enumerate(self.sizes)}

    def size_index(self, sizes: jax.Array) -> jax.Array:
        """Row of each sample's operators: 0 for untouched, 1 + position in ``self.sizes``."""
        table = jnp.asarray([0] + list(self.sizes), jnp.int32)
        match = sizes[:, None].astype(jnp.int32) == table[None, :]
        # Size 0 matches row 0; an unknown size matches nothing and is left untouched.
        return jnp.argmax(match, axis=1)

    def __call__(self, images: jax.Array, sizes: jax.Array) -> jax.Array:
        if images.ndim != 4 or tuple(images.shape[1:3]) != self.image_size:
            raise ValueError(f"images must be [B, {self.image_size[0]}, {self.image_size[1]}, C],"
                             f" got {images.shape}")
        index = self.size_index(sizes)
        vertical = jnp.asarray(self.vertical)[index]      # [B, H, H]
        horizontal = jnp.asarray(self.horizontal)[index]  # [B, W, W]
        x = images.astype(jnp.float32)
        precision = jax.lax.Precision.HIGHEST  # pixel arithmetic: keep float32 on TPU/GPU too
        x = jnp.einsum("bhk,bkwc->bhwc", vertical, x, precision=precision)
        x = jnp.einsum("bwk,bhkc->bhwc", horizontal, x, precision=precision)
        return jnp.clip(jnp.round(x), 0.0, 255.0)


class DecideOnlyAugment:
    """A host ``student_augment`` that only draws the LR size and leaves the pixels alone.

    Same call contract as :class:`LowResolutionAugment` (``aug(image, epoch=, index=) ->
    (image, size)``) with the same decisions, so the pipeline's ``student_size`` field carries
    what :class:`DeviceLowResolution` needs.
    """

    def __init__(self, augment: LowResolutionAugment):
        self.augment = augment

    def __call__(self, image, *, epoch: int, index: int) -> tuple[np.ndarray, int]:
        size = self.augment.decide(epoch=epoch, index=index)
        if size >= max(np.shape(image)[:2]):
            size = 0
        return image, size
