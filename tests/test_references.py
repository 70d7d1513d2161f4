"""Drift references from training: build_reference, the modelpulse-reference CLI, binning
a document exactly as the aggregator bins live rows, and a real shard that measures
drift against a reference published to the references topic."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from shards import Samples, ShardProcess, send_markers, total, wait_until

from aggregator.decode import RowChunk, SchemaResolver, decode_batch
from aggregator.metrics import build_families
from aggregator.references import bin_reference, resolve_references
from aggregator.state import PartitionState, StateConfig, load_reference_file
from producer import PublisherSettings, build_reference, publish_reference
from producer.encode import Row, encode_batch
from producer.reference import encode_reference, main, reference_key
from schemas.wire import SchemaId

CONFIG = StateConfig(pane_ms=1000, windows_ms=(5000, 10_000), lateness_ms=2000,
                     drift_reference_ms=5000)  # fmt: skip
SCORE_BOUNDS = np.asarray(CONFIG.score_bounds)
T0_MS = 1_700_000_000_000
CLASSES = ["a", "b", "c"]


# -- offline oracles: written from the README's definitions, not from the aggregator ----


def _score_bins(scores: Any) -> np.ndarray:
    """Bucket k holds (bound[k-1], bound[k]]: Prometheus' le semantics, +Inf last."""
    s = np.asarray(scores, dtype=np.float64)
    k = np.array([sum(1 for b in SCORE_BOUNDS if b < x) for x in s], dtype=np.int64)
    return np.bincount(k, minlength=len(SCORE_BOUNDS) + 1)


def _asinh_bins(values: Any) -> np.ndarray:
    """64 bins of width 0.25 over asinh(x) in [-8, 8], the end bins taking the rest."""
    x = np.arcsinh(np.asarray(values, dtype=np.float64))
    k = np.clip(np.floor((x + 8.0) / 0.25), 0, 63).astype(np.int64)
    return np.bincount(k, minlength=64)


def _psi(ref: np.ndarray, cur: np.ndarray) -> float:
    r = np.maximum(ref / ref.sum(), 1e-6)
    c = np.maximum(cur / cur.sum(), 1e-6)
    return float(((c - r) * np.log(c / r)).sum())


def _js(ref: np.ndarray, cur: np.ndarray) -> float:
    return float(jensenshannon(ref, cur, base=2))


def _class_counts(ref: list[str], cur: list[str]) -> tuple[np.ndarray, np.ndarray]:
    names = sorted(set(ref) | set(cur))
    return (
        np.array([ref.count(n) for n in names], dtype=np.float64),
        np.array([cur.count(n) for n in names], dtype=np.float64),
    )


# -- build_reference ---------------------------------------------------------------------


def test_build_reference_samples_with_a_fixed_seed_and_drops_missing_values() -> None:
    rng = np.random.default_rng(1)
    scores = rng.random(25_000)
    x = rng.normal(size=25_000)
    x[::10] = np.nan
    doc = build_reference(
        "m", "v", scores=scores, predictions=list(rng.choice(CLASSES, 25_000)),
        features={"x": x, "few": [1.0, math.inf, 3.0]}, sample_limit=10_000,
    )  # fmt: skip
    again = build_reference("m", "v", scores=scores, features={"x": x}, sample_limit=10_000)
    assert doc["rows"] == 25_000 and doc["sample_limit"] == 10_000
    assert len(doc["score"]) == 10_000 and doc["score"] == again["score"]
    assert set(doc["score"]) <= set(scores.tolist())
    assert len(doc["prediction_classes"]) == 10_000 and set(doc["prediction_classes"]) == set(
        CLASSES
    )
    xs = doc["features"][0]["values"]
    assert len(xs) == 10_000 and all(math.isfinite(v) for v in xs)
    assert xs == again["features"][0]["values"]
    assert doc["features"][1] == {"name": "few", "values": [1.0, 3.0]}
    # A small column is kept whole, in its order.
    small = build_reference("m", scores=[0.2, 0.1], predictions=[1.5, 2.5])
    assert small["version"] == "*" and small["score"] == [0.2, 0.1]
    assert small["prediction_values"] == [1.5, 2.5] and small["prediction_classes"] == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"model": "", "scores": [0.5]}, "model"),
        ({"model": "m", "version": "", "scores": [0.5]}, "version"),
        ({"model": "m", "scores": [0.5, 1.5]}, "scores"),
        ({"model": "m", "scores": ["x"]}, "scores"),
        ({"model": "m", "predictions": ["a", 1.0]}, "predictions"),
        ({"model": "m", "features": {"x": [[1.0, 2.0]]}}, r"features\['x'\]"),
        ({"model": "m"}, "no column"),
        ({"model": "m", "scores": [0.5], "sample_limit": 0}, "sample_limit"),
    ],
)
def test_build_reference_names_the_bad_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build_reference(**kwargs)


