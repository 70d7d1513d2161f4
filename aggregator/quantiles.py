"""Prometheus ``histogram_quantile`` over numpy bucket counts (pure numpy, no I/O).

Vectorised over any leading "series" axes; follows Prometheus' ``bucketQuantile``
operation for operation. Re-exported by ``aggregator.quality``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["histogram_quantiles"]

_F8 = NDArray[np.float64]


def histogram_quantiles(buckets: ArrayLike, upper_bounds: ArrayLike, quantiles: ArrayLike) -> _F8:
    """Prometheus ``histogram_quantile`` of each series, shape ``[..., len(quantiles)]``.

    ``buckets[..., B + 1]`` are non-negative, non-cumulative counts: bucket ``i``
    holds values in ``(upper_bounds[i - 1], upper_bounds[i]]`` and the last
    bucket is ``+Inf``. Follows ``bucketQuantile`` of Prometheus'
    ``promql/quantile.go`` operation for operation: linear interpolation inside
    the bucket holding rank ``q * count``; lower bound 0 for the first bucket if
    its upper bound is positive, else that upper bound is returned; the highest
    finite bound if the rank falls in the ``+Inf`` bucket; NaN for an empty
    histogram, for ``B == 0`` and for a NaN quantile; ``-Inf`` for ``q < 0`` and
    ``+Inf`` for ``q > 1``. Like Prometheus, ``q == 0`` with an empty first
    bucket (of positive bound) is NaN (0/0).

    >>> histogram_quantiles([1, 2, 1, 0], [1.0, 2.0, 4.0], [0.5, 0.9]).tolist()
    [1.5, 3.2]
    """
    bounds = np.asarray(upper_bounds, dtype=np.float64)
    if bounds.ndim != 1 or not np.all(np.isfinite(bounds)) or np.any(np.diff(bounds) <= 0):
        raise ValueError("upper_bounds must be a 1-D array of finite, strictly increasing values")
    qs = np.asarray(quantiles, dtype=np.float64)
    if qs.ndim != 1:
        raise ValueError(f"quantiles must be 1-D, got shape {qs.shape}")
    counts = np.asarray(buckets)
    n_finite = bounds.shape[0]
    if counts.ndim < 1 or counts.shape[-1] != n_finite + 1:
        raise ValueError(
            f"buckets must have shape [..., {n_finite + 1}] (one per upper bound plus +Inf),"
            f" got {counts.shape}"
        )

    cumulative = np.cumsum(counts, axis=-1).astype(np.float64)
    series_shape = cumulative.shape[:-1]
    observations = cumulative[..., -1]
    finite_cumulative = cumulative[..., :-1]
    out = np.empty((*series_shape, qs.shape[0]), dtype=np.float64)

    for j, q in enumerate(qs.tolist()):
        # Go's order of checks: the quantile first, then the buckets.
        if math.isnan(q):
            out[..., j] = np.nan
            continue
        if q < 0 or q > 1:
            out[..., j] = math.copysign(math.inf, q)
            continue
        if n_finite == 0:
            out[..., j] = np.nan
            continue
        rank = q * observations
        # Index of the first finite bucket whose cumulative count reaches the
        # rank (Go's sort.Search); n_finite means the +Inf bucket.
        b = np.count_nonzero(finite_cumulative < rank[..., None], axis=-1)
        in_finite = b < n_finite
        bi = np.minimum(b, n_finite - 1)
        has_prev = bi > 0
        prev_i = np.maximum(bi - 1, 0)
        bucket_end = bounds[bi]
        bucket_start = np.where(has_prev, bounds[prev_i], 0.0)
        cum_b = np.take_along_axis(finite_cumulative, bi[..., None], axis=-1)[..., 0]
        cum_prev = np.where(
            has_prev,
            np.take_along_axis(finite_cumulative, prev_i[..., None], axis=-1)[..., 0],
            0.0,
        )
        # Same operation order as Go, so results match it bit for bit; its 0/0
        # (q == 0, empty first bucket) is NaN here too.
        with np.errstate(invalid="ignore", divide="ignore"):
            value = bucket_start + (bucket_end - bucket_start) * (
                (rank - cum_prev) / (cum_b - cum_prev)
            )
        value = np.where((bi == 0) & (bounds[0] <= 0), bounds[0], value)
        value = np.where(in_finite, value, bounds[-1])
        out[..., j] = np.where(observations == 0, np.nan, value)
    return out
