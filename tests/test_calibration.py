"""Calibration, the label-free accuracy estimate and the binned KS / Wasserstein-1 drift
scores, end to end through the pure core (rows -> PartitionState -> build_families), on
two partitions, against scikit-learn / scipy / numpy computed offline on the same rows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from scipy import stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss

from aggregator.decode import Marker, SchemaResolver, decode_batch
from aggregator.metrics import build_families
from aggregator.state import DRIFT_BINS, PartitionState, StateConfig
from producer.encode import Row, encode_batch

PANE, LATE = 1000, 2000
T0 = 1_700_000_000_000
SPAN = 20_000  # ms of traffic; the windows below end at T0 + SPAN
CONFIG = StateConfig(
    pane_ms=PANE, windows_ms=(5000, 10_000), lateness_ms=LATE, drift_reference_ms=5000
)
OK, ERROR = 0, 1
POSITIVE, NEGATIVE = "fraud", "legit"
# Model -> partition: two partitions, as two shards would own them.
PARTITIONS = {"binary": 0, "reg": 0, "multi": 1}


def _rows(seed: int = 7, per_model: int = 3000) -> list[Row]:
    rng = np.random.default_rng(seed)
    rows: list[Row] = []
    for model in PARTITIONS:
        times = np.sort(rng.integers(T0, T0 + SPAN, per_model))
        # Traffic drifts over time: the reference (first 5 s) differs from later windows.
        shift = (times - T0) / SPAN
        for i, t in enumerate(times.tolist()):
            outcome = ERROR if rng.random() < 0.1 else OK
            x = float(rng.normal(shift[i], 1.0 + shift[i]))
            score: float | None
            if model == "reg":
                pred: Any = float(rng.normal(10 * shift[i], 5))
                label: Any = pred + float(rng.normal()) if rng.random() < 0.5 else None
                score = None
            elif model == "binary":
                # The model reports P(positive); the event's score is the probability of
                # the predicted class (README: "score").
                p_pos = float(rng.beta(2, 2 + 3 * shift[i]))
                pred = POSITIVE if p_pos >= 0.5 else NEGATIVE
                score = p_pos if pred == POSITIVE else 1.0 - p_pos
                truth = POSITIVE if rng.random() < p_pos**1.5 else NEGATIVE  # over-confident
                label = truth if rng.random() < 0.7 else None
                if rng.random() < 0.05:
                    score = None  # a prediction without a score
            else:
                classes = ["a", "b", "c"]
                pred = classes[int(rng.integers(3))]
                score = float(rng.uniform(1 / 3, 1))
                right = rng.random() < score * 0.9
                label = pred if right else classes[int(rng.integers(3))]
                label = label if rng.random() < 0.8 else None
            if outcome != OK:
                pred, label = None, None  # an error still may carry a score
            rows.append(
                Row(model, "v1", t / 1000, 0.01, outcome, pred, score, label, None, {"x": x}, "")
            )
    return rows


def _state(rows: list[Row], partition: int) -> PartitionState:
    """Ingest one partition's rows in time order, then a marker that closes every pane."""
    mine = sorted((r for r in rows if PARTITIONS[r.model] == partition), key=lambda r: r.time)
    resolver = SchemaResolver()
    chunks: list[Any] = []
    start = 0
    while start < len(mine):  # envelopes of consecutive rows of one model, as a producer
        end = start + 1
        while end < len(mine) and end - start < 50 and mine[end].model == mine[start].model:
            end += 1
        chunks.append(decode_batch(resolver.read(encode_batch(mine[start:end]))[1], len(chunks)))
        start = end
    chunks.append(Marker(len(chunks), T0 + SPAN + LATE))
    state = PartitionState(CONFIG, partition)
    offsets = np.arange(len(chunks), dtype=np.int64)
    state.ingest(chunks, offsets, np.full(len(chunks), 2 * T0), len(chunks))
    assert state.window_end_ms == T0 + SPAN
    return state


Samples = dict[str, list[tuple[dict[str, str], float]]]


def _samples(states: list[PartitionState]) -> Samples:
    out: Samples = {}
    for f in build_families([s.view() for s in states], CONFIG):
        if f.values is None:
            continue
        for labels, value in zip(f.label_values, f.values.tolist(), strict=True):
            if not math.isnan(value):
                out.setdefault(f.name, []).append(
                    (dict(zip(f.label_names, labels, strict=True)), value)
                )
    return out


def _one(samples: Samples, name: str, **labels: str) -> float | None:
    found = [
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    ]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


@pytest.fixture(scope="module")
def data() -> tuple[list[Row], Samples]:
    rows = _rows()
    return rows, _samples([_state(rows, 0), _state(rows, 1)])


def _ms(r: Row) -> int:
    return math.floor(float(r.time) * 1000)


def _in(rows: list[Row], model: str, lo_ms: int, hi_ms: int) -> list[Row]:
    return [r for r in rows if r.model == model and lo_ms <= _ms(r) < hi_ms]


