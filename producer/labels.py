"""``modelpulse-labels``: send ground-truth labels from a CSV or JSON-lines file.

Each row names a prediction by its event id (the id ``publish()`` returned) and gives
its label; rows go through ``PredictionPublisher.label()``, so they are validated and
framed exactly as a service's own ``label()`` calls. Progress goes to stderr, the
summary to stdout.

    modelpulse-labels chargebacks.csv --model fraud
    python -m producer.labels labels.jsonl --bootstrap-servers kafka:9092
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from pydantic import ValidationError

from producer.errors import InvalidEvent
from producer.publisher import PredictionPublisher, PublisherStats
from producer.settings import PublisherSettings

__all__ = ["main"]

EXIT_OK = 0
EXIT_ROWS = 1  # some rows invalid or undelivered
EXIT_USAGE = 2  # bad arguments, unreadable file, missing columns, bad settings
EXIT_INTERRUPTED = 130

_COLUMNS = ("event_id", "label", "label_time", "model", "version")

_EPILOG = """\
input:
  CSV with a header row, or JSON lines (one object per line). Columns/keys:
    event_id    the prediction's id, as publish() returned it (required)
    label       the ground truth (required)
    label_time  when the label became known: epoch seconds or ISO 8601
                (naive times are UTC); default: now
    model       model name; default --model (required one way or the other)
    version     model version; default --model-version
  Other columns are ignored. Blank lines are skipped. The format follows the file
  name (.csv; .jsonl/.ndjson/.json), else the first character ('{' = JSON lines).

labels:
  JSON lines: a string or an integer is a class label, any other number a
  regression value. CSV: every label is a class label, unless --label-type value.
  --label-type class / value forces one reading for both formats.

routing:
  Labels go to the feedback topic (default prediction-feedback), keyed by model
  name with the same murmur2 partitioner as the predictions, so a label lands in
  the partition number its prediction has when both topics have the same number
  of partitions.

settings:
  Every MODELPULSE_* variable of the producer library applies (e.g.
  MODELPULSE_BOOTSTRAP_SERVERS, MODELPULSE_SCHEMA_REGISTRY_URL,
  MODELPULSE_SECURITY_PROTOCOL, MODELPULSE_KAFKA='{"client.id": "labels"}');
  the options above win over them.

exit codes:
  0    every row was valid and acknowledged by the broker
  1    some rows were invalid (listed with their line numbers) or not delivered
  2    usage error: bad option or setting, unreadable file, missing columns
  130  interrupted (what was read so far is flushed and summarised)

example:
  $ cat chargebacks.csv
  event_id,label,label_time
  0x38c8529dfca8d900e4e1c0,fraud,1765000000
  0x38c8529dfca8d900e4e1c1,legit,2025-12-06T10:00:00Z
  $ modelpulse-labels chargebacks.csv --model fraud --bootstrap-servers kafka:9092
  rows read: 2
  sent: 2
  invalid: 0
  undelivered: 0
