"""State views -> Prometheus metric families (names, labels, values).

Cumulative series (counters, histograms) are additive, so ``sum by (model, version)``
combines partitions and shards. Windowed gauges are exact because a model's events
all land in one partition. Every per-model series carries a ``partition`` label so
that two partitions folding into the same ``__overflow__`` model never collide.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Final

import numpy as np

from aggregator.catalog import MACRO
from aggregator.decode import SchemaResolver
from aggregator.exposition import Family
from aggregator.quality import (
    calibration_errors,
    classification_metrics,
    estimated_accuracy,
    histogram_quantiles,
    jensen_shannon_distance,
    kolmogorov_smirnov_statistic,
    population_stability_index,
    regression_metrics,
    wasserstein_distance,
)
from aggregator.references import ReferenceUse, TrainingReference, resolve_references
from aggregator.state import (
    CALIBRATION_BINS,
    DRIFT_CENTERS,
    REJECT_REASONS,
    SEGMENT_ROLES,
    StateConfig,
    StateView,
    WindowAggregate,
    score_bin_centers,
)
from schemas.wire import OUTCOMES

__all__ = [
    "DEAD_LETTER_REASONS",
    "DROP_REASONS",
    "FOLD_KINDS",
    "ShardHealth",
    "build_families",
    "format_duration",
]

log = logging.getLogger("modelpulse.aggregator")

QUANTILES: Final = (0.5, 0.9, 0.99)
# Label of a reliability bin: its upper bound ("0.1" .. "1"), as a histogram's ``le``.
CALIBRATION_BIN_LABELS: Final = tuple(
    format((k + 1) / CALIBRATION_BINS, "g") for k in range(CALIBRATION_BINS)
)
_VALID = OUTCOMES[:4]
_MV = ("model", "version", "partition")
# Known up front, so each counter starts at 0 and ``increase()`` reads 0, not "no data".
# A reason or kind seen in state but missing here is exported all the same.
DEAD_LETTER_REASONS: Final = tuple(
    dict.fromkeys(
        (
            *REJECT_REASONS,
            "truncated",
            "bad_magic",
            "undecodable",
            "bad_column",
            *SchemaResolver.REASONS,
            # The consumer loop's own (shard.py, which imports this module).
            "unexpected_schema",
            "untrusted_marker",
            "undecompressable",
            "unreadable",
        )
    )
)
FOLD_KINDS: Final = ("model", "version", "model_version", "class", "feature", "segment")
DROP_REASONS: Final = ("model_version", "resource_instance", "zero_counter")
# Owners of series that are not a droppable unit (units are numbered from 0).
_KEEP: Final = -1
_ZERO: Final = -2
_logged_drops: set[str] = set()


def format_duration(ms: int) -> str:
    """Prometheus-style label for a duration: 60000 -> "1m", 3600000 -> "1h".

    >>> format_duration(90_000)
    '90s'
    """
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


@dataclass(slots=True)
class ShardHealth:
    """Process-level facts the consumer loop measures (not part of partition state)."""

    lag: dict[int, int] = field(default_factory=dict)
    snapshot_age_seconds: dict[int, float] = field(default_factory=dict)
    batch_seconds_sum: float = 0.0
    batches: int = 0
    messages: int = 0
    dead_letter_messages: int = 0
    dead_letter_failures: int = 0
    dead_letters_truncated: int = 0
    stuck_partitions: dict[int, int] = field(default_factory=dict)
    up_since: float = 0.0


@dataclass(slots=True)
class _Rows:
    """One family's series before the cap: labels, numbers and the unit owning each."""

    labels: list[tuple[str, ...]] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)  # histograms: bucket rows
    sums: list[np.ndarray] = field(default_factory=list)  # histograms only
    owners: list[np.ndarray] = field(default_factory=list)

    def add(
        self,
        labels: Sequence[tuple[str, ...]],
        values: np.ndarray,
        owner: int | np.ndarray,
        sums: np.ndarray | None = None,
    ) -> None:
        n = len(labels)
        if not n:
            return
        self.labels.extend(labels)
        self.values.append(values)
        self.owners.append(np.broadcast_to(np.asarray(owner, dtype=np.int64), (n,)))
        if sums is not None:
            self.sums.append(sums)


