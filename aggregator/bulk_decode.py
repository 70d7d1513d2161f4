"""Decode a consumed batch of framed ``PredictionEvent`` messages at once, with numpy.

The per-event wire format costs one fastavro call per message; this module reads all
the messages of a batch together instead. The bodies are joined into one byte buffer,
each record keeps a cursor, and a small program compiled once per writer schema
advances every cursor field by field: zigzag varints and doubles are gathered through
unaligned 8-byte views, union branches and map items are handled for all records that
take them at once, and strings become (start, length) pairs of which only the distinct
values are ever turned into ``str``.

The result is exactly the ``RowChunk`` that ``EventChunkBuilder`` builds from the same
messages (same columns, dtypes and first-seen code order). Anything the compiler does
not understand, and every record the bulk pass cannot vouch for (a cursor past its
record's end, a bad union or enum index, a negative length, trailing bytes, invalid
UTF-8, a repeated map key), goes through the per-record path instead, so rejects carry
the same ``DecodeError`` reasons and details as before; if such a record turns out to
be fine for fastavro, the whole batch is decoded by the per-record path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from aggregator.decode import EventChunkBuilder, RowChunk, SchemaResolver
from aggregator.errors import DecodeError
from schemas.wire import (
    CLASS_DTYPE,
    EVENT_TIME_DTYPE,
    FLOAT_DTYPE,
    HEADER,
    MAGIC_BYTE,
    NO_CLASS,
    OUTCOME_CODES,
    OUTCOME_DTYPE,
    SchemaId,
)

__all__ = ["MIN_BULK", "EventDecodeResult", "EventDecoder", "decode_events_per_record"]

# Below this many messages, fastavro record by record is as fast (measured: break-even
# near 100 events; bench/bench_decode.py prints both per batch size).
MIN_BULK: Final = 128

_PAD: Final = 64  # zero bytes after the buffer: gathers past a record's end stay in bounds
_ZEROS: Final = bytes(_PAD)
_MAX_STR: Final = 64  # longer strings are interned with Python bytes, not word views
_HI: Final = np.uint64(0x8080808080808080)
_LOW7: Final = np.uint64(0x7F7F7F7F7F7F7F7F)
_M16: Final = np.uint64(0x00FF00FF00FF00FF)
_M32: Final = np.uint64(0x0000FFFF0000FFFF)
_M64: Final = np.uint64(0x00000000FFFFFFFF)
_ONE: Final = np.uint64(1)
_BYTE_MASKS: Final = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [(1 << 64) - 1], np.uint64)
_MIX: Final = np.uint64(0x9E3779B97F4A7C15)
_MIX2: Final = np.uint64(0xBF58476D1CE4E5B9)
_BIG: Final = np.iinfo(np.int64).max
_PRIMITIVES: Final = frozenset(
    {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
)
_MIN_SIZE: Final = {
    "null": 0,
    "boolean": 1,
    "int": 1,
    "long": 1,
    "float": 4,
    "double": 8,
    "bytes": 1,
    "string": 1,
}
# Kinds of an optional value (a union field of the event).
_NULL, _STR, _DBL = 0, 1, 2
_OPT_KINDS: Final = {"null": _NULL, "string": _STR, "double": _DBL}


class _Unsupported(Exception):
    """The compiler cannot turn this schema into a program; decode per record."""


# -- schema compilation ---------------------------------------------------------------

# A node is a tuple: (primitive,), ("fixed", size), ("enum", n_symbols, symbols),
# ("union", branches), ("array", item), ("map", value), ("record", fields).
_Node = tuple[Any, ...]


def _node(t: Any, named: dict[str, Any], stack: tuple[str, ...] = ()) -> _Node:
    if isinstance(t, list):
        return ("union", tuple(_node(b, named, stack) for b in t))
    if isinstance(t, str):
        if t in _PRIMITIVES:
            return (t,)
        if t in stack or t not in named:
            raise _Unsupported(f"recursive or unknown named type {t}")
        return _node(named[t], named, stack)
    if not isinstance(t, dict):
        raise _Unsupported(f"schema node {t!r}")
    kind = t.get("type")
    if kind in _PRIMITIVES:
        return (kind,)
    if kind == "fixed":
        return ("fixed", int(t["size"]))
    if kind == "enum":
        return ("enum", len(t["symbols"]), tuple(t["symbols"]))
    if kind == "array":
        return ("array", _node(t["items"], named, stack))
    if kind == "map":
        return ("map", _node(t["values"], named, stack))
    if kind == "record":
        inner = (*stack, str(t.get("name", "")))
        return ("record", tuple(_node(f["type"], named, inner) for f in t["fields"]))
    return _node(kind, named, stack)


def _min_size(node: _Node) -> int:
    kind = node[0]
    if kind in _MIN_SIZE:
        return _MIN_SIZE[kind]
    if kind == "fixed":
        return int(node[1])
    if kind in ("enum", "union", "array", "map"):
        return 1
    return sum(_min_size(f) for f in node[1])


def _empty_items(node: _Node) -> bool:
    """Whether an array anywhere in ``node`` has items of zero bytes (no bound on counts)."""
    kind = node[0]
    if kind == "array":
        return _min_size(node[1]) == 0 or _empty_items(node[1])
    if kind == "map":
        return _empty_items(node[1])
    if kind in ("union", "record"):
        return any(_empty_items(b) for b in node[1])
    return False


def _plain(t: Any) -> str | None:
    """The primitive name of a type without a logical type (fastavro returns it as is)."""
    if isinstance(t, str) and t in _PRIMITIVES:
        return t
    if isinstance(t, dict) and t.get("type") in _PRIMITIVES and "logicalType" not in t:
        return str(t["type"])
    return None


def _branches(t: Any) -> list[str | None] | None:
    """Primitive names of a union's branches (None for a branch that is not primitive)."""
    if not isinstance(t, list):
        return None
    return [_plain(b) for b in t]