def test_reference_round_trips_through_the_wire_format() -> None:
    doc = build_reference("m", "v2", scores=[0.25], features={"x": [1.0, -2.0]})
    value = encode_reference(doc)
    kind, record = SchemaResolver().read(value)
    assert kind == SchemaId.DRIFT_REFERENCE == 6
    assert record == dict(doc)
    assert reference_key("m", "v2") == b"m\x00v2"


# -- binning -----------------------------------------------------------------------------


def test_bin_reference_equals_the_offline_bins() -> None:
    rng = np.random.default_rng(2)
    scores = rng.random(3000)
    scores[:20] = SCORE_BOUNDS[:20]  # values on a bound belong to the bucket below
    x = rng.normal(0, 50, 3000)
    preds = rng.normal(10, 400, 3000)
    doc = build_reference("m", "v", scores=scores, predictions=preds, features={"x": x})
    ref = bin_reference(doc, CONFIG)
    assert ref.score is not None and ref.score.tolist() == _score_bins(scores).tolist()
    assert ref.features["x"].tolist() == _asinh_bins(x).tolist()
    assert ref.pred_hist is not None and ref.pred_hist.tolist() == _asinh_bins(preds).tolist()
    assert ref.classes is None
    # Other score buckets, same document: the aggregator's bins decide.
    coarse = StateConfig(pane_ms=1000, windows_ms=(5000,), drift_reference_ms=5000,
                         score_bounds=(0.5, 1.0))  # fmt: skip
    two = bin_reference(doc, coarse).score
    assert two is not None
    assert two.tolist() == [int((scores <= 0.5).sum()), int((scores > 0.5).sum()), 0]


def _rows(seed: int, model: str, n: int, shift: float = 0.0) -> list[Row]:
    rng = np.random.default_rng(seed)
    times = np.sort(rng.integers(T0_MS, T0_MS + 10_000, n))
    p = [0.2 + shift / 4, 0.5, 0.3 - shift / 4]
    return [
        Row(
            model,
            "v",
            t / 1000.0,
            0.01,
            0,
            str(rng.choice(CLASSES, p=p)),
            float(np.clip(rng.beta(2 + 3 * shift, 2), 0, 1)),
            None,
            None,
            {"x": float(rng.normal(shift, 1.0)), "y": float(rng.normal())},
            "",
        )
        for t in times.tolist()
    ]


def _ingest(state: PartitionState, rows: list[Row]) -> None:
    """Envelopes of one model each, per 250 ms of event time, in time order."""
    resolver = SchemaResolver()
    chunks: list[RowChunk] = []
    for start in range(T0_MS, T0_MS + 10_000, 250):
        in_slice = [r for r in rows if start <= round(float(r.time) * 1000) < start + 250]
        for model in sorted({r.model for r in in_slice}):
            batch = encode_batch([r for r in in_slice if r.model == model])
            chunks.append(decode_batch(resolver.read(batch)[1], len(chunks)))
    n = len(chunks)
    state.ingest(chunks, np.arange(n), np.full(n, 2 * 10**12), n)


def test_a_training_reference_bins_like_the_reference_file(tmp_path: Path) -> None:
    """The document binned at render time equals the state's own file reference of the
    same samples, array for array, and the state itself is untouched by it."""
    rng = np.random.default_rng(3)
    train = {
        "score": rng.beta(2, 2, 800).tolist(),
        "prediction": [str(c) for c in rng.choice([*CLASSES, "d"], 800)],
        "features": {"x": rng.normal(size=800).tolist()},
    }
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"models": {"m": {"version": "v", **train}}}))
    with_file = dataclasses.replace(CONFIG, reference_samples=load_reference_file(str(path)))
    a, b = PartitionState(with_file, 0), PartitionState(CONFIG, 0)
    rows = _rows(4, "m", 1000)
    _ingest(a, rows)
    _ingest(b, rows)
    doc = build_reference(
        "m", "v", scores=train["score"], predictions=train["prediction"],
        features=train["features"],
    )  # fmt: skip
    refs = {("m", "v"): bin_reference(doc, CONFIG)}
    before = {k: v.copy() for k, v in b.reference.items()}
    use_b = resolve_references(b.view(), CONFIG, refs)
    use_a = resolve_references(a.view(), with_file, {})
    assert use_b.source == ["training"] and use_a.source == ["file"]
    assert use_b.reference["score"][0].tolist() == a.reference["score"][0].tolist()
    ea, eb = a.catalog.entries[0], b.catalog.entries[0]
    fa, fb = ea.features["x"], eb.features["x"]
    assert use_b.reference["feat"][0, fb].tolist() == a.reference["feat"][0, fa].tolist()
    assert not use_b.features[0, eb.features["y"]]  # not in the document: no drift score
    by_name_a = {n: int(a.reference["pred_class"][0, j]) for n, j in ea.classes.items()}
    names_b = b.view().entries[0][4]
    by_name_b = {
        (n or "d"): int(c) for n, c in zip(names_b, use_b.reference["pred_class"][0], strict=True)
        if c
    }  # fmt: skip
    assert by_name_b == by_name_a  # "d", never seen live, took a free column
    for k, v in b.reference.items():  # the state keeps its own reference
        assert np.array_equal(v, before[k])


