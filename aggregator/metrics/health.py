"""Series of the shard, its partitions and its inference instances (heartbeats)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from aggregator.metrics.columns import _KEEP, _ZERO, _Columns
from aggregator.metrics.specs import DEAD_LETTER_REASONS, FOLD_KINDS
from aggregator.state import StateConfig, StateView


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
    for name, n in (v.unmatched_labels or {}).items():
        cols.one("modelpulse_unmatched_labels", (*p, name), float(n), _KEEP if n else _ZERO)
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
