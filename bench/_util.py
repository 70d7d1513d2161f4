"""Helpers shared by the Kafka benchmarks: topics, CPU pinning, machine facts, tables."""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import uuid
from collections.abc import Iterable, Sequence

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

__all__ = [
    "create_topic",
    "machine_line",
    "median",
    "pin_to_core",
    "run_id",
    "table",
]


def run_id() -> str:
    """A short unique suffix for the topics and groups of one run."""
    return uuid.uuid4().hex[:8]


def create_topic(bootstrap: str, name: str, partitions: int = 1) -> str:
    """Create ``name`` (1 partition by default) and wait until it exists."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1)], operation_timeout=30
    )
    for fut in futures.values():
        try:
            fut.result(60)
        except KafkaException as exc:
            if "already exists" not in str(exc).lower():
                raise
    return name


def pin_to_core(core: int | None) -> str:
    """Pin this process (and the threads it starts later) to one core; returns what was done."""
    if core is None or core < 0 or not hasattr(os, "sched_setaffinity"):
        return "unpinned"
    cores = sorted(os.sched_getaffinity(0))
    chosen = cores[core % len(cores)]
    os.sched_setaffinity(0, {chosen})
    return f"core {chosen}"


def default_core() -> int:
    """The last core: the broker and the parent are left the others."""
    try:
        return max(os.sched_getaffinity(0))
    except AttributeError:
        return -1


def machine_line() -> str:
    """Date, CPU model, core count, load average: what a result needs beside it."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{now}; {model}; {os.cpu_count()} cores (shared); load avg {load}; "
        f"Python {platform.python_version()}"
    )


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain Markdown table, columns padded to their widest cell."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])
