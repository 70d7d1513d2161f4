"""The --max-series cap: which units of a render are left out, and why.

``max_series`` caps the sample lines of the whole render, whatever the number of
partitions, and every family counts. Only exposition is capped, never counting: the
state stays exact and a series comes back when room is made. What does not fit is
left out whole, in a fixed order, and ``modelpulse_series_dropped{reason}`` says how
many lines (logged once per reason):

1. the shard's own health and the per-partition counters that are not zero are
   always kept (a few lines per partition);
2. model versions, oldest first (first-seen event time, then partition, then id):
   the first one that does not fit and every later one are left out
   (``model_version``), so the set shown stays put while new versions arrive;
3. resource instances in (service, instance) order, the same way
   (``resource_instance``);
4. counters still at zero, which exist only so that ``increase()`` reads 0
   (``zero_counter``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from aggregator.metrics.columns import _KEEP, _ZERO, _Pending
from aggregator.metrics.specs import DROP_REASONS

log = logging.getLogger("modelpulse.aggregator")
_logged_drops: set[str] = set()


def _fit(
    pending: Sequence[_Pending],
    max_series: int | None,
    n_units: int,
    n_model_versions: int,
    first_seen: Sequence[tuple[int, int, int]],
) -> tuple[np.ndarray | None, dict[str, int]]:
    """Which owners stay (indexed by owner - _ZERO; None: all) and lines dropped by reason."""
    if max_series is None:
        return None, {}
    owners = np.concatenate([p.owners for p in pending])
    lines = np.concatenate([p.lines for p in pending])
    always = int(lines[owners == _KEEP].sum())
    zeros = int(lines[owners == _ZERO].sum())
    units = owners >= 0
    cost = np.bincount(owners[units], weights=lines[units], minlength=n_units).astype(np.int64)
    budget = max_series - len(DROP_REASONS) - 1 - always  # the two families added last
    if zeros + int(cost.sum()) <= budget:
        return None, {}
    keep = np.ones(n_units - _ZERO, dtype=bool)
    dropped: dict[str, int] = {}
    model_versions = np.array(
        sorted(range(n_model_versions), key=first_seen.__getitem__), dtype=np.int64
    )
    resources = np.arange(n_model_versions, n_units, dtype=np.int64)
    for reason, order in (("model_version", model_versions), ("resource_instance", resources)):
        fits = np.cumsum(cost[order]) <= budget
        n_fit = int(np.argmin(fits)) if not fits.all() else len(order)
        budget -= int(cost[order[:n_fit]].sum())
        keep[order[n_fit:] - _ZERO] = False
        dropped[reason] = int(cost[order[n_fit:]].sum())
        if n_fit < len(order):
            _log_drop(reason, max_series, len(order) - n_fit, dropped[reason])
    if zeros > budget:
        keep[_ZERO - _ZERO] = False
        dropped["zero_counter"] = zeros
        _log_drop("zero_counter", max_series, zeros, zeros)
    return keep, dropped


def _log_drop(reason: str, max_series: int, units: int, lines: int) -> None:
    if reason in _logged_drops:
        return
    _logged_drops.add(reason)
    log.warning(
        "--max-series %d reached: %d %s units (%d sample lines) left out of /metrics "
        "(counting goes on; see modelpulse_series_dropped, raise --max-series or lower "
        "the caps); logged once",
        max_series,
        units,
        reason,
        lines,
    )