class _Columns:
    """Label tuples and value arrays per family, appended in bulk (no per-series calls)."""

    def __init__(self) -> None:
        self.rows: dict[str, _Rows] = {}

    def extend(
        self,
        family: str,
        labels: Sequence[tuple[str, ...]],
        values: Any,
        owner: int | np.ndarray = _KEEP,
    ) -> None:
        if labels:
            values = np.broadcast_to(np.asarray(values, dtype=np.float64), (len(labels),))
            self.rows.setdefault(family, _Rows()).add(labels, values, owner)

    def one(self, family: str, labels: tuple[str, ...], value: float, owner: int = _KEEP) -> None:
        self.extend(family, [labels], [value], owner)

    def histogram(
        self,
        family: str,
        labels: Sequence[tuple[str, ...]],
        buckets: np.ndarray,
        sums: np.ndarray,
        owner: np.ndarray,
    ) -> None:
        self.rows.setdefault(family, _Rows()).add(labels, buckets, owner, sums)


@dataclass(slots=True)
class _Pending:
    """A family's spec and rows, with what each row costs in sample lines."""

    name: str
    kind: str
    help: str
    label_names: tuple[str, ...]
    labels: list[tuple[str, ...]]
    values: np.ndarray  # [n] or, for histograms, [n, buckets]
    sums: np.ndarray | None
    owners: np.ndarray
    lines: np.ndarray  # 0 for a series that is not rendered (NaN)
    upper_bounds: tuple[float, ...] = ()

    def family(self, keep: np.ndarray | None) -> Family:
        labels, values, sums = self.labels, self.values, self.sums
        if keep is not None:
            rows = keep[self.owners - _ZERO]
            if not rows.all():
                labels = _select(labels, rows)
                values = values[rows]
                sums = None if sums is None else sums[rows]
        if self.kind == "histogram":
            return Family(
                name=self.name,
                kind="histogram",
                help=self.help,
                label_names=self.label_names,
                label_values=labels,
                upper_bounds=self.upper_bounds,
                buckets=values,
                sums=sums,
            )
        return Family(
            name=self.name,
            kind=self.kind,  # type: ignore[arg-type]
            help=self.help,
            label_names=self.label_names,
            label_values=labels,
            values=values,
        )


def _select(labels: list[tuple[str, ...]], rows: np.ndarray) -> list[tuple[str, ...]]:
    kept = np.flatnonzero(rows).tolist()
    if len(kept) < 2:  # itemgetter of one index returns the item, not a tuple
        return [labels[i] for i in kept]
    return list(itemgetter(*kept)(labels))


def _pending(
    cols: _Columns, name: str, kind: str, help_text: str, label_names: tuple[str, ...]
) -> _Pending:
    rows = cols.rows.get(name, _Rows())
    owners = np.concatenate(rows.owners) if rows.owners else np.empty(0, np.int64)
    values = np.concatenate(rows.values) if rows.values else np.empty(0)
    lines = (~np.isnan(values)).astype(np.int64)
    return _Pending(name, kind, help_text, label_names, rows.labels, values, None, owners, lines)


def _pending_histogram(
    cols: _Columns, name: str, help_text: str, bounds: Sequence[float]
) -> _Pending:
    rows = cols.rows.get(name, _Rows())
    width = len(bounds) + 1
    buckets = (
        np.concatenate(rows.values).astype(np.float64) if rows.values else np.empty((0, width))
    )
    sums = np.concatenate(rows.sums).astype(np.float64) if rows.sums else np.empty(0)
    owners = np.concatenate(rows.owners) if rows.owners else np.empty(0, np.int64)
    present = ~(np.isnan(sums) | np.isnan(buckets).any(axis=1))
    return _Pending(
        name, "histogram", help_text, _MV, rows.labels, buckets, sums, owners,
        present.astype(np.int64) * (width + 2), tuple(float(b) for b in bounds),
    )  # fmt: skip


def _mv_labels(v: StateView) -> list[tuple[str, str, str]]:
    p = str(v.partition)
    return [(e[0], e[1], p) for e in v.entries]


