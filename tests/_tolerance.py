"""The one tolerance rule of the test suite: float error bounds derived from the computation.

A float32 result that comes out of a reduction of ``n`` terms carries a rounding error of at most
about ``n * eps`` times the magnitude of the terms (Higham, *Accuracy and Stability of Numerical
Algorithms*, 2002, §4.2: ``|fl(sum) - sum| <= (n - 1) eps sum|x_i|``). Two float32 computations of
the same quantity in another order (tiled vs dense, sharded vs replicated, another CPU's FMA or
vector width, another thread count) therefore differ by up to twice that bound, *per element
measured against the magnitude of the terms*, not against the element itself: an entry that
cancels to almost zero keeps the absolute error of its large terms. Hence::

    |actual - desired| <= eps(dtype) * growth(n) * scale     (elementwise, every element)

- ``n``: the length of the longest reduction that produced an element (the number of terms summed,
  the inner dimension of a product, the pairs of a relational loss ...).
- ``growth``: ``"linear"`` (the worst case, ``n``) by default; ``"sqrt"`` (``sqrt(n)``) only where
  the terms' rounding errors are independent and of both signs, so they add like a random walk
  (Higham §4.2 again); say so at the call site.
- ``scale``: the magnitude of the reduced terms; by default ``max|desired|``. Pass the norm or the
  sum of the absolute terms where that is known and larger (cancellation). It may be an array
  broadcastable to the result (a per-element magnitude, e.g. ``sum|x_i|`` of each element's terms
  computed in float64), which bounds each element by its own terms rather than the largest.

Where a float64 reference exists (a NumPy loop over the paper's formula), compare the float32 result
with it: the float32 error alone then has to fit the bound. Exactness stays exact (permutations,
sorts, integer counts, byte-exact files): use ``np.testing.assert_array_equal`` there, never this.
"""
from __future__ import annotations

import numpy as np

__all__ = ["EPS32", "bound", "assert_close"]

EPS32 = float(np.finfo(np.float32).eps)


def bound(*, terms: int, scale, growth: str = "linear", dtype=np.float32):
    """The rule's absolute tolerance: ``eps(dtype) * growth(terms) * scale`` (an array if scale is)."""
    if terms < 1:
        raise ValueError(f"terms must be >= 1, got {terms}")
    if growth not in ("linear", "sqrt"):
        raise ValueError(f"growth must be 'linear' or 'sqrt', got {growth!r}")
    n = float(terms) if growth == "linear" else float(np.sqrt(terms))
    tol = float(np.finfo(dtype).eps) * max(n, 1.0) * np.asarray(scale, np.float64)
    return float(tol) if tol.ndim == 0 else tol


def assert_close(actual, desired, *, terms: int, scale=None,
                 growth: str = "linear", dtype=np.float32, what: str = "") -> None:
    """Assert ``|actual - desired| <= bound(terms, scale)`` everywhere (shapes must match).

    ``scale`` defaults to ``max|desired|`` (at least the smallest normal of ``dtype``, so an all-zero
    reference demands an all-tiny result). The failure message names the worst element, its error,
    the bound and how it was derived.
    """
    a = np.asarray(actual, np.float64)
    d = np.asarray(desired, np.float64)
    if a.shape != d.shape:
        raise AssertionError(f"{what}shape {a.shape} != reference shape {d.shape}")
    if not np.array_equal(np.isnan(a), np.isnan(d)):
        raise AssertionError(f"{what}NaN pattern differs from the reference")
    finite = ~np.isnan(d)
    if scale is None:
        scale = float(np.max(np.abs(d[finite]), initial=0.0))
    scale = np.broadcast_to(np.maximum(np.asarray(scale, np.float64), np.finfo(dtype).tiny),
                            d.shape)
    tol = np.asarray(bound(terms=terms, scale=scale, growth=growth, dtype=dtype))
    err = np.where(finite, np.abs(a - d), 0.0)
    over = err - tol
    worst = int(np.argmax(over)) if err.size else 0
    if err.size and not over.flat[worst] <= 0:
        where = tuple(int(i) for i in np.unravel_index(worst, err.shape)) if err.ndim else ()
        raise AssertionError(
            f"{what}|error| {err.flat[worst]:.3g} at {where} (got {a.flat[worst]:.9g}, want "
            f"{d.flat[worst]:.9g}) > bound {tol.flat[worst]:.3g} = eps {np.finfo(dtype).eps:.3g} x "
            f"{growth} growth of {terms} terms x scale {scale.flat[worst]:.3g}; "
            f"{int((over > 0).sum())} of {err.size} elements outside")
