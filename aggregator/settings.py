"""Settings of an aggregator shard: one pydantic-settings model, env prefix ``MODELPULSE_``.

Read once in the entry point (environment, then command-line flags win); the rest
of the package takes the validated object.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from aggregator.catalog import Limits
from aggregator.state import CALIBRATION_BINS, StateConfig, load_reference_file
from schemas.connection import KafkaConnection, RegistryConnection
from schemas.registry import SchemaRegistry

__all__ = ["AggregatorSettings", "parse_duration_ms"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str | int | float) -> int:
    """ "10s" -> 10000; "1.5m" -> 90000; a bare number is seconds.

    >>> parse_duration_ms("5m")
    300000
    """
    if isinstance(text, int | float):
        return int(float(text) * 1000)
    match = _DURATION.match(text)
    if not match:
        try:
            return int(float(text) * 1000)
        except ValueError:
            raise ValueError(f"{text!r} is not a duration like 500ms, 10s, 5m, 1h") from None
    return int(float(match.group(1)) * _UNIT_MS[match.group(2)])


def _floats(text: str | list[float]) -> tuple[float, ...]:
    if isinstance(text, list | tuple):
        return tuple(float(x) for x in text)
    return tuple(float(x) for x in text.split(",") if x.strip())


class AggregatorSettings(KafkaConnection, RegistryConnection, BaseSettings):
    """Configuration of one aggregator shard; every field is also a ``--flag``.

    The connection fields (bootstrap, SASL, TLS, extra ``kafka`` settings) are those of
    ``schemas.connection.KafkaConnection``, shared with the producer."""

    model_config = SettingsConfigDict(env_prefix="MODELPULSE_", extra="forbid")

    input_topic: str = Field("predictions", description="Topic of prediction events.")
    group_id: str = Field("modelpulse-aggregator", description="Consumer group of the shards.")
    state_topic: str = Field(
        "modelpulse-state", description="Compacted topic of per-partition snapshots."
    )
    dead_letter_topic: str = Field("predictions-dlq", description="Where bad input goes.")
    reference_topic: str = Field(
        "modelpulse-references",
        description="Compacted topic of drift references from training (producer."
        "publish_reference), used in preference to the first window; empty: not read.",
    )
    http_host: str = Field("0.0.0.0", description="Address of /metrics, /healthz, /readyz.")
    http_port: int = Field(9464, ge=0, le=65535, description="Port of this shard's endpoints.")
    pane: str = Field("10s", description="Tumbling pane size (event time).")
    windows: str = Field("1m,5m,1h", description="Sliding windows, multiples of the pane.")
    lateness: str = Field("10s", description="Allowed lateness before a pane closes.")
    max_future: str = Field(
        "5m",
        description="Events (and markers) further ahead than this of min(their Kafka "
        "timestamp, the shard's clock at ingest) are rejected.",
    )
    latency_buckets: str = Field(
        "0.001,0.0025,0.005,0.01,0.025,0.05,0.1,0.25,0.5,1,2.5,5,10",
        description="Upper bounds (seconds) of the latency histogram.",
    )
    error_buckets: str = Field(
        "-10,-5,-2.5,-1,-0.5,-0.25,-0.1,0,0.1,0.25,0.5,1,2.5,5,10",
        description="Upper bounds of the regression prediction-error histogram.",
    )
    score_buckets: str = Field(
        ",".join(str(round(0.05 * i, 2)) for i in range(1, 21)),
        description="Upper bounds of the score histogram.",
    )
    drift_reference: str = Field(
        "5m", description="Drift reference: the first full window of this length per version."
    )
    drift_reference_file: str | None = Field(
        None,
        description="JSON file of reference sample values per model (score, prediction, "
        "features); models without an entry use the first full window.",
    )
    max_models: int = Field(
        100, ge=1, description="Models per partition; more fold into __overflow__."
    )
    max_versions_per_model: int = Field(5, ge=1, description="Versions per model.")
    max_classes: int = Field(16, ge=2, le=256, description="Classes per model (incl. overflow).")
    max_features: int = Field(8, ge=1, le=128, description="Monitored features per model.")
    max_segments: int = Field(8, ge=1, le=256, description="Segment values per model.")
    max_name_length: int = Field(
        256,
        ge=1,
        le=65536,
        description="Longest model/version/class/feature/segment/service name (characters); "
        "longer ones are dead-lettered as name_too_long.",
    )
    max_rows_per_envelope: int = Field(
        200_000,
        ge=1,
        description="Rows of one PredictionBatch envelope; larger ones are dead-lettered "
        "as envelope_too_large.",
    )
    max_series: int = Field(
        100_000,
        ge=1000,
        description="Cap on the sample lines of one shard's /metrics, all partitions and "
        "families together (what does not fit is left out whole and counted in "
        "modelpulse_series_dropped); also bounds the model versions one partition tracks.",
    )
    snapshot_interval: str = Field("5s", description="How often state is snapshotted + committed.")
    idle_timeout: str = Field(
        "30s", description="A partition without events this long gets a watermark marker."
    )
    batch_size: int = Field(20_000, ge=1, le=1_000_000, description="Messages per consume call.")
    render_interval: str = Field("1s", description="Least time between two /metrics renders.")
    rebuild_state: bool = Field(
        False, description="Ignore snapshots made with another config (windows restart empty)."
    )
    shard_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="Name of this shard in logs and markers.",
    )
    web_config_file: str | None = Field(
        None,
        description="exporter-toolkit web config (YAML: tls_server_config, basic_auth_users "
        "with bcrypt hashes) protecting /metrics, /healthz and /readyz.",
    )

    @field_validator(
        "pane",
        "lateness",
        "max_future",
        "snapshot_interval",
        "idle_timeout",
        "render_interval",
        "drift_reference",
    )
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration_ms(value)
        return value

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: str) -> str:
        if not [parse_duration_ms(w) for w in value.split(",") if w.strip()]:
            raise ValueError("at least one window")
        return value

    @field_validator("latency_buckets", "error_buckets", "score_buckets")
    @classmethod
    def _buckets(cls, value: str) -> str:
        try:
            bounds = _floats(value)
        except ValueError:
            raise ValueError(f"{value!r}: comma-separated numbers expected") from None
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError("bucket bounds must be strictly increasing")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AggregatorSettings:
        try:
            self.state_config()  # raises ValueError naming the field
        except OSError as exc:
            raise ValueError(f"drift_reference_file: {exc}") from None
        self.schema_registry()  # raises ValueError naming the field
        return self

    def schema_registry(self) -> SchemaRegistry | None:
        """The registry client, or None when no ``schema_registry_url`` is set."""
        if not self.schema_registry_url and (
            self.schema_registry_user or self.schema_registry_ca_file
        ):
            raise ValueError("schema_registry_user/ca_file given without schema_registry_url")
        return self.registry_client()

    def state_config(self) -> StateConfig:
        """The part of the settings that shapes state (hashed into snapshots)."""
        windows = tuple(parse_duration_ms(w) for w in self.windows.split(",") if w.strip())
        per_mv = self._series_per_model_version(len(windows))
        limits = Limits(
            max_models=self.max_models,
            max_versions_per_model=self.max_versions_per_model,
            max_classes=self.max_classes,
            max_features=self.max_features,
            max_segments=self.max_segments,
            max_model_versions=max(2, self.max_series // per_mv),
        )
        return StateConfig(
            pane_ms=parse_duration_ms(self.pane),
            windows_ms=windows,
            lateness_ms=parse_duration_ms(self.lateness),
            max_future_ms=parse_duration_ms(self.max_future),
            latency_bounds=_floats(self.latency_buckets),
            score_bounds=_floats(self.score_buckets),
            error_bounds=_floats(self.error_buckets),
            drift_reference_ms=parse_duration_ms(self.drift_reference),
            limits=limits,
            reference_samples=load_reference_file(self.drift_reference_file)
            if self.drift_reference_file
            else (),
            max_name_length=self.max_name_length,
            max_rows_per_envelope=self.max_rows_per_envelope,
        )

    def _series_per_model_version(self, n_windows: int) -> int:
        """Worst-case sample lines of one model version: ``max_series`` over it bounds the
        model versions a partition tracks (memory). The shard-wide cap on lines is
        applied at render time (``build_families(max_series=...)``)."""
        c, f, s = self.max_classes, self.max_features, self.max_segments
        hist = sum(
            len(_floats(b)) + 3
            for b in (self.latency_buckets, self.score_buckets, self.error_buckets)
        )
        # ... + per segment: labelled rows and 3 counts a class (a regressor's 3 are fewer).
        # ... + model_drift_reference_info.
        cumulative = 4 + 3 + 2 + 2 + c * c + s + hist + 2 * CALIBRATION_BINS + s * (1 + 3 * c) + 1
        # ... + ECE, Brier, estimated accuracy and its gap + drift: at most 4 methods
        # (psi, js, ks, wasserstein) x (score, prediction, each feature).
        per_window = 3 + 3 + 2 + 1 + 5 * (c + 1) + 4 + 4 * (f + 2)
        return cumulative + n_windows * per_window

    def kafka_config(self) -> dict[str, Any]:
        """librdkafka settings shared by the shard's consumer and producer."""
        return self.librdkafka_config()

    @property
    def snapshot_interval_seconds(self) -> float:
        return parse_duration_ms(self.snapshot_interval) / 1000

    @property
    def idle_timeout_ms(self) -> int:
        return parse_duration_ms(self.idle_timeout)

    @property
    def render_interval_seconds(self) -> float:
        return parse_duration_ms(self.render_interval) / 1000