def _cells(
    mvl: Sequence[tuple[str, ...]], names: Sequence[Sequence[str]], mask: np.ndarray, *extra: str
) -> tuple[list[tuple[str, ...]], tuple[np.ndarray, ...]]:
    """Label tuples for the nonzero cells of ``mask[mv, i(, j)]``, named through ``names[mv]``."""
    idx = np.nonzero(mask)
    cols = [a.tolist() for a in idx]
    if len(cols) == 2:
        labels = [(*mvl[i], *extra, names[i][c]) for i, c in zip(*cols, strict=True)]
    else:
        labels = [
            (*mvl[i], *extra, names[i][a], names[i][b]) for i, a, b in zip(*cols, strict=True)
        ]
    return labels, idx


def _distinct_partitions(views: Sequence[StateView]) -> list[StateView]:
    """One view per partition (the furthest along), in partition order."""
    by_partition: dict[int, StateView] = {}
    for v in views:
        seen = by_partition.get(v.partition)
        if seen is None or v.next_offset > seen.next_offset:
            by_partition[v.partition] = v
    return [by_partition[p] for p in sorted(by_partition)]


def _latest_resources(views: Sequence[StateView]) -> list[tuple[tuple[str, str], dict[str, Any]]]:
    """One heartbeat per (service, instance), the newest by event time, in key order.

    An instance whose heartbeats land in two partitions (its key changed, or a
    partition moved) would otherwise be exported twice with the same labels.
    """
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for v in views:
        for r in v.resources:
            key = (str(r["service"]), str(r["instance"]))
            seen = latest.get(key)
            if seen is None or int(r["event_time_ms"]) > int(seen["event_time_ms"]):
                latest[key] = r
    return sorted(latest.items(), key=itemgetter(0))


def build_families(
    views: Sequence[StateView],
    config: StateConfig,
    health: ShardHealth | None = None,
    *,
    max_series: int | None = None,
    references: Mapping[tuple[str, str], TrainingReference] | None = None,
) -> list[Family]:
    """Every family this shard exports, for the partitions it owns now.

    With ``max_series``, the sample lines of the render stay within it (see the
    module docstring for what is left out first); without, nothing is left out.
    ``references``: training references by (model, version or "*"), used by the drift
    gauges in place of the state's own (``aggregator.references``).
    """
    views = _distinct_partitions(views)
    cols = _Columns()
    first_seen: list[tuple[int, int, int]] = []  # per model-version unit: its rank key
    base = 0
    for v in views:
        m = len(v.entries)
        owners = np.arange(base, base + m, dtype=np.int64)
        first_seen += [(e[3], v.partition, i) for i, e in enumerate(v.entries)]
        base += m
        _model_rows(v, config, owners, cols, references or {})
        _partition_rows(v, config, cols)
    resources = _latest_resources(views)
    for j, (si, r) in enumerate(resources):
        _resource_rows(si, r, base + j, cols)
    if health is not None:
        _health_rows(health, len(views), cols)

    pending = [_pending(cols, *spec) for spec in _SPECS]
    for name, help_text, bounds in (
        ("inference_latency_seconds", "Inference latency of closed panes.", config.latency_bounds),
        ("model_prediction_score", "Score (probability) of predictions in closed panes.",
         config.score_bounds),
        ("model_prediction_error", "Prediction minus label (regression), closed panes.",
         config.error_bounds),
    ):  # fmt: skip
        pending.append(_pending_histogram(cols, name, help_text, bounds))

    n_units = base + len(resources)
    keep, dropped = _fit(pending, max_series, n_units, base, first_seen)
    families = [p.family(keep) for p in pending]
    lines = sum(
        int(p.lines.sum() if keep is None else p.lines[keep[p.owners - _ZERO]].sum())
        for p in pending
    )
    families.append(
        Family(
            name="modelpulse_series_dropped",
            kind="gauge",
            help="Sample lines left out of this render by --max-series, by reason.",
            label_names=("reason",),
            label_values=[(r,) for r in DROP_REASONS],
            values=np.array([float(dropped.get(r, 0)) for r in DROP_REASONS]),
        )
    )
    families.append(
        Family(
            name="modelpulse_series",
            kind="gauge",
            help="Sample lines this shard exposes (this one included).",
            label_names=(),
            label_values=[()],
            values=np.array([float(lines + len(DROP_REASONS) + 1)]),
        )
    )
    return families


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


