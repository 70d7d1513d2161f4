"""Writer schema -> the program of a bulk pass (which field to read how, and where to).

``compile_program`` turns a ``PredictionEvent`` writer schema (and the reader schema
fastavro would resolve it to) into ``Op``s; a schema it does not understand raises
``Unsupported`` and is decoded per record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from schemas.wire import OUTCOME_CODES

__all__ = [
    "DBL",
    "NULL",
    "STR",
    "Node",
    "Op",
    "Program",
    "Unsupported",
    "compile_program",
    "min_size",
]

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
NULL, STR, DBL = 0, 1, 2
_OPT_KINDS: Final = {"null": NULL, "string": STR, "double": DBL}


class Unsupported(Exception):
    """The compiler cannot turn this schema into a program; decode per record."""


# A node is a tuple: (primitive,), ("fixed", size), ("enum", n_symbols, symbols),
# ("union", branches), ("array", item), ("map", value), ("record", fields).
Node = tuple[Any, ...]


def _node(t: Any, named: dict[str, Any], stack: tuple[str, ...] = ()) -> Node:
    if isinstance(t, list):
        return ("union", tuple(_node(b, named, stack) for b in t))
    if isinstance(t, str):
        if t in _PRIMITIVES:
            return (t,)
        if t in stack or t not in named:
            raise Unsupported(f"recursive or unknown named type {t}")
        return _node(named[t], named, stack)
    if not isinstance(t, dict):
        raise Unsupported(f"schema node {t!r}")
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


def min_size(node: Node) -> int:
    kind = node[0]
    if kind in _MIN_SIZE:
        return _MIN_SIZE[kind]
    if kind == "fixed":
        return int(node[1])
    if kind in ("enum", "union", "array", "map"):
        return 1
    return sum(min_size(f) for f in node[1])


def _empty_items(node: Node) -> bool:
    """Whether an array anywhere in ``node`` has items of zero bytes (no bound on counts)."""
    kind = node[0]
    if kind == "array":
        return min_size(node[1]) == 0 or _empty_items(node[1])
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
class Op:
    """One writer field: what to read and where it goes."""

    name: str
    # long, double, string, outcome, opt, features: columns; id: a string kept as its
    # span and hashed, never decoded (UTF-8 validated only); check: read by fastavro but
    # not kept (validated only); skip: the reader lacks it (fastavro skips it unchecked)
    kind: str
    node: Node
    codes: np.ndarray | None = None  # outcome: writer symbol -> outcome code, -1 = per record
    opt: tuple[int, ...] = ()  # opt: kind per writer branch (-1 = per record)
    single: int | None = None  # opt: a writer type that is not a union


@dataclass(frozen=True, slots=True)
class Program:
    ops: tuple[Op, ...]
    defaults: dict[str, Any]  # target fields the writer lacks -> reader default


_TARGETS: Final = {
    "event_id": "id",
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
        raise Unsupported("outcome is not an enum")
    if reader is None:
        symbols = list(w[2])
    else:
        r = _node(reader, named_r)
        if r[0] != "enum":
            raise Unsupported("reader outcome is not an enum")
        rdef = reader.get("default") if isinstance(reader, dict) else named_r[reader].get("default")
        symbols = [s if s in r[2] else rdef for s in w[2]]
    return np.array([OUTCOME_CODES.get(s, -1) if s else -1 for s in symbols], np.int64)


def compile_program(writer: Any, reader: Any | None) -> Program:
    """The program that reads ``writer`` records as fastavro resolves them to ``reader``."""
    if not isinstance(writer, dict) or writer.get("type") != "record":
        raise Unsupported("writer is not a record")
    named_w: dict[str, Any] = writer.get("__named_schemas", {})
    named_r: dict[str, Any] = {} if reader is None else reader.get("__named_schemas", {})
    rfields = {f["name"]: f for f in (writer if reader is None else reader)["fields"]}
    wnames = {f["name"] for f in writer["fields"]}
    ops: list[Op] = []
    for f in writer["fields"]:
        name, wt = f["name"], f["type"]
        rf = rfields.get(name)
        node = _node(wt, named_w)
        if rf is None:  # the reader skips it: any bytes fastavro can skip will do
            if _empty_items(node):
                raise Unsupported(f"{name}: an array of zero-size items")
            ops.append(Op(name, "skip", node))
            continue
        rt = rf["type"]
        target = _TARGETS.get(name)
        if target is None:
            if _plain(wt) is None or _plain(wt) != _plain(rt):
                raise Unsupported(f"{name}: read field of type {wt!r}")
            ops.append(Op(name, "check", node))  # fastavro decodes it: validate UTF-8
        elif target in ("long", "double", "string", "id"):
            wire = "string" if target == "id" else target
            if _plain(wt) != wire or _plain(rt) != wire:
                raise Unsupported(f"{name}: {wt!r} is not {wire}")
            ops.append(Op(name, target, node))
        elif target == "outcome":
            ops.append(
                Op(
                    name,
                    target,
                    node,
                    codes=_outcome_codes(wt, None if reader is None else rt, named_w, named_r),
                )
            )
        elif target == "features":
            if node != ("map", ("double",)) or _node(rt, named_r or named_w) != node:
                raise Unsupported(f"{name}: {wt!r} is not a map of doubles")
            ops.append(Op(name, target, node))
        else:
            rb = _branches(rt)
            if rb is None or any(b not in _OPT_KINDS for b in rb):
                raise Unsupported(f"{name}: reader type {rt!r}")
            wb = _branches(wt)
            if wb is None:
                single = _plain(wt)
                if single not in rb:
                    raise Unsupported(f"{name}: {wt!r} not in {rt!r}")
                ops.append(Op(name, target, node, single=_OPT_KINDS[str(single)]))
            else:
                # A writer branch the reader lacks fails in fastavro only for records
                # that take it: those go per record.
                kinds = tuple(_OPT_KINDS[b] if b in rb and b is not None else -1 for b in wb)
                ops.append(Op(name, target, node, opt=kinds))
    defaults: dict[str, Any] = {}
    for name in _TARGETS:
        if name in wnames:
            continue
        rf = rfields.get(name)
        if rf is None or "default" not in rf:
            raise Unsupported(f"{name}: missing from the writer, no default")
        defaults[name] = rf["default"]
    for name, rf in rfields.items():
        if name not in wnames and "default" not in rf:
            raise Unsupported(f"{name}: missing from the writer, no default")
    _check_defaults(defaults)
    return Program(tuple(ops), defaults)


def _check_defaults(defaults: dict[str, Any]) -> None:
    for name, value in defaults.items():
        kind = _TARGETS[name]
        ok = (
            (kind in ("string", "id") and isinstance(value, str))
            or (kind == "outcome" and value in OUTCOME_CODES)
            or (kind == "opt" and value is None)
            or (kind == "features" and value == {})
            or (kind == "long" and type(value) is int)
            or (kind == "double" and type(value) in (int, float))
        )
        if not ok:
            raise Unsupported(f"{name}: default {value!r}")
