"""From bulk passes to one ``RowChunk``, numbered as ``EventChunkBuilder`` numbers it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.bulk.program import DBL, NULL, STR, Program
from aggregator.bulk.reader import Run
from aggregator.bulk.strings import BIG, Strings, first_seen, non_ascii
from aggregator.state.columns import RowChunk
from schemas.event_id import event_hashes, hash_event_id
from schemas.wire import (
    CLASS_DTYPE,
    EVENT_TIME_DTYPE,
    FLOAT_DTYPE,
    NO_CLASS,
    OUTCOME_CODES,
    OUTCOME_DTYPE,
)

__all__ = ["Group", "assemble", "collect"]


@dataclass(slots=True)
class Group:
    """Accepted records of one writer schema; strings as ids into the call's ``Strings``."""

    msgs: np.ndarray  # message index of each accepted record, increasing
    event_time_ms: np.ndarray
    latency_seconds: np.ndarray
    outcome: np.ndarray
    score: np.ndarray
    model: np.ndarray
    version: np.ndarray
    pred_kind: np.ndarray
    pred_value: np.ndarray
    pred_id: np.ndarray  # per row whose prediction is a string, in row order
    label_kind: np.ndarray
    label_value: np.ndarray
    label_id: np.ndarray
    segment: np.ndarray  # -1 = none
    feat_row: np.ndarray  # into this group's accepted records
    feat_t: np.ndarray  # item index within its record's map
    feat_id: np.ndarray
    feat_value: np.ndarray
    event_hash: np.ndarray  # uint64, 0 = no id


def _check_utf8(run: Run) -> None:
    """Flag records with invalid UTF-8 in strings fastavro decodes but no column keeps."""
    data = run.buf.data
    for rows, start, n in run.checked:
        live = np.flatnonzero(~run.bad[rows])
        suspects = live[non_ascii(run.buf, start[live], n[live])]
        spans = zip(suspects.tolist(), start[suspects].tolist(), n[suspects].tolist(), strict=True)
        for i, s, ln in spans:
            try:
                data[s : s + ln].decode()
            except UnicodeDecodeError:
                run.bad[rows[i]] = True


def _string_ids(
    run: Run,
    program: Program,
    strings: Strings,
    name: str,
    ok: np.ndarray,
    flagged: list[np.ndarray],
) -> np.ndarray:
    """Ids of a string field of the records ``ok`` (its reader default when absent)."""
    if name in run.cols:
        start, n = run.cols[name]
        got = strings.intern(run.buf, start[ok], n[ok])
        flagged.append(ok[got < 0])
        return got
    default = strings.add(str(program.defaults[name]).encode())
    return np.full(ok.shape[0], default, dtype=np.int64)