def _model_rows(
    v: StateView,
    config: StateConfig,
    owners: np.ndarray,
    cols: _Columns,
    references: Mapping[tuple[str, str], TrainingReference] | None = None,
) -> None:
    """Series of each model version of ``v``, owned by its unit in ``owners``."""
    mvl = _mv_labels(v)
    if not mvl:
        return
    use = resolve_references(v, config, references or {})
    with_ref = [i for i, src in enumerate(use.source) if src]
    cols.extend(
        "model_drift_reference_info",
        [(*mvl[i], use.source[i]) for i in with_ref],
        1.0,
        owners[with_ref],
    )
    cum = v.cum
    regression = np.array([e[2] for e in v.entries], dtype=bool)
    classes = [e[4] for e in v.entries]
    out = cum["outcome"]
    for code, name in enumerate(_VALID):
        by_outcome = [(*lab, name) for lab in mvl]
        cols.extend("inference_predictions", by_outcome, out[:, code], owners)
        if code:
            cols.extend("inference_errors", by_outcome, out[:, code], owners)
    cols.extend("model_labeled_predictions", mvl, cum["labelled"], owners)
    cols.extend("model_unlabeled_predictions", mvl, out[:, 0] - cum["labelled"], owners)
    cols.extend(
        "model_info",
        [
            (*lab, "regression" if r else "classification")
            for lab, r in zip(mvl, regression, strict=True)
        ],
        1.0,
        owners,
    )
    cols.extend("model_update_time_seconds", mvl, [e[3] / 1000.0 for e in v.entries], owners)
    cols.histogram("inference_latency_seconds", mvl, cum["lat"], cum["lat_sum"], owners)
    has_score = np.flatnonzero(cum["score"].sum(axis=1) > 0)
    cols.histogram(
        "model_prediction_score",
        [mvl[i] for i in has_score],
        cum["score"][has_score],
        cum["score_sum"][has_score],
        owners[has_score],
    )
    reg = np.flatnonzero(regression)
    cols.histogram(
        "model_prediction_error",
        [mvl[i] for i in reg],
        cum["err"][reg],
        cum["err_sum"][reg],
        owners[reg],
    )
    conf = cum["conf"] * ~regression[:, None, None]
    # Every pair of a version's known classes from 0, not from its first count: a cell
    # that appears at 1 hides that count from increase(), which biased error-based
    # ratios (and the Wilson bounds built on them) upwards for rare labels.
    known = np.array([[bool(name) for name in row] for row in classes], dtype=bool).reshape(
        conf.shape[:2]
    )
    pairs = known[:, :, None] & known[:, None, :] & ~regression[:, None, None]
    cells, (i, a, pc) = _cells(mvl, classes, pairs | (conf > 0))
    cols.extend("model_confusion", cells, conf[i, a, pc], owners[i])
    cells, (i, g) = _cells(mvl, [e[6] for e in v.entries], cum["seg"] > 0)
    cols.extend("inference_segment_predictions", cells, cum["seg"][i, g], owners[i])
    _segment_rows(v, mvl, regression, owners, cols)
    # Both halves of a reliability bin that has any labelled row, so a ratio never lacks one.
    cal = cum["cal"] * ~regression[:, None, None]
    i, b = np.nonzero(cal.sum(axis=-1) > 0)
    for correct, flag in ((0, "false"), (1, "true")):
        cols.extend(
            "model_calibration",
            [(*mvl[j], CALIBRATION_BIN_LABELS[k], flag) for j, k in zip(i, b, strict=True)],
            cal[i, b, correct],
            owners[i],
        )
    # A class named like the macro average would share its labels: the catalog folds
    # such names, and the per-class rows leave them out in case a view still has one.
    not_macro = np.array([[n != MACRO for n in names] for names in classes], dtype=bool)
    for w in v.windows:
        _window_rows(v, w, config, mvl, regression, not_macro, owners, cols, use)


