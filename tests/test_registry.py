"""The aggregator with a real schema registry (Apicurio Registry, scripts/registry.sh).

Messages are written the way a Java or Go service writes them: confluent-kafka's own
``AvroSerializer`` with a real ``SchemaRegistryClient``, subjects under each naming
strategy; real shards count them. The resolver's caches are unit-tested with a fake.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from fastavro import parse_schema, schemaless_writer
from kafka_util import consume_all, create_topic, unique
from pydantic import ValidationError
from shards import ShardProcess, free_port, shard_args, total, wait_until

from aggregator.decode import SchemaResolver
from aggregator.errors import DecodeError
from aggregator.settings import AggregatorSettings
from aggregator.shard import MARKER_HEADER
from producer import PredictionPublisher, PublisherSettings
from schemas.codec import encode_marker
from schemas.registry import RegistryUnavailable, SchemaNotFound, SchemaRegistry
from schemas.wire import SchemaId, frame, raw_schema

with warnings.catch_warnings():
    # authlib (pulled in by the schema registry client) warns about its httpx module on
    # import, through a filter of its own that says "always": outrank it for the import.
    from authlib.deprecate import AuthlibDeprecationWarning

    warnings.filterwarnings("ignore", category=AuthlibDeprecationWarning)
    from confluent_kafka.schema_registry import (
        Schema,
        SchemaRegistryClient,
        record_subject_name_strategy,
        topic_record_subject_name_strategy,
        topic_subject_name_strategy,
    )
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

ROOT = Path(__file__).resolve().parent.parent
EVENT_SCHEMA = (ROOT / "schemas" / "prediction_event.avsc").read_text()
N = 1000


def _evolved_schema() -> str:
    """A newer producer's PredictionEvent: one optional field appended."""
    doc = json.loads(EVENT_SCHEMA)
    doc["fields"].append({"name": "region", "type": ["null", "string"], "default": None})
    return json.dumps(doc)


def _incompatible_schema() -> str:
    """PredictionEvent with latency as a string: no Avro resolution to the current one."""
    doc = json.loads(EVENT_SCHEMA)
    for f in doc["fields"]:
        if f["name"] == "latency_seconds":
            f["type"] = "string"
    return json.dumps(doc)


# -- unit: the resolver's caches, with a fake registry -------------------------------------


class _FakeSource:
    """Registry stand-in: a dict of schemas, a switch for an outage, a request count."""

    def __init__(self) -> None:
        self.schemas: dict[int, dict[str, Any]] = {}
        self.down = False
        self.calls = 0
        self.registered: dict[str, int] = {}

    def schema(self, schema_id: int) -> dict[str, Any]:
        self.calls += 1
        if self.down:
            raise RegistryUnavailable("connection refused")
        if schema_id not in self.schemas:
            raise SchemaNotFound(f"HTTP 404 for {schema_id}")
        return self.schemas[schema_id]

    def register(self, subject: str, schema: dict[str, Any]) -> int:
        if self.down:
            raise RegistryUnavailable("connection refused")
        sid = self.registered.setdefault(subject, 100 + len(self.registered))
        self.schemas[sid] = schema
        return sid


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _event_record(**over: Any) -> dict[str, Any]:
    rec = {
        "event_id": "",
        "event_time_ms": 1_700_000_000_000,
        "model": "m",
        "model_version": "v1",
        "latency_seconds": 0.01,
        "outcome": "ok",
        "prediction": "a",
        "score": 0.5,
        "label": None,
        "segment": None,
        "features": {},
        "service": "",
        "instance": "",
    }
    rec.update(over)
    return rec


def _framed(schema_id: int, schema: dict[str, Any] | str, record: dict[str, Any]) -> bytes:
    doc = json.loads(schema) if isinstance(schema, str) else schema
    out = io.BytesIO()
    schemaless_writer(out, parse_schema(doc), record)
    return frame(schema_id, out.getvalue())


def _resolver(source: _FakeSource, clock: _Clock) -> SchemaResolver:
    return SchemaResolver(source, clock=clock, sleep=clock.sleep)


def test_found_ids_are_looked_up_once() -> None:
    source, clock = _FakeSource(), _Clock()
    source.schemas[7] = json.loads(_evolved_schema())
    resolver = _resolver(source, clock)
    for _ in range(3):
        kind, rec = resolver.read(_framed(7, _evolved_schema(), _event_record(region="eu")))
        assert kind == SchemaId.PREDICTION_EVENT and rec["model"] == "m"
        assert "region" not in rec  # read as the current schema
    assert source.calls == 1


