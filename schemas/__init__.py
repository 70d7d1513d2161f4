"""Avro schemas of modelpulse (the ``.avsc`` files beside this module) and their framing."""

from schemas.registry import RegistryError, SchemaRegistry
from schemas.wire import (
    OUTCOME_CODES,
    OUTCOMES,
    SCHEMA_DIR,
    SchemaId,
    WireFormatError,
    frame,
    parsed_schema,
    raw_schema,
    unframe,
)

__all__ = [
    "OUTCOMES",
    "OUTCOME_CODES",
    "SCHEMA_DIR",
    "RegistryError",
    "SchemaId",
    "SchemaRegistry",
    "WireFormatError",
    "frame",
    "parsed_schema",
    "raw_schema",
    "unframe",
]
