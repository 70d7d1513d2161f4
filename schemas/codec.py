"""Encoders of single records, shared by the producer, the aggregator and the tests.

One place for how a record becomes Confluent-framed bytes, so what the shards write
(watermark markers) and what the producer writes go through the same code.

>>> from schemas.wire import SchemaId, unframe
>>> unframe(encode_marker(5_000, "shard-0"))[0] == SchemaId.WATERMARK_MARKER
True
"""

from __future__ import annotations

import io
from typing import Final

from fastavro import schemaless_writer

from schemas.wire import SchemaId, frame, parsed_schema

__all__ = ["MARKER_GROUP_HEADER", "encode_marker"]

# Header naming the consumer group whose shard wrote a marker: a shard trusts only its
# own group's markers (anyone can produce to the topic; see RELIABILITY.md).
MARKER_GROUP_HEADER: Final = "modelpulse.marker.group"


def encode_marker(
    event_time_ms: int, origin: str, schema_id: int = SchemaId.WATERMARK_MARKER
) -> bytes:
    """A framed ``WatermarkMarker``; ``schema_id`` is the registry's id when one is used."""
    out = io.BytesIO()
    schemaless_writer(
        out,
        parsed_schema(SchemaId.WATERMARK_MARKER),
        {"event_time_ms": event_time_ms, "origin": origin},
    )
    return frame(schema_id, out.getvalue())