def _segment_rows(
    v: StateView,
    mvl: Sequence[tuple[str, ...]],
    regression: np.ndarray,
    owners: np.ndarray,
    cols: _Columns,
) -> None:
    """Quality counters per segment (closed panes): windows are ``increase()`` of them."""
    cum = v.cum
    segments = [e[6] for e in v.entries]
    classes = [e[4] for e in v.entries]
    labelled = cum["seg_lab"] > 0
    cells, (i, g) = _cells(mvl, segments, labelled)
    cols.extend("model_segment_labeled_predictions", cells, cum["seg_lab"][i, g], owners[i])
    reg = labelled & regression[:, None]
    cells, (i, g) = _cells(mvl, segments, reg)
    cols.extend("model_segment_absolute_error", cells, cum["seg_abs"][i, g], owners[i])
    cols.extend("model_segment_squared_error", cells, cum["seg_sq"][i, g], owners[i])
    # All three roles of every class seen in the segment (as label or prediction), so
    # a ratio never lacks a term: a class seen but never right there has correct = 0.
    counts = cum["seg_cls"] * ~regression[:, None, None, None]
    i, g, c = np.nonzero(counts.sum(axis=2) > 0)
    labels = [
        (*mvl[j], segments[j][a], classes[j][b])
        for j, a, b in zip(i.tolist(), g.tolist(), c.tolist(), strict=True)
    ]
    for role, name in enumerate(SEGMENT_ROLES):
        cols.extend(f"model_segment_{name}", labels, counts[i, g, role, c], owners[i])


def _partition_rows(v: StateView, config: StateConfig, cols: _Columns) -> None:
    p = (str(v.partition),)
    cols.one("modelpulse_events", p, float(v.events_accepted))
    cols.one("modelpulse_late_events", p, float(v.rejected.get("late", 0)))
    for family, names, counts in (
        ("modelpulse_dead_lettered", DEAD_LETTER_REASONS, v.rejected),
        ("modelpulse_folded", FOLD_KINDS, v.folded),
    ):
        for name in (*names, *sorted(set(counts).difference(names))):
            n = counts.get(name, 0)
            cols.one(family, (*p, name), float(n), _KEEP if n else _ZERO)
    if v.max_event_ms > 0:
        cols.one(
            "modelpulse_watermark_timestamp_seconds",
            p,
            (v.max_event_ms - config.lateness_ms) / 1000,
        )
    cols.one("modelpulse_model_versions", p, float(len(v.entries)))


def _resource_rows(si: tuple[str, str], r: dict[str, Any], owner: int, cols: _Columns) -> None:
    for key, fam in (
        ("cpu_usage_ratio", "inference_cpu_usage_ratio"),
        ("memory_usage_bytes", "inference_memory_usage_bytes"),
        ("disk_usage_ratio", "inference_disk_usage_ratio"),
    ):
        if r.get(key) is not None:
            cols.one(fam, si, float(r[key]), owner)
    seen: set[str] = set()
    for gpu in r.get("gpus") or ():
        index = str(gpu["index"])
        if index not in seen:  # a GPU listed twice: the first entry counts
            seen.add(index)
            cols.one(
                "inference_gpu_usage_ratio", (*si, index), float(gpu["utilization_ratio"]), owner
            )


def _health_rows(health: ShardHealth, partitions: int, cols: _Columns) -> None:
    for pid, lag in sorted(health.lag.items()):
        cols.one("modelpulse_consumer_lag", (str(pid),), float(lag))
    for pid, age in sorted(health.snapshot_age_seconds.items()):
        cols.one("modelpulse_snapshot_age_seconds", (str(pid),), age)
    cols.one("modelpulse_batch_seconds", (), health.batch_seconds_sum)
    cols.one("modelpulse_batches", (), float(health.batches))
    cols.one("modelpulse_messages", (), float(health.messages))
    cols.one("modelpulse_dead_letter_messages", (), float(health.dead_letter_messages))
    cols.one("modelpulse_dead_letter_failures", (), float(health.dead_letter_failures))
    cols.one("modelpulse_dead_letters_truncated", (), float(health.dead_letters_truncated))
    for pid in sorted(health.lag):
        cols.one(
            "modelpulse_partition_stuck", (str(pid),), float(health.stuck_partitions.get(pid, 0))
        )
    cols.one("modelpulse_partitions_owned", (), float(partitions))
    cols.one("modelpulse_start_time_seconds", (), health.up_since)


