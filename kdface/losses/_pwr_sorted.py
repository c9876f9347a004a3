"""PWR in O(M log M): the separable variants as 2-D dominance sums (Nikitin et al. 2020 eq. 3).

For the separable inversions the pair term splits into per-score factors,

    l(x_b - y_a) = sum_c psi_c(y_a) phi_c(x_b)      on the pairs with x_b > y_a,

diff: (x_b - y_a) = 1 * x_b + (-y_a) * 1; integer power p: binomial expansion of (x_b - y_a)^p;
exp: exp(beta x_b) exp(-beta y_a) - 1 * 1 (values centred at K first, see ``_channels``). So

    S = sum_a sum_c psi_c(y_a) F_c(a),    F_c(a) = sum over b with t_b < t_a and x_b > y_a of
                                                   phi_c(x_b),

a *dominance sum*: for every a, a sum over the points b below it in teacher order and above it in
value. It is computed for all a at once by divide and conquer over the teacher order, the way a
wavelet tree is built:

1. Events. Each score b is a *data* event carrying phi(x_b) at its teacher-sorted position; each
   score a is a *query* event at the start of its teacher tie group, so a data event precedes a
   query iff t_b < t_a (ties exact). With ``g`` the tie group start and ``h`` its end, the 2M
   events get distinct ids ``e``: query a -> g_a + pos_a, data b -> pos_b + h_b.
2. One sort of all events by value (descending; a query before a data event of equal value, so
   only x_b > y_a strictly counts).
3. Levels k = L-1 .. 4 (E = 2^L >= 2M), one traced ``fori_loop`` body: the arrays are ordered by
   (e >> (k+1), value). Within each block of 2^(k+1) ids, every query in the right half adds the
   sum of the data weights in the left half that come before it (higher value): one blockwise
   prefix sum. Then each block is stably partitioned by bit k of e (new order: (e >> k, value)).
   Every (b, a) pair with e_b < e_a is counted exactly once, at the level of the highest bit
   where e_b and e_a differ. The last four levels run at once as all pairs inside blocks of 16
   events; a final scatter puts the events in id order.

Blockwise prefix sums are small matrix products with a triangular 0/1 matrix over chunks of 64
plus a fixed number of stages over chunk totals: no sequential scan, each product sums at most
64 terms (float32 error does not grow with M), and the integer counts of the partition stay exact
while they are below 2^24 (hence ``SORTED_MAX_M``). Sorting uses XLA's fast single-operand int32
sort through an LSD radix over (digit, index) packed keys (float64 inputs: ``jnp.lexsort``).

The gradient: dS/dpsi_c(a) = F_c(a) and dS/dphi_c(b) = G_c(b) = sum over a with t_a > t_b and
y_a < x_b of psi_c(y_a), the same pairs seen from the other end: in the same levels, each data
event in a left half adds the query weights of the right half that come *after* it (a suffix
sum). The ``custom_vjp`` forward runs this one fused sweep for F and G (the primal alone skips G);
the backward only scales them. Memory is O(M) (no per-level residuals).

Exactness and accuracy: the set of counted pairs is the dense one exactly (strict comparisons of
the same float32 values, teacher ties excluded). Sums differ from dense by rounding only: the
exp value subtracts the pair count from sum P_b Q_a, ~1e-7 absolute per pair relative to 1 +
loss; gradients have no such cancellation. Exp needs beta * (max x - min y) <= 60 (factors within
e^30, ``_pwr_common.EXP_FACTOR_LIMIT``); beyond it the result is NaN rather than wrong (the
public entry never sends such variants here for scores of normalized embeddings).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kdface.losses import _pwr_common as common
from kdface.losses._pwr_common import Inversion

Array = jax.Array

HIGHEST = jax.lax.Precision.HIGHEST
QUERY, DATA, PAD = 0, 1, 2
TYPE_SHIFT = 29          # event code = id | type << 29 (ids < 2^29)
CHUNK = 64               # edge of the triangular matrices of the blockwise prefix sums
# Partition counts (up to half an id block) are float32 sums, exact up to 2^24: 2M <= 2^25 ids.
SORTED_MAX_M = 1 << 24   # N <= 5793
BRUTE_BLOCK = 16         # the last levels run as all pairs inside blocks of this many events
INT_MIN = np.int32(-(2**31))


# ------------------------------------------------------------------------------------ sorting

def unsigned_key(v: Array) -> Array:
    """int32 bit pattern whose *unsigned* order is the float order of ``v`` (-0.0 == +0.0)."""
    bits = jax.lax.bitcast_convert_type(v.astype(jnp.float32) + 0.0, jnp.int32)
    return bits ^ ((bits >> 31) | INT_MIN)


def _index_bits(n: int) -> int:
    return max(1, (n - 1).bit_length())


def _take_last(v: Array, perm: Array) -> Array:
    return v[perm] if v.ndim == 1 else jnp.take_along_axis(v, perm, axis=-1)


def radix_argsort(key: Array, low_bit: Array | None = None) -> Array:
    """Stable argsort along the last axis of the unsigned 32-bit pattern ``key`` (with
    ``low_bit`` in {0, 1} as a 33rd, least significant bit when given), ``[..., n]`` int32.

    LSD radix: each pass sorts packed int32 ``digit << b | i`` (b index bits, digit 31 - b bits)
    with XLA's single-operand sort, several times faster on CPU than a multi-operand sort."""
    n = key.shape[-1]
    b = _index_bits(n)
    width = 31 - b
    digits = []
    start = 0
    if low_bit is not None:
        digits.append(low_bit.astype(jnp.int32)
                      | ((key & ((1 << (width - 1)) - 1)) << 1))
        start = width - 1
    while start < 32:
        digits.append(jax.lax.shift_right_logical(key, jnp.int32(start)) & ((1 << width) - 1))
        start += width
    idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), key.shape)
    perm = idx
    for d in digits:
        packed = (_take_last(d, perm) << b) | idx
        perm = _take_last(perm, jnp.sort(packed, axis=-1) & ((1 << b) - 1))
    return perm


