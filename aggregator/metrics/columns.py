"""Rows of each family before the cap: labels, values and the unit that owns each row."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Final

import numpy as np

from aggregator.exposition import Family
from aggregator.metrics.specs import _MV
from aggregator.state import StateView

# Owners of series that are not a droppable unit (units are numbered from 0).
_KEEP: Final = -1
_ZERO: Final = -2


@dataclass(slots=True)
class _Rows:
    """One family's series before the cap: labels, numbers and the unit owning each."""

    labels: list[tuple[str, ...]] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)  # histograms: bucket rows
    sums: list[np.ndarray] = field(default_factory=list)  # histograms only
    owners: list[np.ndarray] = field(default_factory=list)

    def add(
        self,
        labels: Sequence[tuple[str, ...]],
        values: np.ndarray,
        owner: int | np.ndarray,
        sums: np.ndarray | None = None,
    ) -> None:
        n = len(labels)
        if not n:
            return
        self.labels.extend(labels)
        self.values.append(values)
        self.owners.append(np.broadcast_to(np.asarray(owner, dtype=np.int64), (n,)))
        if sums is not None:
            self.sums.append(sums)


class _Columns:
    """Label tuples and value arrays per family, appended in bulk (no per-series calls)."""

    def __init__(self) -> None:
        self.rows: dict[str, _Rows] = {}

    def extend(
        self,
        family: str,
        labels: Sequence[tuple[str, ...]],
        values: Any,
        owner: int | np.ndarray = _KEEP,
    ) -> None:
        if labels:
            values = np.broadcast_to(np.asarray(values, dtype=np.float64), (len(labels),))
            self.rows.setdefault(family, _Rows()).add(labels, values, owner)

    def one(self, family: str, labels: tuple[str, ...], value: float, owner: int = _KEEP) -> None:
        self.extend(family, [labels], [value], owner)

    def histogram(
        self,
        family: str,
        labels: Sequence[tuple[str, ...]],
        buckets: np.ndarray,
        sums: np.ndarray,
        owner: np.ndarray,
    ) -> None:
        self.rows.setdefault(family, _Rows()).add(labels, buckets, owner, sums)


@dataclass(slots=True)
class _Pending:
    """A family's spec and rows, with what each row costs in sample lines."""

    name: str
    kind: str
    help: str
    label_names: tuple[str, ...]
    labels: list[tuple[str, ...]]
    values: np.ndarray  # [n] or, for histograms, [n, buckets]
    sums: np.ndarray | None
    owners: np.ndarray
    lines: np.ndarray  # 0 for a series that is not rendered (NaN)
    upper_bounds: tuple[float, ...] = ()

    def family(self, keep: np.ndarray | None) -> Family:
        labels, values, sums = self.labels, self.values, self.sums
        if keep is not None:
            rows = keep[self.owners - _ZERO]
            if not rows.all():
                labels = _select(labels, rows)
                values = values[rows]
                sums = None if sums is None else sums[rows]
        if self.kind == "histogram":
            return Family(
                name=self.name,
                kind="histogram",
                help=self.help,
                label_names=self.label_names,
                label_values=labels,
                upper_bounds=self.upper_bounds,
                buckets=values,
                sums=sums,
            )
        return Family(
            name=self.name,
            kind=self.kind,  # type: ignore[arg-type]
            help=self.help,
            label_names=self.label_names,
            label_values=labels,
            values=values,
        )


def _select(labels: list[tuple[str, ...]], rows: np.ndarray) -> list[tuple[str, ...]]:
    kept = np.flatnonzero(rows).tolist()
    if len(kept) < 2:  # itemgetter of one index returns the item, not a tuple
        return [labels[i] for i in kept]
    return list(itemgetter(*kept)(labels))


def _pending(
    cols: _Columns, name: str, kind: str, help_text: str, label_names: tuple[str, ...]
) -> _Pending:
    rows = cols.rows.get(name, _Rows())
    owners = np.concatenate(rows.owners) if rows.owners else np.empty(0, np.int64)
    values = np.concatenate(rows.values) if rows.values else np.empty(0)
    lines = (~np.isnan(values)).astype(np.int64)
    return _Pending(name, kind, help_text, label_names, rows.labels, values, None, owners, lines)


def _pending_histogram(
    cols: _Columns, name: str, help_text: str, bounds: Sequence[float]
) -> _Pending:
    rows = cols.rows.get(name, _Rows())
    width = len(bounds) + 1
    buckets = (
        np.concatenate(rows.values).astype(np.float64) if rows.values else np.empty((0, width))
    )
    sums = np.concatenate(rows.sums).astype(np.float64) if rows.sums else np.empty(0)
    owners = np.concatenate(rows.owners) if rows.owners else np.empty(0, np.int64)
    present = ~(np.isnan(sums) | np.isnan(buckets).any(axis=1))
    return _Pending(
        name, "histogram", help_text, _MV, rows.labels, buckets, sums, owners,
        present.astype(np.int64) * (width + 2), tuple(float(b) for b in bounds),
    )  # fmt: skip


def _mv_labels(v: StateView) -> list[tuple[str, str, str]]:
    p = str(v.partition)
    return [(e[0], e[1], p) for e in v.entries]


def _cells(
    mvl: Sequence[tuple[str, ...]], names: Sequence[Sequence[str]], mask: np.ndarray, *extra: str
) -> tuple[list[tuple[str, ...]], tuple[np.ndarray, ...]]:
    """Label tuples for the nonzero cells of ``mask[mv, i(, j)]``, named through ``names[mv]``."""
    idx = np.nonzero(mask)
    cols = [a.tolist() for a in idx]
    if len(cols) == 2:
        labels = [(*mvl[i], *extra, names[i][c]) for i, c in zip(*cols, strict=True)]
    else:
        labels = [
            (*mvl[i], *extra, names[i][a], names[i][b]) for i, a, b in zip(*cols, strict=True)
        ]
    return labels, idx
