"""Checks and small key helpers of the pending stores: what callers hand in, validated
once per batch with errors that name the column."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "Columns",
    "Schema",
    "as_keys",
    "checked",
    "distinct_keys",
    "first_of_each",
    "valid_schema",
]

Schema = tuple[tuple[str, str], ...]  # (name, little-endian numpy dtype) per column
Columns = dict[str, npt.NDArray[Any]]  # name -> one value per entry; "key" is the id hash
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]


def valid_schema(schema: Schema, time_column: str) -> Schema:
    """``schema`` with its dtypes spelled as numpy does, or a ValueError naming why not."""
    names = [name for name, _ in schema]
    if time_column not in names:
        raise ValueError(f"time_column: {time_column!r} is not one of {names}")
    if "key" in names or len(set(names)) != len(names):
        raise ValueError(f"schema: names must be unique and not 'key', got {names}")
    if np.dtype(dict(schema)[time_column]).kind != "i":
        raise ValueError(f"time_column: {time_column!r} must be an integer column")
    return tuple((n, np.dtype(d).str) for n, d in schema)


def distinct_keys(keys: npt.ArrayLike) -> U64:
    """``as_keys``, refusing 0 and repeats (what a restored store must hold)."""
    ks = as_keys(keys)
    s = np.sort(ks)
    if ks.size and (not s[0] or (s[1:] == s[:-1]).any()):
        raise ValueError("key: keys must be nonzero and distinct")
    return ks


def as_keys(keys: npt.ArrayLike) -> U64:
    """Keys as a 1-d uint64 array (no copy when they already are one)."""
    arr = np.asarray(keys)
    if arr.ndim != 1:
        raise ValueError(f"keys: expected a 1-d array, got shape {arr.shape}")
    if arr.dtype == np.uint64:
        return arr
    if arr.size == 0:
        return np.empty(0, np.uint64)
    if arr.dtype.kind not in "iu" or arr.min() < 0:
        raise ValueError(f"keys: expected uint64 id hashes, got {arr.dtype}")
    return arr.astype(np.uint64)


def first_of_each(values: npt.NDArray[Any]) -> I64:
    """Positions of the first occurrence of each distinct value, ascending."""
    s = np.sort(values)  # cheap check first: repeats are rare
    if not (s[1:] == s[:-1]).any():
        return np.arange(values.size, dtype=np.int64)
    order = np.argsort(values, kind="stable")
    head = np.ones(values.size, np.bool_)
    head[1:] = values[order[1:]] != values[order[:-1]]
    return np.sort(order[head]).astype(np.int64)


def checked(schema: Schema, columns: Mapping[str, npt.ArrayLike], m: int) -> Columns:
    """The batch's columns in their stored dtypes, or a ValueError naming the column."""
    missing = [n for n, _ in schema if n not in columns]
    extra = sorted(set(columns) - {n for n, _ in schema})
    if missing or extra:
        raise ValueError(f"columns: missing {missing}, unexpected {extra}")
    out: Columns = {}
    for name, dtype in schema:
        arr = np.asarray(columns[name])
        target = np.dtype(dtype)
        if arr.ndim != 1 or arr.size != m:
            raise ValueError(f"{name}: expected {m} values, got shape {arr.shape}")
        if arr.size and not np.can_cast(arr.dtype, target, "same_kind"):
            raise ValueError(f"{name}: cannot store {arr.dtype} values as {target}")
        if arr.size and target.kind == "i" and arr.dtype.itemsize > target.itemsize:
            info = np.iinfo(target)
            if arr.min() < info.min or arr.max() > info.max:
                raise ValueError(f"{name}: values outside the range of {target}")
        out[name] = arr.astype(target, copy=False)
    return out
