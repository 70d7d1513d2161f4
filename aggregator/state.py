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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import numpy as np

from aggregator.catalog import Catalog, Limits
from aggregator.decode import Heartbeat, Marker, RowChunk
from aggregator.errors import ConfigMismatch
from aggregator.window import NO_TIME, closed_panes, late_mask

__all__ = [
    "REJECT_REASONS",
    "IngestResult",
    "PartitionState",
    "StateConfig",
    "StateView",
    "WindowAggregate",
    "load_reference_file",
]

N_OUTCOMES: Final = 5  # ok, error, timeout, rejected, unknown (schemas.wire.OUTCOMES)
OK: Final = 0
_VALID_OUTCOMES: Final = 4  # codes >= 4 ("unknown" or newer) are rejected
DRIFT_BINS: Final = 64
RESOURCE_TTL_MS: Final = 600_000  # an instance silent this long (event time) is dropped
MAX_INSTANCES: Final = 256  # resource series per partition
_DRIFT_RANGE: Final = 8.0  # asinh space: |x| up to ~1490 gets its own bins

# Row-level reasons a prediction is rejected (dead-lettered); order is the code.
REJECT_REASONS: Final = (
    "invalid_latency",
    "unknown_outcome",
    "invalid_score",
    "invalid_event_time",
    "kind_mismatch",
    "late",
)
_R_LATENCY, _R_OUTCOME, _R_SCORE, _R_TIME, _R_KIND, _R_LATE = range(len(REJECT_REASONS))


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
        for name in ("latency_bounds", "score_bounds", "error_bounds"):
            b = getattr(self, name)
            if not b or any(not math.isfinite(x) for x in b) or list(b) != sorted(set(b)):
                raise ValueError(f"{name}: must be finite and strictly increasing")

    @property
    def ring(self) -> int:
        return max(self.windows_ms) // self.pane_ms + -(-self.lateness_ms // self.pane_ms) + 2

    def digest(self) -> str:
        fields = asdict(self)
        fields.pop("reference_samples")
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
    present = np.bincount(offset, minlength=hi - lo + 1) > 0
    position = np.cumsum(present) - 1
    return np.flatnonzero(present) + lo, position[offset]


