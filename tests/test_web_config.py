"""/metrics behind TLS and basic auth (``--web-config-file``, exporter-toolkit format).

Unit tests against a MetricsServer on 127.0.0.1, and the real thing: a shard process
scraped by the real Prometheus over TLS with basic auth.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from kafka_util import create_topic, run_script, script_succeeds, unique
from shards import ShardProcess, free_port, shard_args, wait_until

from aggregator.server import MetricsServer
from aggregator.webconfig import WebConfig, WebConfigError, load_web_config
from demo.procs import run_module

USER = "prometheus"


@dataclass
class Certs:
    dir: Path
    ca: Path
    server: Path
    server_key: Path
    client: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("web-tls")
    _openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", "ca.key"),
        *("-out", "ca.pem", "-subj", "/CN=modelpulse-web-test-ca"),
        cwd=d,
    )
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl(
            *("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key"),
            *("-out", f"{name}.csr", "-subj", f"/CN=modelpulse-{name}"),
            cwd=d,
        )
        _openssl(
            *("x509", "-req", "-days", "2", "-in", f"{name}.csr", "-CA", "ca.pem"),
            *("-CAkey", "ca.key", "-CAcreateserial", "-out", f"{name}.pem"),
            *("-extfile", f"{name}.ext"),
            cwd=d,
        )
    return Certs(
        d, d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key"
    )


@pytest.fixture(scope="module")
def password() -> str:
    return "web-" + base64.urlsafe_b64encode(os.urandom(12)).decode()


def _web_config(path: Path, certs: Certs, password: str, **tls: str) -> Path:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()
    path.write_text(
        yaml.safe_dump(
            {
                # Relative paths resolve against the config file's directory.
                "tls_server_config": {
                    "cert_file": os.path.relpath(certs.server, path.parent),
                    "key_file": str(certs.server_key),
                    **tls,
                },
                "basic_auth_users": {USER: hashed},
            }
        )
    )
    return path


def _auth(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _client_context(certs: Certs, with_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    if with_cert:
        ctx.load_cert_chain(str(certs.client), str(certs.client_key))
    return ctx


def _get(
    port: int, path: str, ctx: ssl.SSLContext, headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


@pytest.fixture
def tls_server(tmp_path: Path, certs: Certs, password: str) -> Iterator[MetricsServer]:
    server = MetricsServer("127.0.0.1", 0)
    server.use_web_config(load_web_config(_web_config(tmp_path / "web.yml", certs, password)))
    with server:
        server.set_payload(b"up 1.0\n")
        server.set_ready(True)
        yield server


def test_basic_auth_over_tls(tls_server: MetricsServer, certs: Certs, password: str) -> None:
    ctx = _client_context(certs)
    port = tls_server.port
    assert tls_server.url == f"https://127.0.0.1:{port}/metrics"
    status, headers, _ = _get(port, "/metrics", ctx)
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Basic realm="modelpulse"'
    assert _get(port, "/metrics", ctx, _auth(USER, password + "x"))[0] == 401
    assert _get(port, "/metrics", ctx, _auth("someone", password))[0] == 401
    assert _get(port, "/metrics", ctx, {"Authorization": "Basic !!!"})[0] == 401
    for _ in range(2):  # the second answer comes from the cache of good credentials
        status, _, body = _get(port, "/metrics", ctx, _auth(USER, password))
        assert (status, body) == (200, b"up 1.0\n")
    # Probes need no credentials (kubelet cannot send them), but TLS all the same.
    assert _get(port, "/healthz", ctx)[0] == 200
    assert _get(port, "/readyz", ctx)[0] == 200


def test_plain_http_to_a_tls_port_gets_no_metrics(tls_server: MetricsServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", tls_server.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.getresponse()
    finally:
        conn.close()
    with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not know the CA
        _get(tls_server.port, "/healthz", ssl.create_default_context())


def test_client_certificates_when_required(tmp_path: Path, certs: Certs, password: str) -> None:
    config = _web_config(
        tmp_path / "web.yml",
        certs,
        password,
        client_ca_file=str(certs.ca),
        client_auth_type="RequireAndVerifyClientCert",
    )
    server = MetricsServer("127.0.0.1", 0)
    server.use_web_config(load_web_config(config))
    with server:
        server.set_payload(b"up 1.0\n")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _get(server.port, "/metrics", _client_context(certs), _auth(USER, password))
        status, _, body = _get(
            server.port, "/metrics", _client_context(certs, with_cert=True), _auth(USER, password)
        )
        assert (status, body) == (200, b"up 1.0\n")


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ({"tls_server_config": {"cert_file": "missing.pem", "key_file": "k"}}, "cert_file"),
        ({"basic_auth_users": {"u": "plain-password"}}, "basic_auth_users.u"),
        ({"basic_auth_users": {}}, "basic_auth_users"),
        ({"tls_config": {}}, "unsupported key"),
        ({"tls_server_config": {"cert_file": "x", "key_file": "y", "bogus": 1}}, "bogus"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, content: dict[str, Any], error: str) -> None:
    path = tmp_path / "web.yml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(WebConfigError, match=error) as exc:
        load_web_config(path)
    assert "plain-password" not in str(exc.value)


def test_bad_client_auth_type_and_missing_ca(tmp_path: Path, certs: Certs, password: str) -> None:
    for tls, error in (
        ({"client_auth_type": "Sometimes"}, "client_auth_type"),
        ({"client_auth_type": "RequireAndVerifyClientCert"}, "client_ca_file"),
        ({"min_version": "TLS10"}, "min_version"),
    ):
        with pytest.raises(WebConfigError, match=error):
            load_web_config(_web_config(tmp_path / "web.yml", certs, password, **tls))


def test_web_config_must_come_before_start(tls_server: MetricsServer) -> None:
    with pytest.raises(RuntimeError, match="before start"):
        tls_server.use_web_config(WebConfig())


def test_cli_refuses_a_bad_web_config_file(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text("basic_auth_users: {u: nothash}\n")
    proc = run_module("aggregator", "--web-config-file", str(path), timeout=60)
    assert proc.returncode == 2
    assert "--web-config-file: basic_auth_users.u: not a bcrypt hash" in proc.stderr
    assert "nothash" not in proc.stderr


# -- the real Prometheus scrapes a real shard ----------------------------------------


def _prometheus_config(path: Path, port: int, certs: Certs, password: str) -> Path:
    (path.parent / "good.pw").write_text(password)
    (path.parent / "bad.pw").write_text(password + "-wrong")
    tls = {"ca_file": str(certs.ca), "server_name": "127.0.0.1"}
    jobs = [
        {
            "job_name": job,
            "scheme": "https",
            "tls_config": tls,
            "basic_auth": {"username": USER, "password_file": str(path.parent / pw)},
            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
        }
        for job, pw in (("secured", "good.pw"), ("wrong-password", "bad.pw"))
    ]
    path.write_text(
        yaml.safe_dump(
            {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"}, "scrape_configs": jobs}
        )
    )
    return path


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    q = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as resp:
        result: list[dict[str, Any]] = json.load(resp)["data"]["result"]
    return result


def test_prometheus_scrapes_a_shard_over_tls_with_basic_auth(
    kafka_bootstrap: str, tmp_path: Path, certs: Certs, password: str
) -> None:
    topic = create_topic(kafka_bootstrap, unique("web"), 1)
    port = free_port()
    config = _web_config(tmp_path / "web.yml", certs, password)
    shard = ShardProcess(
        [*shard_args(kafka_bootstrap, topic), "--web-config-file", str(config)],
        port,
        tmp_path / "shard.log",
    ).start()
    ctx = _client_context(certs)
    env = {**os.environ, "MODELPULSE_RUN_DIR": str(tmp_path / "run")}
    name = unique("web")
    prom_port = free_port()
    prom = f"http://127.0.0.1:{prom_port}"
    try:
        wait_until(lambda: _get(port, "/readyz", ctx)[0] == 200, 60, "shard ready", [shard])
        assert _get(port, "/metrics", ctx)[0] == 401
        assert _get(port, "/metrics", ctx, _auth(USER, "wrong"))[0] == 401
        status, _, body = _get(port, "/metrics", ctx, _auth(USER, password))
        assert status == 200 and b"modelpulse_" in body
        prom_config = _prometheus_config(tmp_path / "prometheus.yml", port, certs, password)
        start = ["start", "--name", name, "--port", str(prom_port), "--config", str(prom_config)]
        run_script("prometheus.sh", *start, env=env, timeout=120)

        def scraped() -> bool:
            up = {r["metric"]["job"]: r["value"][1] for r in _query(prom, "up")}
            return up == {"secured": "1", "wrong-password": "0"}

        wait_until(scraped, 60, "up == 1 with the password, 0 with a wrong one", [shard])
        series = _query(prom, 'count({job="secured", __name__=~"modelpulse_.+"})')
        assert series and float(series[0]["value"][1]) > 0
        targets = urllib.request.urlopen(f"{prom}/api/v1/targets", timeout=10)
        wrong = [
            t
            for t in json.load(targets)["data"]["activeTargets"]
            if t["labels"]["job"] == "wrong-password"
        ]
        assert "401" in wrong[0]["lastError"], wrong
    finally:
        script_succeeds("prometheus.sh", "stop", "--name", name, env=env)  # failure: gone already
        code = shard.terminate()
    assert code == 0, shard.log_tail()
    assert password not in shard.log_path.read_text()
