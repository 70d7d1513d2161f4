"""A minimal client of a Confluent-compatible schema registry (REST, stdlib only).

The producer registers its schemas under record-name subjects
(``io.modelpulse.PredictionEvent``) because several record types share one topic; the
aggregator only looks writer schemas up by id, so it reads records registered under
any subject (``<topic>-value``, ``<record>``, ``<topic>-<record>``).

Errors::

    RegistryError            the registry could not give an answer
    ├── SchemaNotFound       it answered: no schema has this id (HTTP 404)
    └── RegistryUnavailable  no answer: unreachable, timeout, 5xx, auth refused...
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

__all__ = [
    "RegistryError",
    "RegistryUnavailable",
    "SchemaNotFound",
    "SchemaRegistry",
    "record_subject",
]

_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


def record_subject(schema: dict[str, Any]) -> str:
    """The record-name subject modelpulse registers ``schema`` under.

    >>> record_subject({"type": "record", "name": "PredictionEvent", "namespace": "io.modelpulse"})
    'io.modelpulse.PredictionEvent'
    """
    return f"{schema['namespace']}.{schema['name']}"


class RegistryError(RuntimeError):
    """The schema registry could not be reached or refused a request."""


class SchemaNotFound(RegistryError):
    """The registry answered that it has no schema with this id."""


class RegistryUnavailable(RegistryError):
    """The registry gave no usable answer (network, timeout, server error, auth)."""


class SchemaRegistry:
    """Register schemas and look writer schemas up by id, caching both ways.

    ``url`` is the base of the Confluent-compatible API (for Apicurio Registry
    ``http://host:8080/apis/ccompat/v7``). ``username``/``password`` send HTTP basic
    auth; ``ca_file`` is the PEM bundle that verifies an ``https`` registry.

    >>> reg = SchemaRegistry("http://127.0.0.1:8081")  # doctest: +SKIP
    >>> reg.register("io.modelpulse.PredictionEvent", {"type": "record", ...})  # doctest: +SKIP
    """

    def __init__(
        self,
        url: str,
        timeout_seconds: float = 5.0,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"schema_registry_url: {url!r} is not an http(s) URL")
        self._url = url.rstrip("/")
        self._timeout = timeout_seconds
        self._headers = {"Content-Type": _CONTENT_TYPE, "Accept": _CONTENT_TYPE}
        if username is not None or password is not None:
            token = base64.b64encode(f"{username or ''}:{password or ''}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        self._ssl: ssl.SSLContext | None = None
        if ca_file is not None:
            try:
                self._ssl = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"schema_registry_ca_file: {ca_file}: {exc}") from None
        self._ids: dict[tuple[str, str], int] = {}
        self._schemas: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self._url

    def _request(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            self._url + path, data=data, method=method, headers=self._headers
        )
        try:
            with urllib.request.urlopen(req, timeout=self._timeout, context=self._ssl) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = f"schema registry {method} {path}: HTTP {exc.code} {exc.read()[:200]!r}"
            if exc.code == 404:
                raise SchemaNotFound(detail) from None
            if exc.code >= 500 or exc.code in (401, 403, 408, 429):
                raise RegistryUnavailable(detail) from None
            raise RegistryError(detail) from None
        except (urllib.error.URLError, OSError) as exc:
            raise RegistryUnavailable(f"schema registry {self._url} unreachable: {exc}") from None
        except ValueError as exc:
            raise RegistryUnavailable(
                f"schema registry {method} {path}: bad reply: {exc}"
            ) from None

    def register(self, subject: str, schema: dict[str, Any]) -> int:
        """Register ``schema`` under ``subject`` (idempotent) and return its id."""
        text = json.dumps(schema, sort_keys=True)
        with self._lock:
            if (subject, text) in self._ids:
                return self._ids[(subject, text)]
        quoted = urllib.parse.quote(subject, safe="")
        reply = self._request("POST", f"/subjects/{quoted}/versions", {"schema": text})
        try:
            schema_id = int(reply["id"])
        except (KeyError, TypeError, ValueError):
            raise RegistryError(
                f"schema registry: no id in the reply to {subject}: {reply!r}"
            ) from None
        with self._lock:
            self._ids[(subject, text)] = schema_id
            self._schemas[schema_id] = schema
        return schema_id

    def schema(self, schema_id: int) -> dict[str, Any]:
        """The writer schema registered under ``schema_id``.

        Raises ``SchemaNotFound`` when the registry has no such id (or it is not an Avro
        record schema), ``RegistryUnavailable`` when it gives no answer.
        """
        with self._lock:
            if schema_id in self._schemas:
                return self._schemas[schema_id]
        reply = self._request("GET", f"/schemas/ids/{schema_id}")
        kind = reply.get("schemaType", "AVRO") if isinstance(reply, dict) else None
        if kind != "AVRO":
            raise SchemaNotFound(f"schema id {schema_id} is a {kind} schema, not Avro")
        try:
            schema = json.loads(reply["schema"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SchemaNotFound(f"schema id {schema_id}: unreadable schema ({exc})") from None
        if not isinstance(schema, dict):
            raise SchemaNotFound(f"schema id {schema_id} is not an Avro record schema")
        with self._lock:
            self._schemas[schema_id] = schema
        return schema
