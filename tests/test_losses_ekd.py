"""EKD (Huang et al. 2022) against a float64 NumPy loop over the paper's formulas, with TFace's
constants: thresholds at the FPR anchors, their running average, soft anchor counts, the positive
and hard-negative terms; the state update, the edge cases and the argument checks."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from _tolerance import assert_close

from kdface.losses import EkdState, ekd_batch_thresholds, ekd_init_state, ekd_loss
from kdface.losses import _ekd

INVERSE_FPR = (10, 100, 1_000, 10_000, 100_000, 1_000_000)
K = len(INVERSE_FPR)
D = 8


# ----------------------------------------------------------------------------- reference

def _unit(e):
    e = np.asarray(e, np.float64)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _count(x, anchors, temperature):
    """sum_k sigmoid((x - A_k) / T), the exponent clamped to [-50, 50] (TFace)."""
    return sum(1.0 / (1.0 + math.exp(min(max(-(x - a) / temperature, -50.0), 50.0)))
               for a in anchors)


def ref_thresholds(s, t, labels, inverse_fpr=INVERSE_FPR):
    """The negatives sorted descending, the one at rank L // a per anchor (None if L = 0)."""
    su, tu = _unit(s), _unit(t)
    n = len(labels)
    neg = [(i, j) for i in range(n) for j in range(i + 1, n) if labels[i] != labels[j]]
    if not neg:
        return None, None, 0
    s_sorted = sorted((float(su[i] @ su[j]) for i, j in neg), reverse=True)
    t_sorted = sorted((float(tu[i] @ tu[j]) for i, j in neg), reverse=True)
    big = len(neg)
    return (np.array([s_sorted[big // a] for a in inverse_fpr]),
            np.array([t_sorted[big // a] for a in inverse_fpr]), big)


def ref_ekd(s, t, labels, state, *, inverse_fpr=INVERSE_FPR, momentum=0.01, temperature=0.01,
            top=2000, w_pos=0.02, w_neg=0.01):
    """Huang et al. 2022's rank loss with TFace's constants, one pair at a time."""
    su, tu = _unit(s), _unit(t)
    n = len(labels)
    old_s, old_t = (np.asarray(a, np.float64) for a in state)
    thr_s, thr_t, big = ref_thresholds(s, t, labels, inverse_fpr)
    if big:
        new_s = momentum * thr_s + (1 - momentum) * old_s
        new_t = momentum * thr_t + (1 - momentum) * old_t
    else:
        new_s, new_t = old_s, old_t
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]

    def sq_diff(i, j):
        d = (_count(su[i] @ su[j], new_s, temperature)
             - _count(tu[i] @ tu[j], new_t, temperature))
        return d * d

    pos = [p for p in pairs if labels[p[0]] == labels[p[1]]]
    neg = [p for p in pairs if labels[p[0]] != labels[p[1]]]
    hard = sorted(neg, key=lambda p: -float(su[p[0]] @ su[p[1]]))[:top]
    pos_term = np.mean([sq_diff(*p) for p in pos]) if pos else 0.0
    neg_term = np.mean([sq_diff(*p) for p in hard]) if hard else 0.0
    return w_pos * pos_term + w_neg * neg_term, (new_s, new_t)


def _terms_scale(n, w_pos=0.02, w_neg=0.01, temperature=0.01):
    """The float32 bound of one EKD evaluation (tests/_tolerance.py). A cosine is a D-term
    product of rows normalized by a D-term sum (2D terms, scale 1); the thresholds are cosines
    too. A soft count has slope <= K / (4T) in the cosine and in each anchor, so it carries
    those errors times 2K / (4T); squaring a count difference (|diff| <= K) doubles them times
    K; the term's mean adds its P = N(N-1)/2 terms of size <= K^2."""
    amplified = 2.0 * K * 2.0 * K / (4.0 * temperature)
    return 2 * D + n * (n - 1) // 2 + 4, max(w_pos, w_neg) * (amplified + K * K)


def _data(seed, n, labels=None, groups=4):
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(n, D)).astype(np.float32)
    s = (0.8 * t + 0.6 * rng.normal(size=(n, D))).astype(np.float32)
    if labels is None:
        labels = np.repeat(np.arange(n // groups + 1), groups)[:n]
        labels = rng.permutation(labels)
    return s, t, np.asarray(labels, np.int32)


def _state(seed, low=-0.2, high=0.6, k=K):
    rng = np.random.default_rng(seed)
    return EkdState(*(jnp.asarray(np.sort(rng.uniform(low, high, k))[::-1].copy(), jnp.float32)
                      for _ in range(2)))


@functools.lru_cache(maxsize=None)
def _jitted(**options):
    return jax.jit(functools.partial(ekd_loss, **options))


def _check(s, t, labels, state, what="", **options):
    loss, new = _jitted(**options)(s, t, labels, state)
    want, (want_s, want_t) = ref_ekd(s, t, labels, state, **{
        {"top_negatives": "top"}.get(k, k): v for k, v in options.items()})
    terms, scale = _terms_scale(len(labels))
    assert_close(loss, want, terms=terms, scale=scale, what=f"{what}loss: ")
    # thresholds: cosines (2D terms, scale 1) blended by the running average (2 roundings)
    assert_close(new.student, want_s, terms=2 * D + 2, scale=1.0, what=f"{what}state.student: ")
    assert_close(new.teacher, want_t, terms=2 * D + 2, scale=1.0, what=f"{what}state.teacher: ")
    return loss, new


# ----------------------------------------------------------------------------- values

@pytest.mark.parametrize("seed,n,groups", [(0, 24, 4), (1, 40, 2), (2, 33, 3), (3, 16, 1)])
def test_matches_reference(seed, n, groups):
    s, t, labels = _data(seed, n, groups=groups)
    _check(s, t, labels, ekd_init_state(), what="zero state: ")
    _check(s, t, labels, _state(seed), what="running state: ")


def test_matches_reference_with_options():
    s, t, labels = _data(4, 30)
    _check(s, t, labels, _state(4, k=3), momentum=1.0, temperature=0.05, top_negatives=50,
           inverse_fpr=(2, 5, 10))
    # three anchors: the state has three entries
    with pytest.raises(ValueError, match=r"\[K\]=\[3\]"):
        ekd_loss(s, t, labels, _state(4), inverse_fpr=(2, 5, 10))


def test_more_negatives_than_the_top_2000():
    # N = 72 in pairs of two: P = 2556 pairs, L = 2520 negatives, so the cut at 2000 is used
    s, t, labels = _data(5, 72, groups=2)
    assert ref_thresholds(s, t, labels)[2] > 2000
    _check(s, t, labels, _state(5))


def test_state_is_a_running_average_over_steps():
    state = ekd_init_state()
    want = tuple(np.zeros(K) for _ in range(2))
    for step in range(3):
        s, t, labels = _data(10 + step, 24)
        loss, state = _jitted()(s, t, labels, state)
        want_loss, want = ref_ekd(s, t, labels, want)
        terms, scale = _terms_scale(24)
        assert_close(loss, want_loss, terms=terms, scale=scale, what=f"step {step}: ")
        # the state accumulates each step's 2D-term cosines and two roundings
        assert_close(state.student, want[0], terms=(step + 1) * (2 * D + 2), scale=1.0)
        assert_close(state.teacher, want[1], terms=(step + 1) * (2 * D + 2), scale=1.0)
    # one step, spelled out: new = 0.01 batch + 0.99 old with the batch's own thresholds
    s, t, labels = _data(20, 24)
    old = _state(20)
    batch_s, batch_t, count = ekd_batch_thresholds(s, t, labels)
    new = _jitted()(s, t, labels, old)[1]
    assert int(count) == ref_thresholds(s, t, labels)[2]
    # the blend's product and sum: 2 terms of scale max(|batch|, |old|) <= 1
    assert_close(new.student, 0.01 * np.asarray(batch_s) + 0.99 * np.asarray(old.student),
                 terms=2, scale=1.0)
    assert_close(new.teacher, 0.01 * np.asarray(batch_t) + 0.99 * np.asarray(old.teacher),
                 terms=2, scale=1.0)
    # the zero initial state of TFace: the first step gives 0.01 x the batch thresholds
    first = _jitted()(s, t, labels, ekd_init_state())[1]
    assert_close(first.student, 0.01 * np.asarray(batch_s), terms=2, scale=1.0)


def test_batch_thresholds_match_reference():
    s, t, labels = _data(6, 50, groups=5)
    got_s, got_t, count = jax.jit(ekd_batch_thresholds)(s, t, labels)
    want_s, want_t, big = ref_thresholds(s, t, labels)
    assert int(count) == big
    assert_close(got_s, want_s, terms=2 * D, scale=1.0)
    assert_close(got_t, want_t, terms=2 * D, scale=1.0)


# ----------------------------------------------------------------------------- edge cases

def test_no_positive_pair():
    s, t, _ = _data(7, 20)
    labels = np.arange(20, dtype=np.int32)               # every pair negative
    loss, _ = _check(s, t, labels, _state(7))
    assert np.isfinite(float(loss))
    # the positive term is 0: the loss is the negative term alone
    with_pos_weight_zero = _jitted(positive_weight=0.0)(s, t, labels, _state(7))[0]
    assert float(loss) == float(with_pos_weight_zero)


def test_no_negative_pair_leaves_the_state():
    s, t, _ = _data(8, 12)
    labels = np.zeros(12, np.int32)                      # every pair positive
    old = _state(8)
    loss, new = _check(s, t, labels, old)
    np.testing.assert_array_equal(new.student, old.student)
    np.testing.assert_array_equal(new.teacher, old.teacher)
    assert float(loss) == float(_jitted(negative_weight=0.0)(s, t, labels, old)[0])
    thr_s, thr_t, count = ekd_batch_thresholds(s, t, labels)
    assert int(count) == 0
    np.testing.assert_array_equal(thr_s, np.zeros(K))


def test_fewer_negatives_than_an_anchor_needs_take_the_hardest():
    # N = 6 in three pairs: L = 12 negatives; anchors 100 .. 10**6 have L // a = 0
    s, t, labels = _data(9, 6, labels=[0, 0, 1, 1, 2, 2])
    thr_s, thr_t, count = jax.jit(ekd_batch_thresholds)(s, t, labels)
    assert int(count) == 12
    su, tu = _unit(s), _unit(t)
    neg = [(i, j) for i in range(6) for j in range(i + 1, 6) if labels[i] != labels[j]]
    s_neg = sorted((su[i] @ su[j] for i, j in neg), reverse=True)
    t_neg = sorted((tu[i] @ tu[j] for i, j in neg), reverse=True)
    want_s = np.array([s_neg[1]] + [s_neg[0]] * (K - 1))      # 12 // 10 = 1, then rank 0
    want_t = np.array([t_neg[1]] + [t_neg[0]] * (K - 1))
    assert_close(thr_s, want_s, terms=2 * D, scale=1.0)
    assert_close(thr_t, want_t, terms=2 * D, scale=1.0)
    _check(s, t, labels, _state(9))                          # and L < 2000: all negatives used


def test_two_samples():
    s, t, _ = _data(11, 2)
    _check(s, t, np.array([0, 1], np.int32), _state(11))     # one negative pair
    _check(s, t, np.array([3, 3], np.int32), _state(11))     # one positive pair


# ----------------------------------------------------------------------------- gradients, jit

def test_gradient_matches_finite_differences():
    # momentum 0 keeps the thresholds at the state's values, so the loss is a smooth function
    # of the student (the batch thresholds carry no gradient by definition, and finite
    # differences would see them move); temperature 0.1 keeps the sigmoids resolvable.
    s, t, labels = _data(12, 14, groups=2)
    with jax.enable_x64(True):
        state = EkdState(*(jnp.asarray(a, jnp.float64) for a in _state(12, -0.3, 0.3)))
        tt = jnp.asarray(t, jnp.float64)
        fn = jax.jit(lambda x: ekd_loss(x, tt, jnp.asarray(labels), state, momentum=0.0,
                                        temperature=0.1, top_negatives=20)[0])
        check_grads(fn, (jnp.asarray(s, jnp.float64),), order=1, modes=["rev"], eps=1e-6)


def test_no_gradient_to_teacher_or_state():
    s, t, labels = _data(13, 16)
    state = _state(13)
    g_t, g_state = jax.grad(lambda t, st: ekd_loss(s, t, labels, st)[0], argnums=(0, 1))(
        jnp.asarray(t), state)
    np.testing.assert_array_equal(g_t, np.zeros_like(t))
    np.testing.assert_array_equal(g_state.student, np.zeros(K))
    g_s = jax.grad(lambda s: ekd_loss(s, t, labels, state)[0])(jnp.asarray(s))
    assert np.all(np.isfinite(g_s)) and np.any(g_s != 0)


def test_jit_equals_eager_and_bf16():
    s, t, labels = _data(14, 20)
    state = _state(14)
    eager, eager_state = ekd_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(labels), state)
    jitted, jitted_state = _jitted()(s, t, labels, state)
    terms, scale = _terms_scale(20)
    # float32 vs float32 in another order: both err, 2 x the terms
    assert_close(jitted, eager, terms=2 * terms, scale=scale)
    assert_close(jitted_state.student, eager_state.student, terms=2 * (2 * D + 2), scale=1.0)
    low = _jitted()(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16), labels, state)
    assert low[0].dtype == jnp.float32 and np.isfinite(float(low[0]))
    assert low[1].student.dtype == jnp.float32


def test_pair_positions_at_large_n():
    # the ends of rows (where a float root is most fragile) for N up to the int32 limit,
    # against exact int64 arithmetic
    for n in (5_000, 20_000, _ekd.MAX_ROWS):
        rows = np.array([0, 1, n // 3, n // 2, n - 100, n - 3, n - 2], np.int64)
        start = rows * (2 * n - rows - 1) // 2
        length = n - 1 - rows
        p = np.concatenate([start, start + np.minimum(1, length - 1), start + length - 1,
                            start + length // 2])
        want_i = np.concatenate([rows] * 4)
        want_j = p - np.concatenate([start] * 4) + want_i + 1
        i, j = jax.jit(_ekd._pair_position, static_argnums=1)(jnp.asarray(p, jnp.int32), n)
        np.testing.assert_array_equal(i, want_i)
        np.testing.assert_array_equal(j, want_j)


def test_upper_pairs_are_numpys_triu_indices():
    for n in (2, 3, 5, 64, 1000, 4097):
        rows, cols = jax.jit(_ekd._upper_pairs, static_argnums=0)(n)
        want_rows, want_cols = np.triu_indices(n, 1)
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_array_equal(cols, want_cols)


# ----------------------------------------------------------------------------- checks

def test_argument_checks():
    s, t, labels = _data(15, 8)
    state = ekd_init_state()
    with pytest.raises(ValueError, match="rank 2"):
        ekd_loss(s[0], t, labels, state)
    with pytest.raises(ValueError, match="same number of rows"):
        ekd_loss(s, t[:7], labels, state)
    with pytest.raises(ValueError, match="at least N=2"):
        ekd_loss(s[:1], t[:1], labels[:1], state)
    with pytest.raises(TypeError, match="integer"):
        ekd_loss(s, t, labels.astype(np.float32), state)
    with pytest.raises(TypeError, match="floating"):
        ekd_loss(s.astype(np.int32), t, labels, state)
    with pytest.raises(ValueError, match=r"\[K\]=\[6\]"):
        ekd_loss(s, t, labels, ekd_init_state(3))
    with pytest.raises(TypeError, match="EkdState"):
        ekd_loss(s, t, labels, jnp.zeros(6))
    with pytest.raises(ValueError, match="inverse_fpr"):
        ekd_loss(s, t, labels, state, inverse_fpr=(0.1, 0.01))
    with pytest.raises(ValueError, match="momentum"):
        ekd_loss(s, t, labels, state, momentum=1.5)
    with pytest.raises(ValueError, match="temperature"):
        ekd_loss(s, t, labels, state, temperature=0.0)
    with pytest.raises(ValueError, match="top_negatives"):
        ekd_loss(s, t, labels, state, top_negatives=0)
    with pytest.raises(ValueError, match="num_anchors"):
        ekd_init_state(0)


# ----------------------------------------------------------------------------- deep ranks

def test_batch_thresholds_at_deep_ranks():
    # N = 600: P = 179,700 pairs, so FPR 1e-1 (rank ~17,000) and 1e-2 are past the direct
    # top_k and come from the sampled bracket (_select_rank)
    s, t, labels = _data(16, 600)
    assert 179_700 // 10 >= _ekd.DIRECT_RANKS
    got_s, got_t, count = jax.jit(ekd_batch_thresholds)(s, t, labels)
    rows, cols = np.triu_indices(600, 1)
    neg = labels[rows] != labels[cols]
    big = int(neg.sum())
    assert int(count) == big
    for got, e in ((got_s, s), (got_t, t)):
        u = _unit(e)
        sims = np.sort(np.sum(u[rows[neg]] * u[cols[neg]], axis=1))[::-1]
        want = np.array([sims[big // a] for a in INVERSE_FPR])
        assert_close(got, want, terms=2 * D, scale=1.0)


@pytest.mark.parametrize("case", ["random", "ties", "few"])
def test_select_rank_is_exact(case):
    rng = np.random.default_rng(17)
    pairs = 200_000
    keys = rng.normal(size=pairs).astype(np.float32)
    if case == "ties":          # one value everywhere: the bracket overflows, the full top_k
        keys[:] = 0.5           # answers
    keys[rng.random(pairs) < (0.99 if case == "few" else 0.2)] = -np.inf
    count = int(np.isfinite(keys).sum())
    max_rank = pairs // 10
    want = np.sort(keys[np.isfinite(keys)])[::-1]
    select = jax.jit(_ekd._select_rank, static_argnums=3)
    for rank in (0, count // 10, count // 100, count // 3 if case == "few" else count // 11):
        got = select(jnp.asarray(keys), jnp.int32(count), jnp.int32(rank), max_rank)
        assert float(got) == float(want[rank]), (case, rank)     # a selection: exact


def test_soft_count_derivatives_match_autodiff():
    # the custom_jvp's slope (in the similarity and in the anchors) against autodiff of the
    # plain clamped-sigmoid sum, in float64, including both clamp regions
    def plain(x, a):
        total = 0.0
        for k in range(a.shape[0]):
            z = jnp.clip(-(x - a[k]) / 0.01, -50.0, 50.0)
            total = total + 1.0 / (1.0 + jnp.exp(z))
        return total

    with jax.enable_x64(True):
        x = jnp.linspace(-1.0, 1.0, 401)
        a = jnp.asarray([0.1, 0.2, 0.3])
        ours = jax.jit(lambda x, a: jnp.sum(_ekd._soft_count(x, a, 0.01)))
        theirs = jax.jit(lambda x, a: jnp.sum(plain(x, a)))
        g = jax.grad(ours, argnums=(0, 1))(x, a)
        h = jax.grad(theirs, argnums=(0, 1))(x, a)
        # float64 vs float64 of another formula: the K = 3 sigmoids' slopes (<= 1 / (4T) = 25
        # each), the anchor gradient sums 401 of them
        assert_close(g[0], h[0], terms=3 * 4, scale=3 * 25.0, dtype=np.float64)
        assert_close(g[1], h[1], terms=401 * 4, scale=401 * 25.0, dtype=np.float64)
        assert_close(ours(x, a), theirs(x, a), terms=401 * 3, scale=401 * 3, dtype=np.float64)
