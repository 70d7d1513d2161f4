"""The per-event writer (schemas.codec, used by the producer) against fastavro: same bytes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from schemas.codec import Row, _long, _longs, encode_event, encode_events
from schemas.wire import OUTCOMES

texts = st.text(max_size=80) | st.sampled_from(["\x00", "é" * 70, "x" * 64])
names = st.text(min_size=1, max_size=80)
classes = st.none() | texts | st.integers(-(2**70), 2**70) | st.booleans()
values = st.none() | st.floats(allow_nan=False, allow_infinity=False)
times = (
    st.floats(min_value=0.0, max_value=1e11, exclude_max=True)
    | st.integers(0, 10**11 - 1)
    | st.datetimes(
        min_value=datetime(1900, 1, 1),
        timezones=st.just(UTC) | st.just(timezone(timedelta(hours=-5))),
    )
)
features = st.none() | st.dictionaries(
    names, st.floats() | st.integers(-(2**60), 2**60) | st.booleans(), max_size=6
)


@st.composite
def rows(draw: st.DrawFn) -> Row:
    regression = draw(st.booleans())
    kind = values if regression else classes
    return Row(
        model=draw(names),
        version=draw(texts),
        time=draw(times),
        latency_seconds=draw(
            st.floats(min_value=0.0, allow_infinity=False) | st.integers(0, 10**6)
        ),
        outcome=draw(st.integers(0, len(OUTCOMES) - 1)),
        prediction=draw(kind | st.just(np.float64(0.25)) if regression else kind),
        score=draw(st.none() | st.floats(0.0, 1.0) | st.sampled_from([0, 1])),
        label=draw(kind),
        segment=draw(st.none() | texts),
        features=draw(features),
        event_id=draw(texts),
    )


def _reference(row: Row, service: str, instance: str) -> bytes | type[BaseException]:
    try:
        return encode_event(row, service=service, instance=instance, schema_id=77)
    except Exception as exc:
        return type(exc)


@settings(max_examples=300, deadline=None)
@given(st.lists(rows(), min_size=1, max_size=20), texts, texts)
@example(
    [Row("m", "v", 1.0, 0.0, 0, "a", None, None, None, None, "")] * 2
    + [Row("m", "v", 1.0, 0.0, 0, "a", None, None, "\ud800", None, "")],
    "",
    "",
)  # a lone surrogate: fastavro cannot encode it, and neither may we
def test_encode_events_equals_fastavro(batch: list[Row], service: str, instance: str) -> None:
    expected = [_reference(r, service, instance) for r in batch]
    errors = tuple(e for e in expected if isinstance(e, type))
    event("fastavro refuses a row" if errors else "all rows encodable")
    if errors:
        # A row fastavro refuses fails the batch, as the list of encode_event calls did.
        with pytest.raises(errors):
            encode_events(batch, service=service, instance=instance, schema_id=77)
        return
    got = encode_events(batch, service=service, instance=instance, schema_id=77)
    assert got == expected


@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=50))
def test_vectorised_longs_equal_the_scalar_writer(numbers: list[int]) -> None:
    assert _longs(np.array(numbers, dtype=np.int64)) == [_long(n) for n in numbers]


def test_the_scalar_long_matches_avro() -> None:
    # Avro spec examples: zig-zag then little-endian base-128.
    assert [_long(n) for n in (0, -1, 1, -2, 2, 63, -64, 64)] == [
        b"\x00", b"\x01", b"\x02", b"\x03", b"\x04", b"\x7e", b"\x7f", b"\x80\x01"
    ]  # fmt: skip
