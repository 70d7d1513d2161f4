"""The aggregator's HTTP edge: cached /metrics bytes, /healthz and /readyz.

Scrapes never wait for a render: the render thread swaps a new ``(body,
gzip_body)`` pair in with one attribute assignment (atomic under the GIL), and a
request reads whichever pair is current. Requests are logged at debug level
through ``logging``, never written to stderr.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final, NamedTuple, Self

from aggregator.exposition import CONTENT_TYPE, Payload
from aggregator.webconfig import WebConfig

__all__ = ["MetricsServer"]

log = logging.getLogger(__name__)

_TEXT: Final = "text/plain; charset=utf-8"
_HANDSHAKE_TIMEOUT_SECONDS: Final = 10.0


class _Status(NamedTuple):
    ok: bool
    reason: str


def _accepts_gzip(header: str | None) -> bool:
    """Whether an Accept-Encoding header allows gzip (``q=0`` refuses it)."""
    for item in (header or "").split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() != "gzip":
            continue
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    return float(value) > 0
                except ValueError:
                    return False
        return True
    return False


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        owner = self.server.owner
        if path == "/metrics":
            auth = owner._web.auth
            if auth is not None and not auth.check(self.headers["Authorization"]):
                self._send(
                    HTTPStatus.UNAUTHORIZED,
                    _TEXT,
                    b"unauthorized\n",
                    extra=(("WWW-Authenticate", 'Basic realm="modelpulse"'),),
                )
                return
            refusal = owner._metrics_refusal()
            if refusal is not None:
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, _TEXT, f"{refusal}\n".encode())
                return
            payload = owner._payload  # one read: a concurrent swap cannot tear it
            if payload.gzip_body is not None and _accepts_gzip(self.headers["Accept-Encoding"]):
                self._send(HTTPStatus.OK, CONTENT_TYPE, payload.gzip_body, gzip=True, vary=True)
            else:
                self._send(HTTPStatus.OK, CONTENT_TYPE, payload.body, vary=True)
        elif path == "/healthz":
            self._send_status(owner._health, "unhealthy")
        elif path == "/readyz":
            self._send_status(owner._ready, "not ready")
        else:
            self._send(HTTPStatus.NOT_FOUND, _TEXT, b"not found\n")

    def _send_status(self, status: _Status, default_reason: str) -> None:
        if status.ok:
            self._send(HTTPStatus.OK, _TEXT, b"ok\n")
        else:
            reason = status.reason or default_reason
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, _TEXT, f"{reason}\n".encode())

    def _send(
        self,
        code: HTTPStatus,
        content_type: str,
        body: bytes,
        *,
        gzip: bool = False,
        vary: bool = False,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        for name, value in extra:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if gzip:
            self.send_header("Content-Encoding", "gzip")
        if vary:  # caches must not hand a gzip body to a client that did not ask for one
            self.send_header("Vary", "Accept-Encoding")
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            # A scraper that timed out and hung up; nothing to repair here.
            log.debug("client %s went away during %s", self.client_address, self.path)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: MetricsServer) -> None:
        self.owner = owner
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, in the request's own thread, so a slow or
        # silent client cannot hold up accept() for everyone else.
        tls = self.owner._web.tls
        if tls is not None:
            request.settimeout(_HANDSHAKE_TIMEOUT_SECONDS)
            try:
                wrapped = tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.debug("TLS handshake with %s failed: %s", client_address, exc)
                return
            try:
                wrapped.settimeout(None)
                super().finish_request(wrapped, client_address)
            finally:
                # shutdown_request() closes the plain socket, which the wrapper now owns.
                wrapped.close()
            return
        super().finish_request(request, client_address)

    def handle_error(self, request: object, client_address: object) -> None:
        # socketserver prints tracebacks to stderr; route them to logging instead.
        log.debug("error serving %s", client_address, exc_info=True)


class MetricsServer:
    """Serves the newest rendered payload on ``/metrics`` from a background thread.

    ``/healthz`` answers 200 while healthy (the default) and ``/readyz`` 200 once
    ready; otherwise 503 with the reason as body. Port 0 picks a free port.
    ``use_web_config`` adds TLS (every path) and basic auth (``/metrics`` only),
    see ``aggregator.webconfig``.

    >>> import urllib.request
    >>> with MetricsServer("127.0.0.1", 0) as server:
    ...     server.set_payload(b"up 1.0\\n")
    ...     urllib.request.urlopen(server.url).read()
    b'up 1.0\\n'
    """

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._payload = Payload(b"", None)
        self._health = _Status(True, "")
        self._ready = _Status(False, "starting")
        self._web = WebConfig()
        self._stale: str | None = None
        self._last_poll: float | None = None
        self._max_poll_age: float | None = None
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the chosen one for port 0), else the requested one."""
        return self._httpd.server_address[1] if self._httpd is not None else self._port

    @property
    def url(self) -> str:
        """``http://host:port/metrics`` (``https://`` with TLS)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        scheme = "https" if self._web.tls is not None else "http"
        return f"{scheme}://{host}:{self.port}/metrics"

    def use_web_config(self, config: WebConfig) -> None:
        """Serve over TLS and/or require basic auth on /metrics (call before ``start``)."""
        if self._httpd is not None:
            raise RuntimeError("use_web_config() must come before start()")
        self._web = config

    def set_stale(self, reason: str | None) -> None:
        """Answer /metrics with 503 and ``reason`` (the payload may be wrong); None: serve."""
        self._stale = reason

    def watch_loop(self, max_age_seconds: float) -> None:
        """Refuse /metrics unless ``loop_alive`` was called within ``max_age_seconds``.

        Checked here, in the request's thread: a process that wakes from a freeze
        serves requests before its own loop has run and found out what it lost.
        """
        self._max_poll_age = max_age_seconds

    def loop_alive(self, monotonic_now: float) -> None:
        """The consumer loop polled at ``monotonic_now``."""
        self._last_poll = monotonic_now

    def _metrics_refusal(self) -> str | None:
        # The poll time first: the loop sets a refusal before it records a poll.
        limit, last = self._max_poll_age, self._last_poll
        stale = self._stale
        if limit is not None:
            if last is None:
                return "consumer loop not started"
            age = time.monotonic() - last
            if age > limit:
                return f"consumer loop silent for {age:.1f} s"
        return stale

    def set_payload(self, body: bytes, gzip_body: bytes | None = None) -> None:
        """Serve ``body`` (and ``gzip_body`` to clients accepting gzip) from now on."""
        self._payload = Payload(body, gzip_body)

    def set_healthy(self, healthy: bool, reason: str = "") -> None:
        """Make ``/healthz`` answer 200, or 503 with ``reason``."""
        self._health = _Status(healthy, reason)

    def set_ready(self, ready: bool, reason: str = "") -> None:
        """Make ``/readyz`` answer 200, or 503 with ``reason`` (e.g. "restoring partitions")."""
        self._ready = _Status(ready, reason)

    def start(self) -> None:
        """Bind and serve in a daemon thread; raises OSError if the port is taken."""
        if self._httpd is not None:
            raise RuntimeError("MetricsServer already started")
        httpd = _HTTPServer((self._host, self._port), self)
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="metrics-http"
        )
        self._thread.daemon = True
        self._thread.start()
        log.debug("serving metrics on %s", self.url)

    def stop(self) -> None:
        """Stop serving and release the port; a no-op if not started."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
