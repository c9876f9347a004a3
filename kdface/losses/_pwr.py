"""Pairwise ranking distillation, PWR (Nikitin et al. 2020 eqs. 3-11): public entry and dense form.

For a batch of N student and teacher embeddings, the relational scores psi are taken over the
M = N(N-1)/2 unordered pairs i < j, and the loss penalizes every *pair of scores* that the
student ranks differently from the teacher. That is M^2 comparisons (1.7e10 at N = 512), so
besides the literal ``dense`` form (an ``[M, M]`` matrix, for small N) there are

* ``tiled`` (``_pwr_tiled``): exact for every variant, blocks of the comparison matrix in a
  scan, memory O(M + block^2) in the forward and the backward pass;
* ``sorted`` (``_pwr_sorted``): exact in O(M log M) for the separable variants (diff, integer
  power <= 2, exp), a 2-D dominance sum over the teacher order and the student values;
* ``auto``: the fastest exact one for the variant and size.

Choices where the paper is open (following the official MXNet code where it exists):

* Embeddings are L2-normalized first (official code). ``cosine``: psi = cos(e_i, e_j).
  ``euclidean``: psi = ||e_i - e_j|| of the normalized embeddings, clamped as
  sqrt(max(d^2, 1e-12)) (official code). The loss is invariant to negating teacher and student
  scores together (the ordered pairs swap roles, every pair difference keeps its value), so it
  does not matter whether a distance or a similarity ranks "higher": distance and 2 - distance,
  or cosine similarity and the official 1 - cos, give identical losses.
* The loss is the *mean* over ordered pairs (a, b) with psi_a^T > psi_b^T strictly (official
  code: sum / count of such pairs), not the plain sum of eq. (3). Teacher ties contribute
  nothing; a batch with no strictly ordered pair gives 0 (the official code gives NaN). The
  count is computed without int32 overflow (see ``_pwr_common.sum_counts``), in the scores'
  dtype.
* Ties: scores that are mathematically equal (e.g. a teacher with integer-valued or quantized
  embeddings) are computed with different roundings, and a strict ``>`` then orders them by
  rounding. ``tie_tolerance`` (absolute, in score units) counts a pair as ordered only when
  ``psi_b^T < psi_a^T - tie_tolerance`` (the threshold rounded once in the scores' dtype, the
  same comparison in every method, so all stay exact). The default 0.0 keeps the strict
  comparison of the paper and the official code. Float32 scores of unit vectors carry a
  rounding error of order 1e-7 (mathematically equal cosines of 512-d integer-valued
  embeddings differed by up to 6e-8 when measured), so ``tie_tolerance=1e-6`` merges such ties
  while still ordering scores 1e-6 apart, far below the spread of a batch's scores.
* Margins (eqs. 7-9) are added to the pair difference z = psi_b^S - psi_a^S + m of *every*
  inversion loss ("such modification can be applied to any of the discussed losses"):
  diff max(z, 0), power max(z, 0)^p, exp max(exp(beta z) - 1, 0), ranknet log(1 + exp(beta z)).
  The official code ignores the margin for RankNet; ``margin='none'`` reproduces the paper's
  PWR-RankNet (eq. 11). teacher_std is the population std of the batch's M teacher scores
  (official code), teacher_diff is psi_a^T - psi_b^T per pair (eq. 9).
* Power: max(z, 0)^p exactly as eq. (5), with slope 0 at z <= 0 (the official code adds 1e-12
  inside the power).
* The teacher is a frozen target: no gradient flows into ``teacher`` (stop_gradient), as in
  every method here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdface.losses import _pwr_common as common
from kdface.losses import _pwr_sorted, _pwr_tiled
from kdface._math import l2_normalize
from kdface.losses._checks import (check_embeddings, check_float, check_option, check_positive,
                                   check_rank, check_same_rows, check_same_shape, compute_dtype)
from kdface.losses._pwr_common import Inversion

Array = jax.Array

HIGHEST = jax.lax.Precision.HIGHEST
# method='dense' refuses an [M, M] matrix with 2^31 or more elements (N > ~305).
DENSE_MAX_ELEMENTS = 2**31 - 1
# method='auto' thresholds from fwd+bwd timings (D=512, exp / ranknet) on the project's shared
# 2-core CPU: dense wins only for tiny batches (N=16: 0.15 ms vs tiled 0.24 ms; N=32: dense
# 1.6 ms, tiled 0.6 ms, sorted 0.9 ms); tiled and sorted tie near N=64 (~1.8 ms); beyond, sorted
# wins and the gap grows as M / log M (N=128: tiled 20 ms, sorted 8 ms; dense 1.1 s).
AUTO_DENSE_MAX_M = 256
AUTO_TILED_MAX_M = 2_048


def pair_rows(n: int) -> tuple[Array, Array]:
    """``(i, j)``: ``[M]`` int32 row/column of each unordered pair i < j, in row-major order of
    the strict upper triangle (``triu_indices(n, 1)``), computed on device (no [M] constants)."""
    m = n * (n - 1) // 2
    k = jnp.arange(m, dtype=jnp.int32)

    def row_start(i: Array) -> Array:  # index of pair (i, i + 1)
        return i * (2 * n - i - 1) // 2

    b = 2.0 * n - 1.0
    guess = jnp.floor((b - jnp.sqrt(jnp.maximum(b * b - 8.0 * k.astype(jnp.float32), 0.0)))
                      / 2.0).astype(jnp.int32)
    i = jnp.clip(guess, 0, n - 2)
    for _ in range(2):  # the float guess is off by at most one; fix it exactly in int32
        i = jnp.where(row_start(i) > k, i - 1, i)
        i = jnp.where(row_start(i + 1) <= k, i + 1, i)
    j = k - row_start(i) + i + 1
    return i, j


def pairwise_scores(embeddings: Array, *, relation: str = "cosine") -> Array:
    """Relational scores psi over the unordered pairs of a batch (Nikitin et al. 2020 §3.1).

    Args:
      embeddings: ``[N, D]`` float, N >= 2; L2-normalized here first.
      relation: ``'cosine'`` (cosine similarity) or ``'euclidean'`` (distance of the normalized
        embeddings, sqrt(max(d^2, 1e-12)) as in the official PWR code).

    Returns:
      ``[M]``, M = N(N-1)/2, the scores of pairs (i, j), i < j, in row-major upper-triangle order,
      in float32 for half-precision inputs.
    """
    check_embeddings("embeddings", embeddings, min_n=2)
    check_option("relation", relation, common.RELATIONS)
    # Rows scaled to unit L2 norm with kdface's one norm floor. MXNet's ``L2Normalization``
    # (official code) divides by sqrt(|e|^2 + 1e-10) (its default ``eps``): the results differ
    # by a relative ~5e-11 / |e|^2, below float32 rounding for rows of norm above ~0.03.
    e = l2_normalize(embeddings.astype(compute_dtype(embeddings)))
    gram = jnp.matmul(e, e.T, precision=HIGHEST)
    i, j = pair_rows(e.shape[0])
    cos = gram[i, j]
    if relation == "cosine":
        return cos
    sq = jnp.sum(e * e, axis=1)
    return jnp.sqrt(jnp.maximum(sq[i] + sq[j] - 2.0 * cos, 1e-12))


def pair_values(s: Array, t: Array, margin: str, margin_value: float) -> tuple[Array, Array]:
    """``(x, y)``, ``[M]`` each, such that the margin-augmented pair difference of the
    teacher-ordered pair (a above b) is ``z_ab = x_b - y_a`` (Nikitin et al. 2020 eqs. 7-9):

    none: x = y = s; const / teacher_std (alpha): x = s + alpha, y = s;
    teacher_diff (alpha_ab = t_a - t_b): x = y = s - t.
    """
    if margin == "teacher_diff":
        u = s - t
        return u, u
    if margin == "const":
        return s + jnp.asarray(margin_value, s.dtype), s
    if margin == "teacher_std":
        return s + jnp.std(t), s
    return s, s


def dense_pair_sum(t: Array, x: Array, y: Array, inversion: Inversion,
                   tie_tolerance: float = 0.0) -> tuple[Array, Array]:
    """``(sum, count)`` over ordered pairs with t_b < t_a - tie_tolerance of ``l(x_b - y_a)``,
    materializing the ``[M, M]`` comparison matrix (rows a, columns b)."""
    ordered = t[None, :] < common.tie_thresholds(t, tie_tolerance)[:, None]
    z = x[None, :] - y[:, None]
    total = jnp.sum(jnp.where(ordered, inversion.penalty(z), 0.0))
    return total, common.sum_counts(jnp.sum(ordered, axis=1, dtype=jnp.int32), t.dtype)


def check_pwr_options(relation: str, inversion: str, margin: str, margin_value: float,
                      power: float, beta: float, method: str) -> None:
    """Raises ValueError for an unknown option string or a non-positive power/beta."""
    check_option("relation", relation, common.RELATIONS)
    check_option("inversion", inversion, common.INVERSIONS)
    check_option("margin", margin, common.MARGINS)
    check_option("method", method, common.METHODS)
    check_positive("power", power)
    check_positive("beta", beta)
    if not np.isfinite(margin_value):
        raise ValueError(f"margin_value must be finite, got {margin_value}")
    if margin != "const" and margin_value != 0.0:
        raise ValueError(f"margin_value is only used with margin='const', got margin={margin!r} "
                         f"and margin_value={margin_value}")


def resolve_method(method: str, m: int, inversion: Inversion, range_bound: float) -> str:
    """The concrete method for ``method='auto'`` (or the given one, checked)."""
    supported = common.sorted_supports(inversion, range_bound)
    if method == "sorted" and not supported:
        raise ValueError(
            f"method='sorted' is exact only for inversion 'diff', integer 'power' <= "
            f"{common.SORTED_MAX_POWER} and 'exp' with beta * score range <= "
            f"{common.EXP_FACTOR_LIMIT}; got inversion={inversion.kind!r}, power="
            f"{inversion.power}, beta={inversion.beta}: use method='tiled' or 'auto'")
    if method == "sorted" and m > _pwr_sorted.SORTED_MAX_M:
        raise ValueError(f"method='sorted' handles up to M={_pwr_sorted.SORTED_MAX_M} scores "
                         f"(N <= 5793), got M={m}")
    if method == "dense" and m * m > DENSE_MAX_ELEMENTS:
        raise ValueError(f"method='dense' would build an [M, M] matrix with M={m} "
                         f"({m * m:.3g} elements); use method='tiled', 'sorted' or 'auto'")
    if method != "auto":
        return method
    if m <= AUTO_DENSE_MAX_M:
        return "dense"
    fits = AUTO_TILED_MAX_M < m <= _pwr_sorted.SORTED_MAX_M
    return "sorted" if supported and fits else "tiled"


def pwr_pair_sum(t: Array, x: Array, y: Array, inversion: Inversion, method: str,
                 range_bound: float, tie_tolerance: float = 0.0) -> tuple[Array, Array]:
    """``(sum, count)`` of the loss over the teacher-ordered pairs by a concrete method."""
    if method == "dense":
        return dense_pair_sum(t, x, y, inversion, tie_tolerance)
    if method == "tiled":
        return _pwr_tiled.tiled_pair_sum(t, x, y, inversion, range_bound,
                                         tie_tolerance=tie_tolerance)
    return _pwr_sorted.sorted_pair_sum(t, x, y, inversion, tie_tolerance=tie_tolerance)


def pwr_loss(student: Array, teacher: Array, *, relation: str = "cosine",
             inversion: str = "exp", margin: str = "teacher_diff", margin_value: float = 0.0,
             power: float = 1.0, beta: float = 1.0, method: str = "auto",
             tie_tolerance: float = 0.0) -> Array:
    """Pairwise ranking distillation loss, Nikitin et al. 2020 eq. (3) with eqs. (4)-(11).

    L = mean over ordered score pairs (a, b) with psi_a^T > psi_b^T of
        l_inv(z_ab),  z_ab = psi_b^S - psi_a^S + margin_ab,

    psi the relational scores of the M = N(N-1)/2 pairs of the batch (``pairwise_scores``).
    See the module docstring for the choices the paper leaves open (normalization, mean, margins
    on every inversion, ties, frozen teacher).

    Args:
      student: ``[N, D_s]`` float embeddings (trained), N >= 2.
      teacher: ``[N, D_t]`` float embeddings (frozen target; no gradient), D_t may differ.
      relation: ``'cosine'`` or ``'euclidean'`` (§3.1).
      inversion: ``'diff'`` (eq. 4), ``'power'`` (eq. 5, exponent ``power``), ``'exp'``
        (eq. 6, ``beta``), ``'ranknet'`` (eq. 11, ``beta``).
      margin: ``'none'``, ``'const'`` (eq. 7, ``margin_value``), ``'teacher_std'`` (eq. 8),
        ``'teacher_diff'`` (eq. 9). PWR-Exp (teacher-diff), the default, is the paper's best.
      margin_value: the constant margin alpha (only with ``margin='const'``), e.g. 0.1.
      power: p > 0 of the power difference loss. Static Python number.
      beta: beta > 0 of the exp and RankNet losses. Static Python number.
      method: ``'dense'`` ([M, M] matrix), ``'tiled'``, ``'sorted'`` or ``'auto'``; all exact
        (module docstring). ``'sorted'`` raises for variants it cannot compute exactly.
      tie_tolerance: teacher scores closer than this count as tied (module docstring, "Ties");
        ``0.0`` (default) orders every pair whose computed scores differ, as the official code.

    Returns:
      Scalar loss (float32 for half-precision inputs).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> t = jax.random.normal(jax.random.key(0), (8, 4))
      >>> float(pwr_loss(t, t, margin='none'))  # the student ranks exactly as the teacher
      0.0
    """
    check_embeddings("student", student, min_n=2)
    check_embeddings("teacher", teacher, min_n=2)
    check_same_rows("student", student, "teacher", teacher)
    check_pwr_options(relation, inversion, margin, margin_value, power, beta, method)
    common.check_tie_tolerance(tie_tolerance)
    n = student.shape[0]
    resolve_method(method, n * (n - 1) // 2, Inversion(inversion, float(power), float(beta)),
                   common.value_range_bound(relation, margin, margin_value))
    dtype = compute_dtype(student, teacher)
    s = pairwise_scores(student.astype(dtype), relation=relation)
    t = pairwise_scores(teacher.astype(dtype), relation=relation)
    return _scores_loss(s, t, relation=relation, inversion=inversion, margin=margin,
                        margin_value=margin_value, power=power, beta=beta, method=method,
                        tie_tolerance=tie_tolerance)


def pwr_loss_from_scores(student_scores: Array, teacher_scores: Array, *, inversion: str = "exp",
                         margin: str = "teacher_diff", margin_value: float = 0.0,
                         power: float = 1.0, beta: float = 1.0, method: str = "auto",
                         tie_tolerance: float = 0.0) -> Array:
    """PWR (Nikitin et al. 2020 eq. 3) on precomputed relational scores, for any relational
    function psi (§3.1: e.g. RKD-A angles of triplets).

    Args:
      student_scores: ``[M]`` float student scores psi^S (trained).
      teacher_scores: ``[M]`` float teacher scores psi^T (frozen; no gradient), same order.
      inversion, margin, margin_value, power, beta, method, tie_tolerance: as in
        ``pwr_loss`` (the tolerance in the scores' own units). For exp,
        ``'auto'`` assumes scores spanning at most 2 (as cosine / normalized distances do) when
        it picks ``'sorted'``; the sorted method returns NaN (never a wrong number) when
        beta * value range exceeds 60, and ``'tiled'`` is exact for any range.

    Returns:
      Scalar mean of the inversion loss over the ordered pairs with teacher_a > teacher_b.
    """
    check_float("student_scores", student_scores)
    check_float("teacher_scores", teacher_scores)
    check_rank("student_scores", student_scores, 1, "[M]")
    check_rank("teacher_scores", teacher_scores, 1, "[M]")
    check_same_shape("student_scores", student_scores, "teacher_scores", teacher_scores)
    if student_scores.shape[0] < 1:
        raise ValueError("student_scores needs at least M=1 score, got M=0")
    check_pwr_options("cosine", inversion, margin, margin_value, power, beta, method)
    common.check_tie_tolerance(tie_tolerance)
    dtype = compute_dtype(student_scores, teacher_scores)
    return _scores_loss(student_scores.astype(dtype), teacher_scores.astype(dtype),
                        relation="cosine", inversion=inversion, margin=margin,
                        margin_value=margin_value, power=power, beta=beta, method=method,
                        tie_tolerance=tie_tolerance)


def _scores_loss(s: Array, t: Array, *, relation: str, inversion: str, margin: str,
                 margin_value: float, power: float, beta: float, method: str,
                 tie_tolerance: float) -> Array:
    """The mean over teacher-ordered pairs, from checked ``[M]`` scores."""
    t = jax.lax.stop_gradient(t)
    inv = Inversion(inversion, float(power), float(beta))
    bound = common.value_range_bound(relation, margin, margin_value)
    concrete = resolve_method(method, s.shape[0], inv, bound)
    x, y = pair_values(s, t, margin, margin_value)
    total, count = pwr_pair_sum(t, x, y, inv, concrete, bound, tie_tolerance)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0).astype(s.dtype)
