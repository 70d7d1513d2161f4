"""Settings of the publisher: one pydantic-settings model, env prefix ``MODELPULSE_``."""

from __future__ import annotations

import os
import socket
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.connection import KafkaConnection, RegistryConnection

__all__ = ["PublisherSettings"]


def _default_instance() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class PublisherSettings(KafkaConnection, RegistryConnection, BaseSettings):
    """How a service publishes its predictions.

    The connection fields (bootstrap, SASL, TLS, extra ``kafka`` settings) are those of
    ``schemas.connection.KafkaConnection``. Every field can be set from the environment,
    e.g. ``MODELPULSE_BOOTSTRAP_SERVERS``,
    ``MODELPULSE_MODE=event``, ``MODELPULSE_KAFKA='{"client.id": "svc"}'``.

    >>> PublisherSettings(bootstrap_servers="127.0.0.1:9092", linger_seconds=0.05).mode
    'batch'
    """

    model_config = SettingsConfigDict(env_prefix="MODELPULSE_", extra="forbid")

    topic: str = Field("predictions", min_length=1, description="Topic of prediction events.")
    feedback_topic: str = Field(
        "prediction-feedback",
        min_length=1,
        description="Topic of label() records; give it as many partitions as the topic.",
    )
    reference_topic: str = Field(
        "modelpulse-references",
        min_length=1,
        description="Compacted topic of drift references (publish_reference); created if missing.",
    )
    mode: Literal["batch", "event"] = Field(
        "batch",
        description="batch: columnar envelopes (fast path); event: one Confluent-framed "
        "PredictionEvent per prediction (interop format).",
    )
    linger_seconds: float = Field(0.1, gt=0, le=60, description="Max time an event waits.")
    batch_max_events: int = Field(5000, ge=1, le=200_000, description="Events per envelope.")
    max_buffered_events: int = Field(
        200_000, ge=1, description="Bound of the in-process buffer; beyond it events drop."
    )
    on_full: Literal["drop", "block"] = Field(
        "drop", description="drop (count and return at once) or block the caller."
    )
    block_timeout_seconds: float = Field(1.0, gt=0, description="Longest wait with on_full=block.")
    delivery_timeout_seconds: float = Field(
        300.0, gt=0, description="How long librdkafka retries a message before it counts as failed."
    )
    compression: Literal["none", "lz4", "zstd", "snappy", "gzip"] = "lz4"
    service: str = Field("", max_length=128, description="Name of the inference service.")
    instance: str = Field(default_factory=_default_instance, max_length=128)
    heartbeat_seconds: float = Field(
        0.0, ge=0, description="Send resource heartbeats this often; 0 disables them."
    )
    max_features: int = Field(32, ge=0, le=1024, description="Features per event.")
    max_string_length: int = Field(256, ge=1, le=65536, description="Longest name/label string.")

    @model_validator(mode="after")
    def _feedback_apart(self) -> PublisherSettings:
        # The join reads labels from their own topic, partition for partition.
        if self.feedback_topic == self.topic:
            raise ValueError(f"feedback_topic: must differ from topic ({self.topic!r})")
        return self

    def kafka_config(self) -> dict[str, Any]:
        """librdkafka's dotted config for the producer."""
        return self.librdkafka_config(
            {
                "client.id": f"modelpulse-{self.service or 'publisher'}",
                # murmur2 is what the Java client uses for keyed messages, so a model lands in
                # the same partition whichever language published it.
                "partitioner": "murmur2_random",
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "compression.type": self.compression,
                "message.timeout.ms": int(self.delivery_timeout_seconds * 1000),
            }
        )