@pytest.mark.parametrize("model", ["binary", "multi"])
@pytest.mark.parametrize("window_ms", [5000, 10_000])
def test_window_calibration_equals_sklearn(
    data: tuple[list[Row], Samples], model: str, window_ms: int
) -> None:
    rows, samples = data
    sel = _in(rows, model, T0 + SPAN - window_ms, T0 + SPAN)
    lab = dict(model=model, version="v1", window=f"{window_ms // 1000}s")
    predicted = [r for r in sel if r.outcome == OK and r.prediction is not None]
    scored = np.array([r.score for r in predicted if r.score is not None])
    estimated = _one(samples, "model_estimated_accuracy", **lab)
    assert estimated == pytest.approx(scored.mean(), abs=1e-12)
    # Errors carry scores too, and stay out of the estimate.
    assert any(r.outcome != OK and r.score is not None for r in sel)

    labelled = [r for r in predicted if r.label is not None]
    accuracy = accuracy_score([r.label for r in labelled], [r.prediction for r in labelled])
    assert _one(samples, "model_accuracy", **lab) == pytest.approx(accuracy, abs=1e-12)
    gap = _one(samples, "model_accuracy_gap", **lab)
    assert gap == pytest.approx(scored.mean() - accuracy, abs=1e-12)

    cal = [r for r in labelled if r.score is not None]
    score = np.array([r.score for r in cal])
    correct = np.array([r.label == r.prediction for r in cal], dtype=np.int64)
    assert _one(samples, "model_brier_score", **lab) == pytest.approx(
        brier_score_loss(correct, score), abs=1e-12
    )
    assert _one(samples, "model_log_loss", **lab) == pytest.approx(
        log_loss(correct, score, labels=[0, 1]), abs=1e-12
    )
    prob_true, prob_pred = calibration_curve(correct, score, n_bins=10)
    n_b = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], score), minlength=10)
    ece = float(np.sum(n_b[n_b > 0] / len(score) * np.abs(prob_true - prob_pred)))
    assert _one(samples, "model_expected_calibration_error", **lab) == pytest.approx(ece, abs=1e-12)


def test_calibration_counters_are_the_reliability_bins(data: tuple[list[Row], Samples]) -> None:
    rows, samples = data
    for model in ("binary", "multi"):
        cal = [
            r
            for r in _in(rows, model, T0, T0 + SPAN)
            if r.outcome == OK and r.label is not None and r.score is not None
        ]
        score = np.array([r.score for r in cal])
        correct = np.array([r.label == r.prediction for r in cal])
        edges = np.linspace(0, 1, 11)
        b = np.searchsorted(edges[1:-1], score)
        prob_true, _ = calibration_curve(correct, score, n_bins=10)
        got_true = []
        for k in range(10):
            upper = format((k + 1) / 10, "g")
            lab = dict(model=model, version="v1", bin=upper)
            n_true = _one(samples, "model_calibration", **lab, correct="true")
            n_false = _one(samples, "model_calibration", **lab, correct="false")
            want = (int((correct & (b == k)).sum()), int((~correct & (b == k)).sum()))
            if not any(want):
                assert n_true is None and n_false is None
                continue
            assert (n_true, n_false) == want, (model, upper)
            got_true.append(want[0] / sum(want))
        # The reliability diagram: accuracy per bin, as sklearn draws it.
        assert got_true == pytest.approx(prob_true.tolist(), abs=1e-12)
    assert not [lab for lab, _ in samples["model_calibration"] if lab["model"] == "reg"]
    assert _one(samples, "model_expected_calibration_error", model="reg", window="5s") is None


def _drift_bin(values: np.ndarray) -> np.ndarray:
    """The documented binning: 64 bins of width 0.25 over asinh(x) in [-8, 8], ends open."""
    return np.clip(np.floor((np.arcsinh(values) + 8.0) * 4.0), 0, DRIFT_BINS - 1).astype(int)


def _binned_ks(ref: np.ndarray, cur: np.ndarray) -> float:
    """max |CDF difference| of two binned samples, through scipy's rv_histogram."""
    edges = np.arange(len(ref) + 1, dtype=np.float64)
    f_ref = stats.rv_histogram((ref.astype(float), edges), density=False).cdf(edges)
    f_cur = stats.rv_histogram((cur.astype(float), edges), density=False).cdf(edges)
    return float(np.max(np.abs(f_ref - f_cur)))


