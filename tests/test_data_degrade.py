"""Low-resolution degradation (Wang et al. 2019 §2.2) and the LR-LFW probe protocol."""
from __future__ import annotations

import numpy as np
import pytest

from kdface.data import (LR_SIZES, LowResolutionAugment, default_blur_sigma,
                         degrade_to_low_resolution, low_resolution_shape, lr_probe, lr_probe_pairs)


def noise_image(h=112, w=112, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def energy_above(image, size, *, margin=1.25):
    """Spectral energy (gray, mean removed) above ``margin`` x the Nyquist of a size-px grid."""
    gray = image.astype(np.float64).mean(axis=-1)
    gray -= gray.mean()
    power = np.abs(np.fft.fft2(gray)) ** 2
    fy = np.abs(np.fft.fftfreq(gray.shape[0]))
    fx = np.abs(np.fft.fftfreq(gray.shape[1]))
    radius = np.maximum(fy[:, None] * gray.shape[0], fx[None, :] * gray.shape[1])
    # radius: cycles per image along the axis; a size-px image holds at most size / 2
    return power[radius > margin * size / 2].sum()


def test_shapes_and_defaults():
    assert low_resolution_shape(112, 96, 8) == (8, 7)
    assert low_resolution_shape(112, 96, 30) == (30, 26)
    assert low_resolution_shape(96, 112, 12) == (10, 12)
    # exact: (112 / 8 - 1) / 2 is exact, and the second repeats the function's float steps
    assert default_blur_sigma(112, 112, 8) == 6.5
    assert default_blur_sigma(112, 96, 30) == (112 / 30 - 1) / 2
    for size in LR_SIZES:
        out = degrade_to_low_resolution(noise_image(112, 96), size)
        assert out.shape == (112, 96, 3) and out.dtype == np.uint8


def test_blocky_image_is_a_fixed_point_without_blur():
    # Hand-computed case: an 8x8 image upsampled x14 by pixel repetition averages back to the
    # 8x8 image exactly and nearest upscaling repeats it again.
    low = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    blocky = np.repeat(np.repeat(low, 14, axis=0), 14, axis=1)
    out = degrade_to_low_resolution(blocky, 8, blur_sigma=0, interpolation="nearest")
    np.testing.assert_array_equal(out, blocky)
    blurred = degrade_to_low_resolution(blocky, 8, interpolation="nearest")
    assert np.abs(blurred.astype(int) - blocky).mean() > 5  # default blur really blurs


def test_effective_resolution_matches_size():
    image = noise_image()
    original = {s: energy_above(image, s) for s in LR_SIZES}
    leak_at_8 = []
    for size in LR_SIZES:
        out = degrade_to_low_resolution(image, size)
        # Detail finer than a size-px grid is gone (< 0.1% of the original's energy there) ...
        # (not rounding: a physical claim, the fraction of spectral energy left above the
        # size-px band; 1e-3 is the "gone" threshold, real leaks are orders below it)
        assert energy_above(out, size) < 1e-3 * original[size]
        # ... and degrading again at the same size barely changes it (re-downscale check),
        again = degrade_to_low_resolution(out, size)
        # (not rounding: uint8 images; the second pass must change < 10 % of what the first did)
        assert np.abs(again.astype(int) - out).mean() < 0.1 * np.abs(out.astype(int) - image).mean()
        leak_at_8.append(energy_above(out, 8))
    # ... while larger sizes keep strictly more detail.
    assert all(a < b for a, b in zip(leak_at_8, leak_at_8[1:]))


def test_blur_options():
    image = noise_image(seed=2)
    sigma = default_blur_sigma(112, 112, 16)
    np.testing.assert_array_equal(degrade_to_low_resolution(image, 16),
                                  degrade_to_low_resolution(image, 16, blur_sigma=sigma))
    sharp = degrade_to_low_resolution(image, 16, blur_sigma=0)
    assert not np.array_equal(sharp, degrade_to_low_resolution(image, 16))
    np.testing.assert_array_equal(lr_probe(image, 16, blur=False), sharp)


def test_augment_fraction_and_size_distribution():
    aug = LowResolutionAugment()
    assert aug.sizes == (8, 12, 16, 20, 30) and aug.fraction == 0.4
    decisions = np.array([aug.decide(epoch=0, index=i) for i in range(4000)])
    degraded = decisions[decisions > 0]
    assert abs(len(degraded) / 4000 - 0.4) < 0.025  # 3.2 sigma of a binomial(4000, 0.4)
    counts = np.array([(degraded == s).mean() for s in LR_SIZES])
    # statistical: each size's share of ~1600 degraded draws, sd sqrt(.2 x .8 / 1600) = 0.01,
    # so 0.05 is 5 sigma
    assert np.all(np.abs(counts - 0.2) < 0.05)
    assert set(np.unique(decisions)) == {0, *LR_SIZES}
    assert all(LowResolutionAugment(fraction=0.0).decide(epoch=0, index=i) == 0
               for i in range(50))
    assert all(LowResolutionAugment(fraction=1.0, sizes=(12,)).decide(epoch=1, index=i) == 12
               for i in range(50))


def test_augment_is_deterministic_in_seed_epoch_index():
    aug = LowResolutionAugment(seed=3)
    image = noise_image(112, 96, seed=4)
    later = [aug.decide(epoch=2, index=i) for i in range(300)][::-1]
    fresh = LowResolutionAugment(seed=3)
    again = [fresh.decide(epoch=2, index=i) for i in reversed(range(300))]
    assert later == again  # order of calls does not matter
    index = next(i for i in range(300) if aug.decide(epoch=2, index=i))
    out1, size1 = aug(image, epoch=2, index=index)
    out2, size2 = fresh(image, epoch=2, index=index)
    assert size1 == size2 > 0
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_array_equal(out1, degrade_to_low_resolution(image, size1))
    other_epoch = [aug.decide(epoch=3, index=i) for i in range(300)]
    other_seed = [LowResolutionAugment(seed=4).decide(epoch=2, index=i) for i in range(300)]
    base = again[::-1]
    assert np.mean(np.array(other_epoch) != base) > 0.2
    assert np.mean(np.array(other_seed) != base) > 0.2
    untouched = next(i for i in range(300) if aug.decide(epoch=2, index=i) == 0)
    out, size = aug(image, epoch=2, index=untouched)
    assert size == 0 and out is image


def test_lr_probe_pairs_keep_gallery():
    images = np.stack([noise_image(16, 16, seed=s) for s in range(4)])
    out = lr_probe_pairs(images, 8)
    np.testing.assert_array_equal(out[0::2], images[0::2])
    for i in (1, 3):
        np.testing.assert_array_equal(out[i], lr_probe(images[i], 8))
    assert not np.array_equal(out[1], images[1])
    np.testing.assert_array_equal(LowResolutionAugment().lr_probe(images[1], 8), out[1])


def test_bad_arguments():
    image = noise_image(16, 16)
    with pytest.raises(ValueError, match="smaller than"):
        degrade_to_low_resolution(image, 16)
    with pytest.raises(ValueError, match="positive int"):
        degrade_to_low_resolution(image, 0)
    with pytest.raises(ValueError, match="blur_sigma"):
        degrade_to_low_resolution(image, 8, blur_sigma=-1)
    with pytest.raises(ValueError, match="interpolation"):
        degrade_to_low_resolution(image, 8, interpolation="lanczos9")
    with pytest.raises(TypeError, match="uint8"):
        degrade_to_low_resolution(image.astype(np.float32), 8)
    with pytest.raises(ValueError, match="fraction"):
        LowResolutionAugment(fraction=1.5)
    with pytest.raises(ValueError, match="sizes"):
        LowResolutionAugment(sizes=())
    with pytest.raises(ValueError, match="epoch"):
        LowResolutionAugment().decide(epoch=-1, index=0)
    with pytest.raises(ValueError, match="pairs"):
        lr_probe_pairs(np.stack([image] * 3), 8)
