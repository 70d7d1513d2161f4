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


class _Columns:
    """Label tuples and value arrays per family, appended in bulk (no per-series calls)."""

    def __init__(self) -> None:
        self.labels: dict[str, list[tuple[str, ...]]] = {}
        self.values: dict[str, list[np.ndarray]] = {}

    def extend(self, family: str, labels: Sequence[tuple[str, ...]], values: Any) -> None:
        if not labels:
            return
        self.labels.setdefault(family, []).extend(labels)
        self.values.setdefault(family, []).append(
            np.broadcast_to(np.asarray(values, dtype=np.float64), (len(labels),))
        )

    def one(self, family: str, labels: tuple[str, ...], value: float) -> None:
        self.extend(family, [labels], [value])

    def family(self, name: str, kind: str, help_text: str, label_names: tuple[str, ...]) -> Family:
        values = self.values.get(name)
        return Family(
            name=name,
            kind=kind,  # type: ignore[arg-type]
            help=help_text,
            label_names=label_names,
            label_values=self.labels.get(name, []),
            values=np.concatenate(values) if values else np.empty(0),
        )


@dataclass(slots=True)
class _Hist:
    labels: list[tuple[str, ...]] = field(default_factory=list)
    buckets: list[np.ndarray] = field(default_factory=list)
    sums: list[np.ndarray] = field(default_factory=list)

    def extend(
        self, labels: Sequence[tuple[str, ...]], buckets: np.ndarray, sums: np.ndarray
    ) -> None:
        if labels:
            self.labels.extend(labels)
            self.buckets.append(buckets)
            self.sums.append(sums)

    def family(self, name: str, help_text: str, bounds: Sequence[float]) -> Family:
        width = len(bounds) + 1
        return Family(
            name=name,
            kind="histogram",
            help=help_text,
            label_names=_MV,
            label_values=self.labels,
            upper_bounds=list(bounds),
            buckets=np.concatenate(self.buckets).astype(np.float64)
            if self.buckets
            else np.empty((0, width)),
            sums=np.concatenate(self.sums).astype(np.float64) if self.sums else np.empty(0),
        )


def _mv_labels(v: StateView) -> list[tuple[str, str, str]]:
    p = str(v.partition)
    return [(e[0], e[1], p) for e in v.entries]


def _cells(
    mvl: Sequence[tuple[str, ...]], names: Sequence[Sequence[str]], mask: np.ndarray, *extra: str
) -> tuple[list[tuple[str, ...]], tuple[np.ndarray, ...]]:
    """Label tuples for the nonzero cells of ``mask[mv, i(, j)]``, named through ``names[mv]``."""
    idx = np.nonzero(mask)
    cols = [a.tolist() for a in idx]
    if len(cols) == 2:
        labels = [(*mvl[i], *extra, names[i][c]) for i, c in zip(*cols, strict=True)]
    else:
        labels = [
            (*mvl[i], *extra, names[i][a], names[i][b]) for i, a, b in zip(*cols, strict=True)
        ]
    return labels, idx


