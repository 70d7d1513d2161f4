"""Labels joined to their predictions inside one partition's state (pure, no Kafka).

The oracle is scikit-learn on the (prediction, label) pairs the test joins itself;
the counts of unmatched labels by reason and of expired predictions are exact.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    precision_score,
    recall_score,
)

from aggregator.decode import SchemaResolver, decode_batch
from aggregator.join.joiner import LABEL_REASONS, JoinLimits
from aggregator.join.labels import LabelChunk, LabelChunkBuilder
from aggregator.metrics import build_families
from aggregator.state import Marker, PartitionState, StateConfig
from producer.encode import Row, encode_batch

T0 = 1_700_000_000_000
PANE = 1000
CONFIG = StateConfig(
    pane_ms=PANE,
    windows_ms=(10_000, 60_000),
    lateness_ms=1000,
    drift_reference_ms=10_000,
    join=JoinLimits(ttl_ms=30_000, wait_ms=5_000, max_pending=10_000, max_early=1000),
)
CLASSES = ("a", "b", "c")


def _predictions(n: int, seed: int, start_ms: int = T0, model: str = "m") -> list[Row]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        t = (start_ms + i * 7) / 1000
        rows.append(
            Row(model, "v1", t, 0.01, 0, CLASSES[int(rng.integers(3))], float(rng.uniform(0.3, 1)),
                None, None, None, f"{model}-{seed}-{i}")
        )  # fmt: skip
    return rows


def _ingest(state: PartitionState, rows: list[Row], offset: int) -> int:
    resolver = SchemaResolver()
    chunks: list[Any] = []
    for k in range(0, len(rows), 100):
        part = rows[k : k + 100]
        chunks.append(decode_batch(resolver.read(encode_batch(part))[1], offset + len(chunks)))
    offs = np.arange(offset, offset + len(chunks), dtype=np.int64)
    state.ingest(chunks, offs, np.full(len(chunks), 2 * T0), offset + len(chunks))
    return offset + len(chunks)


def _close(state: PartitionState, t_ms: int, offset: int) -> int:
    state.ingest([Marker(offset, t_ms)], np.array([offset]), np.array([2 * T0]), offset + 1)
    return offset + 1


def _labels(items: list[tuple[str, Any, int]], offset: int, model: str = "m") -> LabelChunk:
    b = LabelChunkBuilder()
    for i, (event_id, label, t_ms) in enumerate(items):
        record = {"event_id": event_id, "event_time_ms": t_ms, "model": model, "label": label}
        b.add(record, offset + i)
    return b.build()


def _gauge(state: PartitionState, name: str, **labels: str) -> float | None:
    for f in build_families([state.view()], state.config):
        if f.name != name or f.values is None:
            continue
        for lab, value in zip(f.label_values, f.values.tolist(), strict=True):
            got = dict(zip(f.label_names, lab, strict=True))
            if all(got.get(k) == v for k, v in labels.items()) and not math.isnan(value):
                return float(value)
    return None


def test_late_labels_count_when_joined_and_equal_sklearn() -> None:
    state = PartitionState(CONFIG, 0)
    preds = _predictions(600, seed=1)
    off = _ingest(state, preds, 0)
    rng = np.random.default_rng(2)
    # Labels for half of them, 2-4 s after the last prediction: joined in later panes.
    chosen = [p for p in preds if rng.random() < 0.5]
    label_t = T0 + 600 * 7 + 2000
    labels = [(p.event_id, CLASSES[int(rng.integers(3))], label_t) for p in chosen]
    result = state.ingest_labels(_labels(labels, 0), len(labels))
    assert result.accepted == len(labels) and not result.offsets.size
    assert state.join is not None and len(state.join.pending) == 600 - len(labels)
    _close(state, label_t + 5000, off)
    y_true = [lab for _, lab, _ in labels]
    y_pred = [p.prediction for p in chosen]
    mv = 0
    cum = state.cum
    names = {n: i for i, n in enumerate(state.view().entries[mv][4]) if n}
    idx = [names[c] for c in CLASSES]
    got = cum["conf"][mv][np.ix_(idx, idx)]
    assert (got == confusion_matrix(y_true, y_pred, labels=list(CLASSES))).all()
    assert int(cum["joined"][mv]) == len(labels)
    acc = _gauge(state, "model_accuracy", model="m", window="10s")
    assert acc == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    for fam, fn in (
        ("model_precision", precision_score),
        ("model_recall", recall_score),
        ("model_f1_score", f1_score),
    ):
        per = fn(y_true, y_pred, labels=list(CLASSES), average=None, zero_division=0)
        for cls, want in zip(CLASSES, per, strict=True):
            got = _gauge(state, fam, model="m", window="10s", **{"class": cls})
            assert got == pytest.approx(want, abs=1e-12), (fam, cls)
        macro = fn(y_true, y_pred, labels=list(CLASSES), average="macro", zero_division=0)
        got = _gauge(state, fam, model="m", window="10s", **{"class": "macro"})
        assert got == pytest.approx(macro, abs=1e-12), (fam, "macro")
    # Delay: label time - prediction time, all between 2 s and 6.2 s.
    delay = cum["delay"][mv]
    assert delay.sum() == len(labels) and delay[:1].sum() == 0
    assert _gauge(state, "model_pending_predictions", model="m") == 600 - len(labels)


def test_duplicates_unknown_expired_and_early_labels_by_reason() -> None:
    state = PartitionState(CONFIG, 0)
    preds = _predictions(100, seed=3)
    off = _ingest(state, preds, 0)
    t = T0 + 1000
    first = [(preds[0].event_id, "a", t), (preds[0].event_id, "b", t)]  # a duplicate
    res = state.ingest_labels(_labels(first, 0), 2)
    assert [LABEL_REASONS[r] for r in res.reasons] == ["duplicate_label"]
    # A label before its prediction waits; the prediction joins it.
    early = [("m-9-0", "c", t)]
    res = state.ingest_labels(_labels(early, 2), 3)
    assert not res.offsets.size and state.join is not None and len(state.join.early) == 1
    later = _predictions(1, seed=9, start_ms=T0 + 2000)
    off = _ingest(state, later, off)
    assert len(state.join.early) == 0 and state.join.per_mv["pending"][0] == 99
    # A label whose prediction never comes: unknown once the wait (5 s) has passed.
    res = state.ingest_labels(_labels([("nope", "a", T0 + 2500)], 3), 4)
    assert not res.offsets.size
    off = _ingest(state, _predictions(1, seed=10, start_ms=T0 + 9000), off)
    # ...dead-lettered with the next labels.
    res = state.ingest_labels(_labels([], 4), 4)
    assert [LABEL_REASONS[r] for r in res.reasons] == ["unknown_prediction"]
    assert res.offsets.tolist() == [3]
    # Expiry after the time to live (30 s): counted per model version, and a label for
    # an expired prediction is told apart.
    off = _close(state, T0 + 40_000, off)
    assert state.join.per_mv["expired"][0] == 99 + 1  # + the seed-10 prediction
    res = state.ingest_labels(_labels([(preds[5].event_id, "a", T0 + 40_000)], 5), 6)
    assert [LABEL_REASONS[r] for r in res.reasons] == ["expired_prediction"]
    assert _gauge(state, "model_label_coverage", model="m") == pytest.approx(2 / 102)
    counts = dict(zip(LABEL_REASONS, state.join.unmatched.tolist(), strict=True))
    assert counts["duplicate_label"] == 1 and counts["unknown_prediction"] == 1
    assert counts["expired_prediction"] == 1


def test_a_wrong_model_or_kind_does_not_use_up_the_prediction() -> None:
    state = PartitionState(CONFIG, 0)
    preds = _predictions(10, seed=4)
    _ingest(state, preds, 0)
    t = T0 + 1000
    res = state.ingest_labels(_labels([(preds[0].event_id, "a", t)], 0, model="other"), 1)
    res2 = state.ingest_labels(_labels([(preds[0].event_id, 1.5, t)], 1), 2)
    assert [LABEL_REASONS[r] for r in [*res.reasons, *res2.reasons]] == [
        "model_mismatch",
        "label_kind_mismatch",
    ]
    ok = state.ingest_labels(_labels([(preds[0].event_id, "b", t)], 2), 3)
    assert ok.accepted == 1 and not ok.offsets.size


def test_regression_labels_join_into_the_error_measures() -> None:
    state = PartitionState(CONFIG, 0)
    rng = np.random.default_rng(5)
    rows = [
        Row("r", "v1", (T0 + i * 10) / 1000, 0.01, 0, float(rng.normal(5, 2)), None, None,
            None, None, f"r-{i}")
        for i in range(300)
    ]  # fmt: skip
    off = _ingest(state, rows, 0)
    truth = {r.event_id: float(r.prediction) + float(rng.normal()) for r in rows[::2]}
    t = T0 + 3500
    state.ingest_labels(_labels([(k, v, t) for k, v in truth.items()], 0, model="r"), 150)
    _close(state, t + 3000, off)
    pred = [float(r.prediction) for r in rows[::2]]
    mae = _gauge(state, "model_mae", model="r", window="10s")
    assert mae == pytest.approx(mean_absolute_error(list(truth.values()), pred), rel=1e-12)


@settings(max_examples=15, deadline=None)
@given(cut=st.integers(0, 3), max_bytes=st.sampled_from([3000, 50_000]))
def test_a_snapshot_mid_join_restores_the_same_state(cut: int, max_bytes: int) -> None:
    """Records (join chunks, then the head) written and read back at any point of the
    sequence leave the same counters, stores and gauges as never stopping."""
    preds = _predictions(400, seed=6)
    steps: list[tuple[str, Any]] = [
        ("p", preds[:200]),
        ("l", [(p.event_id, "a", T0 + 1500) for p in preds[:150:3]] + [("x", "b", T0 + 1500)]),
        ("p", preds[200:]),
        ("l", [(p.event_id, "c", T0 + 3000) for p in preds[150::4]]),
    ]

    def run(stop_at: int | None) -> PartitionState:
        state = PartitionState(CONFIG, 0)
        off = lab_off = 0
        for i, (kind, items) in enumerate(steps):
            if stop_at == i:
                state = PartitionState.from_records(state.to_records(max_bytes), CONFIG)
            if kind == "p":
                off = _ingest(state, items, off)
            else:
                state.ingest_labels(_labels(items, lab_off), lab_off + len(items))
                lab_off += len(items)
        _close(state, T0 + 20_000, off)
        return state

    whole, cut_run = run(None), run(cut)
    for k in ("conf", "joined", "delay"):
        assert (whole.cum[k] == cut_run.cum[k]).all(), k
    assert whole.join is not None and cut_run.join is not None
    assert (whole.join.unmatched == cut_run.join.unmatched).all()
    assert len(whole.join.pending) == len(cut_run.join.pending)
    assert cut_run.join.next_offset == whole.join.next_offset


def test_without_a_join_nothing_is_kept_and_snapshots_are_as_before() -> None:
    state = PartitionState(dataclasses.replace(CONFIG, join=None), 0)
    _ingest(state, _predictions(50, seed=7), 0)
    assert state.join is None and PartitionState.chunks_before(state.to_bytes()) == 0
    with pytest.raises(RuntimeError, match="no join"):
        state.ingest_labels(_labels([], 0), 0)


def test_labels_days_later_join_within_the_time_to_live_and_not_after() -> None:
    """Simulated days of event time: 7 days to live (the default); labels 2 and 6 days
    late join (and land in their delay buckets), one 8 days late finds it expired."""
    day = 86_400_000
    config = dataclasses.replace(CONFIG, join=JoinLimits())
    state = PartitionState(config, 0)
    preds = _predictions(3, seed=12)
    off = _ingest(state, preds, 0)
    state.ingest_labels(_labels([(preds[0].event_id, "a", T0 + 2 * day)], 0), 1)
    off = _ingest(state, _predictions(1, seed=13, start_ms=T0 + 6 * day), off)
    state.ingest_labels(_labels([(preds[1].event_id, "b", T0 + 6 * day)], 1), 2)
    off = _ingest(state, _predictions(1, seed=14, start_ms=T0 + 8 * day), off)
    res = state.ingest_labels(_labels([(preds[2].event_id, "c", T0 + 8 * day)], 2), 3)
    assert [LABEL_REASONS[r] for r in res.reasons] == ["expired_prediction"]
    _close(state, T0 + 9 * day, off)
    assert state.join is not None
    assert int(state.join.per_mv["expired"][0]) == 1  # preds[2]; the day-6 one has days left
    delay = state.cum["delay"][0]
    bounds = [1, 10, 60, 300, 900, 3600, 21600, 86400, 259200, 604800, 1209600, 2592000]
    assert delay[bounds.index(259200)] == 1  # 2 days: the (1d, 3d] bucket
    assert delay[bounds.index(604800)] == 1  # 6 days: (3d, 7d]
    assert int(state.cum["joined"][0]) == 2


def test_only_the_listed_models_wait_for_labels() -> None:
    join = dataclasses.replace(CONFIG.join, models=frozenset({"m"}))  # type: ignore[type-var]
    state = PartitionState(dataclasses.replace(CONFIG, join=join), 0)
    off = _ingest(state, _predictions(50, seed=15, model="m"), 0)
    _ingest(state, _predictions(70, seed=16, model="other"), off)
    assert state.join is not None
    assert len(state.join.pending) == 50
    assert state.view().join is not None
