"""The event id hash: one definition, the same in every form and every decode path."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.bulk import EventDecoder, decode_events_per_record
from aggregator.decode import SchemaResolver, decode_batch
from aggregator.errors import DecodeError
from producer.encode import Row, encode_batch, encode_event
from schemas.event_id import NO_ID, event_hashes, hash_event_id, hash_event_ids

ROOT = Path(__file__).resolve().parent.parent
# Any code point but surrogates (not encodable): empty, ASCII, multi-byte, NUL, and
# ids longer than several words.
IDS = st.one_of(st.text(max_size=20), st.text(max_size=300), st.just(""))
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Computed once from the definition in schemas/README.md: a change of algorithm (or of
# a constant) must show up here, since labels hashed elsewhere would stop matching.
PINNED = {
    "a": 4840357952385747736,
    "00000000-0000-0000-0000-000000000000": 16206780481367091483,
    "0x1": 14421239854450647737,
}


def test_pinned_values() -> None:
    assert {s: hash_event_id(s) for s in PINNED} == PINNED
    assert hash_event_ids(list(PINNED)).tolist() == list(PINNED.values())


def test_empty_id_is_no_id() -> None:
    assert hash_event_id("") == NO_ID == 0
    assert hash_event_ids(["", "a", ""]).tolist() == [0, PINNED["a"], 0]
    assert hash_event_ids([]).dtype == np.uint64
    assert hash_event_ids([]).shape == (0,)


@SETTINGS
@given(st.lists(IDS, max_size=30))
def test_vectorised_equals_scalar(ids: list[str]) -> None:
    expected = [hash_event_id(s) for s in ids]
    got = hash_event_ids(ids)
    assert got.dtype == np.uint64
    assert got.tolist() == expected
    assert all(h != 0 for s, h in zip(ids, expected, strict=True) if s)


@SETTINGS
@given(st.lists(st.tuples(IDS, st.binary(max_size=9)), min_size=1, max_size=30), st.booleans())
def test_spans_anywhere_in_a_buffer(items: list[tuple[str, bytes]], sort: bool) -> None:
    """Ids between arbitrary bytes, the last one flush with the buffer's end (no padding)."""
    data = bytearray()
    starts, lengths = [], []
    for text, junk in items:
        data += junk
        raw = text.encode()
        starts.append(len(data))
        lengths.append(len(raw))
        data += raw
    ids = [text for text, _junk in items]
    order = sorted(range(len(ids)), key=lambda i: -starts[i]) if sort else range(len(ids))
    got = event_hashes(
        bytes(data), np.array([starts[i] for i in order]), np.array([lengths[i] for i in order])
    )
    assert got.tolist() == [hash_event_id(ids[i]) for i in order]
    as_array = event_hashes(np.frombuffer(bytes(data), np.uint8), np.array(starts), lengths)
    assert as_array.tolist() == [hash_event_id(s) for s in ids]


@SETTINGS
@given(st.integers(1, 40), st.integers(0, 30), st.integers(0, 5), st.integers(1, 50), st.booleans())
def test_one_length(length: int, gap: int, first: int, k: int, jitter: bool) -> None:
    """Equal lengths at a fixed stride (strided views) or not (gathers): the scalar form."""
    rng = np.random.default_rng(length * 1000 + gap)
    gaps = rng.integers(0, gap + 1, size=k) if jitter else np.full(k, gap)
    starts = first + np.concatenate([[0], np.cumsum(length + gaps[:-1])])
    data = rng.integers(32, 127, size=int(starts[-1]) + length, dtype=np.uint8).tobytes()
    ids = [data[s : s + length].decode() for s in starts.tolist()]
    got = event_hashes(data, starts, np.full(k, length))
    assert got.tolist() == [hash_event_id(s) for s in ids]


