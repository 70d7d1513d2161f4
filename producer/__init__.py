"""modelpulse producer: publish one event per prediction to Kafka, off the hot path.

>>> from producer import PredictionPublisher, PublisherSettings
>>> with PredictionPublisher(PublisherSettings()) as pub:  # doctest: +SKIP
...     pub.publish("fraud", "v7", 0.004, prediction="fraud", score=0.97)
"""

from producer.errors import InvalidEvent, PublisherClosed, PublishError
from producer.publisher import PredictionPublisher, PublisherStats, Tracker
from producer.reference import ReferenceDoc, build_reference, publish_reference
from producer.settings import PublisherSettings

__all__ = [
    "InvalidEvent",
    "PredictionPublisher",
    "PublishError",
    "PublisherClosed",
    "PublisherSettings",
    "PublisherStats",
    "ReferenceDoc",
    "Tracker",
    "build_reference",
    "publish_reference",
]
