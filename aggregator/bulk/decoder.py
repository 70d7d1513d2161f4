"""The public door of bulk decoding: ``EventDecoder`` and its per-record reference."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from aggregator.bulk.assemble import Group, assemble, collect
from aggregator.bulk.program import Program, Unsupported, compile_program
from aggregator.bulk.reader import PAD, ZEROS, Buf, Run
from aggregator.bulk.strings import Strings
from aggregator.decode import EventChunkBuilder
from aggregator.errors import DecodeError
from aggregator.resolver import SchemaResolver
from aggregator.state.columns import RowChunk
from schemas.wire import HEADER, MAGIC_BYTE, SchemaId

__all__ = ["MIN_BULK", "EventDecodeResult", "EventDecoder", "decode_events_per_record"]

# Below this many messages, fastavro record by record is as fast (measured: break-even
# near 100 events; bench/bench_decode.py prints both per batch size).
MIN_BULK: Final = 128


@dataclass(frozen=True, slots=True)
class EventDecodeResult:
    """Rows of the accepted messages, plus (index into the values, error) per reject."""

    chunk: RowChunk
    rejected: list[tuple[int, DecodeError]]
    bulk: bool  # False: the per-record path decoded the whole batch


def decode_events_per_record(
    values: Sequence[bytes | None], offsets: Sequence[int] | np.ndarray, resolver: SchemaResolver
) -> EventDecodeResult:
    """The reference path: fastavro record by record into an ``EventChunkBuilder``.

    It is what the shard does with per-event messages; ``EventDecoder`` falls back to it.
    """
    builder = EventChunkBuilder()
    rejected: list[tuple[int, DecodeError]] = []
    read = resolver.read
    offs = offsets.tolist() if isinstance(offsets, np.ndarray) else list(offsets)
    for i, (value, off) in enumerate(zip(values, offs, strict=True)):
        try:
            kind, rec = read(value)
            if kind != SchemaId.PREDICTION_EVENT:
                raise ValueError(f"values[{i}] is not a PredictionEvent (schema kind {kind})")
            try:
                builder.add(rec, off)
            except (KeyError, TypeError) as exc:
                raise DecodeError("undecodable", f"bad record: {exc}") from None
        except DecodeError as exc:
            rejected.append((i, exc))
    return EventDecodeResult(builder.build(), rejected, bulk=False)


class EventDecoder:
    """Decode the ``PredictionEvent`` messages of one consumed batch at once.

    >>> from aggregator.decode import SchemaResolver
    >>> from schemas.wire import frame
    >>> decoder = EventDecoder(SchemaResolver(), min_bulk=0)
    >>> body = bytes([0, 2, 2, 109, 0]) + bytes(8) + bytes([0, 0, 0, 0, 0, 0, 0, 0])
    >>> result = decoder.decode([frame(1, body)], [42])
    >>> result.chunk.mv_keys, result.chunk.offset.tolist(), result.bulk
    ([('m', '')], [42], True)
    """

    def __init__(self, resolver: SchemaResolver, *, min_bulk: int = MIN_BULK) -> None:
        if min_bulk < 0:
            raise ValueError(f"min_bulk must be >= 0, got {min_bulk}")
        self._resolver = resolver
        self._min_bulk = min_bulk
        self._programs: dict[int, Program | None] = {}

    def program(self, schema_id: int) -> Program | None:
        """The compiled program of a writer schema id (None: decode it per record).

        Raises ``DecodeError`` when the id cannot be resolved (not cached: it may be
        registered later).
        """
        if schema_id in self._programs:
            return self._programs[schema_id]
        kind, writer, reader = self._resolver.resolve(schema_id)
        if kind != SchemaId.PREDICTION_EVENT:
            raise ValueError(f"schema id {schema_id} is not a PredictionEvent schema")
        try:
            program: Program | None = compile_program(writer, reader)
        except (Unsupported, KeyError, TypeError, ValueError):
            program = None
        self._programs[schema_id] = program
        return program

    def decode(
        self, values: Sequence[bytes | None], offsets: Sequence[int] | np.ndarray
    ) -> EventDecodeResult:
        """Decode framed ``PredictionEvent`` values; ``offsets`` are their Kafka offsets.

        Equal to ``decode_events_per_record`` on the same input, which it uses for fewer
        than ``min_bulk`` values and for writer schemas it cannot compile. Raises
        ``ValueError`` for a message of another kind that decodes (the caller splits its
        batch by kind first).
        """
        n = len(values)
        offs = np.asarray(offsets, dtype=np.int64)
        if offs.shape != (n,):
            raise ValueError(f"{n} values but {offs.shape[0]} offsets")
        if n < self._min_bulk:  # a pass costs ~0.5 ms whatever the count
            return decode_events_per_record(values, offs, self._resolver)
        if not n:
            return EventDecodeResult(EventChunkBuilder().build(), [], bulk=True)
        try:
            padded = b"".join([*values, ZEROS])  # type: ignore[list-item]  # None: below
            present: Sequence[bytes] = values  # type: ignore[assignment]
        except TypeError:  # a tombstone: read() rejects it as truncated, like b""
            present = [b"" if v is None else v for v in values]
            padded = b"".join([*present, ZEROS])
        lens = np.fromiter(map(len, present), dtype=np.int64, count=n)
        buf = Buf(padded)
        size = len(padded) - PAD
        end = np.cumsum(lens)
        start = end - lens
        framed = lens >= HEADER.size
        first = np.minimum(start, size)
        magic = buf.u8[first]
        sid = (
            (buf.u8[first + 1].astype(np.int64) << 24)
            | (buf.u8[first + 2].astype(np.int64) << 16)
            | (buf.u8[first + 3].astype(np.int64) << 8)
            | buf.u8[first + 4].astype(np.int64)
        )
        framed &= magic == MAGIC_BYTE
        suspect = ~framed
        strings = Strings(padded)
        groups: list[Group] = []
        rejected: list[tuple[int, DecodeError]] = []
        for schema_id in np.unique(sid[framed]).tolist():
            members = np.flatnonzero(framed & (sid == schema_id))
            try:
                program = self.program(int(schema_id))
            except DecodeError as exc:
                # This lookup was the first message's; the others look up again in
                # read(), as they would one by one (the resolver caches or backs off).
                rejected.append((int(members[0]), exc))
                suspect[members[1:]] = True
                continue
            except ValueError:
                # Another kind (a corrupt id, say): read() says whether the message
                # decodes (then the caller sent a non-event: ValueError) or is rejected.
                suspect[members] = True
                continue
            if program is None:
                return decode_events_per_record(values, offs, self._resolver)
            run = Run(buf, start[members] + HEADER.size, end[members])
            run.run(program)
            group = collect(run, program, strings, members)
            suspect[members[run.bad]] = True
            groups.append(group)
        read = self._resolver.read
        for i in np.flatnonzero(suspect).tolist():
            try:
                kind, _rec = read(values[i])
            except DecodeError as exc:
                rejected.append((i, exc))
                continue
            if kind != SchemaId.PREDICTION_EVENT:
                raise ValueError(f"values[{i}] is not a PredictionEvent (schema kind {kind})")
            # fastavro takes a record the bulk pass would not vouch for: let it do all.
            return decode_events_per_record(values, offs, self._resolver)
        rejected.sort(key=lambda item: item[0])
        if not groups:
            return EventDecodeResult(EventChunkBuilder().build(), rejected, bulk=True)
        return EventDecodeResult(assemble(groups, offs, strings), rejected, bulk=True)
