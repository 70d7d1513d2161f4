"""State views -> Prometheus metric families (names, labels, values).

Cumulative series (counters, histograms) are additive, so ``sum by (model, version)``
combines partitions and shards. Windowed gauges are exact because a model's events
all land in one partition. Every per-model series carries a ``partition`` label so
that two partitions folding into the same ``__overflow__`` model never collide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from aggregator.exposition import Family
from aggregator.quality import (
    classification_metrics,
    histogram_quantiles,
    jensen_shannon_distance,
    population_stability_index,
    regression_metrics,
)
from aggregator.state import StateConfig, StateView, WindowAggregate
from schemas.wire import OUTCOMES

__all__ = ["ShardHealth", "build_families", "format_duration"]

QUANTILES: Final = (0.5, 0.9, 0.99)
_VALID = OUTCOMES[:4]
_MV = ("model", "version", "partition")


def format_duration(ms: int) -> str:
    """Prometheus-style label for a duration: 60000 -> "1m", 3600000 -> "1h".

    >>> format_duration(90_000)
    '90s'
    """
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


@dataclass(slots=True)
class ShardHealth:
    """Process-level facts the consumer loop measures (not part of partition state)."""

    lag: dict[int, int] = field(default_factory=dict)
    snapshot_age_seconds: dict[int, float] = field(default_factory=dict)
    batch_seconds_sum: float = 0.0
    batches: int = 0
    messages: int = 0
    dead_letter_messages: int = 0
    up_since: float = 0.0


class _Builder:
    def __init__(self) -> None:
        self.families: list[Family] = []

    def gauge_or_counter(
        self,
        kind: str,
        name: str,
        help_text: str,
        label_names: tuple[str, ...],
        rows: list[tuple[tuple[str, ...], float]],
    ) -> None:
        self.families.append(
            Family(
                name=name,
                kind=kind,  # type: ignore[arg-type]
                help=help_text,
                label_names=label_names,
                label_values=[r[0] for r in rows],
                values=np.array([r[1] for r in rows], dtype=np.float64),
            )
        )

    def histogram(
        self,
        name: str,
        help_text: str,
        label_names: tuple[str, ...],
        bounds: Sequence[float],
        labels: list[tuple[str, ...]],
        buckets: np.ndarray,
        sums: np.ndarray,
    ) -> None:
        self.families.append(
            Family(
                name=name,
                kind="histogram",
                help=help_text,
                label_names=label_names,
                label_values=labels,
                upper_bounds=list(bounds),
                buckets=buckets.reshape(len(labels), len(bounds) + 1).astype(np.float64),
                sums=sums.astype(np.float64),
            )
        )


def _mv_labels(v: StateView) -> list[tuple[str, str, str]]:
    p = str(v.partition)
    return [(e[0], e[1], p) for e in v.entries]


def build_families(
    views: Sequence[StateView], config: StateConfig, health: ShardHealth | None = None
) -> list[Family]:
    """Every family this shard exports, for the partitions it owns now."""
    b = _Builder()
    rows: dict[str, list[tuple[tuple[str, ...], float]]] = {}

    def add(family: str, labels: tuple[str, ...], value: float) -> None:
        rows.setdefault(family, []).append((labels, value))

    lat_l: list[tuple[str, ...]] = []
    lat_b: list[np.ndarray] = []
    lat_s: list[np.ndarray] = []
    err_l: list[tuple[str, ...]] = []
    err_b: list[np.ndarray] = []
    err_s: list[np.ndarray] = []
    sc_l: list[tuple[str, ...]] = []
    sc_b: list[np.ndarray] = []
    sc_s: list[np.ndarray] = []

    for v in views:
        mvl = _mv_labels(v)
        cum = v.cum
        for i, lab in enumerate(mvl):
            model, version, part = lab
            regression = v.entries[i][2]
            out = cum["outcome"][i]
            for code, name in enumerate(_VALID):
                add("inference_predictions", (*lab, name), float(out[code]))
                if code:
                    add("inference_errors", (*lab, name), float(out[code]))
            add("model_labeled_predictions", lab, float(cum["labelled"][i]))
            add("model_unlabeled_predictions", lab, float(out[0] - cum["labelled"][i]))
            add(
                "model_info",
                (model, version, part, "regression" if regression else "classification"),
                1.0,
            )
            add("model_update_time_seconds", lab, v.entries[i][3] / 1000.0)
            lat_l.append(lab)
            lat_b.append(cum["lat"][i])
            lat_s.append(cum["lat_sum"][i])
            if cum["score"][i].sum():
                sc_l.append(lab)
                sc_b.append(cum["score"][i])
                sc_s.append(cum["score_sum"][i])
            if regression:
                err_l.append(lab)
                err_b.append(cum["err"][i])
                err_s.append(cum["err_sum"][i])
            else:
                classes = v.entries[i][4]
                conf = cum["conf"][i]
                for a, p in zip(*np.nonzero(conf), strict=True):
                    add("model_confusion", (*lab, classes[a], classes[p]), float(conf[a, p]))
            segments = v.entries[i][6]
            for s in np.flatnonzero(cum["seg"][i]):
                add("inference_segment_predictions", (*lab, segments[s]), float(cum["seg"][i][s]))
        for w in v.windows:
            _window_rows(v, w, config, mvl, add)
        for r in v.resources:
            si = (str(r["service"]), str(r["instance"]))
            for key, fam in (
                ("cpu_usage_ratio", "inference_cpu_usage_ratio"),
                ("memory_usage_bytes", "inference_memory_usage_bytes"),
                ("disk_usage_ratio", "inference_disk_usage_ratio"),
            ):
                if r.get(key) is not None:
                    add(fam, si, float(r[key]))
            for g in r.get("gpus", []):
                add(
                    "inference_gpu_usage_ratio",
                    (*si, str(g["index"])),
                    float(g["utilization_ratio"]),
                )
        p = (str(v.partition),)
        add("modelpulse_events", p, float(v.events_accepted))
        add("modelpulse_late_events", p, float(v.rejected.get("late", 0)))
        for reason, n in sorted(v.rejected.items()):
            add("modelpulse_dead_lettered", (*p, reason), float(n))
        for what, n in sorted(v.folded.items()):
            add("modelpulse_folded", (*p, what), float(n))
        if v.max_event_ms > 0:
            add(
                "modelpulse_watermark_timestamp_seconds",
                p,
                (v.max_event_ms - config.lateness_ms) / 1000,
            )
        add("modelpulse_model_versions", p, float(len(v.entries)))

    if health is not None:
        for pid, lag in sorted(health.lag.items()):
            add("modelpulse_consumer_lag", (str(pid),), float(lag))
        for pid, age in sorted(health.snapshot_age_seconds.items()):
            add("modelpulse_snapshot_age_seconds", (str(pid),), age)
        add("modelpulse_batch_seconds", (), health.batch_seconds_sum)
        add("modelpulse_batches", (), float(health.batches))
        add("modelpulse_messages", (), float(health.messages))
        add("modelpulse_dead_letter_messages", (), float(health.dead_letter_messages))
        add("modelpulse_partitions_owned", (), float(len(views)))
        add("modelpulse_start_time_seconds", (), health.up_since)

    for spec in _SPECS:
        name, kind, help_text, labels = spec
        b.gauge_or_counter(kind, name, help_text, labels, rows.get(name, []))
    n_lat, n_sc, n_err = (
        len(config.latency_bounds),
        len(config.score_bounds),
        len(config.error_bounds),
    )
    b.histogram(
        "inference_latency_seconds",
        "Inference latency of closed panes.",
        _MV,
        config.latency_bounds,
        lat_l,
        _stack(lat_b, n_lat + 1),
        _flat(lat_s),
    )
    b.histogram(
        "model_prediction_score",
        "Score (probability) of predictions in closed panes.",
        _MV,
        config.score_bounds,
        sc_l,
        _stack(sc_b, n_sc + 1),
        _flat(sc_s),
    )
    b.histogram(
        "model_prediction_error",
        "Prediction minus label (regression), closed panes.",
        _MV,
        config.error_bounds,
        err_l,
        _stack(err_b, n_err + 1),
        _flat(err_s),
    )
    series = sum(len(f.label_values) * _lines_per_series(f) for f in b.families)
    b.gauge_or_counter(
        "gauge",
        "modelpulse_series",
        "Sample lines this shard exposes.",
        (),
        [((), float(series + 1))],
    )
    return b.families


def _lines_per_series(f: Family) -> int:
    return len(f.upper_bounds) + 3 if f.kind == "histogram" else 1


def _stack(arrays: list[np.ndarray], width: int) -> np.ndarray:
    return np.array(arrays, dtype=np.float64).reshape(len(arrays), width)


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.array(arrays, dtype=np.float64).reshape(len(arrays))


def _window_rows(
    v: StateView, w: WindowAggregate, config: StateConfig, mvl: list[tuple[str, str, str]], add: Any
) -> None:
    wl = _window_label(w.window_ms)
    m = len(mvl)
    if not m or w.end_ms <= 0:  # no pane closed yet: no window to report
        return
    seconds = w.window_ms / 1000.0
    total = w.outcome[:m].sum(axis=-1)
    cm = classification_metrics(w.conf[:m])
    mae, rmse = regression_metrics(w.err[:m].sum(axis=-1), w.abs_err[:m], w.sq_err[:m])
    lat_q = histogram_quantiles(w.lat[:m], config.latency_bounds, QUANTILES)
    drift: list[tuple[str, np.ndarray, np.ndarray]] = [
        ("score", v.reference["score"], w.score[:m]),
        ("prediction", v.reference["pred_class"], w.pred_class[:m]),
        ("prediction_value", v.reference["pred_hist"], w.pred_hist[:m]),
    ]
    psi = {n: population_stability_index(r, c) for n, r, c in drift}
    js = {n: jensen_shannon_distance(r, c) for n, r, c in drift}
    fpsi = population_stability_index(v.reference["feat"], w.feat[:m])
    fjs = jensen_shannon_distance(v.reference["feat"], w.feat[:m])
    per_class = (
        ("model_precision", cm.precision, cm.macro_precision),
        ("model_recall", cm.recall, cm.macro_recall),
        ("model_f1_score", cm.f1, cm.macro_f1),
        ("model_false_positive_rate", cm.false_positive_rate, cm.macro_false_positive_rate),
        ("model_false_negative_rate", cm.false_negative_rate, cm.macro_false_negative_rate),
    )
    end = w.end_ms / 1000.0
    for i, lab in enumerate(mvl):
        wlab = (*lab, wl)
        regression = v.entries[i][2]
        add("model_window_predictions", wlab, float(total[i]))
        add("inference_throughput", wlab, float(total[i]) / seconds)
        add("model_window_end_timestamp_seconds", wlab, end)
        for qi, q in enumerate(QUANTILES):
            add("inference_latency_quantile_seconds", (*wlab, _num(q)), float(lat_q[i, qi]))
        if regression:
            add("model_mae", wlab, float(mae[i]))
            add("model_rmse", wlab, float(rmse[i]))
        else:
            add("model_accuracy", wlab, float(cm.accuracy[i]))
            classes = v.entries[i][4]
            present = np.flatnonzero(cm.present[i])
            for fam, per, macro in per_class:
                for c in present:
                    add(fam, (*wlab, classes[c]), float(per[i, c]))
                add(fam, (*wlab, "macro"), float(macro[i]))
        if not v.has_reference[i]:
            continue
        for name in ("score", "prediction_value" if regression else "prediction"):
            add("model_drift_score", (*wlab, name, "psi"), float(psi[name][i]))
            add("model_drift_score", (*wlab, name, "js"), float(js[name][i]))
        features = v.entries[i][5]
        for f, fname in enumerate(features):
            if fname:
                add("model_drift_score", (*wlab, f"feature:{fname}", "psi"), float(fpsi[i, f]))
                add("model_drift_score", (*wlab, f"feature:{fname}", "js"), float(fjs[i, f]))


def _window_label(ms: int) -> str:
    return format_duration(ms)


def _num(q: float) -> str:
    return repr(q)


_W = (*_MV, "window")
_SPECS: Final[tuple[tuple[str, str, str, tuple[str, ...]], ...]] = (
    (
        "inference_predictions",
        "counter",
        "Predictions in closed panes, by outcome.",
        (*_MV, "outcome"),
    ),
    (
        "inference_errors",
        "counter",
        "Predictions whose outcome is not ok, in closed panes.",
        (*_MV, "outcome"),
    ),
    ("model_labeled_predictions", "counter", "Ok predictions with a ground-truth label.", _MV),
    ("model_unlabeled_predictions", "counter", "Ok predictions without a label.", _MV),
    (
        "model_confusion",
        "counter",
        "Labelled ok predictions by actual and predicted class.",
        (*_MV, "actual", "predicted"),
    ),
    (
        "inference_segment_predictions",
        "counter",
        "Predictions by segment, closed panes.",
        (*_MV, "segment"),
    ),
    ("model_info", "gauge", "A model version seen in this partition (value 1).", (*_MV, "task")),
    ("model_update_time_seconds", "gauge", "Event time the version was first seen.", _MV),
    ("model_window_predictions", "gauge", "Predictions in the last closed window.", _W),
    ("inference_throughput", "gauge", "Predictions per second over the last closed window.", _W),
    ("model_window_end_timestamp_seconds", "gauge", "End of the last closed window.", _W),
    (
        "inference_latency_quantile_seconds",
        "gauge",
        "Latency quantile of the last closed window.",
        (*_W, "quantile"),
    ),
    ("model_accuracy", "gauge", "Accuracy of labelled ok predictions, last closed window.", _W),
    ("model_precision", "gauge", "Precision one-vs-rest per class, and macro.", (*_W, "class")),
    ("model_recall", "gauge", "Recall one-vs-rest per class, and macro.", (*_W, "class")),
    ("model_f1_score", "gauge", "F1 one-vs-rest per class, and macro.", (*_W, "class")),
    ("model_false_positive_rate", "gauge", "FP / (FP + TN) per class, and macro.", (*_W, "class")),
    ("model_false_negative_rate", "gauge", "FN / (FN + TP) per class, and macro.", (*_W, "class")),
    ("model_mae", "gauge", "Mean absolute error (regression), last closed window.", _W),
    ("model_rmse", "gauge", "Root mean squared error (regression), last closed window.", _W),
    (
        "model_drift_score",
        "gauge",
        "Drift of a distribution against the reference.",
        (*_W, "feature", "method"),
    ),
    (
        "inference_cpu_usage_ratio",
        "gauge",
        "CPU usage of an inference instance.",
        ("service", "instance"),
    ),
    (
        "inference_memory_usage_bytes",
        "gauge",
        "Resident memory of an inference instance.",
        ("service", "instance"),
    ),
    (
        "inference_disk_usage_ratio",
        "gauge",
        "Disk usage of an inference instance.",
        ("service", "instance"),
    ),
    (
        "inference_gpu_usage_ratio",
        "gauge",
        "GPU utilisation of an inference instance.",
        ("service", "instance", "gpu"),
    ),
    ("modelpulse_events", "counter", "Events accepted into panes.", ("partition",)),
    (
        "modelpulse_late_events",
        "counter",
        "Events later than the watermark (dead-lettered).",
        ("partition",),
    ),
    (
        "modelpulse_dead_lettered",
        "counter",
        "Events and messages dead-lettered, by reason.",
        ("partition", "reason"),
    ),
    (
        "modelpulse_folded",
        "counter",
        "Names folded into __overflow__ by a cardinality cap.",
        ("partition", "kind"),
    ),
    (
        "modelpulse_watermark_timestamp_seconds",
        "gauge",
        "Event-time watermark of the partition.",
        ("partition",),
    ),
    (
        "modelpulse_model_versions",
        "gauge",
        "Model versions tracked in the partition.",
        ("partition",),
    ),
    (
        "modelpulse_consumer_lag",
        "gauge",
        "Messages not yet consumed (high watermark - position).",
        ("partition",),
    ),
    (
        "modelpulse_snapshot_age_seconds",
        "gauge",
        "Seconds since the last acknowledged snapshot.",
        ("partition",),
    ),
    ("modelpulse_batch_seconds", "counter", "Time spent processing consumed batches.", ()),
    ("modelpulse_batches", "counter", "Consumed batches processed.", ()),
    ("modelpulse_messages", "counter", "Kafka messages processed by this process.", ()),
    (
        "modelpulse_dead_letter_messages",
        "counter",
        "Messages written to the dead-letter topic.",
        (),
    ),
    ("modelpulse_partitions_owned", "gauge", "Input partitions this shard owns.", ()),
    ("modelpulse_start_time_seconds", "gauge", "Start time of this process.", ()),
)
