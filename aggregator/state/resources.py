"""Heartbeat resources of a partition: the latest record per (service, instance)."""

from __future__ import annotations

from typing import Any

from aggregator.state.config import MAX_INSTANCES, RESOURCE_TTL_MS

__all__ = ["Resources"]


class Resources:
    """Latest accepted heartbeat per instance, bounded in time and number."""

    def __init__(self, records: dict[str, dict[str, Any]] | None = None) -> None:
        self.records: dict[str, dict[str, Any]] = dict(records or {})

    def add(self, record: dict[str, Any]) -> None:
        self.records[f"{record['service']}\x00{record['instance']}"] = record

    def prune(self, max_event_ms: int) -> None:
        """Forget instances silent for RESOURCE_TTL_MS of event time; keep at most
        MAX_INSTANCES (the most recent), so pod churn cannot grow the series."""
        if not self.records:
            return
        horizon = max_event_ms - RESOURCE_TTL_MS
        live = sorted(
            (
                (int(r["event_time_ms"]), k)
                for k, r in self.records.items()
                if int(r["event_time_ms"]) >= horizon
            ),
            reverse=True,
        )[:MAX_INSTANCES]
        if len(live) != len(self.records):
            keep = {k for _, k in live}
            self.records = {k: r for k, r in self.records.items() if k in keep}
