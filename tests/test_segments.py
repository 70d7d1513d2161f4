"""Quality per segment: state + exported counters against scikit-learn and numpy.

Rows of one classifier and one regressor are spread over two partitions (two
``PartitionState`` objects), exported with ``build_families`` and summed over the
``partition`` label, as the recording rules sum them; the measures computed from the
sums (``class_count_metrics``, ``regression_metrics``) must equal scikit-learn's and
numpy's on the raw rows. Segments beyond ``max_segments`` fold into ``__overflow__``
per partition, in order of first appearance, which the oracle replays.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any

import numpy as np
import pytest
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from aggregator.catalog import OVERFLOW, Limits
from aggregator.decode import Marker, SchemaResolver, decode_batch
from aggregator.exposition import Family
from aggregator.metrics import build_families
from aggregator.quality import class_count_metrics, regression_metrics
from aggregator.settings import AggregatorSettings
from aggregator.state import PartitionState, StateConfig
from producer.encode import Row, encode_batch

T0 = 1_700_000_000_000
MAX_SEGMENTS = 4  # three named segments a model version, the rest folded
CONFIG = StateConfig(
    pane_ms=1000,
    windows_ms=(5000,),
    lateness_ms=1000,
    drift_reference_ms=5000,
    limits=Limits(max_segments=MAX_SEGMENTS, max_classes=8),
)
CLASSES = ("x", "y", "z")
SEGMENTS = ("eu", "us", "apac", "latam", "mena", None)


def _rows(seed: int, n: int) -> list[Row]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        t = (T0 + i * 7) / 1000  # in time order: nothing late
        seg = SEGMENTS[int(rng.integers(len(SEGMENTS)))]
        outcome = 0 if rng.random() < 0.9 else 1
        if rng.random() < 0.5:
            label = CLASSES[int(rng.integers(3))] if rng.random() < 0.8 else None
            # Skewed so that the segments differ in quality.
            right = rng.random() < (0.8 if seg in ("eu", None) else 0.4)
            pred = label if right and label is not None else CLASSES[int(rng.integers(3))]
            rows.append(Row("c", "v1", t, 0.01, outcome, pred, 0.7, label, seg, None, ""))
        else:
            value = float(rng.normal(10, 3))
            truth = value + float(rng.normal(0, 1 if seg == "eu" else 3))
            lv = truth if rng.random() < 0.8 else None
            rows.append(Row("r", "v1", t, 0.01, outcome, value, None, lv, seg, None, ""))
    return rows


def _state(rows: list[Row], partition: int, close: bool = True) -> PartitionState:
    resolver = SchemaResolver()
    chunks: list[Any] = []
    for k in range(0, len(rows), 50):
        for model in ("c", "r"):
            part = [r for r in rows[k : k + 50] if r.model == model]
            if part:
                chunks.append(decode_batch(resolver.read(encode_batch(part))[1], len(chunks)))
    if close:
        chunks.append(Marker(len(chunks), T0 + len(rows) * 7 + 60_000))
    state = PartitionState(CONFIG, partition)
    n = len(chunks)
    state.ingest(chunks, np.arange(n), np.full(n, 2 * T0), n)
    return state


def _fold(rows: list[Row]) -> list[str | None]:
    """The exported segment of each row of one partition: the catalog's cap replayed."""
    named: dict[tuple[str, str], list[str]] = defaultdict(list)
    out: list[str | None] = []
    for r in rows:
        if r.segment is None:
            out.append(None)
            continue
        seen = named[(r.model, r.version)]
        if r.segment not in seen and len(seen) < MAX_SEGMENTS - 1:
            seen.append(r.segment)
        out.append(r.segment if r.segment in seen else OVERFLOW)
    return out


def _summed(families: list[Family], name: str) -> dict[tuple[str, ...], float]:
    """Values of one family summed over ``partition``, keyed by the other labels."""
    family = next(f for f in families if f.name == name)
    assert family.values is not None
    at = family.label_names.index("partition")
    sums: dict[tuple[str, ...], float] = defaultdict(float)
    for labels, value in zip(family.label_values, family.values.tolist(), strict=True):
        sums[labels[:at] + labels[at + 1 :]] += value
    return dict(sums)


def _split() -> tuple[list[Row], list[list[Row]]]:
    rows = _rows(7, 4000)
    rng = np.random.default_rng(8)
    side = rng.integers(2, size=len(rows))
    return rows, [[r for r, s in zip(rows, side, strict=True) if s == p] for p in (0, 1)]


