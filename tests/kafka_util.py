"""Helpers for tests that talk to a real Kafka broker (started by scripts/kafka.sh)."""

from __future__ import annotations

import gc
import os
import re
import subprocess
import time
import uuid
import warnings
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, Message
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
KAFKA_SH = ROOT / "scripts" / "kafka.sh"


def run_script(
    script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 180.0
) -> str:
    """Run ``scripts/<script>`` and return its output; raise with the output on failure."""
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def kafka_script(*args: str, timeout: float = 180.0) -> str:
    """Run scripts/kafka.sh (see ``run_script``)."""
    return run_script(KAFKA_SH.name, *args, timeout=timeout)


def cluster_running(name: str) -> bool:
    """Whether scripts/kafka.sh has a live cluster of that name (status exits 0)."""
    proc = subprocess.run(
        ["bash", str(KAFKA_SH), "status", "--name", name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.returncode == 0


def start_local_cluster(name: str, port: int, brokers: int = 1) -> str:
    out = kafka_script("start", "--name", name, "--port", str(port), "--brokers", str(brokers))
    match = re.search(r"^bootstrap=(\S+)$", out, re.MULTILINE)
    if not match:
        raise RuntimeError(f"kafka.sh start printed no bootstrap line:\n{out}")
    return match.group(1)


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
    "cluster_running",
    "consume_all",
    "create_topic",
    "docker_available",
    "kafka_script",
    "start_local_cluster",
    "unique",
]