"""


class _InputError(Exception):
    """The input as a whole cannot be read (exit code 2)."""


@dataclass
class _Run:
    """What happened to the rows so far."""

    rows: int = 0
    invalid: int = 0
    invalid_listed: list[tuple[int, str]] = field(default_factory=list)
    max_listed: int = 20

    def bad(self, line: int, reason: str) -> None:
        self.invalid += 1
        if len(self.invalid_listed) < self.max_listed:
            self.invalid_listed.append((line, reason))


class _Progress:
    """One line on stderr: rewritten in place on a terminal, periodic lines otherwise."""

    def __init__(self, stream: TextIO, total_chars: int | None, every_seconds: float) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._total = total_chars
        self._every = 0.0 if every_seconds <= 0 else 0.2 if self._tty else every_seconds
        self._start = time.monotonic()
        self._next = self._start + self._every
        self._shown = False

    def due(self) -> bool:
        now = time.monotonic()
        if self._every <= 0 or now < self._next:
            return False
        self._next = now + self._every
        return True

    def show(self, run: _Run, stats: PublisherStats, chars: int, *, done: bool = False) -> None:
        if self._every <= 0:
            return
        elapsed = max(time.monotonic() - self._start, 1e-9)
        line = (
            f"{run.rows:,} rows read, {stats.labels_sent:,} sent, {run.invalid:,} invalid, "
            f"{stats.labels_failed + stats.labels_dropped:,} failed, "
            f"{run.rows / elapsed:,.0f} rows/s"
        )
        if self._total:
            fraction = 1.0 if done else min(chars / self._total, 0.999)
            bar = "#" * int(fraction * 20)
            line = f"[{bar:<20}] {fraction * 100:3.0f}% {line}"
        if self._tty:
            self._stream.write("\r\x1b[K" + line + ("\n" if done else ""))
            self._shown = not done
        elif not done or self._shown or run.rows:
            self._stream.write(line + "\n")
        self._stream.flush()

    def end(self) -> None:
        if self._tty and self._shown:
            self._stream.write("\n")
            self._stream.flush()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modelpulse-labels",
        description="Publish ground-truth labels of earlier predictions (by event id) from a\n"
        "CSV or JSON-lines file to the feedback topic, as LabelFeedback records.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", help="CSV or JSON-lines file of labels; '-' reads stdin")
    p.add_argument(
        "--format",
        choices=("auto", "csv", "jsonl"),
        default="auto",
        help="input format (default: from the file name, else the first character)",
    )
    p.add_argument("--model", default="", help="model of rows without a model column/key")
    p.add_argument(
        "--model-version", default="", help="version of rows without a version column/key"
    )
    p.add_argument(
        "--label-type",
        choices=("auto", "class", "value"),
        default="auto",
        help="class: every label is a class label; value: a regression value (a number); "
        "auto (default): see 'labels' below",
    )
    p.add_argument(
        "--bootstrap-servers",
        help="Kafka bootstrap servers (default: MODELPULSE_BOOTSTRAP_SERVERS)",
    )
    p.add_argument("--feedback-topic", help="topic of the labels (default: prediction-feedback)")
    p.add_argument(
        "--schema-registry-url",
        help="Confluent-compatible registry to register LabelFeedback with (default: the "
        "fixed schema id 4)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the broker's acknowledgements at the end (default 60)",
    )
    p.add_argument(
        "--max-listed",
        type=int,
        default=20,
        help="invalid rows listed in the summary (all are counted; default 20)",
    )
    p.add_argument(
        "--progress-seconds",
        type=float,
        default=5.0,
        help="interval of the progress lines when stderr is not a terminal; 0 turns "
        "progress off (default 5)",
    )
    return p


def _rows(stream: Iterable[str], fmt: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, row) pairs; a row that cannot be parsed is its reason, a str."""
    if fmt == "jsonl":
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                yield number, f"not JSON: {exc}"
                continue
            if isinstance(obj, dict):
                yield number, obj
            else:
                yield number, f"not a JSON object but a {type(obj).__name__}"
        return
    reader = csv.reader(stream)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise _InputError(f"line 1: {exc}") from None
    names = [h.strip() for h in header]
    missing = [c for c in ("event_id", "label") if c not in names]
    if missing:
        raise _InputError(
            f"the CSV header {header!r} has no {' and no '.join(missing)} column "
            f"(columns: {', '.join(_COLUMNS)})"
        )
    last = reader.line_num
    while True:
        start = last + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            last = reader.line_num
            yield start, f"bad CSV: {exc}"
            continue
        last = reader.line_num
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        if len(fields) != len(names):
            yield start, f"expected {len(names)} fields (as the header), got {len(fields)}"
            continue
        yield start, dict(zip(names, fields, strict=True))


