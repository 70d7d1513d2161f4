"""Numpy arrays -> Prometheus text exposition format 0.0.4, fast.

prometheus_client's ``generate_latest`` builds a ``Sample`` and formats it with
several Python calls per line, about 0.9 s for 100k series. This module renders
the same bytes (it mirrors ``prometheus_client.exposition.generate_latest``: HELP
and TYPE lines, ``_total`` on counters, label names in sorted order, ``le``
sorted among them, ``floatToGoString`` numbers) from whole numpy columns: the
escaped ``name{labels} `` prefix of every line is kept in a ``LabelCache``
(label_cache.py) across renders, values are formatted with C-level ``map``
calls, and lines are joined once. Call it off the consume path, only when the
data changed, and serve the cached bytes.

One deliberate difference: prometheus_client drops a histogram's ``_count`` and
``_sum`` when its first bucket bound is negative (an OpenMetrics rule); format
0.0.4 requires both, so they are always written here.
"""

from __future__ import annotations

import gzip
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, pairwise
from operator import itemgetter
from typing import Any, Final, Literal, NamedTuple

import numpy as np
from numpy.typing import NDArray

from aggregator.label_cache import LabelCache

__all__ = [
    "CONTENT_TYPE",
    "Family",
    "Kind",
    "LabelCache",
    "Payload",
    "render",
    "render_payload",
]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

Kind = Literal["counter", "gauge", "histogram"]
_Labels = tuple[str, ...]

_F8 = NDArray[np.float64]
_KINDS: Final = ("counter", "gauge", "histogram")
_METRIC_NAME: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_NUMERIC_KINDS: Final = "biuf"
# Below 1e6 an integral float prints as its integer plus ".0" (repr and Go agree);
# at 1e6 floatToGoString switches to Go's exponent form, at 1e16 repr does.
_GO_EXPONENT_FROM: Final = 1e6
_REPR_EXPONENT_FROM: Final = 1e16
_ENDS: Final = np.array(["\n", ".0\n"], dtype=object)  # indexed by "is integral"


