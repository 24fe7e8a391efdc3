"""The barrier against the real CoreDNS: what it waits for, and what it costs."""

from __future__ import annotations

import re
import threading
import time

import pytest

from conftest import TEST_ZONE, put_members
from tfcluster.discovery.barrier import Barrier, BarrierTimeout
from tfcluster.discovery.dns import DNSClient, Endpoint
from tfcluster.discovery.records import Member, parse_label
from tfcluster.discovery.waiting import wait_for

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


def test_one_held_question_is_answered_by_the_last_claim(stack, etcd, clean_cluster):
    """No etcd watch in the agent: its question waits in tfzone (hold) and is
    answered the moment the last member is registered - one query, passed
    well before the hold ran out."""
    put_members(etcd, {m: e for m, e in CLUSTER.items() if m.label != "worker1"})
    b = barrier(stack, hold=20.0)
    passed: list[tuple[dict, float]] = []

    def wait() -> None:
        found = b.wait(timeout=60)
        passed.append((found, time.monotonic()))

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    try:
        wait_for(lambda: b.dns.queries_sent == 1 or None, what="the held question", timeout=5)
        time.sleep(0.3)  # the scenario: the last instance claims later
        assert not passed and b.polls == 1  # held, not answered, not asked again
        assert b.progress() is None  # nothing answered yet
        claimed = time.monotonic()
        put_members(etcd, {Member("worker", 1): CLUSTER[Member("worker", 1)]})
        waiter.join(timeout=10)
    finally:
        put_members(etcd, CLUSTER)
        waiter.join(timeout=30)
    ((found, at),) = passed
    assert found == CLUSTER
    assert b.dns.queries_sent == 1
    assert at - claimed < 5  # the claim answered it, not the 20 s hold
    assert b.progress() == (3, 3, [])


def test_a_hold_that_runs_out_asks_again_and_reports_who_is_missing(stack, etcd, clean_cluster):
    put_members(etcd, {Member("ps", 0): CLUSTER[Member("ps", 0)]})
    b = barrier(stack, hold=0.2)
    with pytest.raises(BarrierTimeout, match=re.escape("still missing: worker0, worker1")):
        b.wait(timeout=1.5)
    assert 2 <= b.polls <= 9  # one question per hold (0.2 s), not a busy loop
    assert b.progress() == (1, 3, ["worker0", "worker1"])


def test_a_server_that_does_not_hold_is_polled_with_back_off(stack, etcd, clean_cluster):
    """A name server without tfzone answers at once: the barrier backs off
    (interval doubling) instead of asking in a loop."""
    put_members(etcd, {Member("ps", 0): CLUSTER[Member("ps", 0)]})
    b = barrier(stack, hold=0.0, interval=0.05, max_interval=0.4)
    with pytest.raises(BarrierTimeout):
        b.wait(timeout=1.5)
    assert 3 <= b.polls <= 10


def test_stop_interrupts_the_wait(stack, clean_cluster):
    stop = threading.Event()
    stop.set()
    with pytest.raises(InterruptedError):
        barrier(stack).wait(timeout=10, stop=stop)


def test_stop_ends_a_held_question(stack, etcd, clean_cluster):
    """The agent's SIGTERM must not wait out a hold: the question is dropped."""
    put_members(etcd, {Member("ps", 0): CLUSTER[Member("ps", 0)]})
    b = barrier(stack, hold=20.0)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    began = time.monotonic()
    with pytest.raises(InterruptedError):
        b.wait(timeout=30, stop=stop)
    assert time.monotonic() - began < 2
    assert b.polls == 1
