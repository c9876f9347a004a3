"""Shared pieces of the PWR loss (Nikitin et al. 2020 eqs. 3-11) used by every method.

Every method (dense, tiled, sorted, sharded) reduces the loss to the same per-pair form: with
per-score values ``x`` (the lower-ranked score's role) and ``y`` (the higher-ranked score's role),

    S = sum over ordered score pairs (a, b) with teacher_a > teacher_b of  l(x_b - y_a),

where the margin is folded into ``x``/``y`` (see ``_pwr.pair_values``) and ``l`` is one of the
inversion penalties below. Keeping ``z = x_b - y_a`` as *the* pair difference in every method
makes them agree bit-for-bit on which pairs are inverted (``x_b > y_a`` iff ``x_b - y_a > 0`` in
IEEE arithmetic), so ties behave identically everywhere.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

RELATIONS = ("cosine", "euclidean")
INVERSIONS = ("diff", "power", "exp", "ranknet")
MARGINS = ("none", "const", "teacher_std", "teacher_diff")
METHODS = ("dense", "tiled", "sorted", "auto")

# exp(beta * z) is factorized as exp(beta (x_b - K)) * exp(-beta (y_a - K)) with K the midpoint
# of the value range, so each factor lies in exp(+-beta * range / 2). Up to beta * range = 60
# the factors (<= e^30) and their sums over 8.4 M scores (<= e^46) stay far inside float32
# (e^88); beyond it tiled blocks use a per-pair expm1 and the sorted method is not exact.
EXP_FACTOR_LIMIT = 60.0
# Largest integer power expanded binomially by the sorted method: (x - y)^p = sum_k C(p, k) x^k
# (-y)^(p-k) cancels more digits as p grows. p = 2 keeps value and gradient within 1e-5 of the
# dense result for values centred in [-2, 2]; p = 3 already loses ~1e-4 (relative to the largest
# gradient) and goes to the tiled method.
SORTED_MAX_POWER = 2


@dataclasses.dataclass(frozen=True)
class Inversion:
    """The inversion penalty ``l(z)`` of Nikitin et al. 2020 eqs. (4)-(6), (11), for the pair
    difference ``z = psi_b^S - psi_a^S + margin`` of a teacher-ordered pair (a above b).

    ``diff``: max(z, 0) (eq. 4); ``power``: max(z, 0)^p (eq. 5); ``exp``: max(exp(beta z) - 1, 0)
    (eq. 6); ``ranknet``: log(1 + exp(beta z)) (eq. 11 with the margin folded into z). The
    penalty and its slope are 0 at z <= 0 for diff/power/exp (the subgradient 0 at the kink).
    """

    kind: str
    power: float = 1.0
    beta: float = 1.0

    @property
    def integer_power(self) -> int | None:
        """The power as an int for ``diff`` (1) and integer ``power``, else None."""
        if self.kind == "diff":
            return 1
        if self.kind == "power" and float(self.power).is_integer():
            return int(self.power)
        return None

    def penalty(self, z: Array) -> Array:
        """``l(z)`` elementwise."""
        pos = z > 0
        if self.kind == "diff":
            return jnp.where(pos, z, 0.0)
        if self.kind == "power":
            if self.power == 1.0:
                return jnp.where(pos, z, 0.0)
            # Double where: the unselected branch must not produce 0 ** (p - 1) = inf in grads.
            return jnp.where(pos, jnp.where(pos, z, 1.0) ** self.power, 0.0)
        if self.kind == "exp":
            return jnp.where(pos, jnp.expm1(self.beta * jnp.where(pos, z, 0.0)), 0.0)
        return jax.nn.softplus(self.beta * z)

    def penalty_and_slope(self, z: Array) -> tuple[Array, Array]:
        """``(l(z), l'(z))`` sharing their transcendental functions (one exp/log per pair)."""
        pos = z > 0
        if self.kind == "diff" or (self.kind == "power" and self.power == 1.0):
            return jnp.where(pos, z, 0.0), pos.astype(z.dtype)
        if self.kind == "power":
            safe = jnp.where(pos, z, 1.0)
            zp = jnp.exp(self.power * jnp.log(safe))
            return jnp.where(pos, zp, 0.0), jnp.where(pos, self.power * zp / safe, 0.0)
        if self.kind == "exp":
            em1 = jnp.where(pos, jnp.expm1(self.beta * jnp.where(pos, z, 0.0)), 0.0)
            return em1, jnp.where(pos, self.beta * (em1 + 1.0), 0.0)
        bz = self.beta * z
        e = jnp.exp(-jnp.abs(bz))
        inv = 1.0 / (1.0 + e)
        return (jnp.maximum(bz, 0.0) + jnp.log1p(e),
                self.beta * jnp.where(bz >= 0, inv, e * inv))


def value_range_bound(relation: str, margin: str, margin_value: float) -> float:
    """An upper bound on ``max(x) - min(y)`` (hence on every pair difference z).

    Scores of L2-normalized embeddings lie in [-1, 1] (cosine) or [0, 2] (euclidean), width 2;
    a constant margin c widens it by c, the teacher std margin by at most 1 (the std of values in
    an interval of width 2), and teacher_diff (x = y = s - t) doubles it. A little slack covers
    rounding."""
    del relation  # both relations have score width 2
    width = 2.0 + 1e-3
    if margin == "const":
        return width + max(float(margin_value), 0.0)
    if margin == "teacher_std":
        return width + 1.0
    if margin == "teacher_diff":
        return 2.0 * width
    return width


def exp_factorizes(inversion: Inversion, range_bound: float) -> bool:
    """Whether exp(beta z) may be split into per-score factors without float32 overflow."""
    return inversion.kind == "exp" and inversion.beta * range_bound <= EXP_FACTOR_LIMIT


def sorted_supports(inversion: Inversion, range_bound: float) -> bool:
    """Whether the sorted method computes this variant exactly (a finite sum of separable
    terms): diff, integer power <= SORTED_MAX_POWER, exp within the factorization limit."""
    p = inversion.integer_power
    if p is not None:
        return 1 <= p <= SORTED_MAX_POWER
    return exp_factorizes(inversion, range_bound)


def check_tie_tolerance(tie_tolerance: float) -> None:
    """Raises for a tie tolerance that is not a finite Python number >= 0 (it is static)."""
    if isinstance(tie_tolerance, bool) or not isinstance(tie_tolerance, (int, float)):
        raise TypeError(f"tie_tolerance must be a Python number, got "
                        f"{type(tie_tolerance).__name__}")
    if not (math.isfinite(tie_tolerance) and tie_tolerance >= 0.0):
        raise ValueError(f"tie_tolerance must be finite and >= 0, got {tie_tolerance}")


def tie_thresholds(t: Array, tie_tolerance: float) -> Array:
    """``[M]`` ``t_a - tol`` in ``t``'s dtype: score b ranks below score a iff
    ``t_b < threshold_a``. Every method compares against these same rounded thresholds, so all
    count the same pairs; with ``tol = 0`` they are ``t`` itself (strict ``t_a > t_b``)."""
    if tie_tolerance == 0.0:
        return t
    return t - jnp.asarray(tie_tolerance, t.dtype)


def count_chunk(m: int) -> int:
    """Rows per int32 partial sum of per-row pair counts (each count is at most ``m``)."""
    return max(1, min(m, (2**31 - 1) // max(m, 1)))


def sum_counts(row_counts: Array, dtype: jnp.dtype = jnp.float32) -> Array:
    """Sum of non-negative int32 per-row counts, each at most ``len(row_counts)``, as ``dtype``
    (the scores' float type: float32, or float64 with x64 on).

    M^2 ordered pairs overflow int32 beyond N ~ 370 (M = N(N-1)/2 > 46341). The counts are
    summed exactly in int32 over chunks small enough not to overflow, and the chunk sums (each
    exact in int32) are added in ``dtype`` by a pairwise reduction: relative error ~1e-7 in
    float32, no int64 (x64 is off by default in JAX)."""
    m = row_counts.shape[0]
    chunk = count_chunk(m)
    pad = (-m) % chunk
    padded = jnp.pad(row_counts.astype(jnp.int32), (0, pad))
    partial = jnp.sum(padded.reshape(-1, chunk), axis=1, dtype=jnp.int32)
    return jnp.sum(partial.astype(dtype))


def float_sort_key(v: Array) -> Array:
    """An int32 key with the same order as float32 ``v`` (-0.0 and +0.0 share a key).

    XLA on CPU sorts a single int32 array several times faster than float32 (whose comparator
    handles NaN), so sorts that need no payload go through this key."""
    v = v.astype(jnp.float32) + 0.0  # -0.0 + 0.0 == +0.0
    bits = jax.lax.bitcast_convert_type(v, jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def lower_ranks(t: Array, tie_tolerance: float = 0.0) -> Array:
    """``[M]`` int32: for each score a, how many scores b rank below it (``t_b < t_a - tol``,
    see ``tie_thresholds``): its row count of ordered pairs.

    Compared in ``t``'s own dtype: float32 through ``float_sort_key`` (a fast int32 sort; the
    key is exact for float32), float64 as floats, so scores equal only after a cast to float32
    are not tied."""
    thresholds = tie_thresholds(t, tie_tolerance)
    if t.dtype == jnp.float64:
        return jnp.searchsorted(jnp.sort(t), thresholds, side="left").astype(jnp.int32)
    return jnp.searchsorted(jnp.sort(float_sort_key(t)), float_sort_key(thresholds),
                            side="left").astype(jnp.int32)


def sorted_lower_ranks(t_sorted: Array, tie_tolerance: float = 0.0) -> Array:
    """``lower_ranks`` for ascending ``t_sorted: [M]``: the start of each score's tie group
    (no search) when ``tol = 0``."""
    if tie_tolerance != 0.0:
        return jnp.searchsorted(t_sorted, tie_thresholds(t_sorted, tie_tolerance),
                                side="left").astype(jnp.int32)
    m = t_sorted.shape[0]
    idx = jnp.arange(m, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones((1,), bool), t_sorted[1:] != t_sorted[:-1]])
    return jax.lax.cummax(jnp.where(starts, idx, 0))


def ordered_pair_count(teacher_scores: Array, tie_tolerance: float = 0.0) -> Array:
    """Number of ordered pairs (a, b) with ``teacher_scores[b] < teacher_scores[a] - tol``, in
    the scores' float dtype.

    ``teacher_scores: [M]``. Ties count nothing. Exact while the total is below 2^24 (float32)
    and within float32 rounding (~1e-7 relative) above; never overflows (see ``sum_counts``)."""
    return sum_counts(lower_ranks(teacher_scores, tie_tolerance), teacher_scores.dtype)


def num_levels(n_events: int) -> int:
    """``ceil(log2(n_events))`` (at least 1)."""
    return max(1, math.ceil(math.log2(max(n_events, 2))))


def binomial_row(p: int) -> np.ndarray:
    """``[C(p, 0), ..., C(p, p)]``."""
    return np.array([math.comb(p, k) for k in range(p + 1)], dtype=np.float64)
