"""Snapshots of a ``PendingStore`` as records that fit Kafka's message size.

A store of 10M entries is ~400 MB; Kafka takes ~1 MB per record by default. So a
snapshot is a list of chunks, each at most ``max_bytes``, to be written as records
keyed by (partition, chunk index) on the compacted state topic, with a manifest
naming ``count`` and ``digest`` written after them. Each chunk is self-describing::

    b"MPJS" | u32 big-endian header length | JSON header | body

The header holds the format, the snapshot's ``digest`` (crc32 of every body in index
order, chained, and of the shared header fields), ``index``/``count``, the row range
and the store's schema and cap. The body holds the rows' columns one after another,
little-endian, raw or zlib level 1. ``from_chunks`` accepts the chunks in any order
and refuses a set that mixes snapshots, misses a chunk or does not add up.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from aggregator.errors import AggregatorError

__all__ = [
    "CHUNK_FORMAT",
    "CODECS",
    "DEFAULT_MAX_BYTES",
    "SnapshotError",
    "chunk_header",
    "decode_chunks",
    "encode_chunks",
]

MAGIC: Final = b"MPJS"
CHUNK_FORMAT: Final = 1
CODECS: Final = ("none", "zlib")
DEFAULT_MAX_BYTES: Final = 900_000  # under Kafka's default 1 MB message.max.bytes
_HEAD_ROOM: Final = 2048  # bytes kept for the magic and the JSON header


class SnapshotError(AggregatorError, ValueError):
    """Chunks that do not make one whole snapshot (or are not chunks at all)."""


def encode_chunks(
    entries: dict[str, np.ndarray], meta: dict[str, Any], max_bytes: int, codec: str
) -> list[bytes]:
    """Equal-length columns (and ``meta``, JSON) as chunks of at most ``max_bytes`` each
    (one chunk when there are no rows)."""
    if codec not in CODECS:
        raise ValueError(f"codec: expected one of {CODECS}, got {codec!r}")
    budget = max_bytes - _HEAD_ROOM
    cols = [c.astype(c.dtype.newbyteorder("<"), copy=False) for c in entries.values()]
    row_bytes = sum(c.dtype.itemsize for c in cols)
    if budget < row_bytes:
        raise ValueError(f"max_bytes: {max_bytes} leaves no room for one row")
    n = len(cols[0]) if cols else 0

    def body(a: int, b: int) -> bytes:
        raw = b"".join(c[a:b].tobytes() for c in cols)
        return zlib.compress(raw, 1) if codec == "zlib" else raw

    bodies: list[tuple[int, int, bytes]] = []
    rows, a = budget // row_bytes, 0
    while a < n or not bodies:
        b = min(n, a + rows)
        data = body(a, b)
        while len(data) > budget:  # only zlib can miss: a guess from the last chunk's ratio
            b = a + max(1, int((b - a) * 0.95 * budget / len(data)))
            data = body(a, b)
        bodies.append((a, b, data))
        if codec == "zlib" and b > a:
            rows = max(1, int((b - a) * 0.98 * budget / len(data)))
        a = b
    shared = {
        "format": CHUNK_FORMAT,
        "count": len(bodies),
        "total": n,
        "meta": meta,
        "columns": [[name, c.dtype.str] for name, c in zip(entries, cols, strict=True)],
        "codec": codec,
    }
    digest = _digest(shared, (d for _, _, d in bodies))
    out = []
    for i, (a, b, data) in enumerate(bodies):
        head = json.dumps({**shared, "digest": digest, "index": i, "rows": [a, b]}).encode()
        out.append(MAGIC + len(head).to_bytes(4, "big") + head + data)
        if len(out[-1]) > max_bytes:  # a schema with very long names
            raise ValueError(f"max_bytes: {max_bytes} is too small for the chunk header")
    return out


def decode_chunks(chunks: Sequence[bytes]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The ``meta`` and columns the chunks of one ``encode_chunks`` call hold, exactly."""
    if not chunks:
        raise SnapshotError("chunks: none given")
    parsed = sorted((_split(c) for c in chunks), key=lambda hb: int(hb[0].get("index", -1)))
    first = parsed[0][0]
    fields = ("format", "count", "total", "meta", "columns", "codec", "digest")
    for head, _ in parsed:
        differ = [f for f in fields if head.get(f) != first.get(f)]
        if differ:
            raise SnapshotError(f"chunks of different snapshots (fields {differ} differ)")
    if first.get("format") != CHUNK_FORMAT:
        raise SnapshotError(f"format: {first.get('format')}, expected {CHUNK_FORMAT}")
    indices = [int(h["index"]) for h, _ in parsed]
    if indices != list(range(int(first["count"]))):
        raise SnapshotError(f"index: got chunks {indices} of {first['count']}")
    shared = {f: first[f] for f in fields if f != "digest"}
    if _digest(shared, (b for _, b in parsed)) != first["digest"]:
        raise SnapshotError("digest: the chunks' bodies do not match their snapshot")
    dtypes = [(str(name), np.dtype(dt)) for name, dt in first["columns"]]
    total = int(first["total"])
    arrays = {name: np.empty(total, dt) for name, dt in dtypes}
    at = 0
    for head, data in parsed:
        a, b = (int(x) for x in head["rows"])
        raw = zlib.decompress(data) if first["codec"] == "zlib" else data
        if a != at or b < a or len(raw) != (b - a) * sum(dt.itemsize for _, dt in dtypes):
            raise SnapshotError(f"rows: chunk {head['index']} holds rows {a}..{b} badly")
        off = 0
        for name, dt in dtypes:
            arrays[name][a:b] = np.frombuffer(raw, dt, b - a, off)
            off += (b - a) * dt.itemsize
        at = b
    if at != total:
        raise SnapshotError(f"rows: the chunks hold {at} of {total} rows")
    return dict(first["meta"]), arrays


def chunk_header(chunk: bytes) -> dict[str, Any]:
    """The JSON header of one chunk (``index``, ``count``, ``digest``...): what a reader
    compares with the manifest before restoring."""
    return _split(chunk)[0]


def _split(chunk: bytes) -> tuple[dict[str, Any], memoryview]:
    view = memoryview(chunk)
    if bytes(view[:4]) != MAGIC or len(view) < 8:
        raise SnapshotError("magic: not a pending-store snapshot chunk")
    size = int.from_bytes(view[4:8], "big")
    try:
        head = json.loads(bytes(view[8 : 8 + size]))
    except ValueError as exc:
        raise SnapshotError(f"header: {exc}") from exc
    if not isinstance(head, dict) or "index" not in head:
        raise SnapshotError("header: not a chunk header")
    return head, view[8 + size :]


def _digest(shared: dict[str, Any], bodies: Any) -> str:
    crc = zlib.crc32(json.dumps(shared, sort_keys=True).encode())
    for data in bodies:
        crc = zlib.crc32(data, crc)
    return f"{crc:08x}"
