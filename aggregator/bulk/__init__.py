"""Decode a consumed batch of framed ``PredictionEvent`` messages at once, with numpy.

The per-event wire format costs one fastavro call per message; this package reads all
the messages of a batch together instead. The bodies are joined into one byte buffer,
each record keeps a cursor, and a small program compiled once per writer schema
advances every cursor field by field: zigzag varints and doubles are gathered through
unaligned 8-byte views, union branches and map items are handled for all records that
take them at once, and strings become (start, length) pairs of which only the distinct
values are ever turned into ``str``; the ``event_id`` is never decoded, its
``schemas.event_id`` hash is computed straight from the buffer.

The result is exactly the ``RowChunk`` that ``EventChunkBuilder`` builds from the same
messages (same columns, dtypes and first-seen code order). Anything the compiler does
not understand, and every record the bulk pass cannot vouch for (a cursor past its
record's end, a bad union or enum index, a negative length, trailing bytes, invalid
UTF-8, a repeated map key), goes through the per-record path instead, so rejects carry
the same ``DecodeError`` reasons and details as before; if such a record turns out to
be fine for fastavro, the whole batch is decoded by the per-record path.

Modules: ``program`` (writer schema -> program), ``reader`` (the pass: buffer,
varints, spans), ``strings`` (interning), ``assemble`` (passes -> ``RowChunk``),
``decoder`` (``EventDecoder`` and the per-record reference).
"""

from aggregator.bulk.decoder import (
    MIN_BULK,
    EventDecoder,
    EventDecodeResult,
    decode_events_per_record,
)

__all__ = ["MIN_BULK", "EventDecodeResult", "EventDecoder", "decode_events_per_record"]
