"""The state of one input partition: panes, cumulative counters, windows, snapshots.

Everything here is a function of the partition's log alone (no wall clock), so
restoring a snapshot and replaying from its ``next_offset`` rebuilds exactly the
same arrays. Rows are binned with one ``np.bincount`` per metric over a combined
(pane, model-version, bucket) index; panes live in a ring of ``R`` slots that holds
the longest window plus the panes still open.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import numpy as np

from aggregator.catalog import MACRO, OVERFLOW, Catalog, Limits
from aggregator.errors import ConfigMismatch
from aggregator.state.columns import MAX_ROWS_PER_ENVELOPE, Heartbeat, Marker, RowChunk
from aggregator.window import NO_TIME, closed_panes, late_mask

__all__ = [
    "CALIBRATION_BINS",
    "DRIFT_BINS",
    "DRIFT_CENTERS",
    "REJECT_REASONS",
    "SEGMENT_ROLES",
    "IngestResult",
    "PartitionState",
    "StateConfig",
    "StateView",
    "WindowAggregate",
    "load_reference_file",
    "score_bin_centers",
]

N_OUTCOMES: Final = 5  # ok, error, timeout, rejected, unknown (schemas.wire.OUTCOMES)
OK: Final = 0
_VALID_OUTCOMES: Final = 4  # codes >= 4 ("unknown" or newer) are rejected
DRIFT_BINS: Final = 64
RESOURCE_TTL_MS: Final = 600_000  # an instance silent this long (event time) is dropped
MAX_INSTANCES: Final = 256  # resource series per partition
_DRIFT_RANGE: Final = 8.0  # asinh space: |x| up to ~1490 gets its own bins
# Reliability bins of the score: (0.1 (k - 1), 0.1 k], the first one from 0 inclusive,
# as sklearn.calibration.calibration_curve(n_bins=10) cuts them.
CALIBRATION_BINS: Final = 10
_CAL_EDGES: Final = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)[1:-1]
# Which measures (pane arrays) a snapshot holds: part of the config digest, so a snapshot
# taken before a measure was added is refused with ConfigMismatch (the config-changed
# path) rather than half restored. Bump it whenever _PANE_ARRAYS, _OPEN_ARRAYS or a
# tail changes.
STATE_FORMAT: Final = 3
# Per-segment quality counts, by role: rows whose label is the class (actual), whose
# prediction is (predicted), and both (correct, a true positive of the class).
SEGMENT_ROLES: Final = ("actual", "predicted", "correct")
_DRIFT_WIDTH: Final = 2 * _DRIFT_RANGE / DRIFT_BINS  # 0.25 in asinh space
# Centre of each drift bin in asinh space (the two end bins also hold everything beyond).
DRIFT_CENTERS: Final = -_DRIFT_RANGE + (np.arange(DRIFT_BINS) + 0.5) * _DRIFT_WIDTH

# Reasons a row (or a heartbeat, or a whole envelope) is rejected and dead-lettered;
# the position is the code. Append only: snapshots store the counts by name, but the
# codes travel in ``IngestResult``.
REJECT_REASONS: Final = (
    "invalid_latency",
    "unknown_outcome",
    "invalid_score",
    "invalid_event_time",
    "kind_mismatch",
    "late",
    "name_too_long",
    "reserved_name",
    "empty_model",
    "invalid_value",
    "invalid_heartbeat",
    "envelope_too_large",  # raised by decode_batch as a DecodeError, before any column
)
(
    _R_LATENCY,
    _R_OUTCOME,
    _R_SCORE,
    _R_TIME,
    _R_KIND,
    _R_LATE,
    _R_NAME_LONG,
    _R_RESERVED,
    _R_EMPTY_MODEL,
    _R_VALUE,
    _R_HEARTBEAT,
    _R_ENVELOPE,
) = range(len(REJECT_REASONS))

# Largest magnitude of a regression prediction/label or a latency: beyond it a square
# (RMSE) or a running sum could overflow to inf and poison the cumulative sums for good.
MAX_ABS_VALUE: Final = 1e100
# Names the exposition itself uses as label values: a class "macro" would collide with
# the macro average, any name "__overflow__" with the overflow bucket of a cap.
RESERVED_NAMES: Final = frozenset({OVERFLOW})
RESERVED_CLASSES: Final = frozenset({OVERFLOW, MACRO})
MAX_GPUS: Final = 64  # GPUs in one heartbeat; more is a broken or hostile sender
SLICE_ROWS: Final = 65_536  # rows per ingest step: bounds the temporaries of one call


@dataclass(frozen=True, slots=True)
class StateConfig:
    """What shapes the state; its hash guards snapshots against config changes."""

    pane_ms: int = 10_000
    windows_ms: tuple[int, ...] = (60_000, 300_000, 3_600_000)
    lateness_ms: int = 10_000
    max_future_ms: int = 300_000
    latency_bounds: tuple[float, ...] = (
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
        2.5,
        5.0,
        10.0,
    )
    score_bounds: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 21))
    error_bounds: tuple[float, ...] = (
        -10.0,
        -5.0,
        -2.5,
        -1.0,
        -0.5,
        -0.25,
        -0.1,
        0.0,
        0.1,
        0.25,
        0.5,
        1.0,
        2.5,
        5.0,
        10.0,
    )
    drift_reference_ms: int = 300_000
    limits: Limits = field(default_factory=Limits)
    # Sample values per model (see ``load_reference_file``); not part of the digest:
    # it only shapes drift gauges, which are recomputed from panes at every render.
    reference_samples: tuple[tuple[str, str, str], ...] = ()
    # Input limits: not part of the digest either. They shape no array, so a snapshot
    # stays valid when they change; the new limit applies from the next message on.
    max_name_length: int = 256
    max_rows_per_envelope: int = MAX_ROWS_PER_ENVELOPE

    def __post_init__(self) -> None:
        if self.pane_ms <= 0:
            raise ValueError("pane_ms: must be > 0")
        for w in self.windows_ms:
            if w <= 0 or w % self.pane_ms:
                raise ValueError(
                    f"windows_ms: {w} is not a positive multiple of pane {self.pane_ms}"
                )
        if self.drift_reference_ms % self.pane_ms or self.drift_reference_ms > max(self.windows_ms):
            raise ValueError(
                "drift_reference_ms: a multiple of the pane, at most the longest window"
            )
        if self.max_name_length < 1 or self.max_rows_per_envelope < 1:
            raise ValueError("max_name_length, max_rows_per_envelope: must be >= 1")
        for name in ("latency_bounds", "score_bounds", "error_bounds"):
            b = getattr(self, name)
            if not b or any(not math.isfinite(x) for x in b) or list(b) != sorted(set(b)):
                raise ValueError(f"{name}: must be finite and strictly increasing")

    @property
    def ring(self) -> int:
        return max(self.windows_ms) // self.pane_ms + -(-self.lateness_ms // self.pane_ms) + 2

    def digest(self) -> str:
        fields = asdict(self)
        for name in ("reference_samples", "max_name_length", "max_rows_per_envelope"):
            fields.pop(name)
        fields["state_format"] = STATE_FORMAT
        doc = json.dumps(fields, sort_keys=True, default=list)
        return hashlib.sha256(doc.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class IngestResult:
    """Rows of a batch that were rejected: Kafka offset and reason code, per row."""

    offsets: np.ndarray
    reasons: np.ndarray
    accepted: int


@dataclass(frozen=True, slots=True)
class WindowAggregate:
    """Sums over the closed panes of one window, per model-version (first axis)."""

    window_ms: int
    end_ms: int
    outcome: np.ndarray
    lat: np.ndarray
    score: np.ndarray
    err: np.ndarray
    abs_err: np.ndarray
    sq_err: np.ndarray
    labelled: np.ndarray
    conf: np.ndarray
    pred_class: np.ndarray
    pred_hist: np.ndarray
    feat: np.ndarray
    cal: np.ndarray
    cal_score: np.ndarray
    brier: np.ndarray
    est: np.ndarray
    est_sum: np.ndarray


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


def score_bin_centers(bounds: Sequence[float]) -> np.ndarray:
    """Centre of each bucket of the score histogram (``len(bounds) + 1`` values).

    Scores lie in [0, 1], so the buckets are cut to it: the first starts at 0 and the
    last (``+Inf``) ends at 1; a bucket wholly outside [0, 1] has width 0.

    >>> score_bin_centers([0.5, 1.0]).tolist()
    [0.25, 0.75, 1.0]
    """
    edges = np.clip(np.concatenate([[0.0], np.asarray(bounds, dtype=np.float64), [1.0]]), 0, 1)
    edges = np.maximum.accumulate(edges)
    centers: np.ndarray = (edges[:-1] + edges[1:]) / 2
    return centers


def _names(table: dict[str, int], size: int) -> list[str]:
    names = [""] * size
    for name, i in table.items():
        names[i] = name
    return names


def load_reference_file(path: str) -> tuple[tuple[str, str, str], ...]:
    """Parse a drift reference file into ``StateConfig.reference_samples``.

    The file is JSON: ``{"models": {"<model>": {"version": "*" or "<v>", "score": [...],
    "prediction": [...], "features": {"<name>": [...]}}}}`` with raw sample values (e.g.
    from the training or validation set); they are binned exactly as live traffic is.
    """
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, dict):
        raise ValueError(f"{path}: expected {{'models': {{name: {{...}}}}}}")
    out = []
    for model, spec in models.items():
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: models.{model} must be an object")
        unknown = set(spec) - {"version", "score", "prediction", "features"}
        if unknown:
            raise ValueError(f"{path}: models.{model}: unknown keys {sorted(unknown)}")
        out.append((model, str(spec.get("version", "*")), json.dumps(spec, sort_keys=True)))
    return tuple(out)


def _dense(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct keys, index of each key in them): np.unique's answer in O(n)
    when the keys span a small range (a batch touches a few panes), else np.unique."""
    lo, hi = int(keys.min()), int(keys.max())
    if hi - lo > 1 << 16:
        uniq, inverse = np.unique(keys, return_inverse=True)
        return uniq, inverse
    offset = keys - lo
    if hi - lo <= 1:  # the min and the max are both present: nothing in between
        return np.arange(lo, hi + 1, dtype=keys.dtype), offset
    present = np.bincount(offset, minlength=hi - lo + 1) > 0
    position = np.cumsum(present) - 1
    return np.flatnonzero(present) + lo, position[offset]


