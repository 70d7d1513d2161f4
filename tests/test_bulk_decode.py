"""Bulk per-event decoding equals fastavro record by record (pure: no broker).

Every test decodes the same framed values twice, with ``EventDecoder`` and with the
per-record reference path (``SchemaResolver.read`` + ``EventChunkBuilder``), and
compares the chunks column by column (dtype, NaN-aware values, dictionaries in code
order) and the rejects (index, reason, detail).
"""

from __future__ import annotations

import copy
import io
import math
import random
import re
import struct
from typing import Any

import numpy as np
import pytest
from fastavro import parse_schema, schemaless_writer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.bulk import (
    MIN_BULK,
    EventDecoder,
    EventDecodeResult,
    decode_events_per_record,
)
from aggregator.decode import EventChunkBuilder, RowChunk, SchemaResolver
from producer.encode import Row, encode_batch
from schemas.registry import SchemaNotFound
from schemas.wire import OUTCOMES, SchemaId, frame, parsed_schema, raw_schema

EVENT = int(SchemaId.PREDICTION_EVENT)
I64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
DOUBLES = st.floats(allow_nan=True, allow_infinity=True)
TEXT = st.text(max_size=12)  # any code point but surrogates: empty, ASCII, multi-byte
# Few distinct values so dictionaries see repeats, plus strings past the word-view limit.
WORDS = st.one_of(st.sampled_from(["", "a", "cat", "dög", "猫", "a\x00", "x" * 70, "é" * 40]), TEXT)
ADDRESS = re.compile(r" at 0x[0-9a-f]+")
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Registry:
    """Stands in for ``SchemaRegistry.schema`` (the resolver calls nothing else)."""

    def __init__(self, schemas: dict[int, dict[str, Any]]) -> None:
        self.schemas = schemas

    def schema(self, schema_id: int) -> dict[str, Any]:
        try:
            return self.schemas[schema_id]
        except KeyError:
            raise SchemaNotFound(f"no schema {schema_id}") from None

    def register(self, subject: str, schema: dict[str, Any]) -> int:
        raise AssertionError("the decoder never registers")


def compare(values: list[bytes | None], resolver: SchemaResolver) -> EventDecodeResult:
    """Decode both ways, assert equality, return the bulk result."""
    offsets = np.arange(1000, 1000 + len(values), dtype=np.int64)
    try:
        ref = decode_events_per_record(values, offsets, resolver)
    except ValueError:  # a corrupt id that names another kind, and decodes as one
        with pytest.raises(ValueError, match="not a PredictionEvent"):
            EventDecoder(resolver, min_bulk=0).decode(values, offsets)
        return EventDecodeResult(EventChunkBuilder().build(), [], bulk=False)
    got = EventDecoder(resolver, min_bulk=0).decode(values, offsets)
    assert rejects(got) == rejects(ref)
    assert_same_chunk(got.chunk, ref.chunk)
    return got


def rejects(result: EventDecodeResult) -> list[tuple[int, str, str]]:
    # fastavro's messages may name a BytesIO by its address: the one detail that differs.
    return [(i, e.reason, ADDRESS.sub("", e.detail)) for i, e in result.rejected]


def assert_same_chunk(a: RowChunk, b: RowChunk) -> None:
    for name in RowChunk.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(y, np.ndarray):
            assert isinstance(x, np.ndarray), name
            assert x.dtype == y.dtype, (name, x.dtype, y.dtype)
            assert x.shape == y.shape, (name, x.shape, y.shape)
            assert np.array_equal(x, y, equal_nan=y.dtype.kind == "f"), (name, x, y)
        else:
            assert x == y, (name, x, y)


def encode(record: dict[str, Any], schema: Any = None, schema_id: int = EVENT) -> bytes:
    out = io.BytesIO()
    schemaless_writer(out, schema if schema is not None else parsed_schema(EVENT), record)
    return frame(schema_id, out.getvalue())


