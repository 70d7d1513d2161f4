"""Labels that arrive later: ``PredictionPublisher.label()`` and ``modelpulse-labels``.

Against the real broker: the LabelFeedback records on the feedback topic, their key
and partition (the prediction's), bad input, a broker that is down, and the CLI.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastavro import schemaless_reader
from kafka_util import consume_all

from aggregator.decode import SchemaResolver
from demo.procs import run_module
from producer import InvalidEvent, PredictionPublisher, PublisherClosed, PublisherSettings
from producer import labels as labels_cli
from schemas.registry import SchemaRegistry
from schemas.wire import SchemaId, parsed_schema, unframe

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_760_000_000.0
MODELS = [f"model-{i}" for i in range(8)]  # enough names to spread over 3 partitions


def _publisher(bootstrap: str, **kw: Any) -> PredictionPublisher:
    kw.setdefault("linger_seconds", 0.02)
    return PredictionPublisher(PublisherSettings(bootstrap_servers=bootstrap, **kw))


def _decode_label(value: bytes | None) -> tuple[int, dict[str, Any]]:
    schema_id, body = unframe(value)
    record = schemaless_reader(io.BytesIO(body), parsed_schema(SchemaId.LABEL_FEEDBACK))
    return schema_id, record


def _prediction_ids(values: list[bytes]) -> dict[str, str]:
    """event id -> model of every prediction in these batch envelopes."""
    out: dict[str, str] = {}
    resolver = SchemaResolver()
    for value in values:
        kind, rec = resolver.read(value)
        assert kind == SchemaId.PREDICTION_BATCH
        offsets = memoryview(rec["event_id_offsets"]).cast("i")
        data = bytes(rec["event_id_data"])
        for i in range(rec["count"]):
            out[data[offsets[i] : offsets[i + 1]].decode()] = rec["model"]
    return out


def test_labels_land_in_the_partition_of_their_prediction(
    kafka_bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    predictions = topic_factory("lbl-pred", partitions=3)
    feedback = topic_factory("lbl-feedback", partitions=3)
    sent: dict[str, tuple[str, Any, float, str]] = {}
    with _publisher(kafka_bootstrap, topic=predictions, feedback_topic=feedback) as pub:
        for i, model in enumerate(MODELS):
            regression = i % 2 == 1
            given = f"given-{i}" if i % 4 == 0 else ""
            event_id = pub.publish(
                model,
                "v1",
                0.01,
                prediction=1.5 if regression else "yes",
                event_time=T0 + i,
                event_id=given,
            )
            assert event_id == (given or event_id) and event_id
            label: Any = 2.25 if regression else "no"
            when = T0 + 3600 + i
            assert pub.label(model, event_id, label, label_time=when, version="v1") is True
            sent[event_id] = (model, label, when, "v1")
        # Defaults: no version, no label_time (now), an int class sent as publish() does.
        late = pub.publish("model-0", "v1", 0.01, prediction=1)
        before = datetime.now(UTC).timestamp()
        assert pub.label("model-0", late, 0)
    stats = pub.stats()
    n = len(MODELS) + 1
    assert (stats.published, stats.sent, stats.failed) == (n, n, 0)
    assert (
        stats.labels_published,
        stats.labels_sent,
        stats.labels_failed,
        stats.labels_dropped,
        stats.labels_queued,
    ) == (n, n, 0, 0, 0)

    pred_msgs = consume_all(kafka_bootstrap, predictions)
    partition_of = {m.key(): m.partition() for m in pred_msgs}
    assert len(set(partition_of.values())) > 1, "the models should spread over partitions"
    ids = _prediction_ids([m.value() for m in pred_msgs])  # type: ignore[misc]
    assert ids == {**{e: v[0] for e, v in sent.items()}, late: "model-0"}
    assert len(set(ids)) == n  # generated ids are unique

    label_msgs = consume_all(kafka_bootstrap, feedback, expected=n)
    assert len(label_msgs) == n
    seen: dict[str, dict[str, Any]] = {}
    for m in label_msgs:
        schema_id, rec = _decode_label(m.value())
        assert schema_id == SchemaId.LABEL_FEEDBACK
        assert m.key() == rec["model"].encode()
        assert m.partition() == partition_of[m.key()], rec
        seen[rec["event_id"]] = rec
    for event_id, (model, label, when, version) in sent.items():
        rec = seen[event_id]
        assert rec == {
            "event_id": event_id,
            "event_time_ms": math.floor(when * 1000),
            "model": model,
            "model_version": version,
            "label": label,
        }
    rec = seen[late]
    assert (rec["model"], rec["model_version"], rec["label"]) == ("model-0", "", "0")
    assert before * 1000 - 60_000 <= rec["event_time_ms"] <= before * 1000 + 60_000


def test_event_mode_carries_the_returned_event_id(
    kafka_bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory("lbl-event-mode")
    with _publisher(kafka_bootstrap, topic=topic, mode="event") as pub:
        ids = [pub.publish("m", "v", 0.01, prediction="a") for _ in range(3)]
        with pub.track("m", "v") as t:
            t.prediction = "b"
    assert t.event_id and t.event_id not in ids
    resolver = SchemaResolver()
    got = []
    for m in consume_all(kafka_bootstrap, topic, expected=4):
        kind, rec = resolver.read(m.value())  # type: ignore[arg-type]
        assert kind == SchemaId.PREDICTION_EVENT
        got.append(rec["event_id"])
    assert got == [*ids, t.event_id]
    assert all(len(i) <= 24 for i in got)  # compact


def test_labels_are_framed_with_the_registry_id(
    kafka_bootstrap: str, topic_factory: Callable[..., str], schema_registry_url: str
) -> None:
    feedback = topic_factory("lbl-registry")
    settings = {"feedback_topic": feedback, "schema_registry_url": schema_registry_url}
    with _publisher(kafka_bootstrap, topic=topic_factory("lbl-registry-pred"), **settings) as pub:
        assert pub.label("m", "e1", "yes", version="v2")
    (msg,) = consume_all(kafka_bootstrap, feedback, expected=1)
    schema_id, rec = _decode_label(msg.value())
    assert schema_id == pub._label_id
    assert SchemaRegistry(schema_registry_url).schema(schema_id)["name"] == "LabelFeedback"
    assert (rec["event_id"], rec["label"], rec["model_version"]) == ("e1", "yes", "v2")


# -- bad input: raised at the call site, nothing buffered ----------------------------


@pytest.fixture
def offline() -> Any:
    pub = PredictionPublisher(
        PublisherSettings(bootstrap_servers="127.0.0.1:1", max_string_length=32)
    )
    yield pub
    pub.close(timeout_seconds=0.1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"model": ""}, "model"),
        ({"model": "m" * 33}, "model"),
        ({"model": None}, "model"),
        ({"event_id": ""}, "event_id"),
        ({"event_id": "e" * 33}, "event_id"),
        ({"event_id": 7}, "event_id"),
        ({"label": None}, "label"),
        ({"label": math.nan}, "label"),
        ({"label": math.inf}, "label"),
        ({"label": [1]}, "label"),
        ({"label": "l" * 33}, "label"),
        ({"label_time": T0 * 1000}, "label_time"),
        ({"label_time": T0 * 1e6}, "label_time"),
        ({"label_time": math.nan}, "label_time"),
        ({"label_time": math.inf}, "label_time"),
        ({"label_time": -1.0}, "label_time"),
        ({"label_time": "yesterday"}, "label_time"),
        ({"version": "v" * 33}, "version"),
        ({"version": 3}, "version"),
    ],
)
def test_bad_label_raises_naming_the_field(
    offline: PredictionPublisher, kwargs: dict[str, Any], field: str
) -> None:
    args: dict[str, Any] = {"model": "m", "event_id": "e1", "label": "yes", **kwargs}
    with pytest.raises(InvalidEvent) as info:
        offline.label(**args)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    if field == "label_time" and kwargs["label_time"] == T0 * 1000:
        assert "milliseconds" in str(info.value)
    assert offline.stats().labels_published == 0


def test_bad_event_id_of_publish_names_the_field(offline: PredictionPublisher) -> None:
    with pytest.raises(InvalidEvent, match=r"^event_id: must be a str"):
        offline.publish("m", "v", 0.01, prediction="a", event_id=12)  # type: ignore[arg-type]
    assert offline.stats().published == 0


def test_feedback_topic_must_differ_from_the_topic() -> None:
    with pytest.raises(ValueError, match="feedback_topic: must differ"):
        PublisherSettings(topic="same", feedback_topic="same")


def test_label_accepts_times_of_every_type(offline: PredictionPublisher) -> None:
    for when in (T0, int(T0), datetime.fromtimestamp(T0, UTC), None):
        assert offline.label("m", "e1", "yes", label_time=when)
    assert offline.label("m", "e2", 0.5)
    assert offline.stats().labels_published == 5


def test_label_never_raises_when_the_broker_is_down() -> None:
    pub = PredictionPublisher(
        PublisherSettings(
            bootstrap_servers="127.0.0.1:1", delivery_timeout_seconds=1.0, linger_seconds=0.02
        )
    )
    try:
        assert all(pub.label("m", f"e{i}", "yes") for i in range(20))
    finally:
        stats = pub.close(timeout_seconds=30)
    # Every label is accounted for: failed after the delivery timeout, none sent or lost.
    assert (stats.labels_published, stats.labels_failed, stats.labels_sent) == (20, 20, 0)
    assert stats.labels_queued == 0
    with pytest.raises(PublisherClosed):
        pub.label("m", "e1", "yes")


def test_full_label_buffer_drops_and_counts() -> None:
    pub = PredictionPublisher(
        PublisherSettings(
            bootstrap_servers="127.0.0.1:1", max_buffered_events=100, linger_seconds=60
        )
    )
    try:
        with pub._drain_lock:  # hold the flusher off, so the buffer surely fills
            results = [pub.label("m", f"e{i}", "yes") for i in range(250)]
        stats = pub.stats()
        assert results.count(False) == stats.labels_dropped == 150
        assert stats.labels_published == 100
        assert stats.dropped == 0  # predictions have their own buffer
    finally:
        pub.close(timeout_seconds=0.1)


# -- the CLI ------------------------------------------------------------------------

CSV_TEXT = """\
event_id,label,label_time,model
c1,fraud,1765000000,fraud
c2,legit,2025-12-06T10:00:00Z,fraud
,legit,,fraud
c4,legit,1765000000000,fraud
c5,legit
"c6","legit",,churn