def build_families(
    views: Sequence[StateView], config: StateConfig, health: ShardHealth | None = None
) -> list[Family]:
    """Every family this shard exports, for the partitions it owns now."""
    cols = _Columns()
    lat, score, err = _Hist(), _Hist(), _Hist()

    for v in views:
        mvl = _mv_labels(v)
        m = len(mvl)
        cum = v.cum
        regression = np.array([e[2] for e in v.entries], dtype=bool)
        classes = [e[4] for e in v.entries]
        if m:
            out = cum["outcome"]
            for code, name in enumerate(_VALID):
                by_outcome = [(*lab, name) for lab in mvl]
                cols.extend("inference_predictions", by_outcome, out[:, code])
                if code:
                    cols.extend("inference_errors", by_outcome, out[:, code])
            cols.extend("model_labeled_predictions", mvl, cum["labelled"])
            cols.extend("model_unlabeled_predictions", mvl, out[:, 0] - cum["labelled"])
            cols.extend(
                "model_info",
                [
                    (*lab, "regression" if r else "classification")
                    for lab, r in zip(mvl, regression, strict=True)
                ],
                1.0,
            )
            cols.extend("model_update_time_seconds", mvl, [e[3] / 1000.0 for e in v.entries])
            lat.extend(mvl, cum["lat"], cum["lat_sum"])
            has_score = cum["score"].sum(axis=1) > 0
            score.extend(
                [mvl[i] for i in np.flatnonzero(has_score)],
                cum["score"][has_score],
                cum["score_sum"][has_score],
            )
            err.extend(
                [mvl[i] for i in np.flatnonzero(regression)],
                cum["err"][regression],
                cum["err_sum"][regression],
            )
            conf = cum["conf"] * ~regression[:, None, None]
            cells, (i, a, pc) = _cells(mvl, classes, conf > 0)
            cols.extend("model_confusion", cells, conf[i, a, pc])
            cells, (i, g) = _cells(mvl, [e[6] for e in v.entries], cum["seg"] > 0)
            cols.extend("inference_segment_predictions", cells, cum["seg"][i, g])
        for w in v.windows:
            _window_rows(v, w, config, mvl, regression, cols)
        for r in v.resources:
            si = (str(r["service"]), str(r["instance"]))
            for key, fam in (
                ("cpu_usage_ratio", "inference_cpu_usage_ratio"),
                ("memory_usage_bytes", "inference_memory_usage_bytes"),
                ("disk_usage_ratio", "inference_disk_usage_ratio"),
            ):
                if r.get(key) is not None:
                    cols.one(fam, si, float(r[key]))
            for gpu in r.get("gpus", []):
                cols.one(
                    "inference_gpu_usage_ratio",
                    (*si, str(gpu["index"])),
                    float(gpu["utilization_ratio"]),
                )
        p = (str(v.partition),)
        cols.one("modelpulse_events", p, float(v.events_accepted))
        cols.one("modelpulse_late_events", p, float(v.rejected.get("late", 0)))
        for reason, n in sorted(v.rejected.items()):
            cols.one("modelpulse_dead_lettered", (*p, reason), float(n))
        for what, n in sorted(v.folded.items()):
            cols.one("modelpulse_folded", (*p, what), float(n))
        if v.max_event_ms > 0:
            cols.one(
                "modelpulse_watermark_timestamp_seconds",
                p,
                (v.max_event_ms - config.lateness_ms) / 1000,
            )
        cols.one("modelpulse_model_versions", p, float(len(v.entries)))

    if health is not None:
        for pid, lag in sorted(health.lag.items()):
            cols.one("modelpulse_consumer_lag", (str(pid),), float(lag))
        for pid, age in sorted(health.snapshot_age_seconds.items()):
            cols.one("modelpulse_snapshot_age_seconds", (str(pid),), age)
        cols.one("modelpulse_batch_seconds", (), health.batch_seconds_sum)
        cols.one("modelpulse_batches", (), float(health.batches))
        cols.one("modelpulse_messages", (), float(health.messages))
        cols.one("modelpulse_dead_letter_messages", (), float(health.dead_letter_messages))
        cols.one("modelpulse_partitions_owned", (), float(len(views)))
        cols.one("modelpulse_start_time_seconds", (), health.up_since)

    families = [cols.family(*spec) for spec in _SPECS]
    families.append(
        lat.family(
            "inference_latency_seconds", "Inference latency of closed panes.", config.latency_bounds
        )
    )
    families.append(
        score.family(
            "model_prediction_score",
            "Score (probability) of predictions in closed panes.",
            config.score_bounds,
        )
    )
    families.append(
        err.family(
            "model_prediction_error",
            "Prediction minus label (regression), closed panes.",
            config.error_bounds,
        )
    )
    series = sum(len(f.label_values) * _lines_per_series(f) for f in families)
    families.append(
        Family(
            name="modelpulse_series",
            kind="gauge",
            help="Sample lines this shard exposes.",
            label_names=(),
            label_values=[()],
            values=np.array([float(series + 1)]),
        )
    )
    return families