def _window_rows(
    v: StateView,
    w: WindowAggregate,
    config: StateConfig,
    mvl: Sequence[tuple[str, ...]],
    regression: np.ndarray,
    not_macro: np.ndarray,
    owners: np.ndarray,
    cols: _Columns,
    use: ReferenceUse,
) -> None:
    m = len(mvl)
    if not m or w.end_ms <= 0:  # no pane closed yet: no window to report
        return
    wl = format_duration(w.window_ms)
    wlab = [(*lab, wl) for lab in mvl]
    classification = ~regression
    cls_idx = np.flatnonzero(classification)
    reg_idx = np.flatnonzero(regression)
    total = w.outcome[:m].sum(axis=-1)
    cols.extend("model_window_predictions", wlab, total, owners)
    cols.extend("inference_throughput", wlab, total / (w.window_ms / 1000.0), owners)
    cols.extend("model_window_end_timestamp_seconds", wlab, w.end_ms / 1000.0, owners)
    lat_q = histogram_quantiles(w.lat[:m], config.latency_bounds, QUANTILES)
    for qi, q in enumerate(QUANTILES):
        cols.extend(
            "inference_latency_quantile_seconds",
            [(*x, repr(q)) for x in wlab],
            lat_q[:, qi],
            owners,
        )

    mae, rmse = regression_metrics(w.err[:m].sum(axis=-1), w.abs_err[:m], w.sq_err[:m])
    cols.extend("model_mae", [wlab[i] for i in reg_idx], mae[reg_idx], owners[reg_idx])
    cols.extend("model_rmse", [wlab[i] for i in reg_idx], rmse[reg_idx], owners[reg_idx])

    cm = classification_metrics(w.conf[:m])
    cols.extend("model_accuracy", [wlab[i] for i in cls_idx], cm.accuracy[cls_idx], owners[cls_idx])
    classes = [e[4] for e in v.entries]
    labels, (i, c) = _cells(mvl, classes, cm.present & classification[:, None] & not_macro, wl)
    macro_labels = [(*wlab[j], MACRO) for j in cls_idx]
    for fam, per, macro in (
        ("model_precision", cm.precision, cm.macro_precision),
        ("model_recall", cm.recall, cm.macro_recall),
        ("model_f1_score", cm.f1, cm.macro_f1),
        ("model_false_positive_rate", cm.false_positive_rate, cm.macro_false_positive_rate),
        ("model_false_negative_rate", cm.false_negative_rate, cm.macro_false_negative_rate),
    ):
        cols.extend(fam, labels, per[i, c], owners[i])
        cols.extend(fam, macro_labels, macro[cls_idx], owners[cls_idx])

    # Calibration and the label-free estimate (classification): see calibration_errors.
    ece, brier = calibration_errors(w.cal[:m], w.cal_score[:m], w.brier[:m])
    estimated = estimated_accuracy(w.est_sum[:m], w.est[:m])
    gap = estimated - cm.accuracy  # NaN (absent) while the window has no labelled row
    cls_labels = [wlab[i] for i in cls_idx]
    for fam, values in (
        ("model_expected_calibration_error", ece),
        ("model_brier_score", brier),
        ("model_estimated_accuracy", estimated),
        ("model_accuracy_gap", gap),
    ):
        cols.extend(fam, cls_labels, values[cls_idx], owners[cls_idx])

    reference = use.reference
    pred = use.prediction
    score_centers = score_bin_centers(config.score_bounds)
    for name, ref_hist, cur, which, centers in (
        ("score", reference["score"], w.score[:m], use.score, score_centers),
        # Classes have no order: KS and W1 would depend on the order names were seen.
        ("prediction", reference["pred_class"], w.pred_class[:m], pred & classification, None),
        ("prediction_value", reference["pred_hist"], w.pred_hist[:m], pred & regression,
         DRIFT_CENTERS),
    ):  # fmt: skip
        idx = np.flatnonzero(which)
        if not idx.size:
            continue
        r, c = ref_hist[idx], cur[idx]
        scores = [
            ("psi", population_stability_index(r, c)),
            ("js", jensen_shannon_distance(r, c)),
        ]
        if centers is not None:
            scores.append(("ks", kolmogorov_smirnov_statistic(r, c)))
            scores.append(("wasserstein", wasserstein_distance(r, c, centers)))
        for method, values in scores:
            labels = [(*wlab[j], name, method) for j in idx]
            cols.extend("model_drift_score", labels, values, owners[idx])
    features = [[f"feature:{n}" if n else "" for n in e[5]] for e in v.entries]
    named = np.array([[bool(n) for n in fs] for fs in features], dtype=bool).reshape(m, -1)
    mask = named & use.features
    if mask.any():
        r, c = reference["feat"], w.feat[:m]
        labels, (i, f) = _cells(mvl, features, mask, wl)
        for method, values in (
            ("psi", population_stability_index(r, c)),
            ("js", jensen_shannon_distance(r, c)),
            ("ks", kolmogorov_smirnov_statistic(r, c)),
            ("wasserstein", wasserstein_distance(r, c, DRIFT_CENTERS)),
        ):
            cols.extend(
                "model_drift_score", [(*x, method) for x in labels], values[i, f], owners[i]
            )