def _tie_groups(sorted_keys: Array) -> tuple[Array, Array]:
    """For sorted keys ``[n]``: the start and the end (exclusive) of each one's run of equal
    keys, int32."""
    n = sorted_keys.shape[0]
    idx = jnp.arange(n, dtype=jnp.int32)
    change = sorted_keys[1:] != sorted_keys[:-1]
    first = jnp.concatenate([jnp.ones((1,), bool), change])
    last = jnp.concatenate([change, jnp.ones((1,), bool)])
    start = jax.lax.cummax(jnp.where(first, idx, 0))
    end = jax.lax.cummin(jnp.where(last, idx + 1, n), reverse=True)
    return start, end


def value_argsort(v: Array, *, descending: bool = False, low_bit: Array | None = None
                  ) -> tuple[Array, Array]:
    """``(perm, keys)``: a stable argsort of ``v`` (then of ``low_bit`` in {0, 1}, ascending,
    among equal values) and per-element keys that compare equal exactly where the values do
    (-0.0 == +0.0). float32 goes through ``radix_argsort``; float64 (x64 on) through
    ``jnp.lexsort``, slower but exact."""
    if v.dtype != jnp.float64:
        key = unsigned_key(v)
        key = ~key if descending else key
        return radix_argsort(key, low_bit), key
    key = -(v + 0.0) if descending else v + 0.0
    cols = (key,) if low_bit is None else (low_bit, key)
    return jnp.lexsort(cols).astype(jnp.int32), key


def teacher_layout(t: Array, tie_tolerance: float = 0.0) -> tuple[Array, Array, Array]:
    """``(e_query, e_data, lower)``, ``[M]`` int32 each, in element order: the event ids of
    every score as a query and as a data event, and its number of teacher scores below it
    (``t_b < t_a - tol``: its row count of ordered pairs).

    Query a must follow exactly the ``lower_a`` lowest data events. With ``tol = 0`` that is
    the start of its tie group. Otherwise, in teacher order (``lower`` is non-decreasing there,
    the thresholds being monotone), query q gets id ``lower_q + q`` and data p gets
    ``p + #{q: lower_q <= p}``: a merge of the two sequences, so data p precedes query q iff
    ``p < lower_q``."""
    m = t.shape[0]
    perm, key = value_argsort(t)
    idx = jnp.arange(m, dtype=jnp.int32)
    if tie_tolerance != 0.0:
        start = common.sorted_lower_ranks(t[perm], tie_tolerance)
        end = jnp.searchsorted(start, idx, side="right").astype(jnp.int32)
    else:
        start, end = _tie_groups(key[perm])
    out = jnp.zeros((3, m), jnp.int32).at[:, perm].set(
        jnp.stack([start + idx, idx + end, start]), unique_indices=True)
    return out[0], out[1], out[2]


