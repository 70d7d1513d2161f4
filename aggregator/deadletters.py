"""Dead letters: bad input sent, with why and where from, to the dead-letter topic.

A snapshot moves ``next_offset`` past the messages it covers, so it must never exist
before their dead letters do: ``DeadLetters.settle`` waits for every letter produced
so far to be acknowledged (producing refused ones again, without their value if the
broker found them too large) and raises otherwise, which holds the snapshot back.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from aggregator.errors import AggregatorError
from aggregator.metrics import ShardHealth
from aggregator.route import Rejected

__all__ = ["BROKER_DEFAULT_MAX_BYTES", "Coordinates", "DeadLetter", "DeadLetters", "Source"]

log = logging.getLogger("modelpulse.aggregator")

BROKER_DEFAULT_MAX_BYTES = 1_048_588
# A dead letter's value is cut to the dead-letter topic's limit minus this much room
# for the key, the headers and the record batch around it.
DEAD_LETTER_ROOM = 16 * 1024


class Source(Protocol):
    """What a dead letter reads of the message it stands for."""

    def topic(self) -> str | None: ...

    def partition(self) -> int: ...

    def offset(self) -> int: ...

    def key(self) -> str | bytes | None: ...

    def value(self) -> bytes | None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Coordinates:
    """Where a message is whose value is not at hand (unfetchable, or decided after it
    left memory): a ``Source`` for a dead letter without a value."""

    topic_: str
    partition_: int
    offset_: int

    def topic(self) -> str:
        return self.topic_

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_

    def key(self) -> None:
        return None

    def value(self) -> None:
        return None


@dataclasses.dataclass
class DeadLetter:
    """One dead letter as produced, kept until the broker has acknowledged it."""

    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]]
    attempts: int = 0

    def truncated(self, limit: int) -> DeadLetter:
        """The same letter with its value cut to ``limit`` bytes, marked as cut."""
        size = len(self.value or b"")
        if any(k == "modelpulse.truncated" for k, _ in self.headers):
            headers = self.headers
        else:
            headers = [
                *self.headers,
                ("modelpulse.truncated", b"true"),
                ("modelpulse.original.size", str(size).encode()),
            ]
        value = self.value[: max(0, limit)] if self.value else self.value
        return DeadLetter(value, self.key, headers, self.attempts)


class DeadLetters:
    """Produces dead letters and tracks them until acknowledged.

    ``on_stalled_change`` is called when letters start or stop being refused (the
    shard's /healthz says so meanwhile).
    """

    def __init__(
        self,
        producer: Producer,
        topic: str,
        health: ShardHealth,
        on_stalled_change: Callable[[], None],
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.health = health
        self._on_stalled_change = on_stalled_change
        self.max_bytes = BROKER_DEFAULT_MAX_BYTES  # the topic's, see set_max_bytes
        self.unacked: list[DeadLetter] = []  # refused or failed: produce again
        self.stalled = False  # some could not be written

    def set_max_bytes(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        log.info(
            "dead letters over %d bytes are truncated to fit %s",
            max_bytes - DEAD_LETTER_ROOM,
            self.topic,
        )

    def send_all(self, rejected: Iterable[Rejected]) -> None:
        for r in rejected:
            self.send(r.message, r.reason, r.detail, r.rows)

    def send(
        self, m: Source, reason: str, detail: str, rows: int, *, unreadable: bool = False
    ) -> None:
        """Send a message to the dead-letter topic with why and where it came from.

        ``unreadable``: the message could not be fetched, so the letter has no value,
        only its coordinates.
        """
        headers = [
            ("modelpulse.reason", reason.encode()),
            ("modelpulse.detail", detail[:500].encode()),
            ("modelpulse.source.topic", (m.topic() or "").encode()),
            ("modelpulse.source.partition", str(m.partition()).encode()),
            ("modelpulse.source.offset", str(m.offset()).encode()),
            ("modelpulse.rows", str(rows).encode()),
        ]
        letter = DeadLetter(None, None, headers)
        if not unreadable:
            key = m.key()
            letter = DeadLetter(m.value(), key.encode() if isinstance(key, str) else key, headers)
            room = self._room(letter)
            if len(letter.value or b"") > room:
                letter = letter.truncated(room)
                self.health.dead_letters_truncated += 1
                log.warning(
                    "dead letter of %s[%d]@%d (%s) truncated to %d bytes to fit %s",
                    m.topic(),
                    m.partition(),
                    m.offset(),
                    reason,
                    room,
                    self.topic,
                )
        self._produce(letter)
        self.health.dead_letter_messages += 1

    def _room(self, letter: DeadLetter) -> int:
        extra = len(letter.key or b"") + sum(len(k) + len(v) + 8 for k, v in letter.headers)
        return max(0, self.max_bytes - DEAD_LETTER_ROOM - extra)

    def _produce(self, letter: DeadLetter) -> None:
        """Produce one dead letter; a refusal puts it back in ``unacked``."""
        letter.attempts += 1

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                self._failed(letter, err)

        while True:
            try:
                self.producer.produce(
                    self.topic,
                    letter.value,
                    letter.key,
                    headers=letter.headers,
                    on_delivery=delivered,
                )
                return
            except BufferError:
                self.producer.poll(0.1)
            except KafkaException as exc:  # e.g. larger than the producer's own limit
                self._failed(letter, exc.args[0])
                return

    def _failed(self, letter: DeadLetter, err: KafkaError) -> None:
        self.health.dead_letter_failures += 1
        if err.code() == KafkaError.MSG_SIZE_TOO_LARGE and letter.value:
            # The topic's limit is smaller than we read (or the batch around the letter
            # is larger): keep only the headers, which always fit.
            letter = letter.truncated(0)
            self.health.dead_letters_truncated += 1
        log.error(
            "dead letter (%s) not written (attempt %d): %s; retrying before the next snapshot",
            dict(letter.headers).get("modelpulse.reason", b"?").decode(errors="replace"),
            letter.attempts,
            err.str(),
        )
        self.unacked.append(letter)

    def settle(self, deadline: float) -> None:
        """Wait until every dead letter produced so far is acknowledged, producing the
        refused ones again; raise (so no snapshot moves past them) if that fails."""
        for attempt in range(4):
            left = self.producer.flush(max(0.0, deadline - time.monotonic()))
            retry, self.unacked = self.unacked, []
            if not retry and not left:
                if self.stalled:
                    self.stalled = False
                    self._on_stalled_change()
                return
            if attempt == 3 or time.monotonic() >= deadline:
                self.unacked.extend(retry)
                if retry and not self.stalled:
                    self.stalled = True
                    self._on_stalled_change()
                raise AggregatorError(
                    f"{len(retry)} dead letters refused and {left} messages unacknowledged; "
                    "no snapshot until they are written"
                )
            for letter in retry:
                self._produce(letter)
