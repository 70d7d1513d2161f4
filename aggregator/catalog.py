"""Dense ids for models, versions, classes, features and segments, under caps.

Ids are handed out in log order, so a replay from the same offset assigns the same
ids. What exceeds a cap folds into ``__overflow__`` and is counted, so the number
of exported series stays bounded whatever the producers send. Ingest rejects names
that are too long or reserved before they get here; the catalog still never admits a
reserved name (``__overflow__`` anywhere, ``macro`` as a class) as a regular one, so
no two exported series can share their labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["MACRO", "OVERFLOW", "Catalog", "Limits"]

OVERFLOW: Final = "__overflow__"
MACRO: Final = "macro"  # the ``class`` label value of macro averages


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps on what one partition tracks (validated by the settings model)."""

    max_models: int = 100
    max_versions_per_model: int = 5
    max_classes: int = 16
    max_features: int = 8
    max_segments: int = 8
    max_model_versions: int = 200


@dataclass(slots=True)
class _ModelVersion:
    model: str
    version: str
    regression: bool | None  # None until a prediction or label says which
    first_seen_ms: int
    classes: dict[str, int] = field(default_factory=dict)
    features: dict[str, int] = field(default_factory=dict)
    segments: dict[str, int] = field(default_factory=dict)


class Catalog:
    """Interning tables of one partition; ``folded`` counts what hit a cap."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.entries: list[_ModelVersion] = []
        self._ids: dict[tuple[str, str], int] = {}
        self._versions: dict[str, int] = {}  # model -> versions admitted
        self.folded: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def fold(self, what: str, n: int = 1) -> None:
        self.folded[what] = self.folded.get(what, 0) + n

    def model_version(self, model: str, version: str, regression: bool | None, time_ms: int) -> int:
        """Id of (model, version), admitting it if the caps allow, else an overflow id."""
        key = (model, version)
        found = self._ids.get(key)
        if found is not None:
            entry = self.entries[found]
            if entry.regression is None:
                entry.regression = regression
            return found
        lim = self.limits
        if OVERFLOW in key or (
            model not in self._versions and len(self._versions) >= lim.max_models
        ):
            self.fold("model")
            return self._overflow((OVERFLOW, OVERFLOW), regression, time_ms)
        if self._versions.get(model, 0) >= lim.max_versions_per_model:
            self.fold("version")
            return self._overflow((model, OVERFLOW), regression, time_ms)
        if len(self.entries) >= lim.max_model_versions - 1:  # keep one id for overflow
            self.fold("model_version")
            return self._overflow((OVERFLOW, OVERFLOW), regression, time_ms)
        self._versions[model] = self._versions.get(model, 0) + 1
        return self._add(key, regression, time_ms)

    def _overflow(self, key: tuple[str, str], regression: bool | None, time_ms: int) -> int:
        found = self._ids.get(key)
        if found is None:
            return self._add(key, regression, time_ms)
        if self.entries[found].regression is None:
            self.entries[found].regression = regression
        return found

    def _add(self, key: tuple[str, str], regression: bool | None, time_ms: int) -> int:
        self._ids[key] = len(self.entries)
        self.entries.append(_ModelVersion(key[0], key[1], regression, time_ms))
        return self._ids[key]

    def _intern(
        self, table: dict[str, int], name: str, cap: int, what: str, reserved: bool = False
    ) -> int:
        found = table.get(name)
        if found is not None:
            return found
        regular = len(table) - (OVERFLOW in table)
        if reserved or name == OVERFLOW or regular >= cap - 1:  # the last id is overflow
            if name != OVERFLOW:
                self.fold(what)
            return table.setdefault(OVERFLOW, cap - 1)
        table[name] = regular
        return regular

    def class_id(self, mv: int, name: str) -> int:
        classes = self.entries[mv].classes
        return self._intern(classes, name, self.limits.max_classes, "class", name == MACRO)

    def feature_id(self, mv: int, name: str) -> int:
        return self._intern(self.entries[mv].features, name, self.limits.max_features, "feature")

    def segment_id(self, mv: int, name: str) -> int:
        return self._intern(self.entries[mv].segments, name, self.limits.max_segments, "segment")

    def to_json(self) -> dict[str, Any]:
        return {
            "entries": [
                [
                    e.model,
                    e.version,
                    e.regression,
                    e.first_seen_ms,
                    e.classes,
                    e.features,
                    e.segments,
                ]
                for e in self.entries
            ],
            "versions": self._versions,
            "folded": self.folded,
        }

    @classmethod
    def from_json(cls, limits: Limits, doc: dict[str, Any]) -> Catalog:
        cat = cls(limits)
        for model, version, regression, first, classes, features, segments in doc["entries"]:
            cat._ids[(model, version)] = len(cat.entries)
            cat.entries.append(
                _ModelVersion(model, version, regression, first, classes, features, segments)
            )
        cat._versions = dict(doc["versions"])
        cat.folded = dict(doc["folded"])
        return cat
