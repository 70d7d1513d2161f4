"""Drift references from training: read the compacted references topic, bin each
document with this shard's own bins, and substitute it for the first-window reference
when /metrics is rendered.

The training reference never enters ``PartitionState``: the state (and its snapshots)
stays a pure function of the input log, and a reference published, replaced or deleted
later changes the drift gauges from the next render on, on every shard alike.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from aggregator.decode import SchemaResolver, SchemaSource
from aggregator.errors import DecodeError
from aggregator.state import DRIFT_BINS, StateConfig, StateView
from aggregator.state.binning import drift_bin as _drift_bin
from schemas.wire import SchemaId

__all__ = [
    "SOURCES",
    "ReferenceReader",
    "ReferenceUse",
    "TrainingReference",
    "bin_reference",
    "resolve_references",
]

log = logging.getLogger(__name__)

# Values of the ``source`` label of model_drift_reference_info.
SOURCES: Final = ("training", "file", "first_window")
_ALL_VERSIONS: Final = "*"
_MAX_FETCH_BYTES: Final = 32 * 1024 * 1024  # above the references topic's 16 MiB limit
_RECHECK_SECONDS: Final = 5.0  # how often a missing topic is looked for again


@dataclass(frozen=True, slots=True)
class TrainingReference:
    """One reference document binned with this shard's bins (None: column absent)."""

    model: str
    version: str
    created_ms: int
    rows: int
    score: np.ndarray | None  # counts per score bucket
    classes: dict[str, int] | None  # count per predicted class name
    pred_hist: np.ndarray | None  # counts per drift bin of the predicted values
    features: dict[str, np.ndarray]  # counts per drift bin, by feature name


