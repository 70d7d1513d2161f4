"""The accepted rows of a batch as the measures' bin functions see them."""

from __future__ import annotations

from functools import cached_property

import numpy as np

from aggregator.state.binning import CAL_BUCKETS, Buckets
from aggregator.state.config import OK, StateConfig

__all__ = ["Rows"]


class Rows:
    """The accepted rows of a batch with the derived columns measures share.

    Each derived column is computed once, on first use, so a measure that is never
    binned (no segments in the batch) costs nothing.
    """

    def __init__(
        self,
        config: StateConfig,
        mv: np.ndarray,
        cols: dict[str, np.ndarray],
        buckets: tuple[Buckets, Buckets],
        err_edges: np.ndarray,
        feats: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
        delay: np.ndarray | None = None,
    ) -> None:
        self.config = config
        self.mv = mv
        self.um = mv  # until PaneStore.add makes it the (pane, model-version) cell
        self.out: np.ndarray = cols["out"]
        self.lat: np.ndarray = cols["lat"]
        self.score: np.ndarray = cols["score"]
        self.pred: np.ndarray = cols["pred"]
        self.label: np.ndarray = cols["label"]
        self.pv: np.ndarray = cols["pv"]
        self.lv: np.ndarray = cols["lv"]
        self.seg: np.ndarray = cols["seg"]
        self.lat_buckets, self.score_buckets = buckets
        self.err_edges = err_edges
        self.feats = feats  # (row, feature id, value) of accepted rows' features
        self.delay = delay  # joined labels: seconds from prediction to label
        self.ncls = config.limits.max_classes
        self.nseg = config.limits.max_segments

    @cached_property
    def has_score(self) -> np.ndarray:
        found: np.ndarray = ~np.isnan(self.score)
        return found

    @cached_property
    def score0(self) -> np.ndarray:
        # Valid scores are in [0, 1]: fmax turns only the missing ones (NaN) into 0.
        found: np.ndarray = np.fmax(self.score, 0.0)
        return found

    @cached_property
    def ok(self) -> np.ndarray:
        found: np.ndarray = self.out == OK
        return found

    @cached_property
    def both(self) -> np.ndarray:
        """Ok rows with a predicted and a true class."""
        return self.ok & (self.label >= 0) & (self.pred >= 0)

    @cached_property
    def has_pred(self) -> np.ndarray:
        return self.ok & (self.pred >= 0)

    @cached_property
    def scored(self) -> np.ndarray:
        """Ok rows with a predicted class and a score, labelled or not."""
        found: np.ndarray = self.has_pred & self.has_score
        return found

    @cached_property
    def correct(self) -> np.ndarray:
        found: np.ndarray = self.label == self.pred
        return found

    @cached_property
    def cal(self) -> np.ndarray:
        """Rows of the calibration measures: labelled classifications with a score."""
        found: np.ndarray = self.both & self.has_score
        return found

    @cached_property
    def cal_bin(self) -> np.ndarray:
        return CAL_BUCKETS(self.score)  # NaN: last bin, masked out by ``cal``

    @cached_property
    def reg(self) -> np.ndarray:
        """Ok rows with a predicted and a true value."""
        found: np.ndarray = self.ok & ~np.isnan(self.pv) & ~np.isnan(self.lv)
        return found

    @cached_property
    def err(self) -> np.ndarray:
        """Prediction minus label of the ``reg`` rows."""
        found: np.ndarray = self.pv[self.reg] - self.lv[self.reg]
        return found

    @cached_property
    def has_seg(self) -> np.ndarray:
        return self.seg >= 0

    @cached_property
    def any_seg(self) -> bool:
        return bool(self.has_seg.any())

    @cached_property
    def seg_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(labelled classifications, labelled regressions) with a segment."""
        return self.both & self.has_seg, self.reg & self.has_seg

    @cached_property
    def seg_err(self) -> np.ndarray:
        sr = self.seg_rows[1]
        found: np.ndarray = self.pv[sr] - self.lv[sr]
        return found
