"""The foundation: records written to a real etcd resolve through a real CoreDNS."""

from __future__ import annotations

import subprocess
import time

import dnslib
import pytest

from conftest import TEST_ZONE, pinned_version, put_members, require_tool
from tfcluster.cloudinit.localcloud.localstack import StackSettings
from tfcluster.discovery import records
from tfcluster.discovery.dns import Endpoint

TIMEOUT = 2.0


def ask(stack: StackSettings, name: str, qtype: str) -> dnslib.DNSRecord:
    """One query straight over UDP with dnslib (independent of tfcluster's client)."""
    reply = dnslib.DNSRecord.question(name, qtype).send(
        stack.host, stack.dns_port, tcp=False, timeout=TIMEOUT
    )
    return dnslib.DNSRecord.parse(reply)


def test_a_record_resolves_with_dnslib_and_dig(stack, etcd, clean_cluster):
    put_members(etcd, {records.Member("ps", 0): Endpoint("127.0.10.1", 2222)})
    reply = ask(stack, "ps0.tensorflow.local", "A")
    assert dnslib.RCODE[reply.header.rcode] == "NOERROR"
    assert [str(rr.rdata) for rr in reply.rr] == ["127.0.10.1"]

    dig = require_tool("dig")
    out = subprocess.run(
        [dig, "+short", "+time=2", "+tries=1", f"@{stack.host}", "-p", str(stack.dns_port),
         "ps0.tensorflow.local", "A"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout.split()  # fmt: skip
    assert out == ["127.0.10.1"]


def test_one_srv_query_lists_every_member_with_its_port(stack, etcd, clean_cluster):
    members = {
        records.Member("chief", 0): ("127.0.10.1", 2222),
        records.Member("ps", 0): ("127.0.10.2", 2223),
        records.Member("ps", 1): ("127.0.10.3", 2224),
        records.Member("worker", 0): ("127.0.10.4", 2225),
        records.Member("worker", 1): ("127.0.10.5", 2226),
    }
    for member, (ip, port) in members.items():
        put_members(etcd, {member: Endpoint(ip, port)})
    reply = ask(stack, records.srv_name(TEST_ZONE), "SRV")
    glue = {str(rr.rname): str(rr.rdata) for rr in reply.ar if rr.rtype == dnslib.QTYPE.A}
    seen = {}
    for rr in reply.rr:
        target = str(rr.rdata.target)
        member = records.parse_label(target.split(".")[0])
        assert member is not None, target
        seen[member] = (glue[target], rr.rdata.port)
    assert seen == members


def test_missing_name_is_nxdomain(stack, clean_cluster):
    reply = ask(stack, "worker9.tensorflow.local", "A")
    assert dnslib.RCODE[reply.header.rcode] == "NXDOMAIN"
    assert reply.rr == []


def test_name_outside_the_zone_is_refused_without_upstream(stack):
    reply = ask(stack, "example.org", "A")
    assert dnslib.RCODE[reply.header.rcode] == "REFUSED"


def test_revoked_lease_removes_the_name(stack, etcd, clean_cluster):
    lease = etcd.lease(30)
    put_members(etcd, {records.Member("worker", 3): Endpoint("127.0.10.9", 2222)}, lease=lease)
    assert [str(rr.rdata) for rr in ask(stack, "worker3.tensorflow.local", "A").rr] == [
        "127.0.10.9"
    ]

    start = time.monotonic()
    lease.revoke()
    deadline = start + 5.0
    while True:
        reply = ask(stack, "worker3.tensorflow.local", "A")
        if dnslib.RCODE[reply.header.rcode] == "NXDOMAIN":
            break
        assert time.monotonic() < deadline, "name still answered 5 s after the lease was revoked"
    elapsed_ms = (time.monotonic() - start) * 1000
    print(f"\nlease revoke -> NXDOMAIN: {elapsed_ms:.1f} ms")
    srv = ask(stack, records.srv_name(TEST_ZONE), "SRV")
    assert srv.rr == []


@pytest.mark.parametrize("flag", ["-plugins"])
def test_coredns_build_has_exactly_our_plugins(stack, flag):
    out = subprocess.run(
        [str(stack.bin_dir / "coredns"), flag], capture_output=True, text=True, check=True
    ).stdout.split()
    ours = {"reload", "bind", "ready", "health", "prometheus", "errors", "log", "cache",
            "hosts", "file", "etcd", "tfzone", "loop", "forward"}  # fmt: skip
    # Registered as a side effect of core/dnsserver, log/cache (metadata) and
    # forward (dnstap): they cannot be left out without patching CoreDNS.
    pulled_in = {"debug", "dnstap", "metadata", "transfer"}
    assert set(out) == ours | pulled_in


def test_pinned_versions(stack):
    etcd = pinned_version("scripts/etcd/go.mod", "go.etcd.io/etcd/server/v3")
    coredns = pinned_version("coredns/go.mod", "github.com/coredns/coredns")
    assert f"etcd Version: {etcd}\n" in version_output(stack.bin_dir / "etcd", "--version")
    assert f"CoreDNS-{coredns}\n" in version_output(stack.bin_dir / "coredns", "-version")


def version_output(binary, flag: str) -> str:
    return subprocess.run([str(binary), flag], capture_output=True, text=True, check=True).stdout
