"""The join of one partition: predictions waiting for labels, and labels for them.

``JoinState`` keeps three stores of one prediction partition (and the feedback
partition of the same number, co-partitioned with it):

- ``pending``: predictions with an event id and no inline label, until their label
  comes (joined), their time to live passes (expired) or the cap pushes them out
  (evicted, oldest first);
- ``early``: labels that came before their prediction, for ``label_wait_ms`` of the
  prediction partition's event time; then ``unknown_prediction``;
- ``seen``: ids recently joined, expired or evicted (for the time to live, under a cap),
  so a second label is told apart as ``duplicate_label`` or ``expired_prediction``.

Everything is a function of the two logs and their interleaving; the caller bins the
matched pairs (``aggregator.state.PartitionState.ingest_labels``) and dead-letters the
rest by reason. Nothing is lost silently: every way out of a store is counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from aggregator.join.labels import LabelChunk
from aggregator.join.pending import Columns, PendingStore

__all__ = ["LABEL_REASONS", "JoinLimits", "JoinState", "Matched"]

# Why a label changed no metric (dead-lettered with the reason); append only.
LABEL_REASONS: Final = (
    "duplicate_label",  # its prediction was already joined (or the label came twice)
    "expired_prediction",  # its prediction left the store: time to live, or the cap
    "unknown_prediction",  # no prediction with the id came within the wait
    "model_mismatch",  # the label names another model (or version) than the prediction
    "label_kind_mismatch",  # a value for a classifier, a class for a regressor
    "invalid_label",  # an empty id, a non-finite value, a time out of range
)
(DUPLICATE, EXPIRED, UNKNOWN, MODEL_MISMATCH, KIND_MISMATCH, INVALID) = range(len(LABEL_REASONS))

_EARLY_COLUMNS: Final = (
    ("label_code", "<i4"),  # into JoinState.names; -1 = a value
    ("label_value", "<f8"),
    ("model", "<i4"),
    ("version", "<i4"),
    ("label_time_ms", "<i8"),
    ("offset", "<i8"),  # of the label record, for its dead letter if it never joins
)
_SEEN_COLUMNS: Final = (("status", "<i1"), ("time_ms", "<i8"))
_JOINED, _EXPIRED = 1, 2
_MAX_NAMES: Final = 1 << 16


@dataclass(frozen=True, slots=True)
class JoinLimits:
    """Time to live, waits and caps of the join (settings: --label-ttl and friends)."""

    ttl_ms: int = 7 * 86_400_000
    wait_ms: int = 300_000
    max_pending: int = 1_000_000
    max_early: int = 1_000_000
    max_seen: int = 1_000_000
    # Label coverage counts a pending prediction as "not labelled" once it is this old:
    # a label may still come, but most should have (set it past the usual delay).
    coverage_age_ms: int = 3_600_000
    # Models whose predictions wait for a label (empty: every model): the others' late
    # labels find nothing (unknown_prediction), and they take no memory here.
    models: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Matched:
    """Pairs to bin: the pending prediction's columns and the label's, row by row."""

    prediction: Columns
    labels: LabelChunk


class JoinState:
    """Pending predictions, early labels and recent ids of one partition."""

    def __init__(self, limits: JoinLimits) -> None:
        self.limits = limits
        self.pending = PendingStore.predictions(limits.max_pending)
        self.early = PendingStore(_EARLY_COLUMNS, "label_time_ms", limits.max_early)
        self.seen = PendingStore(_SEEN_COLUMNS, "time_ms", limits.max_seen)
        self.names: list[str] = []  # class, model and version names of early labels
        self._name_ids: dict[str, int] = {}
        self.next_offset = -1  # of the feedback partition: -1 = where the group left off
        self.unmatched = np.zeros(len(LABEL_REASONS), dtype=np.int64)
        self.duplicate_ids = 0  # predictions whose id was already pending (not joinable)
        # Per model version of the partition's catalog: pending now, expired, evicted.
        self.per_mv: dict[str, np.ndarray] = {
            k: np.zeros(0, np.int64) for k in ("pending", "expired", "evicted")
        }

    def waits_for(self, model_names: list[str]) -> np.ndarray:
        """Per model version (by its model's name): whether its predictions wait."""
        if not self.limits.models:
            return np.ones(len(model_names), dtype=bool)
        return np.array([m in self.limits.models for m in model_names], dtype=bool)

    def grow(self, capacity: int) -> None:
        for k, arr in self.per_mv.items():
            if arr.size < capacity:
                grown = np.zeros(capacity, np.int64)
                grown[: arr.size] = arr
                self.per_mv[k] = grown

    # -- predictions -------------------------------------------------------------------

    def add_predictions(self, key: np.ndarray, columns: Columns) -> Matched | None:
        """Predictions to wait for a label (``columns`` as ``PREDICTION_COLUMNS``);
        returns the ones whose label came first, with it."""
        if not key.size:
            return None
        ins = self.pending.insert(key, columns)
        self.duplicate_ids += int(ins.duplicates.sum())
        new = ~ins.duplicates
        self._count("pending", columns["version"][new], +1)
        self._gone(ins.evicted, "evicted", int(columns["event_time_ms"].max()))
        if not len(self.early):
            return None
        found, early = self.early.take(key[new])
        if not found.any():
            return None
        still, pred = self._take_pending(early["key"])  # the cap may have pushed some out
        self.unmatched[EXPIRED] += int((~still).sum())
        labels = self._early_chunk(early).take(still)
        self._joined(labels)
        return Matched(pred, labels)

    # -- labels ------------------------------------------------------------------------

    def match(self, labels: LabelChunk) -> tuple[Matched, np.ndarray]:
        """Labels against the pending predictions: (matched pairs, reason per label or
        -1 for matched and waiting). Labels not found wait in ``early`` unless their id
        was seen joined or expired. The caller checks model and kind, and calls
        ``unmatch`` for pairs it refuses, before binning."""
        reason = np.full(len(labels), -1, dtype=np.int64)
        found, pred = self._take_pending(labels.key)
        ok = labels.take(found)
        self._joined(ok)  # first, so a repeat later in this batch is a duplicate
        miss = np.flatnonzero(~found)
        if miss.size:
            seen_found, seen = self.seen.peek(labels.key[miss])
            status = np.zeros(miss.size, np.int8)
            status[seen_found] = seen["status"]
            reason[miss[status == _JOINED]] = DUPLICATE
            reason[miss[status == _EXPIRED]] = EXPIRED
            wait = miss[status == 0]
            if wait.size:
                reason[wait[self._wait(labels.take(wait))]] = DUPLICATE
        return Matched(pred, ok), reason

    def _take_pending(self, keys: np.ndarray) -> tuple[np.ndarray, Columns]:
        """``pending.take`` with the per model version count kept in step."""
        found, pred = self.pending.take(keys)
        self._count("pending", pred["version"], -1)
        return found, pred

    def latest_early_ms(self) -> int | None:
        """Label time of the latest label waiting for its prediction (None: none waits)."""
        if not len(self.early):
            return None
        return int(np.max(self.early.entries()["label_time_ms"]))

    def _joined(self, labels: LabelChunk) -> None:
        self.seen.insert(
            labels.key,
            {"status": np.full(len(labels), _JOINED, np.int8), "time_ms": labels.label_time_ms},
        )

    def unmatch(self, matched: Matched, refused: np.ndarray) -> None:
        """Put the predictions of refused pairs back: a wrong label must not use them up."""
        if not refused.any():
            return
        back = {k: v[refused] for k, v in matched.prediction.items() if k != "key"}
        self.pending.insert(matched.prediction["key"][refused], back)
        self._count("pending", back["version"], +1)
        self.seen.take(matched.prediction["key"][refused])

    def _wait(self, labels: LabelChunk) -> np.ndarray:
        """Labels into ``early``; returns the mask of those already waiting (duplicates)."""
        names = self._intern(labels.names)
        ins = self.early.insert(
            labels.key,
            {
                "label_code": _recode(labels.label_code, names),
                "label_value": labels.label_value,
                "model": _recode(labels.model, names),
                "version": _recode(labels.version, names),
                "label_time_ms": labels.label_time_ms,
                "offset": labels.offset,
            },
        )
        self.unmatched[UNKNOWN] += len(ins.evicted["key"])  # pushed out by the cap
        dup: np.ndarray = ins.duplicates
        return dup

    # -- time --------------------------------------------------------------------------

    def expire(self, watermark_ms: int) -> np.ndarray:
        """Move the stores to the prediction partition's watermark; returns the offsets
        of early labels that waited in vain (dead letters ``unknown_prediction``)."""
        lim = self.limits
        self._gone(self.pending.expire(watermark_ms - lim.ttl_ms), "expired", watermark_ms)
        self.seen.expire(watermark_ms - lim.ttl_ms)
        waited = self.early.expire(watermark_ms - lim.wait_ms)
        self.unmatched[UNKNOWN] += waited["key"].size
        if not len(self.early) and len(self.names) > _MAX_NAMES // 2:
            self.names, self._name_ids = [], {}  # nothing refers to them any more
        offsets: np.ndarray = waited["offset"]
        return offsets

    def old_pending(self, watermark_ms: int, capacity: int) -> np.ndarray:
        """Pending predictions per model version older than ``coverage_age_ms``."""
        entries = self.pending.entries()
        old = entries["event_time_ms"] < watermark_ms - self.limits.coverage_age_ms
        counts: np.ndarray = np.bincount(entries["version"][old], minlength=capacity)
        return counts[:capacity]

    # -- helpers -----------------------------------------------------------------------

    def _gone(self, entries: Columns, why: str, now_ms: int) -> None:
        """Predictions that left unlabelled: counted per model version, and remembered
        (from ``now_ms``, for the time to live) so their late label is told apart."""
        n = entries["key"].size
        if not n:
            return
        self._count("pending", entries["version"], -1)
        self._count(why, entries["version"], +1)
        self.seen.insert(
            entries["key"],
            {"status": np.full(n, _EXPIRED, np.int8), "time_ms": np.full(n, now_ms)},
        )

    def _count(self, what: str, versions: np.ndarray, sign: int) -> None:
        if versions.size:
            arr = self.per_mv[what]
            add = np.bincount(versions, minlength=arr.size)
            if add.size > arr.size:
                self.grow(add.size)
                arr = self.per_mv[what]
            arr += sign * add

    def _intern(self, names: list[str]) -> np.ndarray:
        """Codes in ``self.names`` of a chunk's names (shared by early labels)."""
        out = np.empty(len(names), dtype=np.int32)
        for i, name in enumerate(names):
            code = self._name_ids.get(name)
            if code is None:
                code = self._name_ids[name] = len(self.names)
                self.names.append(name)
            out[i] = code
        return out

    def _early_chunk(self, early: Columns) -> LabelChunk:
        return LabelChunk(
            offset=early["offset"],
            key=early["key"],
            label_time_ms=early["label_time_ms"],
            model=early["model"],
            version=early["version"],
            label_code=early["label_code"],
            label_value=early["label_value"],
            names=self.names,
        )


def _recode(codes: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Chunk-local name codes -> the state's (-1 stays -1)."""
    out: np.ndarray = np.where(codes >= 0, table[np.maximum(codes, 0)], -1).astype(np.int32)
    return out
