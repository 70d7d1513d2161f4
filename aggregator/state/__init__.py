"""The state of one input partition, and the columns it ingests (pure: no Kafka).

``PartitionState`` is the front. The arrays it keeps are the rows of one table,
``measures.MEASURES``: adding a measure is a row there and its bin function
(docs/architecture.md, "Adding a window measure").
"""

from aggregator.state.binning import DRIFT_CENTERS, score_bin_centers
from aggregator.state.columns import MAX_ROWS_PER_ENVELOPE, Heartbeat, Marker, RowChunk
from aggregator.state.config import (
    CALIBRATION_BINS,
    DRIFT_BINS,
    REJECT_REASONS,
    SEGMENT_ROLES,
    STATE_FORMAT,
    StateConfig,
)
from aggregator.state.drift import load_reference_file
from aggregator.state.measures import MEASURES, Measure
from aggregator.state.panes import WindowAggregate
from aggregator.state.partition import IngestResult, PartitionState, StateView

__all__ = [
    "CALIBRATION_BINS",
    "DRIFT_BINS",
    "DRIFT_CENTERS",
    "MAX_ROWS_PER_ENVELOPE",
    "MEASURES",
    "REJECT_REASONS",
    "SEGMENT_ROLES",
    "STATE_FORMAT",
    "Heartbeat",
    "IngestResult",
    "Marker",
    "Measure",
    "PartitionState",
    "RowChunk",
    "StateConfig",
    "StateView",
    "WindowAggregate",
    "load_reference_file",
    "score_bin_centers",
]
