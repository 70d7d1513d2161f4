"""TLS and basic auth of the HTTP endpoints, in Prometheus exporter-toolkit's format.

The file is the one node_exporter takes with ``--web.config.file``::

    tls_server_config:
      cert_file: server.pem          # relative paths are relative to this file
      key_file: server.key
      client_ca_file: ca.pem         # optional: verify client certificates
      client_auth_type: RequireAndVerifyClientCert   # optional, default NoClientCert
      min_version: TLS12             # optional: TLS12 (default) or TLS13
    basic_auth_users:
      prometheus: $2b$12$...         # bcrypt hash (htpasswd -nBC 12 "" | tr -d ':\\n')

Either part may be absent. Basic auth protects ``/metrics``; ``/healthz`` and
``/readyz`` answer without it (kubelet probes cannot send credentials) but, with TLS
configured, only over TLS like everything else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ssl
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import bcrypt
import yaml

__all__ = ["BasicAuth", "WebConfig", "WebConfigError", "load_web_config"]

_CLIENT_AUTH: Final = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_VERSIONS: Final = {
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_TLS_KEYS: Final = {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version"}
# A valid hash that matches no password: an unknown user costs as much as a known one,
# so response times do not tell which users exist.
_DUMMY_HASH: Final = bcrypt.hashpw(b"modelpulse-no-such-user", bcrypt.gensalt(rounds=10))


class WebConfigError(ValueError):
    """A web config file that cannot be used; the message names the bad key."""


class BasicAuth:
    """Checks ``Authorization: Basic`` headers against bcrypt hashes.

    bcrypt costs tens of milliseconds by design; a scraper sends the same credentials
    every time, so successful checks are remembered (keyed by a keyed digest of the
    header, never the password itself) and only new or wrong ones pay the cost.
    """

    def __init__(self, users: dict[str, bytes]) -> None:
        self._users = users
        self._key = bcrypt.gensalt()  # per-process key of the cache digests
        self._ok: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, header: str | None) -> bool:
        """Whether the header carries a configured user and its password."""
        if not header or header[:6].lower() != "basic ":
            return False
        digest = hmac.new(self._key, header.encode(), hashlib.sha256).digest()
        with self._lock:
            if digest in self._ok:
                self._ok.move_to_end(digest)
                return True
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).partition(
                b":"
            )
        except (binascii.Error, ValueError):
            return False
        hashed = self._users.get(user.decode("utf-8", "replace")) if sep else None
        ok = bcrypt.checkpw(password, hashed or _DUMMY_HASH) and hashed is not None
        if ok:
            with self._lock:
                self._ok[digest] = None
                while len(self._ok) > 64:
                    self._ok.popitem(last=False)
        return ok


@dataclass(frozen=True)
class WebConfig:
    """What protects the endpoints: a server TLS context and/or basic-auth users."""

    tls: ssl.SSLContext | None = None
    auth: BasicAuth | None = None
    source: str = field(default="", compare=False)


def _path(base: Path, value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise WebConfigError(f"tls_server_config.{key}: a file path is required")
    path = (base / value).resolve()
    if not path.is_file():
        raise WebConfigError(f"tls_server_config.{key}: no such file {str(path)!r}")
    return str(path)


def _tls_context(base: Path, conf: dict[str, Any]) -> ssl.SSLContext:
    unknown = set(conf) - _TLS_KEYS
    if unknown:
        raise WebConfigError(f"tls_server_config: unsupported key(s) {sorted(unknown)}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    version = conf.get("min_version", "TLS12")
    if version not in _TLS_VERSIONS:
        raise WebConfigError(f"tls_server_config.min_version: {version!r} is not TLS12 or TLS13")
    ctx.minimum_version = _TLS_VERSIONS[version]
    cert = _path(base, conf.get("cert_file"), "cert_file")
    key = _path(base, conf.get("key_file"), "key_file")
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise WebConfigError(f"tls_server_config.cert_file/key_file: {exc}") from None
    auth_type = conf.get("client_auth_type", "NoClientCert")
    if auth_type not in _CLIENT_AUTH:
        raise WebConfigError(
            f"tls_server_config.client_auth_type: {auth_type!r} is not one of {list(_CLIENT_AUTH)}"
        )
    ctx.verify_mode = _CLIENT_AUTH[auth_type]
    ca = conf.get("client_ca_file")
    if ca is not None:
        try:
            ctx.load_verify_locations(_path(base, ca, "client_ca_file"))
        except ssl.SSLError as exc:
            raise WebConfigError(f"tls_server_config.client_ca_file: {exc}") from None
    elif auth_type in {"VerifyClientCertIfGiven", "RequireAndVerifyClientCert"}:
        raise WebConfigError(f"tls_server_config.client_ca_file: required by {auth_type}")
    elif auth_type in {"RequestClientCert", "RequireAnyClientCert"}:
        # exporter-toolkit accepts any certificate here; Python's ssl cannot skip the
        # chain check, so without a CA these modes cannot be honoured.
        raise WebConfigError(
            f"tls_server_config.client_auth_type: {auth_type} needs client_ca_file here"
        )
    return ctx


def _users(conf: object) -> dict[str, bytes]:
    if not isinstance(conf, dict) or not conf:
        raise WebConfigError("basic_auth_users: a map of user -> bcrypt hash is required")
    users: dict[str, bytes] = {}
    for user, hashed in conf.items():
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            # Never echo the value: a plain password put here by mistake stays out of logs.
            raise WebConfigError(f"basic_auth_users.{user}: not a bcrypt hash ($2a$/$2b$/$2y$)")
        users[str(user)] = hashed.encode()
    return users


def load_web_config(path: str | Path) -> WebConfig:
    """Read and check a web config file; raises WebConfigError naming the bad key."""
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise WebConfigError(f"cannot read {str(file)!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise WebConfigError(f"{str(file)!r} is not valid YAML: {exc}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise WebConfigError(f"{str(file)!r}: a YAML map is expected")
    unknown = set(raw) - {"tls_server_config", "basic_auth_users", "http_server_config"}
    if unknown:
        raise WebConfigError(f"unsupported key(s) {sorted(unknown)}")
    base = file.resolve().parent
    tls_conf = raw.get("tls_server_config")
    if tls_conf is not None and not isinstance(tls_conf, dict):
        raise WebConfigError("tls_server_config: a map is expected")
    tls = _tls_context(base, tls_conf) if tls_conf else None
    users = raw.get("basic_auth_users")
    auth = BasicAuth(_users(users)) if users is not None else None
    return WebConfig(tls=tls, auth=auth, source=str(file))
