"""Hostile input at ingest, without Kafka: names, values, heartbeats, envelope size.

Every rejected row is counted under its reason and never reaches the catalog, so it
can neither export a series nor take a slot under a cap.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from aggregator.catalog import MACRO, OVERFLOW, Catalog, Limits
from aggregator.decode import (
    FEATURES_PER_ROW,
    EventChunkBuilder,
    Heartbeat,
    Marker,
    RowChunk,
    SchemaResolver,
    decode_batch,
)
from aggregator.errors import DecodeError
from aggregator.exposition import render
from aggregator.metrics import build_families
from aggregator.state import REJECT_REASONS, PartitionState, StateConfig
from aggregator.state import partition as state_module
from producer.encode import Row, encode_batch

PANE = 1000
CONFIG = StateConfig(pane_ms=PANE, windows_ms=(5000,), lateness_ms=2000, drift_reference_ms=5000)
T0 = 1_700_000_000_000
FAR = 2 * 10**12  # Kafka timestamps: nothing is "in the future"


def _event(model: str = "m", t_ms: int = T0, **kw: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "event_id": "",
        "event_time_ms": t_ms,
        "model": model,
        "model_version": "v1",
        "latency_seconds": 0.01,
        "outcome": "ok",
        "prediction": "x",
        "score": 0.5,
        "label": "x",
        "segment": None,
        "features": {},
        "service": "",
        "instance": "",
    }
    r.update(kw)
    return r


def _chunk(events: list[dict[str, Any]], first_offset: int = 0) -> RowChunk:
    builder = EventChunkBuilder()
    for i, e in enumerate(events):
        builder.add(e, first_offset + i)
    return builder.build()


def _ingest(
    state: PartitionState, items: list[Any], offsets: list[int]
) -> state_module.IngestResult:
    offs = np.array(sorted(set(offsets)), dtype=np.int64)
    return state.ingest(items, offs, np.full(offs.size, FAR), int(offs[-1]) + 1)


def _feed(events: list[dict[str, Any]], config: StateConfig = CONFIG) -> PartitionState:
    """One message per event, all in one batch, then a marker that closes every pane."""
    state = PartitionState(config, 0)
    _ingest(state, [_chunk(events)], list(range(len(events))))
    end = max(e["event_time_ms"] for e in events if e["event_time_ms"] < FAR) + 3000
    _ingest(state, [Marker(len(events), end)], [len(events)])
    return state


def _models(state: PartitionState) -> set[tuple[str, str]]:
    return {(e.model, e.version) for e in state.catalog.entries}


def _labels(state: PartitionState) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every exported sample as (name, sorted labels) (without the partition label)."""
    text = render(build_families([state.view()], state.config)).decode()
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = {k: v for k, v in s.labels.items() if k != "partition"}
            out.append((s.name, tuple(sorted(labels.items()))))
    return out


def test_reject_reason_codes_are_append_only() -> None:
    # Codes travel in IngestResult; snapshots count by name. Never reorder.
    assert REJECT_REASONS[:6] == (
        "invalid_latency",
        "unknown_outcome",
        "invalid_score",
        "invalid_event_time",
        "kind_mismatch",
        "late",
    )
    assert REJECT_REASONS[6:] == (
        "name_too_long",
        "reserved_name",
        "empty_model",
        "invalid_value",
        "invalid_heartbeat",
        "envelope_too_large",
    )
    assert len(set(REJECT_REASONS)) == len(REJECT_REASONS)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", "m" * 257),
        ("model_version", "v" * 257),
        ("prediction", "c" * 257),
        ("label", "c" * 257),
        ("segment", "s" * 257),
        ("features", {"f" * 257: 1.0}),
    ],
)
def test_oversize_names_are_rejected_and_never_interned(field: str, value: Any) -> None:
    good = [_event(t_ms=T0 + i, segment="s", features={"f": 1.0}) for i in range(5)]
    bad = _event(t_ms=T0 + 10, **{"segment": "s", "features": {"f": 1.0}, field: value})
    state = _feed([*good, bad])
    assert state.rejected == {"name_too_long": 1}
    assert state.events_accepted == 5
    names: list[str] = []
    for e in state.catalog.entries:
        names += [e.model, e.version, *e.classes, *e.segments, *e.features]
    assert max(map(len, names)) <= 256
    assert max(len(v) for _, labels in _labels(state) for _, v in labels) <= 256