def _groups(
    items: Sequence[RowChunk | Marker | Heartbeat], limit: int
) -> Iterator[list[RowChunk | Marker | Heartbeat]]:
    """Consecutive items in groups of at most ``limit`` rows, cutting large chunks."""
    group: list[RowChunk | Marker | Heartbeat] = []
    rows = 0
    for item in items:
        if not isinstance(item, RowChunk):
            group.append(item)
            rows += 1
        else:
            start, n = 0, len(item)
            while start < n:
                take = min(n - start, limit - rows)
                group.append(item if take == n else item.rows(start, start + take))
                start += take
                rows += take
                if rows >= limit:
                    yield group
                    group, rows = [], 0
        if rows >= limit:
            yield group
            group, rows = [], 0
    if group:
        yield group


class _Buckets:
    """``np.searchsorted(edges, x, "left")`` for histogram bounds, by table lookup.

    When every edge is > 0, the top bits of a float64 (exponent and leading mantissa
    bits) order non-negative values as the floats do, so they name a cell of a small
    table holding, per cell, the count of edges below it; negative values clip to the
    first cell, values past the last edge to the last one. With few enough bits that
    no cell holds two edges, one comparison with the next edge finishes the count
    exactly. A binary search costs a branch miss per step on random values; this is
    one gather and one compare. Other edges (zero, negative, too dense for a table)
    keep ``np.searchsorted``. NaN gets an in-range bin, not necessarily the last:
    callers pass no NaN or mask those rows out.
    """

    MAX_TABLE: Final = 1 << 16

    def __init__(self, edges: np.ndarray) -> None:
        self.edges = edges = np.asarray(edges, dtype=np.float64)
        self.table: np.ndarray | None = None
        if not edges.size or edges[0] <= 0:
            return
        bits = edges.view(np.int64)
        for shift in range(52, 0, -1):
            keys = bits >> shift
            if (int(keys[-1]) + 2) > self.MAX_TABLE:
                return
            if np.all(np.diff(keys) > 0):
                break
        self.shift = shift
        self.last = int(keys[-1]) + 1  # its cell starts past the last edge
        lows = (np.arange(self.last + 1, dtype=np.int64) << shift).view(np.float64)
        self.table = np.searchsorted(edges, lows, "left")
        self.next_edge = np.concatenate([edges, [np.inf]])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.table is None:
            found: np.ndarray = np.searchsorted(self.edges, x, "left")
            return found
        x = np.ascontiguousarray(x, dtype=np.float64)
        cell = x.view(np.int64) >> self.shift
        np.clip(cell, 0, self.last, out=cell)
        r: np.ndarray = self.table[cell]
        r += x > self.next_edge[r]
        return r


_CAL_BUCKETS: Final = _Buckets(_CAL_EDGES)


def _drift_bin(values: np.ndarray) -> np.ndarray:
    x = np.arcsinh(values)  # then in place: a temporary fewer per step
    x += _DRIFT_RANGE
    x *= DRIFT_BINS / (2 * _DRIFT_RANGE)
    np.clip(x, 0, DRIFT_BINS - 1, out=x)
    bins: np.ndarray = x.astype(np.int64)
    return bins


