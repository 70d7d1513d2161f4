"""Escaped ``name{labels} `` line prefixes of the text format, cached across renders.

``exposition.render`` spends most of a cold render escaping and sorting label
values; this cache keeps the finished prefix of every series so a steady-state
render is one dict lookup per series, and builds the missing ones a whole column
at a time. Re-exported by ``aggregator.exposition``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Final, TypeVar

__all__ = ["LabelCache"]

_Labels = tuple[str, ...]

_ESCAPED_CHARS: Final = ("\\", '"', "\n")

T = TypeVar("T")


_Key = tuple[str, _Labels, tuple[str, ...] | None]


class LabelCache:
    """Escaped ``name{labels} `` line prefixes kept across renders, keyed by label tuple.

    Escaping and sorting labels is the costly part of a render; label sets change
    rarely, so a steady-state render is one dict lookup per series. Everything is
    dropped when more than ``max_entries`` series would be held (label churn), so
    memory stays bounded. Use one cache per rendering thread.
    """

    def __init__(self, max_entries: int = 2_000_000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._max_entries = max_entries
        self._size = 0
        self._scalar: dict[_Key, dict[_Labels, str]] = {}
        self._histogram: dict[_Key, dict[_Labels, tuple[str, ...]]] = {}

    def __len__(self) -> int:
        """Number of series whose prefixes are held."""
        return self._size

    def clear(self) -> None:
        """Forget every prefix."""
        self._scalar.clear()
        self._histogram.clear()
        self._size = 0

    def _lookup(
        self,
        tables: dict[_Key, dict[_Labels, T]],
        key: _Key,
        label_values: Sequence[_Labels],
        build: Callable[[list[_Labels]], Iterable[T]],
    ) -> list[T]:
        """The cached row of every entry of ``label_values``, building the missing ones."""
        table = tables.get(key)
        if table is not None:
            try:
                return list(map(table.__getitem__, label_values))
            except KeyError:
                pass
        # Set difference runs in C; the cold path then builds whole columns at once.
        missing = list(set(label_values).difference(table or ()))
        if self._size + len(missing) > self._max_entries:
            self.clear()
        table = tables.setdefault(key, {})
        table.update(zip(missing, build(missing), strict=True))
        self._size += len(missing)
        return list(map(table.__getitem__, label_values))

    def _scalar_prefixes(
        self, sample_name: str, label_names: _Labels, label_values: Sequence[_Labels]
    ) -> list[str]:
        """``sample_name{labels} `` for every series of a counter or gauge."""
        order = sorted(range(len(label_names)), key=label_names.__getitem__)
        template = _template(sample_name, [f'{label_names[i]}="{{}}"' for i in order])

        def build(missing: list[_Labels]) -> list[str]:
            columns = _escaped_columns(sample_name, label_names, missing, order)
            return _format_rows(template, columns, len(missing))

        key = (sample_name, label_names, None)
        return self._lookup(self._scalar, key, label_values, build)

    def _histogram_prefixes(
        self, name: str, label_names: _Labels, label_values: Sequence[_Labels], les: tuple[str, ...]
    ) -> list[tuple[str, ...]]:
        """Per series: the ``_bucket`` prefixes (one per ``le``), then ``_count`` and ``_sum``."""
        order = sorted(range(len(label_names)), key=label_names.__getitem__)
        parts = [f'{label_names[i]}="{{}}"' for i in order]
        # prometheus_client sorts "le" among the label names, so it can land mid-set.
        at = sum(label_names[i] < "le" for i in order)
        templates = [
            _template(f"{name}_bucket", [*parts[:at], f'le="{le}"', *parts[at:]]) for le in les
        ]
        templates += [_template(f"{name}_count", parts), _template(f"{name}_sum", parts)]

        def build(missing: list[_Labels]) -> Iterable[tuple[str, ...]]:
            columns = _escaped_columns(name, label_names, missing, order)
            rows = [_format_rows(t, columns, len(missing)) for t in templates]
            return zip(*rows, strict=True)

        key = (name, label_names, les)
        return self._lookup(self._histogram, key, label_values, build)


def _escaped_columns(
    name: str, label_names: _Labels, rows: list[_Labels], order: list[int]
) -> list[Sequence[str]]:
    """Label values of ``rows`` as escaped columns, in sorted label-name order."""
    if not rows:
        return []
    columns = list(zip(*rows, strict=True))
    escaped: list[Sequence[str]] = []
    for i in order:
        column = columns[i]
        try:
            joined = "".join(column)
        except TypeError as exc:
            raise TypeError(
                f"family {name!r}: label_values for {label_names[i]!r} must be str: {exc}"
            ) from exc
        # Most columns hold nothing to escape; one scan of the joined text proves it.
        if any(c in joined for c in _ESCAPED_CHARS):
            column = tuple(
                v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"") for v in column
            )
        escaped.append(column)
    return escaped


def _template(sample_name: str, label_parts: list[str]) -> str:
    """A ``str.format`` template of ``sample_name{labels} ``: each ``{}`` takes one value."""
    if not label_parts:
        return f"{sample_name} "
    return f"{sample_name}{{{{{','.join(label_parts)}}}}} "


def _format_rows(template: str, columns: list[Sequence[str]], n: int) -> list[str]:
    """``template`` filled with each row of ``columns`` (or ``n`` copies if no labels)."""
    if not n:
        return []
    if not columns:
        return [template.format()] * n
    return list(map(template.format, *columns))