def test_fixed_ids_never_shadow_registry_ids() -> None:
    source, clock = _FakeSource(), _Clock()
    source.schemas[2] = json.loads(_evolved_schema())  # id 2 is the batch id without registry
    resolver = _resolver(source, clock)
    kind, _rec = resolver.read(_framed(2, _evolved_schema(), _event_record(region="eu")))
    assert kind == SchemaId.PREDICTION_EVENT
    value = _framed(1, raw_schema(SchemaId.PREDICTION_EVENT), _event_record())
    with pytest.raises(DecodeError) as err:
        resolver.read(value)  # fixed id 1, but this registry has no id 1
    assert err.value.reason == "unknown_schema" and "schema id 1" in err.value.detail


def test_unknown_ids_are_cached_for_a_bounded_time() -> None:
    source, clock = _FakeSource(), _Clock()
    resolver = _resolver(source, clock)
    value = _framed(9, raw_schema(SchemaId.PREDICTION_EVENT), _event_record())
    for _ in range(50):
        with pytest.raises(DecodeError) as err:
            resolver.read(value)
        assert err.value.reason == "unknown_schema" and "schema id 9" in err.value.detail
    assert source.calls == 1
    # Registered later (another registry node caught up): found after the TTL.
    source.schemas[9] = raw_schema(SchemaId.PREDICTION_EVENT)
    clock.now += SchemaResolver.NEGATIVE_TTL_SECONDS + 1
    assert resolver.read(value)[0] == SchemaId.PREDICTION_EVENT
    assert source.calls == 2


def test_negative_cache_is_bounded() -> None:
    class Small(SchemaResolver):
        NEGATIVE_MAX = 10  # type: ignore[misc]

    source, clock = _FakeSource(), _Clock()
    resolver = Small(source, clock=clock, sleep=clock.sleep)
    for sid in range(1000, 1100):
        with pytest.raises(DecodeError):
            resolver.resolve(sid)
    assert len(resolver._missing) <= 10
    assert 1099 in resolver._missing and 1000 not in resolver._missing


def test_foreign_records_are_unknown_and_name_the_id() -> None:
    source, clock = _FakeSource(), _Clock()
    source.schemas[5] = {
        "type": "record",
        "name": "Other",
        "fields": [{"name": "a", "type": "int"}],
    }
    with pytest.raises(DecodeError) as err:
        _resolver(source, clock).resolve(5)
    assert err.value.reason == "unknown_schema"
    assert "schema id 5 is Other" in err.value.detail


def test_incompatible_writer_is_dead_lettered_naming_the_id() -> None:
    source, clock = _FakeSource(), _Clock()
    source.schemas[12] = json.loads(_incompatible_schema())
    value = _framed(12, _incompatible_schema(), _event_record(latency_seconds="slow"))
    with pytest.raises(DecodeError) as err:
        _resolver(source, clock).read(value)
    assert err.value.reason == "incompatible_schema"
    assert "schema id 12" in err.value.detail


def test_outage_retries_then_fails_fast_and_backs_off() -> None:
    source, clock = _FakeSource(), _Clock()
    source.schemas[3] = raw_schema(SchemaId.PREDICTION_EVENT)
    resolver = _resolver(source, clock)
    known = _framed(3, raw_schema(SchemaId.PREDICTION_EVENT), _event_record())
    resolver.read(known)
    source.schemas[4] = raw_schema(SchemaId.PREDICTION_EVENT)
    source.down = True
    new = _framed(4, raw_schema(SchemaId.PREDICTION_EVENT), _event_record())
    with pytest.raises(DecodeError) as err:
        resolver.read(new)
    assert err.value.reason == "schema_unavailable" and "schema id 4" in err.value.detail
    attempts = 1 + len(SchemaResolver.RETRY_DELAYS)
    assert source.calls == 1 + attempts and clock.slept == list(SchemaResolver.RETRY_DELAYS)
    for _ in range(100):  # during the backoff: no requests, ids seen before still decode
        with pytest.raises(DecodeError, match="unavailable"):
            resolver.read(new)
        assert resolver.read(known)[0] == SchemaId.PREDICTION_EVENT
    assert source.calls == 1 + attempts
    clock.now += SchemaResolver.BACKOFF_MIN_SECONDS
    with pytest.raises(DecodeError, match="unavailable"):
        resolver.read(new)
    assert source.calls == 1 + 2 * attempts
    clock.now += SchemaResolver.BACKOFF_MIN_SECONDS  # the backoff doubled: still waiting
    with pytest.raises(DecodeError, match="next try"):
        resolver.read(new)
    source.down = False
    clock.now += SchemaResolver.BACKOFF_MIN_SECONDS
    assert resolver.read(new)[0] == SchemaId.PREDICTION_EVENT