def _label_time(value: Any) -> Any:
    """Epoch seconds or ISO 8601 text; anything else is left to ``label()`` to refuse."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidEvent(
                "label_time", f"{value!r} is neither epoch seconds nor ISO 8601"
            ) from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _label(value: Any, kind: str) -> Any:
    if value is None or value == "":
        raise InvalidEvent("label", "missing")
    if kind == "value":
        if isinstance(value, bool):
            raise InvalidEvent("label", f"a regression value must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InvalidEvent(
                "label", f"a regression value must be a number, got {value!r}"
            ) from None
        if not math.isfinite(number):
            raise InvalidEvent("label", f"a regression value must be finite, got {value!r}")
        return number
    if kind == "class":
        if isinstance(value, bool | int | str):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise InvalidEvent("label", f"a class label must be a string or integer, got {value!r}")
    return value  # auto: the JSON type decides; label() refuses the rest


def _send(pub: PredictionPublisher, row: dict[str, Any], args: argparse.Namespace) -> None:
    """Validate one row and hand it to ``label()``; raises InvalidEvent naming the field."""
    event_id = row.get("event_id")
    if event_id is None or event_id == "":
        raise InvalidEvent("event_id", "missing")
    if isinstance(event_id, int) and not isinstance(event_id, bool):
        event_id = str(event_id)  # JSON written by a system with numeric ids
    if not isinstance(event_id, str):
        raise InvalidEvent("event_id", f"must be a string, got {event_id!r}")
    model = row.get("model") or args.model
    if not model:
        raise InvalidEvent("model", "missing (no model column or key, and no --model)")
    version = row.get("version") or args.model_version
    label = _label(row.get("label"), args.label_type)
    pub.label(model, event_id, label, _label_time(row.get("label_time")), version)


def _open(path: str, fmt: str) -> tuple[TextIO, str, int | None]:
    """The input stream, its format and its size in characters if known (for the bar)."""
    if path == "-":
        stream: TextIO = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", newline="")
        size = None
    else:
        try:
            stream = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 - closed by main
            size = os.fstat(stream.fileno()).st_size
        except OSError as exc:
            raise _InputError(f"{path}: {exc.strerror or exc}") from None
    if fmt == "auto":
        lower = path.lower()
        if lower.endswith(".csv"):
            fmt = "csv"
        elif lower.endswith((".jsonl", ".ndjson", ".json")):
            fmt = "jsonl"
        else:
            peek_fn = getattr(stream.buffer, "peek", None)
            peek: bytes = peek_fn(64) if peek_fn is not None else b""
            fmt = "jsonl" if peek.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{") else "csv"
    return stream, fmt, size


class _Counting:
    """Iterate a text stream's lines, counting the characters read (for the progress bar)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.chars = 0

    def __iter__(self) -> Iterator[str]:
        for line in self._stream:
            self.chars += len(line)
            yield line


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``modelpulse-labels``; returns the exit code."""
    args = _parser().parse_args(argv)
    # The library logs delivery errors (broker unreachable...): show them, briefly.
    logging.basicConfig(level=logging.WARNING, format="modelpulse-labels: %(message)s")
    overrides: dict[str, Any] = {"on_full": "block", "block_timeout_seconds": 3600.0}
    for key in ("bootstrap_servers", "feedback_topic", "schema_registry_url"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    try:
        settings = PublisherSettings(**overrides)
    except ValidationError as exc:
        print(f"modelpulse-labels: bad settings: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        stream, fmt, size = _open(args.file, args.format)
    except _InputError as exc:
        print(f"modelpulse-labels: {exc}", file=sys.stderr)
        return EXIT_USAGE
    run = _Run(max_listed=max(args.max_listed, 0))
    progress = _Progress(sys.stderr, size, args.progress_seconds)
    counting = _Counting(stream)
    interrupted = False
    try:
        pub = PredictionPublisher(settings)
    except Exception as exc:  # registry unreachable, bad librdkafka setting...
        stream.close()
        print(f"modelpulse-labels: cannot start the publisher: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        for line, row in _rows(counting, fmt):
            run.rows += 1
            if isinstance(row, str):
                run.bad(line, row)
            else:
                try:
                    _send(pub, row, args)
                except InvalidEvent as exc:
                    run.bad(line, str(exc))
            if progress.due():
                progress.show(run, pub.stats(), counting.chars)
    except _InputError as exc:
        pub.close(0.1)
        progress.end()
        print(f"modelpulse-labels: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UnicodeDecodeError as exc:
        pub.close(0.1)
        progress.end()
        print(f"modelpulse-labels: not UTF-8 text: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stream.close()
    stats = pub.close(args.timeout)
    progress.show(run, stats, counting.chars, done=True)
    undelivered = stats.labels_failed + stats.labels_dropped + stats.labels_queued
    out = sys.stdout
    out.write(f"rows read: {run.rows}\n")
    out.write(f"sent: {stats.labels_sent}\n")
    out.write(f"invalid: {run.invalid}\n")
    for line, reason in run.invalid_listed:
        out.write(f"  line {line}: {reason}\n")
    if run.invalid > len(run.invalid_listed):
        out.write(f"  ... and {run.invalid - len(run.invalid_listed)} more invalid rows\n")
    out.write(f"undelivered: {undelivered}\n")
    if undelivered:
        out.write(
            f"  {stats.labels_failed} failed, {stats.labels_queued} still queued at the "
            f"{args.timeout:g} s timeout, {stats.labels_dropped} dropped "
            "(see the log lines above for the broker's error)\n"
        )
    out.flush()
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_ROWS if run.invalid or undelivered else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
