"""Session-scoped real services: one Kafka broker for the whole test run.

Order of preference: ``KAFKA_BOOTSTRAP_SERVERS`` if set; testcontainers' Kafka when
a Docker engine answers; else the project's own KRaft broker (scripts/kafka.sh),
started once and stopped at the end if this session started it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The test helpers (tests/), and the repo root for ``demo`` (the dev stack's supervisor,
# demo/procs.py), which the editable install does not ship, whatever pytest's cwd is.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
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

from demo.procs import printed, run_script, script_succeeds

TEST_CLUSTER = "pytest"
# Every fixed port of the test services (here and in the test modules: 28xxx-29xxx) is
# below Linux's ephemeral range (32768-60999): a shard's free_port() or any client's
# outgoing socket can hold a port of that range when a broker wants to bind it.
TEST_PORT = int(os.environ.get("MODELPULSE_TEST_KAFKA_PORT", "29092"))
TEST_REGISTRY_PORT = int(os.environ.get("MODELPULSE_TEST_REGISTRY_PORT", "28081"))


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


@pytest.fixture
def long(request: pytest.FixtureRequest) -> bool:
    """Whether this run is ``--long``: a test with a long form (soak, faults) runs it."""
    return bool(request.config.getoption("--long"))


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
    name = ["--name", TEST_CLUSTER]
    already = script_succeeds("registry.sh", "status", *name)
    started = run_script(
        "registry.sh", "start", *name, "--port", str(TEST_REGISTRY_PORT), timeout=300
    )
    try:
        yield printed(started, "url")
    finally:
        if not already:
            script_succeeds("registry.sh", "stop", *name)


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
