"""Shared fixtures: one real etcd and one real CoreDNS for the whole session.

They listen on free loopback ports, keep their state in a temporary folder,
and are stopped at the end of the session whether tests passed or failed.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tfcluster.cloudinit import localstack
from tfcluster.discovery import records

TEST_CLUSTER = "test"
TEST_ZONE = "tensorflow.local"
REPO = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (and, in practice, for UDP too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def require_tool(name: str) -> str:
    """The path of an outside tool, or a skip that says what is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (make setup installs it when run as root)")
    return path


def pinned_version(go_mod: str, module: str) -> str:
    """The version a go.mod of this repository pins for ``module``, without the v."""
    text = (REPO / go_mod).read_text()
    for line in text.splitlines():
        parts = line.split()
        if module in parts:
            return parts[parts.index(module) + 1].lstrip("v")
    raise AssertionError(f"{module} not pinned in {go_mod}")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[localstack.StackSettings]:
    """etcd + CoreDNS serving ``TEST_ZONE`` from the ``TEST_CLUSTER`` prefix."""
    bin_dir = localstack.DEFAULT_BIN
    if not (bin_dir / "etcd").exists() or not (bin_dir / "coredns").exists():
        pytest.fail(f"etcd/coredns missing in {bin_dir}: run 'make setup'")
    settings = localstack.StackSettings(
        run_dir=tmp_path_factory.mktemp("stack"),
        bin_dir=bin_dir,
        cluster=TEST_CLUSTER,
        zone=TEST_ZONE,
        etcd_port=free_port(),
        etcd_peer_port=free_port(),
        dns_port=free_port(),
        health_port=free_port(),
        ready_port=free_port(),
    )
    try:
        localstack.up(settings)
        yield settings
    finally:
        localstack.down(settings.run_dir)


@pytest.fixture(scope="session")
def etcd(stack: localstack.StackSettings) -> Any:
    """An etcd3 client connected to the session's etcd."""
    from tfcluster.discovery import etcdclient

    client = etcdclient.connect(stack.etcd_endpoint)
    yield client
    client.close()


@pytest.fixture
def clean_cluster(stack: localstack.StackSettings, etcd: Any) -> Iterator[str]:
    """The test cluster's etcd prefix, empty before and after the test."""
    prefix = records.cluster_path(TEST_CLUSTER) + "/"
    etcd.delete_prefix(prefix)
    yield prefix
    etcd.delete_prefix(prefix)
