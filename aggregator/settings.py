"""Settings of an aggregator shard: one pydantic-settings model, env prefix ``MODELPULSE_``.

Read once in the entry point (environment, then command-line flags win); the rest
of the package takes the validated object, whose durations are already milliseconds
and whose bucket lists are tuples (``Duration``, ``Durations``, ``Bounds``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Annotated, Any, Final

from pydantic import AfterValidator, BeforeValidator, Field, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from aggregator.catalog import Limits
from aggregator.durations import format_duration, parse_duration_ms
from aggregator.join.joiner import JoinLimits
from aggregator.state import StateConfig, load_reference_file
from aggregator.state.measures import lines_per_model_version
from schemas.connection import KafkaConnection, RegistryConnection
from schemas.registry import SchemaRegistry

__all__ = ["AggregatorSettings", "Bounds", "Duration", "Durations", "parse_duration_ms", "shown"]

# The defaults of what shapes state live with it (StateConfig, Limits), so a test that
# builds a StateConfig() and a shard started without flags agree; the settings read them.
_STATE: Final = StateConfig()
_JOIN: Final = JoinLimits()
_LIMITS: Final = Limits()


@dataclass(frozen=True, slots=True)
class _Shown:
    """How ``--help`` writes a typed value back as the text a flag takes."""

    text: Callable[[Any], str]


def shown(field: FieldInfo, value: Any) -> str:
    """``value`` of ``field`` as its flag would take it: 10000 -> "10s" for a Duration."""
    marks = [m for m in field.metadata if isinstance(m, _Shown)]
    return marks[0].text(value) if marks else str(value)


def _duration(value: Any) -> Any:
    # Text is parsed; an int is already milliseconds (the typed value, as dumped).
    return parse_duration_ms(value) if isinstance(value, str) else value


def _durations(value: Any) -> Any:
    if isinstance(value, str):
        value = [w for w in value.split(",") if w.strip()]
    if isinstance(value, list | tuple):
        return tuple(_duration(w) for w in value)
    return value


def _bounds_text(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{value!r}: comma-separated numbers expected") from None


def _increasing(bounds: tuple[float, ...]) -> tuple[float, ...]:
    if not bounds or list(bounds) != sorted(set(bounds)):
        raise ValueError("bucket bounds must be strictly increasing")
    return bounds


def _some(windows: tuple[int, ...]) -> tuple[int, ...]:
    if not windows:
        raise ValueError("at least one window")
    return windows


# Parsed once, at validation: flags and environment variables take text ("10s",
# "1m,5m,1h", "0.1,0.5"), the rest of the code reads milliseconds and tuples. NoDecode:
# the environment's text goes to the parser, not to JSON.
Duration = Annotated[int, BeforeValidator(_duration), Field(ge=0), _Shown(format_duration)]
"""Milliseconds; text is "500ms", "10s", "5m", "1h", "1d" or a bare number of seconds."""
Durations = Annotated[
    tuple[int, ...],
    NoDecode,
    BeforeValidator(_durations),
    AfterValidator(_some),
    _Shown(lambda ms: ",".join(map(format_duration, ms))),
]
"""Milliseconds, one or more; text is comma-separated durations ("1m,5m,1h")."""
Bounds = Annotated[
    tuple[float, ...],
    NoDecode,
    BeforeValidator(_bounds_text),
    AfterValidator(_increasing),
    _Shown(lambda bounds: ",".join(format(b, "g") for b in bounds)),
]
"""Strictly increasing histogram upper bounds; text is comma-separated ("0.1,0.5,1")."""


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
    feedback_topic: str = Field(
        "",
        description="Topic of labels sent later by event id (PredictionPublisher.label, "
        "modelpulse-labels; e.g. prediction-feedback), co-partitioned with --input-topic; "
        "empty: no join, only labels given at publish() count.",
    )
    label_ttl: Duration = Field(
        _JOIN.ttl_ms,
        description="How long (prediction event time) a prediction waits for its label.",
    )
    label_wait: Duration = Field(
        _JOIN.wait_ms,
        description="How long (prediction event time) a label that came before its "
        "prediction waits for it.",
    )
    max_pending: int = Field(
        _JOIN.max_pending,
        ge=1,
        description="Predictions waiting for a label, per partition (~48 bytes each); "
        "beyond, the oldest are evicted and counted.",
    )
    label_models: str = Field(
        "",
        description="Comma-separated models whose predictions wait for late labels "
        "(empty: every model with event ids); the others take no join memory.",
    )
    label_coverage_age: Duration = Field(
        _JOIN.coverage_age_ms,
        description="model_label_coverage counts a prediction still without its label "
        "as not covered once it is this old (set it past the usual label delay).",
    )
    max_early_labels: int = Field(
        _JOIN.max_early, ge=1, description="Labels waiting for their prediction, per partition."
    )
    http_host: str = Field("0.0.0.0", description="Address of /metrics, /healthz, /readyz.")
    http_port: int = Field(9464, ge=0, le=65535, description="Port of this shard's endpoints.")
    pane: Duration = Field(_STATE.pane_ms, description="Tumbling pane size (event time).")
    windows: Durations = Field(
        _STATE.windows_ms, description="Sliding windows, multiples of the pane."
    )
    lateness: Duration = Field(
        _STATE.lateness_ms, description="Allowed lateness before a pane closes."
    )
    max_future: Duration = Field(
        _STATE.max_future_ms,
        description="Events (and markers) further ahead than this of min(their Kafka "
        "timestamp, the shard's clock at ingest) are rejected.",
    )
    latency_buckets: Bounds = Field(
        _STATE.latency_bounds, description="Upper bounds (seconds) of the latency histogram."
    )
    error_buckets: Bounds = Field(
        _STATE.error_bounds,
        description="Upper bounds of the regression prediction-error histogram.",
    )
    score_buckets: Bounds = Field(
        _STATE.score_bounds, description="Upper bounds of the score histogram."
    )
    drift_reference: Duration = Field(
        _STATE.drift_reference_ms,
        description="Drift reference: the first full window of this length per version.",
    )
    drift_reference_file: str | None = Field(
        None,
        description="JSON file of reference sample values per model (score, prediction, "
        "features); models without an entry use the first full window.",
    )
    max_models: int = Field(
        _LIMITS.max_models, ge=1, description="Models per partition; more fold into __overflow__."
    )
    max_versions_per_model: int = Field(
        _LIMITS.max_versions_per_model, ge=1, description="Versions per model."
    )
    max_classes: int = Field(
        _LIMITS.max_classes, ge=2, le=256, description="Classes per model (incl. overflow)."
    )
    max_features: int = Field(
        _LIMITS.max_features, ge=1, le=128, description="Monitored features per model."
    )
    max_segments: int = Field(
        _LIMITS.max_segments, ge=1, le=256, description="Segment values per model."
    )
    max_name_length: int = Field(
        _STATE.max_name_length,
        ge=1,
        le=65536,
        description="Longest model/version/class/feature/segment/service name (characters); "
        "longer ones are dead-lettered as name_too_long.",
    )
    max_rows_per_envelope: int = Field(
        _STATE.max_rows_per_envelope,
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
    snapshot_interval: Duration = Field(
        5000, description="How often state is snapshotted + committed."
    )
    idle_timeout: Duration = Field(
        30_000, description="A partition without events this long gets a watermark marker."
    )
    batch_size: int = Field(20_000, ge=1, le=1_000_000, description="Messages per consume call.")
    render_interval: Duration = Field(1000, description="Least time between two /metrics renders.")
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
        """The part of the settings that shapes state (hashed into snapshots).

        ``max_series`` over the worst-case sample lines of one model version (summed
        from the measure table, ``lines_per_model_version``) bounds the model versions a
        partition tracks (memory); the shard-wide cap on lines is applied at render time
        (``build_families(max_series=...)``).
        """
        limits = Limits(
            max_models=self.max_models,
            max_versions_per_model=self.max_versions_per_model,
            max_classes=self.max_classes,
            max_features=self.max_features,
            max_segments=self.max_segments,
        )
        config = StateConfig(
            pane_ms=self.pane,
            windows_ms=self.windows,
            lateness_ms=self.lateness,
            max_future_ms=self.max_future,
            latency_bounds=self.latency_buckets,
            score_bounds=self.score_buckets,
            error_bounds=self.error_buckets,
            drift_reference_ms=self.drift_reference,
            limits=limits,
            reference_samples=load_reference_file(self.drift_reference_file)
            if self.drift_reference_file
            else (),
            max_name_length=self.max_name_length,
            max_rows_per_envelope=self.max_rows_per_envelope,
            join=JoinLimits(
                ttl_ms=self.label_ttl,
                wait_ms=self.label_wait,
                max_pending=self.max_pending,
                max_early=self.max_early_labels,
                max_seen=self.max_pending,
                coverage_age_ms=self.label_coverage_age,
                models=frozenset(m.strip() for m in self.label_models.split(",") if m.strip()),
            )
            if self.feedback_topic
            else None,
        )
        per_mv = self._series_per_model_version(len(self.windows), config)
        most = max(2, self.max_series // per_mv)
        return replace(config, limits=replace(limits, max_model_versions=most))

    def _series_per_model_version(self, n_windows: int, config: StateConfig | None = None) -> int:
        """Worst-case sample lines of one model version (the measure table's sum)."""
        return lines_per_model_version(config or self.state_config(), n_windows)

    def kafka_config(self) -> dict[str, Any]:
        """librdkafka settings shared by the shard's consumer and producer."""
        return self.librdkafka_config()

    @property
    def snapshot_interval_seconds(self) -> float:
        return self.snapshot_interval / 1000

    @property
    def idle_timeout_ms(self) -> int:
        return self.idle_timeout

    @property
    def render_interval_seconds(self) -> float:
        return self.render_interval / 1000
