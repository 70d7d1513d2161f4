"""docker-compose.yml, checked without Docker: mounts, ports, images, scaling.

No Docker engine runs here, so ``docker compose config`` cannot either; these tests read
the file and the files it points at, and check that the pieces agree with each other.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read docker-compose.yml")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
OVERRIDES = [ROOT / "grafana" / "alerting-examples" / "compose.alerting.yml"]
PROMETHEUS_DOCKER = ROOT / "prometheus" / "prometheus.docker.yml"
GRAFANA_DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources"
GRAFANA_PROVIDERS = ROOT / "grafana" / "provisioning" / "dashboards"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(host path, container path, read-only) of a service's bind mounts, both syntaxes."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            source, target = parts[0], parts[1]
            read_only = len(parts) > 2 and "ro" in parts[2].split(",")
            if not source.startswith((".", "/", "~")):
                continue  # a named volume
        else:
            if volume.get("type") != "bind":
                continue
            source, target = volume["source"], volume["target"]
            read_only = bool(volume.get("read_only"))
        mounts.append((source, target, read_only))
    return mounts


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


def container_ports(service: dict[str, Any]) -> set[int]:
    """Ports the service's containers listen on, as the file declares them."""
    ports = {int(str(p).split("/")[0]) for p in service.get("expose", [])}
    for mapping in service.get("ports", []):
        text = str(mapping["target"] if isinstance(mapping, dict) else mapping)
        ports.add(int(text.rsplit(":", maxsplit=1)[-1].split("/", maxsplit=1)[0]))
    return ports


def test_services(services: dict[str, dict[str, Any]]) -> None:
    assert {"kafka", "aggregator", "fleet", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        for dep in service.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"


def test_bind_mounts_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for source, target, read_only in bind_mounts(service):
            path = (COMPOSE_FILE.parent / source).resolve()
            assert path.exists(), f"{name}: {source} (mounted at {target}) is not in the repo"
            assert path.is_relative_to(ROOT), f"{name}: {source} is outside the repository"
            assert read_only, f"{name}: {source} is configuration, mount it read-only"
        build = service.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile")
            assert (COMPOSE_FILE.parent / context / (dockerfile or "Dockerfile")).is_file(), name


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service.get("image")
        assert image, f"{name}: no image (a built image needs a name:tag too)"
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image} is not pinned"
    base = re.search(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert base is not None
    assert ":" in base[1] and not base[1].endswith(":latest"), f"Dockerfile FROM {base[1]}"


def test_aggregator_can_be_scaled(services: dict[str, dict[str, Any]]) -> None:
    """``docker compose up --scale aggregator=3``: nothing may be unique per container."""
    aggregator = services["aggregator"]
    assert "container_name" not in aggregator
    assert not aggregator.get("ports"), "a fixed host port cannot be bound by every replica"
    assert aggregator.get("image") and aggregator.get("build")


def test_prometheus_scrapes_the_aggregator_port(services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    mounted = {target: source for source, target, _ in bind_mounts(prometheus)}
    config_path = flag(command(prometheus), "--config.file") or "/etc/prometheus/prometheus.yml"
    assert config_path in mounted, f"{config_path} is not mounted into the prometheus service"
    assert (COMPOSE_FILE.parent / mounted[config_path]).resolve() == PROMETHEUS_DOCKER
    config = yaml.safe_load(PROMETHEUS_DOCKER.read_text())
    port = int(environment(services["aggregator"])["MODELPULSE_HTTP_PORT"])
    assert port in container_ports(services["aggregator"]), "MODELPULSE_HTTP_PORT not exposed"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["modelpulse-aggregator"]  # the job the dashboards and alerts select
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["aggregator"] and sd["type"] == "A"
    assert sd["port"] == port, f"dns_sd port {sd['port']} != MODELPULSE_HTTP_PORT {port}"


def test_prometheus_rule_files_are_mounted(services: dict[str, dict[str, Any]]) -> None:
    """Each rule_files glob of the docker config matches files the container can see.

    A glob that matches nothing is no error for Prometheus: the rules would silently be
    missing, and with them every alert.
    """
    prometheus = services["prometheus"]
    config_path = flag(command(prometheus), "--config.file") or "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load(PROMETHEUS_DOCKER.read_text())
    mounts = [(target.rstrip("/"), source) for source, target, _ in bind_mounts(prometheus)]
    for pattern in config.get("rule_files", []):
        in_container = str(Path(config_path).parent / pattern)
        host = [
            (COMPOSE_FILE.parent / source).resolve() / Path(in_container).relative_to(target)
            for target, source in mounts
            if Path(in_container).is_relative_to(target) and in_container != target
        ]
        assert host, f"rule_files {pattern!r} ({in_container}) is in no volume of prometheus"
        matched = sorted(host[-1].parent.glob(host[-1].name))
        assert matched, f"rule_files {pattern!r} -> {host[-1]} matches no file"


def test_grafana_reaches_prometheus(services: dict[str, dict[str, Any]]) -> None:
    (datasource,) = [
        ds
        for f in sorted(GRAFANA_DATASOURCES.glob("*.y*ml"))
        for ds in yaml.safe_load(f.read_text())["datasources"]
    ]
    url = urlparse(datasource["url"])
    assert url.hostname in services, f"datasource host {url.hostname} is no compose service"
    listen = flag(command(services[url.hostname]), "--web.listen-address") or ":9090"
    assert url.port == int(listen.rsplit(":", 1)[1]), f"{datasource['url']} vs {listen}"
    assert url.port in container_ports(services[url.hostname]) | {9090}


def test_grafana_provisioning_is_mounted(services: dict[str, dict[str, Any]]) -> None:
    mounts = {target: source for source, target, _ in bind_mounts(services["grafana"])}
    provisioning = (COMPOSE_FILE.parent / mounts["/etc/grafana/provisioning"]).resolve()
    assert provisioning == ROOT / "grafana" / "provisioning"
    (provider,) = [
        p
        for f in sorted(GRAFANA_PROVIDERS.glob("*.y*ml"))
        for p in yaml.safe_load(f.read_text())["providers"]
    ]
    dashboards = mounts[provider["options"]["path"]]
    assert (COMPOSE_FILE.parent / dashboards).resolve() == ROOT / "grafana" / "dashboards"


def test_kafka_address_agrees(services: dict[str, dict[str, Any]]) -> None:
    listeners = environment(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"]
    advertised = {urlparse(x).netloc for x in listeners.split(",")}
    assert environment(services["aggregator"])["MODELPULSE_BOOTSTRAP_SERVERS"] in advertised
    assert flag(command(services["fleet"]), "--bootstrap-servers") in advertised


@pytest.mark.parametrize("path", OVERRIDES, ids=lambda p: p.name)
def test_override_files(path: Path, services: dict[str, dict[str, Any]]) -> None:
    """Example override files only touch services of docker-compose.yml, and mount nothing."""
    doc = yaml.safe_load(path.read_text())
    for name, service in doc["services"].items():
        assert name in services, f"{path.name}: unknown service {name}"
        assert not service.get("volumes"), (
            f"{path.name}: a file mounted into the read-only provisioning mount cannot be "
            "created there; copy the file into grafana/provisioning instead"
        )
