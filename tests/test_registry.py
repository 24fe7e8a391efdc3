"""Claims in a real etcd, observed through a real CoreDNS."""

from __future__ import annotations

import re
import threading

import pytest

from conftest import TEST_CLUSTER, TEST_ZONE, dns_caught_up
from tfcluster.discovery import dns, etcdclient, records
from tfcluster.discovery.identity import Identity
from tfcluster.discovery.registry import NameTaken, Registry, list_records

W2 = records.Member("worker", 2)


def registry(stack) -> Registry:
    return Registry(etcdclient.connect(stack.etcd_endpoint), TEST_CLUSTER, TEST_ZONE, 10, 5)


def ident(instance: str, ip: str, member: records.Member = W2, port: int = 2222) -> Identity:
    return Identity(member, ip, port, instance)


def test_claim_is_served_by_coredns_with_owner_field(stack, etcd, clean_cluster):
    reg = registry(stack)
    reg.claim(ident("i-a", "127.0.20.1"))
    dns_caught_up(etcd)  # CoreDNS follows etcd through a watch
    assert dns.resolve_a(stack.dns_server, "worker2.tensorflow.local") == ["127.0.20.1"]
    members = dns.members(stack.dns_server, TEST_ZONE)
    assert members[W2] == dns.Endpoint("127.0.20.1", 2222)
    keys = [key for key, _ in list_records(reg.client, TEST_CLUSTER, TEST_ZONE)]
    assert keys == sorted(
        [
            records.record_key(clean_cluster.rstrip("/"), TEST_ZONE, W2),
            records.srv_key(clean_cluster.rstrip("/"), TEST_ZONE, W2),
        ]
    )


def test_second_instance_cannot_take_a_live_name(stack, etcd, clean_cluster):
    first, second = registry(stack), registry(stack)
    first.claim(ident("i-a", "127.0.20.1"))
    before = list_records(etcd, TEST_CLUSTER, TEST_ZONE)
    with pytest.raises(NameTaken, match=re.escape("held by instance i-a at 127.0.20.1:2222")):
        second.claim(ident("i-b", "127.0.20.2"))
    assert list_records(etcd, TEST_CLUSTER, TEST_ZONE) == before
    assert second.lease is None


def test_racing_claims_have_exactly_one_winner(stack, etcd, clean_cluster):
    contenders = [registry(stack) for _ in range(8)]
    barrier = threading.Barrier(len(contenders))
    outcomes: list[str] = []

    def race(i: int) -> None:
        barrier.wait(timeout=10)
        try:
            contenders[i].claim(ident(f"i-{i}", f"127.0.21.{i + 1}"))
            outcomes.append("won")
        except NameTaken:
            outcomes.append("taken")

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(contenders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert sorted(outcomes) == ["taken"] * 7 + ["won"]
    winner = next(c for c in contenders if c.lease is not None)
    dns_caught_up(etcd)  # CoreDNS follows etcd through a watch
    assert dns.resolve_a(stack.dns_server, "worker2.tensorflow.local") == [winner.identity.ip]


def test_expired_or_released_name_is_free_again(stack, etcd, clean_cluster):
    first, second = registry(stack), registry(stack)
    first.claim(ident("i-a", "127.0.20.1"))
    first.release()
    dns_caught_up(etcd)  # CoreDNS follows etcd through a watch
    assert dns.resolve_a(stack.dns_server, "worker2.tensorflow.local") == []
    assert first.keepalive() is False
    second.claim(ident("i-b", "127.0.20.2"))
    dns_caught_up(etcd)  # CoreDNS follows etcd through a watch
    assert dns.resolve_a(stack.dns_server, "worker2.tensorflow.local") == ["127.0.20.2"]


def test_same_instance_takes_over_its_own_stale_claim(stack, etcd, clean_cluster):
    crashed, restarted = registry(stack), registry(stack)
    crashed.claim(ident("i-a", "127.0.20.1"))
    restarted.claim(ident("i-a", "127.0.20.1", port=2230))
    dns_caught_up(etcd)  # CoreDNS follows etcd through a watch
    assert dns.members(stack.dns_server, TEST_ZONE)[W2].port == 2230
    assert crashed.keepalive() is True  # the old lease lives on, but holds no key
    assert restarted.keepalive() is True


def test_lost_lease_is_detected(stack, etcd, clean_cluster):
    reg = registry(stack)
    reg.claim(ident("i-a", "127.0.20.1"))
    etcd.revoke_lease(reg.lease.id)
    assert reg.keepalive() is False
    reg.claim(ident("i-a", "127.0.20.1"))
    dns_caught_up(etcd)  # CoreDNS follows etcd through a watch
    assert dns.resolve_a(stack.dns_server, "worker2.tensorflow.local") == ["127.0.20.1"]
