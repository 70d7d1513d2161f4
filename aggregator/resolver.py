"""Schema ids -> writer and reader schemas, and framed message values -> Avro records.

``SchemaResolver`` is the one place that knows schema ids: the fixed ids of
``schemas/registry.json`` without a registry, registry ids (looked up once, cached,
backed off while the registry is down) with one. Pure apart from the registry client
it is given: no Kafka.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

from fastavro import parse_schema, schemaless_reader
from fastavro.read import SchemaResolutionError

from aggregator.errors import DecodeError
from schemas.registry import (
    RegistryError,
    RegistryUnavailable,
    SchemaNotFound,
    record_subject,
)
from schemas.wire import HEADER, MAGIC_BYTE, SchemaId, parsed_schema, raw_schema

__all__ = ["SchemaResolver", "SchemaSource"]

log = logging.getLogger("modelpulse.aggregator")

_KINDS: Final = {
    "io.modelpulse.PredictionEvent": SchemaId.PREDICTION_EVENT,
    "io.modelpulse.PredictionBatch": SchemaId.PREDICTION_BATCH,
    "io.modelpulse.ResourceHeartbeat": SchemaId.RESOURCE_HEARTBEAT,
    "io.modelpulse.LabelFeedback": SchemaId.LABEL_FEEDBACK,
    "io.modelpulse.WatermarkMarker": SchemaId.WATERMARK_MARKER,
    "io.modelpulse.DriftReference": SchemaId.DRIFT_REFERENCE,
}


class SchemaSource(Protocol):
    """What ``SchemaResolver`` needs of a registry (``schemas.registry.SchemaRegistry``)."""

    def schema(self, schema_id: int) -> dict[str, Any]: ...

    def register(self, subject: str, schema: dict[str, Any]) -> int: ...


class SchemaResolver:
    """Schema id -> (kind, writer schema, reader schema or None).

    Without a registry the ids are the fixed ones of ``schemas/registry.json``. With a
    registry, ids are *only* registry ids (the fixed ids never shadow them): an id not
    seen yet is looked up once, and the writer schema's full record name decides the
    kind, whatever subject it was registered under. A writer schema that differs from
    the current ``.avsc`` is read with Avro schema resolution against it (added fields
    with defaults are fine; a writer it cannot resolve is ``incompatible_schema``).

    Registry answers are cached: found ids for good (an id's schema never changes),
    ids the registry does not have (or that are not our records) for
    ``NEGATIVE_TTL_SECONDS``, at most ``NEGATIVE_MAX`` of them, so a flood of junk ids
    costs one lookup per id per TTL. When the registry gives no answer, the lookup is
    retried inline (``RETRY_DELAYS``), then every unknown id fails fast as
    ``schema_unavailable`` until a backoff (doubling from ``BACKOFF_MIN_SECONDS`` to
    ``BACKOFF_MAX_SECONDS``) has passed; ids already cached keep decoding throughout.
    """

    NEGATIVE_TTL_SECONDS: Final = 60.0
    NEGATIVE_MAX: Final = 10_000
    RETRY_DELAYS: Final = (0.25, 0.75)
    BACKOFF_MIN_SECONDS: Final = 1.0
    BACKOFF_MAX_SECONDS: Final = 30.0
    # Dead-letter reasons this class raises (besides ``undecodable``).
    REASONS: Final = ("unknown_schema", "incompatible_schema", "schema_unavailable")

    def __init__(
        self,
        registry: SchemaSource | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._registry = registry
        self._clock = clock
        self._sleep = sleep
        self._known: dict[int, tuple[int, Any, Any]] = {}
        self._missing: dict[int, tuple[float, str]] = {}  # id -> (expires, why)
        self._own: dict[int, int] = {}  # kind -> registry id of our own writes
        self._down_until = 0.0
        self._backoff = self.BACKOFF_MIN_SECONDS
        self.lookups = 0  # registry requests made (for tests and logs)
        if registry is None:
            for kind in SchemaId:
                self._known[int(kind)] = (int(kind), parsed_schema(kind), None)

    @property
    def registry(self) -> SchemaSource | None:
        return self._registry

    def writer_id(self, kind: SchemaId) -> int:
        """The id this process frames its own records of ``kind`` with.

        The fixed id without a registry; with one, the id the registry returns for the
        current ``.avsc`` under its record-name subject (raises ``RegistryError``).
        """
        if self._registry is None:
            return int(kind)
        found = self._own.get(int(kind))
        if found is None:
            raw = raw_schema(kind)
            found = self._registry.register(record_subject(raw), raw)
            self._own[int(kind)] = found
            self._known[found] = (int(kind), parsed_schema(kind), None)
        return found

    def resolve(self, schema_id: int) -> tuple[int, Any, Any]:
        """(kind, writer schema, reader schema or None) or raise ``DecodeError``."""
        found = self._known.get(schema_id)
        if found is not None:
            return found
        if self._registry is None:
            raise DecodeError("unknown_schema", f"schema id {schema_id} (no registry configured)")
        now = self._clock()
        missing = self._missing.get(schema_id)
        if missing is not None and missing[0] > now:
            raise DecodeError("unknown_schema", missing[1])
        if now < self._down_until:
            raise DecodeError(
                "schema_unavailable",
                f"schema id {schema_id}: registry unavailable, next try in "
                f"{self._down_until - now:.1f}s",
            )
        try:
            writer = self._fetch(schema_id)
        except SchemaNotFound as exc:
            self._remember_missing(schema_id, f"schema id {schema_id}: {exc}", now)
            raise DecodeError("unknown_schema", f"schema id {schema_id}: {exc}") from None
        except RegistryError as exc:
            self._down_until = self._clock() + self._backoff
            log.warning(
                "schema registry unavailable (schema id %d): %s; unknown ids are dead-lettered "
                "as schema_unavailable for %.0fs",
                schema_id,
                exc,
                self._backoff,
            )
            self._backoff = min(self._backoff * 2, self.BACKOFF_MAX_SECONDS)
            raise DecodeError(
                "schema_unavailable", f"schema id {schema_id}: registry unavailable: {exc}"
            ) from None
        self._backoff = self.BACKOFF_MIN_SECONDS
        try:
            parsed: Any = parse_schema(writer)
            name = str(parsed["name"])
        except Exception as exc:  # fastavro raises several types on a bad schema
            why = f"schema id {schema_id} is not a valid Avro record schema: {exc}"
            self._remember_missing(schema_id, why, now)
            raise DecodeError("unknown_schema", why) from None
        kind = _KINDS.get(name)
        if kind is None:
            why = f"schema id {schema_id} is {name}, not a modelpulse record"
            self._remember_missing(schema_id, why, now)
            raise DecodeError("unknown_schema", why)
        current = raw_schema(kind)
        reader = None if writer == current else parsed_schema(kind)
        found = (int(kind), parsed, reader)
        self._known[schema_id] = found
        log.info("schema id %d: %s%s", schema_id, name, "" if reader is None else " (resolved)")
        return found

    def _fetch(self, schema_id: int) -> dict[str, Any]:
        assert self._registry is not None
        for delay in (*self.RETRY_DELAYS, None):
            self.lookups += 1
            try:
                return self._registry.schema(schema_id)
            except RegistryUnavailable:
                if delay is None:
                    raise
                self._sleep(delay)
        raise AssertionError("unreachable")

    def _remember_missing(self, schema_id: int, why: str, now: float) -> None:
        missing = self._missing
        if len(missing) >= self.NEGATIVE_MAX:
            for sid in [s for s, (expires, _w) in missing.items() if expires <= now]:
                del missing[sid]
            while len(missing) >= self.NEGATIVE_MAX:
                del missing[next(iter(missing))]  # the oldest entry
        missing.pop(schema_id, None)
        missing[schema_id] = (now + self.NEGATIVE_TTL_SECONDS, why)
        log.warning(
            "dead-lettering schema id %d for %.0fs: %s", schema_id, self.NEGATIVE_TTL_SECONDS, why
        )

    def read(self, value: bytes | None) -> tuple[int, dict[str, Any]]:
        """Unframe and decode one message value into (kind, record)."""
        if value is None or len(value) < HEADER.size:
            raise DecodeError("truncated", "shorter than the 5-byte Confluent header")
        magic, schema_id = HEADER.unpack_from(value)
        if magic != MAGIC_BYTE:
            raise DecodeError("bad_magic", f"magic byte {magic}, expected 0")
        kind, writer, reader = self.resolve(schema_id)
        buf = io.BytesIO(value)
        buf.seek(HEADER.size)
        try:
            record = schemaless_reader(buf, writer, reader)
        except SchemaResolutionError as exc:
            raise DecodeError(
                "incompatible_schema",
                f"schema id {schema_id} cannot be read as the current {writer['name']}: {exc}",
            ) from None
        except Exception as exc:  # fastavro raises many types on garbage
            raise DecodeError(
                "undecodable", f"schema id {schema_id}: {type(exc).__name__}: {exc}"
            ) from None
        if buf.tell() != len(value):
            raise DecodeError(
                "undecodable", f"schema id {schema_id}: {len(value) - buf.tell()} trailing bytes"
            )
        if not isinstance(record, dict):
            raise DecodeError("undecodable", "not a record")
        return kind, record
