"""PWR by tiles of the comparison matrix: exact for every variant, memory O(M + block^2).

The M x M comparison matrix (rows a, columns b: pair (a, b) counts when t_a > t_b) is never
held. Scores are sorted by the teacher first, so only the tiles on and below the block
diagonal can hold counted pairs (half the work); a ``lax.scan`` walks those tiles. The
gradient is not left to autodiff of the scan (which would keep a residual per tile): a
``custom_vjp`` computes the value *and* the per-score gradients dS/dx, dS/dy in the same sweep
(they are row and column sums of the tile's slopes), so value-and-grad costs one pass and its
memory is O(M). A forward-only call skips the gradient sums.

Per tile, with ``z = x_b - y_a``:

* diff: the tile is the 0/1 inversion mask m; S = sum_b x_b colsum(m)_b - sum_a y_a rowsum(m)_a,
  gradients are column / row counts. No per-pair arithmetic beyond the mask.
* exp (within the factorization limit, see ``_pwr_common.EXP_FACTOR_LIMIT``): exp(beta z) =
  P_b Q_a with per-score P = exp(beta (x - K)), Q = exp(-beta (y - K)), K the midpoint of the
  value range, so a tile needs the mask and two matrix-vector products, no per-pair exp. The
  factors stay within exp(+-beta range / 2); if the scores at run time are wider than the static
  bound allows, a ``lax.cond`` takes the per-pair branch instead, so the result stays exact.
  (``P_b Q_a - 1`` loses ~1e-7 absolute per pair to cancellation where ``expm1`` would not: the
  value is accurate to ~1e-7 * (1 + loss); the gradient has no cancellation.)
* power, ranknet, exp beyond the limit: per-pair ``l(z)`` and ``l'(z)``.

The scalar is accumulated with Kahan compensation across tiles.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kdface.losses import _pwr_common as common
from kdface.losses._pwr_common import Inversion

Array = jax.Array

# Tile edge: a few [B, B] float32 temporaries (1 MiB each at 512) stay in cache.
DEFAULT_BLOCK = 512


def block_size(m: int, block: int | None = None) -> int:
    """Tile edge for M scores: ``block`` or DEFAULT_BLOCK, shrunk (power of 2, >= 8) for small M."""
    b = DEFAULT_BLOCK if block is None else int(block)
    if b < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return max(8, min(b, 1 << max(3, (m - 1).bit_length())))


def lower_tiles(n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)``: the block indices (i, j) with j <= i, row-major."""
    i, j = np.tril_indices(n_blocks)
    return i.astype(np.int32), j.astype(np.int32)


def _tile_fn(inversion: Inversion, mode: str):
    """The per-tile function ``(tha, ya, qa, tb, xb, pb) -> (sum, grad_y_rows, grad_x_cols)``
    with ``tha`` the row scores' tie thresholds (``_pwr_common.tie_thresholds``).

    ``mode``: 'diff' (mask only), 'factor' (exp as P_b Q_a), 'pair' (per-pair l and l')."""
    beta = inversion.beta

    def tile(tha, ya, qa, tb, xb, pb):
        ordered = tb[None, :] < tha[:, None]   # tha: the rows' tie thresholds t_a - tol
        if mode == "pair":
            z = xb[None, :] - ya[:, None]
            pen, slope = inversion.penalty_and_slope(z)
            pen, slope = jnp.where(ordered, pen, 0.0), jnp.where(ordered, slope, 0.0)
            return jnp.sum(pen), -jnp.sum(slope, axis=1), jnp.sum(slope, axis=0)
        mask = (ordered & (xb[None, :] > ya[:, None])).astype(xb.dtype)
        rows = jnp.sum(mask, axis=1)
        if mode == "diff":
            cols = jnp.sum(mask, axis=0)
            return jnp.dot(xb, cols) - jnp.dot(ya, rows), -rows, cols
        row_p = jnp.matmul(mask, pb, precision=jax.lax.Precision.HIGHEST)
        col_q = jnp.matmul(qa, mask, precision=jax.lax.Precision.HIGHEST)
        return jnp.dot(qa, row_p) - jnp.sum(rows), -beta * qa * row_p, beta * pb * col_q
    return tile