_W = (*_MV, "window")
_SPECS: Final[tuple[tuple[str, str, str, tuple[str, ...]], ...]] = (
    (
        "inference_predictions",
        "counter",
        "Predictions in closed panes, by outcome.",
        (*_MV, "outcome"),
    ),
    (
        "inference_errors",
        "counter",
        "Predictions whose outcome is not ok, in closed panes.",
        (*_MV, "outcome"),
    ),
    ("model_labeled_predictions", "counter", "Ok predictions with a ground-truth label.", _MV),
    ("model_unlabeled_predictions", "counter", "Ok predictions without a label.", _MV),
    (
        "model_confusion",
        "counter",
        "Labelled ok predictions by actual and predicted class.",
        (*_MV, "actual", "predicted"),
    ),
    (
        "inference_segment_predictions",
        "counter",
        "Predictions by segment, closed panes.",
        (*_MV, "segment"),
    ),
    (
        "model_segment_labeled_predictions",
        "counter",
        "Labelled ok predictions per segment (classes, or values for regression), closed panes.",
        (*_MV, "segment"),
    ),
    (
        "model_segment_actual",
        "counter",
        "Labelled ok classifications per segment whose label is the class.",
        (*_MV, "segment", "class"),
    ),
    (
        "model_segment_predicted",
        "counter",
        "Labelled ok classifications per segment predicted as the class.",
        (*_MV, "segment", "class"),
    ),
    (
        "model_segment_correct",
        "counter",
        "Labelled ok classifications per segment with label and prediction the class.",
        (*_MV, "segment", "class"),
    ),
    (
        "model_segment_absolute_error",
        "counter",
        "Sum of |prediction - label| per segment (regression), closed panes.",
        (*_MV, "segment"),
    ),
    (
        "model_segment_squared_error",
        "counter",
        "Sum of (prediction - label)^2 per segment (regression), closed panes.",
        (*_MV, "segment"),
    ),
    (
        "model_calibration",
        "counter",
        "Labelled ok predictions with a score, by score bin (upper bound) and correctness.",
        (*_MV, "bin", "correct"),
    ),
    ("model_info", "gauge", "A model version seen in this partition (value 1).", (*_MV, "task")),
    ("model_update_time_seconds", "gauge", "Event time the version was first seen.", _MV),
    ("model_window_predictions", "gauge", "Predictions in the last closed window.", _W),
    ("inference_throughput", "gauge", "Predictions per second over the last closed window.", _W),
    ("model_window_end_timestamp_seconds", "gauge", "End of the last closed window.", _W),
    (
        "inference_latency_quantile_seconds",
        "gauge",
        "Latency quantile of the last closed window.",
        (*_W, "q"),
    ),
    ("model_accuracy", "gauge", "Accuracy of labelled ok predictions, last closed window.", _W),
    ("model_precision", "gauge", "Precision one-vs-rest per class, and macro.", (*_W, "class")),
    ("model_recall", "gauge", "Recall one-vs-rest per class, and macro.", (*_W, "class")),
    ("model_f1_score", "gauge", "F1 one-vs-rest per class, and macro.", (*_W, "class")),
    ("model_false_positive_rate", "gauge", "FP / (FP + TN) per class, and macro.", (*_W, "class")),
    ("model_false_negative_rate", "gauge", "FN / (FN + TP) per class, and macro.", (*_W, "class")),
    ("model_mae", "gauge", "Mean absolute error (regression), last closed window.", _W),
    ("model_rmse", "gauge", "Root mean squared error (regression), last closed window.", _W),
    (
        "model_expected_calibration_error",
        "gauge",
        "Expected calibration error over 10 score bins, labelled predictions, last closed window.",
        _W,
    ),
    (
        "model_brier_score",
        "gauge",
        "Mean (score - correct)^2 of labelled predictions, last closed window.",
        _W,
    ),
    (
        "model_estimated_accuracy",
        "gauge",
        "Mean score of ok predictions, labelled or not: the accuracy if calibrated.",
        _W,
    ),
    (
        "model_accuracy_gap",
        "gauge",
        "Estimated minus realised accuracy, last closed window.",
        _W,
    ),
    (
        "model_drift_score",
        "gauge",
        "Drift of a distribution against the reference (psi, js, ks, wasserstein).",
        (*_W, "feature", "method"),
    ),
    (
        "model_drift_reference_info",
        "gauge",
        "1 for the reference the drift scores of a model version use (training, file, "
        "first_window).",
        (*_MV, "source"),
    ),
    (
        "inference_cpu_usage_ratio",
        "gauge",
        "CPU usage of an inference instance.",
        ("service", "instance"),
    ),
    (
        "inference_memory_usage_bytes",
        "gauge",
        "Resident memory of an inference instance.",
        ("service", "instance"),
    ),
    (
        "inference_disk_usage_ratio",
        "gauge",
        "Disk usage of an inference instance.",
        ("service", "instance"),
    ),
    (
        "inference_gpu_usage_ratio",
        "gauge",
        "GPU utilisation of an inference instance.",
        ("service", "instance", "gpu"),
    ),
    ("modelpulse_events", "counter", "Events accepted into panes.", ("partition",)),
    (
        "modelpulse_late_events",
        "counter",
        "Events later than the watermark (dead-lettered).",
        ("partition",),
    ),
    (
        "modelpulse_dead_lettered",
        "counter",
        "Events and messages dead-lettered, by reason.",
        ("partition", "reason"),
    ),
    (
        "modelpulse_folded",
        "counter",
        "Names folded into __overflow__ by a cardinality cap.",
        ("partition", "kind"),
    ),
    (
        "modelpulse_watermark_timestamp_seconds",
        "gauge",
        "Event-time watermark of the partition.",
        ("partition",),
    ),
    (
        "modelpulse_model_versions",
        "gauge",
        "Model versions tracked in the partition.",
        ("partition",),
    ),
    (
        "modelpulse_consumer_lag",
        "gauge",
        "Messages not yet consumed (high watermark - position).",
        ("partition",),
    ),
    (
        "modelpulse_snapshot_age_seconds",
        "gauge",
        "Seconds since the last acknowledged snapshot.",
        ("partition",),
    ),
    ("modelpulse_batch_seconds", "counter", "Time spent processing consumed batches.", ()),
    ("modelpulse_batches", "counter", "Consumed batches processed.", ()),
    ("modelpulse_messages", "counter", "Kafka messages processed by this process.", ()),
    (
        "modelpulse_dead_letter_messages",
        "counter",
        "Messages written to the dead-letter topic.",
        (),
    ),
    (
        "modelpulse_dead_letter_failures",
        "counter",
        "Dead-letter writes the broker refused or failed (each retried before a snapshot).",
        (),
    ),
    (
        "modelpulse_dead_letters_truncated",
        "counter",
        "Dead letters whose value was cut to fit the dead-letter topic.",
        (),
    ),
    (
        "modelpulse_partition_stuck",
        "gauge",
        "1 while the partition's fetch fails at one offset again and again.",
        ("partition",),
    ),
    ("modelpulse_partitions_owned", "gauge", "Input partitions this shard owns.", ()),
    ("modelpulse_start_time_seconds", "gauge", "Start time of this process.", ()),
)
