"""Helpers for tests that talk to a real Kafka broker (started by scripts/kafka.sh through
the dev stack's supervisor, demo/procs.py)."""

from __future__ import annotations

import gc
import os
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Message
from confluent_kafka.admin import AdminClient, NewTopic

from demo.procs import ScriptError, run_script, script_succeeds
from demo.procs import start_kafka as start_local_cluster

ROOT = Path(__file__).resolve().parent.parent
KAFKA_SH = ROOT / "scripts" / "kafka.sh"


def kafka_script(*args: str, timeout: float = 180.0) -> str:
    """Run scripts/kafka.sh (see ``run_script``)."""
    return run_script(KAFKA_SH.name, *args, timeout=timeout)


def cluster_running(name: str) -> bool:
    """Whether scripts/kafka.sh has a live cluster of that name (status exits 0)."""
    return script_succeeds(KAFKA_SH.name, "status", "--name", name)


@dataclass(frozen=True)
class PrivateCluster:
    """A scripts/kafka.sh cluster of one test module's own, so stopping or crashing its
    brokers disturbs nobody else: ``outage_broker = PrivateCluster("x", 29192).fixture()``."""

    name: str
    port: int
    brokers: int = 1

    def start(self) -> str:
        """Start it (or its stopped brokers again); its bootstrap."""
        return start_local_cluster(self.name, self.port, self.brokers)

    def stop(self) -> None:
        """SIGKILL every broker (a crash); ``start()`` brings them back with their data."""
        kafka_script("stop", "--name", self.name, "--kill")

    def clean(self) -> None:
        kafka_script("clean", "--name", self.name, "--kill")

    def fixture(self) -> Any:
        """A module-scoped fixture giving the bootstrap of a fresh cluster (what an aborted
        run left is wiped first), wiped when the module is done."""

        @pytest.fixture(scope="module")
        def bootstrap() -> Iterator[str]:
            self.clean()
            try:
                yield self.start()
            finally:
                self.clean()

        return bootstrap


def docker_available() -> bool:
    """Whether a Docker engine answers (for testcontainers); quick and quiet when not."""
    host = os.environ.get("DOCKER_HOST", "")
    if not host and not Path("/var/run/docker.sock").exists():
        return False
    with warnings.catch_warnings():
        # docker-py leaks the socket of a failed connection; it is collected right here.
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            import docker

            client = docker.from_env(timeout=2)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False
        finally:
            gc.collect()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_topic(bootstrap: str, name: str, partitions: int = 1, **config: str) -> str:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, config=config or {})], operation_timeout=30
    )
    for fut in futures.values():
        fut.result(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # metadata propagates asynchronously
        md = admin.list_topics(name, timeout=10)
        t = md.topics.get(name)
        if t is not None and t.error is None and len(t.partitions) == partitions:
            return name
        time.sleep(0.2)
    raise RuntimeError(f"topic {name} not visible after creation")


def consume_all(
    bootstrap: str,
    topic: str,
    *,
    expected: int | None = None,
    timeout: float = 30.0,
    idle: float = 2.0,
) -> list[Message]:
    """Read a topic from the beginning until ``expected`` messages or ``idle`` s of silence."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("reader"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "fetch.queue.backoff.ms": 10,
        }
    )
    consumer.subscribe([topic])
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = consumer.consume(10_000, 0.2)
            for m in batch:
                if m.error() is None:
                    out.append(m)
            if batch:
                last = time.monotonic()
            if expected is not None and len(out) >= expected:
                break
            if expected is None and out and time.monotonic() - last > idle:
                break
    finally:
        consumer.close()
    return out


__all__ = [
    "KafkaException",
    "PrivateCluster",
    "ScriptError",
    "cluster_running",
    "consume_all",
    "create_topic",
    "docker_available",
    "kafka_script",
    "run_script",
    "script_succeeds",
    "start_local_cluster",
    "unique",
]
