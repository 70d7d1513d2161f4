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

TEST_CLUSTER = "pytest"
TEST_PORT = int(os.environ.get("MODELPULSE_TEST_KAFKA_PORT", "39092"))


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


@pytest.fixture
def topic_factory(kafka_bootstrap: str) -> Callable[..., str]:
    """Create a topic with a unique name: ``topic_factory("predictions", partitions=2)``."""

    def make(prefix: str = "t", partitions: int = 1, **config: str) -> str:
        return create_topic(kafka_bootstrap, unique(prefix), partitions, **config)

    return make