def test_name_limit_is_a_setting_and_exactly_the_limit_is_accepted() -> None:
    config = StateConfig(
        pane_ms=PANE,
        windows_ms=(5000,),
        lateness_ms=2000,
        drift_reference_ms=5000,
        max_name_length=8,
    )
    state = _feed([_event("m" * 8), _event("m" * 9), _event(prediction="é" * 9)], config)
    assert state.rejected == {"name_too_long": 2}
    assert _models(state) == {("m" * 8, "v1")}
    assert config.digest() == CONFIG.digest()  # limits shape no array: snapshots stay valid


def test_oversize_model_name_in_an_envelope_rejects_the_envelope() -> None:
    rows = [Row("m" * 300, "v1", T0 / 1000, 0.01, 0, "x", 0.5, "x", None, None, "")]
    chunk = decode_batch(SchemaResolver().read(encode_batch(rows * 3))[1], 0)
    state = PartitionState(CONFIG, 0)
    result = _ingest(state, [chunk], [0])
    assert result.accepted == 0 and len(state.catalog) == 0
    assert [REJECT_REASONS[r] for r in result.reasons] == ["name_too_long"] * 3


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", OVERFLOW),
        ("model_version", OVERFLOW),
        ("prediction", MACRO),
        ("label", MACRO),
        ("prediction", OVERFLOW),
        ("segment", OVERFLOW),
        ("features", {OVERFLOW: 1.0}),
    ],
)
def test_reserved_names_are_rejected(field: str, value: Any) -> None:
    state = _feed(
        [_event(t_ms=T0 + i, prediction="a", label="b") for i in range(4)]
        + [_event(t_ms=T0 + 9, **{field: value})]
    )
    assert state.rejected == {"reserved_name": 1}
    assert _models(state) == {("m", "v1")}
    assert set(state.catalog.entries[0].classes) == {"a", "b"}
    samples = _labels(state)
    assert len(samples) == len(set(samples)), "duplicate series"
    macro = [s for s in samples if s[0] == "model_f1_score" and ("class", MACRO) in s[1]]
    assert len(macro) == 1


def test_catalog_never_admits_a_reserved_name_as_a_regular_one() -> None:
    cat = Catalog(Limits(max_classes=4))
    mv = cat.model_version("m", "v1", False, 0)
    assert cat.class_id(mv, MACRO) == 3 == cat.class_id(mv, OVERFLOW)  # the overflow id
    assert cat.entries[mv].classes == {OVERFLOW: 3}
    assert cat.folded == {"class": 1}
    assert cat.model_version("m", OVERFLOW, False, 0) == cat.model_version(OVERFLOW, "v", False, 0)
    assert [(e.model, e.version) for e in cat.entries] == [("m", "v1"), (OVERFLOW, OVERFLOW)]


def test_empty_model_name_is_dead_lettered_like_publish_refuses_it() -> None:
    state = _feed([_event(""), _event("m")])
    assert state.rejected == {"empty_model": 1}
    assert _models(state) == {("m", "v1")}


@pytest.mark.parametrize(
    ("prediction", "label"),
    [(math.inf, 1.0), (1.0, -math.inf), (1e200, -1e200), (2e100, None), (None, -2e100)],
)
def test_non_finite_or_absurd_regression_values_are_rejected(
    prediction: float | None, label: float | None
) -> None:
    good = [_event("r", T0 + i, prediction=1.0, label=1.5, score=None) for i in range(10)] + [
        _event("r", T0 + 20, prediction=math.nan, label=None, score=None)
    ]  # NaN = none
    bad = _event("r", T0 + 5, prediction=prediction, label=label, score=None)
    with np.errstate(all="raise"):  # an overflow anywhere would raise here
        state = _feed([*good, bad])
    assert state.rejected == {"invalid_value": 1}
    assert state.events_accepted == 11
    for name in ("err_sum", "abs_err", "sq_err"):
        assert np.isfinite(state.cum[name]).all() and state.cum[name].sum() != 0, name
    assert state.cum["abs_err"][0] == pytest.approx(5.0)


def test_absurd_latency_is_rejected_before_it_can_overflow_the_sum() -> None:
    state = _feed([_event(latency_seconds=1e300), _event(t_ms=T0 + 1)])
    assert state.rejected == {"invalid_latency": 1}
    assert np.isfinite(state.cum["lat_sum"]).all()