@st.composite
def events(draw: Any) -> dict[str, Any]:
    """A PredictionEvent record: nulls in every optional field, both union branches."""
    value = st.one_of(st.none(), WORDS, DOUBLES)
    return {
        "event_id": draw(TEXT),
        "event_time_ms": draw(I64),
        "model": draw(st.sampled_from(["m1", "m2", "модель", ""])),
        "model_version": draw(st.sampled_from(["", "v1", "v2"])),
        "latency_seconds": draw(DOUBLES),
        "outcome": draw(st.sampled_from(OUTCOMES)),
        "prediction": draw(value),
        "score": draw(st.one_of(st.none(), DOUBLES)),
        "label": draw(value),
        "segment": draw(st.one_of(st.none(), WORDS)),
        "features": draw(st.dictionaries(WORDS, DOUBLES, max_size=5)),
        "service": draw(TEXT),
        "instance": draw(st.one_of(TEXT, st.just("i" * 100))),
    }


# -- the current schema ---------------------------------------------------------------


@SETTINGS
@given(st.lists(events(), max_size=40))
def test_equal_to_fastavro(records: list[dict[str, Any]]) -> None:
    got = compare([encode(r) for r in records], SchemaResolver())
    assert got.bulk
    assert len(got.chunk) == len(records)


def test_columns_and_codes_by_example() -> None:
    """Codes in first-seen order; a regression key from its first informative row."""
    base = {"event_id": "", "event_time_ms": 5, "latency_seconds": 0.5, "outcome": "ok"}
    base |= {"score": None, "segment": None, "features": {}, "service": "", "instance": ""}
    records = [
        base | {"model": "b", "model_version": "1", "prediction": None, "label": "dog"},
        base | {"model": "a", "model_version": "1", "prediction": 2.5, "label": None},
        base | {"model": "b", "model_version": "1", "prediction": "cat", "label": "dog"},
        base | {"model": "b", "model_version": "2", "prediction": None, "label": None},
        base | {"model": "a", "model_version": "1", "prediction": None, "label": None},
    ]
    records[2]["features"] = {"z": 1.0, "y": -0.0}
    records[4]["features"] = {"y": 3.0, "x": math.inf}
    records[3]["segment"] = "eu"
    chunk = compare([encode(r) for r in records], SchemaResolver()).chunk
    assert chunk.mv_keys == [("b", "1"), ("a", "1"), ("b", "2")]
    assert chunk.regression == [False, True, None]
    assert chunk.classes == ["dog", "cat"]
    assert chunk.pred_code.tolist() == [-1, -1, 1, -1, -1]
    assert chunk.label_code.tolist() == [0, -1, 0, -1, -1]
    assert chunk.feature_names == ["z", "y", "x"]
    assert chunk.feat_row.tolist() == [2, 2, 4, 4]
    assert chunk.feat_code.tolist() == [0, 1, 1, 2]
    assert chunk.segments == ["eu"]
    assert chunk.offset.tolist() == [1000, 1001, 1002, 1003, 1004]


# -- evolved writers ------------------------------------------------------------------

EXTRA_TYPES: list[tuple[Any, Any, Any]] = [
    # (type, default, strategy of values)
    (["null", "string"], None, st.one_of(st.none(), TEXT)),
    ("int", 0, st.integers(-(2**31), 2**31 - 1)),
    ("long", 0, I64),
    ("boolean", False, st.booleans()),
    ("float", 0.0, st.floats(width=32)),
    ("bytes", "", st.binary(max_size=10)),
    ({"type": "array", "items": "string"}, [], st.lists(TEXT, max_size=3)),
    ({"type": "map", "values": ["null", "long"]}, {}, st.dictionaries(TEXT, st.none() | I64)),
    ({"type": "fixed", "name": "Tag", "size": 3}, "\u0000" * 3, st.binary(min_size=3, max_size=3)),
    (
        {"type": "enum", "name": "Color", "symbols": ["red", "green"]},
        "red",
        st.sampled_from(["red", "green"]),
    ),
    (
        {
            "type": "record",
            "name": "Inner",
            "fields": [{"name": "x", "type": "long"}, {"name": "y", "type": ["null", "string"]}],
        },
        {"x": 0, "y": None},
        st.fixed_dictionaries({"x": I64, "y": st.none() | TEXT}),
    ),
]
DROPPABLE = ["event_id", "model_version", "outcome", "prediction", "score", "label", "segment",
             "features", "service", "instance"]  # fmt: skip