def test_build_families_uses_the_training_reference_and_says_so() -> None:
    state = PartitionState(CONFIG, 0)
    _ingest(state, _rows(5, "m", 1500, shift=1.0) + _rows(6, "n", 1500))
    rng = np.random.default_rng(7)
    doc = build_reference(
        "m", "*", scores=rng.beta(2, 2, 5000), predictions=list(rng.choice(CLASSES, 5000)),
        features={"x": rng.normal(size=5000)},
    )  # fmt: skip
    fams = build_families(
        [state.view()], CONFIG, references={("m", "*"): bin_reference(doc, CONFIG)}
    )
    rows = {f.name: f for f in fams}
    info = rows["model_drift_reference_info"]
    got = {lab[0]: lab[-1] for lab in info.label_values}
    assert got == {"m": "training", "n": "first_window"}
    drift = rows["model_drift_score"]
    names = drift.label_names
    by = {
        tuple(lab[names.index(k)] for k in ("model", "window", "feature", "method")): float(v)
        for lab, v in zip(drift.label_values, drift.values, strict=True)
    }
    w = state.window(10_000)
    m = next(i for i, e in enumerate(state.catalog.entries) if e.model == "m")
    in_window = [
        r.score for r in _rows(5, "m", 1500, shift=1.0)
        if w.end_ms - 10_000 <= round(float(r.time) * 1000) < w.end_ms
    ]  # fmt: skip
    live_scores = _score_bins(in_window)
    assert w.score[m].tolist() == live_scores.tolist() and live_scores.sum() > 500
    ref_scores = _score_bins(doc["score"])
    assert by[("m", "10s", "score", "psi")] == pytest.approx(_psi(ref_scores, live_scores))
    assert by[("m", "10s", "score", "js")] == pytest.approx(_js(ref_scores, live_scores))
    assert ("m", "10s", "feature:y", "psi") not in by  # no training sample of y
    assert ("n", "10s", "feature:y", "psi") in by  # n: first window, every feature


# -- the CLI -----------------------------------------------------------------------------