def collect(run: Run, program: Program, strings: Strings, msgs: np.ndarray) -> Group:
    """Intern the strings of the records the pass accepted; flag more records if need be."""
    buf, cols, defaults = run.buf, run.cols, program.defaults
    _check_utf8(run)
    if run.feat:
        fr = np.concatenate([f[0] for f in run.feat])
        ft = np.concatenate([np.full(f[0].shape[0], f[1], dtype=np.int64) for f in run.feat])
        fs = np.concatenate([f[2] for f in run.feat])
        fn = np.concatenate([f[3] for f in run.feat])
        fv = np.concatenate([f[4] for f in run.feat])
    else:
        fr = ft = fs = fn = np.empty(0, dtype=np.int64)
        fv = np.empty(0, dtype=FLOAT_DTYPE)
    none = np.empty(0, dtype=np.int64)
    while True:
        ok = np.flatnonzero(~run.bad)
        m = ok.shape[0]
        flagged: list[np.ndarray] = []
        model = _string_ids(run, program, strings, "model", ok, flagged)
        version = _string_ids(run, program, strings, "model_version", ok, flagged)
        opts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for name in ("prediction", "label", "segment", "score"):
            if name not in cols:
                opts[name] = (np.zeros(m, np.int8), np.full(m, np.nan, FLOAT_DTYPE), none)
                continue
            kinds, value, start, n = cols[name]
            kinds, value = kinds[ok], value[ok]
            sel = np.flatnonzero(kinds == STR)
            got = strings.intern(buf, start[ok[sel]], n[ok[sel]]) if sel.size else none
            flagged.append(ok[sel[got < 0]])
            opts[name] = (kinds, value, got)
        live = np.flatnonzero(~run.bad[fr])
        feat_id = strings.intern(buf, fs[live], fn[live])
        flagged.append(fr[live[feat_id < 0]])
        if live.size > 1:
            # fastavro keeps the last value of a repeated key at the first key's place:
            # rare enough to leave such records (and then the batch) to it.
            key = fr[live] * (len(strings.names) + 1) + feat_id
            order = np.sort(key)
            dup = order[1:][order[1:] == order[:-1]]
            flagged.append(dup // (len(strings.names) + 1))
        new = np.concatenate(flagged) if flagged else none
        if not new.size:
            break
        run.bad[new] = True
    seg_kind, _seg_value, seg_got = opts["segment"]
    segment = np.full(m, -1, dtype=np.int64)
    segment[seg_kind == STR] = seg_got
    where = np.full(run.bad.shape[0], -1, dtype=np.int64)
    where[ok] = np.arange(m)
    outcome = (
        cols["outcome"][ok]
        if "outcome" in cols
        else np.full(m, OUTCOME_CODES[defaults["outcome"]], dtype=np.int64)
    )

    def number(name: str, dtype: np.dtype[Any]) -> np.ndarray:
        if name in cols:
            return np.asarray(cols[name][ok], dtype=dtype)
        return np.full(m, defaults[name], dtype=dtype)

    if "event_id" in cols:
        start, n = cols["event_id"]
        event_hash = event_hashes(buf.data, start[ok], n[ok])
    else:
        event_hash = np.full(m, hash_event_id(str(defaults["event_id"])), dtype=np.uint64)
    return Group(
        msgs=msgs[ok],
        event_time_ms=number("event_time_ms", EVENT_TIME_DTYPE),
        latency_seconds=number("latency_seconds", FLOAT_DTYPE),
        outcome=outcome,
        score=opts["score"][1],
        model=model,
        version=version,
        pred_kind=opts["prediction"][0],
        pred_value=opts["prediction"][1],
        pred_id=opts["prediction"][2],
        label_kind=opts["label"][0],
        label_value=opts["label"][1],
        label_id=opts["label"][2],
        segment=segment,
        feat_row=where[fr[live]],
        feat_t=ft[live],
        feat_id=feat_id,
        feat_value=fv[live],
        event_hash=event_hash,
    )


def assemble(groups: list[Group], offsets: np.ndarray, strings: Strings) -> RowChunk:
    """One chunk in message order, codes numbered as ``EventChunkBuilder`` numbers them."""
    if len(groups) == 1:
        accepted = groups[0].msgs
        rows_of = [np.arange(accepted.shape[0])]
    else:
        accepted = np.sort(np.concatenate([g.msgs for g in groups]))
        rows_of = [np.searchsorted(accepted, g.msgs) for g in groups]
    r = accepted.shape[0]
    size = len(strings.names)

    def column(name: str, dtype: np.dtype[Any]) -> np.ndarray:
        if len(groups) == 1:
            return np.asarray(getattr(groups[0], name), dtype=dtype)
        out = np.empty(r, dtype=dtype)
        for g, rows in zip(groups, rows_of, strict=True):
            out[rows] = getattr(g, name)
        return out

    pred_kind = column("pred_kind", np.dtype(np.int8))
    label_kind = column("label_kind", np.dtype(np.int8))
    # Classes: first seen over prediction then label of each row in turn.
    pred_rows = [rows[g.pred_kind == STR] for g, rows in zip(groups, rows_of, strict=True)]
    label_rows = [rows[g.label_kind == STR] for g, rows in zip(groups, rows_of, strict=True)]
    cls_ids = np.concatenate([g.pred_id for g in groups] + [g.label_id for g in groups])
    pr, lr = np.concatenate(pred_rows), np.concatenate(label_rows)
    cls_codes, cls_order = first_seen(cls_ids, np.concatenate([2 * pr, 2 * lr + 1]), size)
    pred_code = np.full(r, NO_CLASS, dtype=CLASS_DTYPE)
    pred_code[pr] = cls_codes[: pr.shape[0]]
    label_code = np.full(r, NO_CLASS, dtype=CLASS_DTYPE)
    label_code[lr] = cls_codes[pr.shape[0] :]
    # (model, version) keys.
    pair = column("model", np.dtype(np.int64)) * size + column("version", np.dtype(np.int64))
    uniq, inv = np.unique(pair, return_inverse=True)
    mv, key_order = first_seen(inv, np.arange(r), uniq.shape[0])
    keys = [(strings.names[u // size], strings.names[u % size]) for u in uniq[key_order].tolist()]
    informative = np.flatnonzero((pred_kind != NULL) | (label_kind != NULL))
    is_float = (pred_kind == DBL) | (label_kind == DBL)
    first = np.full(len(keys), BIG, dtype=np.int64)
    np.minimum.at(first, mv[informative], informative)
    regression: list[bool | None] = [
        None if f == BIG else bool(is_float[f]) for f in first.tolist()
    ]
    seg = column("segment", np.dtype(np.int64))
    has_seg = np.flatnonzero(seg >= 0)
    seg_codes, seg_order = first_seen(seg[has_seg], has_seg, size)
    segment = np.full(r, NO_CLASS, dtype=CLASS_DTYPE)
    segment[has_seg] = seg_codes
    # Features in long form: row by row, each map in its wire order.
    f_rows = np.concatenate([rows[g.feat_row] for g, rows in zip(groups, rows_of, strict=True)])
    counts = np.bincount(f_rows, minlength=r)
    place = (np.cumsum(counts) - counts)[f_rows] + np.concatenate([g.feat_t for g in groups])
    f_ids = np.concatenate([g.feat_id for g in groups])
    f_codes, f_order = first_seen(f_ids, place, size)
    feat_row = np.empty(place.shape[0], dtype=np.int64)
    feat_row[place] = f_rows
    feat_code = np.empty(place.shape[0], dtype=np.int32)
    feat_code[place] = f_codes
    feat_value = np.empty(place.shape[0], dtype=FLOAT_DTYPE)
    feat_value[place] = np.concatenate([g.feat_value for g in groups])
    names = strings.names
    return RowChunk(
        mv_keys=keys,
        regression=regression,
        mv=mv.astype(np.int32),
        offset=offsets[accepted].astype(np.int64),
        event_time_ms=column("event_time_ms", EVENT_TIME_DTYPE),
        latency_seconds=column("latency_seconds", FLOAT_DTYPE),
        outcome=column("outcome", OUTCOME_DTYPE),
        score=column("score", FLOAT_DTYPE),
        classes=[names[i] for i in cls_order.tolist()],
        pred_code=pred_code,
        label_code=label_code,
        pred_value=column("pred_value", FLOAT_DTYPE),
        label_value=column("label_value", FLOAT_DTYPE),
        segments=[names[i] for i in seg_order.tolist()],
        segment=segment,
        feature_names=[names[i] for i in f_order.tolist()],
        feat_row=feat_row,
        feat_code=feat_code,
        feat_value=feat_value,
        event_hash=column("event_hash", np.dtype(np.uint64)),
    )