def _go_float(d: float) -> str:
    """``prometheus_client.utils.floatToGoString`` for a non-NaN float."""
    if d == math.inf:
        return "+Inf"
    if d == -math.inf:
        return "-Inf"
    s = repr(d)
    dot = s.find(".")
    # Go switches to exponents sooner than Python (the same rule as floatToGoString).
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _numeric(family: str, field: str, array: object, shape: tuple[int, ...]) -> _F8:
    """``array`` as float64 of exactly ``shape``, or a ValueError naming the field."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"family {family!r}: {field} must be a numpy array, got {type(array)}")
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise ValueError(f"family {family!r}: {field} has dtype {array.dtype}, expected numbers")
    if array.shape != shape:
        raise ValueError(f"family {family!r}: {field} has shape {array.shape}, expected {shape}")
    return np.asarray(array, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class Family:
    """One metric family: a kind, a help text and one series per ``label_values`` entry.

    ``name`` is the base name: a counter ``inference_predictions`` is written as
    ``inference_predictions_total``. Counters and gauges take ``values`` (one per
    series; NaN leaves the series out). Histograms take ``upper_bounds`` (finite,
    increasing), ``buckets`` ([series, len(upper_bounds) + 1] non-cumulative
    counts, the last one the +Inf bucket) and ``sums``; a series whose sum or a
    bucket is NaN is left out. Arrays are coerced to float64 here, once.
    ``label_values`` must be distinct: checking that would cost as much as the
    render, and Prometheus rejects a scrape with a duplicate series.

    >>> import numpy as np
    >>> f = Family("jobs", "counter", "Jobs done.", ("queue",), [("a",), ("b",)],
    ...            values=np.array([3.0, np.nan]))
    >>> print(render([f]).decode(), end="")
    # HELP jobs_total Jobs done.
    # TYPE jobs_total counter
    jobs_total{queue="a"} 3.0
    """

    name: str
    kind: Kind
    help: str
    label_names: _Labels
    label_values: Sequence[_Labels]
    values: NDArray[Any] | None = None
    upper_bounds: Sequence[float] = ()
    buckets: NDArray[Any] | None = None
    sums: NDArray[Any] | None = None

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str) or not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"name {name!r} is not a valid Prometheus metric name")
        if self.kind not in _KINDS:
            raise ValueError(f"family {name!r}: kind {self.kind!r} is not one of {_KINDS}")
        if self.kind == "counter" and name.endswith("_total"):
            raise ValueError(f"family {name!r}: name is the base name; '_total' is appended")
        if not isinstance(self.help, str):
            raise TypeError(f"family {name!r}: help must be a str")
        self._check_label_names()
        n = len(self.label_values)
        lengths = set(map(len, self.label_values))
        if n and lengths != {len(self.label_names)}:
            raise ValueError(
                f"family {name!r}: label_values entries have lengths {sorted(lengths)}, "
                f"expected {len(self.label_names)} (one per label_names entry)"
            )
        if self.kind == "histogram":
            self._check_histogram(n)
        else:
            if self.values is None:
                raise ValueError(f"family {name!r}: a {self.kind} needs values")
            if self.buckets is not None or self.sums is not None or len(self.upper_bounds):
                raise ValueError(
                    f"family {name!r}: upper_bounds, buckets and sums are for histograms only"
                )
            object.__setattr__(self, "values", _numeric(name, "values", self.values, (n,)))

    def _check_label_names(self) -> None:
        names = self.label_names
        if not isinstance(names, tuple):
            raise TypeError(f"family {self.name!r}: label_names must be a tuple")
        for label in names:
            if not isinstance(label, str) or not _LABEL_NAME.fullmatch(label):
                raise ValueError(f"family {self.name!r}: label_names has invalid {label!r}")
            if label.startswith("__"):
                raise ValueError(f"family {self.name!r}: label_names has reserved {label!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"family {self.name!r}: label_names has duplicates: {names}")
        if self.kind == "histogram" and "le" in names:
            raise ValueError(f"family {self.name!r}: label_names must not hold 'le'")

    def _check_histogram(self, n: int) -> None:
        name = self.name
        if self.values is not None:
            raise ValueError(f"family {name!r}: a histogram takes buckets and sums, not values")
        if self.buckets is None or self.sums is None:
            raise ValueError(f"family {name!r}: a histogram needs buckets and sums")
        bounds = tuple(float(b) for b in self.upper_bounds)
        if not all(map(math.isfinite, bounds)):
            raise ValueError(f"family {name!r}: upper_bounds must be finite, got {bounds}")
        if any(b >= c for b, c in pairwise(bounds)):
            raise ValueError(f"family {name!r}: upper_bounds must increase, got {bounds}")
        object.__setattr__(self, "upper_bounds", bounds)
        shape = (n, len(bounds) + 1)
        object.__setattr__(self, "buckets", _numeric(name, "buckets", self.buckets, shape))
        object.__setattr__(self, "sums", _numeric(name, "sums", self.sums, (n,)))


class Payload(NamedTuple):
    """One render: the body and, if asked for, its gzip (made once, served many times)."""

    body: bytes
    gzip_body: bytes | None


def _sample_parts(prefixes: list[str], values: _F8) -> list[str]:
    """``prefix, number, end`` per line, ready to join: ``floatToGoString`` without a call each.

    An integral value prints as its integer then ".0"; ``int.__repr__`` plus a
    shared ``".0\\n"`` end is the cheapest C path to it. Everything else takes repr.
    """
    n = len(prefixes)
    integral = (
        (values == np.trunc(values))
        & (values > -_REPR_EXPONENT_FROM)
        & (values < _GO_EXPONENT_FROM)
        & ~((values == 0) & np.signbit(values))  # -0.0 prints as "-0.0"
    )
    n_integral = int(np.count_nonzero(integral))
    if n_integral == n:
        numbers = list(map(int.__repr__, values.astype(np.int64).tolist()))
        parts = [".0\n"] * (3 * n)
    elif n_integral == 0:
        numbers = _float_strings(values)
        parts = ["\n"] * (3 * n)
    else:
        mixed = np.empty(n, dtype=object)
        mixed[integral] = list(map(int.__repr__, values[integral].astype(np.int64).tolist()))
        mixed[~integral] = _float_strings(values[~integral])
        numbers = mixed.tolist()
        parts = ["\n"] * (3 * n)
        parts[2::3] = _ENDS[integral.view(np.int8)].tolist()
    parts[0::3] = prefixes
    parts[1::3] = numbers
    return parts


def _float_strings(values: _F8) -> list[str]:
    strings = list(map(float.__repr__, values.tolist()))
    # Go-style exponents and infinities are rare enough to patch one by one.
    special = ((values >= _GO_EXPONENT_FROM) & (values < _REPR_EXPONENT_FROM)) | np.isinf(values)
    for i in np.flatnonzero(special).tolist():
        strings[i] = _go_float(float(values[i]))
    return strings


def _keep(label_values: Sequence[_Labels], present: NDArray[np.bool_]) -> Sequence[_Labels]:
    """The entries of ``label_values`` where ``present`` is true."""
    kept = np.flatnonzero(present).tolist()
    if len(kept) == len(label_values):
        return label_values
    if len(kept) < 2:  # itemgetter of one index returns the item, not a tuple
        return [label_values[i] for i in kept]
    picked: tuple[_Labels, ...] = itemgetter(*kept)(label_values)
    return picked


def _render_family(family: Family, cache: LabelCache, out: list[str]) -> None:
    """Appends the family's text to ``out`` as parts: HELP and TYPE, three parts a sample."""
    name, label_names, label_values = family.name, family.label_names, family.label_values
    sample_name = f"{name}_total" if family.kind == "counter" else name
    out.append(f"# HELP {sample_name} {_escape_help(family.help)}\n")
    out.append(f"# TYPE {sample_name} {family.kind}\n")
    if family.kind == "histogram":
        assert family.buckets is not None  # __post_init__
        assert family.sums is not None
        buckets, sums = family.buckets, family.sums
        present = ~(np.isnan(sums) | np.isnan(buckets).any(axis=1))
        if not present.all():
            buckets, sums = buckets[present], sums[present]
            label_values = _keep(label_values, present)
        cumulative = np.cumsum(buckets, axis=1)
        # Row-major order = per series: buckets, _count (the +Inf bucket), _sum.
        values = np.column_stack([cumulative, cumulative[:, -1], sums]).ravel()
        les = (*map(_go_float, family.upper_bounds), "+Inf")
        rows = cache._histogram_prefixes(name, label_names, label_values, les)
        prefixes = list(chain.from_iterable(rows))
    else:
        assert family.values is not None  # __post_init__
        values = family.values
        present = ~np.isnan(values)
        if not present.all():
            values = values[present]
            label_values = _keep(label_values, present)
        prefixes = cache._scalar_prefixes(sample_name, label_names, label_values)
    if prefixes:
        out += _sample_parts(prefixes, values)


