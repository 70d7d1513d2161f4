"""Secured Kafka, for real: a SASL_SSL (SCRAM-SHA-512) broker and a mutual-TLS broker.

Both are started by scripts/kafka.sh with certificates made at test time (openssl) in a
temp dir, once per module, on their own names and ports, and removed at the end. The
producer and the aggregator connect with settings only; a wrong password must give
the aggregator a clear error and a non-zero exit, and the producer counted failures;
no secret may show up in logs, ``--help``, /metrics or exception text.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from kafka_util import kafka_script, unique
from shards import ROOT, ShardProcess, free_port, parse_metrics, shard_args, total, wait_until

from demo.procs import run_module, script_result
from producer import PredictionPublisher, PublisherSettings

SASL_PORT = int(os.environ.get("MODELPULSE_TEST_SASL_PORT", "28192"))
MTLS_PORT = int(os.environ.get("MODELPULSE_TEST_MTLS_PORT", "28292"))
USER = "modelpulse-test"
EVENTS = 300


@dataclass
class Secured:
    name: str
    bootstrap: str
    tls: Path
    password: str = ""

    def client(self, **override: Any) -> dict[str, Any]:
        """Settings fields (shared by PublisherSettings and AggregatorSettings)."""
        conf: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "ssl_ca_location": str(self.tls / "ca.pem"),
        }
        if self.password:
            conf |= {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": USER,
                "sasl_password": self.password,
            }
        else:
            conf |= {
                "security_protocol": "SSL",
                "ssl_certificate_location": str(self.tls / "client.pem"),
                "ssl_key_location": str(self.tls / "client.key"),
            }
        return conf | override

    def librdkafka(self) -> dict[str, Any]:
        return PublisherSettings(**self.client()).kafka_config()

    def env(self, **override: Any) -> dict[str, str]:
        """The shard's settings as MODELPULSE_* variables: no secret on a command line."""
        items = self.client(**override).items()
        return _Env({f"MODELPULSE_{k.upper()}": str(v) for k, v in items if v is not None})


class _Env(dict[str, str]):
    """An environment whose repr (in a failed assertion's output) shows no secret."""

    def __repr__(self) -> str:
        return f"<{len(self)} MODELPULSE_* variables>"


def _start(name: str, port: int, security: str, tls: Path, password: str = "") -> Secured:
    env = {"KAFKA_SCRAM_USER": USER, "KAFKA_SCRAM_PASSWORD": password} if password else {}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        kafka_script("clean", "--name", name)  # a leftover of an aborted run
        bootstrap = start_local_cluster_secured(name, port, security, tls)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Secured(name, bootstrap, tls, password)


def start_local_cluster_secured(name: str, port: int, security: str, tls: Path) -> str:
    out = kafka_script(
        "start", "--name", name, "--port", str(port), "--security", security, "--tls-dir", str(tls)
    )
    return out.strip().splitlines()[-1].removeprefix("bootstrap=")


@pytest.fixture(scope="module")
def sasl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    password = f"pw-{secrets.token_urlsafe(18)}"
    cluster = _start(
        "pytest-sasl", SASL_PORT, "sasl_ssl", tmp_path_factory.mktemp("tls-sasl"), password
    )
    try:
        yield cluster
    finally:
        kafka_script("clean", "--name", cluster.name, "--kill")


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    cluster = _start("pytest-mtls", MTLS_PORT, "mtls", tmp_path_factory.mktemp("tls-mtls"))
    try:
        yield cluster
    finally:
        kafka_script("clean", "--name", cluster.name, "--kill")


def _topic(cluster: Secured, partitions: int = 2) -> str:
    admin = AdminClient(cluster.librdkafka())
    name = unique("sec")
    for fut in admin.create_topics([NewTopic(name, num_partitions=partitions)]).values():
        fut.result(timeout=60)
    return name


def _publish(cluster: Secured, topic: str, **override: Any) -> PredictionPublisher:
    pub = PredictionPublisher(
        PublisherSettings(**cluster.client(topic=topic, linger_seconds=0.05, **override))
    )
    for i in range(EVENTS):
        pub.publish(
            f"m{i % 3}", "v1", 0.01, prediction="a", label="a", score=0.9, event_time=time.time()
        )
    return pub


def _shard(cluster: Secured, topic: str, log: Path, **override: Any) -> ShardProcess:
    # A short idle timeout: the shard's own watermark markers close every pane soon.
    args = shard_args("-", topic, idle_timeout="2s")
    i = args.index("--bootstrap-servers")
    del args[i : i + 2]  # every Kafka setting, the secret included, comes from the environment
    return ShardProcess(args, free_port(), log, env=cluster.env(**override))


def _assert_no_secret(secret: str, *texts: str) -> None:
    for text in texts:
        assert secret not in text