def test_own_markers_use_the_registry_id() -> None:
    source, clock = _FakeSource(), _Clock()
    resolver = _resolver(source, clock)
    sid = resolver.writer_id(SchemaId.WATERMARK_MARKER)
    assert source.registered == {"io.modelpulse.WatermarkMarker": sid}
    # Another shard (a fresh resolver) reads it through the registry.
    kind, rec = _resolver(source, clock).read(encode_marker(5, "s0", sid))
    assert kind == SchemaId.WATERMARK_MARKER and rec["event_time_ms"] == 5
    assert SchemaResolver().writer_id(SchemaId.WATERMARK_MARKER) == SchemaId.WATERMARK_MARKER


class _AuthCheck(BaseHTTPRequestHandler):
    seen: list[str | None] = []  # noqa: RUF012

    def do_GET(self) -> None:
        type(self).seen.append(self.headers.get("Authorization"))
        data = json.dumps({"schema": json.dumps(raw_schema(SchemaId.PREDICTION_EVENT))}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def test_registry_basic_auth_and_settings() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AuthCheck)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        settings = AggregatorSettings(
            schema_registry_url=url,
            schema_registry_user="svc",
            schema_registry_password="s3cret",  # type: ignore[arg-type]
        )
        assert "s3cret" not in repr(settings)
        registry = settings.schema_registry()
        assert registry is not None
        assert registry.schema(1)["name"] == "PredictionEvent"
        assert _AuthCheck.seen == ["Basic c3ZjOnMzY3JldA=="]  # base64("svc:s3cret")
    finally:
        server.shutdown()
        server.server_close()
    assert AggregatorSettings().schema_registry() is None
    with pytest.raises(ValidationError, match="schema_registry_ca_file"):
        AggregatorSettings(schema_registry_url="https://r:1", schema_registry_ca_file="/nope.pem")
    with pytest.raises(ValidationError, match="schema_registry_url"):
        AggregatorSettings(schema_registry_url="registry:8081")


# -- integration: real Apicurio Registry, real broker, real shards --------------------------


@dataclass
class Stack:
    """A topic, the registry a shard reads it with, and that shard."""

    bootstrap: str
    topic: str
    registry_url: str
    shard: ShardProcess
    client: SchemaRegistryClient
    producer: Producer
    stop_registry: Callable[[], None] | None = None

    def count(self, model: str) -> float:
        return total(self.shard.scrape(), "inference_predictions_total", model=model)

    def dead(self, reason: str) -> float:
        return total(self.shard.scrape(), "modelpulse_dead_lettered_total", reason=reason)


_last_time_ms = 0


