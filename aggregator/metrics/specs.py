"""The exported families (name, kind, help, label names) and their fixed label values."""

from __future__ import annotations

from typing import Final

from aggregator.decode import SchemaResolver
from aggregator.state import CALIBRATION_BINS, MEASURES, REJECT_REASONS
from schemas.wire import OUTCOMES

QUANTILES: Final = (0.5, 0.9, 0.99)
# Label of a reliability bin: its upper bound ("0.1" .. "1"), as a histogram's ``le``.
CALIBRATION_BIN_LABELS: Final = tuple(
    format((k + 1) / CALIBRATION_BINS, "g") for k in range(CALIBRATION_BINS)
)
_VALID = OUTCOMES[:4]
_MV = ("model", "version", "partition")
# Known up front, so each counter starts at 0 and ``increase()`` reads 0, not "no data".
# A reason or kind seen in state but missing here is exported all the same.
DEAD_LETTER_REASONS: Final = tuple(
    dict.fromkeys(
        (
            *REJECT_REASONS,
            "truncated",
            "bad_magic",
            "undecodable",
            "bad_column",
            *SchemaResolver.REASONS,
            # The consumer loop's own (shard.py, which imports this package).
            "unexpected_schema",
            "untrusted_marker",
            "undecompressable",
            "unreadable",
        )
    )
)
FOLD_KINDS: Final = ("model", "version", "model_version", "class", "feature", "segment")
DROP_REASONS: Final = ("model_version", "resource_instance", "zero_counter")


_W = (*_MV, "window")
_FIXED_SPECS: Final[tuple[tuple[str, str, str, tuple[str, ...]], ...]] = (
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
    (
        "model_segment_labeled_predictions",
        "counter",
        "Labelled ok predictions per segment (classes, or values for regression), closed panes.",
        (*_MV, "segment"),
    ),
    (
        "model_segment_actual",
        "counter",
        "Labelled ok classifications per segment whose label is the class.",
        (*_MV, "segment", "class"),
    ),
    (
        "model_segment_predicted",
        "counter",
        "Labelled ok classifications per segment predicted as the class.",
        (*_MV, "segment", "class"),
    ),
    (
        "model_segment_correct",
        "counter",
        "Labelled ok classifications per segment with label and prediction the class.",
        (*_MV, "segment", "class"),
    ),
    (
        "model_segment_absolute_error",
        "counter",
        "Sum of |prediction - label| per segment (regression), closed panes.",
        (*_MV, "segment"),
    ),
    (
        "model_segment_squared_error",
        "counter",
        "Sum of (prediction - label)^2 per segment (regression), closed panes.",
        (*_MV, "segment"),
    ),
    (
        "model_calibration",
        "counter",
        "Labelled ok predictions with a score, by score bin (upper bound) and correctness.",
        (*_MV, "bin", "correct"),
    ),
    (
        "model_joined_labels",
        "counter",
        "Labels joined to their prediction by event id, counted when joined.",
        _MV,
    ),
    (
        "model_pending_predictions",
        "gauge",
        "Predictions with an event id waiting for their label.",
        _MV,
    ),
    (
        "model_expired_predictions",
        "counter",
        "Predictions that left the join unlabelled: time to live (ttl) or the cap (cap).",
        (*_MV, "reason"),
    ),
    (
        "model_label_coverage",
        "gauge",
        "Joined / (joined + expired + evicted + pending older than --label-coverage-age): "
        "the share of predictions old enough to be labelled whose label came.",
        _MV,
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
        (*_W, "q"),
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
        "model_expected_calibration_error",
        "gauge",
        "Expected calibration error over 10 score bins, labelled predictions, last closed window.",
        _W,
    ),
    (
        "model_brier_score",
        "gauge",
        "Mean (score - correct)^2 of labelled predictions, last closed window.",
        _W,
    ),
    (
        "model_estimated_accuracy",
        "gauge",
        "Mean score of ok predictions, labelled or not: the accuracy if calibrated.",
        _W,
    ),
    (
        "model_accuracy_gap",
        "gauge",
        "Estimated minus realised accuracy, last closed window.",
        _W,
    ),
    (
        "model_drift_score",
        "gauge",
        "Drift of a distribution against the reference (psi, js, ks, wasserstein).",
        (*_W, "feature", "method"),
    ),
    (
        "model_drift_reference_info",
        "gauge",
        "1 for the reference the drift scores of a model version use (training, file, "
        "first_window).",
        (*_MV, "source"),
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
        "modelpulse_unmatched_labels",
        "counter",
        "Labels that changed no metric (dead-lettered), by reason.",
        ("partition", "reason"),
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
    (
        "modelpulse_dead_letter_failures",
        "counter",
        "Dead-letter writes the broker refused or failed (each retried before a snapshot).",
        (),
    ),
    (
        "modelpulse_dead_letters_truncated",
        "counter",
        "Dead letters whose value was cut to fit the dead-letter topic.",
        (),
    ),
    (
        "modelpulse_partition_stuck",
        "gauge",
        "1 while the partition's fetch fails at one offset again and again.",
        ("partition",),
    ),
    ("modelpulse_partitions_owned", "gauge", "Input partitions this shard owns.", ()),
    ("modelpulse_start_time_seconds", "gauge", "Start time of this process.", ()),
)
# The windowed means the measure table declares (aggregator/state/measures.py): a new
# measure with a ``gauge`` is exported without a line here.
_SPECS: Final = (
    *_FIXED_SPECS,
    *((m.gauge.family, "gauge", m.gauge.help, _W) for m in MEASURES if m.gauge is not None),
)