def test_segment_quality_equals_sklearn_and_numpy_over_two_partitions() -> None:
    _, parts = _split()
    states = [_state(p, i) for i, p in enumerate(parts)]
    families = build_families([s.view() for s in states], CONFIG)
    actual = _summed(families, "model_segment_actual")
    predicted = _summed(families, "model_segment_predicted")
    correct = _summed(families, "model_segment_correct")
    labelled = _summed(families, "model_segment_labeled_predictions")
    abs_err = _summed(families, "model_segment_absolute_error")
    sq_err = _summed(families, "model_segment_squared_error")

    # The oracle: accepted ok rows with both label and prediction, by exported segment.
    by_seg: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for p in parts:
        for r, seg in zip(p, _fold(p), strict=True):
            if seg is not None and r.outcome == 0 and r.label is not None:
                by_seg[(r.model, seg)].append(r)
    assert set(by_seg) == {(k[0], k[2]) for k in labelled}  # the same segments, no more
    assert any(s == OVERFLOW for _, s in by_seg)  # the cap folded something, per partition
    checked = 0
    for (model, seg), rows in sorted(by_seg.items()):
        assert labelled[(model, "v1", seg)] == len(rows)
        if model == "r":
            err = np.array([r.prediction - r.label for r in rows])
            mae, rmse = regression_metrics(
                labelled[(model, "v1", seg)],
                abs_err[(model, "v1", seg)],
                sq_err[(model, "v1", seg)],
            )
            assert float(mae) == pytest.approx(np.mean(np.abs(err)), rel=1e-12)
            assert float(rmse) == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-12)
            checked += 1
            continue
        assert (model, "v1", seg) not in abs_err
        y_true = [r.label for r in rows]
        y_pred = [r.prediction for r in rows]
        seen = sorted(set(y_true) | set(y_pred))
        counts = np.array(
            [
                [
                    [table.get((model, "v1", seg, c), math.nan) for c in seen]
                    for table in (actual, predicted, correct)
                ]
            ]
        )
        assert not np.isnan(counts).any()  # all three roles of every class seen there
        m = class_count_metrics(counts[:, 0], counts[:, 1], counts[:, 2])
        assert float(m.accuracy[0]) == pytest.approx(accuracy_score(y_true, y_pred), rel=1e-12)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            p, r, f, _ = precision_recall_fscore_support(
                y_true, y_pred, labels=seen, average=None, zero_division=np.nan
            )
        np.testing.assert_allclose(m.precision[0], p, rtol=1e-12, equal_nan=True)
        np.testing.assert_allclose(m.recall[0], r, rtol=1e-12, equal_nan=True)
        np.testing.assert_allclose(m.f1[0], f, rtol=1e-12)
        checked += 1
    assert checked >= 8
    folded = _summed(families, "modelpulse_folded")
    assert folded[("segment",)] > 0


def test_only_closed_panes_are_counted_and_open_panes_close_exactly() -> None:
    rows = _rows(11, 1500)
    open_state = _state(rows, 0, close=False)
    closed_ms = open_state.window_end_ms
    done = [r for r in rows if r.time * 1000 < closed_ms]
    expected = sum(
        1
        for r, seg in zip(rows, _fold(rows), strict=True)
        if r.time * 1000 < closed_ms and seg is not None and r.outcome == 0 and r.label is not None
    )
    assert 0 < len(done) < len(rows)
    assert int(open_state.cum["seg_lab"].sum()) == expected
    assert (~open_state.open_closed).any()  # the newest panes are still open
    whole = _state(rows, 0)
    n = sum(
        1
        for r, seg in zip(rows, _fold(rows), strict=True)
        if seg is not None and r.outcome == 0 and r.label is not None
    )
    assert int(whole.cum["seg_lab"].sum()) == n > expected
    # Actual and predicted each count every labelled classification with a segment.
    cls = whole.cum["seg_cls"]
    n_cls = sum(
        1
        for r, seg in zip(rows, _fold(rows), strict=True)
        if r.model == "c" and seg is not None and r.outcome == 0 and r.label is not None
    )
    assert int(cls[:, :, 0].sum()) == int(cls[:, :, 1].sum()) == n_cls
    assert 0 < int(cls[:, :, 2].sum()) < n_cls


def test_series_estimate_covers_the_segment_series() -> None:
    """Every class in every segment: the worst case ``_series_per_model_version`` bounds."""
    s = AggregatorSettings(
        pane="1s", windows="5s", lateness="1s", drift_reference="5s", max_segments=3,
        max_classes=4,
    )  # fmt: skip
    config = s.state_config()
    rows = []
    for i in range(400):
        c = "abcd"[i % 4]
        rows.append(
            Row("c", "v1", (T0 + i * 10) / 1000, 0.01, 0, c, 0.5, "abcd"[(i // 4) % 4],
                ["s1", "s2", "s3"][i % 3], None, "")
        )  # fmt: skip
    resolver = SchemaResolver()
    chunk = decode_batch(resolver.read(encode_batch(rows))[1], 0)
    state = PartitionState(config, 0)
    state.ingest([chunk, Marker(1, T0 + 60_000)], np.arange(2), np.full(2, 2 * T0), 2)
    families = build_families([state.view()], config)
    seg_lines = sum(len(f.label_values) for f in families if f.name.startswith("model_segment_"))
    assert seg_lines == 3 * (1 + 3 * 4)  # two named segments and the overflow, all full
    lines = sum(
        len(f.label_values) * (len(f.upper_bounds) + 3 if f.kind == "histogram" else 1)
        for f in families
        if "model" in f.label_names
    )
    assert lines <= s._series_per_model_version(len(config.windows_ms))


def test_segment_series_belong_to_their_model_version_unit() -> None:
    """--max-series leaves a model version out whole: its segment series go with it."""
    _, parts = _split()
    view = _state(parts[0], 0).view()
    full = build_families([view], CONFIG)
    lines = next(f for f in full if f.name == "modelpulse_series").values
    assert lines is not None
    by_model = {
        f.name: {labels[0] for labels in f.label_values}
        for f in full
        if f.name.startswith("model_segment_")
    }
    assert by_model["model_segment_labeled_predictions"] == {"c", "r"}

    # Lower the cap until one model version (the one first seen later) is left out.
    def models(families: list[Family], prefix: str) -> set[str]:
        return {lab[0] for f in families if f.name.startswith(prefix) for lab in f.label_values}

    cap = int(lines[0])
    while len(models(capped := build_families([view], CONFIG, max_series=cap), "model_info")) > 1:
        cap -= 1
    (kept,) = models(capped, "model_info")
    assert models(capped, "model_segment_") == {kept}  # the other's segment series went too
    dropped = next(f for f in capped if f.name == "modelpulse_series_dropped")
    assert dropped.values is not None and float(dropped.values[0]) > 0  # model_version
