"""coredns/docker-compose.yml is checked by parsing: no Docker engine runs here."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from conftest import pinned_version
from tfcluster.cloudinit.corefile import DOCKER_COMPOSE, render_corefile

COREDNS = Path(__file__).resolve().parent.parent / "coredns"


def compose() -> dict:
    return yaml.safe_load((COREDNS / "docker-compose.yml").read_text())


def published(service: dict) -> dict[str, str]:
    """container port (with /proto) -> host address:port."""
    result = {}
    for entry in service["ports"]:
        host_ip, host_port, container = entry.split(":")
        result[container if "/" in container else f"{container}/tcp"] = f"{host_ip}:{host_port}"
    return result


def test_corefile_is_rendered_from_the_shared_template():
    assert (COREDNS / "Corefile").read_text() == render_corefile(DOCKER_COMPOSE), (
        "coredns/Corefile is stale: python -m tfcluster.cloudinit.corefile > coredns/Corefile"
    )


def test_services_and_corefile_mount_agree():
    services = compose()["services"]
    assert set(services) == {"etcd", "coredns"}
    coredns = services["coredns"]
    conf = coredns["command"][coredns["command"].index("-conf") + 1]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in coredns["volumes"]}
    assert mounts[conf] == "./Corefile"
    assert (COREDNS / "Dockerfile").exists() and coredns["build"] == "."
    assert coredns["depends_on"]["etcd"]["condition"] == "service_healthy"


def test_ports_agree_with_the_corefile_and_etcd_flags():
    services = compose()["services"]
    etcd_flags = dict(arg.split("=", 1) for arg in services["etcd"]["command"][1:])
    client_port = etcd_flags["--listen-client-urls"].rsplit(":", 1)[1]
    # CoreDNS reaches etcd by service name on the port etcd listens on.
    assert DOCKER_COMPOSE.etcd_endpoints == (f"http://etcd:{client_port}",)
    assert etcd_flags["--advertise-client-urls"] == f"http://etcd:{client_port}"
    assert f"{client_port}/tcp" in published(services["etcd"])

    ports = published(services["coredns"])
    assert {f"{DOCKER_COMPOSE.dns_port}/udp", f"{DOCKER_COMPOSE.dns_port}/tcp"} <= set(ports)
    for addr in (DOCKER_COMPOSE.ready_addr, DOCKER_COMPOSE.health_addr):
        assert f"{addr.rsplit(':', 1)[1]}/tcp" in ports
    # Published on loopback only.
    assert all(host.startswith("127.0.0.1:") for host in ports.values())


def test_images_are_pinned_to_the_versions_we_build():
    services = compose()["services"]
    tag = services["etcd"]["image"].rsplit(":", 1)[1]
    assert tag == "v" + pinned_version("scripts/etcd/go.mod", "go.etcd.io/etcd/server/v3")
    dockerfile = (COREDNS / "Dockerfile").read_text()
    assert re.search(r"COPY go\.mod go\.sum main\.go", dockerfile)