@dataclass(frozen=True, slots=True)
class _Op:
    """One writer field: what to read and where it goes."""

    name: str
    # long, double, string, outcome, opt, features: columns; check: read by fastavro but
    # not kept (validated only); skip: the reader lacks it (fastavro skips it unchecked)
    kind: str
    node: _Node
    codes: np.ndarray | None = None  # outcome: writer symbol -> outcome code, -1 = per record
    opt: tuple[int, ...] = ()  # opt: kind per writer branch (-1 = per record)
    single: int | None = None  # opt: a writer type that is not a union


@dataclass(frozen=True, slots=True)
class _Program:
    ops: tuple[_Op, ...]
    defaults: dict[str, Any]  # target fields the writer lacks -> reader default


_TARGETS: Final = {
    "event_time_ms": "long",
    "latency_seconds": "double",
    "model": "string",
    "model_version": "string",
    "outcome": "outcome",
    "score": "opt",
    "prediction": "opt",
    "label": "opt",
    "segment": "opt",
    "features": "features",
}


def _outcome_codes(
    writer: Any, reader: Any, named_w: dict[str, Any], named_r: dict[str, Any]
) -> np.ndarray:
    w = _node(writer, named_w)
    if w[0] != "enum":
        raise _Unsupported("outcome is not an enum")
    if reader is None:
        symbols = list(w[2])
    else:
        r = _node(reader, named_r)
        if r[0] != "enum":
            raise _Unsupported("reader outcome is not an enum")
        rdef = reader.get("default") if isinstance(reader, dict) else named_r[reader].get("default")
        symbols = [s if s in r[2] else rdef for s in w[2]]
    return np.array([OUTCOME_CODES.get(s, -1) if s else -1 for s in symbols], np.int64)


def _compile(writer: Any, reader: Any | None) -> _Program:
    """The program that reads ``writer`` records as fastavro resolves them to ``reader``."""
    if not isinstance(writer, dict) or writer.get("type") != "record":
        raise _Unsupported("writer is not a record")
    named_w: dict[str, Any] = writer.get("__named_schemas", {})
    named_r: dict[str, Any] = {} if reader is None else reader.get("__named_schemas", {})
    rfields = {f["name"]: f for f in (writer if reader is None else reader)["fields"]}
    wnames = {f["name"] for f in writer["fields"]}
    ops: list[_Op] = []
    for f in writer["fields"]:
        name, wt = f["name"], f["type"]
        rf = rfields.get(name)
        node = _node(wt, named_w)
        if rf is None:  # the reader skips it: any bytes fastavro can skip will do
            if _empty_items(node):
                raise _Unsupported(f"{name}: an array of zero-size items")
            ops.append(_Op(name, "skip", node))
            continue
        rt = rf["type"]
        target = _TARGETS.get(name)
        if target is None:
            if _plain(wt) is None or _plain(wt) != _plain(rt):
                raise _Unsupported(f"{name}: read field of type {wt!r}")
            ops.append(_Op(name, "check", node))  # fastavro decodes it: validate UTF-8
        elif target in ("long", "double", "string"):
            if _plain(wt) != target or _plain(rt) != target:
                raise _Unsupported(f"{name}: {wt!r} is not {target}")
            ops.append(_Op(name, target, node))
        elif target == "outcome":
            ops.append(
                _Op(
                    name,
                    target,
                    node,
                    codes=_outcome_codes(wt, None if reader is None else rt, named_w, named_r),
                )
            )
        elif target == "features":
            if node != ("map", ("double",)) or _node(rt, named_r or named_w) != node:
                raise _Unsupported(f"{name}: {wt!r} is not a map of doubles")
            ops.append(_Op(name, target, node))
        else:
            rb = _branches(rt)
            if rb is None or any(b not in _OPT_KINDS for b in rb):
                raise _Unsupported(f"{name}: reader type {rt!r}")
            wb = _branches(wt)
            if wb is None:
                single = _plain(wt)
                if single not in rb:
                    raise _Unsupported(f"{name}: {wt!r} not in {rt!r}")
                ops.append(_Op(name, target, node, single=_OPT_KINDS[str(single)]))
            else:
                # A writer branch the reader lacks fails in fastavro only for records
                # that take it: those go per record.
                kinds = tuple(_OPT_KINDS[b] if b in rb and b is not None else -1 for b in wb)
                ops.append(_Op(name, target, node, opt=kinds))
    defaults: dict[str, Any] = {}
    for name in _TARGETS:
        if name in wnames:
            continue
        rf = rfields.get(name)
        if rf is None or "default" not in rf:
            raise _Unsupported(f"{name}: missing from the writer, no default")
        defaults[name] = rf["default"]
    for name, rf in rfields.items():
        if name not in wnames and "default" not in rf:
            raise _Unsupported(f"{name}: missing from the writer, no default")
    _check_defaults(defaults)
    return _Program(tuple(ops), defaults)


