"""Decoded ``LabelFeedback`` records of one feedback partition, as columns.

A label names its prediction by event id (hashed here with ``schemas.event_id``, the
same hash decode keeps for predictions), the model (and optionally the version) and
carries a class name or a regression value, and the time it became known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from schemas.event_id import hash_event_ids

__all__ = ["LabelChunk", "LabelChunkBuilder"]


@dataclass(frozen=True, slots=True)
class LabelChunk:
    """Labels in log order. ``label_code`` indexes ``names`` (-1: a value label, in
    ``label_value``; NaN otherwise); ``model``/``version`` index ``names`` too."""

    offset: np.ndarray  # int64, the record's Kafka offset
    key: np.ndarray  # uint64 event id hash (never 0: an empty id is refused)
    label_time_ms: np.ndarray  # int64
    model: np.ndarray  # int32 into names
    version: np.ndarray  # int32 into names; -1 = not given
    label_code: np.ndarray  # int32 into names; -1 = a value
    label_value: np.ndarray  # float64; NaN = a class
    names: list[str]

    def __len__(self) -> int:
        return int(self.offset.shape[0])

    def take(self, rows: np.ndarray) -> LabelChunk:
        """The labels at ``rows`` (a mask or indices), sharing ``names``."""
        return LabelChunk(
            self.offset[rows],
            self.key[rows],
            self.label_time_ms[rows],
            self.model[rows],
            self.version[rows],
            self.label_code[rows],
            self.label_value[rows],
            self.names,
        )


class LabelChunkBuilder:
    """Collects decoded records; ``build()`` hashes every id in one vectorised call."""

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._offsets: list[int] = []
        self._times: list[int] = []
        self._model: list[int] = []
        self._version: list[int] = []
        self._code: list[int] = []
        self._value: list[float] = []
        self._names: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def _name(self, text: str) -> int:
        code = self._names.get(text)
        if code is None:
            code = self._names[text] = len(self._names)
        return code

    def add(self, record: dict[str, Any], offset: int) -> None:
        """Add one decoded ``LabelFeedback`` record (checked by the caller: an id)."""
        label = record["label"]
        self._ids.append(record["event_id"])
        self._offsets.append(offset)
        self._times.append(int(record["event_time_ms"]))
        self._model.append(self._name(record["model"]))
        version = record.get("model_version") or ""
        self._version.append(self._name(version) if version else -1)
        if isinstance(label, str):
            self._code.append(self._name(label))
            self._value.append(np.nan)
        else:
            self._code.append(-1)
            self._value.append(float(label))

    def build(self) -> LabelChunk:
        names = [""] * len(self._names)
        for text, code in self._names.items():
            names[code] = text
        return LabelChunk(
            offset=np.array(self._offsets, dtype=np.int64),
            key=hash_event_ids(self._ids),
            label_time_ms=np.array(self._times, dtype=np.int64),
            model=np.array(self._model, dtype=np.int32),
            version=np.array(self._version, dtype=np.int32),
            label_code=np.array(self._code, dtype=np.int32),
            label_value=np.array(self._value, dtype=np.float64),
            names=names,
        )
