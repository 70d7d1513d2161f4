"""Session-scoped real services: one Kafka broker for the whole test run.

Order of preference: ``KAFKA_BOOTSTRAP_SERVERS`` if set; testcontainers' Kafka when
a Docker engine answers; else the project's own KRaft broker (scripts/kafka.sh),
started once and stopped at the end if this session started it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kafka_util import (
    cluster_running,
    create_topic,
    docker_available,
    kafka_script,
    start_local_cluster,
    unique,
)
from shards import ShardProcess, free_port, shard_args

TEST_CLUSTER = "pytest"
# Every fixed port of the test services (here and in the test modules: 28xxx-29xxx) is
# below Linux's ephemeral range (32768-60999): a shard's free_port() or any client's
# outgoing socket can hold a port of that range when a broker wants to bind it.
TEST_PORT = int(os.environ.get("MODELPULSE_TEST_KAFKA_PORT", "29092"))
TEST_REGISTRY_PORT = int(os.environ.get("MODELPULSE_TEST_REGISTRY_PORT", "28081"))
ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long", action="store_true", help="run the long soak and fault modes (minutes)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long mode: run with --long (CI runs the short form)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers of a real broker for this test session."""
    given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if given:
        yield given
        return
    if docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    already = cluster_running(TEST_CLUSTER)
    bootstrap = start_local_cluster(TEST_CLUSTER, TEST_PORT)
    try:
        yield bootstrap
    finally:
        if not already:
            kafka_script("stop", "--name", TEST_CLUSTER)


@pytest.fixture(scope="session")
def schema_registry_url() -> Iterator[str]:
    """Confluent API of a real Apicurio Registry (scripts/registry.sh), in-memory.

    ``SCHEMA_REGISTRY_URL`` if set; else the project's own registry named "pytest",
    started once and stopped at the end if this session started it. Shared by every
    test: tests use subjects of their own and never assume an empty registry.
    """
    given = os.environ.get("SCHEMA_REGISTRY_URL")
    if given:
        yield given
        return
    script = ["bash", str(ROOT / "scripts" / "registry.sh")]
    name = ["--name", TEST_CLUSTER]
    already = subprocess.run([*script, "status", *name], capture_output=True, check=False)
    started = subprocess.run(
        [*script, "start", *name, "--port", str(TEST_REGISTRY_PORT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if started.returncode != 0:
        raise RuntimeError(f"registry.sh start failed:\n{started.stdout}\n{started.stderr}")
    match = re.search(r"^url=(\S+)$", started.stdout, re.MULTILINE)
    assert match, started.stdout
    try:
        yield match.group(1)
    finally:
        if already.returncode != 0:
            subprocess.run([*script, "stop", *name], capture_output=True, timeout=60, check=False)


@pytest.fixture
def topic_factory(kafka_bootstrap: str) -> Callable[..., str]:
    """Create a topic with a unique name: ``topic_factory("predictions", partitions=2)``."""

    def make(prefix: str = "t", partitions: int = 1, **config: str) -> str:
        return create_topic(kafka_bootstrap, unique(prefix), partitions, **config)

    return make


@pytest.fixture
def shard_factory(tmp_path: Path) -> Iterator[Callable[..., ShardProcess]]:
    """``make(bootstrap, topic, **flags)`` starts an aggregator shard process (flags as
    ``shards.shard_args`` takes them); every shard it started is killed at the end."""
    started: list[ShardProcess] = []

    def make(bootstrap: str, topic: str, **overrides: Any) -> ShardProcess:
        n = len(started)
        shard = ShardProcess(
            shard_args(bootstrap, topic, shard_id=f"s{n}", **overrides),
            free_port(),
            tmp_path / f"shard{n}.log",
        ).start()
        started.append(shard)
        return shard

    yield make
    for s in started:
        s.kill()
