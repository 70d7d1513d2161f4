"""The dev stack's processes: start, wait for, stop, in one place.

``python -m demo`` and the tests (tests/shards.py, tests/kafka_util.py,
tests/conftest.py) both run the services of ``scripts/*.sh`` (Kafka, Prometheus, the
schema registry: their pid files, port waits and stop-with-timeout are
scripts/lib/service.sh) and aggregator shards as child processes. This is the Python
side of the same supervisor: run a service script and read what it prints, spawn a
shard with its log, wait for a condition within a deadline, stop with SIGTERM and
SIGKILL what outlives the timeout.

It lives in ``demo``, not ``tests``: the tests import the demo package already
(tests/test_dashboards.py runs its fleet), the demo cannot import the tests, and
``demo`` is a developer's package, not one of the shipped ones (producer, aggregator,
schemas). It imports nothing of the aggregator: the shards are other processes.

>>> printed("started\\nbootstrap=127.0.0.1:9092\\n", "bootstrap")
'127.0.0.1:9092'
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"

T = TypeVar("T")
Samples = dict[str, list[tuple[dict[str, str], float]]]


class ScriptError(RuntimeError):
    """A ``scripts/*.sh`` command exited non-zero; the message carries its output."""


def _finish(
    command: list[str], timeout: float | None, env: dict[str, str] | None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    # The caller reads the exit code: a failing command is an answer here, not an error.
    return subprocess.run(
        command,
        check=False,
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def script_result(
    script: str, *args: str, env: dict[str, str] | None = None, timeout: float | None = 180.0
) -> subprocess.CompletedProcess[str]:
    """``scripts/<script> args`` run to its end, whatever its exit code (output captured)."""
    return _finish(["bash", str(SCRIPTS / script), *args], timeout, env)


def run_module(
    module: str,
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` from the repository root, run to its end, whatever its
    exit code (a CLI's usage errors and output, e.g. ``python -m aggregator --help``)."""
    return _finish([sys.executable, "-m", module, *args], timeout, env, stdin)


def run_script(
    script: str,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float | None = 180.0,
) -> str:
    """Run ``scripts/<script>`` and return what it printed; ``ScriptError`` on failure."""
    proc = script_result(script, *args, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise ScriptError(f"{script} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def script_succeeds(
    script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> bool:
    """Whether ``scripts/<script> args`` exits 0 (``status``; a ``stop`` that may fail)."""
    return script_result(script, *args, env=env, timeout=timeout).returncode == 0


def printed(output: str, key: str) -> str:
    """The value of the ``key=value`` line a service script prints when it has started."""
    match = re.search(rf"^{re.escape(key)}=(\S+)$", output, re.MULTILINE)
    if match is None:
        raise ScriptError(f"no {key}= line in the script's output:\n{output}")
    return match.group(1)


def start_kafka(name: str, port: int, brokers: int = 1, timeout: float | None = 180.0) -> str:
    """Start (or find running) the KRaft cluster ``name`` of scripts/kafka.sh; its bootstrap."""
    out = run_script(
        "kafka.sh",
        "start",
        "--name",
        name,
        "--port",
        str(port),
        "--brokers",
        str(brokers),
        timeout=timeout,
    )
    return printed(out, "bootstrap")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_metrics(text: str) -> Samples:
    """Prometheus text exposition -> samples by name: ``{name: [(labels, value)]}``."""
    out: Samples = defaultdict(list)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name].append((dict(s.labels), float(s.value)))
    return out


@dataclass
class ShardProcess:
    """One ``python -m aggregator`` child process, its /metrics port and its log file."""

    args: list[str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ShardProcess:
        with self.log_path.open("ab") as log:
            self.proc = self._spawn(log)
        return self

    def _spawn(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "aggregator", *self.args, "--http-port", str(self.port)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no final snapshot, no goodbye to the group."""
        if self.proc is not None and self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and the exit code; ``subprocess.TimeoutExpired`` if it outlives ``timeout``."""
        if self.proc is None:
            return 0
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def get(self, path: str = "/metrics", timeout: float = 5.0) -> tuple[int, str]:
        """(status, body) of a GET; ``OSError`` when nothing answers."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def scrape(self) -> Samples:
        status, body = self.get()
        # An AssertionError, as the tests' own checks raise: a failed scrape is a failed check.
        if status != 200:
            raise AssertionError(body)
        return parse_metrics(body)

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


def stop_all(shards: Sequence[ShardProcess], timeout: float = 30.0) -> None:
    """SIGTERM every shard at once (they leave the group together), then SIGKILL any
    still running when ``timeout`` is over."""
    for s in shards:
        if s.alive():
            assert s.proc is not None
            s.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for s in shards:
        try:
            if s.proc is not None:
                s.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            s.kill()


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    shards: Sequence[ShardProcess] = (),
) -> T:
    """Poll ``predicate`` until it returns something true and return that; on timeout an
    ``AssertionError`` naming ``what``, the last error and the tails of the shards' logs."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # a shard restarting refuses connections for a moment
            last_exc = exc
        time.sleep(0.25)
    logs = "\n\n".join(f"--- {s.log_path.name}\n{s.log_tail()}" for s in shards)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_exc})\n{logs}")