def _check_defaults(defaults: dict[str, Any]) -> None:
    for name, value in defaults.items():
        kind = _TARGETS[name]
        ok = (
            (kind == "string" and isinstance(value, str))
            or (kind == "outcome" and value in OUTCOME_CODES)
            or (kind == "opt" and value is None)
            or (kind == "features" and value == {})
            or (kind == "long" and type(value) is int)
            or (kind == "double" and type(value) in (int, float))
        )
        if not ok:
            raise _Unsupported(f"{name}: default {value!r}")


# -- the bulk pass --------------------------------------------------------------------


class _Buf:
    """The joined bodies (then ``_PAD`` zero bytes) with unaligned 8-byte views for gathers."""

    __slots__ = ("data", "f64", "u8", "u64")

    def __init__(self, padded: bytes) -> None:
        self.data = padded
        self.u8 = np.frombuffer(padded, np.uint8)
        n = len(padded) - 7
        self.u64 = np.ndarray((n,), dtype="<u8", buffer=padded, strides=(1,))
        self.f64 = np.ndarray((n,), dtype="<f8", buffer=padded, strides=(1,))


def _zigzag(v: np.ndarray) -> np.ndarray:
    return ((v >> _ONE) ^ (np.uint64(0) - (v & _ONE))).view(np.int64)


