"""Window arithmetic and partition state, without Kafka (property-based)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.decode import Marker, RowChunk, SchemaResolver, decode_batch
from aggregator.errors import ConfigMismatch
from aggregator.metrics import build_families
from aggregator.quality import jensen_shannon_distance
from aggregator.state import STATE_FORMAT, PartitionState, StateConfig, load_reference_file
from aggregator.window import NO_TIME, closed_panes, late_mask, pane_index
from producer.encode import Row, encode_batch

PANE, LATE = 1000, 2000
CONFIG = StateConfig(
    pane_ms=PANE, windows_ms=(5000, 10_000), lateness_ms=LATE, drift_reference_ms=5000
)


def _oracle_late(ts: list[int], prior: int) -> tuple[list[bool], int]:
    """One event at a time, as the definition says."""
    out, mx = [], prior
    for t in ts:
        closed = (mx - LATE) // PANE if mx > NO_TIME else None
        out.append(closed is not None and t // PANE < closed)
        mx = max(mx, t)
    return out, mx


@given(st.lists(st.integers(0, 60_000), max_size=200), st.sampled_from([NO_TIME, 5_000, 30_000]))
def test_late_mask_matches_the_per_event_definition(ts: list[int], prior: int) -> None:
    late, mx = late_mask(np.array(ts, dtype=np.int64), prior, LATE, PANE)
    want, want_max = _oracle_late(ts, prior)
    assert late.tolist() == want
    assert mx == want_max


@given(st.integers(-(10**12), 10**12), st.integers(1, 10**6))
def test_pane_index_is_floor_division(ts: int, pane: int) -> None:
    k = int(pane_index(ts, pane))
    assert k * pane <= ts < (k + 1) * pane


def test_closed_panes() -> None:
    assert closed_panes(12_500, 2000, 1000) == 10  # panes 0..9 closed, window end 10 s
    assert closed_panes(NO_TIME, 2000, 1000) < -(10**12)


def _events(seed: int, n: int) -> list[Row]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        jitter = int(rng.normal(0, 1500)) if rng.random() < 0.2 else 0  # some out of order
        t_ms = 1_700_000_000_000 + i * 20 + jitter
        model = ["a", "b", "r"][int(rng.integers(3))]
        if model == "r":
            pred: Any = float(rng.normal())
            label: Any = float(rng.normal()) if rng.random() < 0.5 else None
        else:
            pred = ["x", "y", "z"][int(rng.integers(3))]
            label = ["x", "y", "z"][int(rng.integers(3))] if rng.random() < 0.7 else None
        rows.append(
            Row(
                model,
                "v1",
                t_ms / 1000,
                float(rng.lognormal(-4, 1)),
                int(rng.choice([0, 0, 0, 1])),
                pred,
                float(rng.random()),
                label,
                [None, "s1", "s2", "s3"][int(rng.integers(4))],
                {"f": float(rng.normal())},
                "",
            )
        )
    return rows


def _messages(rows: list[Row], per_message: int) -> list[RowChunk]:
    """Envelopes of consecutive rows of the same model, in order (as a producer sends)."""
    resolver = SchemaResolver()
    chunks, start = [], 0
    while start < len(rows):
        end = start + 1
        while (
            end < len(rows) and end - start < per_message and rows[end].model == rows[start].model
        ):
            end += 1
        chunks.append(decode_batch(resolver.read(encode_batch(rows[start:end]))[1], len(chunks)))
        start = end
    return chunks


def _run(chunks: list[Any], splits: list[int]) -> PartitionState:
    state = PartitionState(CONFIG, 0)
    bounds = [0, *sorted(set(splits)), len(chunks)]
    for lo, hi in itertools.pairwise(bounds):
        if hi <= lo:
            continue
        offs = np.arange(lo, hi, dtype=np.int64)
        state.ingest(chunks[lo:hi], offs, np.full(hi - lo, 2_000_000_000_000), hi)
    return state


def _same(a: PartitionState, b: PartitionState) -> None:
    assert a.catalog.to_json() == b.catalog.to_json()
    m = len(a.catalog)
    for name in a.cum:
        if a.cum[name].dtype.kind == "f":  # sums: exact up to float rounding order
            np.testing.assert_allclose(a.cum[name][:m], b.cum[name][:m], rtol=1e-12, err_msg=name)
        else:  # counts: exactly equal
            np.testing.assert_array_equal(a.cum[name][:m], b.cum[name][:m], err_msg=name)
    assert a.rejected == b.rejected
    assert (a.max_event_ms, a.closed) == (b.max_event_ms, b.closed)
    for w in CONFIG.windows_ms:
        wa, wb = a.window(w), b.window(w)
        for field in ("outcome", "lat", "conf", "err", "feat", "cal", "est"):
            np.testing.assert_array_equal(getattr(wa, field), getattr(wb, field), err_msg=field)
        for field in ("cal_score", "brier", "est_sum"):
            np.testing.assert_allclose(getattr(wa, field), getattr(wb, field), rtol=1e-12)


CHUNKS = _messages(_events(3, 1500), 40)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, len(CHUNKS)), max_size=12))
def test_batch_boundaries_do_not_change_the_state(splits: list[int]) -> None:
    """Replaying the same log with any batching gives identical state (exactness)."""
    _same(_run(CHUNKS, []), _run(CHUNKS, splits))


@settings(max_examples=10, deadline=None)
@given(st.integers(1, len(CHUNKS) - 1))
def test_snapshot_restore_mid_stream_equals_uninterrupted(cut: int) -> None:
    whole = _run(CHUNKS, [cut])
    first = _run(CHUNKS[:cut], [])
    restored = PartitionState.from_bytes(first.to_bytes(), CONFIG)
    assert restored.next_offset == cut
    offs = np.arange(cut, len(CHUNKS), dtype=np.int64)
    restored.ingest(CHUNKS[cut:], offs, np.full(offs.size, 2_000_000_000_000), len(CHUNKS))
    _same(whole, restored)


def test_counters_equal_the_events_of_closed_panes() -> None:
    rows = _events(9, 800)
    state = _run(_messages(rows, 25), [3, 9, 17])
    ts = [int(np.floor(float(r.time) * 1000)) for r in rows]
    late, mx = _oracle_late(ts, NO_TIME)
    closed = (mx - LATE) // PANE
    counted = [r for r, t, lt in zip(rows, ts, late, strict=True) if not lt and t // PANE < closed]
    assert int(state.cum["outcome"].sum()) == len(counted)
    assert state.rejected.get("late", 0) == sum(late)
    ok_labelled_cls = [
        r for r in counted if r.outcome == 0 and r.label is not None and r.model != "r"
    ]
    assert int(state.cum["conf"].sum()) == len(ok_labelled_cls)
    assert float(state.cum["lat_sum"].sum()) == pytest.approx(
        sum(r.latency_seconds for r in counted)
    )


def test_marker_closes_windows_and_config_mismatch_is_refused() -> None:
    state = _run(CHUNKS, [])
    before = state.closed
    state.ingest(
        [Marker(10**6, state.max_event_ms + 60_000)],
        np.array([10**6]),
        np.array([2 * 10**12]),
        10**6 + 1,
    )
    assert state.closed == before + 60
    other = StateConfig(
        pane_ms=2000, windows_ms=(10_000,), lateness_ms=LATE, drift_reference_ms=4000
    )
    with pytest.raises(ConfigMismatch, match="--rebuild-state"):
        PartitionState.from_bytes(state.to_bytes(), other)


def test_reference_file_sets_drift_baseline(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ref = tmp_path / "reference.json"
    ref.write_text(
        json.dumps(
            {
                "models": {
                    "a": {
                        "score": rng.random(5000).tolist(),
                        "features": {"f": rng.normal(size=5000).tolist()},
                    }
                }
            }
        )
    )
    config = StateConfig(
        pane_ms=PANE,
        windows_ms=(5000, 10_000),
        lateness_ms=LATE,
        drift_reference_ms=5000,
        reference_samples=load_reference_file(str(ref)),
    )
    assert config.digest() == CONFIG.digest()  # the reference does not invalidate snapshots
    state = PartitionState(config, 0)
    rows = _events(4, 1500)
    chunks = _messages(rows, 40)
    offs = np.arange(len(chunks))
    state.ingest(chunks, offs, np.full(len(chunks), 2 * 10**12), len(chunks))
    a = next(i for i, e in enumerate(state.catalog.entries) if e.model == "a")
    assert state.has_reference[a]
    w = state.window(10_000)
    f = state.catalog.entries[a].features["f"]
    ref_hist, live = state.reference["feat"][a, f], w.feat[a, f]
    assert ref_hist.sum() == 5000 and live.sum() > 50
    same = jensen_shannon_distance(ref_hist, live)
    shifted = jensen_shannon_distance(ref_hist, np.roll(live, 12))  # values moved ~3 sd
    assert same < 0.2 < 0.6 < shifted, (same, shifted)  # live traffic is normal, like the file
    families = {f.name for f in build_families([state.view()], config)}
    assert "model_drift_score" in families
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": {"a": {"scores": []}}}))
    with pytest.raises(ValueError, match="unknown keys"):
        load_reference_file(str(bad))


def _old_format_snapshot(
    state: PartitionState, drop: tuple[str, ...], state_format: int | None = None
) -> tuple[bytes, dict[str, Any]]:
    """``state``'s snapshot as older code wrote it: without ``drop`` and with the digest
    of that code (before the calibration arrays: no ``state_format`` field)."""
    data = state.to_bytes()
    size = int.from_bytes(data[:4], "big")
    meta = json.loads(data[4 : 4 + size])
    with np.load(io.BytesIO(zlib.decompress(data[4 + size :]))) as z:
        arrays = {k: z[k] for k in z.files if k.split(".", 1)[-1] not in drop}
    fields = dataclasses.asdict(state.config)
    for name in ("reference_samples", "max_name_length", "max_rows_per_envelope"):
        fields.pop(name)
    if state_format is not None:
        fields["state_format"] = state_format
    doc = json.dumps(fields, sort_keys=True, default=list)
    meta["config"] = hashlib.sha256(doc.encode()).hexdigest()[:16]

    def pack(meta: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        head = json.dumps(meta).encode()
        return len(head).to_bytes(4, "big") + head + zlib.compress(buf.getvalue(), 1)

    return pack(meta), {"pack": pack, "meta": meta}


def test_a_snapshot_without_the_calibration_arrays_takes_the_config_changed_path() -> None:
    """An upgrade that adds measures refuses old snapshots (ConfigMismatch, --rebuild-state)
    instead of failing on a missing array; so does a same-digest snapshot that lacks one."""
    state = _run(CHUNKS, [])
    assert STATE_FORMAT >= 2
    new = ("cal", "cal_score", "brier", "est", "est_sum")
    old, parts = _old_format_snapshot(state, new)
    assert parts["meta"]["config"] != CONFIG.digest()
    with pytest.raises(ConfigMismatch, match="--rebuild-state"):
        PartitionState.from_bytes(old, CONFIG)
    same_digest = parts["pack"]({**parts["meta"], "config": CONFIG.digest()})
    with pytest.raises(ConfigMismatch, match=r"lacks .*brier"):
        PartitionState.from_bytes(same_digest, CONFIG)
    # The current format round-trips, calibration arrays included.
    restored = PartitionState.from_bytes(state.to_bytes(), CONFIG)
    _same(state, restored)
    assert int(restored.cum["cal"].sum()) > 0 and int(restored.cum["est"].sum()) > 0


def test_a_snapshot_without_the_segment_arrays_takes_the_config_changed_path() -> None:
    """Format 2 (before quality per segment) is refused the same way as format 1."""
    state = _run(CHUNKS, [])
    assert STATE_FORMAT >= 3
    new = ("seg_cls", "seg_lab", "seg_abs", "seg_sq", "pane_of_open", "open_closed")
    old, parts = _old_format_snapshot(state, new, state_format=2)
    assert parts["meta"]["config"] != CONFIG.digest()
    with pytest.raises(ConfigMismatch, match="--rebuild-state"):
        PartitionState.from_bytes(old, CONFIG)
    same_digest = parts["pack"]({**parts["meta"], "config": CONFIG.digest()})
    with pytest.raises(ConfigMismatch, match=r"lacks .*seg_"):
        PartitionState.from_bytes(same_digest, CONFIG)
    restored = PartitionState.from_bytes(state.to_bytes(), CONFIG)
    _same(state, restored)
    assert int(restored.cum["seg_cls"].sum()) > 0 and int(restored.cum["seg_lab"].sum()) > 0
    assert float(restored.cum["seg_sq"].sum()) > 0
    # The still-open panes travel too: closing them after a restore adds the same counts.
    for s in (state, restored):
        s.ingest([Marker(10**6, s.max_event_ms + 60_000)], np.array([10**6]),
                 np.array([2 * 10**12]), 10**6 + 1)  # fmt: skip
    _same(state, restored)
    assert (state.open_closed).all()


@settings(max_examples=200, deadline=None)
@given(
    edges=st.lists(
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=30
    ),
    values=st.lists(st.floats(allow_nan=False), max_size=200),
)
def test_bucket_lookup_equals_searchsorted(edges: list[float], values: list[float]) -> None:
    """The table lookup that replaces np.searchsorted on the hot path, at and next to
    every edge too (bins must not move, or snapshots and histograms would change)."""
    from aggregator.state.binning import Buckets as _Buckets

    bounds = np.array(sorted(set(edges)), dtype=np.float64)
    x = np.concatenate(
        [
            np.asarray(values, dtype=np.float64),
            bounds,
            np.nextafter(bounds, -np.inf),
            np.nextafter(bounds, np.inf),
            [0.0, -0.0, np.inf, -np.inf, 5e-324, -5e-324, 1e-300],
        ]
    )
    for raw in (bounds, np.abs(bounds) + 1e-3, np.round(np.arange(1, 21) * 0.05, 2)):
        b = np.unique(raw)
        assert np.array_equal(_Buckets(b)(x), np.searchsorted(b, x, "left"))
