"""The barrier against the real CoreDNS: what it waits for, and what it costs."""

from __future__ import annotations

import re
import socket
import threading

import pytest

from conftest import TEST_CLUSTER, TEST_ZONE, put_members
from tfcluster.discovery import records
from tfcluster.discovery.barrier import Barrier, BarrierTimeout
from tfcluster.discovery.dns import DNSClient, Endpoint
from tfcluster.discovery.records import Member, parse_label
from tfcluster.discovery.waiting import wait_for
from tfcluster.discovery.watch import MembershipWatch

CLUSTER = {
    Member("ps", 0): Endpoint("127.0.40.1", 2222),
    Member("worker", 0): Endpoint("127.0.40.2", 2223),
    Member("worker", 1): Endpoint("127.0.40.3", 2224),
}


def barrier(stack, **kw) -> Barrier:
    kw.setdefault("check_system_resolver", False)
    kw.setdefault("interval", 0.02)
    kw.setdefault("max_interval", 0.1)
    return Barrier(DNSClient(stack.dns_server), TEST_ZONE, CLUSTER, **kw)


def test_passes_with_every_endpoint_from_one_srv_query(stack, etcd, clean_cluster):
    put_members(etcd, CLUSTER)
    b = barrier(stack)
    assert b.wait(timeout=5) == CLUSTER
    assert b.dns.queries_sent == 1


def test_timeout_names_the_missing_peers(stack, etcd, clean_cluster):
    put_members(etcd, {Member("ps", 0): CLUSTER[Member("ps", 0)]})
    with pytest.raises(BarrierTimeout, match=re.escape("still missing: worker0, worker1")):
        barrier(stack).wait(timeout=0.5)


def test_system_resolver_must_agree_before_passing(stack, etcd, clean_cluster):
    put_members(etcd, CLUSTER)
    asked: list[str] = []

    def resolve(name: str, port: int) -> set[str]:
        asked.append(name)
        if len(asked) <= len(CLUSTER):  # the first round: the system resolver lags
            return set()
        member = parse_label(name.split(".")[0])
        return {CLUSTER[member].host_ip} if member else set()

    b = barrier(stack, check_system_resolver=True, resolve=resolve)
    assert b.wait(timeout=5) == CLUSTER
    assert b.polls == 2
    assert sorted(set(asked)) == sorted(m.name(TEST_ZONE) for m in CLUSTER)


def test_no_dns_query_while_etcd_lacks_a_member(stack, etcd, clean_cluster):
    put_members(etcd, CLUSTER)
    absent = ["worker1"]
    rounds: list[int] = []  # per round of the barrier: the DNS queries it had sent

    def etcd_missing() -> list[str]:
        rounds.append(b.dns.queries_sent)
        return list(absent)

    wake = threading.Event()
    # Intervals far longer than the test: only a wake-up sends the barrier round.
    b = barrier(stack, wake=wake, etcd_missing=etcd_missing, spread=0, interval=30, max_interval=30)
    passed: list[dict] = []
    waiter = threading.Thread(target=lambda: passed.append(b.wait(timeout=60)), daemon=True)
    waiter.start()
    try:
        # Each wake-up comes after the barrier has asked etcd_missing again, so
        # none is lost: six rounds are the first one and one per wake-up.
        for woken in range(5):
            wait_for(
                lambda n=woken + 1: len(rounds) >= n or None,
                what=f"barrier round {woken + 1}",
                timeout=5,
                interval=0.005,
            )
            wake.set()
        wait_for(lambda: len(rounds) >= 6 or None, what="barrier round 6", timeout=5)
        assert rounds[:6] == [0] * 6
        assert b.polls == 0
    finally:
        absent.clear()
        wake.set()
        waiter.join(timeout=10)
    assert passed == [CLUSTER]
    assert b.dns.queries_sent == 1


def test_stop_interrupts_the_wait(stack, clean_cluster):
    stop = threading.Event()
    stop.set()
    wake = threading.Event()
    wake.set()
    with pytest.raises(InterruptedError):
        barrier(stack, wake=wake).wait(timeout=10, stop=stop)


def test_membership_watch_follows_claims_and_deletes(stack, etcd, clean_cluster):
    wake = threading.Event()
    watch = MembershipWatch(stack.etcd_endpoint, TEST_CLUSTER, TEST_ZONE, CLUSTER, wake)
    put_members(etcd, {Member("ps", 0): CLUSTER[Member("ps", 0)]})  # before the watch: read
    watch.start()
    try:
        assert sorted(watch.missing()) == sorted(m.label for m in CLUSTER if m.label != "ps0")
        wake.clear()
        rest = {m: e for m, e in CLUSTER.items() if m.label != "ps0"}
        put_members(etcd, rest)  # after: watched
        wait_for(lambda: True if not watch.missing() else None, what="every claim", timeout=5)
        assert wake.is_set()
        path = records.cluster_path(TEST_CLUSTER)
        etcd.delete(records.srv_key(path, TEST_ZONE, Member("ps", 0)))
        wait_for(lambda: watch.missing() or None, what="the delete", timeout=5)
        assert watch.missing() == ["ps0"]
    finally:
        watch.stop()


def test_membership_watch_without_etcd_names_nobody(clean_cluster):
    wake = threading.Event()
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{unused.getsockname()[1]}"
    watch = MembershipWatch(endpoint, TEST_CLUSTER, TEST_ZONE, CLUSTER, wake, timeout=1.0)
    watch.start()
    assert watch.missing() == []  # cannot tell: the barrier polls DNS instead
    watch.stop()