def _end_to_end(cluster: Secured, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    topic = _topic(cluster)
    shard = _shard(cluster, topic, tmp_path / "shard.log").start()
    try:
        pub = _publish(cluster, topic)
        stats = pub.close(30)
        assert (stats.sent, stats.failed, stats.dropped) == (EVENTS, 0, 0)

        seen: list[object] = []

        def counted() -> bool:
            status, body = shard.get()
            if status != 200:
                seen[:] = [status, body[:200]]
                return False
            samples = parse_metrics(body)
            seen[:] = [total(samples, "inference_predictions_total")]
            return seen[0] == EVENTS

        try:
            wait_until(counted, 60, f"{EVENTS} events counted", [shard])
        except AssertionError as exc:
            raise AssertionError(f"last /metrics: {seen}") from exc
        _, body = shard.get()
    finally:
        assert shard.terminate() == 0, shard.log_tail()
    if cluster.password:
        _assert_no_secret(cluster.password, body, shard.log_path.read_text(), caplog.text)


def test_sasl_ssl_scram_producer_and_aggregator(
    sasl: Secured, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _end_to_end(sasl, tmp_path, caplog)


def test_mutual_tls_producer_and_aggregator(
    mtls: Secured, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _end_to_end(mtls, tmp_path, caplog)


def test_wrong_password_aggregator_exits_with_a_clear_error(sasl: Secured, tmp_path: Path) -> None:
    wrong = f"wrong-{secrets.token_urlsafe(12)}"
    shard = _shard(sasl, "predictions", tmp_path / "bad.log", sasl_password=wrong).start()
    assert shard.proc is not None
    try:
        code = shard.proc.wait(90)  # bounded: list_topics gives up after 10 s
    finally:
        shard.kill()
    log = shard.log_path.read_text()
    assert code == 1, log
    assert "cannot use Kafka at" in log and "security_protocol=SASL_SSL" in log, log
    assert "SASL authentication error" in log, log
    assert "Traceback" not in log, log
    _assert_no_secret(wrong, log)
    _assert_no_secret(sasl.password, log)


def test_wrong_password_producer_counts_failures(
    sasl: Secured, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = f"wrong-{secrets.token_urlsafe(12)}"
    pub = _publish(sasl, _topic(sasl), sasl_password=wrong, delivery_timeout_seconds=3)
    try:  # publish() returned for every event: nothing raised into the caller
        wait_until(lambda: pub.stats().failed == EVENTS, 60, "every event counted as failed", [])
    finally:
        stats = pub.close(10)
    assert (stats.sent, stats.failed) == (0, EVENTS)
    assert "SASL authentication error" in caplog.text
    _assert_no_secret(wrong, caplog.text, repr(stats), repr(pub))


def test_mtls_without_client_certificate_is_refused(mtls: Secured) -> None:
    conf = mtls.client(ssl_certificate_location=None, ssl_key_location=None, topic=_topic(mtls))
    pub = PredictionPublisher(PublisherSettings(**conf, delivery_timeout_seconds=3))
    pub.publish("m", "v1", 0.01, prediction="a")
    wait_until(lambda: pub.stats().failed == 1, 60, "the event counted as failed", [])
    assert pub.close(10).sent == 0


def test_secrets_stay_out_of_help_repr_and_errors(sasl: Secured) -> None:
    env = {**os.environ, **sasl.env(ssl_key_password="key-" + sasl.password)}
    helped = run_module("aggregator", "--help", env=env, timeout=60)
    assert helped.returncode == 0, helped.stderr
    out = helped.stdout
    assert "--sasl-password" in out and "--ssl-key-password" in out
    _assert_no_secret(sasl.password, out)
    from aggregator.settings import AggregatorSettings

    settings = AggregatorSettings(**sasl.client(ssl_key_password="k-" + sasl.password))
    pub_settings = PublisherSettings(**sasl.client())
    _assert_no_secret(sasl.password, repr(settings), str(settings), repr(pub_settings))
    _assert_no_secret(sasl.password, settings.model_dump_json(), pub_settings.model_dump_json())
    # A validation error elsewhere in the settings does not echo the secret either.
    with pytest.raises(ValueError, match="http_port") as exc:
        AggregatorSettings(**sasl.client(http_port=-1))
    _assert_no_secret(sasl.password, str(exc.value))


def test_broker_files_hold_no_client_password(sasl: Secured) -> None:
    run = Path(os.environ.get("MODELPULSE_RUN_DIR", ROOT / ".run")) / f"kafka-{sasl.name}"
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "server.log" for p in files)
    for path in files:
        assert sasl.password.encode() not in path.read_bytes(), path


def test_cluster_start_refuses_a_missing_scram_password(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_SCRAM_PASSWORD"}
    env["MODELPULSE_RUN_DIR"] = str(tmp_path / "run")
    port = str(free_port())
    proc = script_result(
        "kafka.sh", "start", "--name", "nopw", "--port", port, "--security", "sasl_ssl", env=env
    )
    assert proc.returncode == 1
    assert "KAFKA_SCRAM_PASSWORD" in proc.stderr
