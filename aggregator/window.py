"""Event-time pane arithmetic and the per-partition watermark (pure numpy).

Panes are tumbling, aligned to epoch multiples of ``pane_ms``: pane k covers
``[k * pane_ms, (k + 1) * pane_ms)``. The watermark is the largest event time seen
minus the allowed lateness; pane k is closed once ``watermark >= (k + 1) * pane_ms``,
i.e. k < ``closed_panes(watermark)``. A row is late when its pane was already closed
by the rows before it, so lateness depends on the order of the log only and replays
identically whatever the batch boundaries.
"""

from __future__ import annotations

from typing import Final

import numpy as np

__all__ = [
    "NO_TIME",
    "closed_panes",
    "late_mask",
    "pane_index",
    "window_start",
]

NO_TIME: Final = np.iinfo(np.int64).min // 4  # "nothing seen yet"; far from overflow


def pane_index(ts_ms: np.ndarray | int, pane_ms: int) -> np.ndarray | int:
    """Index of the pane holding each event time (floor division, so negatives work).

    >>> int(pane_index(25_000, 10_000))
    2
    """
    return np.floor_divide(ts_ms, pane_ms)


def window_start(ts_ms: int, size_ms: int) -> int:
    """Start of the aligned window of ``size_ms`` holding ``ts_ms``."""
    return (ts_ms // size_ms) * size_ms


def closed_panes(max_event_ms: int, lateness_ms: int, pane_ms: int) -> int:
    """Number E such that every pane k < E is closed (E * pane_ms is the window end)."""
    if max_event_ms <= NO_TIME:
        return NO_TIME // pane_ms
    return (max_event_ms - lateness_ms) // pane_ms


def late_mask(
    ts_ms: np.ndarray, prior_max_ms: int, lateness_ms: int, pane_ms: int
) -> tuple[np.ndarray, int]:
    """Which rows fall in a pane already closed by the rows before them.

    Returns (late mask, new max event time). ``ts_ms`` must be in log order.
    """
    if ts_ms.size == 0:
        return np.zeros(0, dtype=bool), prior_max_ms
    before = np.empty_like(ts_ms)
    before[0] = prior_max_ms
    np.maximum.accumulate(ts_ms[:-1], out=before[1:])
    np.maximum(before[1:], prior_max_ms, out=before[1:])
    # A late row's pane ends at or before ``before - lateness``, so only rows earlier
    # than that can be late: divide (costly) just for those, usually none.
    late = ts_ms < before - lateness_ms
    at = np.flatnonzero(late)
    if at.size:
        b = before[at]
        closed = np.floor_divide(b - lateness_ms, pane_ms)
        late[at] = (b > NO_TIME) & (np.floor_divide(ts_ms[at], pane_ms) < closed)
    return late, max(prior_max_ms, int(ts_ms.max()))