def _kahan_add(acc: tuple[Array, Array], v: Array) -> tuple[Array, Array]:
    total, comp = acc
    yv = v - comp
    new = total + yv
    return new, (new - total) - yv


def _sweep(inversion: Inversion, mode: str, block: int, with_grad: bool,
           t: Array, th: Array, x: Array, y: Array, rows: Array, cols: Array, weight: Array
           ) -> tuple[Array, Array | None, Array | None]:
    """Sum over the listed tiles (weight 0 skips a padding tile); optionally dS/dx, dS/dy.

    ``t, th, x, y: [Mp]`` (sorted by t, padded with t = NaN; ``th`` the tie thresholds of t);
    ``rows, cols, weight: [T]``."""
    tile = _tile_fn(inversion, mode)
    p = q = jnp.zeros_like(x)
    if mode in ("factor", "diff"):
        # K: the midpoint of the real (non-padding) values. For exp it centres the factors'
        # exponents; for diff it keeps x_b colsum - y_a rowsum from cancelling needlessly.
        valid = ~jnp.isnan(t)
        k = jax.lax.stop_gradient(0.5 * (jnp.max(jnp.where(valid, x, -jnp.inf))
                                         + jnp.min(jnp.where(valid, y, jnp.inf))))
        x, y = jnp.where(valid, x - k, 0.0), jnp.where(valid, y - k, 0.0)
        if mode == "factor":
            p, q = jnp.exp(inversion.beta * x), jnp.exp(-inversion.beta * y)

    def piece(v: Array, i: Array) -> Array:
        return jax.lax.dynamic_slice(v, (i * block,), (block,))

    def step(carry, tile_ij):
        i, j, w = tile_ij
        s, gy, gx = tile(piece(th, i), piece(y, i), piece(q, i), piece(t, j), piece(x, j),
                         piece(p, j))
        acc = _kahan_add(carry[0], w * s)
        if not with_grad:
            return (acc,), None
        gx_all, gy_all = carry[1], carry[2]
        gx_all = jax.lax.dynamic_update_slice(gx_all, piece(gx_all, j) + w * gx, (j * block,))
        gy_all = jax.lax.dynamic_update_slice(gy_all, piece(gy_all, i) + w * gy, (i * block,))
        return (acc, gx_all, gy_all), None

    # Zeros derived from x carry its device variance (inside shard_map the tile list varies
    # per device, so the carries do too).
    zero = jnp.sum(x[:0])
    init = ((zero, zero),) + ((jnp.zeros_like(x), jnp.zeros_like(x)) if with_grad else ())
    carry, _ = jax.lax.scan(step, init, (rows, cols, weight.astype(x.dtype)))
    if not with_grad:
        return carry[0][0], None, None
    return carry[0][0], carry[1], carry[2]


def _pick(inversion: Inversion, range_bound: float) -> str:
    if inversion.integer_power == 1:
        return "diff"
    return "factor" if common.exp_factorizes(inversion, range_bound) else "pair"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _tiled_sum(inversion: Inversion, range_bound: float, block: int, t: Array, th: Array,
               x: Array, y: Array, rows: Array, cols: Array, weight: Array) -> Array:
    return _dispatch(inversion, range_bound, block, False, t, th, x, y, rows, cols, weight)[0]