@pytest.mark.parametrize("window_ms", [5000, 10_000])
def test_binned_ks_and_wasserstein_equal_scipy(
    data: tuple[list[Row], Samples], window_ms: int
) -> None:
    rows, samples = data
    wl = f"{window_ms // 1000}s"
    score_bounds = np.asarray(CONFIG.score_bounds)
    score_centers = np.append((np.concatenate([[0.0], score_bounds[:-1]]) + score_bounds) / 2, 1)
    drift_centers = -8.0 + (np.arange(DRIFT_BINS) + 0.5) * 0.25
    checked = 0
    for model in PARTITIONS:
        first = min(_ms(r) for r in rows if r.model == model) // PANE
        ref_rows = _in(rows, model, (first + 1) * PANE, (first + 6) * PANE)
        cur_rows = _in(rows, model, T0 + SPAN - window_ms, T0 + SPAN)

        def hist(rs: list[Row], what: str) -> np.ndarray:
            if what == "score":
                s = np.array([r.score for r in rs if r.score is not None])
                return np.bincount(np.searchsorted(score_bounds, s), minlength=21)
            if what == "prediction_value":
                v = np.array([r.prediction for r in rs if r.prediction is not None])
            else:
                v = np.array([r.features["x"] for r in rs])  # type: ignore[index]
            return np.bincount(_drift_bin(v), minlength=DRIFT_BINS)

        for what, centers in (
            ("score", score_centers),
            ("prediction_value", drift_centers),
            ("feature:x", drift_centers),
        ):
            lab = dict(model=model, version="v1", window=wl, feature=what)
            if (model == "reg") == (what == "score") and what != "feature:x":
                assert _one(samples, "model_drift_score", **lab, method="ks") is None
                continue
            ref, cur = hist(ref_rows, what), hist(cur_rows, what)
            w1 = stats.wasserstein_distance(centers, centers, u_weights=ref, v_weights=cur)
            got_w1 = _one(samples, "model_drift_score", **lab, method="wasserstein")
            assert got_w1 == pytest.approx(w1, abs=1e-9), (model, what)
            got_ks = _one(samples, "model_drift_score", **lab, method="ks")
            assert got_ks == pytest.approx(_binned_ks(ref, cur), abs=1e-9), (model, what)
            if what == "feature:x":
                assert got_ks > 0.05 and got_w1 > 0.05, "the generated feature drifts"
            checked += 1
        # Class predictions: PSI and JS only (classes have no order).
        if model != "reg":
            lab = dict(model=model, window=wl, feature="prediction")
            methods = {
                x["method"] for x, _ in samples["model_drift_score"] if lab.items() <= x.items()
            }
            assert methods == {"psi", "js"}
    assert checked == 6


def test_the_series_estimate_bounds_a_model_version_with_every_measure() -> None:
    """settings' worst case per model version (which sizes the model-version cap) is not
    below the lines a model version with every class, feature, segment, score bin,
    drift method and calibration measure really exports."""
    from aggregator.settings import AggregatorSettings
    from aggregator.state.measures import lines_per_model_version

    s = AggregatorSettings(
        pane="1s",
        windows="5s,10s",
        lateness="2s",
        drift_reference="5s",
        max_classes=3,
        max_features=2,
        max_segments=2,
    )
    config = s.state_config()
    rng = np.random.default_rng(3)
    rows = []
    for i in range(4000):
        t = (T0 + i * 5) / 1000
        outcome = [0, 0, 0, 1, 2, 3][i % 6]
        feats = {"f1": float(rng.normal()), "f2": float(rng.normal())}
        seg = ["s1", "s2"][i % 2]
        pred, label = ["a", "b"][i % 2], ["a", "b"][(i // 2) % 2]
        score = float(rng.random())
        rows.append(Row("c", "v1", t, 0.01 * (i % 9), outcome, pred, score, label, seg, feats, ""))
        value = float(rng.normal(0, 20))
        rows.append(
            Row("r", "v1", t, 0.01 * (i % 9), outcome, value, score, value + 1, seg, feats, "")
        )
    resolver = SchemaResolver()
    chunks: list[Any] = []
    for k in range(0, len(rows), 100):  # one model per envelope, in time order
        for model in ("c", "r"):
            part = [r for r in rows[k : k + 100] if r.model == model]
            chunks.append(decode_batch(resolver.read(encode_batch(part))[1], len(chunks)))
    chunks.append(Marker(len(chunks), T0 + 20_000 + 2000))
    state = PartitionState(config, 0)
    n = len(chunks)
    state.ingest(chunks, np.arange(n), np.full(n, 2 * T0), n)
    assert state.has_reference[:2].all()
    families = build_families([state.view()], config)
    drift = next(f for f in families if f.name == "model_drift_score")
    assert {lab[-1] for lab in drift.label_values} == {"psi", "js", "ks", "wasserstein"}
    lines: dict[str, int] = {}
    for f in families:
        if "model" not in f.label_names:
            continue
        at = f.label_names.index("model")
        width = len(f.upper_bounds) + 3 if f.kind == "histogram" else 1
        values = f.buckets if f.kind == "histogram" else f.values
        assert values is not None
        for labels, row in zip(f.label_values, values, strict=True):
            if not np.isnan(row).any():
                lines[labels[at]] = lines.get(labels[at], 0) + width
    budget = lines_per_model_version(config, len(config.windows_ms))
    assert 0 < max(lines.values()) <= budget, (lines, budget)
