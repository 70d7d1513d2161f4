"""The bulk pass: every record's cursor advanced field by field over one joined buffer.

``Buf`` holds the joined bodies with unaligned 8-byte views; ``Run`` executes a
``Program`` over all records of one writer schema, gathering zigzag varints, doubles
and (start, length) string spans with numpy, and flags (``bad``) every record it
cannot vouch for, which then goes per record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import numpy as np

from aggregator.bulk.program import DBL, STR, Node, Op, Program, min_size
from schemas.wire import FLOAT_DTYPE

__all__ = ["HI", "PAD", "ZEROS", "Buf", "Run"]

PAD: Final = 64  # zero bytes after the buffer: gathers past a record's end stay in bounds
ZEROS: Final = bytes(PAD)
HI: Final = np.uint64(0x8080808080808080)
_LOW7: Final = np.uint64(0x7F7F7F7F7F7F7F7F)
_M16: Final = np.uint64(0x00FF00FF00FF00FF)
_M32: Final = np.uint64(0x0000FFFF0000FFFF)
_M64: Final = np.uint64(0x00000000FFFFFFFF)
_ONE: Final = np.uint64(1)


class Buf:
    """The joined bodies (then ``PAD`` zero bytes) with unaligned 8-byte views for gathers."""

    __slots__ = ("data", "f64", "u8", "u64")

    def __init__(self, padded: bytes) -> None:
        self.data = padded
        self.u8 = np.frombuffer(padded, np.uint8)
        n = len(padded) - 7
        self.u64 = np.ndarray((n,), dtype="<u8", buffer=padded, strides=(1,))
        self.f64 = np.ndarray((n,), dtype="<f8", buffer=padded, strides=(1,))


def _zigzag(v: np.ndarray) -> np.ndarray:
    return ((v >> _ONE) ^ (np.uint64(0) - (v & _ONE))).view(np.int64)


def _varint(buf: Buf, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Zigzag longs at ``pos``: (values, new positions, rows to leave to fastavro or None)."""
    b0 = buf.u8[pos]
    if not (b0 & np.uint8(0x81)).any():  # one byte, >= 0: lengths, indices, most counts
        return (b0 >> np.uint8(1)).astype(np.int64), pos + 1, None
    if int(b0.max()) < 0x80:
        small = b0.astype(np.int64)
        return (small >> 1) ^ -(small & 1), pos + 1, None
    w = buf.u64[pos]
    stop = ~w & HI
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


Item = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


class Run:
    """One bulk pass over the records of one writer schema.

    Cursors of records already known to be bad keep moving (clamped to their record's
    end) so every array keeps one entry per record; their values are never used.
    """

    def __init__(self, buf: Buf, start: np.ndarray, end: np.ndarray) -> None:
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

    def blocks(self, rows: np.ndarray, pos: np.ndarray, item: Item, min_item: int) -> np.ndarray:
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

    def skip(self, node: Node, rows: np.ndarray, pos: np.ndarray, utf8: bool) -> np.ndarray:
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
                rows, pos, lambda r, p, _t: self.skip(inner, r, p, utf8), min_size(inner)
            )
        if kind == "map":
            value = node[1]

            def entry(r: np.ndarray, p: np.ndarray, _t: int) -> np.ndarray:
                p = self.skip(("string",), r, p, utf8)
                return self.skip(value, r, p, utf8)

            return self.blocks(rows, pos, entry, 1 + min_size(value))
        for f in node[1]:
            pos = self.skip(f, rows, pos, utf8)
        return pos

    def opt(self, op: Op, rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
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
            elif kind == DBL:
                got = self.buf.f64[p]
                p = self.settle(r, p + 8)
                if sel is None:
                    value = got
                else:
                    value[sel] = got
            elif kind == STR:
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

    def run(self, program: Program) -> None:
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
            elif kind in ("string", "id"):
                s, n, pos = self.string(rows, pos)
                self.cols[op.name] = (s, n)
                if kind == "id":  # never interned: checked like the fields fastavro decodes
                    self.checked.append((rows, s, n))
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