c8,legit,,
c9,legit,,fraud
"""
CSV_VALID = {"c1": "fraud", "c2": "fraud", "c6": "churn", "c9": "fraud"}
CSV_INVALID = {
    4: "event_id: missing",
    5: "label_time: 1765000000000.0 looks like epoch milliseconds",
    6: "expected 4 fields (as the header), got 2",
    9: "model: missing",
}

JSONL_TEXT = """\
{"event_id": "j1", "label": "yes", "model": "churn"}
{"event_id": "j2", "label": 3.5, "model": "price", "version": "r2", "label_time": 1765000000.5}
not json
{"event_id": "j4", "label": null, "model": "churn"}

{"event_id": "j6", "label": 1, "label_time": "2025-12-06T10:00:00+01:00"}
[1, 2]
{"event_id": "j8", "label": Infinity, "model": "price"}
{"event_id": "j9", "label": "no", "model": "churn", "extra": true}
"""
JSONL_VALID = {"j1": "churn", "j2": "price", "j6": "dflt", "j9": "churn"}
JSONL_INVALID = {
    3: "not JSON",
    4: "label: missing",
    7: "not a JSON object but a list",
    8: "label: a regression value must be finite",
}


def _cli(
    args: list[str], bootstrap: str, stdin: str | None = None, **env_extra: str
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MODELPULSE_BOOTSTRAP_SERVERS": bootstrap,
        "PYTHONPATH": str(ROOT),
        **env_extra,
    }
    return run_module("producer.labels", "--progress-seconds", "0.001", *args, env=env, stdin=stdin)


def _summary(stdout: str) -> dict[str, str]:
    return {
        k.strip(): v.strip()
        for k, v in (line.split(":", 1) for line in stdout.splitlines() if not line[:1].isspace())
    }


def _listed(stdout: str) -> dict[int, str]:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("  line "):
            number, reason = line[len("  line ") :].split(": ", 1)
            out[int(number)] = reason
    return out


@pytest.mark.parametrize(
    ("suffix", "text", "valid", "invalid", "extra"),
    [
        (".csv", CSV_TEXT, CSV_VALID, CSV_INVALID, []),
        (".jsonl", JSONL_TEXT, JSONL_VALID, JSONL_INVALID, ["--model", "dflt"]),
        ("-", JSONL_TEXT, JSONL_VALID, JSONL_INVALID, ["--model", "dflt"]),  # stdin
    ],
)
def test_cli_sends_the_valid_rows_and_lists_the_invalid_ones(
    suffix: str,
    text: str,
    valid: dict[str, str],
    invalid: dict[int, str],
    extra: list[str],
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tmp_path: Path,
) -> None:
    feedback = topic_factory("lbl-cli", partitions=3)
    if suffix == "-":
        source, stdin = "-", text
    else:
        path = tmp_path / f"labels{suffix}"
        path.write_text(text)
        source, stdin = str(path), None
    result = _cli([source, "--feedback-topic", feedback, *extra], kafka_bootstrap, stdin)
    assert result.returncode == labels_cli.EXIT_ROWS, result.stderr
    summary = _summary(result.stdout)
    rows = len(valid) + len(invalid)
    assert summary == {
        "rows read": str(rows),
        "sent": str(len(valid)),
        "invalid": str(len(invalid)),
        "undelivered": "0",
    }, result.stdout
    listed = _listed(result.stdout)
    assert set(listed) == set(invalid), result.stdout
    for line, reason in invalid.items():
        assert listed[line].startswith(reason), (line, listed[line])
    assert f"{rows} rows read, {len(valid)} sent" in result.stderr  # the final progress line

    msgs = consume_all(kafka_bootstrap, feedback, expected=len(valid), idle=3.0)
    got = {}
    for m in msgs:
        _, rec = _decode_label(m.value())
        assert m.key() == rec["model"].encode()
        got[rec["event_id"]] = rec
    assert {e: r["model"] for e, r in got.items()} == valid
    if suffix == ".csv":
        assert got["c2"]["event_time_ms"] == 1_765_015_200_000  # ISO 8601, UTC
        assert got["c1"]["label"] == "fraud"
    else:
        assert got["j2"]["label"] == 3.5 and got["j2"]["model_version"] == "r2"
        assert got["j2"]["event_time_ms"] == 1_765_000_000_500
        assert got["j6"]["label"] == "1"  # a JSON integer is a class label
        assert got["j6"]["event_time_ms"] == 1_765_011_600_000


def test_cli_exits_zero_when_everything_is_sent(
    kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    feedback = topic_factory("lbl-cli-ok")
    path = tmp_path / "values.txt"  # no known suffix: the format is sniffed
    path.write_text("event_id,label\nv1,1.5\nv2,-2\n")
    result = _cli(
        [str(path), "--feedback-topic", feedback, "--model", "price", "--label-type", "value"],
        kafka_bootstrap,
    )
    assert result.returncode == labels_cli.EXIT_OK, result.stdout + result.stderr
    assert "invalid: 0" in result.stdout and "undelivered: 0" in result.stdout
    msgs = consume_all(kafka_bootstrap, feedback, expected=2)
    assert sorted(_decode_label(m.value())[1]["label"] for m in msgs) == [-2.0, 1.5]


def test_cli_counts_undelivered_labels_when_the_broker_is_down(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    path.write_text("event_id,label\na,yes\nb,no\n")
    # The delivery timeout comes from the environment, as every MODELPULSE_ setting.
    result = _cli(
        [str(path), "--model", "m", "--timeout", "30"],
        "127.0.0.1:1",
        MODELPULSE_DELIVERY_TIMEOUT_SECONDS="1",
    )
    assert result.returncode == labels_cli.EXIT_ROWS, result.stdout + result.stderr
    summary = _summary(result.stdout)
    assert (summary["sent"], summary["invalid"], summary["undelivered"]) == ("0", "0", "2")
    assert "2 failed, 0 still queued" in result.stdout


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    path.write_text("id,truth\na,yes\n")
    result = _cli([str(path), "--model", "m"], "127.0.0.1:1")
    assert result.returncode == labels_cli.EXIT_USAGE
    assert "no event_id and no label column" in result.stderr
    missing = _cli([str(tmp_path / "nope.csv")], "127.0.0.1:1")
    assert missing.returncode == labels_cli.EXIT_USAGE and "nope.csv" in missing.stderr


def test_cli_help_documents_columns_exit_codes_and_an_example(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        labels_cli.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("event_id", "label_time", "--model", "exit codes", "130", "example:", "'-'"):
        assert needle in text, needle


def test_cli_is_a_script_entry_point() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["modelpulse-labels"].split(":")
    assert (module, func) == ("producer.labels", "main")
    assert callable(getattr(labels_cli, func))


def test_jsonl_rows_are_parsed_per_line() -> None:
    rows = list(labels_cli._rows(io.StringIO('{"event_id": "a"}\n\n{\n'), "jsonl"))
    assert rows[0] == (1, {"event_id": "a"})
    assert rows[1][0] == 3 and str(rows[1][1]).startswith("not JSON")