def test_cli_summarises_a_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "train.csv"
    rng = np.random.default_rng(8)
    lines = ["score,prediction,x,y,id"]
    lines += [
        f"{rng.random():.6f},{rng.choice(CLASSES)},{rng.normal():.6f},,{i}" for i in range(300)
    ]
    path.write_text("\n".join(lines) + "\n")
    code = main([str(path), "--model", "m", "--version", "v", "--features", "x,y", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "rows: 300" in out and "score: 300 values" in out
    assert "prediction: 300 values, 3 classes" in out
    assert "x: 300 values" in out and "y: 0 values" in out and "id" not in out
    assert "bins:" in out
    assert main([str(path), "--model", "m", "--features", "nope", "--dry-run"]) == 2
    assert "no column 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("score,prediction\n0.5,a\nhigh,b\n")
    assert main([str(bad), "--model", "m", "--dry-run"]) == 2
    assert "column 'score', row 2: not a number" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--model" in capsys.readouterr().out


def test_cli_parquet_without_pyarrow_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("pyarrow is installed here: the error path cannot be exercised")
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    assert main([str(path), "--model", "m", "--dry-run"]) == 2
    assert "needs pyarrow" in capsys.readouterr().err


# -- a real shard ------------------------------------------------------------------------


@pytest.fixture
def start_shard(
    kafka_bootstrap: str, shard_factory: Callable[..., ShardProcess]
) -> Callable[..., ShardProcess]:
    return functools.partial(shard_factory, kafka_bootstrap)


def _by_labels(samples: Samples, name: str) -> dict[tuple[str, ...], float]:
    out = {}
    for lab, v in samples.get(name, []):
        key = tuple(lab.get(k, "") for k in ("model", "version", "window", "feature", "method"))
        out[key + ((lab["source"],) if "source" in lab else ())] = v
    return out


def test_a_shard_measures_drift_against_the_published_training_reference(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_shard: Callable[..., ShardProcess],
) -> None:
    from confluent_kafka import Producer

    topic = topic_factory("refs", partitions=1)
    ref_topic = f"{topic}-references"
    rng = np.random.default_rng(9)
    train_classes = [str(c) for c in rng.choice(CLASSES, 20_000, p=[0.2, 0.5, 0.3])]
    doc = build_reference(
        "m", "v", scores=rng.beta(2, 2, 20_000), predictions=train_classes,
        features={"x": rng.normal(0, 1, 20_000)},
    )  # fmt: skip
    assert len(doc["score"]) == 10_000  # sampled
    settings = PublisherSettings(bootstrap_servers=kafka_bootstrap, reference_topic=ref_topic)
    assert publish_reference(doc, settings) > 150_000
    from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

    resource = ConfigResource(ResourceType.TOPIC, ref_topic)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    configs = admin.describe_configs([resource])[resource].result(timeout=30)
    assert configs["cleanup.policy"].value == "compact"
    shard = start_shard(topic, reference_topic=ref_topic)

    live = _rows(10, "m", 2000, shift=1.0) + _rows(11, "n", 2000)
    live.sort(key=lambda r: float(r.time))
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for start in range(T0_MS, T0_MS + 10_000, 250):  # in event-time order: none is late
        in_slice = [r for r in live if start <= round(float(r.time) * 1000) < start + 250]
        for model in ("m", "n"):
            rows = [r for r in in_slice if r.model == model]
            producer.produce(topic, encode_batch(rows), model.encode())
    assert producer.flush(30) == 0
    send_markers(kafka_bootstrap, topic, 1, T0_MS + 10_000 + 2000)

    def ready() -> Samples | None:
        s = shard.scrape()
        ends = [v for lab, v in s.get("model_window_end_timestamp_seconds", [])]
        info = _by_labels(s, "model_drift_reference_info")
        if len(ends) == 4 and set(ends) == {(T0_MS + 10_000) / 1000} and len(info) == 2:
            return s
        return None

    samples = wait_until(ready, 90, "windows closed and references reported", [shard])
    info = _by_labels(samples, "model_drift_reference_info")
    assert info == {
        ("m", "v", "", "", "", "training"): 1.0,
        ("n", "v", "", "", "", "first_window"): 1.0,
    }
    drift = _by_labels(samples, "model_drift_score")
    m_rows = [r for r in live if r.model == "m"]  # every row is in the 10 s window
    live_scores = _score_bins([r.score for r in m_rows])
    ref_scores = _score_bins(doc["score"])
    live_x = _asinh_bins([r.features["x"] for r in m_rows if r.features])
    ref_x = _asinh_bins(doc["features"][0]["values"])
    ref_c, live_c = _class_counts(doc["prediction_classes"], [str(r.prediction) for r in m_rows])
    for feature, ref, cur in (
        ("score", ref_scores, live_scores),
        ("feature:x", ref_x, live_x),
        ("prediction", ref_c, live_c),
    ):
        psi = drift[("m", "v", "10s", feature, "psi")]
        js = drift[("m", "v", "10s", feature, "js")]
        assert psi == pytest.approx(_psi(ref, cur), rel=1e-9), feature
        assert js == pytest.approx(_js(ref, cur), rel=1e-9), feature
    assert drift[("m", "v", "10s", "feature:x", "psi")] > 0.5  # the shift is seen
    assert ("m", "v", "10s", "feature:y", "psi") not in drift  # y has no training sample
    # n has no training reference: its first full 5 s window is the reference.
    assert ("n", "v", "10s", "feature:y", "psi") in drift
    assert total(samples, "modelpulse_dead_lettered_total") == 0

    # A reference published while the shard runs is followed: n's "*" document.
    later = build_reference("n", "*", features={"y": rng.normal(0, 1, 500)})
    publish_reference(later, settings)

    def n_uses_training() -> dict[tuple[str, ...], float] | None:
        s = shard.scrape()
        info = _by_labels(s, "model_drift_reference_info")
        drift = _by_labels(s, "model_drift_score")
        if ("n", "v", "", "", "", "training") in info:
            return drift
        return None

    drift = wait_until(n_uses_training, 60, "n's training reference applied", [shard])
    live_y = _asinh_bins([r.features["y"] for r in live if r.model == "n" and r.features])
    ref_y = _asinh_bins(later["features"][0]["values"])
    assert drift[("n", "v", "10s", "feature:y", "psi")] == pytest.approx(_psi(ref_y, live_y))
    assert ("n", "v", "10s", "score", "psi") not in drift  # no scores in that document
    assert shard.terminate() == 0