def event_order(x: Array, y: Array | None = None) -> Array:
    """``[2M]`` int32: events (0..M-1 the queries with values y, M..2M-1 the data with values x)
    by descending value, a query before a data event of equal value. ``y=None`` means y = x
    (margins none / teacher_diff): one sort of M values, each tie run laid out as its queries
    then its data."""
    m = x.shape[0]
    if y is None:
        perm, key = value_argsort(x, descending=True)
        start, end = _tie_groups(key[perm])
        idx = jnp.arange(m, dtype=jnp.int32)
        slots = jnp.concatenate([start + idx, idx + end])
        return jnp.zeros((2 * m,), jnp.int32).at[slots].set(
            jnp.concatenate([perm, perm + m]), unique_indices=True)
    kind = jnp.concatenate([jnp.zeros((m,), jnp.int32), jnp.ones((m,), jnp.int32)])
    return value_argsort(jnp.concatenate([y, x]), descending=True, low_bit=kind)[0]


# ----------------------------------------------------------------------- dominance by levels

def _triangle(size: int, log_group: Array, reverse: bool) -> Array:
    """``[size, size]`` 0/1 T[j, i] = 1 where j <= i (j >= i if ``reverse``) within the same
    aligned group of 2^log_group (``log_group`` may be traced)."""
    j = jnp.arange(size, dtype=jnp.int32)[:, None]
    i = jnp.arange(size, dtype=jnp.int32)[None, :]
    rel = (j >= i) if reverse else (j <= i)
    return (rel & ((j >> log_group) == (i >> log_group))).astype(jnp.float32)