def test_rejected_rows_never_enter_the_catalog() -> None:
    limits = Limits(max_models=2)
    config = StateConfig(
        pane_ms=PANE,
        windows_ms=(5000,),
        lateness_ms=2000,
        drift_reference_ms=5000,
        limits=limits,
    )
    junk = [
        _event("nan", T0, latency_seconds=math.nan),
        _event("unknown", T0, outcome="unknown"),
        _event("score", T0, score=2.0),
        _event("future", 10**16),
        _event("negative", -5),
    ]
    real = [_event("real", T0 + i) for i in range(3)]
    state = _feed([*junk, *real], config)
    assert _models(state) == {("real", "v1")}
    assert state.catalog.folded == {}
    assert state.catalog.entries[0].first_seen_ms == T0
    exported = {dict(labels).get("model") for _, labels in _labels(state)}
    assert exported - {None} == {"real"}
    assert sum(state.rejected.values()) == 5
    assert state.rejected["invalid_event_time"] == 2


def test_late_rows_do_not_set_first_seen_or_empty_the_drift_reference() -> None:
    """A new version whose first event is late must not get a reference window that
    lies in panes long closed (it would be empty for good)."""
    old = [_event("m", T0 + i * 100, score=0.5) for i in range(200)]  # 20 s of v1
    late = _event("m", T0, model_version="v2", score=0.5)  # late: its pane is closed
    fresh = [_event("m", T0 + 20_000 + i * 50, model_version="v2", score=0.9) for i in range(400)]
    state = _feed([*old, late, *fresh])
    assert state.rejected == {"late": 1}
    v2 = next(i for i, e in enumerate(state.catalog.entries) if e.version == "v2")
    assert state.catalog.entries[v2].first_seen_ms == T0 + 20_000
    assert state.has_reference[v2]
    assert state.reference["score"][v2].sum() > 0


def test_model_kind_comes_from_accepted_rows_only() -> None:
    # A rejected regression row first; the accepted classification rows decide the kind.
    events = [
        _event("m", T0, prediction=1.5, label=None, latency_seconds=-1.0),
        _event("m", T0 + 1, prediction="a", label="a"),
        _event("m", T0 + 2, prediction=2.5, label=None),  # the other kind: rejected
        _event("m", T0 + 3, prediction="b", label=0.5),  # mixed kinds in one row
    ]
    state = _feed(events)
    assert state.catalog.entries[0].regression is False
    assert state.rejected == {"invalid_latency": 1, "kind_mismatch": 2}
    assert state.events_accepted == 1


def test_heartbeats_out_of_range_are_rejected_and_gpus_deduplicated() -> None:
    def beat(offset: int, instance: str, **kw: Any) -> Heartbeat:
        r: dict[str, Any] = {
            "event_time_ms": T0,
            "service": "svc",
            "instance": instance,
            "cpu_usage_ratio": 0.5,
            "memory_usage_bytes": 100,
            "disk_usage_ratio": 0.5,
            "gpus": [],
        }
        r.update(kw)
        return Heartbeat(offset, r)

    gpu = {"index": 0, "utilization_ratio": 0.5, "memory_used_bytes": 1}
    beats = [
        beat(0, "cpu", cpu_usage_ratio=7.5),
        beat(1, "mem", memory_usage_bytes=-1),
        beat(2, "gpu", gpus=[{**gpu, "utilization_ratio": math.inf}]),
        beat(3, "nan", disk_usage_ratio=math.nan),
        beat(4, "many", gpus=[{**gpu, "index": i} for i in range(65)]),
        beat(5, "x" * 300),
        beat(6, "dup", gpus=[gpu, {**gpu, "index": 1}, {**gpu, "utilization_ratio": 0.75}]),
        beat(7, "future", event_time_ms=10**16),
    ]
    state = PartitionState(CONFIG, 0)
    result = _ingest(state, list(beats), list(range(len(beats))))
    assert Counter(REJECT_REASONS[r] for r in result.reasons) == {
        "invalid_heartbeat": 5,
        "name_too_long": 1,
        "invalid_event_time": 1,
    }
    assert result.offsets.tolist() == [0, 1, 2, 3, 4, 5, 7]
    assert [r["instance"] for r in state.resources.values()] == ["dup"]
    (kept,) = state.resources.values()
    assert [(g["index"], g["utilization_ratio"]) for g in kept["gpus"]] == [(0, 0.75), (1, 0.5)]
    assert state.max_event_ms == T0  # only the accepted heartbeat moved the watermark