def render(families: Iterable[Family], cache: LabelCache | None = None) -> bytes:
    """Families, in the order given, as text format 0.0.4 (UTF-8).

    Pass the same ``cache`` to every render so unchanged label sets are escaped
    only once; without one, a fresh cache serves this call only.

    >>> import numpy as np
    >>> g = Family("temp_celsius", "gauge", "Temperature.", (), [()], values=np.array([21.5]))
    >>> render([g])
    b'# HELP temp_celsius Temperature.\\n# TYPE temp_celsius gauge\\ntemp_celsius 21.5\\n'
    """
    cache = LabelCache() if cache is None else cache
    # One join over every family's parts: the text is copied once, then encoded.
    parts: list[str] = []
    for family in families:
        _render_family(family, cache, parts)
    return "".join(parts).encode("utf-8")


def render_payload(
    families: Iterable[Family],
    cache: LabelCache | None = None,
    *,
    gzip_level: int | None = 1,
) -> Payload:
    """``render`` plus, unless ``gzip_level`` is None, the gzip of the body.

    Level 1 because the text is repetitive: it already shrinks it about tenfold,
    at a fraction of level 6's CPU time. ``mtime=0`` keeps the gzip reproducible.

    >>> import gzip, numpy as np
    >>> g = Family("up", "gauge", "Up.", (), [()], values=np.array([1.0]))
    >>> p = render_payload([g])
    >>> gzip.decompress(p.gzip_body) == p.body
    True
    """
    body = render(families, cache)
    if gzip_level is None:
        return Payload(body, None)
    return Payload(body, gzip.compress(body, compresslevel=gzip_level, mtime=0))
