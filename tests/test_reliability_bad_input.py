"""Reliability: bad input to one shard is dead-lettered, valid input counted, scrapes never fail.

Writes ``reliability/results/bad_input.json`` (RELIABILITY.md); ``--long`` runs the
long form.
"""

import io
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, Message, Producer
from fastavro import schemaless_writer
from kafka_util import consume_all, create_topic, unique
from reliability_util import OUTCOME_NAMES, T0_MS, Clock, get, summary, write_result
from shards import (
    ShardProcess,
    make_row,
    parse_metrics,
    send_markers,
    total,
    wait_assigned,
    wait_until,
)

from aggregator.decode import EventChunkBuilder, SchemaResolver, decode_batch
from aggregator.errors import DecodeError
from producer.encode import encode_batch, encode_event
from schemas.wire import SchemaId, frame, parsed_schema

BAD_MAX_SERIES = 20_000


def _framed(schema_id: int, record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    schemaless_writer(out, parsed_schema(schema_id), record)
    return frame(schema_id, out.getvalue())


@dataclass
class BadInputPlan:
    """Messages in log order, what each should become, and the truth of the valid rows."""

    messages: list[tuple[bytes | None, str, str | None]] = field(default_factory=list)
    # (value, kind, expected dead-letter reason or None for valid)
    per_model: Counter[tuple[str, str]] = field(default_factory=Counter)  # (model, outcome)
    valid_rows: int = 0
    rejected_rows: Counter[str] = field(default_factory=Counter)  # reason -> rows
    tried: Counter[str] = field(default_factory=Counter)  # kind -> messages

    def add(self, value: bytes | None, kind: str, reason: str | None, rows: int = 0) -> None:
        self.messages.append((value, kind, reason))
        self.tried[kind] += 1
        if reason is not None:
            self.rejected_rows[reason] += max(rows, 1)


def _offline_reason(value: bytes) -> str | None:
    """What the decoder makes of bytes (None: decodes) - for random and cut messages."""
    try:
        kind, rec = SchemaResolver().read(value)
        if kind == SchemaId.PREDICTION_BATCH:
            decode_batch(rec, 0)
        elif kind == SchemaId.PREDICTION_EVENT:
            EventChunkBuilder().add(rec, 0)
        elif kind not in (SchemaId.RESOURCE_HEARTBEAT, SchemaId.WATERMARK_MARKER):
            return "unexpected_schema"
    except DecodeError as exc:
        return exc.reason
    return None


def _bad_input_plan(seed: int, slices: int, copies: int) -> BadInputPlan:
    """Valid traffic of 4 regular models + hostile-but-valid traffic + every poison kind."""
    rng = random.Random(seed)
    plan = BadInputPlan()
    t0 = T0_MS / 1000

    def valid(value: bytes, model: str, outcomes: list[int]) -> None:
        plan.add(value, "valid", None)
        for o in outcomes:
            plan.per_model[(model, OUTCOME_NAMES[o])] += 1
        plan.valid_rows += len(outcomes)

    def event(t: float, **kw: Any) -> bytes:
        return encode_event(make_row("cls-b", t, **kw))

    # kind -> (expected dead-letter reason, rows rejected, value at event time t)
    Poison = tuple[str, str | None, int, Callable[[float], bytes | None]]
    feedback = {"event_id": "e", "event_time_ms": T0_MS, "model": "cls-b", "label": "x"}
    poison: list[Poison] = [
        ("bad_magic_byte", "bad_magic", 0, lambda t: b"\x07" + event(t)[1:]),
        ("unknown_schema_id", "unknown_schema", 0, lambda t: frame(999, event(t)[5:])),
        ("truncated_header", "truncated", 0, lambda t: event(t)[:3]),
        ("empty_value", "truncated", 0, lambda t: b""),
        ("null_value", "truncated", 0, lambda t: None),
        (
            "label_feedback_on_input_topic",
            "unexpected_schema",
            0,
            lambda t: _framed(SchemaId.LABEL_FEEDBACK, feedback),
        ),
        ("nan_latency", "invalid_latency", 0, lambda t: event(t, latency_seconds=math.nan)),
        ("inf_latency", "invalid_latency", 0, lambda t: event(t, latency_seconds=math.inf)),
        ("negative_latency", "invalid_latency", 0, lambda t: event(t, latency_seconds=-0.5)),
        ("unknown_outcome", "unknown_outcome", 0, lambda t: event(t, outcome=4)),
        ("score_above_1", "invalid_score", 0, lambda t: event(t, score=1.5)),
        ("score_below_0", "invalid_score", 0, lambda t: event(t, score=-0.1)),
        ("score_inf", "invalid_score", 0, lambda t: event(t, score=math.inf)),
        (
            "float_prediction_for_classifier",
            "kind_mismatch",
            0,
            lambda t: event(t, prediction=3.5, label=None),
        ),
        ("event_time_a_day_ahead", "invalid_event_time", 0, lambda t: event(time.time() + 86_400)),
        ("negative_event_time", "invalid_event_time", 0, lambda t: event(-5.0)),
        (
            # 9 good rows and one with a negative latency: 1 row rejected, 9 counted.
            "envelope_with_one_negative_latency_row",
            "invalid_latency",
            1,
            lambda t: encode_batch(
                [
                    make_row("cls-a", t + i / 1000, latency_seconds=-1.0 if i == 4 else 0.01)
                    for i in range(10)
                ]
            ),
        ),
    ]

    def cut_or_noise(kind: str, t: float) -> tuple[bytes, str]:
        """A valid message cut short, or random bytes, and what the decoder says of it."""
        while True:
            if kind == "truncated_body":
                whole = rng.choice(
                    [
                        event(t, features={"f": 1.0}, event_id="abc"),
                        encode_batch([make_row("cls-a", t + i / 1000) for i in range(20)]),
                    ]
                )
                value = whole[: rng.randrange(5, len(whole))]
            else:
                value = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
            reason = _offline_reason(value)
            if reason is not None:
                return value, reason

    kinds = [p[0] for p in poison] + ["truncated_body", "random_bytes"]

    for s in range(slices):
        t = t0 + s * 0.5
        ts = [t + i / 1000 for i in range(50)]
        outcomes = [rng.choice([0, 0, 0, 0, 1, 2, 3]) for _ in ts]
        rows = [
            make_row("cls-a", x, outcome=o, prediction=rng.choice("xyz") if o == 0 else None)
            for x, o in zip(ts, outcomes, strict=True)
        ]
        valid(encode_batch(rows), "cls-a", outcomes)
        regs = [
            make_row("reg-a", x, prediction=rng.random(), label=rng.random(), score=None)
            for x in ts
        ]
        valid(encode_batch(regs), "reg-a", [0] * len(regs))
        for x in ts[:25]:
            valid(encode_event(make_row("cls-b", x, prediction=rng.choice("pq"))), "cls-b", [0])
            valid(
                encode_event(
                    make_row("reg-b", x, prediction=rng.gauss(0, 1), label=1.0, score=None)
                ),
                "reg-b",
                [0],
            )
        if s == 1:
            # 10k distinct class labels for one model: 10 envelopes of 1000 labels each.
            for e in range(10):
                labels = [f"class-{e * 1000 + i}" for i in range(1000)]
                many = [
                    make_row("many-classes", t + i / 1e4, prediction=c, label=labels[-1 - i])
                    for i, c in enumerate(labels)
                ]
                plan.add(encode_batch(many), "10k_distinct_class_labels", None)
                plan.per_model[("many-classes", "ok")] += len(many)
                plan.valid_rows += len(many)
        if s == 2:
            # 10k distinct model names, one event each, some with characters that need
            # escaping in the exposition format.
            odd = ['q"uote', "back\\slash", "new\nline", "émoji-🙂", "tab\there", " ", "}{,="]
            for i in range(10_000):
                name = f"{odd[i % len(odd)]}-{i}" if i % 50 == 0 else f"model-{i}"
                value = encode_event(make_row(name, t + i / 1e5, prediction="x"))
                plan.add(value, "10k_distinct_model_names", None)
                plan.valid_rows += 1
        every = max(1, slices // copies)
        for k, kind in enumerate(kinds):
            if (s + k) % every:
                continue
            if k < len(poison):
                _, reason, rows, make = poison[k]
                value = make(t + 0.01)
            else:
                (value, reason), rows = cut_or_noise(kind, t + 0.01), 0
            if kind == "envelope_with_one_negative_latency_row":
                plan.per_model[("cls-a", "ok")] += 9
                plan.valid_rows += 9
            plan.add(value, kind, reason, rows)
    return plan


class Scraper(threading.Thread):
    """GETs /metrics in a loop; counts failures and keeps the times."""

    def __init__(self, shard: ShardProcess, interval: float = 0.05) -> None:
        super().__init__(name="scraper", daemon=True)
        self.shard, self.interval = shard, interval
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.seconds: list[float] = []
        self.max_bytes = 0

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            status, body, seconds = get(self.shard.url + "/metrics", timeout=10)
            if status != 200:
                self.failures.append(f"status {status}")
                continue
            try:
                parse_metrics(body.decode())
            except Exception as exc:
                self.failures.append(f"unparseable: {exc}")
                continue
            self.ok += 1
            self.seconds.append(seconds)
            self.max_bytes = max(self.max_bytes, len(body))


def test_bad_input_is_dead_lettered_valid_input_counted_and_scrapes_never_fail(
    kafka_bootstrap: str, shard_factory: Callable[..., ShardProcess], long: bool
) -> None:
    clock = Clock()
    topic = create_topic(kafka_bootstrap, unique("rel-poison"))
    shard = shard_factory(
        kafka_bootstrap,
        topic,
        max_models=20,
        max_classes=8,
        max_series=BAD_MAX_SERIES,
        max_future="1h",
    )
    wait_assigned([shard], 1)
    slices = 200 if long else 40  # of 500 ms of event time each
    plan = _bad_input_plan(seed=3, slices=slices, copies=50 if long else 10)
    scraper = Scraper(shard)
    scraper.start()
    offsets: dict[int, tuple[str, str | None]] = {}

    def delivered(kind: str, reason: str | None, err: KafkaError | None, msg: Message) -> None:
        assert err is None, err
        offsets[msg.offset()] = (kind, reason)

    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
    for value, kind, reason in plan.messages:
        while True:
            try:
                producer.produce(
                    topic,
                    value,
                    b"k",
                    on_delivery=lambda e, m, k=kind, r=reason: delivered(k, r, e, m),
                )
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0
    produced_at = time.monotonic()
    send_markers(kafka_bootstrap, topic, 1, T0_MS + slices * 500 + 10_000)  # close all panes
    expected_dead = [off for off, (_, r) in offsets.items() if r is not None]
    passed = False
    figures: dict[str, Any] = {
        "messages": len(plan.messages),
        "valid_rows": plan.valid_rows,
        "tried_by_kind": dict(plan.tried),
        "expected_dead_letters": len(expected_dead),
        "expected_rejected_rows_by_reason": dict(plan.rejected_rows),
    }
    try:
        samples = wait_until(
            lambda: (
                (x := shard.scrape())
                and total(x, "inference_predictions_total") >= plan.valid_rows
                and x
            ),
            120,
            f"{plan.valid_rows} valid rows counted",
            [shard],
        )
        figures["ingest_seconds"] = round(time.monotonic() - produced_at, 2)
        dlq = consume_all(
            kafka_bootstrap, f"{topic}-dlq", expected=len(expected_dead), timeout=60, idle=3
        )
        time.sleep(1.0)
        samples = shard.scrape()
        scraper.stop.set()
        scraper.join(30)
        _, body, _ = get(shard.url + "/metrics")
        lines = sum(1 for line in body.decode().splitlines() if line and line[0] != "#")
        dead: dict[int, str] = {}
        duplicates = 0
        for m in dlq:
            h = {k: v.decode() for k, v in (m.headers() or [])}
            off = int(h["modelpulse.source.offset"])
            duplicates += off in dead
            dead[off] = h["modelpulse.reason"]
        wrong = {
            off: (offsets[off], got)
            for off, got in dead.items()
            if off not in offsets or offsets[off][1] != got
        }
        missing = sorted(set(expected_dead) - set(dead))
        counted = total(samples, "inference_predictions_total")
        got_reasons = {  # every known reason is exported from the start, at 0
            labels["reason"]: v
            for labels, v in samples.get("modelpulse_dead_lettered_total", [])
            if v
        }
        series = total(samples, "modelpulse_series")
        figures.update(
            {
                "counted_rows": counted,
                "dead_letters": len(dlq),
                "dead_letter_duplicates": duplicates,
                "dead_letters_missing": len(missing),
                "dead_letters_with_wrong_reason": len(wrong),
                "dead_lettered_total_by_reason": got_reasons,
                "folded": {
                    labels["kind"]: v
                    for labels, v in samples.get("modelpulse_folded_total", [])
                    if v
                },
                "series": series,
                "exposed_lines": lines,
                "max_series": BAD_MAX_SERIES,
                "scrapes_ok": scraper.ok,
                "scrape_failures": len(scraper.failures),
                "scrape_ms": summary(scraper.seconds, 1e3, 2),
                "max_scrape_bytes": scraper.max_bytes,
                "shard_alive": shard.alive(),
            }
        )
        assert counted == plan.valid_rows
        for (model, outcome), want in plan.per_model.items():
            got = total(samples, "inference_predictions_total", model=model, outcome=outcome)
            assert got == want, (model, outcome, got, want)
        overflow = total(samples, "inference_predictions_total", model="__overflow__")
        assert overflow > 0 and total(samples, "modelpulse_folded_total", kind="model") > 0
        many = [
            labels
            for labels, _ in samples.get("model_confusion_total", [])
            if labels["model"] == "many-classes"
        ]
        classes = {x["predicted"] for x in many} | {x["actual"] for x in many}
        assert "__overflow__" in classes and len(classes) <= 8  # --max-classes, overflow incl.
        assert total(samples, "model_confusion_total", model="many-classes") == 10_000
        assert missing == [] and wrong == {}, (missing[:10], list(wrong.items())[:10])
        assert got_reasons == dict(plan.rejected_rows), (got_reasons, plan.rejected_rows)
        assert series <= BAD_MAX_SERIES and lines <= BAD_MAX_SERIES
        assert scraper.failures == [] and scraper.ok > 10
        assert shard.alive() and shard.get("/healthz")[0] == 200
        passed = True
    finally:
        scraper.stop.set()
        write_result("bad_input", clock, long=long, passed=passed, **figures)