def test_envelope_over_the_row_limit_is_refused_before_its_columns() -> None:
    rows = [Row("m", "v1", T0 / 1000, 0.01, 0, "x", 0.5, "x", None, {"f": 1.0}, "")] * 11
    record = SchemaResolver().read(encode_batch(rows))[1]
    assert len(decode_batch(record, 0, max_rows=11)) == 11
    with pytest.raises(DecodeError) as err:
        decode_batch(record, 0, max_rows=10)
    assert err.value.reason == "envelope_too_large" and "max_rows_per_envelope" in str(err.value)
    # Feature values count too: rows x feature names, checked before any column.
    wide = dict(record, feature_names=[f"f{i}" for i in range(FEATURES_PER_ROW * 2)])
    with pytest.raises(DecodeError, match="feature values") as err:
        decode_batch(wide, 0, max_rows=20)
    assert err.value.reason == "envelope_too_large"
    assert "envelope_too_large" in REJECT_REASONS


def _mixed_log(seed: int, n: int) -> list[dict[str, Any]]:
    """Events of several models, some bad in every way, some late, out of order."""
    rng = np.random.default_rng(seed)
    events = []
    for i in range(n):
        t = T0 + i * 20 + (int(rng.normal(0, 1500)) if rng.random() < 0.2 else 0)
        pick = int(rng.choice(6, p=[0.3, 0.3, 0.3, 0.03, 0.03, 0.04]))
        model = ["a", "b", "r", "", "x" * 300, OVERFLOW][pick]
        kw: dict[str, Any] = {}
        if model == "r":
            kw = {"prediction": float(rng.normal()), "label": float(rng.normal()), "score": None}
            if rng.random() < 0.05:
                kw["label"] = math.inf
        else:
            kw = {
                "prediction": ["p", "q", "s", MACRO][
                    int(rng.choice(4, p=[0.33, 0.33, 0.32, 0.02]))
                ],
                "label": ["p", "q", "s"][int(rng.integers(3))],
            }
        if rng.random() < 0.05:
            kw["latency_seconds"] = math.nan
        if rng.random() < 0.3:
            kw["segment"] = f"seg{int(rng.integers(4))}"
        kw["features"] = {f"f{int(rng.integers(3))}": float(rng.normal())}
        events.append(_event(model, t, **kw))
    return events


LOG = _mixed_log(5, 1500)


def _replay(cuts: list[int], slice_rows: int | None = None) -> PartitionState:
    state = PartitionState(CONFIG, 0)
    bounds = [0, *sorted(set(cuts)), len(LOG)]
    for lo, hi in itertools.pairwise(bounds):
        if hi > lo:
            _ingest(state, [_chunk(LOG[lo:hi], lo)], list(range(lo, hi)))
    return state


def _same(a: PartitionState, b: PartitionState) -> None:
    assert a.catalog.to_json() == b.catalog.to_json()
    assert a.rejected == b.rejected
    m = len(a.catalog)
    for name in a.cum:
        np.testing.assert_allclose(a.cum[name][:m], b.cum[name][:m], rtol=1e-12, err_msg=name)
    for name in a.reference:
        np.testing.assert_array_equal(a.reference[name][:m], b.reference[name][:m], name)
    assert (a.max_event_ms, a.closed) == (b.max_event_ms, b.closed)


WHOLE = _replay([])


def test_the_mixed_log_exercises_every_row_reason() -> None:
    for reason in ("late", "empty_model", "name_too_long", "reserved_name", "invalid_value"):
        assert WHOLE.rejected.get(reason, 0) > 0, reason
    assert {e.model for e in WHOLE.catalog.entries} == {"a", "b", "r"}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, len(LOG)), max_size=12))
def test_cuts_between_events_do_not_change_the_state(cuts: list[int]) -> None:
    """Event chunks cut anywhere (rejected rows included) give identical state."""
    _same(WHOLE, _replay(cuts))


def test_slicing_inside_ingest_does_not_change_the_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_module, "SLICE_ROWS", 97)
    _same(WHOLE, _replay([]))
    rows = [
        Row(
            "m",
            "v1",
            (T0 + i * 7) / 1000,
            0.01,
            0,
            "pq"[i % 2],
            0.5,
            "pq"[i % 3 % 2],
            f"s{i % 3}",
            {"f": float(i), "g": float(-i)} if i % 4 else None,
            "",
        )
        for i in range(1000)
    ]
    chunk = decode_batch(SchemaResolver().read(encode_batch(rows))[1], 0)
    sliced = PartitionState(CONFIG, 0)
    _ingest(sliced, [chunk], [0])
    monkeypatch.setattr(state_module, "SLICE_ROWS", 1 << 20)
    whole = PartitionState(CONFIG, 0)
    _ingest(whole, [chunk], [0])
    _same(whole, sliced)
    assert int(whole.ring["feat"].sum()) == sum(2 for i in range(1000) if i % 4)
