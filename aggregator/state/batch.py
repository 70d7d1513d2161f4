"""One group of decoded items as flat columns, and how a batch is cut into groups."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from aggregator.state.checks import heartbeat_reason, name_reasons
from aggregator.state.columns import Heartbeat, Marker, RowChunk

__all__ = ["Batch", "Item", "groups", "kept_features"]

Item = RowChunk | Marker | Heartbeat
_NOT_A_ROW: Final = (("lat", 0.0), ("out", 0), ("score", np.nan))


@dataclass(slots=True)
class Batch:
    """One group of items as flat columns: rows, and one pseudo-row per marker or
    heartbeat (it moves the watermark only). ``why``: name or heartbeat reason."""

    n: int
    cols: dict[str, np.ndarray]
    ts: np.ndarray  # Kafka timestamp per row
    has_val: np.ndarray
    has_cls: np.ndarray
    is_row: np.ndarray
    why: np.ndarray
    chunks: list[tuple[int, RowChunk]]
    beats: list[tuple[int, dict[str, Any]]]

    @classmethod
    def gather(
        cls,
        items: list[Item],
        name_limit: int,
        message_offsets: np.ndarray,
        message_timestamps_ms: np.ndarray,
        keep_ids: bool = True,
    ) -> Batch | None:
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("t", "lat", "out", "score", "off")}
        chunks: list[tuple[int, RowChunk]] = []
        beats: list[tuple[int, dict[str, Any]]] = []
        named: list[tuple[int, np.ndarray]] = []  # (first row, name reasons) of chunks
        own: list[tuple[int, int, int]] = []  # (row, reason or -1, offset): not rows
        base = 0
        for item in items:
            if isinstance(item, RowChunk):
                why = name_reasons(item, name_limit)
                if why is not None:
                    named.append((base, why))
                parts["t"].append(item.event_time_ms)
                parts["lat"].append(item.latency_seconds)
                parts["out"].append(item.outcome)
                parts["score"].append(item.score)
                parts["off"].append(item.offset)
                chunks.append((base, item))
                base += len(item)
                continue
            reason_own = -1
            if isinstance(item, Heartbeat):
                reason_own, record = heartbeat_reason(item.record, name_limit)
                beats.append((base, record))
                t_ms = int(record["event_time_ms"])
            else:
                t_ms = item.event_time_ms
            own.append((base, reason_own, item.offset))
            parts["t"].append(np.array([t_ms]))
            for key, value in _NOT_A_ROW:
                parts[key].append(np.array([value]))
            parts["off"].append(np.array([item.offset]))
            base += 1
        if not base:
            return None
        cols = {k: np.concatenate(v) for k, v in parts.items()}
        cols["out"] = cols["out"].astype(np.int64)
        # Columns most chunks lack (values of classifiers, classes of regressors): filled
        # per chunk into arrays of the default, not concatenated from per-chunk fills.
        pv = np.full(base, np.nan)
        lv = np.full(base, np.nan)
        has_cls = np.zeros(base, dtype=bool)
        # Event id hashes, 0 = none; only a state that joins late labels reads them.
        id_hash = np.zeros(base if keep_ids else 0, dtype=np.uint64)
        ts = np.empty(base, dtype=message_timestamps_ms.dtype)
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
            if keep_ids and chunk.event_hash.size:
                id_hash[part] = chunk.event_hash
            off = chunk.offset
            if off[0] == off[-1] and bool((off == off[0]).all()):
                # An envelope's rows share one message: one lookup, not one per row.
                ts[part] = message_timestamps_ms[np.searchsorted(message_offsets, off[0])]
            else:
                ts[part] = message_timestamps_ms[np.searchsorted(message_offsets, off)]
        cols["pv"], cols["lv"], cols["key"] = pv, lv, id_hash
        has_val = ~np.isnan(pv) | ~np.isnan(lv)  # NaN for markers and heartbeats: False
        is_row = np.ones(base, dtype=bool)
        why_all = np.full(base, -1, dtype=np.int64)
        for at, why in named:
            why_all[at : at + why.size] = why
        for at, code, offset in own:
            is_row[at] = False
            why_all[at] = code
            ts[at] = message_timestamps_ms[np.searchsorted(message_offsets, offset)]
        return cls(base, cols, ts, has_val, has_cls, is_row, why_all, chunks, beats)


def kept_features(
    feats: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    keep: np.ndarray,
    rows: np.ndarray | slice,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Features (binned-row index, feature id, value) of the kept rows, finite values."""
    if not feats:
        return None
    f_row = np.concatenate([f[0] for f in feats])
    f_id = np.concatenate([f[1] for f in feats])
    f_val = np.concatenate([f[2] for f in feats])
    if isinstance(rows, slice):  # every row kept: batch rows are binned rows
        r = f_row
        sel = (f_id >= 0) & np.isfinite(f_val)
    else:
        row_of = np.full(keep.shape[0], -1, dtype=np.int64)
        row_of[rows] = np.arange(rows.size)
        r = row_of[f_row] if f_row.size else f_row
        sel = (r >= 0) & (f_id >= 0) & np.isfinite(f_val)
    if not sel.all():
        r, f_id, f_val = r[sel], f_id[sel], f_val[sel]
    return r, f_id, f_val


def groups(items: Sequence[Item], limit: int) -> Iterator[list[Item]]:
    """Consecutive items in groups of at most ``limit`` rows, cutting large chunks."""
    group: list[Item] = []
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
