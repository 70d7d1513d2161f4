"""The state of one input partition, and the columns it ingests (pure: no Kafka).

``PartitionState`` is the front; the columns decode fills live in ``columns``.
"""

from aggregator.state.columns import MAX_ROWS_PER_ENVELOPE, Heartbeat, Marker, RowChunk
from aggregator.state.partition import (
    CALIBRATION_BINS,
    DRIFT_BINS,
    DRIFT_CENTERS,
    REJECT_REASONS,
    SEGMENT_ROLES,
    STATE_FORMAT,
    IngestResult,
    PartitionState,
    StateConfig,
    StateView,
    WindowAggregate,
    load_reference_file,
    score_bin_centers,
)

__all__ = [
    "CALIBRATION_BINS",
    "DRIFT_BINS",
    "DRIFT_CENTERS",
    "MAX_ROWS_PER_ENVELOPE",
    "REJECT_REASONS",
    "SEGMENT_ROLES",
    "STATE_FORMAT",
    "Heartbeat",
    "IngestResult",
    "Marker",
    "PartitionState",
    "RowChunk",
    "StateConfig",
    "StateView",
    "WindowAggregate",
    "load_reference_file",
    "score_bin_centers",
]
