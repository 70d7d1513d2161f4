"""The wire format: codec round trips (hypothesis), framing, evolution, interop, registry."""

from __future__ import annotations

import io
import json
import math
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from fastavro import parse_schema, schemaless_writer
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.decode import EventChunkBuilder, SchemaResolver, decode_batch
from aggregator.errors import DecodeError
from producer.encode import Row, encode_batch, encode_event
from schemas import SchemaRegistry, WireFormatError, frame, raw_schema, unframe
from schemas.wire import OUTCOMES, SchemaId

names = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=12)
finite = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)


@st.composite
def rows(draw: Any, regression: bool) -> Row:
    pred = draw(st.one_of(st.none(), finite if regression else names))
    label = draw(st.one_of(st.none(), finite if regression else names))
    return Row(
        "model",
        "v1",
        draw(st.floats(min_value=0, max_value=4e9)),
        draw(st.floats(min_value=0, max_value=1e4)),
        draw(st.integers(0, len(OUTCOMES) - 1)),
        pred,
        draw(st.one_of(st.none(), st.floats(0, 1))),
        label,
        draw(st.one_of(st.none(), names)),
        draw(st.one_of(st.none(), st.dictionaries(names, finite, max_size=4))),
        draw(st.one_of(st.just(""), names)),
    )


def _rows_from_chunk(c: Any) -> list[tuple[Any, ...]]:
    feats: dict[int, dict[str, float]] = {}
    for r, f, v in zip(
        c.feat_row.tolist(), c.feat_code.tolist(), c.feat_value.tolist(), strict=True
    ):
        feats.setdefault(r, {})[c.feature_names[f]] = v
    out = []
    for i in range(len(c)):
        if c.regression[int(c.mv[i])]:
            p = None if math.isnan(c.pred_value[i]) else float(c.pred_value[i])
            lab = None if math.isnan(c.label_value[i]) else float(c.label_value[i])
        else:
            p = None if c.pred_code[i] < 0 else c.classes[c.pred_code[i]]
            lab = None if c.label_code[i] < 0 else c.classes[c.label_code[i]]
        s = float(c.score[i])
        seg = int(c.segment[i])
        out.append(
            (
                int(c.event_time_ms[i]),
                float(c.latency_seconds[i]),
                int(c.outcome[i]),
                p,
                None if math.isnan(s) else s,
                lab,
                None if seg < 0 else c.segments[seg],
                feats.get(i, {}),
            )
        )
    return out


def _expected(r: Row) -> tuple[Any, ...]:
    return (
        math.floor(float(r.time) * 1000),
        r.latency_seconds,
        r.outcome,
        r.prediction,
        r.score,
        r.label,
        r.segment,
        dict(r.features or {}),
    )


@settings(max_examples=60, deadline=None)
@given(st.booleans().flatmap(lambda reg: st.lists(rows(reg), min_size=1, max_size=30)))
def test_batch_codec_round_trip(batch: list[Row]) -> None:
    kind, rec = SchemaResolver().read(encode_batch(batch, service="svc", instance="i-1"))
    assert kind == SchemaId.PREDICTION_BATCH
    assert (rec["service"], rec["instance"]) == ("svc", "i-1")
    chunk = decode_batch(rec, 42)
    assert chunk.mv_keys == [("model", "v1")]
    assert (chunk.offset == 42).all()
    assert _rows_from_chunk(chunk) == [_expected(r) for r in batch]


@settings(max_examples=60, deadline=None)
@given(st.booleans().flatmap(lambda reg: st.lists(rows(reg), min_size=1, max_size=10)))
def test_event_codec_round_trip(batch: list[Row]) -> None:
    resolver = SchemaResolver()
    builder = EventChunkBuilder()
    for i, r in enumerate(batch):
        kind, rec = resolver.read(encode_event(r))
        assert kind == SchemaId.PREDICTION_EVENT
        builder.add(rec, i)
    got = _rows_from_chunk(builder.build())
    assert got == [_expected(r) for r in batch]


def test_batch_columns_are_zero_copy_views() -> None:
    rec = SchemaResolver().read(
        encode_batch([Row("m", "v", 1.0, 0.5, 0, "a", 0.5, None, None, None, "")])
    )[1]
    chunk = decode_batch(rec, 0)
    assert not chunk.latency_seconds.flags.owndata  # np.frombuffer over the Avro bytes