def _dispatch(inversion, range_bound, block, with_grad, t, th, x, y, rows, cols, weight):
    mode = _pick(inversion, range_bound)
    args = (t, th, x, y, rows, cols, weight)
    if mode != "factor":
        return _sweep(inversion, mode, block, with_grad, *args)
    # The static bound holds for scores of normalized embeddings; scores given directly may be
    # wider, and then the factors could overflow: fall back to per-pair exp at run time.
    valid = ~jnp.isnan(t)
    spread = (jnp.max(jnp.where(valid, x, -jnp.inf)) - jnp.min(jnp.where(valid, y, jnp.inf)))
    fits = inversion.beta * spread <= common.EXP_FACTOR_LIMIT
    return jax.lax.cond(fits,
                        lambda a: _sweep(inversion, "factor", block, with_grad, *a),
                        lambda a: _sweep(inversion, "pair", block, with_grad, *a), args)


def _tiled_fwd(inversion, range_bound, block, t, th, x, y, rows, cols, weight):
    total, gx, gy = _dispatch(inversion, range_bound, block, True, t, th, x, y, rows, cols,
                              weight)
    return total, (gx, gy)


def _tiled_bwd(inversion, range_bound, block, res, ct):
    gx, gy = res
    return None, None, ct * gx, ct * gy, None, None, None


_tiled_sum.defvjp(_tiled_fwd, _tiled_bwd)


def sort_and_pad(t: Array, x: Array, y: Array, block: int) -> tuple[Array, Array, Array, Array]:
    """Sorts by the teacher (ascending) and pads to a multiple of ``block`` with t = NaN (a NaN
    teacher score is never ordered against anything). Returns (order, t, x, y)."""
    order = jnp.argsort(t)
    pad = (-t.shape[0]) % block
    t_s = jnp.pad(t[order], (0, pad), constant_values=np.nan)
    return order, t_s, jnp.pad(x[order], (0, pad)), jnp.pad(y[order], (0, pad))


def tile_share(n_blocks: int, n_shares: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, cols, weight)``, ``[n_shares, T]`` each: the lower tiles dealt round-robin
    (balanced work per share), padded with weight-0 tiles."""
    rows, cols = lower_tiles(n_blocks)
    per = -(-rows.shape[0] // n_shares)
    pad = per * n_shares - rows.shape[0]
    weight = np.concatenate([np.ones_like(rows), np.zeros(pad, np.int32)])
    rows, cols = np.pad(rows, (0, pad)), np.pad(cols, (0, pad))
    return tuple(a.reshape(per, n_shares).T for a in (rows, cols, weight))


def tiled_pair_sum(t: Array, x: Array, y: Array, inversion: Inversion, range_bound: float, *,
                   block: int | None = None, share: tuple[Array, int] | None = None,
                   tie_tolerance: float = 0.0) -> tuple[Array, Array]:
    """``(sum, count)`` over ordered pairs with t_b < t_a - tie_tolerance of ``l(x_b - y_a)``
    (Nikitin et al. 2020 eq. 3), by lower-triangular tiles of the teacher-sorted comparison matrix
    (a tolerance >= 0 keeps every counted pair in those tiles).

    Args:
      t: ``[M]`` teacher scores (no gradient); x, y: ``[M]`` student pair values
        (``_pwr.pair_values``); inversion: the penalty; range_bound: static bound on
        max(x) - min(y) deciding the exp factorization; block: tile edge (default 512).
      share: ``(index, n_shares)``: only the tiles of share ``index`` (may be traced, e.g. a
        device's axis index) of ``n_shares``; the sum is then partial, the count total.
    """
    m = t.shape[0]
    b = block_size(m, block)
    order, t_s, x_s, y_s = sort_and_pad(jax.lax.stop_gradient(t), x, y, b)
    del order
    index, n_shares = (0, 1) if share is None else share
    rows, cols, weight = (jnp.asarray(a)[index] for a in tile_share(t_s.shape[0] // b, n_shares))
    th_s = common.tie_thresholds(t_s, tie_tolerance)   # NaN padding stays NaN: never ordered
    total = _tiled_sum(inversion, range_bound, b, t_s, th_s, x_s, y_s, rows, cols, weight)
    count = common.sum_counts(common.sorted_lower_ranks(t_s[:m], tie_tolerance), t.dtype)
    return total, count
