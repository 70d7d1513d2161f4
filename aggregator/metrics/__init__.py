"""State views -> Prometheus metric families (names, labels, values).

Cumulative series (counters, histograms) are additive, so ``sum by (model, version)``
combines partitions and shards. Windowed gauges are exact because a model's events
all land in one partition. Every per-model series carries a ``partition`` label so
that two partitions folding into the same ``__overflow__`` model never collide.

``max_series`` caps the sample lines of the whole render: see ``fit``. The modules:
``specs`` (the family table and fixed label values), ``columns`` (rows before the
cap), ``model`` and ``window`` (per model version), ``health`` (shard, partitions,
inference instances), ``fit`` (the cap).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from aggregator.durations import format_duration
from aggregator.exposition import Family
from aggregator.metrics.columns import _ZERO, _Columns, _pending, _pending_histogram
from aggregator.metrics.fit import _fit
from aggregator.metrics.health import (
    ShardHealth,
    _health_rows,
    _latest_resources,
    _partition_rows,
    _resource_rows,
)
from aggregator.metrics.model import _model_rows
from aggregator.metrics.specs import _SPECS, DEAD_LETTER_REASONS, DROP_REASONS, FOLD_KINDS
from aggregator.references import TrainingReference
from aggregator.state import StateConfig, StateView
from aggregator.state.config import LABEL_DELAY_BOUNDS

__all__ = [
    "DEAD_LETTER_REASONS",
    "DROP_REASONS",
    "FOLD_KINDS",
    "ShardHealth",
    "build_families",
    "format_duration",
]


def _distinct_partitions(views: Sequence[StateView]) -> list[StateView]:
    """One view per partition (the furthest along), in partition order."""
    by_partition: dict[int, StateView] = {}
    for v in views:
        seen = by_partition.get(v.partition)
        if seen is None or v.next_offset > seen.next_offset:
            by_partition[v.partition] = v
    return [by_partition[p] for p in sorted(by_partition)]


def build_families(
    views: Sequence[StateView],
    config: StateConfig,
    health: ShardHealth | None = None,
    *,
    max_series: int | None = None,
    references: Mapping[tuple[str, str], TrainingReference] | None = None,
) -> list[Family]:
    """Every family this shard exports, for the partitions it owns now.

    With ``max_series``, the sample lines of the render stay within it (see
    ``aggregator.metrics.fit`` for what is left out first); without, nothing is left out.
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
        ("model_label_delay_seconds", "Label time minus prediction time of joined labels.",
         LABEL_DELAY_BOUNDS),
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