def bin_reference(doc: Mapping[str, Any], config: StateConfig) -> TrainingReference:
    """Bin a ``DriftReference`` record exactly as live rows are binned.

    Scores go to the score buckets (``searchsorted(bounds, s, "left")``, scores outside
    [0, 1] dropped as live ones are rejected), numeric predictions and features to the
    asinh drift bins (non-finite values dropped); classes are counted by name and only
    get a column when a view is rendered (``resolve_references``).
    """
    model, version = str(doc.get("model", "")), str(doc.get("version", ""))
    if not model or not version:
        raise ValueError("model, version: must not be empty")
    score = np.asarray(doc.get("score") or [], dtype=np.float64)
    score = score[(score >= 0) & (score <= 1)]
    edges = np.asarray(config.score_bounds, dtype=np.float64)
    ns = len(config.score_bounds) + 1
    classes: dict[str, int] | None = None
    names = [str(c) for c in doc.get("prediction_classes") or []]
    if names:
        uniq, counts = np.unique(np.asarray(names, dtype=object), return_counts=True)
        classes = {str(u): int(n) for u, n in zip(uniq.tolist(), counts.tolist(), strict=True)}
    values = np.asarray(doc.get("prediction_values") or [], dtype=np.float64)
    values = values[np.isfinite(values)]
    features: dict[str, np.ndarray] = {}
    for item in doc.get("features") or []:
        arr = np.asarray(item.get("values") or [], dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        if arr.size and item.get("name"):
            features[str(item["name"])] = np.bincount(_drift_bin(arr), minlength=DRIFT_BINS)
    return TrainingReference(
        model=model,
        version=version,
        created_ms=int(doc.get("created_ms", 0)),
        rows=int(doc.get("rows", 0)),
        score=np.bincount(np.searchsorted(edges, score, "left"), minlength=ns)
        if score.size
        else None,
        classes=classes,
        pred_hist=np.bincount(_drift_bin(values), minlength=DRIFT_BINS) if values.size else None,
        features=features,
    )


@dataclass(frozen=True, slots=True)
class ReferenceUse:
    """The reference each model version of a view is rendered against."""

    reference: dict[str, np.ndarray]  # as StateView.reference
    score: np.ndarray  # (m,) the score has a reference
    prediction: np.ndarray  # (m,) the prediction (classes or values) has one
    features: np.ndarray  # (m, max_features) each feature has one
    source: list[str]  # per model version: one of SOURCES, or "" (no reference yet)


def _file_models(config: StateConfig) -> set[tuple[str, str]]:
    return {(model, version) for model, version, _ in config.reference_samples}


def resolve_references(
    v: StateView, config: StateConfig, refs: Mapping[tuple[str, str], TrainingReference]
) -> ReferenceUse:
    """Per model version of ``v``: its training reference (exact version first, then
    "*") in place of the state's own, else the state's (sample file or first window)."""
    m = len(v.entries)
    has = v.has_reference[:m]
    n_feat = v.reference["feat"].shape[1] if m else config.limits.max_features
    named = np.array([[bool(n) for n in e[5]] for e in v.entries], dtype=bool).reshape(m, -1)
    use = ReferenceUse(
        reference={k: a.copy() for k, a in v.reference.items()} if refs else v.reference,
        score=has.copy(),
        prediction=has.copy(),
        features=named[:, :n_feat] & has[:, None],
        source=[""] * m,
    )
    files = _file_models(config) if config.reference_samples else set()
    for i, e in enumerate(v.entries):
        model, version = e[0], e[1]
        ref = refs.get((model, version)) or refs.get((model, _ALL_VERSIONS))
        if ref is None:
            if has[i]:
                use.source[i] = (
                    "file"
                    if (model, version) in files or (model, _ALL_VERSIONS) in files
                    else "first_window"
                )
            continue
        use.source[i] = "training"
        r = use.reference
        r["score"][i] = 0 if ref.score is None else ref.score
        use.score[i] = ref.score is not None
        r["pred_class"][i] = 0
        r["pred_hist"][i] = 0
        if e[2]:  # regression
            use.prediction[i] = ref.pred_hist is not None
            if ref.pred_hist is not None:
                r["pred_hist"][i] = ref.pred_hist
        else:
            use.prediction[i] = ref.classes is not None
            if ref.classes is not None:
                _class_counts(r["pred_class"][i], e[4], ref.classes)
        r["feat"][i] = 0
        for f, name in enumerate(e[5]):
            hist = ref.features.get(name) if name else None
            use.features[i, f] = hist is not None
            if hist is not None:
                r["feat"][i, f] = hist
    return use


def _class_counts(row: np.ndarray, names: Sequence[str], counts: Mapping[str, int]) -> None:
    """Counts by the view's class columns; a class live traffic has not shown yet takes
    a free column (live count 0 there, as it should be), past the cap the last one."""
    column = {n: j for j, n in enumerate(names) if n}
    free = [j for j, n in enumerate(names[:-1]) if not n]
    for name, n in sorted(counts.items()):
        j = column.get(name)
        if j is None:
            j = free.pop(0) if free else len(names) - 1
            column[name] = j
        row[j] += n


class ReferenceReader:
    """Keeps the latest reference document per key of the references topic.

    It assigns every partition (no consumer group offsets: it reads from the beginning
    on each start, the topic being compacted), reads to the end in ``start`` (bounded),
    then follows the topic in its own thread. ``references()`` is safe from any thread.
    """

    def __init__(
        self,
        topic: str,
        kafka_config: Mapping[str, Any],
        config: StateConfig,
        registry: SchemaSource | None = None,
        *,
        group_id: str = "modelpulse-references",
    ) -> None:
        self.topic = topic
        self._config = config
        self._resolver = SchemaResolver(registry)  # its own: used from the reader thread
        self._conf = {
            **kafka_config,
            # Required by the client, never joined: partitions are assigned by hand.
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "fetch.max.bytes": _MAX_FETCH_BYTES,
            "max.partition.fetch.bytes": _MAX_FETCH_BYTES,
            "receive.message.max.bytes": _MAX_FETCH_BYTES + 1024 * 1024,
        }
        self._consumer: Consumer | None = None  # made in start(): nothing to close before
        self._refs: dict[tuple[str, str], TrainingReference] = {}
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._thread = threading.Thread(target=self._run, name="modelpulse-references")
        self._thread.daemon = True
        self._assigned = 0
        self._at_end: set[int] = set()
        self.applied = 0  # documents read (tests, logs)
        self.rejected = 0  # messages that were not a valid reference

    def references(self) -> dict[tuple[str, str], TrainingReference]:
        """The current references by (model, version); a snapshot, never mutated."""
        return self._refs

    def start(self, wait_seconds: float = 10.0) -> bool:
        """Start following the topic; True once what it held at start has been read."""
        self._consumer = Consumer(self._conf, logger=log)
        self._thread.start()
        caught_up = self._caught_up.wait(wait_seconds)
        if not caught_up:
            log.warning(
                "references topic %s not read to its end within %.0f s; drift uses the "
                "first-window reference until it is",
                self.topic,
                wait_seconds,
            )
        return caught_up

    def stop(self) -> None:
        """Ask the thread to finish (it closes its consumer); ``close`` waits for it."""
        self._stop.set()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and close the consumer, waiting at most ``timeout`` seconds."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("references reader did not stop within %.0f s; left behind", timeout)

    def _assign(self) -> bool:
        assert self._consumer is not None
        try:
            # Every topic: a request by name may auto-create it (not compacted).
            md = self._consumer.list_topics(timeout=5)
        except Exception as exc:  # broker unreachable: try again later
            log.debug("references topic metadata: %s", exc)
            return False
        found = md.topics.get(self.topic)
        if found is None or found.error is not None or not found.partitions:
            self._caught_up.set()  # nothing to read yet
            return False
        parts = sorted(found.partitions)
        self._consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
        self._assigned = len(parts)
        log.info("reading drift references from %s (%d partitions)", self.topic, len(parts))
        return True

    def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            while not self._stop.is_set():
                if not self._assigned and not self._assign():
                    self._stop.wait(_RECHECK_SECONDS)
                    continue
                for msg in consumer.consume(100, 0.2):
                    self._handle(msg)
        except Exception:
            log.exception("references reader failed; drift keeps the references it had")
        finally:
            self._caught_up.set()
            try:
                consumer.close()
            except Exception as exc:
                log.warning("references consumer close: %s", exc)

    def _handle(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                self._at_end.add(int(msg.partition() or 0))
                if len(self._at_end) >= self._assigned:
                    self._caught_up.set()
            else:
                log.warning("references topic: %s", err)
            return
        raw_key = msg.key()
        key = raw_key.decode("utf-8", "replace").split("\x00") if raw_key else []
        if len(key) != 2:
            self.rejected += 1
            log.warning("references: key %r is not model NUL version; ignored", raw_key)
            return
        value = msg.value()
        refs = dict(self._refs)
        if value is None:  # a tombstone: the reference is withdrawn
            refs.pop((key[0], key[1]), None)
            self._refs = refs
            return
        try:
            kind, record = self._resolver.read(value)
            if kind != SchemaId.DRIFT_REFERENCE:
                raise ValueError(f"schema kind {kind}, not a DriftReference")
            ref = bin_reference(record, self._config)
            if (ref.model, ref.version) != (key[0], key[1]):
                raise ValueError(f"key {key} does not match the document's model/version")
        except (DecodeError, ValueError, TypeError) as exc:
            self.rejected += 1
            log.warning("references: message at offset %s ignored: %s", msg.offset(), exc)
            return
        refs[(ref.model, ref.version)] = ref
        self._refs = refs  # replaced whole: a reader never sees a half-updated dict
        self.applied += 1
        log.info(
            "drift reference of %s/%s: %d rows, %d features",
            ref.model,
            ref.version,
            ref.rows,
            len(ref.features),
        )
