"""Drift references from training: sample the training data once, publish it, and the
aggregator measures drift against it instead of against the first window of traffic.

A reference document (``DriftReference``, ``schemas/drift_reference.avsc``) carries raw
sample values, at most ``sample_limit`` per column drawn without replacement with a
fixed seed, not histograms: the aggregator bins them with its own score buckets and
drift bins, so changing ``--score-buckets`` never needs a new reference.

>>> doc = build_reference("fraud", "v7", scores=[0.1, 0.9], predictions=["a", "b"],
...                       features={"amount": [12.0, float("nan")]})
>>> doc["rows"], doc["prediction_classes"], doc["features"][0]["values"]
(2, ['a', 'b'], [12.0])
>>> publish_reference(doc, PublisherSettings())  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, TypedDict

import numpy as np
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from fastavro import schemaless_writer
from pydantic import ValidationError

from producer.settings import PublisherSettings
from schemas.registry import record_subject
from schemas.wire import SchemaId, frame, parsed_schema, raw_schema

__all__ = [
    "ALL_VERSIONS",
    "DEFAULT_SAMPLE_LIMIT",
    "DEFAULT_SEED",
    "REFERENCE_MAX_BYTES",
    "ReferenceDoc",
    "build_reference",
    "encode_reference",
    "main",
    "publish_reference",
    "reference_key",
]

ALL_VERSIONS: Final = "*"  # a reference for every version of the model without its own
DEFAULT_SAMPLE_LIMIT: Final = 10_000
DEFAULT_SEED: Final = 20_240_601
# The references topic is created with this max.message.bytes: 10k doubles a column is
# 80 kB, so a model with dozens of features passes the broker's 1 MB default.
REFERENCE_MAX_BYTES: Final = 16 * 1024 * 1024
EXIT_OK, EXIT_USAGE, EXIT_FAILED = 0, 2, 1


class FeatureSample(TypedDict):
    name: str
    values: list[float]


class ReferenceDoc(TypedDict):
    """One ``DriftReference`` record, as written to the references topic."""

    model: str
    version: str
    created_ms: int
    rows: int
    sample_limit: int
    seed: int
    score: list[float]
    prediction_classes: list[str]
    prediction_values: list[float]
    features: list[FeatureSample]


def _sample(values: np.ndarray, limit: int, seed: int) -> np.ndarray:
    # One generator per column: a column's sample does not depend on the others.
    if len(values) <= limit:
        return values
    keep = np.sort(np.random.default_rng(seed).choice(len(values), limit, replace=False))
    sampled: np.ndarray = values[keep]
    return sampled


def _floats(name: str, values: Iterable[Any]) -> np.ndarray:
    try:
        arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: not numbers ({exc})") from None
    if arr.ndim != 1:
        raise ValueError(f"{name}: must be one-dimensional, got shape {arr.shape}")
    return arr


def build_reference(
    model: str,
    version: str = ALL_VERSIONS,
    *,
    scores: Iterable[Any] | None = None,
    predictions: Iterable[Any] | None = None,
    features: Mapping[str, Iterable[Any]] | None = None,
    sample_limit: int = DEFAULT_SAMPLE_LIMIT,
    seed: int = DEFAULT_SEED,
) -> ReferenceDoc:
    """The reference document of ``model``/``version`` from training-time columns.

    ``scores`` are probabilities in [0, 1] (NaN: missing, dropped); ``predictions`` are
    class names (str) or regression values (numbers), not both; ``features`` maps a name
    to its values (NaN/inf: missing, dropped, as the aggregator drops them live). Each
    column keeps at most ``sample_limit`` values, drawn with ``seed``. ``version`` "*"
    serves every version of the model that has no reference of its own.
    """
    if not model:
        raise ValueError("model: must not be empty")
    if not version:
        raise ValueError("version: must not be empty (use '*' for every version)")
    if sample_limit < 1:
        raise ValueError(f"sample_limit: must be >= 1, got {sample_limit}")
    rows = 0
    score: list[float] = []
    if scores is not None:
        arr = _floats("scores", scores)
        rows = max(rows, len(arr))
        arr = arr[~np.isnan(arr)]
        bad = arr[(arr < 0) | (arr > 1) | ~np.isfinite(arr)]
        if bad.size:
            raise ValueError(f"scores: must lie in [0, 1], got {bad[0]!r}")
        score = _sample(arr, sample_limit, seed).tolist()
    classes: list[str] = []
    values: list[float] = []
    if predictions is not None:
        preds = list(predictions.tolist() if isinstance(predictions, np.ndarray) else predictions)
        rows = max(rows, len(preds))
        named = [p for p in preds if isinstance(p, str)]
        if named and len(named) != len(preds):
            raise ValueError("predictions: mix class names (str) and numbers; use one kind")
        if named:
            picked = _sample(np.asarray(named, dtype=object), sample_limit, seed)
            classes = [str(p) for p in picked]
            if any(not c for c in classes):
                raise ValueError("predictions: empty class name")
        elif preds:
            arr = _floats("predictions", preds)
            values = _sample(arr[np.isfinite(arr)], sample_limit, seed).tolist()
    feats: list[FeatureSample] = []
    for name, column in (features or {}).items():
        if not name:
            raise ValueError("features: empty feature name")
        arr = _floats(f"features[{name!r}]", column)
        rows = max(rows, len(arr))
        kept = _sample(arr[np.isfinite(arr)], sample_limit, seed)
        feats.append({"name": str(name), "values": kept.tolist()})
    if not (score or classes or values or any(f["values"] for f in feats)):
        raise ValueError("no column with a value: give scores, predictions or features")
    return {
        "model": model,
        "version": version,
        "created_ms": int(time.time() * 1000),
        "rows": rows,
        "sample_limit": sample_limit,
        "seed": seed,
        "score": score,
        "prediction_classes": classes,
        "prediction_values": values,
        "features": feats,
    }


def reference_key(model: str, version: str) -> bytes:
    """The compaction key: the latest document per model and version wins."""
    return f"{model}\x00{version}".encode()


def encode_reference(doc: ReferenceDoc, schema_id: int = SchemaId.DRIFT_REFERENCE) -> bytes:
    """The Confluent-framed Avro value of ``doc``."""
    out = io.BytesIO()
    schemaless_writer(out, parsed_schema(SchemaId.DRIFT_REFERENCE), dict(doc))
    return frame(schema_id, out.getvalue())


def _schema_id(settings: PublisherSettings) -> int:
    registry = settings.registry_client()
    if registry is None:
        return int(SchemaId.DRIFT_REFERENCE)
    raw = raw_schema(SchemaId.DRIFT_REFERENCE)
    return registry.register(record_subject(raw), raw)


def _ensure_topic(admin: AdminClient, topic: str, timeout: float) -> None:
    # Metadata of every topic: asking for this one by name would let a broker with
    # auto.create.topics.enable create it, not compacted, before we do.
    md = admin.list_topics(timeout=timeout)
    found = md.topics.get(topic)
    if found is not None and found.error is None:
        return
    spec = NewTopic(
        topic,
        num_partitions=1,
        config={"cleanup.policy": "compact", "max.message.bytes": str(REFERENCE_MAX_BYTES)},
    )
    for fut in admin.create_topics([spec]).values():
        try:
            fut.result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def publish_reference(
    doc: ReferenceDoc, settings: PublisherSettings, *, timeout: float = 30.0
) -> int:
    """Write ``doc`` to ``settings.reference_topic`` (created compacted if missing),
    keyed by model and version; returns the value's size in bytes. Raises
    ``RuntimeError`` if the broker did not acknowledge it within ``timeout`` seconds."""
    value = encode_reference(doc, _schema_id(settings))
    if len(value) > REFERENCE_MAX_BYTES:
        raise ValueError(
            f"reference of {doc['model']}/{doc['version']} is {len(value)} bytes, over "
            f"{REFERENCE_MAX_BYTES}: lower sample_limit or the number of features"
        )
    conf = settings.kafka_config()
    _ensure_topic(AdminClient(settings.librdkafka_config()), settings.reference_topic, timeout)
    producer = Producer({**conf, "message.max.bytes": REFERENCE_MAX_BYTES + 4096})
    errors: list[KafkaError] = []

    def delivered(err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            errors.append(err)

    producer.produce(
        settings.reference_topic,
        value,
        key=reference_key(doc["model"], doc["version"]),
        on_delivery=delivered,
    )
    if producer.flush(timeout):
        raise RuntimeError(f"reference not acknowledged within {timeout:g} s")
    if errors:
        raise RuntimeError(f"reference not written to {settings.reference_topic}: {errors[0]}")
    return len(value)


# -- the CLI -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modelpulse-reference",
        description="Publish the drift reference of a model version from its training data: "
        "a CSV (or Parquet, if pyarrow is installed) with a 'score' column, a 'prediction' "
        "column and feature columns. The aggregator then measures drift against it.",
    )
    p.add_argument("file", help="CSV file (.parquet: Parquet), header row required")
    p.add_argument("--model", required=True, help="model name, as in publish()")
    p.add_argument("--version", default=ALL_VERSIONS, help="model version; '*': every version")
    p.add_argument(
        "--features",
        default=None,
        help="comma-separated feature columns (default: every column but score/prediction)",
    )
    p.add_argument("--score-column", default="score", help="column of scores (absent: none)")
    p.add_argument(
        "--prediction-column", default="prediction", help="column of predictions (absent: none)"
    )
    p.add_argument(
        "--sample-limit", type=int, default=DEFAULT_SAMPLE_LIMIT, help="values kept per column"
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the sampling")
    p.add_argument("--bootstrap-servers", default=None, help="Kafka (default: settings/env)")
    p.add_argument("--reference-topic", default=None, help="default modelpulse-references")
    p.add_argument("--schema-registry-url", default=None)
    p.add_argument("--dry-run", action="store_true", help="build and summarise, do not publish")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the broker")
    return p


def _read_columns(path: str) -> dict[str, list[Any]]:
    if path.endswith((".parquet", ".pq")):
        try:
            # Optional, not a dependency: looked up by name so nothing requires it.
            pq: Any = importlib.import_module("pyarrow.parquet")
        except ImportError:
            raise ValueError(
                f"{path}: reading Parquet needs pyarrow (pip install pyarrow), which "
                "modelpulse does not install; or convert the file to CSV"
            ) from None
        table: Any = pq.read_table(path)
        return {str(k): list(v) for k, v in table.to_pydict().items()}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"{path}: empty file (a header row is needed)")
        cols: dict[str, list[Any]] = {name: [] for name in reader.fieldnames}
        for row in reader:
            for name, column in cols.items():
                column.append(row.get(name))
    return cols


def _numbers(path: str, name: str, raw: Sequence[Any]) -> list[float]:
    out = []
    for i, v in enumerate(raw):
        if v is None or v == "":
            out.append(math.nan)
            continue
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise ValueError(f"{path}: column {name!r}, row {i + 1}: not a number: {v!r}") from None
    return out


def _predictions(raw: Sequence[Any]) -> list[Any]:
    # Numbers in a CSV are text: all-numeric means regression, else class names.
    present = [v for v in raw if v is not None and v != ""]
    try:
        return [float(v) for v in present]
    except (TypeError, ValueError):
        return [str(v) for v in present]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``modelpulse-reference``; returns the exit code."""
    args = _parser().parse_args(argv)
    err = sys.stderr
    try:
        cols = _read_columns(args.file)
        if args.features is not None:
            wanted = [n.strip() for n in args.features.split(",") if n.strip()]
            missing = [n for n in wanted if n not in cols]
            if missing:
                raise ValueError(f"{args.file}: no column {missing[0]!r} (--features)")
        else:
            wanted = [n for n in cols if n not in (args.score_column, args.prediction_column)]
        scores = cols.get(args.score_column)
        preds = cols.get(args.prediction_column)
        doc = build_reference(
            args.model,
            args.version,
            scores=None if scores is None else _numbers(args.file, args.score_column, scores),
            predictions=None if preds is None else _predictions(preds),
            features={n: _numbers(args.file, n, cols[n]) for n in wanted},
            sample_limit=args.sample_limit,
            seed=args.seed,
        )
    except (OSError, ValueError) as exc:
        print(f"modelpulse-reference: {exc}", file=err)
        return EXIT_USAGE
    out = sys.stdout
    out.write(f"model: {doc['model']} version: {doc['version']}\n")
    out.write(f"rows: {doc['rows']} (at most {doc['sample_limit']} sampled per column)\n")
    out.write(f"score: {len(doc['score'])} values\n")
    if doc["prediction_classes"]:
        out.write(
            f"prediction: {len(doc['prediction_classes'])} values, "
            f"{len(set(doc['prediction_classes']))} classes\n"
        )
    else:
        out.write(f"prediction: {len(doc['prediction_values'])} values (numeric)\n")
    out.write(f"features: {len(doc['features'])}\n")
    for f in doc["features"]:
        out.write(f"  {f['name']}: {len(f['values'])} values\n")
    out.write(
        "bins: chosen by the aggregator (score buckets; 64 asinh drift bins for "
        "features and numeric predictions)\n"
    )
    if args.dry_run:
        out.write("dry run: not published\n")
        return EXIT_OK
    overrides: dict[str, Any] = {}
    for key in ("bootstrap_servers", "reference_topic", "schema_registry_url"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    try:
        settings = PublisherSettings(**overrides)
    except ValidationError as exc:
        print(f"modelpulse-reference: bad settings: {exc}", file=err)
        return EXIT_USAGE
    try:
        size = publish_reference(doc, settings, timeout=args.timeout)
    except Exception as exc:  # broker unreachable, registry down, too large...
        print(f"modelpulse-reference: not published: {exc}", file=err)
        return EXIT_FAILED
    out.write(f"published to {settings.reference_topic}: {size} bytes\n")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