def _varint(buf: _Buf, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Zigzag longs at ``pos``: (values, new positions, rows to leave to fastavro or None)."""
    b0 = buf.u8[pos]
    if not (b0 & np.uint8(0x81)).any():  # one byte, >= 0: lengths, indices, most counts
        return (b0 >> np.uint8(1)).astype(np.int64), pos + 1, None
    if int(b0.max()) < 0x80:
        small = b0.astype(np.int64)
        return (small >> 1) ^ -(small & 1), pos + 1, None
    w = buf.u64[pos]
    stop = ~w & _HI
    low = stop & (~stop + _ONE)  # the lowest byte without a continuation bit; 0: none of 8
    bit = np.frexp(low.astype(np.float64))[1].astype(np.int64) - 1  # 8k + 7 for byte k
    nbytes = (bit >> 3) + 1
    v = w & ((low << _ONE) - _ONE) & _LOW7
    v = (v & _M16) | ((v & ~_M16) >> _ONE)
    v = (v & _M32) | ((v & ~_M32) >> np.uint64(2))
    v = (v & _M64) | ((v & ~_M64) >> np.uint64(4))
    odd = None
    long = np.flatnonzero(low == 0)
    if long.size:
        w2 = buf.u64[pos[long] + 8]
        b8 = w2 & np.uint64(0xFF)
        b9 = (w2 >> np.uint64(8)) & np.uint64(0xFF)
        nine = b8 < 0x80
        ten = ~nine & (b9 <= 1)
        # Rows without a stop byte were masked with all ones: 56 bits are in v already.
        v[long] |= ((b8 & np.uint64(0x7F)) << np.uint64(56)) | (
            np.where(ten, b9, np.uint64(0)) << np.uint64(63)
        )
        nbytes[long] = np.where(nine, 9, 10)
        bad = ~(nine | ten)
        if bad.any():
            odd = long[bad]
    return _zigzag(v), pos + nbytes, odd


_Item = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


class _Run:
    """One bulk pass over the records of one writer schema.

    Cursors of records already known to be bad keep moving (clamped to their record's
    end) so every array keeps one entry per record; their values are never used.
    """

    def __init__(self, buf: _Buf, start: np.ndarray, end: np.ndarray) -> None:
        self.buf = buf
        self.start = start
        self.end = end
        self.bad = np.zeros(start.shape[0], dtype=bool)
        self.all = np.arange(start.shape[0])  # ``rows`` of the top-level fields
        self.cols: dict[str, Any] = {}
        self.checked: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # rows, start, n
        self.feat: list[tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray]] = []

    def ends(self, rows: np.ndarray) -> np.ndarray:
        return self.end if rows is self.all else self.end[rows]

    def settle(self, rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
        e = self.ends(rows)
        over = pos > e
        if over.any():
            self.bad[rows[over]] = True
            pos = np.minimum(pos, e)
        return pos

    def varint(self, rows: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v, pos, odd = _varint(self.buf, pos)
        if odd is not None:
            self.bad[rows[odd]] = True
        return v, self.settle(rows, pos)

    def index(self, rows: np.ndarray, pos: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """A union branch or enum symbol index; out of range -> per record."""
        idx, pos = self.varint(rows, pos)
        out = (idx < 0) | (idx >= n)
        if out.any():
            self.bad[rows[out]] = True
            idx = np.where(out, 0, idx)
        return idx, pos

    def string(
        self, rows: np.ndarray, pos: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start, length, new position) of bytes/strings at ``pos``."""
        n, pos = self.varint(rows, pos)
        room = self.ends(rows) - pos
        off = (n < 0) | (n > room)
        if off.any():
            self.bad[rows[off]] = True
            n = np.clip(n, 0, room)
        return pos, n, pos + n

    def fixed(self, rows: np.ndarray, pos: np.ndarray, size: int) -> np.ndarray:
        return self.settle(rows, pos + size)

    def blocks(self, rows: np.ndarray, pos: np.ndarray, item: _Item, min_item: int) -> np.ndarray:
        """Avro blocks (arrays, maps): one item of every record that has one left per step."""
        pos = pos.copy()
        remaining, pos = self.block_count(rows, pos, min_item)
        act = np.flatnonzero(remaining > 0)
        t = 0
        while act.size:
            if act.shape[0] == rows.shape[0]:  # every record has an item: no gathers
                r = rows
                pos = item(rows, pos, t).copy()
            else:
                r = rows[act]
                pos[act] = item(r, pos[act], t)
            remaining[act] -= 1
            remaining[act[self.bad[r]]] = 0
            fin = act[remaining[act] == 0]
            if fin.size:
                count, p = self.block_count(rows[fin], pos[fin], min_item)
                remaining[fin] = count
                pos[fin] = p
            act = act[remaining[act] > 0]
            t += 1
        return pos

    def block_count(
        self, rows: np.ndarray, pos: np.ndarray, min_item: int
    ) -> tuple[np.ndarray, np.ndarray]:
        count, pos = self.varint(rows, pos)
        neg = np.flatnonzero(count < 0)
        if neg.size:  # a negative count is followed by the block's byte size (unused)
            _size, p = self.varint(rows[neg], pos[neg])
            pos[neg] = p
            count[neg] = -count[neg]
        room = (self.ends(rows) - pos) // min_item
        off = (count < 0) | (count > room)
        if off.any():
            self.bad[rows[off]] = True
        return np.where(off | self.bad[rows], 0, count), pos

    def skip(self, node: _Node, rows: np.ndarray, pos: np.ndarray, utf8: bool) -> np.ndarray:
        kind = node[0]
        if kind == "null":
            return pos
        if kind in ("int", "long"):
            return self.varint(rows, pos)[1]
        if kind == "boolean":
            if (self.buf.u8[pos] > 1).any():
                self.bad[rows[self.buf.u8[pos] > 1]] = True
            return self.settle(rows, pos + 1)
        if kind == "float":
            return self.settle(rows, pos + 4)
        if kind == "double":
            return self.settle(rows, pos + 8)
        if kind in ("string", "bytes"):
            start, n, pos = self.string(rows, pos)
            if utf8 and kind == "string":
                self.checked.append((rows, start, n))
            return pos
        if kind == "fixed":
            return self.fixed(rows, pos, int(node[1]))
        if kind == "enum":
            return self.index(rows, pos, int(node[1]))[1]
        if kind == "union":
            branches = node[1]
            idx, pos = self.index(rows, pos, len(branches))
            if len(branches) == 1:
                return self.skip(branches[0], rows, pos, utf8)
            pos = pos.copy()
            for b, branch in enumerate(branches):
                sel = np.flatnonzero(idx == b)
                if sel.size and branch != ("null",):
                    pos[sel] = self.skip(branch, rows[sel], pos[sel], utf8)
            return pos
        if kind == "array":
            inner = node[1]
            return self.blocks(
                rows, pos, lambda r, p, _t: self.skip(inner, r, p, utf8), _min_size(inner)
            )
        if kind == "map":
            value = node[1]

            def entry(r: np.ndarray, p: np.ndarray, _t: int) -> np.ndarray:
                p = self.skip(("string",), r, p, utf8)
                return self.skip(value, r, p, utf8)

            return self.blocks(rows, pos, entry, 1 + _min_size(value))
        for f in node[1]:
            pos = self.skip(f, rows, pos, utf8)
        return pos

    def opt(self, op: _Op, rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
        m = rows.shape[0]
        if op.single is not None:
            branch_of: np.ndarray | None = None
            plan: tuple[int, ...] = (op.single,)
        else:
            plan = op.opt
            branch_of, pos = self.index(rows, pos, len(plan))  # a new array: ours to change
        kinds = np.zeros(m, dtype=np.int8)
        value = np.full(m, np.nan, dtype=FLOAT_DTYPE)
        start = np.zeros(m, dtype=np.int64)
        length = np.zeros(m, dtype=np.int64)
        for b, kind in enumerate(plan):
            sel: np.ndarray | None = None  # None: every record takes this branch
            if branch_of is not None:
                mask = branch_of == b
                count = int(np.count_nonzero(mask))
                if not count:
                    continue
                if count < m:
                    sel = np.flatnonzero(mask)
            r, p = (rows, pos) if sel is None else (rows[sel], pos[sel])
            if kind < 0:
                self.bad[r] = True
            elif kind == _DBL:
                got = self.buf.f64[p]
                p = self.settle(r, p + 8)
                if sel is None:
                    value = got
                else:
                    value[sel] = got
            elif kind == _STR:
                s, n, p = self.string(r, p)
                if sel is None:
                    start, length = s, n
                else:
                    start[sel] = s
                    length[sel] = n
            if sel is None:
                kinds[:] = kind
                pos = p
            else:
                kinds[sel] = kind
                pos[sel] = p
        self.cols[op.name] = (kinds, value, start, length)
        return pos

    def features(self, rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
        def entry(r: np.ndarray, p: np.ndarray, t: int) -> np.ndarray:
            s, n, p = self.string(r, p)
            v = self.buf.f64[p]
            p = self.settle(r, p + 8)
            self.feat.append((r, t, s, n, v))
            return p

        return self.blocks(rows, pos, entry, 9)

    def run(self, program: _Program) -> None:
        rows = self.all
        pos = self.start
        buf = self.buf
        for op in program.ops:
            kind = op.kind
            if kind == "long":
                self.cols[op.name], pos = self.varint(rows, pos)
            elif kind == "double":
                self.cols[op.name] = buf.f64[pos]
                pos = self.settle(rows, pos + 8)
            elif kind == "string":
                s, n, pos = self.string(rows, pos)
                self.cols[op.name] = (s, n)
            elif kind == "outcome":
                assert op.codes is not None
                idx, pos = self.index(rows, pos, op.codes.shape[0])
                code = op.codes[idx]
                unmapped = code < 0
                if unmapped.any():
                    self.bad[unmapped] = True
                self.cols[op.name] = code
            elif kind == "opt":
                pos = self.opt(op, rows, pos)
            elif kind == "features":
                pos = self.features(rows, pos)
            else:
                pos = self.skip(op.node, rows, pos, op.kind == "check")
        self.bad |= pos != self.end  # short (already flagged) or trailing bytes


# -- strings --------------------------------------------------------------------------


class _Strings:
    """Every distinct string of one call, numbered densely in order of first decoding."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.ids: dict[str, int] = {}
        self.names: list[str] = []

    def add(self, raw: bytes) -> int:
        """The id of ``raw`` decoded as UTF-8, or -1 when it is not valid UTF-8."""
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            return -1
        found = self.ids.get(text)
        if found is None:
            found = self.ids[text] = len(self.names)
            self.names.append(text)
        return found

    def intern(self, buf: _Buf, start: np.ndarray, n: np.ndarray) -> np.ndarray:
        """Ids of the strings at (start, n); -1 for invalid UTF-8. Decodes distinct values only."""
        k = start.shape[0]
        if not k:
            return np.empty(0, dtype=np.int64)
        longest = int(n.max())
        if longest > _MAX_STR:
            return self._intern_bytes(start, n)
        if longest < 8:  # the bytes and the length fit one word: an exact key
            key = (buf.u64[start] & _BYTE_MASKS[n]) | (n.astype(np.uint64) << np.uint64(56))
            _uniq, inv = np.unique(key, return_inverse=True)
            rep = np.empty(_uniq.shape[0], dtype=np.int64)
            rep[inv] = np.arange(k)
            return self._decode(start, n, rep, inv)
        h = n.astype(np.uint64) * _MIX
        words = []
        for j in range((longest + 7) // 8):
            w = buf.u64[start + 8 * j] & _BYTE_MASKS[np.clip(n - 8 * j, 0, 8)]
            words.append(w)
            h = (h ^ w) * _MIX2
            h ^= h >> np.uint64(29)
        _uniq, inv = np.unique(h, return_inverse=True)
        rep = np.empty(_uniq.shape[0], dtype=np.int64)
        rep[inv] = np.arange(k)  # any member represents its hash
        back = rep[inv]
        if not (n[back] == n).all() or not all((w[back] == w).all() for w in words):
            return self._intern_bytes(start, n)  # a 64-bit hash collision: exact path
        return self._decode(start, n, rep, inv)

    def _decode(
        self, start: np.ndarray, n: np.ndarray, rep: np.ndarray, inv: np.ndarray
    ) -> np.ndarray:
        data = self.data
        spans = zip(start[rep].tolist(), n[rep].tolist(), strict=True)
        local = np.array([self.add(data[s : s + ln]) for s, ln in spans], dtype=np.int64)
        ids: np.ndarray = local[inv]
        return ids

    def _intern_bytes(self, start: np.ndarray, n: np.ndarray) -> np.ndarray:
        data = self.data
        seen: dict[bytes, int] = {}
        out = np.empty(start.shape[0], dtype=np.int64)
        for i, (s, ln) in enumerate(zip(start.tolist(), n.tolist(), strict=True)):
            raw = data[s : s + ln]
            found = seen.get(raw)
            if found is None:
                found = seen[raw] = self.add(raw)
            out[i] = found
        return out


def _non_ascii(buf: _Buf, start: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Which spans hold a byte >= 0x80 (one pass of np.maximum.reduceat over the buffer)."""
    if not start.shape[0]:
        return np.zeros(0, dtype=bool)
    longest = int(n.max())
    if longest <= _MAX_STR:
        high = np.zeros(start.shape[0], dtype=np.uint64)
        for j in range((longest + 7) // 8):
            high |= buf.u64[start + 8 * j] & _BYTE_MASKS[np.clip(n - 8 * j, 0, 8)]
        found_w: np.ndarray = (high & _HI) != 0
        return found_w
    bounds = np.empty(2 * start.shape[0], dtype=np.int64)
    bounds[0::2] = start
    bounds[1::2] = start + n
    top = np.maximum.reduceat(buf.u8, bounds)[0::2]
    found: np.ndarray = (top >= 0x80) & (n > 0)
    return found


def _first_seen(ids: np.ndarray, positions: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes of ``ids`` numbered in order of their smallest position; ids in code order."""
    first = np.full(size, _BIG, dtype=np.int64)
    np.minimum.at(first, ids, positions)
    present = np.flatnonzero(first < _BIG)
    order = present[np.argsort(first[present], kind="stable")]
    rank = np.full(size, -1, dtype=np.int64)
    rank[order] = np.arange(order.shape[0])
    return rank[ids], order


# -- from a pass to columns -----------------------------------------------------------


@dataclass(slots=True)
class _Group:
    """Accepted records of one writer schema; strings as ids into the call's ``_Strings``."""

    msgs: np.ndarray  # message index of each accepted record, increasing
    event_time_ms: np.ndarray
    latency_seconds: np.ndarray
    outcome: np.ndarray
    score: np.ndarray
    model: np.ndarray
    version: np.ndarray
    pred_kind: np.ndarray
    pred_value: np.ndarray
    pred_id: np.ndarray  # per row whose prediction is a string, in row order
    label_kind: np.ndarray
    label_value: np.ndarray
    label_id: np.ndarray
    segment: np.ndarray  # -1 = none
    feat_row: np.ndarray  # into this group's accepted records
    feat_t: np.ndarray  # item index within its record's map
    feat_id: np.ndarray
    feat_value: np.ndarray


def _check_utf8(run: _Run) -> None:
    """Flag records with invalid UTF-8 in strings fastavro decodes but no column keeps."""
    data = run.buf.data
    for rows, start, n in run.checked:
        live = np.flatnonzero(~run.bad[rows])
        suspects = live[_non_ascii(run.buf, start[live], n[live])]
        spans = zip(suspects.tolist(), start[suspects].tolist(), n[suspects].tolist(), strict=True)
        for i, s, ln in spans:
            try:
                data[s : s + ln].decode()
            except UnicodeDecodeError:
                run.bad[rows[i]] = True


def _string_ids(
    run: _Run,
    program: _Program,
    strings: _Strings,
    name: str,
    ok: np.ndarray,
    flagged: list[np.ndarray],
) -> np.ndarray:
    """Ids of a string field of the records ``ok`` (its reader default when absent)."""
    if name in run.cols:
        start, n = run.cols[name]
        got = strings.intern(run.buf, start[ok], n[ok])
        flagged.append(ok[got < 0])
        return got
    default = strings.add(str(program.defaults[name]).encode())
    return np.full(ok.shape[0], default, dtype=np.int64)


def _collect(run: _Run, program: _Program, strings: _Strings, msgs: np.ndarray) -> _Group:
    """Intern the strings of the records the pass accepted; flag more records if need be."""
    buf, cols, defaults = run.buf, run.cols, program.defaults
    _check_utf8(run)
    if run.feat:
        fr = np.concatenate([f[0] for f in run.feat])
        ft = np.concatenate([np.full(f[0].shape[0], f[1], dtype=np.int64) for f in run.feat])
        fs = np.concatenate([f[2] for f in run.feat])
        fn = np.concatenate([f[3] for f in run.feat])
        fv = np.concatenate([f[4] for f in run.feat])
    else:
        fr = ft = fs = fn = np.empty(0, dtype=np.int64)
        fv = np.empty(0, dtype=FLOAT_DTYPE)
    none = np.empty(0, dtype=np.int64)
    while True:
        ok = np.flatnonzero(~run.bad)
        m = ok.shape[0]
        flagged: list[np.ndarray] = []
        model = _string_ids(run, program, strings, "model", ok, flagged)
        version = _string_ids(run, program, strings, "model_version", ok, flagged)
        opts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for name in ("prediction", "label", "segment", "score"):
            if name not in cols:
                opts[name] = (np.zeros(m, np.int8), np.full(m, np.nan, FLOAT_DTYPE), none)
                continue
            kinds, value, start, n = cols[name]
            kinds, value = kinds[ok], value[ok]
            sel = np.flatnonzero(kinds == _STR)
            got = strings.intern(buf, start[ok[sel]], n[ok[sel]]) if sel.size else none
            flagged.append(ok[sel[got < 0]])
            opts[name] = (kinds, value, got)
        live = np.flatnonzero(~run.bad[fr])
        feat_id = strings.intern(buf, fs[live], fn[live])
        flagged.append(fr[live[feat_id < 0]])
        if live.size > 1:
            # fastavro keeps the last value of a repeated key at the first key's place:
            # rare enough to leave such records (and then the batch) to it.
            key = fr[live] * (len(strings.names) + 1) + feat_id
            order = np.sort(key)
            dup = order[1:][order[1:] == order[:-1]]
            flagged.append(dup // (len(strings.names) + 1))
        new = np.concatenate(flagged) if flagged else none
        if not new.size:
            break
        run.bad[new] = True
    seg_kind, _seg_value, seg_got = opts["segment"]
    segment = np.full(m, -1, dtype=np.int64)
    segment[seg_kind == _STR] = seg_got
    where = np.full(run.bad.shape[0], -1, dtype=np.int64)
    where[ok] = np.arange(m)
    outcome = (
        cols["outcome"][ok]
        if "outcome" in cols
        else np.full(m, OUTCOME_CODES[defaults["outcome"]], dtype=np.int64)
    )

    def number(name: str, dtype: np.dtype[Any]) -> np.ndarray:
        if name in cols:
            return np.asarray(cols[name][ok], dtype=dtype)
        return np.full(m, defaults[name], dtype=dtype)

    return _Group(
        msgs=msgs[ok],
        event_time_ms=number("event_time_ms", EVENT_TIME_DTYPE),
        latency_seconds=number("latency_seconds", FLOAT_DTYPE),
        outcome=outcome,
        score=opts["score"][1],
        model=model,
        version=version,
        pred_kind=opts["prediction"][0],
        pred_value=opts["prediction"][1],
        pred_id=opts["prediction"][2],
        label_kind=opts["label"][0],
        label_value=opts["label"][1],
        label_id=opts["label"][2],
        segment=segment,
        feat_row=where[fr[live]],
        feat_t=ft[live],
        feat_id=feat_id,
        feat_value=fv[live],
    )


def _assemble(groups: list[_Group], offsets: np.ndarray, strings: _Strings) -> RowChunk:
    """One chunk in message order, codes numbered as ``EventChunkBuilder`` numbers them."""
    if len(groups) == 1:
        accepted = groups[0].msgs
        rows_of = [np.arange(accepted.shape[0])]
    else:
        accepted = np.sort(np.concatenate([g.msgs for g in groups]))
        rows_of = [np.searchsorted(accepted, g.msgs) for g in groups]
    r = accepted.shape[0]
    size = len(strings.names)

    def column(name: str, dtype: np.dtype[Any]) -> np.ndarray:
        if len(groups) == 1:
            return np.asarray(getattr(groups[0], name), dtype=dtype)
        out = np.empty(r, dtype=dtype)
        for g, rows in zip(groups, rows_of, strict=True):
            out[rows] = getattr(g, name)
        return out

    pred_kind = column("pred_kind", np.dtype(np.int8))
    label_kind = column("label_kind", np.dtype(np.int8))
    # Classes: first seen over prediction then label of each row in turn.
    pred_rows = [rows[g.pred_kind == _STR] for g, rows in zip(groups, rows_of, strict=True)]
    label_rows = [rows[g.label_kind == _STR] for g, rows in zip(groups, rows_of, strict=True)]
    cls_ids = np.concatenate([g.pred_id for g in groups] + [g.label_id for g in groups])
    pr, lr = np.concatenate(pred_rows), np.concatenate(label_rows)
    cls_codes, cls_order = _first_seen(cls_ids, np.concatenate([2 * pr, 2 * lr + 1]), size)
    pred_code = np.full(r, NO_CLASS, dtype=CLASS_DTYPE)
    pred_code[pr] = cls_codes[: pr.shape[0]]
    label_code = np.full(r, NO_CLASS, dtype=CLASS_DTYPE)
    label_code[lr] = cls_codes[pr.shape[0] :]
    # (model, version) keys.
    pair = column("model", np.dtype(np.int64)) * size + column("version", np.dtype(np.int64))
    uniq, inv = np.unique(pair, return_inverse=True)
    mv, key_order = _first_seen(inv, np.arange(r), uniq.shape[0])
    keys = [(strings.names[u // size], strings.names[u % size]) for u in uniq[key_order].tolist()]
    informative = np.flatnonzero((pred_kind != _NULL) | (label_kind != _NULL))
    is_float = (pred_kind == _DBL) | (label_kind == _DBL)
    first = np.full(len(keys), _BIG, dtype=np.int64)
    np.minimum.at(first, mv[informative], informative)
    regression: list[bool | None] = [
        None if f == _BIG else bool(is_float[f]) for f in first.tolist()
    ]
    seg = column("segment", np.dtype(np.int64))
    has_seg = np.flatnonzero(seg >= 0)
    seg_codes, seg_order = _first_seen(seg[has_seg], has_seg, size)
    segment = np.full(r, NO_CLASS, dtype=CLASS_DTYPE)
    segment[has_seg] = seg_codes
    # Features in long form: row by row, each map in its wire order.
    f_rows = np.concatenate([rows[g.feat_row] for g, rows in zip(groups, rows_of, strict=True)])
    counts = np.bincount(f_rows, minlength=r)
    place = (np.cumsum(counts) - counts)[f_rows] + np.concatenate([g.feat_t for g in groups])
    f_ids = np.concatenate([g.feat_id for g in groups])
    f_codes, f_order = _first_seen(f_ids, place, size)
    feat_row = np.empty(place.shape[0], dtype=np.int64)
    feat_row[place] = f_rows
    feat_code = np.empty(place.shape[0], dtype=np.int32)
    feat_code[place] = f_codes
    feat_value = np.empty(place.shape[0], dtype=FLOAT_DTYPE)
    feat_value[place] = np.concatenate([g.feat_value for g in groups])
    names = strings.names
    return RowChunk(
        mv_keys=keys,
        regression=regression,
        mv=mv.astype(np.int32),
        offset=offsets[accepted].astype(np.int64),
        event_time_ms=column("event_time_ms", EVENT_TIME_DTYPE),
        latency_seconds=column("latency_seconds", FLOAT_DTYPE),
        outcome=column("outcome", OUTCOME_DTYPE),
        score=column("score", FLOAT_DTYPE),
        classes=[names[i] for i in cls_order.tolist()],
        pred_code=pred_code,
        label_code=label_code,
        pred_value=column("pred_value", FLOAT_DTYPE),
        label_value=column("label_value", FLOAT_DTYPE),
        segments=[names[i] for i in seg_order.tolist()],
        segment=segment,
        feature_names=[names[i] for i in f_order.tolist()],
        feat_row=feat_row,
        feat_code=feat_code,
        feat_value=feat_value,
    )


# -- the public door ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventDecodeResult:
    """Rows of the accepted messages, plus (index into the values, error) per reject."""

    chunk: RowChunk
    rejected: list[tuple[int, DecodeError]]
    bulk: bool  # False: the per-record path decoded the whole batch


def decode_events_per_record(
    values: Sequence[bytes | None], offsets: Sequence[int] | np.ndarray, resolver: SchemaResolver
) -> EventDecodeResult:
    """The reference path: fastavro record by record into an ``EventChunkBuilder``.

    It is what the shard does with per-event messages; ``EventDecoder`` falls back to it.
    """
    builder = EventChunkBuilder()
    rejected: list[tuple[int, DecodeError]] = []
    read = resolver.read
    offs = offsets.tolist() if isinstance(offsets, np.ndarray) else list(offsets)
    for i, (value, off) in enumerate(zip(values, offs, strict=True)):
        try:
            kind, rec = read(value)
            if kind != SchemaId.PREDICTION_EVENT:
                raise ValueError(f"values[{i}] is not a PredictionEvent (schema kind {kind})")
            try:
                builder.add(rec, off)
            except (KeyError, TypeError) as exc:
                raise DecodeError("undecodable", f"bad record: {exc}") from None
        except DecodeError as exc:
            rejected.append((i, exc))
    return EventDecodeResult(builder.build(), rejected, bulk=False)


class EventDecoder:
    """Decode the ``PredictionEvent`` messages of one consumed batch at once.

    >>> from aggregator.decode import SchemaResolver
    >>> from schemas.wire import frame
    >>> decoder = EventDecoder(SchemaResolver(), min_bulk=0)
    >>> body = bytes([0, 2, 2, 109, 0]) + bytes(8) + bytes([0, 0, 0, 0, 0, 0, 0, 0])
    >>> result = decoder.decode([frame(1, body)], [42])
    >>> result.chunk.mv_keys, result.chunk.offset.tolist(), result.bulk
    ([('m', '')], [42], True)
    """

    def __init__(self, resolver: SchemaResolver, *, min_bulk: int = MIN_BULK) -> None:
        if min_bulk < 0:
            raise ValueError(f"min_bulk must be >= 0, got {min_bulk}")
        self._resolver = resolver
        self._min_bulk = min_bulk
        self._programs: dict[int, _Program | None] = {}

    def program(self, schema_id: int) -> _Program | None:
        """The compiled program of a writer schema id (None: decode it per record).

        Raises ``DecodeError`` when the id cannot be resolved (not cached: it may be
        registered later).
        """
        if schema_id in self._programs:
            return self._programs[schema_id]
        kind, writer, reader = self._resolver.resolve(schema_id)
        if kind != SchemaId.PREDICTION_EVENT:
            raise ValueError(f"schema id {schema_id} is not a PredictionEvent schema")
        try:
            program: _Program | None = _compile(writer, reader)
        except (_Unsupported, KeyError, TypeError, ValueError):
            program = None
        self._programs[schema_id] = program
        return program

    def decode(
        self, values: Sequence[bytes | None], offsets: Sequence[int] | np.ndarray
    ) -> EventDecodeResult:
        """Decode framed ``PredictionEvent`` values; ``offsets`` are their Kafka offsets.

        Equal to ``decode_events_per_record`` on the same input, which it uses for fewer
        than ``min_bulk`` values and for writer schemas it cannot compile. Raises
        ``ValueError`` for a message of another kind that decodes (the caller splits its
        batch by kind first).
        """
        n = len(values)
        offs = np.asarray(offsets, dtype=np.int64)
        if offs.shape != (n,):
            raise ValueError(f"{n} values but {offs.shape[0]} offsets")
        if n < self._min_bulk:  # a pass costs ~0.5 ms whatever the count
            return decode_events_per_record(values, offs, self._resolver)
        if not n:
            return EventDecodeResult(EventChunkBuilder().build(), [], bulk=True)
        try:
            padded = b"".join([*values, _ZEROS])  # type: ignore[list-item]  # None: below
            present: Sequence[bytes] = values  # type: ignore[assignment]
        except TypeError:  # a tombstone: read() rejects it as truncated, like b""
            present = [b"" if v is None else v for v in values]
            padded = b"".join([*present, _ZEROS])
        lens = np.fromiter(map(len, present), dtype=np.int64, count=n)
        buf = _Buf(padded)
        size = len(padded) - _PAD
        end = np.cumsum(lens)
        start = end - lens
        framed = lens >= HEADER.size
        first = np.minimum(start, size)
        magic = buf.u8[first]
        sid = (
            (buf.u8[first + 1].astype(np.int64) << 24)
            | (buf.u8[first + 2].astype(np.int64) << 16)
            | (buf.u8[first + 3].astype(np.int64) << 8)
            | buf.u8[first + 4].astype(np.int64)
        )
        framed &= magic == MAGIC_BYTE
        suspect = ~framed
        strings = _Strings(padded)
        groups: list[_Group] = []
        rejected: list[tuple[int, DecodeError]] = []
        for schema_id in np.unique(sid[framed]).tolist():
            members = np.flatnonzero(framed & (sid == schema_id))
            try:
                program = self.program(int(schema_id))
            except DecodeError as exc:
                # This lookup was the first message's; the others look up again in
                # read(), as they would one by one (the resolver caches or backs off).
                rejected.append((int(members[0]), exc))
                suspect[members[1:]] = True
                continue
            except ValueError:
                # Another kind (a corrupt id, say): read() says whether the message
                # decodes (then the caller sent a non-event: ValueError) or is rejected.
                suspect[members] = True
                continue
            if program is None:
                return decode_events_per_record(values, offs, self._resolver)
            run = _Run(buf, start[members] + HEADER.size, end[members])
            run.run(program)
            group = _collect(run, program, strings, members)
            suspect[members[run.bad]] = True
            groups.append(group)
        read = self._resolver.read
        for i in np.flatnonzero(suspect).tolist():
            try:
                kind, _rec = read(values[i])
            except DecodeError as exc:
                rejected.append((i, exc))
                continue
            if kind != SchemaId.PREDICTION_EVENT:
                raise ValueError(f"values[{i}] is not a PredictionEvent (schema kind {kind})")
            # fastavro takes a record the bulk pass would not vouch for: let it do all.
            return decode_events_per_record(values, offs, self._resolver)
        rejected.sort(key=lambda item: item[0])
        if not groups:
            return EventDecodeResult(EventChunkBuilder().build(), rejected, bulk=True)
        return EventDecodeResult(_assemble(groups, offs, strings), rejected, bulk=True)
