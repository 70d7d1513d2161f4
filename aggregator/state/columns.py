"""The columns decode produces and the state ingests: rows, markers, heartbeats.

They sit in the state package because the state defines what a row is; decode
(``aggregator.decode``, ``aggregator.bulk``) only fills them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np

__all__ = ["MAX_ROWS_PER_ENVELOPE", "Heartbeat", "Marker", "RowChunk"]

# Bound of one envelope: the producer's own largest batch (``batch_max_events`` <= 200k).
MAX_ROWS_PER_ENVELOPE: Final = 200_000


@dataclass(slots=True)
class RowChunk:
    """Rows of one or more messages, in message order.

    ``mv`` indexes ``mv_keys`` ((model, version) pairs); ``regression[k]`` says whether
    key k (None: unknown yet) predicts values (``pred_value``/``label_value``) or classes
    (``pred_code``/``label_code`` into ``classes``, -1 = none). Features are in long
    form: row ``feat_row``, name ``feature_names[feat_code]``, value ``feat_value``.
    ``offset`` is each row's Kafka offset. ``event_hash`` is the uint64
    ``schemas.event_id`` hash of each row's ``event_id`` (0 = no id), always one per row.
    """

    mv_keys: list[tuple[str, str]]
    regression: list[bool | None]  # None: no prediction or label says which
    mv: np.ndarray
    offset: np.ndarray
    event_time_ms: np.ndarray
    latency_seconds: np.ndarray
    outcome: np.ndarray
    score: np.ndarray
    classes: list[str]
    pred_code: np.ndarray
    label_code: np.ndarray
    pred_value: np.ndarray
    label_value: np.ndarray
    segments: list[str]
    segment: np.ndarray  # int32, -1 = none
    feature_names: list[str]
    feat_row: np.ndarray
    feat_code: np.ndarray
    feat_value: np.ndarray
    event_hash: np.ndarray  # uint64, 0 = no id

    def __len__(self) -> int:
        return int(self.event_time_ms.shape[0])

    def rows(self, start: int, stop: int) -> RowChunk:
        """Rows [start, stop) as a chunk of views sharing the dictionaries."""

        def cut(a: np.ndarray) -> np.ndarray:
            return a[start:stop] if a.size else a  # empty: the column is absent

        lo, hi = np.searchsorted(self.feat_row, [start, stop]).tolist()
        return RowChunk(
            mv_keys=self.mv_keys,
            regression=self.regression,
            mv=self.mv[start:stop],
            offset=self.offset[start:stop],
            event_time_ms=self.event_time_ms[start:stop],
            latency_seconds=self.latency_seconds[start:stop],
            outcome=self.outcome[start:stop],
            score=self.score[start:stop],
            classes=self.classes,
            pred_code=cut(self.pred_code),
            label_code=cut(self.label_code),
            pred_value=cut(self.pred_value),
            label_value=cut(self.label_value),
            segments=self.segments,
            segment=self.segment[start:stop],
            feature_names=self.feature_names,
            feat_row=self.feat_row[lo:hi] - start,
            feat_code=self.feat_code[lo:hi],
            feat_value=self.feat_value[lo:hi],
            event_hash=self.event_hash[start:stop],
        )


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A decoded ``ResourceHeartbeat``."""

    offset: int
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Marker:
    """A watermark marker (or any record that only carries event time)."""

    offset: int
    event_time_ms: int
