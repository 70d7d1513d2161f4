"""The package doors: ``__all__`` of producer, aggregator and schemas, pinned.

A name added to or dropped from a door is an API change: it has to be made here too,
on purpose (as httpx pins its exported members). Every pinned name imports, and every
name of a package that README.md shows (an import, ``producer.build_reference``, a
backticked ``InvalidEvent``) is in its door, so the README never leans on a private
path.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

DOORS: dict[str, list[str]] = {
    "producer": [
        "InvalidEvent",
        "PredictionPublisher",
        "PublishError",
        "PublisherClosed",
        "PublisherSettings",
        "PublisherStats",
        "ReferenceDoc",
        "Tracker",
        "build_reference",
        "publish_reference",
    ],
    "aggregator": [
        "AggregatorError",
        "AggregatorSettings",
        "ConfigMismatch",
        "DecodeError",
        "PartitionState",
        "Shard",
        "StateConfig",
    ],
    "schemas": [
        "OUTCOMES",
        "OUTCOME_CODES",
        "RegistryError",
        "SCHEMA_DIR",
        "SchemaId",
        "SchemaRegistry",
        "WireFormatError",
        "frame",
        "parsed_schema",
        "raw_schema",
        "unframe",
    ],
}


@pytest.mark.parametrize("package", sorted(DOORS))
def test_door_is_pinned(package: str) -> None:
    module = importlib.import_module(package)
    assert DOORS[package] == sorted(DOORS[package])  # the pin itself stays easy to read
    assert sorted(module.__all__) == DOORS[package]
    assert len(set(module.__all__)) == len(module.__all__), "a name twice in __all__"


@pytest.mark.parametrize("package", sorted(DOORS))
def test_every_door_name_imports(package: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from {package} import *", namespace)  # what a star import really gives
    missing = [name for name in DOORS[package] if name not in namespace]
    assert not missing, f"{package}.__all__ names that do not import: {missing}"
    module = importlib.import_module(package)
    for name in DOORS[package]:
        assert not isinstance(getattr(module, name), ModuleType), f"{package}.{name}"


def _is_submodule(package: str, name: str) -> bool:
    return importlib.util.find_spec(f"{package}.{name}") is not None


def _readme_names() -> set[tuple[str, str]]:
    """(package, name) of every package name README.md uses: imports, ``pkg.name``
    references and backticked names that a package exports."""
    text = README.read_text()
    used: set[tuple[str, str]] = set()
    for package, names in re.findall(
        r"^from (producer|aggregator|schemas) import ([\w, ]+)$", text, re.MULTILINE
    ):
        used |= {(package, n.strip()) for n in names.split(",")}
    for package, name in re.findall(r"\b(producer|aggregator|schemas)\.(\w+)", text):
        if not _is_submodule(package, name):
            used.add((package, name))
    backticked = set(re.findall(r"`([A-Za-z_]\w*)[`(]", text))
    for package in DOORS:
        module = importlib.import_module(package)
        for name in backticked:
            value = getattr(module, name, None)
            if value is not None and not isinstance(value, ModuleType):
                used.add((package, name))
    return used


def test_readme_uses_only_names_of_the_doors() -> None:
    used = _readme_names()
    # The examples of README.md that the check must see (so a change to the regexes
    # that finds nothing fails here instead of passing quietly).
    assert {
        ("producer", "PredictionPublisher"),
        ("producer", "PublisherSettings"),
        ("producer", "InvalidEvent"),
        ("producer", "build_reference"),
        ("producer", "publish_reference"),
    } <= used, sorted(used)
    outside = sorted(f"{p}.{n}" for p, n in used if n not in DOORS[p])
    assert not outside, f"README.md uses names missing from __all__: {outside}"


def test_every_subpackage_ships_in_the_distribution() -> None:
    """pyproject's package list finds every package directory (a subpackage left out
    would be missing from ``pip install .`` and the Docker image, not from the tests)."""
    import tomllib
    from pathlib import Path

    from setuptools import find_packages

    root = Path(__file__).resolve().parents[1]
    conf = tomllib.loads((root / "pyproject.toml").read_text())
    include = conf["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = set(find_packages(str(root), include=include))
    wanted = {
        ".".join(p.parent.relative_to(root).parts)
        for top in ("producer", "aggregator", "schemas")
        for p in (root / top).rglob("__init__.py")
    }
    assert wanted <= shipped, sorted(wanted - shipped)
    assert {"aggregator.state", "aggregator.join", "aggregator.bulk"} <= shipped
