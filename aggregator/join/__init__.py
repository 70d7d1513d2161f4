"""Labels joined to their predictions by event id: the pure, per-partition stores.

``PendingStore.predictions`` holds predictions waiting for a label and
``PendingStore.labels`` labels that arrived before their prediction; both snapshot
to chunks that fit Kafka's message size (see ``pending`` and ``chunks``).
"""

from aggregator.join.chunks import CHUNK_FORMAT, DEFAULT_MAX_BYTES, SnapshotError, chunk_header
from aggregator.join.pending import (
    LABEL_COLUMNS,
    PREDICTION_COLUMNS,
    Columns,
    InsertResult,
    PendingStore,
)

__all__ = [
    "CHUNK_FORMAT",
    "DEFAULT_MAX_BYTES",
    "LABEL_COLUMNS",
    "PREDICTION_COLUMNS",
    "Columns",
    "InsertResult",
    "PendingStore",
    "SnapshotError",
    "chunk_header",
]
