"""modelpulse aggregator: Kafka prediction events -> exact windowed metrics on /metrics.

>>> from aggregator import AggregatorSettings, Shard
>>> Shard(AggregatorSettings(http_port=9464)).run()  # doctest: +SKIP

``Shard`` (the Kafka edge) is imported lazily so that the pure core (decode, state,
metrics) can be used without loading the Kafka client.
"""

from typing import TYPE_CHECKING, Any

from aggregator.errors import AggregatorError, ConfigMismatch, DecodeError
from aggregator.settings import AggregatorSettings
from aggregator.state import PartitionState, StateConfig

if TYPE_CHECKING:
    from aggregator.shard import Shard

__all__ = [
    "AggregatorError",
    "AggregatorSettings",
    "ConfigMismatch",
    "DecodeError",
    "PartitionState",
    "Shard",
    "StateConfig",
]


def __getattr__(name: str) -> Any:
    if name == "Shard":
        from aggregator.shard import Shard  # noqa: PLC0415

        return Shard
    raise AttributeError(f"module 'aggregator' has no attribute {name!r}")
