"""Checks of input that need neither the catalog nor the watermark: names, values,
heartbeats. Each returns reason codes (``config.REJECT_REASONS``), -1 for none."""

from __future__ import annotations

from typing import Any

import numpy as np

from aggregator.catalog import OVERFLOW
from aggregator.state.columns import RowChunk
from aggregator.state.config import (
    _R_EMPTY_MODEL,
    _R_HEARTBEAT,
    _R_KIND,
    _R_LATENCY,
    _R_NAME_LONG,
    _R_OUTCOME,
    _R_RESERVED,
    _R_SCORE,
    _R_VALUE,
    _VALID_OUTCOMES,
    MAX_ABS_VALUE,
    MAX_GPUS,
    RESERVED_CLASSES,
    RESERVED_NAMES,
)

__all__ = ["heartbeat_reason", "name_reasons", "value_reasons"]


def name_reasons(chunk: RowChunk, limit: int) -> np.ndarray | None:
    """Per-row reason for a bad name (too long, reserved, empty model), or None.

    One check per distinct name of the chunk's dictionaries, then a lookup by code.
    """

    def check(names: list[str], reserved: frozenset[str]) -> np.ndarray | None:
        codes = [
            _R_NAME_LONG if len(x) > limit else _R_RESERVED if x in reserved else -1 for x in names
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


def heartbeat_reason(r: dict[str, Any], limit: int) -> tuple[int, dict[str, Any]]:
    """(reason or -1, the record with GPUs de-duplicated by index, the last wins)."""
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


def value_reasons(
    lat: np.ndarray,
    out: np.ndarray,
    score: np.ndarray,
    pv: np.ndarray,
    lv: np.ndarray,
    has_val: np.ndarray,
    has_cls: np.ndarray,
) -> np.ndarray:
    """Per-row reason of a bad value. Later assignments win, so the list runs from
    least to most specific."""
    reason = np.full(lat.shape[0], -1, dtype=np.int64)
    reason[has_val & has_cls] = _R_KIND  # a value and a class in one row
    reason[(np.abs(pv) > MAX_ABS_VALUE) | (np.abs(lv) > MAX_ABS_VALUE)] = _R_VALUE
    reason[(score < 0) | (score > 1)] = _R_SCORE
    reason[out >= _VALID_OUTCOMES] = _R_OUTCOME
    reason[~((lat >= 0) & (lat <= MAX_ABS_VALUE))] = _R_LATENCY
    return reason
