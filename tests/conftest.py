"""Shared fixtures: one real etcd and one real CoreDNS for the whole session.

They listen on free loopback ports, keep their state in a temporary folder,
and are stopped at the end of the session whether tests passed or failed.
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from controlled_moto import ControlledMoto, running, s3_client
from tfcluster.cloudinit.localcloud import localstack
from tfcluster.discovery import records
from tfcluster.discovery.dns import Endpoint
from tfcluster.discovery.records import Member

TEST_CLUSTER = "test"
TEST_ZONE = "tensorflow.local"
REPO = Path(__file__).resolve().parent.parent


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


# The session stack's DNS server, once the stack fixture has started it.
_session_dns: list[tuple[str, int]] = []
_sync_names = itertools.count()


def put_members(etcd: Any, members: Mapping[Member, Endpoint], lease: Any = None) -> None:
    """Register members as the agent does: address record and SRV view entry.

    Returns once the session's CoreDNS has seen the writes (see dns_caught_up).
    """
    path = records.cluster_path(TEST_CLUSTER)
    for member, endpoint in members.items():
        value = records.record_value(endpoint.host_ip, endpoint.port, ttl=5)
        etcd.put(records.record_key(path, TEST_ZONE, member), value, lease=lease)
        etcd.put(records.srv_key(path, TEST_ZONE, member), value, lease=lease)
    dns_caught_up(etcd)


def dns_caught_up(etcd: Any) -> None:
    """Wait until CoreDNS has applied every etcd write made so far.

    CoreDNS answers the zone from an etcd watch, a moment behind etcd. The
    watch delivers writes in order, so once a marker name written now
    resolves, every earlier write is in CoreDNS's view too.
    """
    from tfcluster.discovery.dns import resolve_a
    from tfcluster.discovery.waiting import wait_for

    if not _session_dns:
        return
    name = f"sync{next(_sync_names)}.{TEST_ZONE}"
    key = records.name_to_key(records.cluster_path(TEST_CLUSTER), name)
    etcd.put(key, records.record_value("127.0.0.1", 0, ttl=5))
    try:
        wait_for(
            lambda: resolve_a(_session_dns[0], name) or None,
            what=f"CoreDNS to see the marker {name}",
            timeout=5,
        )
    finally:
        etcd.delete(key)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[localstack.StackSettings]:
    """etcd + CoreDNS serving ``TEST_ZONE`` from the ``TEST_CLUSTER`` prefix."""
    bin_dir = localstack.DEFAULT_BIN
    if not (bin_dir / "etcd").exists() or not (bin_dir / "coredns").exists():
        pytest.fail(f"etcd/coredns missing in {bin_dir}: run 'make setup'")
    settings = localstack.on_free_ports(
        tmp_path_factory.mktemp("stack"), bin_dir=bin_dir, cluster=TEST_CLUSTER, zone=TEST_ZONE
    )
    try:
        localstack.up(settings)
        _session_dns[:] = [settings.dns_server]
        yield settings
    finally:
        _session_dns.clear()
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
    """The test cluster's etcd prefix, empty before and after the test.

    CoreDNS follows etcd through a watch; the fixture waits until CoreDNS
    answers the membership set as empty, so no test sees the previous one's.
    """
    from tfcluster.discovery.dns import DNSClient, DNSQueryError
    from tfcluster.discovery.waiting import wait_for

    prefix = records.cluster_path(TEST_CLUSTER) + "/"
    etcd.delete_prefix(prefix)
    client = DNSClient(stack.dns_server)

    def forgotten() -> bool | None:
        try:
            return True if not client.members(TEST_ZONE) else None
        except DNSQueryError:  # e.g. a cached answer too large for DNS
            return None

    wait_for(
        forgotten,
        what="CoreDNS to forget the previous test's members",
        timeout=5,
    )
    yield prefix
    etcd.delete_prefix(prefix)


def stand_in_staged() -> dict[str, Any]:
    """What `up` stages for a task beyond its binaries (the wheel, its constraints and
    a program bundle), as stand-in presigned URLs: rendering needs only each URL and
    SHA-256. Tests that fetch the objects stage real ones (test_bucket.py)."""
    from tfcluster.cloudinit.config import Artifact

    files = {
        "wheel": "tfcluster-0.1.0-py3-none-any.whl",
        "constraints": "constraints.txt",
        "bundle": "program.tar.gz",
    }
    staged = {}
    for name, filename in files.items():
        sha = hashlib.sha256(name.encode()).hexdigest()
        url = f"https://cluster-bucket.invalid/objects/{sha}/{filename}?X-Amz-Signature=stand-in"
        staged[name] = Artifact(url, sha)
    return staged


# A moto server (EC2 and S3) per module: ``moto`` clears its controls around
# each test, with a fresh ``bucket`` in it (reports, outputs, agent reports);
# ``server`` also empties moto's state first (lifecycle, operator: each test
# counts the instances, groups and key pairs it made).
@pytest.fixture(scope="module")
def moto_server() -> Iterator[ControlledMoto]:
    yield from running()


@pytest.fixture
def moto(moto_server: ControlledMoto) -> Iterator[ControlledMoto]:
    moto_server.clear()
    try:
        yield moto_server
    finally:
        moto_server.clear()


@pytest.fixture
def server(moto_server: ControlledMoto) -> Iterator[ControlledMoto]:
    moto_server.reset_state()
    yield moto_server
    moto_server.clear()


@pytest.fixture
def bucket(moto: ControlledMoto) -> str:
    name = f"tfc-{uuid.uuid4().hex[:12]}"
    s3_client(moto.url).create_bucket(Bucket=name)
    return name
