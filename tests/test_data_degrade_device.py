"""The device LR view against the host (OpenCV) one it replaces."""
from __future__ import annotations

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from _tolerance import assert_close
from kdface.data._degrade import LowResolutionAugment, degrade_to_low_resolution
from kdface.data._degrade_device import DecideOnlyAugment, DeviceLowResolution, axis_operator


def _faces(n, hw, seed=0, smooth=2.0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *hw, 3)).astype(np.uint8)
    if smooth:
        images = np.stack([cv2.GaussianBlur(i, (0, 0), smooth) for i in images])
    return images


@pytest.mark.parametrize("hw", [(112, 112), (112, 96), (48, 40)])
@pytest.mark.parametrize("smooth", [2.0, 0.0])
def test_pixels_match_opencv_within_one_grey_level(hw, smooth):
    sizes = np.array([0, 8, 12, 16, 20, 30])
    images = _faces(len(sizes), hw, smooth=smooth)
    out = np.asarray(jax.jit(DeviceLowResolution(hw))(jnp.asarray(images), jnp.asarray(sizes)))
    for image, got, size in zip(images, out, sizes):
        want = image if size == 0 else degrade_to_low_resolution(image, int(size))
        diff = np.abs(got - want.astype(np.float32))
        # OpenCV rounds to uint8 after each stage, the device only at the end.
        assert diff.max() <= 1.0, (size, diff.max())
        assert diff.mean() < 0.35, (size, diff.mean())


def _high_band_energy(image, size):
    """Share of the spectrum's energy above the LR image's Nyquist frequency."""
    grey = image.astype(np.float64).mean(-1)
    grey -= grey.mean()
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey))) ** 2
    h, w = grey.shape
    fy = np.abs(np.fft.fftshift(np.fft.fftfreq(h)))[:, None]
    fx = np.abs(np.fft.fftshift(np.fft.fftfreq(w)))[None, :]
    cutoff = 0.5 * size / max(h, w)
    high = (fy > cutoff) | (fx > cutoff)
    return power[high].sum() / power.sum()


def test_degraded_spectra_match_the_host_version():
    images = _faces(5, (112, 112), seed=3, smooth=0.0)
    sizes = np.array([8, 12, 16, 20, 30])
    out = np.asarray(DeviceLowResolution((112, 112))(jnp.asarray(images), jnp.asarray(sizes)))
    for image, got, size in zip(images, out, sizes):
        host = degrade_to_low_resolution(image, int(size))
        original = _high_band_energy(image, size)
        e_host, e_dev = _high_band_energy(host, size), _high_band_energy(got, size)
        # Noise puts ~all of its energy above the LR Nyquist; degraded, only the bicubic
        # upscaler's leakage remains there (13 % at 8 px, 4 % at 30 px, measured with OpenCV).
        assert original > 0.9 and e_host < 0.15
        assert abs(e_dev - e_host) < 0.05 * e_host + 2e-3, (size, e_dev, e_host)


def test_operator_columns_are_opencv_applied_to_impulses():
    # Independent of the matrix construction: degrade an image whose only detail is one
    # bright row with OpenCV and compare with the vertical operator's column.
    h, w, size = 64, 64, 12
    op = axis_operator(h, w, size, vertical=True)
    image = np.zeros((h, w, 3), np.uint8)
    image[20] = 255
    host = degrade_to_low_resolution(image, size).astype(np.float64)[:, w // 2, 0]
    # uint8 output: the bicubic kernel's negative lobes are clipped at 0 by OpenCV. Not a
    # rounding tolerance: OpenCV's uint8 path rounds to integers after each of its three steps
    # (blur, area-down, upscale), +-0.5 each, so 1.5 grey levels by construction.
    np.testing.assert_allclose(np.clip(op[:, 20] * 255.0, 0, 255), host, atol=1.5)
    # Flat fields stay flat: each row of the float32 operator sums to 1 up to the rounding of
    # its three float32 stages (the blur's taps, the area mean, the bicubic taps; at most
    # 3 x 64 terms per output), against the magnitude of the row's terms (negative lobes).
    assert_close(op.sum(axis=1), np.ones(h), terms=3 * h, scale=np.abs(op).sum(axis=1),
                 what="row sums: ")


def test_decide_only_draws_what_the_host_augment_draws():
    host = LowResolutionAugment(seed=7)
    decide = DecideOnlyAugment(host)
    image = np.zeros((112, 112, 3), np.uint8)
    drawn = [decide(image, epoch=e, index=i)[1] for e in range(3) for i in range(400)]
    assert drawn == [host(image, epoch=e, index=i)[1] for e in range(3) for i in range(400)]
    assert decide(image, epoch=0, index=1)[0] is image  # pixels untouched on the host
    share = np.mean(np.asarray(drawn) > 0)
    assert abs(share - 0.4) < 0.05  # Wang et al. 2019 §2.2: "40% of the training images"
    assert set(drawn) == {0, 8, 12, 16, 20, 30}
    again = [DecideOnlyAugment(LowResolutionAugment(seed=7))(image, epoch=1, index=i)[1]
             for i in range(50)]
    assert again == drawn[400:450]


def test_sharded_batch_and_untouched_rows():
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    images = _faces(8, (32, 32), seed=1)
    sizes = np.array([0, 8, 0, 12, 16, 0, 20, 99])  # 99: not a configured size -> untouched
    sharding = NamedSharding(mesh, P("data"))
    dev = DeviceLowResolution((32, 32), sizes=(8, 12, 16, 20, 30))
    out = jax.jit(dev)(jax.device_put(jnp.asarray(images), sharding),
                       jax.device_put(jnp.asarray(sizes), sharding))
    out = np.asarray(out)
    for i in (0, 2, 5, 7):
        np.testing.assert_array_equal(out[i], images[i].astype(np.float32))
    assert np.abs(out[1] - images[1]).max() > 10


def test_bad_shape_refused():
    with pytest.raises(ValueError, match=r"\[B, 32, 32, C\]"):
        DeviceLowResolution((32, 32))(jnp.zeros((2, 16, 16, 3)), jnp.zeros((2,), jnp.int32))
