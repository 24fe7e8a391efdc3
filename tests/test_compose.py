"""coredns/docker-compose.yml run for real: etcd and CoreDNS in containers.

The images are built from the static binaries of `make setup` (nothing is
pulled). Both containers use the host's network and listen on 127.0.0.1 on
free ports, so every query of these tests goes to loopback. A real agent
process claims worker0.tensorflow.local in the containerised etcd, `dig`
asks the containerised CoreDNS for it, and `down -v` must leave nothing of
the compose project behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from dockerd import Docker, docker_engine

from conftest import REPO, pinned_version, require_tool
from harness import make_agent
from tfcluster.cloudinit.localcloud import localstack
from tfcluster.cloudinit.localcloud.localstack import StackSettings
from tfcluster.cloudinit.render.corefile import DOCKER_COMPOSE, render_corefile
from tfcluster.discovery import records
from tfcluster.discovery.waiting import wait_for

COREDNS = REPO / "coredns"
COMPOSE_FILE = COREDNS / "docker-compose.yml"
SERVICES = ("etcd", "coredns")
BUILD_TIMEOUT = 300.0
UP_TIMEOUT = 120.0
HEALTHY_TIMEOUT = 60.0
AGENT_IP = "127.0.42.1"


def compose_file() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def image_tags() -> dict[str, str]:
    return {name: service["image"] for name, service in compose_file()["services"].items()}


def test_corefile_is_rendered_from_the_shared_template() -> None:
    assert (COREDNS / "Corefile").read_text() == render_corefile(DOCKER_COMPOSE), (
        "coredns/Corefile is stale: "
        "python -m tfcluster.cloudinit.render.corefile > coredns/Corefile"
    )


def test_compose_defaults_are_the_local_stack_defaults() -> None:
    """Whatever works against `scripts/local-stack up` works against the containers.

    The real test below runs on free ports, so it cannot see the defaults.
    """
    defaults = StackSettings()
    assert defaults.corefile() == DOCKER_COMPOSE
    services = compose_file()["services"]
    client = f"http://127.0.0.1:${{TFCLUSTER_ETCD_PORT:-{defaults.etcd_port}}}"
    peer = f"http://127.0.0.1:${{TFCLUSTER_ETCD_PEER_PORT:-{defaults.etcd_peer_port}}}"
    assert {f"--listen-client-urls={client}", f"--listen-peer-urls={peer}"} <= set(
        services["etcd"]["command"]
    )
    ready = f"http://127.0.0.1:${{TFCLUSTER_COREDNS_READY_PORT:-{defaults.ready_port}}}/ready"
    assert services["coredns"]["healthcheck"]["test"][-1] == ready


# --- the real thing -------------------------------------------------------------------------


def compose_cli(docker: Docker) -> list[str]:
    """Compose v2 as a docker plugin if there is one, else Debian's docker-compose 1.29."""
    plugin = docker.docker("compose", "version", check=False)
    if plugin.returncode == 0:
        return [docker.cli, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone is None:
        pytest.skip("neither docker compose nor docker-compose is installed (make setup, as root)")
    return [standalone]


@dataclass
class Compose:
    """One compose project of coredns/docker-compose.yml on free loopback ports."""

    docker: Docker
    cli: list[str]
    project: str
    stack: StackSettings
    corefile: Path

    @property
    def env(self) -> dict[str, str]:
        """The compose file's variables: this run's ports and Corefile."""
        return {
            "TFCLUSTER_ETCD_PORT": str(self.stack.etcd_port),
            "TFCLUSTER_ETCD_PEER_PORT": str(self.stack.etcd_peer_port),
            "TFCLUSTER_COREFILE": str(self.corefile),
            "TFCLUSTER_COREDNS_READY_PORT": str(self.stack.ready_port),
        }

    def __call__(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        argv = [*self.cli, "--project-name", self.project, "--file", str(COMPOSE_FILE), *args]
        return self.docker.run(argv, timeout=timeout, env=self.env)

    def labelled(self, kind: str) -> list[str]:
        """IDs of the project's containers, volumes or networks that the engine holds."""
        args = [kind, "ls"] if kind != "container" else ["ps", "-a"]
        out = self.docker.docker(
            *args, "--quiet", "--filter", f"label=com.docker.compose.project={self.project}"
        ).stdout
        return out.split()

    def container(self, service: str) -> str:
        ids = self.docker.docker(
            "ps", "-a", "--quiet",
            "--filter", f"label=com.docker.compose.project={self.project}",
            "--filter", f"label=com.docker.compose.service={service}",
        ).stdout.split()  # fmt: skip
        assert len(ids) == 1, f"expected one {service} container, found {ids}"
        return ids[0]

    def health(self, service: str) -> str:
        return self.docker.docker(
            "inspect", "--format", "{{.State.Health.Status}}", self.container(service)
        ).stdout.strip()

    def etcd_keys(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` as etcdctl inside the etcd container lists them."""
        return self.docker.docker(
            "exec", self.container("etcd"), "/usr/local/bin/etcdctl",
            f"--endpoints={self.stack.etcd_endpoint}", "get", "--prefix", "--keys-only", prefix,
        ).stdout.split()  # fmt: skip


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docker]:
    with docker_engine(tmp_path_factory.mktemp("docker")) as engine:
        yield engine


@pytest.fixture(scope="module")
def compose(docker: Docker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compose]:
    """The project, its images built; ``down -v`` afterwards whatever happened."""
    run = tmp_path_factory.mktemp("compose")
    stack = localstack.on_free_ports(run, cluster=DOCKER_COMPOSE.cluster, zone=DOCKER_COMPOSE.zone)
    corefile = run / "Corefile"
    # The shipped Corefile's settings on this run's ports.
    corefile.write_text(render_corefile(stack.corefile()))
    project = Compose(docker, compose_cli(docker), f"tfcluster{os.getpid()}", stack, corefile)
    for tool in ("etcd", "etcdctl", "coredns", "healthcheck"):
        if not (REPO / ".tools" / "bin" / tool).is_file():
            pytest.fail(f".tools/bin/{tool} is missing: run 'make setup'")
    start = time.monotonic()
    project("build", timeout=BUILD_TIMEOUT)
    print(f"\ncompose: images built in {time.monotonic() - start:.1f} s")
    try:
        yield project
    finally:
        project("down", "--volumes", "--remove-orphans", "--timeout", "5", timeout=UP_TIMEOUT)


def test_images_are_the_pinned_static_builds(docker: Docker, compose: Compose) -> None:
    tags = image_tags()
    versions = {
        "etcd": pinned_version("scripts/etcd/go.mod", "go.etcd.io/etcd/server/v3"),
        "coredns": pinned_version("coredns/go.mod", "github.com/coredns/coredns"),
    }
    for service, tag in tags.items():
        assert tag == f"tfcluster/{service}:{versions[service]}"
        flag = "-version" if service == "coredns" else "--version"
        # FROM scratch has no libc: only a static binary runs at all.
        out = docker.docker("run", "--rm", "--network", "none", tag, flag).stdout
        assert versions[service] in out.splitlines()[0], out
        size = int(docker.docker("image", "inspect", "--format", "{{.Size}}", tag).stdout)
        print(f"compose: image {tag} {size / 1e6:.1f} MB")


def test_agent_record_through_the_containers(
    docker: Docker, compose: Compose, tmp_path: Path
) -> None:
    stack = compose.stack
    start = time.monotonic()
    # `up` waits for etcd's health check before it starts CoreDNS; Compose v2
    # and later wait for CoreDNS's too (--wait), 1.29 cannot.
    wait = ["--wait"] if compose.cli[-1] == "compose" else []
    compose("up", "--detach", *wait, timeout=UP_TIMEOUT)
    for service in SERVICES:
        wait_for(
            lambda service=service: True if compose.health(service) == "healthy" else None,
            what=f"the {service} container's health check to pass",
            timeout=HEALTHY_TIMEOUT,
            interval=0.1,
            max_interval=0.25,
        )
    print(f"compose: up -> healthy in {time.monotonic() - start:.1f} s")

    dig = require_tool("dig")

    def ask(name: str) -> list[str]:
        return subprocess.run(
            [dig, "+short", "+time=2", "+tries=1", f"@{stack.host}", "-p", str(stack.dns_port),
             name],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.split()  # fmt: skip

    path = records.cluster_path(stack.cluster)
    prefix = path + "/"
    name = records.Member("worker", 0).name(stack.zone)
    assert ask(name) == []
    assert compose.etcd_keys(prefix) == []

    agent = make_agent(tmp_path, stack, role="worker", launch_index=0, ip=AGENT_IP,
                       roles={"worker": 1})  # fmt: skip
    try:
        start = time.monotonic()
        agent.start()
        tf_config = agent.wait_passed_barrier(timeout=60)
        claimed = time.monotonic() - start
        assert tf_config["task"] == {"type": "worker", "index": 0}
        # The claim lives in the containerised etcd ...
        key = records.record_key(path, stack.zone, records.Member("worker", 0))
        assert key in compose.etcd_keys(prefix)
        # ... and the containerised CoreDNS answers it.
        assert ask(name) == [AGENT_IP]
        print(f"compose: agent start -> claimed and resolved in {claimed:.2f} s")

        start = time.monotonic()
        agent.signal(signal.SIGTERM)
        assert agent.wait_exit(15) == 0, agent.log()
        wait_for(
            lambda: True if ask(name) == [] else None,
            what=f"{name} to leave the containerised CoreDNS",
            timeout=10,
            interval=0.02,
            max_interval=0.1,
        )
        print(f"compose: SIGTERM -> {name} gone from DNS in {time.monotonic() - start:.2f} s")
        assert compose.etcd_keys(prefix) == []
    finally:
        agent.stop()

    # A record written straight into etcd: put -> answered -> deleted -> gone.
    from tfcluster.discovery import etcdclient

    client = etcdclient.connect(stack.etcd_endpoint)
    try:
        key = records.record_key(path, stack.zone, records.Member("worker", 1))
        start = time.monotonic()
        client.put(key, records.record_value("127.0.42.2", 2222, ttl=1))
        wait_for(lambda: True if ask(f"worker1.{stack.zone}") == ["127.0.42.2"] else None,
                 what="a record put in etcd to be answered", timeout=10, interval=0.01)  # fmt: skip
        put_to_answer = time.monotonic() - start
        client.delete(key)
        wait_for(lambda: True if ask(f"worker1.{stack.zone}") == [] else None,
                 what="a deleted record to go", timeout=10, interval=0.01)  # fmt: skip
        print(f"compose: etcd put -> dig answer {put_to_answer * 1000:.0f} ms, "
              f"put -> delete -> gone {(time.monotonic() - start) * 1000:.0f} ms")  # fmt: skip
    finally:
        client.close()

    # What down -v must remove is found by the same filter before it runs.
    assert len(compose.labelled("container")) == len(SERVICES)
    assert len(compose.labelled("volume")) == 1
    start = time.monotonic()
    compose("down", "--volumes", "--timeout", "5", timeout=UP_TIMEOUT)
    print(f"compose: down -v in {time.monotonic() - start:.1f} s")
    for kind in ("container", "volume", "network"):
        assert compose.labelled(kind) == [], f"{kind}s of {compose.project} left after down -v"
