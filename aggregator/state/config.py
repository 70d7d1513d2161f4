"""What shapes the state of a partition: constants, reject reasons and ``StateConfig``."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Final

from aggregator.catalog import MACRO, OVERFLOW, Limits
from aggregator.join.joiner import JoinLimits
from aggregator.state.columns import MAX_ROWS_PER_ENVELOPE

N_OUTCOMES: Final = 5  # ok, error, timeout, rejected, unknown (schemas.wire.OUTCOMES)
OK: Final = 0
_VALID_OUTCOMES: Final = 4  # codes >= 4 ("unknown" or newer) are rejected
DRIFT_BINS: Final = 64
RESOURCE_TTL_MS: Final = 600_000  # an instance silent this long (event time) is dropped
MAX_INSTANCES: Final = 256  # resource series per partition
# Reliability bins of the score: (0.1 (k - 1), 0.1 k], the first one from 0 inclusive,
# as sklearn.calibration.calibration_curve(n_bins=10) cuts them.
CALIBRATION_BINS: Final = 10
# Buckets (seconds) of the label delay histogram: label time - prediction time, from a
# second (a click) to a month (a chargeback).
LABEL_DELAY_BOUNDS: Final = (
    1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0, 259200.0, 604800.0,
    1209600.0, 2592000.0,
)  # fmt: skip
# Layout of a snapshot beyond the measure table (whose names, shapes and kinds are
# hashed into the digest by themselves): bump it when the snapshot's own fields change,
# so an old snapshot takes the config-changed path (ConfigMismatch) and is never half
# restored.
STATE_FORMAT: Final = 4
# Per-segment quality counts, by role: rows whose label is the class (actual), whose
# prediction is (predicted), and both (correct, a true positive of the class).
SEGMENT_ROLES: Final = ("actual", "predicted", "correct")

# Reasons a row (or a heartbeat, or a whole envelope) is rejected and dead-lettered;
# the position is the code. Append only: snapshots store the counts by name, but the
# codes travel in ``IngestResult``.
REJECT_REASONS: Final = (
    "invalid_latency",
    "unknown_outcome",
    "invalid_score",
    "invalid_event_time",
    "kind_mismatch",
    "late",
    "name_too_long",
    "reserved_name",
    "empty_model",
    "invalid_value",
    "invalid_heartbeat",
    "envelope_too_large",  # raised by decode_batch as a DecodeError, before any column
)
(
    _R_LATENCY,
    _R_OUTCOME,
    _R_SCORE,
    _R_TIME,
    _R_KIND,
    _R_LATE,
    _R_NAME_LONG,
    _R_RESERVED,
    _R_EMPTY_MODEL,
    _R_VALUE,
    _R_HEARTBEAT,
    _R_ENVELOPE,
) = range(len(REJECT_REASONS))

# Largest magnitude of a regression prediction/label or a latency: beyond it a square
# (RMSE) or a running sum could overflow to inf and poison the cumulative sums for good.
MAX_ABS_VALUE: Final = 1e100
# Names the exposition itself uses as label values: a class "macro" would collide with
# the macro average, any name "__overflow__" with the overflow bucket of a cap.
RESERVED_NAMES: Final = frozenset({OVERFLOW})
RESERVED_CLASSES: Final = frozenset({OVERFLOW, MACRO})
MAX_GPUS: Final = 64  # GPUs in one heartbeat; more is a broken or hostile sender
SLICE_ROWS: Final = 65_536  # rows per ingest step: bounds the temporaries of one call


@dataclass(frozen=True, slots=True)
class StateConfig:
    """What shapes the state; its hash guards snapshots against config changes."""

    pane_ms: int = 10_000
    windows_ms: tuple[int, ...] = (60_000, 300_000, 3_600_000)
    lateness_ms: int = 10_000
    max_future_ms: int = 300_000
    latency_bounds: tuple[float, ...] = (
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
        2.5,
        5.0,
        10.0,
    )
    score_bounds: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 21))
    error_bounds: tuple[float, ...] = (
        -10.0,
        -5.0,
        -2.5,
        -1.0,
        -0.5,
        -0.25,
        -0.1,
        0.0,
        0.1,
        0.25,
        0.5,
        1.0,
        2.5,
        5.0,
        10.0,
    )
    drift_reference_ms: int = 300_000
    limits: Limits = field(default_factory=Limits)
    # Sample values per model (see ``load_reference_file``); not part of the digest:
    # it only shapes drift gauges, which are recomputed from panes at every render.
    reference_samples: tuple[tuple[str, str, str], ...] = ()
    # Input limits: not part of the digest either. They shape no array, so a snapshot
    # stays valid when they change; the new limit applies from the next message on.
    max_name_length: int = 256
    max_rows_per_envelope: int = MAX_ROWS_PER_ENVELOPE
    # The label join (time to live, waits, caps), None when no feedback topic is read:
    # not in the digest, the stores are restored when present and start empty if not.
    join: JoinLimits | None = None

    def __post_init__(self) -> None:
        if self.pane_ms <= 0:
            raise ValueError("pane_ms: must be > 0")
        for w in self.windows_ms:
            if w <= 0 or w % self.pane_ms:
                raise ValueError(
                    f"windows_ms: {w} is not a positive multiple of pane {self.pane_ms}"
                )
        if self.drift_reference_ms % self.pane_ms or self.drift_reference_ms > max(self.windows_ms):
            raise ValueError(
                "drift_reference_ms: a multiple of the pane, at most the longest window"
            )
        if self.max_name_length < 1 or self.max_rows_per_envelope < 1:
            raise ValueError("max_name_length, max_rows_per_envelope: must be >= 1")
        for name in ("latency_bounds", "score_bounds", "error_bounds"):
            b = getattr(self, name)
            if not b or any(not math.isfinite(x) for x in b) or list(b) != sorted(set(b)):
                raise ValueError(f"{name}: must be finite and strictly increasing")

    @property
    def ring(self) -> int:
        return max(self.windows_ms) // self.pane_ms + -(-self.lateness_ms // self.pane_ms) + 2

    def digest(self) -> str:
        """Hash of what shapes the arrays: this config and the measure table."""
        from aggregator.state.measures import table_signature  # noqa: PLC0415 (cycle)

        fields = asdict(self)
        for name in ("reference_samples", "max_name_length", "max_rows_per_envelope", "join"):
            fields.pop(name)
        fields["state_format"] = STATE_FORMAT
        fields["measures"] = table_signature(self)
        doc = json.dumps(fields, sort_keys=True, default=list)
        return hashlib.sha256(doc.encode()).hexdigest()[:16]
