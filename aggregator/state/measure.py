"""The row type of the measure table (``measures.MEASURES``) and what a bin function
returns; see ``measures`` for the table itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np

    from aggregator.state.config import StateConfig
    from aggregator.state.rows import Rows

__all__ = ["Bin", "Mean", "Measure", "Task"]

Task = Literal["classification", "regression"]


@dataclass(frozen=True, slots=True)
class Bin:
    """Where the rows of a batch go in one measure.

    ``rows`` selects (bool mask) or repeats (index array) rows of the batch, default
    all; ``inner`` is the flat index inside the measure's tail for those rows (default
    0: a scalar); ``weights`` are summed instead of counting, ``mask`` counts only where
    set (a 0/1 weight: cheaper than a selection when it is random, and exact).
    """

    rows: np.ndarray | None = None
    inner: np.ndarray | None = None
    weights: np.ndarray | None = None
    mask: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class Mean:
    """A windowed gauge: this measure's window sum over the total of ``over`` (a count).

    Rendered for every model version of ``task`` (None: all) whose ``over`` sum is > 0.
    """

    family: str
    help: str
    over: str
    task: Task | None = None


@dataclass(frozen=True, slots=True)
class Measure:
    """One array of the state (see the module docstring)."""

    name: str
    tail: Callable[[StateConfig], tuple[int, ...]]
    dtype: type
    bin: Callable[[Rows], Bin | None]
    windowed: bool = True  # False: cumulative + open panes only (windows are increase())
    drift: bool = False  # a reference distribution of it is kept (drift scores)
    # Which rows are binned into it: predictions as they are ingested, and/or labels
    # joined later to a pending prediction (``aggregator.join``), in the pane of the
    # label's time: so quality counts labels the moment they become known.
    predictions: bool = True
    joined: bool = False
    # Worst-case sample lines per model version: (cumulative families, per window).
    lines: tuple[int, int] | Callable[[StateConfig], tuple[int, int]] = (0, 0)
    gauge: Mean | None = None