def _drift_bin(values: np.ndarray) -> np.ndarray:
    x = (np.arcsinh(values) + _DRIFT_RANGE) * (DRIFT_BINS / (2 * _DRIFT_RANGE))
    bins: np.ndarray = np.clip(x, 0, DRIFT_BINS - 1).astype(np.int64)
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
    )
    _FLOAT_ARRAYS: Final = frozenset({"lat_sum", "score_sum", "err_sum", "abs_err", "sq_err"})

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
        }
        self._capacity = 0
        self.pane_of_slot = np.full(c.ring, NO_TIME, dtype=np.int64)
        self.slot_closed = np.ones(c.ring, dtype=bool)
        self.ring: dict[str, np.ndarray] = {}
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

    def _intern(self, chunk: RowChunk) -> tuple[np.ndarray, ...]:
        """Global ids for a chunk's model-versions, classes, segments and features."""
        cat = self.catalog
        n_keys = len(chunk.mv_keys)
        if n_keys == 1:
            first = np.array([chunk.event_time_ms.min() if len(chunk) else 0], dtype=np.int64)
        else:
            first = np.full(n_keys, np.iinfo(np.int64).max, dtype=np.int64)
            np.minimum.at(first, chunk.mv, chunk.event_time_ms)
        gid = np.empty(n_keys, dtype=np.int64)
        is_reg = np.zeros(n_keys, dtype=bool)
        for k, ((model, version), regression) in enumerate(
            zip(chunk.mv_keys, chunk.regression, strict=True)
        ):
            g = cat.model_version(model, version, regression, int(first[k]))
            gid[k] = g
            is_reg[k] = cat.entries[g].regression is True
        self._grow(len(cat))
        mv = gid[chunk.mv]
        n = len(chunk)

        def remap(codes: np.ndarray, names: list[str], keys: np.ndarray, intern: Any) -> np.ndarray:
            """Chunk-local codes -> per-model-version ids, one intern call per distinct pair."""
            if n_keys == 1:
                # One model-version (an envelope): a lookup table, -1 maps to its last slot.
                if not names:
                    return np.full(codes.shape[0], -1, dtype=np.int64)
                table = np.array([intern(int(gid[0]), name) for name in names] + [-1])
                return np.asarray(table[codes])
            out = np.full(codes.shape[0], -1, dtype=np.int64)
            ok = codes >= 0
            if not ok.any():
                return out
            width = len(names)
            pairs = keys[ok].astype(np.int64) * width + codes[ok]
            uniq, inverse = np.unique(pairs, return_inverse=True)
            ids = np.array([intern(int(gid[p // width]), names[p % width]) for p in uniq.tolist()])
            out[ok] = ids[inverse]
            return out

        if chunk.pred_code.size:
            pred = remap(chunk.pred_code, chunk.classes, chunk.mv, cat.class_id)
            label = remap(chunk.label_code, chunk.classes, chunk.mv, cat.class_id)
        else:
            pred = label = np.full(n, -1, dtype=np.int64)
        seg = remap(chunk.segment, chunk.segments, chunk.mv, cat.segment_id)
        feat_keys = chunk.mv[chunk.feat_row] if chunk.feat_row.size else chunk.feat_code
        feat = remap(chunk.feat_code, chunk.feature_names, feat_keys, cat.feature_id)
        pred_value = chunk.pred_value if chunk.pred_value.size else np.full(n, np.nan)
        label_value = chunk.label_value if chunk.label_value.size else np.full(n, np.nan)
        # A row whose prediction or label has the other kind than its model is rejected;
        # the other kind's columns are blanked so nothing of it is binned.
        row_reg = is_reg[chunk.mv]
        has_value = ~np.isnan(pred_value) | ~np.isnan(label_value)
        has_class = (pred >= 0) | (label >= 0)
        bad = np.where(row_reg, has_class, has_value)
        pred_value = np.where(row_reg, pred_value, np.nan)
        label_value = np.where(row_reg, label_value, np.nan)
        pred = np.where(row_reg, -1, pred)
        label = np.where(row_reg, -1, label)
        return mv, bad, pred, label, pred_value, label_value, seg, feat

    def ingest(
        self,
        items: Sequence[RowChunk | Marker | Heartbeat],
        message_offsets: np.ndarray,
        message_timestamps_ms: np.ndarray,
        next_offset: int,
    ) -> IngestResult:
        """Add a batch of decoded messages (in log order); returns the rejected rows.

        ``message_offsets``/``message_timestamps_ms`` list every message of the batch
        (sorted), for the future-event check against the log's own timestamp.
        """
        cols: dict[str, list[np.ndarray]] = {
            k: []
            for k in (
                "mv",
                "bad",
                "pred",
                "label",
                "pv",
                "lv",
                "seg",
                "t",
                "lat",
                "out",
                "score",
                "off",
            )
        }
        feats: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        base = 0
        for item in items:
            if isinstance(item, RowChunk):
                mv, bad, pred, label, pv, lv, seg, feat = self._intern(item)
                for key, arr in (
                    ("mv", mv),
                    ("bad", bad),
                    ("pred", pred),
                    ("label", label),
                    ("pv", pv),
                    ("lv", lv),
                    ("seg", seg),
                    ("t", item.event_time_ms),
                    ("lat", item.latency_seconds),
                    ("out", item.outcome),
                    ("score", item.score),
                    ("off", item.offset),
                ):
                    cols[key].append(arr)
                feats.append((item.feat_row + base, feat, item.feat_value))
                base += len(item)
            else:
                if isinstance(item, Heartbeat):
                    r = item.record
                    self.resources[f"{r['service']}\x00{r['instance']}"] = r
                    t_ms = int(r["event_time_ms"])
                else:
                    t_ms = item.event_time_ms
                # A row that only moves the watermark.
                for key, value in (
                    ("mv", -1),
                    ("bad", False),
                    ("pred", -1),
                    ("label", -1),
                    ("pv", np.nan),
                    ("lv", np.nan),
                    ("seg", -1),
                    ("t", t_ms),
                    ("lat", 0.0),
                    ("out", 0),
                    ("score", np.nan),
                    ("off", item.offset),
                ):
                    cols[key].append(np.array([value]))
                base += 1
        self.next_offset = next_offset
        if not base:
            return IngestResult(np.empty(0, np.int64), np.empty(0, np.int64), 0)
        c = {k: np.concatenate(v) for k, v in cols.items()}
        mv = c["mv"].astype(np.int64)
        t = c["t"].astype(np.int64)
        lat, out, score = c["lat"], c["out"].astype(np.int64), c["score"]
        is_row = mv >= 0

        reason = np.full(base, -1, dtype=np.int64)
        # Later assignments win, so the list runs from least to most specific.
        ts = message_timestamps_ms[np.searchsorted(message_offsets, c["off"])]
        reason[c["bad"]] = _R_KIND
        reason[(score < 0) | (score > 1)] = _R_SCORE
        reason[out >= _VALID_OUTCOMES] = _R_OUTCOME
        reason[~(lat >= 0) | ~np.isfinite(lat)] = _R_LATENCY
        reason[(t < 0) | (t > ts + self.config.max_future_ms)] = _R_TIME
        reason[~is_row & (reason != _R_TIME)] = -1  # markers only need a sane time
        valid = reason < 0
        cfg = self.config
        late_v, self.max_event_ms = late_mask(
            t[valid], self.max_event_ms, cfg.lateness_ms, cfg.pane_ms
        )
        late = np.zeros(base, dtype=bool)
        late[valid] = late_v
        reason[late & is_row] = _R_LATE
        keep = valid & ~late & is_row
        self._bin(keep, mv, t, lat, out, score, c, feats)
        self._close(closed_panes(self.max_event_ms, cfg.lateness_ms, cfg.pane_ms))
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
        return IngestResult(c["off"][bad], reason[bad], accepted)

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
            name: str, idx: np.ndarray, width: int, weights: np.ndarray | None = None
        ) -> None:
            shape = (len(panes), m, *self._tails[name])
            flat = np.bincount(idx, weights=weights, minlength=cells * width)
            tmp[name] = (
                flat.reshape(shape) if weights is not None else flat.astype(np.int64).reshape(shape)
            )

        out = out_all[rows]
        count("outcome", um * N_OUTCOMES + out, N_OUTCOMES)
        lat = lat_all[rows]
        nl = len(cfg.latency_bounds) + 1
        count("lat", um * nl + np.searchsorted(self._lat_edges, lat, side="left"), nl)
        count("lat_sum", um, 1, lat)

        score = score_all[rows]
        has = ~np.isnan(score)
        ns = len(cfg.score_bounds) + 1
        count("score", um[has] * ns + np.searchsorted(self._score_edges, score[has], "left"), ns)
        count("score_sum", um[has], 1, score[has])

        ok = out == OK
        pred, label = c["pred"][rows], c["label"][rows]
        pv, lv = c["pv"][rows], c["lv"][rows]
        labelled = ok & ((label >= 0) | ~np.isnan(lv))
        count("labelled", um[labelled], 1)

        ncls = cfg.limits.max_classes
        both = ok & (label >= 0) & (pred >= 0)
        count("conf", (um[both] * ncls + label[both]) * ncls + pred[both], ncls * ncls)
        has_pred = ok & (pred >= 0)
        count("pred_class", um[has_pred] * ncls + pred[has_pred], ncls)

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
        count("seg", um[has_seg] * nseg + seg[has_seg], nseg)

        # Features are in long form: (row in batch, feature id, value).
        nf = cfg.limits.max_features
        row_of = np.full(keep.shape[0], -1, dtype=np.int64)
        row_of[rows] = np.arange(mv.size)
        if feats:
            f_row = np.concatenate([f[0] for f in feats])
            f_id = np.concatenate([f[1] for f in feats])
            f_val = np.concatenate([f[2] for f in feats])
            r = row_of[f_row] if f_row.size else f_row
            sel = (r >= 0) & (f_id >= 0) & np.isfinite(f_val)
            r, f_id, f_val = r[sel], f_id[sel], f_val[sel]
            idx = (um[r] * nf + f_id) * DRIFT_BINS + _drift_bin(f_val)
        else:
            idx = np.empty(0, dtype=np.int64)
        count("feat", idx, nf * DRIFT_BINS)

        ring_size = cfg.ring
        for i, k in enumerate(panes.tolist()):
            slot = k % ring_size
            if self.pane_of_slot[slot] != k:
                if not self.slot_closed[slot]:
                    # An older pane still open in this slot: it is closed by this very
                    # batch anyway (the ring spans more than the lateness), so close now.
                    self._close_slots(np.array([slot]))
                for name in self._PANE_ARRAYS:
                    self.ring[name][slot] = 0
                self.pane_of_slot[slot] = k
                self.slot_closed[slot] = False
            for name in self._PANE_ARRAYS:
                self.ring[name][slot] += tmp[name][i]

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
        }
        for name in self._PANE_ARRAYS:
            arrays["ring." + name] = self.ring[name][:, :m]
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
            state.pane_of_slot = z["pane_of_slot"].copy()
            state.slot_closed = z["slot_closed"].copy()
            state.has_reference[:m] = z["has_reference"]
            for name in cls._PANE_ARRAYS:
                state.ring[name][:, :m] = z["ring." + name]
                state.cum[name][:m] = z["cum." + name]
            for name in state.reference:
                state.reference[name][:m] = z["ref." + name]
        return state