def block_scan(v: Array, log_block: Array, *, reverse: bool = False) -> Array:
    """Exclusive prefix sums (suffix sums if ``reverse``) of ``v: [C, n]`` along axis 1 within
    aligned blocks of 2^log_block (n a power of two; ``log_block`` may be traced).

    Matrix products with a triangular 0/1 matrix over chunks of 64, then the same over the chunk
    totals (a fixed number of stages; a stage whose block fits in one chunk passes nothing up):
    no sequential scan, each product sums at most 64 terms, integer counts stay exact."""
    c, n = v.shape
    size = min(CHUNK, n)
    lg_size = size.bit_length() - 1
    chunks = v.reshape(c, n // size, size)
    tri = _triangle(size, jnp.minimum(log_block, lg_size), reverse).astype(v.dtype)
    inclusive = jnp.matmul(chunks, tri, precision=HIGHEST)
    exclusive = inclusive - chunks
    if n > size:
        totals = inclusive[:, :, 0 if reverse else -1]
        outer = block_scan(totals, jnp.maximum(log_block - lg_size, 0), reverse=reverse)
        exclusive = exclusive + outer[:, :, None]
    return exclusive.reshape(c, n)


def _level(k: Array, code: Array, fwd: Array, rev: Array) -> tuple[Array, Array, Array]:
    """One level (``k`` may be traced): within blocks of 2^(k+1) ids, right-half queries add
    the left-half data weights before them (``fwd``), left-half data add the right-half query
    weights after them (``rev``); then the stable partition by bit k of the id."""
    half = jnp.left_shift(jnp.int32(1), k)
    kind = code >> TYPE_SHIFT
    side = (code >> k) & 1
    left_data = (kind == DATA) & (side == 0)
    right_query = (kind == QUERY) & (side == 1)
    before = block_scan(jnp.concatenate([jnp.where(left_data[None], fwd, 0.0),
                                         side.astype(fwd.dtype)[None]]), k + 1)
    fwd = fwd + jnp.where(right_query[None], before[:-1], 0.0)
    if rev.shape[0]:
        after = block_scan(jnp.where(right_query[None], rev, 0.0), k + 1, reverse=True)
        rev = rev + jnp.where(left_data[None], after, 0.0)
    pos = jnp.arange(code.shape[0], dtype=jnp.int32)
    local = pos & (2 * half - 1)
    ones = before[-1].astype(jnp.int32)
    dest = (pos - local) + jnp.where(side == 0, local - ones, half + ones)
    moved = jnp.zeros((fwd.shape[0] + rev.shape[0],) + code.shape, fwd.dtype).at[:, dest].set(
        jnp.concatenate([fwd, rev]), unique_indices=True)
    code = jnp.zeros_like(code).at[dest].set(code, unique_indices=True)
    return code, moved[:fwd.shape[0]], moved[fwd.shape[0]:]


def _within_blocks(code: Array, fwd: Array, rev: Array, size: int) -> tuple[Array, Array]:
    """All remaining levels at once, by brute force inside blocks of ``size`` events (ordered by
    value within each block): pairs (i, j), i before j, e_i < e_j, i data, j query."""
    n = code.shape[0]
    blocks = code.reshape(n // size, size)
    ids, kind = blocks & ((1 << TYPE_SHIFT) - 1), blocks >> TYPE_SHIFT
    earlier = np.triu(np.ones((size, size), bool), k=1)                     # i before j
    pairs = (earlier[None] & (ids[:, :, None] < ids[:, None, :])
             & (kind == DATA)[:, :, None] & (kind == QUERY)[:, None, :]).astype(fwd.dtype)
    fb = fwd.reshape(fwd.shape[0], n // size, size)
    fwd = fwd + jnp.einsum("bij,cbi->cbj", pairs, fb, precision=HIGHEST).reshape(fwd.shape)
    if rev.shape[0]:
        rb = rev.reshape(rev.shape[0], n // size, size)
        rev = rev + jnp.einsum("bij,cbj->cbi", pairs, rb, precision=HIGHEST).reshape(rev.shape)
    return fwd, rev


def dominance_sweep(code: Array, fwd: Array, rev: Array) -> tuple[Array, Array]:
    """Events in initial (value) order -> ``(fwd, rev)`` in id order, where each query's ``fwd``
    rows gained the weights of the data events with smaller ids and higher value, and each data
    event's ``rev`` rows gained the weights of the queries with larger ids and lower value.

    ``code: [E]`` int32 id | type << 29 (E a power of two); ``fwd: [Cf, E]`` (data: weights,
    queries: 0); ``rev: [Cr, E]`` (queries: weights, data: 0; Cr may be 0)."""
    n = code.shape[0]
    size = min(BRUTE_BLOCK, n)
    top, bottom = n.bit_length() - 1, size.bit_length() - 1

    def body(step, carry):  # levels k = top-1 .. bottom, one traced body (fast compile)
        return _level(top - 1 - step, *carry)
    code, fwd, rev = jax.lax.fori_loop(0, top - bottom, body, (code, fwd, rev))
    fwd, rev = _within_blocks(code, fwd, rev, size)
    dest = code & ((1 << TYPE_SHIFT) - 1)
    out = jnp.zeros((fwd.shape[0] + rev.shape[0], n), fwd.dtype).at[:, dest].set(
        jnp.concatenate([fwd, rev]), unique_indices=True)
    return out[:fwd.shape[0]], out[fwd.shape[0]:]


def dominance_sums(e_query: Array, e_data: Array, order: Array, phi: Array, psi: Array
                   ) -> tuple[Array, Array]:
    """``(F [Cf, M], G [Cr, M])``: F[c, a] = sum of phi[c, b] over b with t_b < t_a and
    x_b > y_a; G[c, b] = sum of psi[c, a] over a with t_a > t_b and y_a < x_b (the same pairs
    seen from the other end).

    ``e_query, e_data: [M]`` event ids (``teacher_layout``), ``order: [2M]`` (``event_order``),
    ``phi: [Cf, M]`` data weights, ``psi: [Cr, M]`` query weights (Cr may be 0)."""
    m = e_query.shape[0]
    n_events = 2 * m
    pad = (1 << common.num_levels(n_events)) - n_events
    kinds = jnp.concatenate([jnp.full((m,), QUERY, jnp.int32), jnp.full((m,), DATA, jnp.int32)])
    ids = jnp.concatenate([e_query, e_data])
    code = jnp.concatenate([(ids | (kinds << TYPE_SHIFT))[order],
                            jnp.arange(n_events, n_events + pad, dtype=jnp.int32)
                            | (PAD << TYPE_SHIFT)])

    def initial(data_w: Array, query_w: Array) -> Array:
        w = jnp.concatenate([query_w, data_w], axis=1)[:, order]
        return jnp.pad(w, ((0, 0), (0, pad)))
    fwd, rev = dominance_sweep(code, initial(phi, jnp.zeros_like(phi)),
                               initial(jnp.zeros_like(psi), psi))
    return fwd[:, e_query], rev[:, e_data]


# ------------------------------------------------------------------------- the loss, with vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bilinear(live: tuple[bool, ...], e_query: Array, e_data: Array, order: Array, phi: Array,
              psi: Array) -> Array:
    """sum over dominating pairs of sum_c psi[c, a] phi[c, b]; ``live`` marks the channels
    whose phi depends on the student (only those need the reverse sums)."""
    f, _ = dominance_sums(e_query, e_data, order, phi, psi[:0])
    return jnp.sum(psi * f)


def _bilinear_fwd(live, e_query, e_data, order, phi, psi):
    rows = np.flatnonzero(np.asarray(live))
    f, g = dominance_sums(e_query, e_data, order, phi, psi[rows])
    return jnp.sum(psi * f), (f, g)


def _bilinear_bwd(live, res, ct):
    f, g = res
    d_phi = jnp.zeros_like(f).at[np.flatnonzero(np.asarray(live))].set(g)
    return None, None, None, ct * d_phi, ct * f


_bilinear.defvjp(_bilinear_fwd, _bilinear_bwd)


def _channels(inversion: Inversion, x: Array, y: Array
              ) -> tuple[Array, Array, tuple[bool, ...]]:
    """``(phi [C, M], psi [C, M], live)`` with l(x_b - y_a) = sum_c psi[c, a] phi[c, b] on
    x_b > y_a. Values are centred at K = (max x + min y) / 2 (no gradient; it cancels) so the
    exp factors lie in exp(+-beta range / 2) and binomial terms stay small."""
    k = jax.lax.stop_gradient(0.5 * (jnp.max(x) + jnp.min(y)))
    xc, yc = x - k, y - k
    if inversion.kind == "exp":
        one = jnp.ones_like(x)
        phi = jnp.stack([one, jnp.exp(inversion.beta * xc)])
        psi = jnp.stack([-one, jnp.exp(-inversion.beta * yc)])
        return phi, psi, (False, True)
    p = inversion.integer_power
    coef = common.binomial_row(p)
    phi = jnp.stack([xc ** c for c in range(p + 1)])
    psi = jnp.stack([float(coef[c]) * (-yc) ** (p - c) for c in range(p + 1)])
    return phi, psi, (False,) + (True,) * p


def sorted_pair_sum(t: Array, x: Array, y: Array, inversion: Inversion, *,
                    query_mask: Array | None = None, tie_tolerance: float = 0.0
                    ) -> tuple[Array, Array]:
    """``(sum, count)`` over ordered pairs with t_b < t_a - tie_tolerance of ``l(x_b - y_a)``
    (Nikitin et al. 2020 eq. 3) for diff, integer power and exp, in O(M log M) time and O(M)
    memory.

    Args:
      t: ``[M]`` teacher scores (no gradient); x, y: ``[M]`` student pair values
        (``_pwr.pair_values``); inversion: a variant ``_pwr_common.sorted_supports`` accepts.
      query_mask: optional ``[M]`` 0/1: only the pairs whose higher-ranked score a has mask 1
        (a device's share inside shard_map); the sum is then partial, the count total.
    """
    t = jax.lax.stop_gradient(t)
    e_query, e_data, lower = teacher_layout(t, tie_tolerance)
    order = event_order(jax.lax.stop_gradient(x), None if y is x else jax.lax.stop_gradient(y))
    phi, psi, live = _channels(inversion, x, y)
    if query_mask is not None:
        psi = psi * query_mask.astype(psi.dtype)[None]
    total = _bilinear(live, e_query, e_data, order, phi, psi)
    if inversion.kind == "exp":
        spread = jax.lax.stop_gradient(jnp.max(x) - jnp.min(y))
        total = jnp.where(inversion.beta * spread <= common.EXP_FACTOR_LIMIT, total, jnp.nan)
    return total, common.sum_counts(lower, t.dtype)
