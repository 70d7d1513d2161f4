"""The state of one input partition: the front over panes, catalog, drift, resources.

Everything here is a function of the partition's log alone (no wall clock), so
restoring a snapshot and replaying from its ``next_offset`` rebuilds exactly the
same arrays. A batch is validated (``checks``), then only accepted rows are interned
(``intern``) and binned into their panes (``panes``, driven by the measure table of
``measures``); closing panes feeds the cumulative counters and drift references.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from aggregator.catalog import Catalog
from aggregator.join.chunks import DEFAULT_MAX_BYTES
from aggregator.join.joiner import LABEL_REASONS, UNKNOWN, JoinState
from aggregator.join.labels import LabelChunk
from aggregator.state.batch import Batch, Item, groups, kept_features
from aggregator.state.binning import Buckets
from aggregator.state.checks import value_reasons
from aggregator.state.config import (
    _R_LATE,
    _R_TIME,
    REJECT_REASONS,
    SLICE_ROWS,
    StateConfig,
)
from aggregator.state.drift import DriftReferences
from aggregator.state.intern import Interner
from aggregator.state.joined import ingest_labels, join_view, merge_letters, wait_for_labels
from aggregator.state.panes import PaneStore, WindowAggregate
from aggregator.state.resources import Resources
from aggregator.state.rows import Rows
from aggregator.window import NO_TIME, closed_panes, late_mask

__all__ = ["IngestResult", "PartitionState", "StateView"]

T = TypeVar("T")


class _Part(Generic[T]):
    """Read-only ``state.<name>`` for ``state.<part>.<attr>`` (``state.cum`` is
    ``state.panes.cum``): the front keeps the names its readers use."""

    def __init__(self, part: str, attr: str) -> None:
        self.part, self.attr = part, attr

    def __get__(self, obj: object, owner: type | None = None) -> T:
        value: T = getattr(getattr(obj, self.part), self.attr)
        return value


@dataclass(frozen=True, slots=True)
class IngestResult:
    """Rows of a batch that were rejected: Kafka offset and reason code, per row."""

    offsets: np.ndarray
    reasons: np.ndarray
    accepted: int


@dataclass(frozen=True, slots=True)
class StateView:
    """A consistent copy of what a partition exports, safe to read from another thread."""

    partition: int
    entries: list[tuple[str, str, bool, int, list[str], list[str], list[str]]]  # regression
    cum: dict[str, np.ndarray]
    windows: tuple[WindowAggregate, ...]
    reference: dict[str, np.ndarray]
    has_reference: np.ndarray
    rejected: dict[str, int]
    folded: dict[str, int]
    resources: list[dict[str, Any]]
    events_accepted: int
    max_event_ms: int
    window_end_ms: int
    next_offset: int
    # The label join (None when off): per model version "pending", "expired",
    # "evicted"; and labels that changed no metric, by reason.
    join: dict[str, np.ndarray] | None = None
    unmatched_labels: dict[str, int] | None = None


class PartitionState:
    """Aggregates of one partition of the input topic."""

    def __init__(self, config: StateConfig, partition: int) -> None:
        self.config = c = config
        self.partition = partition
        self.catalog = Catalog(c.limits)
        self.max_event_ms = NO_TIME
        self.next_offset = -1  # unknown: start where the group left off
        self.rejected: dict[str, int] = {}
        self.events_accepted = 0
        self.version = 0  # bumps whenever exported values may have changed
        self._resources = Resources()
        self._buckets = (Buckets(np.asarray(c.latency_bounds)), Buckets(np.asarray(c.score_bounds)))
        self._err_edges = np.asarray(c.error_bounds)
        self.panes = PaneStore(c, self._take_references)
        self.drift = DriftReferences(c, self.panes.tails)
        self.join = JoinState(c.join) if c.join is not None else None
        # Dead letters of labels decided while ingesting predictions (an early label
        # whose wait ran out, or whose prediction it does not fit): (offset, reason).
        self.label_letters: list[tuple[np.ndarray, np.ndarray]] = []
        self._windows: tuple[WindowAggregate, ...] = ()
        self._window_key: tuple[int, int] | None = None
        self.old_pending: tuple[tuple[int, int], np.ndarray] | None = None  # join_view's
        self.grow(4)

    def grow(self, need: int) -> None:
        """Room for ``need`` model versions in every array."""
        old = self.panes.capacity
        if self.panes.grow(need):
            self.drift.grow(old, self.panes.capacity)
            if self.join is not None:
                self.join.grow(self.panes.capacity)

    _grow = grow  # the name tests and older callers use

    def _take_references(self) -> None:
        self.drift.take(self.panes, self.catalog)

    # Views of the parts, under the names the exporter and tests read.
    closed: _Part[int] = _Part("panes", "closed")
    window_end_ms: _Part[int] = _Part("panes", "window_end_ms")
    cum: _Part[dict[str, np.ndarray]] = _Part("panes", "cum")
    ring: _Part[dict[str, np.ndarray]] = _Part("panes", "ring")
    open: _Part[dict[str, np.ndarray]] = _Part("panes", "open")
    slot_closed: _Part[np.ndarray] = _Part("panes", "slot_closed")
    pane_of_slot: _Part[np.ndarray] = _Part("panes", "pane_of_slot")
    open_closed: _Part[np.ndarray] = _Part("panes", "open_closed")
    pane_of_open: _Part[np.ndarray] = _Part("panes", "pane_of_open")
    reference: _Part[dict[str, np.ndarray]] = _Part("drift", "arrays")
    has_reference: _Part[np.ndarray] = _Part("drift", "has")
    resources: _Part[dict[str, dict[str, Any]]] = _Part("_resources", "records")

    # -- ingest ------------------------------------------------------------------------

    def ingest(
        self,
        items: Sequence[Item],
        message_offsets: np.ndarray,
        message_timestamps_ms: np.ndarray,
        next_offset: int,
    ) -> IngestResult:
        """Add a batch of decoded messages (in log order); returns the rejected rows.

        ``message_offsets``/``message_timestamps_ms`` list every message of the batch
        (sorted), for the future-event check against the log's own timestamp. Rows are
        taken in groups of at most ``SLICE_ROWS`` (a large envelope is cut into slices),
        so the temporaries stay bounded; the state does not depend on where cuts fall.
        """
        offsets, reasons, accepted = [], [], 0
        for group in groups(items, SLICE_ROWS):
            off, why, n = self._ingest_group(group, message_offsets, message_timestamps_ms)
            offsets.append(off)
            reasons.append(why)
            accepted += n
        self.next_offset = next_offset
        if not offsets:
            return IngestResult(np.empty(0, np.int64), np.empty(0, np.int64), 0)
        return IngestResult(np.concatenate(offsets), np.concatenate(reasons), accepted)

    def _ingest_group(
        self, items: list[Item], message_offsets: np.ndarray, message_timestamps_ms: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Validate, then intern only what is accepted, then bin (see ``ingest``)."""
        joins = self.join is not None
        limit = self.config.max_name_length
        b = Batch.gather(items, limit, message_offsets, message_timestamps_ms, keep_ids=joins)
        if b is None:
            return np.empty(0, np.int64), np.empty(0, np.int64), 0
        c = b.cols
        t = c["t"].astype(np.int64)
        reason = value_reasons(
            c["lat"], c["out"], c["score"], c["pv"], c["lv"], b.has_val, b.has_cls
        )
        bad_name = b.why >= 0
        reason[bad_name] = b.why[bad_name]
        reason[~b.is_row] = b.why[~b.is_row]  # markers and heartbeats: their own checks only
        reason[(t < 0) | (t > b.ts + self.config.max_future_ms)] = _R_TIME
        valid = reason < 0
        cfg = self.config
        late_v, self.max_event_ms = late_mask(
            t[valid], self.max_event_ms, cfg.lateness_ms, cfg.pane_ms
        )
        late = np.zeros(b.n, dtype=bool)
        late[valid] = late_v
        reason[late & b.is_row] = _R_LATE
        cand = valid & ~late & b.is_row
        ids = Interner(self.catalog, self.grow).rows(
            b.chunks, b.n, cand, b.has_val, b.has_cls, reason
        )
        keep = cand & (reason < 0)
        if keep.any():
            rows: np.ndarray | slice = slice(None) if keep.all() else np.flatnonzero(keep)
            cols = {"pred": ids.pred, "label": ids.label, "seg": ids.seg, "t": t}
            cols.update((k, c[k]) for k in ("lat", "out", "score", "pv", "lv"))
            if joins:
                cols["key"] = c["key"]
            kept = {k: v[rows] for k, v in cols.items()}
            mv = ids.mv[rows]
            feats = kept_features(ids.feats, keep, rows)
            rows_in = Rows(cfg, mv, kept, self._buckets, self._err_edges, feats)
            self.panes.add(np.floor_divide(kept["t"], cfg.pane_ms), rows_in)
            if self.join is not None:
                wait_for_labels(self, kept, mv)
        self.panes.close(closed_panes(self.max_event_ms, cfg.lateness_ms, cfg.pane_ms))
        if self.join is not None:
            waited = self.join.expire(self.max_event_ms)
            if waited.size:
                self.label_letters.append((waited, np.full(waited.size, UNKNOWN)))
        for at, record in b.beats:
            if reason[at] < 0:
                self._resources.add(record)
        self._resources.prune(self.max_event_ms)

        bad = reason >= 0
        if bad.any():
            counts = np.bincount(reason[bad], minlength=len(REJECT_REASONS))
            for code, n in enumerate(counts.tolist()):
                if n:
                    name = REJECT_REASONS[code]
                    self.rejected[name] = self.rejected.get(name, 0) + n
        accepted = int(keep.sum())
        self.events_accepted += accepted
        self.version += 1
        return c["off"][bad], reason[bad], accepted

    # -- labels joined later (aggregator.join; the work is in state/joined.py) ---------

    def ingest_labels(self, labels: LabelChunk, next_offset: int) -> IngestResult:
        """Join a batch of the feedback partition's labels (in log order); returns the
        labels that changed no metric (offset, ``LABEL_REASONS`` code) for dead letters,
        with those decided meanwhile by predictions (``label_letters``)."""
        binned = ingest_labels(self, labels, next_offset)
        self.version += 1
        return IngestResult(*self.drain_label_letters(), binned)

    def drain_label_letters(self) -> tuple[np.ndarray, np.ndarray]:
        """(feedback offsets, ``LABEL_REASONS`` codes) of the labels decided since the
        last call: the caller dead-letters them."""
        letters, self.label_letters = self.label_letters, []
        return merge_letters(letters)

    def count_rejected(self, reason: str, n: int = 1) -> None:
        """Count messages rejected before ingest (undecodable and the like)."""
        self.rejected[reason] = self.rejected.get(reason, 0) + n
        self.version += 1

    # -- reading -----------------------------------------------------------------------

    def window(self, window_ms: int) -> WindowAggregate:
        """Sums over the panes of [E - window, E) where E is the last closed boundary."""
        return self.panes.window(window_ms, len(self.catalog))

    def view(self) -> StateView:
        """Copies for the exporter; window sums are recomputed only when panes closed."""
        m = len(self.catalog)
        key = (self.closed, m)
        if self._window_key != key:
            self._windows = tuple(self.window(w) for w in self.config.windows_ms)
            self._window_key = key
        lim = self.config.limits
        j = self.join
        entries = [
            (
                e.model,
                e.version,
                bool(e.regression),
                e.first_seen_ms,
                _names(e.classes, lim.max_classes),
                _names(e.features, lim.max_features),
                _names(e.segments, lim.max_segments),
            )
            for e in self.catalog.entries
        ]
        return StateView(
            partition=self.partition,
            entries=entries,
            cum={k: v[:m].copy() for k, v in self.cum.items()},
            windows=self._windows,
            reference={k: v[:m].copy() for k, v in self.reference.items()},
            has_reference=self.has_reference[:m].copy(),
            rejected=dict(self.rejected),
            folded=dict(self.catalog.folded),
            resources=list(self.resources.values()),
            events_accepted=self.events_accepted,
            max_event_ms=self.max_event_ms,
            window_end_ms=self.window_end_ms,
            next_offset=self.next_offset,
            join=None if j is None else join_view(self, j, m),
            unmatched_labels=None
            if j is None
            else dict(zip(LABEL_REASONS, j.unmatched.tolist(), strict=True)),
        )

    # -- snapshots ---------------------------------------------------------------------

    def to_bytes(self, chunks: Sequence[Sequence[bytes]] = ()) -> bytes:
        """The whole state as one compressed record (for the compacted state topic).

        With a join, pass its stores' ``join_chunks()``: they are written as records of
        their own before this one, which names them."""
        from aggregator.state.snapshot import snapshot  # noqa: PLC0415 (cycle)

        return snapshot(self, chunks)

    def to_records(self, max_bytes: int = DEFAULT_MAX_BYTES) -> list[bytes]:
        """The snapshot as records to write in this order: the join stores' chunks (each
        at most ``max_bytes``), then the head (``to_bytes``). ``from_records`` reads it."""
        chunks = self.join_chunks(max_bytes)
        return [*(c for store in chunks for c in store), self.to_bytes(chunks)]

    @classmethod
    def from_records(cls, records: Sequence[bytes], config: StateConfig) -> PartitionState:
        """Restore what ``to_records`` wrote (the head last)."""
        return cls.from_bytes(records[-1], config, chunks=records[:-1])

    @staticmethod
    def chunks_before(head: bytes) -> int:
        """How many chunk records were written just before this head (a reader of the
        state topic reads them back from the head's offset)."""
        size = int.from_bytes(head[:4], "big")
        meta = json.loads(head[4 : 4 + size])
        join = meta.get("join")
        return sum(int(c["count"]) for c in join["chunks"]) if join else 0

    def join_chunks(self, max_bytes: int = DEFAULT_MAX_BYTES) -> list[list[bytes]]:
        """The join stores as snapshot chunks of at most ``max_bytes`` (none without a
        join): one list per store, in the order ``from_bytes`` takes them flattened."""
        from aggregator.state.snapshot import join_chunks  # noqa: PLC0415 (cycle)

        return join_chunks(self, max_bytes)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        config: StateConfig,
        *,
        rebuild: bool = False,
        chunks: Sequence[bytes] = (),
    ) -> PartitionState:
        """Restore a snapshot (and its join chunks); a different config raises
        ``ConfigMismatch``."""
        from aggregator.state.snapshot import restore  # noqa: PLC0415 (cycle)

        state = cls(config, 0)
        restore(data, state, chunks)
        return state


def _names(table: dict[str, int], size: int) -> list[str]:
    names = [""] * size
    for name, i in table.items():
        names[i] = name
    return names
