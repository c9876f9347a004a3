"""Multi-kernel maximum mean discrepancy between student and teacher features (Wang et al. 2019,
eqs. (7)-(8), §2.3), the feature term of its improved low-resolution KD objective, eq. (9).

Fast form: the kernel matrices are never stacked. Each block's squared distances come from one
GEMM (``|a|^2 + |b|^2 - 2 a.b``, clamped at 0) and all kernels are evaluated and summed inside
the same elementwise pass, so XLA fuses GEMM epilogue, the five exponentials and the reduction;
no ``[2N, 2N, D]`` broadcast and no ``[K, N, M]`` kernel stack exist. The private ``*_sums``
cores take row ranges so ``kdface.losses._sharded`` can split the rows over devices.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from kdface._math import l2_normalize
from kdface.losses._checks import check_embeddings, check_option, compute_dtype
from kdface.losses._relational import gram, row_mask

Array = jax.Array
ESTIMATORS = ("biased", "unbiased", "linear")


def check_mmd_args(x: Array, y: Array, multipliers: Sequence[float], estimator: str) -> None:
    """Argument checks shared with the sharded version (shapes here are the global ones)."""
    check_option("estimator", estimator, ESTIMATORS)
    check_embeddings("x", x)
    check_embeddings("y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same feature size D, got {x.shape[1]} and "
                         f"{y.shape[1]}")
    n, m = x.shape[0], y.shape[0]
    if estimator == "unbiased" and min(n, m) < 2:
        raise ValueError(f"the unbiased estimator needs N >= 2 and M >= 2 rows, got N={n}, M={m}")
    if estimator == "linear" and (n != m or n % 2):
        raise ValueError(f"the linear estimator needs N == M and N even, got N={n}, M={m}")
    if isinstance(multipliers, (str, bytes)) or not isinstance(multipliers, Sequence):
        raise TypeError(f"multipliers must be a sequence of numbers, got {multipliers!r}")
    if not multipliers or not all(isinstance(v, (int, float)) and v > 0 for v in multipliers):
        raise ValueError(f"multipliers must be a non-empty sequence of positive numbers, "
                         f"got {multipliers!r}")


def prepare_features(x: Array, y: Array, normalize: bool) -> tuple[Array, Array]:
    """Casts to the compute dtype and, with ``normalize``, L2-normalizes each row (Wang et al. 2019
    §2.3: ``x / |x|``, ``y / |y|``, so both sides have the same scale)."""
    dtype = compute_dtype(x, y)
    x, y = x.astype(dtype), y.astype(dtype)
    if normalize:
        x, y = l2_normalize(x), l2_normalize(y)
    return x, y


def pooled_mean_sq_distance(x: Array, y: Array) -> Array:
    """``sigma^2``: mean of ``|z_a - z_b|^2`` over the ``P(P-1)`` ordered pairs ``a != b`` of the
    pooled sample ``z = [x; y]`` (``P = N + M``), equal to the mean over its distinct unordered
    pairs. Uses ``sum_{a,b} |z_a - z_b|^2 = 2 P sum_a |z_a - mean z|^2``: O(P D), no cancellation.
    """
    z = jnp.concatenate([x, y], axis=0)
    p = z.shape[0]
    zc = z - jnp.mean(z, axis=0, keepdims=True)
    return 2.0 * jnp.sum(zc * zc) / (p - 1)


def kernel_coefficients(sigma2: Array, multipliers: Sequence[float]) -> Array:
    """``[K]`` factors ``c_m = 1 / (2 sigma^2 m)`` so that kernel ``m`` is ``exp(-c_m d^2)``,
    with ``sigma^2`` held constant (``stop_gradient``) and kept away from 0."""
    sigma2 = jax.lax.stop_gradient(jnp.maximum(sigma2, 1e-12))
    mults = jnp.asarray(multipliers, dtype=sigma2.dtype)
    return 1.0 / (2.0 * sigma2 * mults)


def mean_kernel(d2: Array, coefs: Array) -> Array:
    """``(1/K) sum_m exp(-c_m d2)``, elementwise; written as a sum so it fuses into one pass."""
    total = jnp.exp(-coefs[0] * d2)
    for m in range(1, coefs.shape[0]):
        total = total + jnp.exp(-coefs[m] * d2)
    return total / coefs.shape[0]


def _block_kernel_sum(rows: Array, cols: Array, coefs: Array, self_mask: Array | None,
                      include_self: bool) -> Array:
    sq_r = jnp.sum(rows * rows, axis=1)
    sq_c = jnp.sum(cols * cols, axis=1)
    d2 = jnp.maximum(sq_r[:, None] + sq_c[None, :] - 2.0 * gram(rows, cols), 0.0)
    if self_mask is None:
        return jnp.sum(mean_kernel(d2, coefs))
    if include_self:   # k(a, a) = 1 exactly, whatever the GEMM rounding left on the diagonal
        return jnp.sum(mean_kernel(jnp.where(self_mask, 0.0, d2), coefs))
    return jnp.sum(jnp.where(self_mask, 0.0, mean_kernel(d2, coefs)))


def quadratic_sums(x: Array, y: Array, coefs: Array, x_offset: Array | int, n_x: int,
                   y_offset: Array | int, n_y: int, *, include_self: bool
                   ) -> tuple[Array, Array, Array]:
    """Partial kernel sums ``(S_xx, S_yy, S_xy)`` for rows ``x_offset..x_offset+n_x`` of
    ``x: [N, D]`` and rows ``y_offset..`` of ``y: [M, D]`` against all of ``x``, ``y``.
    ``include_self`` keeps the diagonal ``k(a, a)`` in ``S_xx``/``S_yy`` (biased estimator)."""
    x_rows = jax.lax.dynamic_slice_in_dim(x, x_offset, n_x, axis=0)
    y_rows = jax.lax.dynamic_slice_in_dim(y, y_offset, n_y, axis=0)
    s_xx = _block_kernel_sum(x_rows, x, coefs, row_mask(x_offset, n_x, x.shape[0]),
                             include_self)
    s_yy = _block_kernel_sum(y_rows, y, coefs, row_mask(y_offset, n_y, y.shape[0]),
                             include_self)
    s_xy = _block_kernel_sum(x_rows, y, coefs, None, include_self)
    return s_xx, s_yy, s_xy


def combine_quadratic(s_xx: Array, s_yy: Array, s_xy: Array, n: int, m: int,
                      unbiased: bool) -> Array:
    """Wang et al. 2019 eq. (8) from full kernel sums; the unbiased form divides the
    diagonal-free within-sample sums by ``N(N-1)``, ``M(M-1)``."""
    if unbiased:
        return s_xx / (n * (n - 1)) + s_yy / (m * (m - 1)) - 2.0 * s_xy / (n * m)
    return s_xx / (n * n) + s_yy / (m * m) - 2.0 * s_xy / (n * m)


def linear_sum(x: Array, y: Array, coefs: Array) -> Array:
    """Sum over quads ``q = (x_2i, x_2i+1, y_2i, y_2i+1)`` of
    ``h_q = k(x_2i, x_2i+1) + k(y_2i, y_2i+1) - k(x_2i, y_2i+1) - k(x_2i+1, y_2i)``."""
    x0, x1, y0, y1 = x[0::2], x[1::2], y[0::2], y[1::2]

    def k(a: Array, b: Array) -> Array:
        diff = a - b
        return mean_kernel(jnp.sum(diff * diff, axis=1), coefs)

    return jnp.sum(k(x0, x1) + k(y0, y1) - k(x0, y1) - k(x1, y0))


def mk_mmd(x: Array, y: Array, *, multipliers: Sequence[float] = (1, 2, 4, 8, 16),
           normalize: bool = True, estimator: str = "biased") -> Array:
    """Squared multi-kernel MMD (Wang et al. 2019 eq. (8); MK-MMD after Long et al. 2015 [7]).

    ``MMD^2 = mean_{i,i'} k(x_i, x_i') + mean_{j,j'} k(y_j, y_j') - 2 mean_{i,j} k(x_i, y_j)``
    with ``k = (1/K) sum_m k_m`` and Gaussian ``k_m(a, b) = exp(-|a - b|^2 / (2 sigma^2 m))``,
    i.e. variances ``sigma^2 * m`` for ``m`` in ``multipliers``, as in Wang et al. 2019 §2.3.

    Args:
      x: ``[N, D]`` student features (Wang et al. 2019 eq. (9) applies it to the student's
        embedding).
      y: ``[M, D]`` teacher features (gradients flow to both; stop the teacher's yourself).
      multipliers: variance multipliers; Wang et al. 2019's ``(1, 2, 4, 8, 16)``.
      normalize: L2-normalize each row first (Wang et al. 2019: "normalized feature MK-MMD").
      estimator: ``'biased'`` (eq. (8) as written, diagonals included, ``>= 0``, exactly 0 for
        ``x == y``; any ``N, M >= 1``), ``'unbiased'`` (U-statistic: within-sample sums over
        ``i != i'`` divided by ``N(N-1)``, resp. ``M(M-1)``; needs ``N, M >= 2``; may be
        negative), or ``'linear'`` (Gretton et al. 2012's O(N) estimator used by DAN: mean over
        the ``N/2`` quads ``(x_2i, x_2i+1, y_2i, y_2i+1)`` of ``k(x_2i, x_2i+1) +
        k(y_2i, y_2i+1) - k(x_2i, y_2i+1) - k(x_2i+1, y_2i)``; needs ``N == M`` even).

    Returns:
      Scalar squared MMD (float32 for half-precision inputs).

    Choices the paper leaves open: ``sigma^2`` is the mean squared distance over the distinct
    pairs of the pooled ``N + M`` samples (after normalization), computed in O((N+M) D) for all
    three estimators and held constant under ``stop_gradient`` (the bandwidth is a heuristic,
    not a quantity to optimize; DAN's code does the same). The kernel uses the paper's
    ``2 sigma^2`` (DAN's public code omits the 2 and centres the multipliers on ``sigma^2``).
    The kernels are averaged (equal convex weights ``beta_m = 1/K``, Long et al.'s MK-MMD),
    not summed, so the value lies in ``[0, 2]`` for the biased estimator whatever ``K``. The
    returned value is eq. (8)'s squared form, not eq. (7)'s norm (whose gradient is infinite at
    0). Squared distances come from centred features through one GEMM at
    ``Precision.HIGHEST``.
    """
    check_mmd_args(x, y, multipliers, estimator)
    x, y = prepare_features(x, y, normalize)
    coefs = kernel_coefficients(pooled_mean_sq_distance(x, y), multipliers)
    n, m = x.shape[0], y.shape[0]
    if estimator == "linear":
        return linear_sum(x, y, coefs) / (n // 2)
    center = jax.lax.stop_gradient(jnp.mean(jnp.concatenate([x, y], axis=0), axis=0,
                                            keepdims=True))
    x, y = x - center, y - center
    unbiased = estimator == "unbiased"
    sums = quadratic_sums(x, y, coefs, 0, n, 0, m, include_self=not unbiased)
    return combine_quadratic(*sums, n, m, unbiased)

