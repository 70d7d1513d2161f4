"""MetricsServer over real HTTP on 127.0.0.1 (port 0: a free port each time)."""

from __future__ import annotations

import doctest
import gzip
import http.client
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from aggregator import server as server_module
from aggregator.exposition import CONTENT_TYPE
from aggregator.server import MetricsServer


class Reply:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = response.headers
        self.body = response.read()


def get(srv: MetricsServer, path: str, headers: dict[str, str] | None = None) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        return Reply(conn.getresponse())
    finally:
        conn.close()


@pytest.fixture
def srv() -> Iterator[MetricsServer]:
    with MetricsServer("127.0.0.1", 0) as s:
        yield s


def test_doctests() -> None:
    assert doctest.testmod(server_module).failed == 0


def test_port_zero_picks_a_free_port_and_url(srv: MetricsServer) -> None:
    assert srv.port > 0
    assert srv.url == f"http://127.0.0.1:{srv.port}/metrics"


def test_metrics_before_any_payload_is_empty(srv: MetricsServer) -> None:
    reply = get(srv, "/metrics")
    assert reply.status == 200
    assert reply.body == b""
    assert reply.headers["Content-Type"] == CONTENT_TYPE


def test_metrics_serves_latest_payload(srv: MetricsServer) -> None:
    srv.set_payload(b"a 1.0\n")
    srv.set_payload(b"b 2.0\n")
    reply = get(srv, "/metrics")
    assert reply.status == 200
    assert reply.body == b"b 2.0\n"
    assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert reply.headers["Content-Length"] == "6"
    assert reply.headers["Content-Encoding"] is None
    assert get(srv, "/metrics?name[]=x").body == b"b 2.0\n"


def test_gzip_when_accepted(srv: MetricsServer) -> None:
    body = b"x 1.0\n" * 1000
    srv.set_payload(body, gzip.compress(body))
    reply = get(srv, "/metrics", {"Accept-Encoding": "gzip"})
    assert reply.headers["Content-Encoding"] == "gzip"
    assert reply.headers["Vary"] == "Accept-Encoding"
    assert reply.headers["Content-Type"] == CONTENT_TYPE
    assert int(reply.headers["Content-Length"]) == len(reply.body) < len(body)
    assert gzip.decompress(reply.body) == body
    prometheus_style = get(srv, "/metrics", {"Accept-Encoding": "deflate, GZIP;q=0.5"})
    assert prometheus_style.headers["Content-Encoding"] == "gzip"


@pytest.mark.parametrize("accept", [None, "identity", "deflate, br", "gzip;q=0", "gzip;q=x"])
def test_identity_when_gzip_not_accepted(srv: MetricsServer, accept: str | None) -> None:
    srv.set_payload(b"x 1.0\n", gzip.compress(b"x 1.0\n"))
    reply = get(srv, "/metrics", {"Accept-Encoding": accept} if accept else None)
    assert reply.headers["Content-Encoding"] is None
    assert reply.body == b"x 1.0\n"


def test_identity_when_no_gzip_body(srv: MetricsServer) -> None:
    srv.set_payload(b"x 1.0\n")
    reply = get(srv, "/metrics", {"Accept-Encoding": "gzip"})
    assert reply.headers["Content-Encoding"] is None
    assert reply.body == b"x 1.0\n"


def test_healthz_transitions(srv: MetricsServer) -> None:
    assert (get(srv, "/healthz").status, get(srv, "/healthz").body) == (200, b"ok\n")
    srv.set_healthy(False, "restore failed: disk full")
    reply = get(srv, "/healthz")
    assert (reply.status, reply.body) == (503, b"restore failed: disk full\n")
    srv.set_healthy(False)
    assert get(srv, "/healthz").body == b"unhealthy\n"
    srv.set_healthy(True)
    assert get(srv, "/healthz").status == 200


def test_readyz_transitions(srv: MetricsServer) -> None:
    reply = get(srv, "/readyz")
    assert (reply.status, reply.body) == (503, b"starting\n")
    srv.set_ready(False, "restoring partitions")
    reply = get(srv, "/readyz")
    assert (reply.status, reply.body) == (503, b"restoring partitions\n")
    srv.set_ready(True)
    reply = get(srv, "/readyz")
    assert (reply.status, reply.body) == (200, b"ok\n")
    srv.set_ready(False)
    assert get(srv, "/readyz").body == b"not ready\n"


@pytest.mark.parametrize("path", ["/", "/metric", "/metrics/x", "/healthz/", "/favicon.ico"])
def test_unknown_paths_are_404(srv: MetricsServer, path: str) -> None:
    assert get(srv, path).status == 404


def test_no_request_logging_to_stderr(
    srv: MetricsServer, capfd: pytest.CaptureFixture[str]
) -> None:
    get(srv, "/metrics")
    get(srv, "/nope")
    assert capfd.readouterr().err == ""


def test_client_hanging_up_is_logged_not_printed(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aggregator.server")
    with MetricsServer("127.0.0.1", 0) as srv:
        srv.set_payload(b"x" * 20_000_000)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            sock.recv(100)
            # Linger 0: the close resets the connection mid-body, like a timed-out scraper.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        deadline = time.monotonic() + 5
        while "went away" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "went away during /metrics" in caplog.text
        assert get(srv, "/healthz").status == 200
    assert capfd.readouterr().err == ""


def test_concurrent_scrapes_while_payload_swaps(srv: MetricsServer) -> None:
    payloads = [bytes([65 + i]) * 100_000 for i in range(5)]
    srv.set_payload(payloads[0])
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def scrape() -> None:
        try:
            for _ in range(5):
                seen.append(get(srv, "/metrics").body)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=scrape) for _ in range(4)]
    for t in threads:
        t.start()
    for p in payloads:
        srv.set_payload(p)
    for t in threads:
        t.join()
    assert not errors
    assert len(seen) == 20
    assert all(body in payloads for body in seen)


def test_start_stop_lifecycle() -> None:
    srv = MetricsServer("127.0.0.1", 0)
    assert srv.port == 0
    srv.stop()  # not started: nothing to do
    srv.start()
    port = srv.port
    with pytest.raises(RuntimeError, match="already started"):
        srv.start()
    assert get(srv, "/healthz").status == 200
    srv.stop()
    srv.stop()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass
    # The port is released (allow_reuse_address): a new server can bind it at once.
    with MetricsServer("127.0.0.1", port) as again:
        assert get(again, "/healthz").status == 200


def test_taken_port_raises() -> None:
    with MetricsServer("127.0.0.1", 0) as first:
        second = MetricsServer("127.0.0.1", first.port)
        with pytest.raises(OSError, match="in use"):
            second.start()