def _lines_per_series(f: Family) -> int:
    return len(f.upper_bounds) + 3 if f.kind == "histogram" else 1


def _window_rows(
    v: StateView,
    w: WindowAggregate,
    config: StateConfig,
    mvl: Sequence[tuple[str, ...]],
    regression: np.ndarray,
    cols: _Columns,
) -> None:
    m = len(mvl)
    if not m or w.end_ms <= 0:  # no pane closed yet: no window to report
        return
    wl = format_duration(w.window_ms)
    wlab = [(*lab, wl) for lab in mvl]
    classification = ~regression
    cls_idx = np.flatnonzero(classification)
    reg_idx = np.flatnonzero(regression)
    total = w.outcome[:m].sum(axis=-1)
    cols.extend("model_window_predictions", wlab, total)
    cols.extend("inference_throughput", wlab, total / (w.window_ms / 1000.0))
    cols.extend("model_window_end_timestamp_seconds", wlab, w.end_ms / 1000.0)
    lat_q = histogram_quantiles(w.lat[:m], config.latency_bounds, QUANTILES)
    for qi, q in enumerate(QUANTILES):
        cols.extend(
            "inference_latency_quantile_seconds", [(*x, repr(q)) for x in wlab], lat_q[:, qi]
        )

    mae, rmse = regression_metrics(w.err[:m].sum(axis=-1), w.abs_err[:m], w.sq_err[:m])
    cols.extend("model_mae", [wlab[i] for i in reg_idx], mae[reg_idx])
    cols.extend("model_rmse", [wlab[i] for i in reg_idx], rmse[reg_idx])

    cm = classification_metrics(w.conf[:m])
    cols.extend("model_accuracy", [wlab[i] for i in cls_idx], cm.accuracy[cls_idx])
    classes = [e[4] for e in v.entries]
    labels, (i, c) = _cells(mvl, classes, cm.present & classification[:, None], wl)
    macro_labels = [(*wlab[j], "macro") for j in cls_idx]
    for fam, per, macro in (
        ("model_precision", cm.precision, cm.macro_precision),
        ("model_recall", cm.recall, cm.macro_recall),
        ("model_f1_score", cm.f1, cm.macro_f1),
        ("model_false_positive_rate", cm.false_positive_rate, cm.macro_false_positive_rate),
        ("model_false_negative_rate", cm.false_negative_rate, cm.macro_false_negative_rate),
    ):
        cols.extend(fam, labels, per[i, c])
        cols.extend(fam, macro_labels, macro[cls_idx])

    ref = v.has_reference
    for name, ref_hist, cur, which in (
        ("score", v.reference["score"], w.score[:m], ref),
        ("prediction", v.reference["pred_class"], w.pred_class[:m], ref & classification),
        ("prediction_value", v.reference["pred_hist"], w.pred_hist[:m], ref & regression),
    ):
        idx = np.flatnonzero(which)
        if not idx.size:
            continue
        psi = population_stability_index(ref_hist[idx], cur[idx])
        js = jensen_shannon_distance(ref_hist[idx], cur[idx])
        cols.extend("model_drift_score", [(*wlab[j], name, "psi") for j in idx], psi)
        cols.extend("model_drift_score", [(*wlab[j], name, "js") for j in idx], js)
    features = [[f"feature:{n}" if n else "" for n in e[5]] for e in v.entries]
    named = np.array([[bool(n) for n in fs] for fs in features], dtype=bool).reshape(m, -1)
    mask = named & ref[:, None]
    if mask.any():
        fpsi = population_stability_index(v.reference["feat"], w.feat[:m])
        fjs = jensen_shannon_distance(v.reference["feat"], w.feat[:m])
        labels, (i, f) = _cells(mvl, features, mask, wl)
        cols.extend("model_drift_score", [(*x, "psi") for x in labels], fpsi[i, f])
        cols.extend("model_drift_score", [(*x, "js") for x in labels], fjs[i, f])


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