def test_spans_outside_the_buffer_are_refused() -> None:
    with pytest.raises(ValueError, match="outside the buffer"):
        event_hashes(b"abc", np.array([1]), np.array([3]))
    with pytest.raises(ValueError, match="outside the buffer"):
        event_hashes(b"abc", np.array([0]), np.array([-1]))
    with pytest.raises(ValueError, match="2 starts but 1 lengths"):
        event_hashes(b"abc", np.array([0, 1]), np.array([1]))


def test_no_collisions_in_a_big_set() -> None:
    """1.2M distinct ids of the shapes seen in practice; P(any collision) ~ 4e-8."""
    rng = np.random.default_rng(7)
    raw = rng.bytes(16 * 400_000)
    uuids = [str(uuid.UUID(bytes=raw[16 * i : 16 * i + 16])) for i in range(400_000)]
    counters = [hex(0x18C2A3F4E5D00000 + i) for i in range(400_000)]  # the publisher's ids
    short = [str(i) for i in range(400_000)]  # numeric ids, 1 to 6 bytes
    ids = uuids + counters + short
    assert len(set(ids)) == len(ids)
    hashes = hash_event_ids(ids)
    assert np.unique(hashes).shape[0] == len(ids)
    assert not (hashes == 0).any()


def test_same_in_another_process() -> None:
    """Not Python's salted hash(): a process with another hash seed gets the same values."""
    code = (
        "from schemas.event_id import hash_event_id, hash_event_ids; "
        f"ids = {list(PINNED)!r}; "
        "print([hash_event_id(s) for s in ids] == hash_event_ids(ids).tolist() == "
        f"{list(PINNED.values())!r})"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "True"


# -- every decode path gives every row the same hash ------------------------------------


def _rows(ids: list[str]) -> list[Row]:
    return [
        Row("m", "v1", 1.7e9 + i, 0.01, 0, "yes", 0.5, None, None, None, event_id)
        for i, event_id in enumerate(ids)
    ]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(IDS, st.just(str(uuid.UUID(int=5)))), min_size=1, max_size=140))
def test_decode_paths_agree(ids: list[str]) -> None:
    """Envelope, per-record and bulk per-event decoding: the hashes of the ids."""
    expected = [hash_event_id(s) for s in ids]
    resolver = SchemaResolver()
    _kind, record = resolver.read(encode_batch(_rows(ids)))
    batch = decode_batch(record, 7)
    events = [encode_event(r) for r in _rows(ids)]
    offsets = np.arange(len(ids))
    per_record = decode_events_per_record(events, offsets, resolver)
    bulk = EventDecoder(resolver, min_bulk=0).decode(events, offsets)
    assert bulk.bulk
    for chunk in (batch, per_record.chunk, bulk.chunk):
        assert chunk.event_hash.dtype == np.uint64
        assert chunk.event_hash.tolist() == expected
        half = len(ids) // 2
        assert chunk.rows(half, len(ids)).event_hash.tolist() == expected[half:]


def test_envelope_without_ids_has_zeros() -> None:
    _kind, record = SchemaResolver().read(encode_batch(_rows(["", ""])))
    assert record["event_id_offsets"] == b""
    assert decode_batch(record, 0).event_hash.tolist() == [0, 0]


@pytest.mark.parametrize(
    ("offsets", "data"),
    [
        ([0, 2, 5], b"abcd"),  # ends short of the data
        ([1, 2, 4], b"abcd"),  # does not start at 0
        ([0, 3, 2], b"ab"),  # goes back
        ([0, 2, 9], b"abcd"),  # past the data
    ],
)
def test_bad_id_offsets_are_a_bad_column(offsets: list[int], data: bytes) -> None:
    _kind, record = SchemaResolver().read(encode_batch(_rows(["ab", "cd"])))
    bad: dict[str, Any] = {
        **record,
        "event_id_offsets": np.array(offsets, dtype="<i4").tobytes(),
        "event_id_data": data,
    }
    with pytest.raises(DecodeError, match="event_id_offsets") as err:
        decode_batch(bad, 0)
    assert err.value.reason == "bad_column"
