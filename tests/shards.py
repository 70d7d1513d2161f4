"""Run aggregator shards as real processes and read their /metrics (test helper)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from fastavro import schemaless_writer
from prometheus_client.parser import text_string_to_metric_families

from aggregator.shard import MARKER_HEADER
from schemas.wire import SchemaId, frame, parsed_schema

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse_metrics(text: str) -> Samples:
    out: Samples = defaultdict(list)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name].append((dict(s.labels), float(s.value)))
    return out


@dataclass
class ShardProcess:
    """One ``python -m aggregator`` child process."""

    args: list[str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ShardProcess:
        with self.log_path.open("ab") as log:
            self.proc = self._spawn(log)
        return self

    def _spawn(self, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "aggregator", *self.args, "--http-port", str(self.port)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no final snapshot, no goodbye to the group."""
        if self.proc is not None and self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def get(self, path: str = "/metrics", timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def scrape(self) -> Samples:
        status, body = self.get()
        assert status == 200, body
        return parse_metrics(body)

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


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


def wait_until(predicate: Any, timeout: float, what: str, shards: list[ShardProcess] = ()) -> Any:  # type: ignore[assignment]
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # a shard restarting refuses connections for a moment
            last_exc = exc
        time.sleep(0.25)
    logs = "\n\n".join(f"--- {s.log_path.name}\n{s.log_tail()}" for s in shards)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_exc})\n{logs}")


def send_markers(
    bootstrap: str, topic: str, partitions: int, event_time_ms: int, group_id: str | None = None
) -> None:
    """Append a watermark marker to every partition so all panes before it close.

    Shards accept markers only with the header their own group writes; the group is
    ``shard_args``'s default unless given.
    """
    out = io.BytesIO()
    schemaless_writer(
        out,
        parsed_schema(SchemaId.WATERMARK_MARKER),
        {"event_time_ms": event_time_ms, "origin": "test"},
    )
    value = frame(SchemaId.WATERMARK_MARKER, out.getvalue())
    producer = Producer({"bootstrap.servers": bootstrap})
    header = [(MARKER_HEADER, (group_id or f"{topic}-agg").encode())]
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
