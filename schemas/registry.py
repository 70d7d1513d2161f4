"""A minimal client of a Confluent-compatible schema registry (REST, stdlib only).

Subjects follow the record-name strategy (``io.modelpulse.PredictionEvent``) because
several record types share one topic.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from typing import Any

__all__ = ["RegistryError", "SchemaRegistry"]

_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class RegistryError(RuntimeError):
    """The schema registry could not be reached or refused a request."""


class SchemaRegistry:
    """Register schemas and look writer schemas up by id, caching both ways.

    >>> reg = SchemaRegistry("http://127.0.0.1:8081")  # doctest: +SKIP
    >>> reg.register("io.modelpulse.PredictionEvent", {"type": "record", ...})  # doctest: +SKIP
    """

    def __init__(self, url: str, timeout_seconds: float = 5.0) -> None:
        self._url = url.rstrip("/")
        self._timeout = timeout_seconds
        self._ids: dict[tuple[str, str], int] = {}
        self._schemas: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def _request(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            self._url + path, data=data, method=method, headers={"Content-Type": _CONTENT_TYPE}
        )
        try:
            with urllib.request.urlopen(req, timeout=self._timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise RegistryError(
                f"schema registry {method} {path}: HTTP {exc.code} {exc.read()[:200]!r}"
            ) from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise RegistryError(f"schema registry {self._url} unreachable: {exc}") from exc

    def register(self, subject: str, schema: dict[str, Any]) -> int:
        """Register ``schema`` under ``subject`` (idempotent) and return its id."""
        text = json.dumps(schema, sort_keys=True)
        with self._lock:
            if (subject, text) in self._ids:
                return self._ids[(subject, text)]
        reply = self._request("POST", f"/subjects/{subject}/versions", {"schema": text})
        schema_id = int(reply["id"])
        with self._lock:
            self._ids[(subject, text)] = schema_id
            self._schemas[schema_id] = schema
        return schema_id

    def schema(self, schema_id: int) -> dict[str, Any]:
        """The writer schema registered under ``schema_id``."""
        with self._lock:
            if schema_id in self._schemas:
                return self._schemas[schema_id]
        reply = self._request("GET", f"/schemas/ids/{schema_id}")
        schema: dict[str, Any] = json.loads(reply["schema"])
        with self._lock:
            self._schemas[schema_id] = schema
        return schema
