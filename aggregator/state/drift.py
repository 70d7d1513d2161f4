"""Drift references of a partition: from a sample file, else the first full window.

The reference of a model version is a histogram per ``drift`` measure of the table
(score, predicted class, predicted value, features), binned exactly as live traffic
is, so a drift score compares like with like. References from training published to
the references topic (``aggregator.references``) are applied at render time instead.
"""

from __future__ import annotations

import json
from typing import Final

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from aggregator.catalog import Catalog
from aggregator.state.binning import drift_bin
from aggregator.state.config import DRIFT_BINS, StateConfig
from aggregator.state.measures import MEASURES
from aggregator.state.panes import PaneStore

__all__ = ["DRIFT_MEASURES", "DriftReferences", "ReferenceFile", "load_reference_file"]

DRIFT_MEASURES: Final = tuple(m.name for m in MEASURES if m.drift)


class ModelReference(BaseModel):
    """Sample values of one model (``version`` "*": every version without its own)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = "*"
    score: list[float] = []
    prediction: list[str] | list[float] = []
    features: dict[str, list[float]] = {}


class ReferenceFile(BaseModel):
    """A drift reference file: ``{"models": {"<model>": {ModelReference}}}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, ModelReference]


def load_reference_file(path: str) -> tuple[tuple[str, str, str], ...]:
    """Parse and validate a drift reference file into ``StateConfig.reference_samples``.

    The file is JSON: ``{"models": {"<model>": {"version": "*" or "<v>", "score": [...],
    "prediction": [...], "features": {"<name>": [...]}}}}`` with raw sample values (e.g.
    from the training or validation set); they are binned exactly as live traffic is.
    Errors name the file and the bad field (unknown keys included).
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        doc = ReferenceFile.model_validate_json(text)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e["loc"]) or "(top level)"
            what = "unknown keys" if e["type"] == "extra_forbidden" else e["msg"]
            problems.append(f"{where}: {what}")
        raise ValueError(f"{path}: {'; '.join(problems[:5])}") from None
    return tuple(
        (model, spec.version, json.dumps(spec.model_dump(exclude_unset=True), sort_keys=True))
        for model, spec in doc.models.items()
    )


class DriftReferences:
    """Reference histograms per model version, one per drift measure."""

    def __init__(self, config: StateConfig, tails: dict[str, tuple[int, ...]]) -> None:
        self.config = config
        self.tails = tails
        self.arrays: dict[str, np.ndarray] = {}
        self.has = np.zeros(0, dtype=bool)
        self._score_edges = np.asarray(config.score_bounds)

    def grow(self, old: int, cap: int) -> None:
        for name in DRIFT_MEASURES:
            ref = np.zeros((cap, *self.tails[name]), dtype=np.int64)
            if name in self.arrays:
                ref[:old] = self.arrays[name]
            self.arrays[name] = ref
        has = np.zeros(cap, dtype=bool)
        has[:old] = self.has[:old]
        self.has = has

    def take(self, panes: PaneStore, catalog: Catalog) -> None:
        """References still missing: from the sample file, else the first full window."""
        cfg = self.config
        n_ref = cfg.drift_reference_ms // cfg.pane_ms
        for mv, entry in enumerate(catalog.entries):
            if self.has[mv]:
                continue
            if cfg.reference_samples and self._from_samples(mv, catalog):
                continue
            start = entry.first_seen_ms // cfg.pane_ms + 1
            if panes.closed < start + n_ref:
                continue
            sel = panes.closed_slots(start, n_ref)
            for name in DRIFT_MEASURES:
                self.arrays[name][mv] = panes.ring[name][sel, mv].sum(axis=0)
            self.has[mv] = True

    def _from_samples(self, mv: int, catalog: Catalog) -> bool:
        """Set the reference of ``mv`` from the configured sample file, if it has one."""
        entry = catalog.entries[mv]
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
        self.arrays["score"][mv] = np.bincount(
            np.searchsorted(self._score_edges, score, "left"), minlength=ns
        )
        preds = spec.get("prediction", [])
        if preds and all(isinstance(p, str) for p in preds):
            ids = [catalog.class_id(mv, p) for p in preds]
            self.arrays["pred_class"][mv] = np.bincount(
                ids, minlength=self.config.limits.max_classes
            )
        elif preds:
            values = np.asarray(preds, dtype=np.float64)
            self.arrays["pred_hist"][mv] = np.bincount(drift_bin(values), minlength=DRIFT_BINS)
        for name, values in spec.get("features", {}).items():
            f = catalog.feature_id(mv, name)
            arr = np.asarray(values, dtype=np.float64)
            self.arrays["feat"][mv, f] += np.bincount(
                drift_bin(arr[np.isfinite(arr)]), minlength=DRIFT_BINS
            )
        self.has[mv] = True
        return True