@st.composite
def evolved(draw: Any) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """A writer schema: some optional fields missing (an older writer), new optional
    fields anywhere (a newer one), maybe a new outcome symbol, maybe union branches in
    another order; plus the value strategy of each added field."""
    schema = copy.deepcopy(raw_schema(EVENT))
    fields = [
        f for f in schema["fields"] if f["name"] not in draw(st.sets(st.sampled_from(DROPPABLE)))
    ]
    added: list[tuple[str, Any]] = []
    for k, idx in enumerate(draw(st.lists(st.integers(0, len(EXTRA_TYPES) - 1), max_size=4))):
        typ, default, values = EXTRA_TYPES[idx]
        typ = copy.deepcopy(typ)
        if isinstance(typ, dict) and "name" in typ:
            typ["name"] = f"{typ['name']}{k}"
        name = f"extra_{k}"
        fields.insert(
            draw(st.integers(0, len(fields))), {"name": name, "type": typ, "default": default}
        )
        added.append((name, values))
    for f in fields:
        if f["name"] == "outcome" and draw(st.booleans()):
            f["type"]["symbols"] = [*f["type"]["symbols"], "cancelled"]
        if f["name"] in ("prediction", "label") and draw(st.booleans()):
            f["type"] = ["null", "double", "string"]
    schema["fields"] = fields
    return schema, added


def evolved_values(data: Any) -> tuple[list[bytes], SchemaResolver]:
    """Values of an evolved writer (id 77), the current one (78) and a fixed-id one."""
    schema, added = data.draw(evolved())
    parsed = parse_schema(schema)
    names = {f["name"] for f in schema["fields"]}
    symbols = next((f["type"]["symbols"] for f in schema["fields"] if f["name"] == "outcome"), [])
    values = []
    for drawn in data.draw(st.lists(events(), max_size=25)):
        record = {k: v for k, v in drawn.items() if k in names}
        if "outcome" in record:
            record["outcome"] = data.draw(st.sampled_from(symbols))
        for name, strategy in added:
            record[name] = data.draw(strategy)
        values.append(encode(record, parsed, 77))
    # Also the current schema under a registry id, and a fixed-id message between.
    values.append(encode(data.draw(events()), parsed_schema(EVENT), 78))
    values.insert(0, encode(data.draw(events())))
    resolver = SchemaResolver(
        Registry({EVENT: raw_schema(EVENT), 77: schema, 78: raw_schema(EVENT)})
    )
    return values, resolver


@SETTINGS
@given(st.data())
def test_evolved_writers(data: Any) -> None:
    values, resolver = evolved_values(data)
    assert compare(values, resolver).bulk


@SETTINGS
@given(st.data(), st.integers(0, 2**32))
def test_evolved_writers_corrupt(data: Any, seed: int) -> None:
    """Corrupt added fields too (arrays, maps, unions, enums, fixed...): same split."""
    values, resolver = evolved_values(data)
    rnd = random.Random(seed)
    compare([corrupt(v, rnd) if rnd.random() < 0.5 else v for v in values], resolver)


def test_unsupported_writer_is_decoded_per_record() -> None:
    """A float latency (promoted to double by fastavro) is left to fastavro entirely."""
    schema = copy.deepcopy(raw_schema(EVENT))
    for f in schema["fields"]:
        if f["name"] == "latency_seconds":
            f["type"] = "float"
    record = {"event_time_ms": 1, "model": "m", "latency_seconds": 0.25}
    resolver = SchemaResolver(Registry({9: schema}))
    got = compare([encode(record, parse_schema(schema), 9)], resolver)
    assert not got.bulk
    assert got.chunk.latency_seconds.tolist() == [0.25]


# -- corrupt bytes --------------------------------------------------------------------


def corrupt(value: bytes, rnd: random.Random) -> bytes:
    cut = rnd.randrange(len(value) + 1)
    match rnd.randrange(5):
        case 0:
            return value[:cut]
        case 1:
            b = bytearray(value)
            for _ in range(rnd.randint(1, 3)):
                i = rnd.randrange(len(b))
                b[i] ^= 1 << rnd.randrange(8)
            return bytes(b)
        case 2:
            return (
                value[:cut]
                + bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 4)))
                + value[cut:]
            )
        case 3:
            return value + b"\x00"
        case _:
            return value[:cut] + b"\xff" * 11 + value[cut:]  # an endless varint


