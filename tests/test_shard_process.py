"""Shard._process on fake messages (pure logic; the real broker is in test_aggregator)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from aggregator.settings import AggregatorSettings
from aggregator.shard import Shard
from aggregator.state import PartitionState
from producer.encode import Row, encode_batch


@dataclass
class FakeMessage:
    """The part of confluent_kafka.Message that the shard reads."""

    _value: bytes
    _offset: int
    _ts: int

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes:
        return b"m"

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return (1, self._ts)

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return 0

    def headers(self) -> None:
        return None

    def error(self) -> None:
        return None


def test_one_huge_batch_is_ingested_in_groups_with_the_right_timestamps() -> None:
    shard = Shard(AggregatorSettings(bootstrap_servers="127.0.0.1:1", max_future="1m"))
    state = PartitionState(shard.config, 0)
    start = time.time() - 60
    msgs = []
    for e in range(30):  # 150k rows > one ingest group
        rows = [
            Row("m", "v", start + e + i / 5000, 0.01, 0, "a", None, None, None, None, "")
            for i in range(5000)
        ]
        msgs.append(FakeMessage(encode_batch(rows), 100 + e, int((start + e + 1) * 1000)))
    shard._process(0, state, msgs)  # type: ignore[arg-type]
    assert state.next_offset == 130
    assert state.rejected == {}  # each row checked against its own message's timestamp
    assert (
        int(state.cum["outcome"].sum())
        + int(sum(state.ring["outcome"][~state.slot_closed].sum(axis=(0, 1))))
        == 150_000
    )
    shard.producer.flush(0)
    np.testing.assert_equal(state.max_event_ms, int(np.floor((start + 29 + 4999 / 5000) * 1000)))
