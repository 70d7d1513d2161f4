"""Catalog ids for the names of accepted rows, in order of first appearance in the log.

Names are interned only for rows that passed every check, so rejected rows never
create models, take cap slots or set first-seen times; ids do not depend on where
batches are cut.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from aggregator.catalog import Catalog
from aggregator.state.binning import dense
from aggregator.state.columns import RowChunk
from aggregator.state.config import _R_KIND

__all__ = ["Interned", "Interner"]


@dataclass(frozen=True, slots=True)
class Interned:
    """Per batch row: catalog ids (-1 = none); features in long form (row, id, value)."""

    mv: np.ndarray
    pred: np.ndarray
    label: np.ndarray
    seg: np.ndarray
    feats: list[tuple[np.ndarray, np.ndarray, np.ndarray]]


class Interner:
    """Interns into ``catalog``; ``grow(n)`` makes room for n model versions."""

    def __init__(self, catalog: Catalog, grow: Callable[[int], None]) -> None:
        self.catalog = catalog
        self._grow = grow

    def rows(
        self,
        chunks: list[tuple[int, RowChunk]],
        base: int,
        cand: np.ndarray,
        has_val: np.ndarray,
        has_cls: np.ndarray,
        reason: np.ndarray,
    ) -> Interned:
        """Model versions, then the names of the candidate rows (valid, not late), as
        catalog ids; rows of the wrong kind for their model get ``kind_mismatch`` in
        ``reason`` (in place). ``chunks`` are (first row in the batch, chunk)."""
        mv = np.full(base, -1, dtype=np.int64)
        pred = np.full(base, -1, dtype=np.int64)
        label = np.full(base, -1, dtype=np.int64)
        seg = np.full(base, -1, dtype=np.int64)
        feats: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for b0, chunk in chunks:
            n = len(chunk)
            part = slice(b0, b0 + n)
            gmv, mismatch = self.admit(chunk, cand[part], has_val[part], has_cls[part])
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
                    pred[part], label[part] = self.lookup(
                        g, chunk.classes, (chunk.pred_code, chunk.label_code), acc, "classes"
                    )
                if chunk.segments:  # no names: every code is -1, as ``seg`` already is
                    (seg[part],) = self.lookup(g, chunk.segments, (chunk.segment,), acc, "segments")
                if f_acc is not None:
                    (fid,) = self.lookup(
                        g, chunk.feature_names, (chunk.feat_code,), f_acc, "features"
                    )
                    feats.append((chunk.feat_row + b0, fid, chunk.feat_value))
                continue
            if with_cls:
                both = self.remap(
                    np.concatenate([chunk.pred_code, chunk.label_code]),
                    np.concatenate([gmv, gmv]),
                    chunk.classes,
                    np.concatenate([acc, acc]),
                    "classes",
                    halves=n,
                )
                pred[part], label[part] = both[:n], both[n:]
            seg[part] = self.remap(chunk.segment, gmv, chunk.segments, acc, "segments")
            if f_acc is not None:
                fid = self.remap(
                    chunk.feat_code, gmv[chunk.feat_row], chunk.feature_names, f_acc, "features"
                )
                feats.append((chunk.feat_row + b0, fid, chunk.feat_value))
        return Interned(mv, pred, label, seg, feats)

    def _intern_fn(self, table: str) -> Callable[[int, str], int]:
        cat = self.catalog
        return {"classes": cat.class_id, "segments": cat.segment_id, "features": cat.feature_id}[
            table
        ]

    def lookup(
        self,
        g: int,
        names: list[str],
        columns: tuple[np.ndarray, ...],
        accept: np.ndarray,
        table: str,
    ) -> list[np.ndarray]:
        """``remap`` for a chunk of one model-version ``g``: one table, one lookup.

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

    def remap(
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
        uniq, inverse = dense(gkeys[sel] * width + codes[sel])
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

    def admit(
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