@SETTINGS
@given(st.lists(events(), min_size=1, max_size=30), st.integers(0, 2**32), st.floats(0, 1))
def test_corrupt_bytes_same_split_and_reasons(
    records: list[dict[str, Any]], seed: int, share: float
) -> None:
    rnd = random.Random(seed)
    values: list[bytes | None] = [
        corrupt(encode(r), rnd) if rnd.random() < share else encode(r) for r in records
    ]
    compare(values, SchemaResolver())


def test_header_failures() -> None:
    good = encode(
        {"event_time_ms": 1, "model": "m", "latency_seconds": 0.1, "event_id": "",
         "model_version": "", "outcome": "ok", "prediction": None, "score": None, "label": None,
         "segment": None, "features": {}, "service": "", "instance": ""}
    )  # fmt: skip
    values: list[bytes | None] = [good, b"", b"\x00\x00", b"\x01" + good[1:], good, None]
    values.append(b"\x00\x00\x00\x00\x63" + good[5:])  # unknown id, no registry
    values.append(good[:-1])
    got = compare(values, SchemaResolver())
    reasons = [e.reason for _i, e in got.rejected]
    assert reasons == ["truncated", "truncated", "bad_magic", "truncated", "unknown_schema",
                       "undecodable"]  # fmt: skip
    assert len(got.chunk) == 2
    assert got.bulk  # the tombstone (None) did not send the batch per record


def test_other_kinds() -> None:
    """A message of another kind is the caller's error, unless it is rejected anyway."""
    row = Row("m", "v", 1.0, 0.1, 0, "a", 0.5, "b", None, None, "")
    batch = encode_batch([row])
    with pytest.raises(ValueError, match="not a PredictionEvent"):
        EventDecoder(SchemaResolver(), min_bulk=0).decode([batch], [0])
    event = encode({"event_time_ms": 1, "model": "m", "latency_seconds": 0.1})
    broken = frame(int(SchemaId.WATERMARK_MARKER), event[5:])  # trailing bytes as a marker
    got = compare([event, broken, event], SchemaResolver())
    assert [(i, e.reason) for i, e in got.rejected] == [(1, "undecodable")]


def test_empty_batch() -> None:
    got = compare([], SchemaResolver())
    assert len(got.chunk) == 0
    assert got.rejected == []


# -- hand-written bytes ---------------------------------------------------------------


def zz(n: int) -> bytes:
    """An Avro long: zigzag, then base-128 varint."""
    u = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        b = u & 0x7F
        u >>= 7
        if u:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def text(s: str) -> bytes:
    raw = s.encode()
    return zz(len(raw)) + raw


def body(features: bytes, *, event_time: bytes = zz(7)) -> bytes:
    """A PredictionEvent body with the given encoding of the features map."""
    return (
        text("id") + event_time + text("m") + text("v") + struct.pack("<d", 0.5) + zz(0)
        + zz(1) + text("cat") + zz(1) + struct.pack("<d", 0.9) + zz(0) + zz(1) + text("eu")
        + features + text("svc") + text("i")
    )  # fmt: skip


def item(key: str, value: float) -> bytes:
    return text(key) + struct.pack("<d", value)


def test_multi_block_maps_with_byte_sizes() -> None:
    """Blocks with negative counts and byte sizes, as Java's block-writing encoders do."""
    two = item("a", 1.0) + item("b", 2.0)
    features = [
        zz(-2) + zz(len(two)) + two + zz(1) + item("c", 3.0) + zz(0),
        zz(1)
        + item("b", 4.0)
        + zz(-1)
        + zz(9)
        + item("d", 5.0)
        + zz(-1)
        + zz(0)
        + item("a", 6.0)
        + zz(0),
        zz(0),
        zz(-3) + zz(27) + item("x", 0.0) + item("y", -1.0) + item("z", math.nan) + zz(0),
    ]
    values = [frame(EVENT, body(f)) for f in features]
    got = compare(values, SchemaResolver())
    assert got.bulk
    assert got.chunk.feature_names == ["a", "b", "c", "d", "x", "y", "z"]
    assert got.chunk.feat_row.tolist() == [0, 0, 0, 1, 1, 1, 3, 3, 3]


