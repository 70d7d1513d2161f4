"""The pane ring of one partition: per-pane sums of every measure, windows, closing.

Panes live in a ring of ``config.ring`` slots that holds the longest window plus the
panes still open; measures that are not ``windowed`` keep only a small ring of the
open panes. Closing a pane adds it to the cumulative counters (``cum``). Everything
is driven by ``measures.MEASURES``: no array is named here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from aggregator.state.binning import dense
from aggregator.state.config import StateConfig
from aggregator.state.measures import (
    JOINED_MEASURES,
    MEASURES,
    PREDICTION_MEASURES,
    Measure,
    tails,
)
from aggregator.state.rows import Rows
from aggregator.window import NO_TIME, closed_panes

__all__ = ["PaneStore", "WindowAggregate", "pane_kind"]

_WINDOWED: Final = tuple(m for m in MEASURES if m.windowed)


def pane_kind(measure: Measure) -> str:
    """Where a measure's per-pane arrays live: the window ring, or only the open panes."""
    return "ring" if measure.windowed else "open"


_OPEN_ONLY: Final = tuple(m for m in MEASURES if not m.windowed)


@dataclass(frozen=True, slots=True)
class WindowAggregate:
    """Sums over the closed panes of one window, per model-version (first axis).

    Each windowed measure reads as an attribute (``w.conf``) or ``w.sums["conf"]``.
    """

    window_ms: int
    end_ms: int
    sums: dict[str, np.ndarray] = field(default_factory=dict)

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self.sums[name]
        except KeyError:
            raise AttributeError(name) from None


class PaneStore:
    """Ring, open ring and cumulative arrays of every measure, per model version."""

    def __init__(self, config: StateConfig, on_close: Callable[[], None]) -> None:
        self.config = c = config
        self.tails = tails(c)
        self.widths = {name: int(np.prod(t, dtype=np.int64)) for name, t in self.tails.items()}
        self.capacity = 0
        self.closed = closed_panes(NO_TIME, c.lateness_ms, c.pane_ms)
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
        self._on_close = on_close  # drift references are taken before slots are reused

    def grow(self, need: int) -> bool:
        """Room for ``need`` model versions; True when the arrays were reallocated."""
        if need <= self.capacity:
            return False
        cap = max(need, 2 * self.capacity)
        for m in MEASURES:
            slots = self.config.ring if m.windowed else self.open_slots
            store = self.panes_of(m)
            tail = self.tails[m.name]
            pane: np.ndarray = np.zeros((slots, cap, *tail), dtype=m.dtype)
            cum: np.ndarray = np.zeros((cap, *tail), dtype=m.dtype)
            if m.name in store:
                pane[:, : self.capacity] = store[m.name]
                cum[: self.capacity] = self.cum[m.name]
            store[m.name], self.cum[m.name] = pane, cum
        self.capacity = cap
        return True

    def panes_of(self, measure: Measure) -> dict[str, np.ndarray]:
        """The per-pane arrays a measure lives in (``pane_kind``)."""
        return self.ring if measure.windowed else self.open

    @property
    def window_end_ms(self) -> int:
        return self.closed * self.config.pane_ms

    def add(self, pane: np.ndarray, rows: Rows, *, joined: bool = False) -> None:
        """Bin the rows (event-time pane each) into their panes' slots: predictions into
        the measures that take them, or (``joined``) labels joined later."""
        panes, u = dense(pane)
        m = self.capacity
        rows.um = u * m + rows.mv  # (pane, model-version) cell of each row
        n_cells = len(panes) * m
        sums: dict[str, np.ndarray] = {}
        for measure in JOINED_MEASURES if joined else PREDICTION_MEASURES:
            found = _bin(measure, rows, self.widths[measure.name], n_cells)
            if found is not None:
                sums[measure.name] = found.reshape((len(panes), m, *self.tails[measure.name]))
        cfg = self.config
        for i, k in enumerate(panes.tolist()):
            slot = k % cfg.ring
            if self.pane_of_slot[slot] != k:
                # The older pane in this slot is closed by this very batch anyway (the
                # ring spans more than the lateness): close up to where pane k's row
                # puts the watermark now, so the drift references that end there are
                # taken before their panes are overwritten, whatever the batch size.
                self.close(closed_panes(k * cfg.pane_ms, cfg.lateness_ms, cfg.pane_ms))
                for measure in _WINDOWED:
                    self.ring[measure.name][slot] = 0
                self.pane_of_slot[slot] = k
                self.slot_closed[slot] = False
            for measure in _WINDOWED:
                if measure.name in sums:
                    self.ring[measure.name][slot] += sums[measure.name][i]
            slot = k % self.open_slots
            if self.pane_of_open[slot] != k:
                self.close(closed_panes(k * cfg.pane_ms, cfg.lateness_ms, cfg.pane_ms))
                if not self.open_closed[slot]:  # cannot happen: see open_slots
                    raise AssertionError(f"open pane {self.pane_of_open[slot]} evicted by {k}")
                for measure in _OPEN_ONLY:
                    self.open[measure.name][slot] = 0
                self.pane_of_open[slot] = k
                self.open_closed[slot] = False
            for measure in _OPEN_ONLY:
                if measure.name in sums:
                    self.open[measure.name][slot] += sums[measure.name][i]

    def close(self, new_closed: int) -> None:
        """Close every pane before ``new_closed`` into the cumulative counters."""
        if new_closed <= self.closed:
            return
        pending = np.flatnonzero(~self.slot_closed & (self.pane_of_slot < new_closed))
        if pending.size:
            for measure in _WINDOWED:
                self.cum[measure.name] += self.ring[measure.name][pending].sum(axis=0)
            self.slot_closed[pending] = True
        done = np.flatnonzero(~self.open_closed & (self.pane_of_open < new_closed))
        if done.size:
            for measure in _OPEN_ONLY:
                self.cum[measure.name] += self.open[measure.name][done].sum(axis=0)
            self.open_closed[done] = True
        self.closed = new_closed
        self._on_close()

    def closed_slots(self, first_pane: int, n_panes: int) -> np.ndarray:
        """Mask of the ring slots holding closed panes [first_pane, first_pane + n)."""
        sel = (self.pane_of_slot >= first_pane) & (self.pane_of_slot < first_pane + n_panes)
        mask: np.ndarray = sel & self.slot_closed
        return mask

    def window(self, window_ms: int, n_model_versions: int) -> WindowAggregate:
        """Sums over the panes of [E - window, E) where E is the last closed boundary."""
        n = window_ms // self.config.pane_ms
        sel = self.closed_slots(self.closed - n, n)
        return WindowAggregate(
            window_ms=window_ms,
            end_ms=self.window_end_ms,
            sums={m.name: self.ring[m.name][sel, :n_model_versions].sum(axis=0) for m in _WINDOWED},
        )


def _bin(measure: Measure, rows: Rows, width: int, n_cells: int) -> np.ndarray | None:
    """One ``np.bincount`` of the measure over (pane, model-version, tail) cells."""
    b = measure.bin(rows)
    if b is None:
        return None
    um = rows.um if b.rows is None else rows.um[b.rows]
    if not um.size:
        return None
    idx = um * width if width > 1 else um
    if b.inner is not None:
        idx = idx + b.inner
    flat = np.bincount(
        idx, weights=b.mask if b.weights is None else b.weights, minlength=n_cells * width
    )
    if b.weights is None:  # counts (a mask is a 0/1 weight): integers
        flat = flat.astype(np.int64, copy=False)
    found: np.ndarray = flat
    return found
