"""The aggregator's HTTP edge: cached /metrics bytes, /healthz and /readyz.

Scrapes never wait for a render: the render thread swaps a new ``(body,
gzip_body)`` pair in with one attribute assignment (atomic under the GIL), and a
request reads whichever pair is current. Requests are logged at debug level
through ``logging``, never written to stderr.
"""

from __future__ import annotations

import logging
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Final, NamedTuple, Self

from aggregator.exposition import CONTENT_TYPE, Payload

__all__ = ["MetricsServer"]

log = logging.getLogger(__name__)

_TEXT: Final = "text/plain; charset=utf-8"


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
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
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

    def handle_error(self, request: object, client_address: object) -> None:
        # socketserver prints tracebacks to stderr; route them to logging instead.
        log.debug("error serving %s", client_address, exc_info=True)


class MetricsServer:
    """Serves the newest rendered payload on ``/metrics`` from a background thread.

    ``/healthz`` answers 200 while healthy (the default) and ``/readyz`` 200 once
    ready; otherwise 503 with the reason as body. Port 0 picks a free port.

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
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the chosen one for port 0), else the requested one."""
        return self._httpd.server_address[1] if self._httpd is not None else self._port

    @property
    def url(self) -> str:
        """``http://host:port/metrics``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}/metrics"

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