class PartitionState:
    """Aggregates of one partition of the input topic."""

    # Arrays with a leading ring axis and a model-version axis; the cumulative
    # counterpart (closed panes only) drops the ring axis.
    _PANE_ARRAYS: Final = (
        "outcome",
        "lat",
        "lat_sum",
        "score",
        "score_sum",
        "err",
        "err_sum",
        "abs_err",
        "sq_err",
        "labelled",
        "conf",
        "pred_class",
        "pred_hist",
        "feat",
        "seg",
        # Classification only. Labelled ok rows with a score: counts per reliability bin
        # x (incorrect, correct), their score sums per bin, and sum of (score - correct)^2.
        "cal",
        "cal_score",
        "brier",
        # Ok rows with a predicted class and a score, labelled or not: count, score sum.
        "est",
        "est_sum",
    )
    _FLOAT_ARRAYS: Final = frozenset(
        {
            "lat_sum", "score_sum", "err_sum", "abs_err", "sq_err", "cal_score", "brier",
            "est_sum", "seg_abs", "seg_sq",
        }
    )  # fmt: skip
    # Quality per segment: kept only in ``cum`` and in a small ring of the panes still
    # open (``open``), never in the window ring: per-pane copies for the longest window
    # would cost max_segments x classes x ring per model version. Windows over them are
    # Prometheus' ``increase()`` of the cumulative counters (docs/architecture.md).
    _OPEN_ARRAYS: Final = (
        "seg_cls",  # labelled ok classifications: segment x role (SEGMENT_ROLES) x class
        "seg_lab",  # labelled ok rows (both classes, or both values): per segment
        "seg_abs",  # regression: sum |prediction - label| per segment
        "seg_sq",  # regression: sum (prediction - label)^2 per segment
    )

    def __init__(self, config: StateConfig, partition: int) -> None:
        self.config = c = config
        self.partition = partition
        self.catalog = Catalog(c.limits)
        self.max_event_ms = NO_TIME
        self.closed = closed_panes(NO_TIME, c.lateness_ms, c.pane_ms)
        self.next_offset = -1  # unknown: start where the group left off
        self.rejected: dict[str, int] = {}
        self.resources: dict[str, dict[str, Any]] = {}
        self.events_accepted = 0
        self.version = 0  # bumps whenever exported values may have changed
        self._lat_edges = np.asarray(c.latency_bounds)
        self._score_edges = np.asarray(c.score_bounds)
        self._lat_buckets = _Buckets(self._lat_edges)
        self._score_buckets = _Buckets(self._score_edges)
        self._err_edges = np.asarray(c.error_bounds)
        lim = c.limits
        self._tails: dict[str, tuple[int, ...]] = {
            "outcome": (N_OUTCOMES,),
            "lat": (len(c.latency_bounds) + 1,),
            "lat_sum": (),
            "score": (len(c.score_bounds) + 1,),
            "score_sum": (),
            "err": (len(c.error_bounds) + 1,),
            "err_sum": (),
            "abs_err": (),
            "sq_err": (),
            "labelled": (),
            "conf": (lim.max_classes, lim.max_classes),
            "pred_class": (lim.max_classes,),
            "pred_hist": (DRIFT_BINS,),
            "feat": (lim.max_features, DRIFT_BINS),
            "seg": (lim.max_segments,),
            "cal": (CALIBRATION_BINS, 2),
            "cal_score": (CALIBRATION_BINS,),
            "brier": (),
            "est": (),
            "est_sum": (),
            "seg_cls": (lim.max_segments, len(SEGMENT_ROLES), lim.max_classes),
            "seg_lab": (lim.max_segments,),
            "seg_abs": (lim.max_segments,),
            "seg_sq": (lim.max_segments,),
        }
        self._capacity = 0
        self.pane_of_slot = np.full(c.ring, NO_TIME, dtype=np.int64)
        self.slot_closed = np.ones(c.ring, dtype=bool)
        # A pane takes an open slot when its first row arrives and frees it at close; a
        # row's pane is at most ceil(lateness / pane) behind the newest (else it is late),
        # so that many + 2 slots never hold two unclosed panes at once.
        self.open_slots = -(-c.lateness_ms // c.pane_ms) + 2
        self.pane_of_open = np.full(self.open_slots, NO_TIME, dtype=np.int64)
        self.open_closed = np.ones(self.open_slots, dtype=bool)
        self.ring: dict[str, np.ndarray] = {}
        self.open: dict[str, np.ndarray] = {}
        self.cum: dict[str, np.ndarray] = {}
        self.reference: dict[str, np.ndarray] = {}
        self.has_reference = np.zeros(0, dtype=bool)
        self._windows: tuple[WindowAggregate, ...] = ()
        self._window_key: tuple[int, int, int] | None = None
        self._grow(4)

    # -- shapes ------------------------------------------------------------------------

    def _dtype(self, name: str) -> type:
        return np.float64 if name in self._FLOAT_ARRAYS else np.int64

    def _grow(self, need: int) -> None:
        if need <= self._capacity:
            return
        cap = max(need, 2 * self._capacity)
        r = self.config.ring
        for name in self._PANE_ARRAYS:
            tail = self._tails[name]
            ring: np.ndarray = np.zeros((r, cap, *tail), dtype=self._dtype(name))
            cum: np.ndarray = np.zeros((cap, *tail), dtype=self._dtype(name))
            if name in self.ring:
                ring[:, : self._capacity] = self.ring[name]
                cum[: self._capacity] = self.cum[name]
            self.ring[name], self.cum[name] = ring, cum
        for name in self._OPEN_ARRAYS:
            tail = self._tails[name]
            pending: np.ndarray = np.zeros((self.open_slots, cap, *tail), dtype=self._dtype(name))
            cum = np.zeros((cap, *tail), dtype=self._dtype(name))
            if name in self.open:
                pending[:, : self._capacity] = self.open[name]
                cum[: self._capacity] = self.cum[name]
            self.open[name], self.cum[name] = pending, cum
        for name in ("score", "pred_class", "pred_hist", "feat"):
            ref = np.zeros((cap, *self._tails[name]), dtype=np.int64)
            if name in self.reference:
                ref[: self._capacity] = self.reference[name]
            self.reference[name] = ref
        has = np.zeros(cap, dtype=bool)
        has[: self._capacity] = self.has_reference
        self.has_reference = has
        self._capacity = cap

    @property
    def window_end_ms(self) -> int:
        return self.closed * self.config.pane_ms

    # -- ingest ------------------------------------------------------------------------

    def _name_reasons(self, chunk: RowChunk) -> np.ndarray | None:
        """Per-row reason for a bad name (too long, reserved, empty model), or None.

        One check per distinct name of the chunk's dictionaries, then a lookup by code.
        """
        limit = self.config.max_name_length

        def check(names: list[str], reserved: frozenset[str]) -> np.ndarray | None:
            codes = [
                _R_NAME_LONG if len(x) > limit else _R_RESERVED if x in reserved else -1
                for x in names
            ]
            if max(codes, default=-1) < 0:
                return None
            return np.array([*codes, -1], dtype=np.int64)  # code -1 (none) maps to -1

        keys = [
            _R_EMPTY_MODEL
            if not model
            else _R_NAME_LONG
            if len(model) > limit or len(version) > limit
            else _R_RESERVED
            if OVERFLOW in (model, version)
            else -1
            for model, version in chunk.mv_keys
        ]
        row: np.ndarray | None = None
        if max(keys, default=-1) >= 0:
            row = np.asarray(keys, dtype=np.int64)[chunk.mv]
        n = len(chunk)

        def merge(found: np.ndarray) -> None:
            nonlocal row
            row = found if row is None else np.maximum(row, found)

        table = check(chunk.classes, RESERVED_CLASSES)
        if table is not None and chunk.pred_code.size:
            merge(np.maximum(table[chunk.pred_code], table[chunk.label_code]))
        table = check(chunk.segments, RESERVED_NAMES)
        if table is not None:
            merge(table[chunk.segment])
        table = check(chunk.feature_names, RESERVED_NAMES)
        if table is not None and chunk.feat_row.size:
            per_row = np.full(n, -1, dtype=np.int64)
            np.maximum.at(per_row, chunk.feat_row, table[chunk.feat_code])
            merge(per_row)
        return row

    def _heartbeat(self, r: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(reason or -1, the record with GPUs de-duplicated by index, the last wins)."""
        limit = self.config.max_name_length
        if len(str(r["service"])) > limit or len(str(r["instance"])) > limit:
            return _R_NAME_LONG, r
        gpus = r.get("gpus") or []
        if len(gpus) > MAX_GPUS:
            return _R_HEARTBEAT, r
        for key in ("cpu_usage_ratio", "disk_usage_ratio"):
            value = r.get(key)
            if value is not None and not 0.0 <= value <= 1.0:  # NaN and inf fail too
                return _R_HEARTBEAT, r
        memory = r.get("memory_usage_bytes")
        if memory is not None and memory < 0:
            return _R_HEARTBEAT, r
        by_index: dict[int, dict[str, Any]] = {}
        for gpu in gpus:
            used = gpu.get("memory_used_bytes")
            util = gpu["utilization_ratio"]
            if gpu["index"] < 0 or not 0.0 <= util <= 1.0 or (used is not None and used < 0):
                return _R_HEARTBEAT, r
            by_index[int(gpu["index"])] = gpu
        if len(by_index) != len(gpus):
            r = {**r, "gpus": [by_index[i] for i in sorted(by_index)]}
        return -1, r

    def _intern_fn(self, table: str) -> Any:
        cat = self.catalog
        return {"classes": cat.class_id, "segments": cat.segment_id, "features": cat.feature_id}[
            table
        ]

    def _lookup(
        self,
        g: int,
        names: list[str],
        columns: tuple[np.ndarray, ...],
        accept: np.ndarray,
        table: str,
    ) -> list[np.ndarray]:
        """``_remap`` for a chunk of one model-version ``g``: one table, one lookup.

        ``columns`` are codes of the same rows, in log order within a row (prediction
        before label); names new to ``g`` are interned in order of first appearance.
        """
        known = getattr(self.catalog.entries[g], table)
        lut = np.array([known.get(x, -2) for x in names] + [-1], dtype=np.int64)
        if (lut == -2).any():  # names new to this model-version, if accepted rows use them
            first: dict[int, int] = {}
            k = len(columns)
            for j, codes in enumerate(columns):
                sel = np.flatnonzero(accept & (lut[codes] == -2))
                if sel.size:
                    uc, at = np.unique(codes[sel], return_index=True)
                    for code, row in zip(uc.tolist(), sel[at].tolist(), strict=True):
                        first[code] = min(first.get(code, row * k + j), row * k + j)
            intern = self._intern_fn(table)
            for code in sorted(first, key=first.__getitem__):
                lut[code] = intern(g, names[code])
        return [np.where(accept, lut[codes], -1) for codes in columns]

    def _remap(
        self,
        codes: np.ndarray,
        gkeys: np.ndarray,
        names: list[str],
        accept: np.ndarray,
        table: str,
        halves: int = 0,
    ) -> np.ndarray:
        """Chunk-local codes of accepted rows -> per-model-version ids (-1 elsewhere).

        Names new to the catalog are interned in order of first appearance in the log,
        so ids do not depend on batch cuts. The log order is the array order, or with
        ``halves`` = n the arrays are two columns of n rows (prediction, then label)
        and row i's prediction comes before its label, which comes before row i + 1.
        """
        out = np.full(codes.shape[0], -1, dtype=np.int64)
        sel = np.flatnonzero(accept & (codes >= 0))
        if not sel.size:
            return out
        width = len(names)
        uniq, inverse = _dense(gkeys[sel] * width + codes[sel])
        ids = np.empty(uniq.size, dtype=np.int64)
        entries = self.catalog.entries
        missing = []
        for j, pair in enumerate(uniq.tolist()):
            g, code = divmod(pair, width)
            found = getattr(entries[g], table).get(names[code])
            if found is None:
                missing.append(j)
            else:
                ids[j] = found
        if missing:
            first = np.full(uniq.size, sel.size, dtype=np.int64)
            np.minimum.at(first, inverse, np.arange(sel.size))
            at = sel[first]
            if halves:
                at = (at % halves) * 2 + at // halves
            intern = self._intern_fn(table)
            for j in sorted(missing, key=lambda j: int(at[j])):
                g, code = divmod(int(uniq[j]), width)
                ids[j] = intern(g, names[code])
        out[sel] = ids[inverse]
        return out

    def _admit(
        self, chunk: RowChunk, cand: np.ndarray, has_val: np.ndarray, has_cls: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Intern the model-versions of a chunk's candidate rows (valid, not late).

        Returns (global model-version per row, -1 where not a candidate; rows whose
        prediction or label has the other kind than their model). A new model-version
        takes the kind of its first informative candidate row and the event time of its
        first candidate row, both in log order: rejected rows never shape the catalog.
        """
        n_keys = len(chunk.mv_keys)
        cat = self.catalog
        if n_keys == 1:  # an envelope: one model-version, no per-key bookkeeping
            first = int(np.argmax(cand)) if cand.size else 0
            if not cand.size or not cand[first]:
                return np.full(len(chunk), -1, dtype=np.int64), np.zeros(len(chunk), dtype=bool)
            informative = cand & (has_val | has_cls)
            row = int(np.argmax(informative))
            kind0 = bool(has_val[row]) if informative[row] else None
            model, version = chunk.mv_keys[0]
            g = cat.model_version(model, version, kind0, int(chunk.event_time_ms[first]))
            self._grow(len(cat))
            mv_one = np.full(len(chunk), -1, dtype=np.int64)
            mv_one[cand] = g
            return mv_one, cand & (has_cls if cat.entries[g].regression is True else has_val)
        idx = np.flatnonzero(cand)
        mv_out = np.full(len(chunk), -1, dtype=np.int64)
        if not idx.size:
            return mv_out, np.zeros(len(chunk), dtype=bool)
        keys = chunk.mv[idx]
        _, at = np.unique(keys, return_index=True)
        firsts = idx[np.sort(at)]  # first candidate row of each key, in log order
        info = idx[has_val[idx] | has_cls[idx]]
        kind: dict[int, bool] = {}
        if info.size:
            uk, at = np.unique(chunk.mv[info], return_index=True)
            kind = dict(zip(uk.tolist(), has_val[info[at]].tolist(), strict=True))
        gid = np.full(n_keys, -1, dtype=np.int64)
        is_reg = np.zeros(n_keys, dtype=bool)
        for row in firsts.tolist():
            k = int(chunk.mv[row])
            model, version = chunk.mv_keys[k]
            g = cat.model_version(model, version, kind.get(k), int(chunk.event_time_ms[row]))
            gid[k] = g
            is_reg[k] = cat.entries[g].regression is True
        self._grow(len(cat))
        mv_out[idx] = gid[keys]
        row_reg = is_reg[chunk.mv]
        mismatch = cand & np.where(row_reg, has_cls, has_val)
        return mv_out, mismatch

    def ingest(
        self,
        items: Sequence[RowChunk | Marker | Heartbeat],
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
        for group in _groups(items, SLICE_ROWS):
            off, why, n = self._ingest_group(group, message_offsets, message_timestamps_ms)
            offsets.append(off)
            reasons.append(why)
            accepted += n
        self.next_offset = next_offset
        if not offsets:
            return IngestResult(np.empty(0, np.int64), np.empty(0, np.int64), 0)
        return IngestResult(np.concatenate(offsets), np.concatenate(reasons), accepted)

    def _ingest_group(
        self,
        items: list[RowChunk | Marker | Heartbeat],
        message_offsets: np.ndarray,
        message_timestamps_ms: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Validate, then intern only what is accepted, then bin (see ``ingest``)."""
        names = ("t", "lat", "out", "score", "off")
        cols: dict[str, list[np.ndarray]] = {k: [] for k in names}
        chunks: list[tuple[int, RowChunk]] = []
        beats: list[tuple[int, dict[str, Any]]] = []
        named: list[tuple[int, np.ndarray]] = []  # (first row, name reasons) of chunks
        own: list[tuple[int, int, int]] = []  # (row, reason or -1, offset): not rows
        base = 0
        for item in items:
            if isinstance(item, RowChunk):
                why = self._name_reasons(item)
                if why is not None:
                    named.append((base, why))
                cols["t"].append(item.event_time_ms)
                cols["lat"].append(item.latency_seconds)
                cols["out"].append(item.outcome)
                cols["score"].append(item.score)
                cols["off"].append(item.offset)
                chunks.append((base, item))
                base += len(item)
                continue
            # A message that only moves the watermark (and, for a heartbeat, resources).
            reason_own = -1
            if isinstance(item, Heartbeat):
                reason_own, record = self._heartbeat(item.record)
                beats.append((base, record))
                t_ms = int(record["event_time_ms"])
            else:
                t_ms = item.event_time_ms
            own.append((base, reason_own, item.offset))
            for key, value in (
                ("t", t_ms),
                ("lat", 0.0),
                ("out", 0),
                ("score", np.nan),
                ("off", item.offset),
            ):
                cols[key].append(np.array([value]))
            base += 1
        if not base:
            return np.empty(0, np.int64), np.empty(0, np.int64), 0
        c = {k: np.concatenate(v) for k, v in cols.items()}
        t = c["t"].astype(np.int64)
        lat, out, score = c["lat"], c["out"].astype(np.int64), c["score"]
        # Columns most chunks lack (values of classifiers, classes of regressors): filled
        # per chunk into arrays of the default, not concatenated from per-chunk fills.
        pv = np.full(base, np.nan)
        lv = np.full(base, np.nan)
        has_cls = np.zeros(base, dtype=bool)
        ts = np.empty(base, dtype=message_timestamps_ms.dtype)  # Kafka timestamp per row
        for b0, chunk in chunks:
            n = len(chunk)
            if not n:
                continue
            part = slice(b0, b0 + n)
            if chunk.pred_value.size:
                pv[part] = chunk.pred_value
            if chunk.label_value.size:
                lv[part] = chunk.label_value
            if chunk.pred_code.size:
                has_cls[part] = (chunk.pred_code >= 0) | (chunk.label_code >= 0)
            off = chunk.offset
            if off[0] == off[-1] and bool((off == off[0]).all()):
                # An envelope's rows share one message: one lookup, not one per row.
                ts[part] = message_timestamps_ms[np.searchsorted(message_offsets, off[0])]
            else:
                ts[part] = message_timestamps_ms[np.searchsorted(message_offsets, off)]
        has_val = ~np.isnan(pv) | ~np.isnan(lv)  # NaN for markers and heartbeats: False
        is_row = np.ones(base, dtype=bool)
        why_all = np.full(base, -1, dtype=np.int64)
        for at, why in named:
            why_all[at : at + why.size] = why
        for at, code, offset in own:
            is_row[at] = False
            why_all[at] = code
            ts[at] = message_timestamps_ms[np.searchsorted(message_offsets, offset)]

        reason = np.full(base, -1, dtype=np.int64)
        # Checks that need neither the catalog nor the watermark. Later assignments win,
        # so the list runs from least to most specific.
        reason[has_val & has_cls] = _R_KIND  # a value and a class in one row
        reason[(np.abs(pv) > MAX_ABS_VALUE) | (np.abs(lv) > MAX_ABS_VALUE)] = _R_VALUE
        reason[(score < 0) | (score > 1)] = _R_SCORE
        reason[out >= _VALID_OUTCOMES] = _R_OUTCOME
        reason[~((lat >= 0) & (lat <= MAX_ABS_VALUE))] = _R_LATENCY
        bad_name = why_all >= 0
        reason[bad_name] = why_all[bad_name]
        reason[~is_row] = why_all[~is_row]  # markers and heartbeats: their own checks only
        reason[(t < 0) | (t > ts + self.config.max_future_ms)] = _R_TIME
        valid = reason < 0
        cfg = self.config
        late_v, self.max_event_ms = late_mask(
            t[valid], self.max_event_ms, cfg.lateness_ms, cfg.pane_ms
        )
        late = np.zeros(base, dtype=bool)
        late[valid] = late_v
        reason[late & is_row] = _R_LATE
        cand = valid & ~late & is_row

        # Only now the catalog: model-versions, then the names of accepted rows.
        mv = np.full(base, -1, dtype=np.int64)
        pred = np.full(base, -1, dtype=np.int64)
        label = np.full(base, -1, dtype=np.int64)
        seg = np.full(base, -1, dtype=np.int64)
        feats: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for b0, chunk in chunks:
            n = len(chunk)
            part = slice(b0, b0 + n)
            gmv, mismatch = self._admit(chunk, cand[part], has_val[part], has_cls[part])
            reason[part][mismatch] = _R_KIND
            acc = cand[part] & ~mismatch
            mv[part] = gmv
            if not acc.any():
                continue
            with_cls = bool(chunk.pred_code.size) and bool(has_cls[part][acc].any())
            f_acc = acc[chunk.feat_row] if chunk.feat_row.size else None
            if len(chunk.mv_keys) == 1:  # an envelope: lookup tables, no sorting
                g = int(gmv[np.argmax(acc)])
                if with_cls:
                    pred[part], label[part] = self._lookup(
                        g, chunk.classes, (chunk.pred_code, chunk.label_code), acc, "classes"
                    )
                if chunk.segments:  # no names: every code is -1, as ``seg`` already is
                    (seg[part],) = self._lookup(
                        g, chunk.segments, (chunk.segment,), acc, "segments"
                    )
                if f_acc is not None:
                    (fid,) = self._lookup(
                        g, chunk.feature_names, (chunk.feat_code,), f_acc, "features"
                    )
                    feats.append((chunk.feat_row + b0, fid, chunk.feat_value))
                continue
            if with_cls:
                both = self._remap(
                    np.concatenate([chunk.pred_code, chunk.label_code]),
                    np.concatenate([gmv, gmv]),
                    chunk.classes,
                    np.concatenate([acc, acc]),
                    "classes",
                    halves=n,
                )
                pred[part], label[part] = both[:n], both[n:]
            seg[part] = self._remap(chunk.segment, gmv, chunk.segments, acc, "segments")
            if f_acc is not None:
                fid = self._remap(
                    chunk.feat_code, gmv[chunk.feat_row], chunk.feature_names, f_acc, "features"
                )
                feats.append((chunk.feat_row + b0, fid, chunk.feat_value))
        keep = cand & (reason < 0)
        self._bin(
            keep,
            mv,
            t,
            lat,
            out,
            score,
            {"pred": pred, "label": label, "pv": pv, "lv": lv, "seg": seg},
            feats,
        )
        self._close(closed_panes(self.max_event_ms, cfg.lateness_ms, cfg.pane_ms))
        for at, record in beats:
            if reason[at] < 0:
                self.resources[f"{record['service']}\x00{record['instance']}"] = record
        if self.resources:
            self._prune_resources()

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

    def _prune_resources(self) -> None:
        """Forget instances silent for RESOURCE_TTL_MS of event time; keep at most
        MAX_INSTANCES (the most recent), so pod churn cannot grow the series."""
        horizon = self.max_event_ms - RESOURCE_TTL_MS
        live = sorted(
            (
                (int(r["event_time_ms"]), k)
                for k, r in self.resources.items()
                if int(r["event_time_ms"]) >= horizon
            ),
            reverse=True,
        )[:MAX_INSTANCES]
        if len(live) != len(self.resources):
            keep = {k for _, k in live}
            self.resources = {k: r for k, r in self.resources.items() if k in keep}

    def count_rejected(self, reason: str, n: int = 1) -> None:
        """Count messages rejected before ingest (undecodable and the like)."""
        self.rejected[reason] = self.rejected.get(reason, 0) + n
        self.version += 1

    def _bin(
        self,
        keep: np.ndarray,
        mv_all: np.ndarray,
        t_all: np.ndarray,
        lat_all: np.ndarray,
        out_all: np.ndarray,
        score_all: np.ndarray,
        c: dict[str, np.ndarray],
        feats: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    ) -> None:
        if not keep.any():
            return
        cfg = self.config
        rows: np.ndarray | slice = slice(None) if keep.all() else np.flatnonzero(keep)
        pane = np.floor_divide(t_all[rows], cfg.pane_ms)
        panes, u = _dense(pane)
        m = self._capacity
        mv = mv_all[rows]
        um = u * m + mv  # (pane, model-version) cell of each row
        cells = len(panes) * m
        tmp: dict[str, np.ndarray] = {}

        def count(
            name: str,
            idx: np.ndarray,
            width: int,
            weights: np.ndarray | None = None,
            mask: np.ndarray | None = None,
        ) -> None:
            """Bin ``idx`` (``weights`` summed, else counted) into ``tmp[name]``.

            With ``mask``, ``idx`` spans all rows (in range everywhere) and only rows
            where it is set count: as a 0/1 weight, or ``weights`` already zero there.
            A boolean selection costs a branch miss per row when the mask is random
            (labels, scores); a weight of 0 adds exactly nothing, so the sums stay
            bit-identical. Arrays with no rows at all are left out of ``tmp``.
            """
            if not idx.size:
                return
            flat = np.bincount(
                idx, weights=mask if weights is None else weights, minlength=cells * width
            )
            if weights is None:
                flat = flat.astype(np.int64, copy=False)
            tmp[name] = flat.reshape((len(panes), m, *self._tails[name]))

        out = out_all[rows]
        count("outcome", um * N_OUTCOMES + out, N_OUTCOMES)
        lat = lat_all[rows]
        nl = len(cfg.latency_bounds) + 1
        count("lat", um * nl + self._lat_buckets(lat), nl)
        count("lat_sum", um, 1, lat)

        score = score_all[rows]
        has = ~np.isnan(score)
        # Valid scores are in [0, 1]: fmax turns only the missing ones (NaN) into 0.
        score0 = np.fmax(score, 0.0)
        ns = len(cfg.score_bounds) + 1
        count("score", um * ns + self._score_buckets(score), ns, mask=has)  # NaN: last bin
        count("score_sum", um, 1, score0)

        ok = out == OK
        pred, label = c["pred"][rows], c["label"][rows]
        pv, lv = c["pv"][rows], c["lv"][rows]
        labelled = ok & ((label >= 0) | ~np.isnan(lv))
        count("labelled", um, 1, mask=labelled)

        ncls = cfg.limits.max_classes
        both = ok & (label >= 0) & (pred >= 0)
        label0, pred0 = np.maximum(label, 0), np.maximum(pred, 0)  # in range where masked
        count("conf", (um * ncls + label0) * ncls + pred0, ncls * ncls, mask=both)
        has_pred = ok & (pred >= 0)
        count("pred_class", um[has_pred] * ncls + pred[has_pred], ncls)
        scored = has_pred & has
        count("est", um, 1, mask=scored)
        count("est_sum", um, 1, score0 * scored)
        cal = both & has
        correct = label == pred
        cal_bin = um * CALIBRATION_BINS + _CAL_BUCKETS(score)  # NaN: last bin
        count("cal", cal_bin * 2 + correct, CALIBRATION_BINS * 2, mask=cal)
        count("cal_score", cal_bin, CALIBRATION_BINS, score0 * cal)
        count("brier", um, 1, np.square(score0 - correct) * cal)

        reg = ok & ~np.isnan(pv) & ~np.isnan(lv)
        err = pv[reg] - lv[reg]
        ne = len(cfg.error_bounds) + 1
        count("err", um[reg] * ne + np.searchsorted(self._err_edges, err, "left"), ne)
        count("err_sum", um[reg], 1, err)
        count("abs_err", um[reg], 1, np.abs(err))
        count("sq_err", um[reg], 1, err * err)
        has_pv = ok & ~np.isnan(pv)
        count("pred_hist", um[has_pv] * DRIFT_BINS + _drift_bin(pv[has_pv]), DRIFT_BINS)

        nseg = cfg.limits.max_segments
        seg = c["seg"][rows]
        has_seg = seg >= 0
        if has_seg.any():  # else the per-segment arrays get nothing: skip their passes
            count("seg", um[has_seg] * nseg + seg[has_seg], nseg)
            # Per segment (rows with a segment only, as "seg"): one bincount per array.
            us = um * nseg + seg  # (pane, model-version, segment) cell; valid where has_seg
            sb = both & has_seg
            roles = len(SEGMENT_ROLES)
            hit = sb & correct
            cell = us * roles
            count(
                "seg_cls",
                np.concatenate(
                    [
                        (cell[sb] + 0) * ncls + label[sb],
                        (cell[sb] + 1) * ncls + pred[sb],
                        (cell[hit] + 2) * ncls + label[hit],
                    ]
                ),
                nseg * roles * ncls,
            )
            sr = reg & has_seg
            seg_err = pv[sr] - lv[sr]
            count("seg_lab", np.concatenate([us[sb], us[sr]]), nseg)
            count("seg_abs", us[sr], nseg, np.abs(seg_err))
            count("seg_sq", us[sr], nseg, seg_err * seg_err)

        # Features are in long form: (row in batch, feature id, value).
        nf = cfg.limits.max_features
        if feats:
            f_row = np.concatenate([f[0] for f in feats])
            f_id = np.concatenate([f[1] for f in feats])
            f_val = np.concatenate([f[2] for f in feats])
            if isinstance(rows, slice):  # every row kept: batch rows are binned rows
                r = f_row
                sel = (f_id >= 0) & np.isfinite(f_val)
            else:
                row_of = np.full(keep.shape[0], -1, dtype=np.int64)
                row_of[rows] = np.arange(mv.size)
                r = row_of[f_row] if f_row.size else f_row
                sel = (r >= 0) & (f_id >= 0) & np.isfinite(f_val)
            if not sel.all():
                r, f_id, f_val = r[sel], f_id[sel], f_val[sel]
            count("feat", (um[r] * nf + f_id) * DRIFT_BINS + _drift_bin(f_val), nf * DRIFT_BINS)

        ring_size = cfg.ring
        for i, k in enumerate(panes.tolist()):
            slot = k % ring_size
            if self.pane_of_slot[slot] != k:
                # The older pane in this slot is closed by this very batch anyway (the
                # ring spans more than the lateness): close up to where pane k's row
                # puts the watermark now, so the drift references that end there are
                # taken before their panes are overwritten, whatever the batch size.
                self._close(closed_panes(k * cfg.pane_ms, cfg.lateness_ms, cfg.pane_ms))
                for name in self._PANE_ARRAYS:
                    self.ring[name][slot] = 0
                self.pane_of_slot[slot] = k
                self.slot_closed[slot] = False
            for name in self._PANE_ARRAYS:
                if name in tmp:
                    self.ring[name][slot] += tmp[name][i]
            slot = k % self.open_slots
            if self.pane_of_open[slot] != k:
                self._close(closed_panes(k * cfg.pane_ms, cfg.lateness_ms, cfg.pane_ms))
                if not self.open_closed[slot]:  # cannot happen: see open_slots
                    raise AssertionError(f"open pane {self.pane_of_open[slot]} evicted by {k}")
                for name in self._OPEN_ARRAYS:
                    self.open[name][slot] = 0
                self.pane_of_open[slot] = k
                self.open_closed[slot] = False
            for name in self._OPEN_ARRAYS:
                if name in tmp:
                    self.open[name][slot] += tmp[name][i]

    def _close_slots(self, slots: np.ndarray) -> None:
        for name in self._PANE_ARRAYS:
            self.cum[name] += self.ring[name][slots].sum(axis=0)
        self.slot_closed[slots] = True

    def _close(self, new_closed: int) -> None:
        if new_closed <= self.closed:
            return
        pending = np.flatnonzero(~self.slot_closed & (self.pane_of_slot < new_closed))
        if pending.size:
            self._close_slots(pending)
        done = np.flatnonzero(~self.open_closed & (self.pane_of_open < new_closed))
        if done.size:
            for name in self._OPEN_ARRAYS:
                self.cum[name] += self.open[name][done].sum(axis=0)
            self.open_closed[done] = True
        self.closed = new_closed
        self._take_references()

    def _reference_from_samples(self, mv: int) -> bool:
        """Set the reference of ``mv`` from the configured sample file, if it has one."""
        entry = self.catalog.entries[mv]
        spec = None
        for model, version, text in self.config.reference_samples:
            if model == entry.model and version in ("*", entry.version):
                spec = json.loads(text)
                if version != "*":
                    break
        if spec is None:
            return False
        score = np.asarray(spec.get("score", []), dtype=np.float64)
        score = score[(score >= 0) & (score <= 1)]
        ns = len(self.config.score_bounds) + 1
        self.reference["score"][mv] = np.bincount(
            np.searchsorted(self._score_edges, score, "left"), minlength=ns
        )
        preds = spec.get("prediction", [])
        if preds and all(isinstance(p, str) for p in preds):
            ids = [self.catalog.class_id(mv, p) for p in preds]
            self.reference["pred_class"][mv] = np.bincount(
                ids, minlength=self.config.limits.max_classes
            )
        elif preds:
            values = np.asarray(preds, dtype=np.float64)
            self.reference["pred_hist"][mv] = np.bincount(_drift_bin(values), minlength=DRIFT_BINS)
        for name, values in spec.get("features", {}).items():
            f = self.catalog.feature_id(mv, name)
            arr = np.asarray(values, dtype=np.float64)
            self.reference["feat"][mv, f] += np.bincount(
                _drift_bin(arr[np.isfinite(arr)]), minlength=DRIFT_BINS
            )
        self.has_reference[mv] = True
        return True

    def _take_references(self) -> None:
        """Reference distributions: from the sample file, else the first full window."""
        cfg = self.config
        n_ref = cfg.drift_reference_ms // cfg.pane_ms
        for mv, entry in enumerate(self.catalog.entries):
            if self.has_reference[mv]:
                continue
            if cfg.reference_samples and self._reference_from_samples(mv):
                continue
            start = entry.first_seen_ms // cfg.pane_ms + 1
            if self.closed < start + n_ref:
                continue
            sel = (self.pane_of_slot >= start) & (self.pane_of_slot < start + n_ref)
            sel &= self.slot_closed
            for name in self.reference:
                self.reference[name][mv] = self.ring[name][sel, mv].sum(axis=0)
            self.has_reference[mv] = True

    # -- reading -----------------------------------------------------------------------

    def window(self, window_ms: int) -> WindowAggregate:
        """Sums over the panes of [E - window, E) where E is the last closed boundary."""
        n = window_ms // self.config.pane_ms
        sel = self.slot_closed & (self.pane_of_slot >= self.closed - n)
        sel &= self.pane_of_slot < self.closed
        m = len(self.catalog)

        def total(name: str) -> np.ndarray:
            summed: np.ndarray = self.ring[name][sel, :m].sum(axis=0)
            return summed

        return WindowAggregate(
            window_ms=window_ms,
            end_ms=self.window_end_ms,
            outcome=total("outcome"),
            lat=total("lat"),
            score=total("score"),
            err=total("err"),
            abs_err=total("abs_err"),
            sq_err=total("sq_err"),
            labelled=total("labelled"),
            conf=total("conf"),
            pred_class=total("pred_class"),
            pred_hist=total("pred_hist"),
            feat=total("feat"),
            cal=total("cal"),
            cal_score=total("cal_score"),
            brier=total("brier"),
            est=total("est"),
            est_sum=total("est_sum"),
        )

    def view(self) -> StateView:
        """Copies for the exporter; window sums are recomputed only when panes closed."""
        m = len(self.catalog)
        key = (self.closed, m, self.version if self._window_key is None else self._window_key[2])
        if self._window_key is None or self._window_key[:2] != key[:2]:
            self._windows = tuple(self.window(w) for w in self.config.windows_ms)
            self._window_key = key
        lim = self.config.limits
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
        )

    # -- snapshots ---------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The whole state as one compressed record (for the compacted state topic)."""
        m = len(self.catalog)
        meta = {
            "config": self.config.digest(),
            "partition": self.partition,
            "next_offset": self.next_offset,
            "max_event_ms": self.max_event_ms,
            "closed": self.closed,
            "rejected": self.rejected,
            "resources": self.resources,
            "events_accepted": self.events_accepted,
            "catalog": self.catalog.to_json(),
        }
        arrays: dict[str, np.ndarray] = {
            "pane_of_slot": self.pane_of_slot,
            "slot_closed": self.slot_closed,
            "has_reference": self.has_reference[:m],
            "pane_of_open": self.pane_of_open,
            "open_closed": self.open_closed,
        }
        for name in self._PANE_ARRAYS:
            arrays["ring." + name] = self.ring[name][:, :m]
            arrays["cum." + name] = self.cum[name][:m]
        for name in self._OPEN_ARRAYS:
            arrays["open." + name] = self.open[name][:, :m]
            arrays["cum." + name] = self.cum[name][:m]
        for name, arr in self.reference.items():
            arrays["ref." + name] = arr[:m]
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        head = json.dumps(meta).encode()
        return len(head).to_bytes(4, "big") + head + zlib.compress(buf.getvalue(), 1)

    @classmethod
    def from_bytes(
        cls, data: bytes, config: StateConfig, *, rebuild: bool = False
    ) -> PartitionState:
        """Restore a snapshot; a different config raises ``ConfigMismatch``."""
        size = int.from_bytes(data[:4], "big")
        meta = json.loads(data[4 : 4 + size])
        if meta["config"] != config.digest():
            raise ConfigMismatch(
                f"partition {meta['partition']}: snapshot made with config {meta['config']}, "
                f"running {config.digest()}; restart with --rebuild-state to rebuild it from the "
                "start of the log (what retention has deleted is lost)"
            )
        state = cls(config, int(meta["partition"]))
        state.catalog = Catalog.from_json(config.limits, meta["catalog"])
        state.next_offset = int(meta["next_offset"])
        state.max_event_ms = int(meta["max_event_ms"])
        state.closed = int(meta["closed"])
        state.rejected = dict(meta["rejected"])
        state.resources = dict(meta["resources"])
        state.events_accepted = int(meta["events_accepted"])
        m = len(state.catalog)
        state._grow(max(m, 4))
        with np.load(io.BytesIO(zlib.decompress(data[4 + size :]))) as z:
            missing = sorted(
                {
                    "pane_of_slot",
                    "slot_closed",
                    "has_reference",
                    "pane_of_open",
                    "open_closed",
                }.union(f"{k}.{n}" for n in cls._PANE_ARRAYS for k in ("ring", "cum"))
                .union(f"{k}.{n}" for n in cls._OPEN_ARRAYS for k in ("open", "cum"))
                .union(f"ref.{n}" for n in state.reference)
                .difference(z.files)
            )
            if missing:  # a format change that forgot to bump STATE_FORMAT: still refused
                raise ConfigMismatch(
                    f"partition {meta['partition']}: snapshot lacks {', '.join(missing[:3])}; "
                    "restart with --rebuild-state to rebuild it from the start of the log"
                )
            state.pane_of_slot = z["pane_of_slot"].copy()
            state.slot_closed = z["slot_closed"].copy()
            state.has_reference[:m] = z["has_reference"]
            for name in cls._PANE_ARRAYS:
                state.ring[name][:, :m] = z["ring." + name]
                state.cum[name][:m] = z["cum." + name]
            state.pane_of_open = z["pane_of_open"].copy()
            state.open_closed = z["open_closed"].copy()
            for name in cls._OPEN_ARRAYS:
                state.open[name][:, :m] = z["open." + name]
                state.cum[name][:m] = z["cum." + name]
            for name in state.reference:
                state.reference[name][:m] = z["ref." + name]
        return state
