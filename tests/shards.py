"""Run aggregator shards as real processes, feed them rows and markers, read their /metrics
(test helper).

The processes themselves (``ShardProcess``, ``wait_until``, ``free_port``) are the dev
stack's supervisor, demo/procs.py, which ``python -m demo`` uses too.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from confluent_kafka import Producer

from demo.procs import ROOT, Samples, ShardProcess, free_port, parse_metrics, wait_until
from producer.encode import Row
from schemas.codec import MARKER_GROUP_HEADER, encode_marker

__all__ = [
    "ROOT",
    "Samples",
    "ShardProcess",
    "free_port",
    "make_row",
    "merged",
    "owned",
    "parse_metrics",
    "send_markers",
    "shard_args",
    "total",
    "wait_assigned",
    "wait_until",
]


def make_row(model: str, t_s: float, **kw: Any) -> Row:
    """A valid classification row of ``model`` at ``t_s``; ``kw`` overrides any field."""
    base: dict[str, Any] = dict(
        model=model,
        version="v1",
        time=t_s,
        latency_seconds=0.01,
        outcome=0,
        prediction="x",
        score=0.5,
        label="x",
        segment=None,
        features=None,
        event_id="",
    )
    base.update(kw)
    return Row(**base)


def shard_args(bootstrap: str, topic: str, **overrides: Any) -> list[str]:
    """Flags for a test shard: small panes and windows so tests finish in seconds."""
    base: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "input_topic": topic,
        "group_id": f"{topic}-agg",
        "state_topic": f"{topic}-state",
        "dead_letter_topic": f"{topic}-dlq",
        "http_host": "127.0.0.1",
        "pane": "1s",
        "windows": "5s,10s",
        "lateness": "2s",
        "drift_reference": "5s",
        "snapshot_interval": "1s",
        "idle_timeout": "1h",
        "render_interval": "200ms",
        "max_future": "3650d",
    }
    base.update(overrides)
    args: list[str] = []
    for key, value in base.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def send_markers(
    bootstrap: str, topic: str, partitions: int, event_time_ms: int, group_id: str | None = None
) -> None:
    """Append a watermark marker to every partition so all panes before it close.

    Shards accept markers only with the header their own group writes; the group is
    ``shard_args``'s default unless given.
    """
    value = encode_marker(event_time_ms, "test")
    producer = Producer({"bootstrap.servers": bootstrap})
    header = [(MARKER_GROUP_HEADER, (group_id or f"{topic}-agg").encode())]
    for p in range(partitions):
        producer.produce(topic, value, partition=p, headers=header)
    assert producer.flush(30) == 0


def total(samples: Samples, name: str, **match: str) -> float:
    return sum(
        v
        for labels, v in samples.get(name, [])
        if all(labels.get(k) == x for k, x in match.items())
    )


def merged(shards: list[ShardProcess]) -> Samples:
    out: Samples = defaultdict(list)
    for s in shards:
        if s.alive():
            for name, rows in s.scrape().items():
                out[name].extend(rows)
    return out


def owned(shard: ShardProcess) -> int:
    return int(total(shard.scrape(), "modelpulse_partitions_owned"))


def wait_assigned(shards: list[ShardProcess], partitions: int, timeout: float = 60) -> None:
    """Until every live shard owns at least one partition and together they own all."""
    live = [s for s in shards if s.alive()]

    def ok() -> bool:
        counts = [owned(s) for s in live]
        return all(counts) and sum(counts) == partitions

    wait_until(ok, timeout, f"{partitions} partitions assigned over {len(live)} shards", live)