def test_repeated_map_key_left_to_fastavro() -> None:
    """fastavro keeps the last value at the first key's place; the batch goes per record."""
    features = zz(2) + item("a", 1.0) + item("b", 2.0) + zz(1) + item("a", 3.0) + zz(0)
    got = compare([frame(EVENT, body(zz(0))), frame(EVENT, body(features))], SchemaResolver())
    assert not got.bulk
    assert got.chunk.feat_value.tolist() == [3.0, 2.0]


def test_long_varints() -> None:
    """Extreme longs (10-byte varints) and non-canonical encodings fastavro accepts."""
    times = [zz(2**63 - 1), zz(-(2**63)), zz(0), b"\x80\x00", b"\xff" * 8 + b"\x7f", zz(2**56)]
    values = [frame(EVENT, body(zz(0), event_time=t)) for t in times]
    got = compare(values, SchemaResolver())
    assert got.bulk
    assert got.chunk.event_time_ms.tolist()[:3] == [2**63 - 1, -(2**63), 0]
    # An 11-byte varint and a 10th byte past 64 bits are left to fastavro.
    bad = [frame(EVENT, body(zz(0), event_time=b"\xff" * 10 + b"\x01")),
           frame(EVENT, body(zz(0), event_time=b"\xff" * 9 + b"\x02"))]  # fmt: skip
    compare(values + bad, SchemaResolver())


def test_invalid_utf8_is_rejected_like_fastavro() -> None:
    good = frame(EVENT, body(zz(0)))
    bad_id = frame(EVENT, zz(2) + b"\xc3\x28" + body(zz(0))[3:])
    bad_feature = frame(EVENT, body(zz(1) + zz(1) + b"\xff" + struct.pack("<d", 1.0) + zz(0)))
    got = compare([good, bad_id, good, bad_feature], SchemaResolver())
    assert [i for i, _e in got.rejected] == [1, 3]
    assert got.bulk


def test_small_batches_go_per_record() -> None:
    """The fixed cost of a pass only pays from ``MIN_BULK`` messages on."""
    record = {"event_time_ms": 1, "model": "m", "latency_seconds": 0.1, "prediction": "a"}
    values = [encode(record)] * MIN_BULK
    decoder = EventDecoder(SchemaResolver())
    assert not decoder.decode(values[:-1], range(MIN_BULK - 1)).bulk
    got = decoder.decode(values, range(MIN_BULK))
    assert got.bulk
    assert got.chunk.classes == ["a"]
    with pytest.raises(ValueError, match="min_bulk"):
        EventDecoder(SchemaResolver(), min_bulk=-1)


def test_program_compiled_once() -> None:
    decoder = EventDecoder(SchemaResolver())
    program = decoder.program(EVENT)
    assert program is not None
    assert decoder.program(EVENT) is program


def test_writer_branch_the_reader_lacks() -> None:
    """A long prediction (promoted or refused by fastavro) goes per record; others stay bulk."""
    schema = copy.deepcopy(raw_schema(EVENT))
    for f in schema["fields"]:
        if f["name"] == "prediction":
            f["type"] = ["null", "string", "double", "long"]
    parsed = parse_schema(schema)
    base = {"event_time_ms": 1, "model": "m", "latency_seconds": 0.1}
    values = [encode(base | {"prediction": p}, parsed, 5) for p in ["a", 2.5, None]]
    resolver = SchemaResolver(Registry({5: schema}))
    assert compare(values, resolver).bulk
    compare(
        [*values, encode(base | {"prediction": 7}, parsed, 5)],
        SchemaResolver(Registry({5: schema})),
    )


def test_added_array_of_empty_records_is_left_to_fastavro() -> None:
    """Zero-byte items put no bound on a block count: such writers are decoded per record."""
    schema = copy.deepcopy(raw_schema(EVENT))
    empty = {"type": "record", "name": "Nothing", "fields": []}
    schema["fields"].append(
        {"name": "pings", "type": {"type": "array", "items": empty}, "default": []}
    )
    record = {"event_time_ms": 1, "model": "m", "latency_seconds": 0.1, "pings": [{}, {}]}
    got = compare([encode(record, parse_schema(schema), 6)], SchemaResolver(Registry({6: schema})))
    assert not got.bulk