def _event_times(n: int) -> list[int]:
    """Wall-clock event times, each batch after the last one (so never late)."""
    global _last_time_ms
    start = max(int(time.time() * 1000), _last_time_ms + 1)
    _last_time_ms = start + n // 10
    return [start + i // 10 for i in range(n)]


def _records(model: str, n: int = N, **extra: Any) -> list[dict[str, Any]]:
    return [
        _event_record(
            event_id=f"{model}-{i}",
            event_time_ms=t,
            model=model,
            prediction=("a", "b")[i % 2],
            label=("a", "b")[i % 3 % 2],
            **extra,
        )
        for i, t in enumerate(_event_times(n))
    ]


def _publish(
    stack: Stack,
    schema: str,
    strategy: Callable[..., Any],
    records: list[dict[str, Any]],
) -> int:
    """Serialise with confluent-kafka's AvroSerializer (auto-registering); the schema id."""
    serializer = AvroSerializer(
        stack.client,
        schema,
        conf={"auto.register.schemas": True, "subject.name.strategy": strategy},
    )
    ctx = SerializationContext(stack.topic, MessageField.VALUE)
    ids = set()
    for rec in records:
        value = serializer(rec, ctx)
        assert value is not None
        ids.add(struct.unpack(">bI", value[:5])[1])
        stack.producer.produce(stack.topic, value, rec["model"].encode())
        stack.producer.poll(0)
    assert stack.producer.flush(30) == 0
    assert len(ids) == 1
    return ids.pop()


def _send_marker(stack: Stack, marker_id: int) -> None:
    """A watermark marker that closes every pane so far, framed with the registry's id."""
    global _last_time_ms
    _last_time_ms += 5000  # past the lateness and the last pane; later events come after it
    header = [(MARKER_HEADER, f"{stack.topic}-agg".encode())]  # shard_args' group id
    stack.producer.produce(
        stack.topic, encode_marker(_last_time_ms, "test", marker_id), partition=0, headers=header
    )
    assert stack.producer.flush(30) == 0


def _produce_framed(
    stack: Stack, schema_id: int, schema: str, records: list[dict[str, Any]]
) -> None:
    """Frame records by hand with a given id (what a serializer does with a cached id)."""
    for rec in records:
        stack.producer.produce(stack.topic, _framed(schema_id, schema, rec), rec["model"].encode())
    assert stack.producer.flush(30) == 0


def _wait_count(stack: Stack, model: str, expected: int) -> None:
    got = wait_until(
        lambda: (n := stack.count(model)) >= expected and n,
        90,
        f"{expected} events of {model} counted",
        [stack.shard],
    )
    assert got == expected


def _start_stack(
    bootstrap: str,
    registry_url: str,
    log: Path,
    stop_registry: Callable[[], None] | None = None,
    **overrides: Any,
) -> Iterator[Stack]:
    topic = create_topic(bootstrap, unique("reg"), 1)
    args = shard_args(
        bootstrap, topic, shard_id="reg0", schema_registry_url=registry_url, **overrides
    )
    shard = ShardProcess(args, free_port(), log).start()
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    client = SchemaRegistryClient({"url": registry_url})
    try:
        wait_until(
            lambda: total(shard.scrape(), "modelpulse_partitions_owned") == 1,
            60,
            "the shard owns the partition",
            [shard],
        )
        yield Stack(bootstrap, topic, registry_url, shard, client, producer, stop_registry)
    finally:
        shard.kill()
        producer.flush(10)
        client.__exit__()


@pytest.fixture(scope="module")
def shared(
    kafka_bootstrap: str, schema_registry_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The session's registry, with other schemas registered first; the shard marks idle
    partitions itself (registering the marker schema), so windows close on their own."""
    with SchemaRegistryClient({"url": schema_registry_url}) as client:
        for i in range(3):
            other = {
                "type": "record",
                "name": f"Other{i}",
                "fields": [{"name": "x", "type": "int"}],
            }
            client.register_schema(unique("other") + "-value", Schema(json.dumps(other), "AVRO"))
    log = tmp_path_factory.mktemp("registry") / "shared-shard.log"
    yield from _start_stack(kafka_bootstrap, schema_registry_url, log, idle_timeout="1s")


@pytest.fixture(scope="module")
def empty(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A registry of its own that starts empty (ids from 1), and a shard reading with it."""
    script = ["bash", str(ROOT / "scripts" / "registry.sh")]
    name = ["--name", "pytest-empty"]

    def stop() -> None:
        subprocess.run([*script, "stop", *name], capture_output=True, timeout=60, check=False)

    stop()  # one left over by a killed run would not be empty
    out = subprocess.run(
        [*script, "start", *name, "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    url = next(line[4:] for line in out.splitlines() if line.startswith("url="))
    try:
        log = tmp_path_factory.mktemp("registry") / "empty-shard.log"
        # No idle markers: the shard would register the marker schema and take id 1.
        yield from _start_stack(kafka_bootstrap, url, log, stop, idle_timeout="1h")
    finally:
        stop()


@pytest.mark.parametrize(
    ("case", "schema", "strategy"),
    [
        ("topic-name", EVENT_SCHEMA, topic_subject_name_strategy),
        ("topic-name-evolved", _evolved_schema(), topic_subject_name_strategy),
        ("record-name", EVENT_SCHEMA, record_subject_name_strategy),
        ("topic-record-name", EVENT_SCHEMA, topic_record_subject_name_strategy),
    ],
)
def test_shared_registry_is_counted(
    shared: Stack, case: str, schema: str, strategy: Callable[..., Any]
) -> None:
    extra = {"region": "eu"} if "evolved" in case else {}
    sid = _publish(shared, schema, strategy, _records(case, **extra))
    assert sid != 1  # other schemas came first: an id the fixed ids would not know
    _wait_count(shared, case, N)


def test_incompatible_schema_is_dead_lettered_naming_the_id(
    shared: Stack, kafka_bootstrap: str
) -> None:
    records = _records("incompatible", latency_seconds="0.01")
    sid = _publish(shared, _incompatible_schema(), topic_subject_name_strategy, records)
    wait_until(lambda: shared.dead("incompatible_schema") >= N, 90, "dead letters", [shared.shard])
    assert shared.dead("incompatible_schema") == N
    dlq = consume_all(kafka_bootstrap, f"{shared.topic}-dlq", expected=N, timeout=60)
    details = {
        dict(m.headers() or [])["modelpulse.detail"].decode()
        for m in dlq
        if dict(m.headers() or [])["modelpulse.reason"] == b"incompatible_schema"
    }
    assert details and all(f"schema id {sid} " in d for d in details), details
    assert shared.count("incompatible") == 0


@pytest.mark.parametrize("mode", ["batch", "event"])
def test_python_publisher_with_the_registry_is_counted(shared: Stack, mode: str) -> None:
    model = f"pub-{mode}"
    settings = PublisherSettings(
        bootstrap_servers=shared.bootstrap,
        topic=shared.topic,
        mode=mode,  # type: ignore[arg-type]
        schema_registry_url=shared.registry_url,
    )
    times = _event_times(N)
    with PredictionPublisher(settings) as pub:
        for i, t in enumerate(times):
            pub.publish(
                model,
                "v1",
                0.01,
                prediction=("a", "b")[i % 2],
                score=0.5,
                label="a",
                event_time=t / 1000,
            )
        assert pub.flush(30) == 0
    # The ids it framed with are the registry's (record-name subjects), not the fixed ones.
    registry = SchemaRegistry(shared.registry_url)
    assert registry.schema(pub._event_id)["name"] == "PredictionEvent"
    assert registry.schema(pub._batch_id)["name"] == "PredictionBatch"
    _wait_count(shared, model, N)


def test_empty_registry_ids_are_registry_ids_and_an_outage_loses_nothing(
    empty: Stack, kafka_bootstrap: str
) -> None:
    sid = _publish(empty, EVENT_SCHEMA, topic_subject_name_strategy, _records("empty"))
    assert sid == 1
    evolved = _records("empty-evolved", region="eu")
    sid2 = _publish(empty, _evolved_schema(), topic_subject_name_strategy, evolved)
    assert sid2 == 2  # the fixed batch id: must be read as the evolved PredictionEvent
    registry = SchemaRegistry(empty.registry_url)
    marker_id = registry.register(
        "io.modelpulse.WatermarkMarker", raw_schema(SchemaId.WATERMARK_MARKER)
    )
    later = json.loads(_evolved_schema())
    later["fields"].append({"name": "zone", "type": ["null", "string"], "default": None})
    later_id = empty.client.register_schema(
        f"{empty.topic}-value", Schema(json.dumps(later), "AVRO")
    )
    assert len({sid, sid2, marker_id, later_id}) == 4
    _send_marker(empty, marker_id)
    _wait_count(empty, "empty", N)
    _wait_count(empty, "empty-evolved", N)
    assert empty.dead("undecodable") == 0 and empty.dead("unknown_schema") == 0

    # The registry goes away. Ids the shard has seen keep counting; a new id is
    # dead-lettered as schema_unavailable (counted, replayable), and the shard lives on.
    assert empty.stop_registry is not None
    empty.stop_registry()
    _produce_framed(empty, sid, EVENT_SCHEMA, _records("outage-known"))
    _produce_framed(empty, later_id, json.dumps(later), _records("outage-new", 20, zone="z"))
    _send_marker(empty, marker_id)
    _wait_count(empty, "outage-known", N)
    wait_until(lambda: empty.dead("schema_unavailable") >= 20, 60, "dead letters", [empty.shard])
    assert empty.dead("schema_unavailable") == 20 and empty.count("outage-new") == 0
    assert empty.shard.alive() and empty.shard.get("/healthz")[0] == 200
    dlq = consume_all(kafka_bootstrap, f"{empty.topic}-dlq", expected=20, timeout=60)
    reasons = [dict(m.headers() or [])["modelpulse.reason"] for m in dlq]
    assert reasons.count(b"schema_unavailable") == 20
