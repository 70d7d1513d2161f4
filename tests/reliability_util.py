"""Helpers of the tests/test_reliability_*.py suites: quick scrapes, process sampling,
result files, and the times and settings the suites share."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shards import shard_args

from aggregator.settings import AggregatorSettings

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "reliability" / "results"
OUTCOME_NAMES = ("ok", "error", "timeout", "rejected")
T0_MS = 1_700_000_300_000  # in the past, aligned to panes


def shard_settings(**overrides: Any) -> AggregatorSettings:
    """The settings a shard started with ``shard_args(..., **overrides)`` runs with."""
    from aggregator.__main__ import parse_settings

    settings, _ = parse_settings(shard_args("127.0.0.1:1", "t", **overrides))
    return settings


_OWNED = re.compile(r'^modelpulse_events_total\{partition="(\d+)"\} ', re.MULTILINE)
_LAG = re.compile(r'^modelpulse_consumer_lag\{partition="(\d+)"\} (\S+)$', re.MULTILINE)
_SERIES = re.compile(r"^modelpulse_series (\S+)$", re.MULTILINE)


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes, float]:
    """(status, body, seconds) of one GET; status 0 when nothing answered."""
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
            return resp.status, body, time.perf_counter() - start
    except urllib.error.HTTPError as exc:
        body = exc.read()
        exc.close()
        return exc.code, body, time.perf_counter() - start
    except (OSError, ValueError):
        return 0, b"", time.perf_counter() - start


@dataclass(frozen=True)
class Scrape:
    """What a quick look at one shard's /metrics says (no full parse)."""

    status: int
    seconds: float
    partitions: frozenset[int]
    lag: dict[int, float]
    series: float | None
    start: float  # monotonic time the request was sent
    end: float

    @classmethod
    def of(cls, url: str, timeout: float = 5.0) -> Scrape:
        start = time.monotonic()
        status, body, seconds = get(url + "/metrics", timeout)
        end = time.monotonic()
        if status != 200:
            return cls(status, seconds, frozenset(), {}, None, start, end)
        text = body.decode("utf-8", "replace")
        series = _SERIES.search(text)
        return cls(
            status,
            seconds,
            frozenset(int(p) for p in _OWNED.findall(text)),
            {int(p): float(v) for p, v in _LAG.findall(text)},
            float(series.group(1)) if series else None,
            start,
            end,
        )


_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="scrape")


def scrape_all(urls: Sequence[str], timeout: float = 5.0) -> list[Scrape]:
    """Scrape every url at once (threads), so the answers describe nearly one instant."""
    return list(_POOL.map(lambda u: Scrape.of(u, timeout), urls))


def rss_bytes(pid: int) -> int | None:
    """VmRSS of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def median(values: Iterable[float]) -> float:
    return percentile(values, 50)


def summary(values: Sequence[float], scale: float = 1.0, digits: int = 4) -> dict[str, Any]:
    """min / median / p95 / max / last of a series, scaled (e.g. 1e3 for ms)."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": round(min(values) * scale, digits),
        "median": round(median(values) * scale, digits),
        "p95": round(percentile(values, 95) * scale, digits),
        "max": round(max(values) * scale, digits),
        "last": round(values[-1] * scale, digits),
    }


def thirds(values: Sequence[float]) -> tuple[Sequence[float], Sequence[float]]:
    """The first and the last third of a series."""
    n = max(1, len(values) // 3)
    return values[:n], values[-n:]


@dataclass
class Clock:
    """Seconds since the start of a test, for timelines in the result files."""

    started: float = field(default_factory=time.monotonic)
    wall: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __call__(self) -> float:
        return round(time.monotonic() - self.started, 3)


def write_result(name: str, clock: Clock, *, long: bool, passed: bool, **figures: Any) -> Path:
    """reliability/results/<name>.json (``<name>.long.json`` in long mode): the figures
    of this run, with when and where."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    doc = {
        "test": name,
        "date": clock.wall.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mode": "long" if long else "short",
        "passed": passed,
        "duration_seconds": round(time.monotonic() - clock.started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        **figures,
    }
    path = RESULTS_DIR / f"{name}{'.long' if long else ''}.json"
    path.write_text(json.dumps(doc, indent=2, sort_keys=False, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset | tuple):
        return sorted(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
