"""A partition's state as one compressed record of the compacted state topic, and back.

Layout: 4-byte big-endian length, a JSON head (config digest, offsets, counters,
catalog), then a zlib-compressed ``.npz`` of every array the measure table names
(``ring.``/``open.``/``cum.``/``ref.`` + measure). The digest covers the config, the
measure table and ``STATE_FORMAT``: any change takes the config-changed path
(``ConfigMismatch``), never a half restore.
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from aggregator.catalog import Catalog
from aggregator.errors import ConfigMismatch
from aggregator.join.chunks import SnapshotError, chunk_header
from aggregator.join.pending import PendingStore
from aggregator.state.config import StateConfig
from aggregator.state.drift import DRIFT_MEASURES
from aggregator.state.measures import MEASURES
from aggregator.state.panes import pane_kind

if TYPE_CHECKING:
    from aggregator.state.partition import PartitionState

__all__ = ["join_chunks", "restore", "snapshot"]

_REBUILD = "restart with --rebuild-state to rebuild it from the start of the log"
_LAYOUT = ("pane_of_slot", "slot_closed", "has_reference", "pane_of_open", "open_closed")


def _array_names() -> set[str]:
    names = set(_LAYOUT)
    for m in MEASURES:
        names |= {f"{pane_kind(m)}.{m.name}", f"cum.{m.name}"}
    return names | {f"ref.{name}" for name in DRIFT_MEASURES}


def snapshot(state: PartitionState, chunks: Sequence[Sequence[bytes]] = ()) -> bytes:
    """The whole state of ``state`` as bytes (see the module docstring); ``chunks``: the
    join stores' chunks (``join_chunks``) written beside it, named in its head."""
    m = len(state.catalog)
    panes = state.panes
    meta: dict[str, Any] = {
        "config": state.config.digest(),
        "partition": state.partition,
        "next_offset": state.next_offset,
        "max_event_ms": state.max_event_ms,
        "closed": panes.closed,
        "rejected": state.rejected,
        "resources": state.resources,
        "events_accepted": state.events_accepted,
        "catalog": state.catalog.to_json(),
    }
    arrays: dict[str, np.ndarray] = {
        "pane_of_slot": panes.pane_of_slot,
        "slot_closed": panes.slot_closed,
        "has_reference": state.drift.has[:m],
        "pane_of_open": panes.pane_of_open,
        "open_closed": panes.open_closed,
    }
    for measure in MEASURES:
        kind = pane_kind(measure)
        arrays[f"{kind}.{measure.name}"] = panes.panes_of(measure)[measure.name][:, :m]
        arrays["cum." + measure.name] = panes.cum[measure.name][:m]
    for name, arr in state.drift.arrays.items():
        arrays["ref." + name] = arr[:m]
    if state.join is not None:
        meta["join"] = _join_meta(state, chunks)
        for name, arr in state.join.per_mv.items():
            arrays["join." + name] = arr[:m]
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    head = json.dumps(meta).encode()
    return len(head).to_bytes(4, "big") + head + zlib.compress(buf.getvalue(), 1)


def restore(data: bytes, state: PartitionState, chunks: Sequence[bytes] = ()) -> None:
    """Fill the fresh ``state`` from ``data`` (and the join stores' ``chunks``); a
    different config raises ``ConfigMismatch``, chunks that do not match the head
    ``SnapshotError``."""
    config: StateConfig = state.config
    size = int.from_bytes(data[:4], "big")
    meta = json.loads(data[4 : 4 + size])
    if meta["config"] != config.digest():
        raise ConfigMismatch(
            f"partition {meta['partition']}: snapshot made with config {meta['config']}, "
            f"running {config.digest()}; {_REBUILD} (what retention has deleted is lost)"
        )
    state.partition = int(meta["partition"])
    state.catalog = Catalog.from_json(config.limits, meta["catalog"])
    state.next_offset = int(meta["next_offset"])
    state.max_event_ms = int(meta["max_event_ms"])
    state.rejected = dict(meta["rejected"])
    state.resources.update(meta["resources"])
    state.events_accepted = int(meta["events_accepted"])
    m = len(state.catalog)
    state.grow(max(m, 4))
    if state.join is not None:
        state.join.grow(state.panes.capacity)
    panes = state.panes
    panes.closed = int(meta["closed"])
    with np.load(io.BytesIO(zlib.decompress(data[4 + size :]))) as z:
        missing = sorted(_array_names().difference(z.files))
        if missing:  # a format change that forgot to bump STATE_FORMAT: still refused
            raise ConfigMismatch(
                f"partition {meta['partition']}: snapshot lacks {', '.join(missing[:3])}; "
                f"{_REBUILD}"
            )
        panes.pane_of_slot = z["pane_of_slot"].copy()
        panes.slot_closed = z["slot_closed"].copy()
        panes.pane_of_open = z["pane_of_open"].copy()
        panes.open_closed = z["open_closed"].copy()
        state.drift.has[:m] = z["has_reference"]
        for measure in MEASURES:
            kind = pane_kind(measure)
            panes.panes_of(measure)[measure.name][:, :m] = z[f"{kind}.{measure.name}"]
            panes.cum[measure.name][:m] = z["cum." + measure.name]
        for name, arr in state.drift.arrays.items():
            arr[:m] = z["ref." + name]
        if state.join is not None and "join" in meta:
            for name, arr in state.join.per_mv.items():
                arr[:m] = z["join." + name]
    if state.join is not None and "join" in meta:
        _restore_join(state, meta["join"], chunks)


_STORES: Final = ("pending", "early", "seen")


def join_chunks(state: PartitionState, max_bytes: int) -> list[list[bytes]]:
    """The join stores as chunks of at most ``max_bytes``, one list per store: written
    as their own records before the head, which names their digests."""
    if state.join is None:
        return []
    return [getattr(state.join, name).to_chunks(max_bytes) for name in _STORES]


def _join_meta(state: PartitionState, chunks: Sequence[Sequence[bytes]]) -> dict[str, Any]:
    join = state.join
    assert join is not None
    if len(chunks) != len(_STORES):
        raise ValueError("snapshot: the join stores' chunks are missing (join_chunks)")
    return {
        "names": join.names,
        "next_offset": join.next_offset,
        "unmatched": join.unmatched.tolist(),
        "duplicate_ids": join.duplicate_ids,
        "chunks": [{"count": len(c), "digest": chunk_header(c[0])["digest"]} for c in chunks],
    }


def _restore_join(state: PartitionState, meta: dict[str, Any], chunks: Sequence[bytes]) -> None:
    join = state.join
    assert join is not None
    want = sum(int(c["count"]) for c in meta["chunks"])
    if len(chunks) != want:
        raise SnapshotError(f"join: the head names {want} chunks, {len(chunks)} were read")
    at = 0
    for name, spec in zip(_STORES, meta["chunks"], strict=True):
        mine = list(chunks[at : at + int(spec["count"])])
        at += int(spec["count"])
        if chunk_header(mine[0])["digest"] != spec["digest"]:
            raise SnapshotError(f"join: the {name} chunks are not this snapshot's")
        store = PendingStore.from_chunks(mine)
        store.set_cap(getattr(join, name).cap)  # the running cap; excess is evicted
        setattr(join, name, store)
    join.names = list(meta["names"])
    join._name_ids = {n: i for i, n in enumerate(join.names)}
    join.next_offset = int(meta["next_offset"])
    join.unmatched[: len(meta["unmatched"])] = meta["unmatched"]
    join.duplicate_ids = int(meta["duplicate_ids"])
