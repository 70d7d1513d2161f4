"""Errors of the producer library; ``PublishError`` is the root."""

from __future__ import annotations

__all__ = ["InvalidEvent", "PublishError", "PublisherClosed"]


class PublishError(Exception):
    """Root of every error this package raises."""


class InvalidEvent(PublishError, ValueError):
    """A field of ``publish()`` is invalid; ``field`` names it.

    Raised at the call site, before anything is buffered, so the caller sees the
    mistake where it is made and nothing half-valid reaches Kafka.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class PublisherClosed(PublishError, RuntimeError):
    """``publish()`` was called after ``close()``."""
