"""Errors of the aggregator; ``AggregatorError`` is the root."""

from __future__ import annotations

__all__ = ["AggregatorError", "ConfigMismatch", "DecodeError"]


class AggregatorError(Exception):
    """Root of every error this package raises."""


class DecodeError(AggregatorError, ValueError):
    """A message that cannot be turned into columns; ``reason`` is a short metric label.

    Carries where the message came from so it can be dead-lettered as it is.
    """

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.topic = topic
        self.partition = partition
        self.offset = offset


class ConfigMismatch(AggregatorError):
    """A saved snapshot was made with a different configuration."""
