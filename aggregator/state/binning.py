"""Where a value falls: histogram buckets, drift bins, calibration bins (pure numpy)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np

from aggregator.state.config import CALIBRATION_BINS, DRIFT_BINS

__all__ = [
    "CAL_BUCKETS",
    "DRIFT_CENTERS",
    "Buckets",
    "dense",
    "drift_bin",
    "score_bin_centers",
]

_DRIFT_RANGE: Final = 8.0  # asinh space: |x| up to ~1490 gets its own bins
_DRIFT_WIDTH: Final = 2 * _DRIFT_RANGE / DRIFT_BINS  # 0.25 in asinh space
# Centre of each drift bin in asinh space (the two end bins also hold everything beyond).
DRIFT_CENTERS: Final = -_DRIFT_RANGE + (np.arange(DRIFT_BINS) + 0.5) * _DRIFT_WIDTH
# Reliability bins of the score: (0.1 (k - 1), 0.1 k], the first one from 0 inclusive.
_CAL_EDGES: Final = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)[1:-1]


def score_bin_centers(bounds: Sequence[float]) -> np.ndarray:
    """Centre of each bucket of the score histogram (``len(bounds) + 1`` values).

    Scores lie in [0, 1], so the buckets are cut to it: the first starts at 0 and the
    last (``+Inf``) ends at 1; a bucket wholly outside [0, 1] has width 0.

    >>> score_bin_centers([0.5, 1.0]).tolist()
    [0.25, 0.75, 1.0]
    """
    edges = np.clip(np.concatenate([[0.0], np.asarray(bounds, dtype=np.float64), [1.0]]), 0, 1)
    edges = np.maximum.accumulate(edges)
    centers: np.ndarray = (edges[:-1] + edges[1:]) / 2
    return centers


def dense(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct keys, index of each key in them): np.unique's answer in O(n)
    when the keys span a small range (a batch touches a few panes), else np.unique."""
    lo, hi = int(keys.min()), int(keys.max())
    if hi - lo > 1 << 16:
        uniq, inverse = np.unique(keys, return_inverse=True)
        return uniq, inverse
    offset = keys - lo
    if hi - lo <= 1:  # the min and the max are both present: nothing in between
        return np.arange(lo, hi + 1, dtype=keys.dtype), offset
    present = np.bincount(offset, minlength=hi - lo + 1) > 0
    position = np.cumsum(present) - 1
    return np.flatnonzero(present) + lo, position[offset]


class Buckets:
    """``np.searchsorted(edges, x, "left")`` for histogram bounds, by table lookup.

    When every edge is > 0, the top bits of a float64 (exponent and leading mantissa
    bits) order non-negative values as the floats do, so they name a cell of a small
    table holding, per cell, the count of edges below it; negative values clip to the
    first cell, values past the last edge to the last one. With few enough bits that
    no cell holds two edges, one comparison with the next edge finishes the count
    exactly. A binary search costs a branch miss per step on random values; this is
    one gather and one compare. Other edges (zero, negative, too dense for a table)
    keep ``np.searchsorted``. NaN gets an in-range bin, not necessarily the last:
    callers pass no NaN or mask those rows out.
    """

    MAX_TABLE: Final = 1 << 16

    def __init__(self, edges: np.ndarray) -> None:
        self.edges = edges = np.asarray(edges, dtype=np.float64)
        self.table: np.ndarray | None = None
        if not edges.size or edges[0] <= 0:
            return
        bits = edges.view(np.int64)
        for shift in range(52, 0, -1):
            keys = bits >> shift
            if (int(keys[-1]) + 2) > self.MAX_TABLE:
                return
            if np.all(np.diff(keys) > 0):
                break
        self.shift = shift
        self.last = int(keys[-1]) + 1  # its cell starts past the last edge
        lows = (np.arange(self.last + 1, dtype=np.int64) << shift).view(np.float64)
        self.table = np.searchsorted(edges, lows, "left")
        self.next_edge = np.concatenate([edges, [np.inf]])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.table is None:
            found: np.ndarray = np.searchsorted(self.edges, x, "left")
            return found
        x = np.ascontiguousarray(x, dtype=np.float64)
        cell = x.view(np.int64) >> self.shift
        np.clip(cell, 0, self.last, out=cell)
        r: np.ndarray = self.table[cell]
        r += x > self.next_edge[r]
        return r


CAL_BUCKETS: Final = Buckets(_CAL_EDGES)


def drift_bin(values: np.ndarray) -> np.ndarray:
    x = np.arcsinh(values)  # then in place: a temporary fewer per step
    x += _DRIFT_RANGE
    x *= DRIFT_BINS / (2 * _DRIFT_RANGE)
    np.clip(x, 0, DRIFT_BINS - 1, out=x)
    bins: np.ndarray = x.astype(np.int64)
    return bins