@given(st.integers(0, 2**32 - 1), st.binary(max_size=40))
def test_framing_round_trip(schema_id: int, body: bytes) -> None:
    sid, view = unframe(frame(schema_id, body))
    assert sid == schema_id and bytes(view) == body


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "truncated"),
        (b"\x00\x00\x00", "truncated"),
        (b"\x01\x00\x00\x00\x01abc", "bad_magic"),
        (b"\x00\x00\x00\x03\xe7abc", "unknown_schema"),
        (b"\x00\x00\x00\x00\x01\xff\xff\xff", "undecodable"),
        (b"\x00\x00\x00\x00\x02" + b"\x02a" * 3, "undecodable"),
    ],
)
def test_bad_messages_raise_decode_error_with_reason(value: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        SchemaResolver().read(value)
    assert info.value.reason == reason
    if reason == "truncated":
        with pytest.raises(WireFormatError):
            unframe(value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoder(value: bytes) -> None:
    resolver = SchemaResolver()
    for candidate in (value, b"\x00\x00\x00\x00\x01" + value, b"\x00\x00\x00\x00\x02" + value):
        try:
            kind, rec = resolver.read(candidate)
            if kind == SchemaId.PREDICTION_BATCH:
                decode_batch(rec, 0)
        except DecodeError:
            pass


def test_bad_envelope_columns_are_rejected() -> None:
    rec = SchemaResolver().read(
        encode_batch([Row("m", "v", 1.0, 0.5, 0, "a", None, None, None, None, "")] * 3)
    )[1]
    rec["latency_seconds"] = rec["latency_seconds"][:-1]
    with pytest.raises(DecodeError, match="latency_seconds"):
        decode_batch(rec, 0)
    rec = SchemaResolver().read(
        encode_batch([Row("m", "v", 1.0, 0.5, 0, "a", None, None, None, None, "")])
    )[1]
    rec["prediction"] = np.array([7], dtype="<i4").tobytes()  # outside the class dictionary
    with pytest.raises(DecodeError, match="dictionary"):
        decode_batch(rec, 0)


# -- interop and evolution --------------------------------------------------------------


def _old_event_schema() -> dict[str, Any]:
    """PredictionEvent as a first version might have had it: fewer fields."""
    schema = json.loads(json.dumps(raw_schema(SchemaId.PREDICTION_EVENT)))
    keep = {"event_time_ms", "model", "latency_seconds", "outcome", "prediction", "label"}
    schema["fields"] = [f for f in schema["fields"] if f["name"] in keep]
    # An old writer's enum had fewer symbols; a newer writer's symbol reads as the default.
    return schema


class _FakeRegistry(BaseHTTPRequestHandler):
    """The two endpoints of Confluent's Schema Registry REST API that we use."""

    schemas: dict[int, str] = {}  # noqa: RUF012
    next_id = 100

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["schema"]
        for sid, existing in self.schemas.items():  # noqa: B007 - used after the loop
            if existing == text:
                break
        else:
            sid = type(self).next_id
            type(self).next_id += 1
            self.schemas[sid] = text
        self._reply(200, {"id": sid})

    def do_GET(self) -> None:
        sid = int(self.path.rsplit("/", 1)[1])
        if sid in self.schemas:
            self._reply(200, {"schema": self.schemas[sid]})
        else:
            self._reply(404, {"error_code": 40403, "message": "Schema not found"})

    def _reply(self, code: int, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def registry_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeRegistry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _confluent_framed(schema_id: int, schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    """What Confluent's (Java) KafkaAvroSerializer writes: 0, big-endian id, Avro body."""
    out = io.BytesIO()
    schemaless_writer(out, parse_schema(schema), record)
    return struct.pack(">bI", 0, schema_id) + out.getvalue()


def test_old_schema_message_decodes_with_new_schema(registry_url: str) -> None:
    registry = SchemaRegistry(registry_url)
    old = _old_event_schema()
    old_id = registry.register("io.modelpulse.PredictionEvent", old)
    value = _confluent_framed(
        old_id,
        old,
        {
            "event_time_ms": 1_700_000_000_000,
            "model": "fraud",
            "latency_seconds": 0.25,
            "outcome": "timeout",
            "prediction": "fraud",
            "label": None,
        },
    )
    kind, rec = SchemaResolver(registry).read(value)
    assert kind == SchemaId.PREDICTION_EVENT
    assert rec["model"] == "fraud" and rec["outcome"] == "timeout"
    # Fields added later come back with their defaults.
    assert rec["model_version"] == "" and rec["features"] == {} and rec["segment"] is None
    assert rec["event_id"] == "" and rec["score"] is None


def test_unknown_enum_symbol_reads_as_unknown(registry_url: str) -> None:
    registry = SchemaRegistry(registry_url)
    newer = json.loads(json.dumps(raw_schema(SchemaId.PREDICTION_EVENT)))
    outcome = next(f for f in newer["fields"] if f["name"] == "outcome")
    outcome["type"]["symbols"] = [*outcome["type"]["symbols"], "cancelled"]
    sid = registry.register("io.modelpulse.PredictionEvent", newer)
    record = {
        "event_time_ms": 1,
        "model": "m",
        "latency_seconds": 0.1,
        "outcome": "cancelled",
        "prediction": "a",
    }
    _kind, rec = SchemaResolver(registry).read(_confluent_framed(sid, newer, record))
    assert rec["outcome"] == "unknown"  # the aggregator dead-letters it as unknown_outcome


def test_java_style_event_with_fixed_id_is_understood() -> None:
    schema = raw_schema(SchemaId.PREDICTION_EVENT)
    record = {
        "event_id": "abc",
        "event_time_ms": 1_700_000_000_123,
        "model": "m",
        "model_version": "3",
        "latency_seconds": 0.01,
        "outcome": "ok",
        "prediction": 4.5,
        "score": None,
        "label": 4.0,
        "segment": None,
        "features": {"x": 1.0},
        "service": "java-svc",
        "instance": "pod-1",
    }
    kind, rec = SchemaResolver().read(_confluent_framed(1, schema, record))
    assert kind == SchemaId.PREDICTION_EVENT and rec == record


def test_publisher_registers_schemas_with_a_registry(registry_url: str) -> None:
    from producer import PredictionPublisher, PublisherSettings

    pub = PredictionPublisher(
        PublisherSettings(bootstrap_servers="127.0.0.1:1", schema_registry_url=registry_url)
    )
    try:
        assert pub._batch_id >= 100 and pub._event_id >= 100
        assert pub._batch_id != pub._event_id
    finally:
        pub.close(timeout_seconds=0.1)


def test_registry_unreachable_is_a_clear_error() -> None:
    from schemas import RegistryError

    with pytest.raises(RegistryError, match="unreachable"):
        SchemaRegistry("http://127.0.0.1:1").schema(5)
