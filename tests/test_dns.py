"""The DNS client against a real CoreDNS reading a real etcd (session fixtures)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import dnslib
import pytest

from conftest import TEST_CLUSTER, TEST_ZONE, dns_caught_up, put_members
from tfcluster.discovery import dns, records
from tfcluster.discovery.dns import DNSClient, Endpoint
from tfcluster.discovery.records import Member

TIMEOUT = 2.0


@pytest.fixture
def client(stack: Any) -> DNSClient:
    return DNSClient(stack.dns_server, timeout=TIMEOUT)


def test_members_come_from_one_srv_query_with_ports_and_addresses(client, etcd, clean_cluster):
    expected = {
        Member("chief", 0): Endpoint("127.0.20.1", 2222),
        Member("ps", 0): Endpoint("127.0.20.2", 2223),
        Member("ps", 1): Endpoint("127.0.20.3", 2224),
        Member("worker", 0): Endpoint("127.0.20.4", 2225),
        Member("worker", 1): Endpoint("127.0.20.5", 2226),
    }
    put_members(etcd, expected)

    found = client.members(TEST_ZONE)

    assert found == expected
    assert list(found) == sorted(expected)
    assert (client.queries_sent, client.tcp_retries) == (1, 0)
    assert client.resolve_a("ps1." + TEST_ZONE) == ["127.0.20.3"]


def test_module_functions_take_a_server(stack, etcd, clean_cluster):
    put_members(etcd, {Member("worker", 3): Endpoint("127.0.20.9", 2300)})
    assert dns.members(stack.dns_server, TEST_ZONE, TIMEOUT) == {
        Member("worker", 3): Endpoint("127.0.20.9", 2300)
    }
    assert dns.resolve_a(stack.dns_server, "worker3." + TEST_ZONE, TIMEOUT) == ["127.0.20.9"]
    reply = dns.query(stack.dns_server, "worker3." + TEST_ZONE, "A", TIMEOUT)
    assert dnslib.RCODE[reply.header.rcode] == "NOERROR"


def test_a_missing_name_is_an_empty_answer_not_an_error(client, clean_cluster):
    reply = client.query("worker7." + TEST_ZONE, "A")
    assert dnslib.RCODE[reply.header.rcode] == "NXDOMAIN"
    assert client.resolve_a("worker7." + TEST_ZONE) == []
    assert client.members(TEST_ZONE) == {}


def test_srv_targets_that_are_not_members_are_ignored(client, etcd, clean_cluster):
    put_members(etcd, {Member("ps", 0): Endpoint("127.0.20.2", 2222)})
    path = records.cluster_path(TEST_CLUSTER)
    stray = records.name_to_key(path, "backup." + records.srv_name(TEST_ZONE))
    etcd.put(stray, records.record_value("127.0.20.8", 9999, ttl=5))
    dns_caught_up(etcd)

    assert client.members(TEST_ZONE) == {Member("ps", 0): Endpoint("127.0.20.2", 2222)}


@pytest.mark.parametrize("edns_buffer", [dns.EDNS_BUFFER, None], ids=["edns", "plain"])
def test_a_large_cluster_is_answered_over_tcp_after_truncation(
    stack, etcd, clean_cluster, edns_buffer
):
    expected = {
        Member("worker", i): Endpoint(f"127.0.{30 + i // 200}.{1 + i % 200}", 2222 + i)
        for i in range(300)
    }
    put_members(etcd, expected)
    client = DNSClient(stack.dns_server, timeout=TIMEOUT, edns_buffer=edns_buffer)

    assert client.members(TEST_ZONE) == expected
    assert (client.queries_sent, client.tcp_retries) == (2, 1)


def test_a_cluster_known_to_be_large_is_asked_over_tcp_at_once(stack, etcd, clean_cluster):
    expected = {
        Member("worker", i): Endpoint(f"127.0.{30 + i // 200}.{1 + i % 200}", 2222 + i)
        for i in range(300)
    }
    put_members(etcd, expected)
    client = DNSClient(stack.dns_server, timeout=TIMEOUT, edns_buffer=dns.EDNS_BUFFER)

    assert client.members(TEST_ZONE, expected=len(expected)) == expected
    assert (client.queries_sent, client.tcp_retries) == (1, 0)


def test_a_loopback_server_answers_a_large_cluster_in_one_udp_reply(client, etcd, clean_cluster):
    expected = {
        Member("worker", i): Endpoint(f"127.0.{30 + i // 200}.{1 + i % 200}", 2222 + i)
        for i in range(300)
    }
    put_members(etcd, expected)

    assert client.edns_buffer == dns.EDNS_BUFFER_LOOPBACK
    assert client.members(TEST_ZONE, expected=len(expected)) == expected
    assert (client.queries_sent, client.tcp_retries) == (1, 0)
    assert DNSClient(("10.0.0.2", 53)).edns_buffer == dns.EDNS_BUFFER  # never sent to


def test_a_small_cluster_is_asked_over_udp(client, etcd, clean_cluster):
    expected = {Member("worker", i): Endpoint(f"127.0.30.{1 + i}", 2222) for i in range(8)}
    put_members(etcd, expected)

    assert client.members(TEST_ZONE, expected=len(expected)) == expected
    assert (client.queries_sent, client.tcp_retries) == (1, 0)
    assert not dns.fits_udp(dns.EDNS_BUFFER, 300) and dns.fits_udp(dns.EDNS_BUFFER, 8)
    assert dns.fits_udp(dns.EDNS_BUFFER_LOOPBACK, 300)


def test_an_answer_truncated_even_over_tcp_is_an_error_not_a_partial_list(
    client, etcd, clean_cluster
):
    # Past about 700 members CoreDNS truncates the TCP answer too and
    # drops the glue; only the SRV view is needed to get there.
    path = records.cluster_path(TEST_CLUSTER)
    for i in range(1500):
        value = records.record_value(f"127.1.{i // 200}.{1 + i % 200}", 2222, ttl=5)
        etcd.put(records.srv_key(path, TEST_ZONE, Member("worker", i)), value)
    dns_caught_up(etcd)

    with pytest.raises(dns.DNSAnswerTooLarge):
        client.members(TEST_ZONE)
    assert (client.queries_sent, client.tcp_retries) == (2, 1)


def test_an_error_code_raises_server_error(client):
    # The test Corefile serves the cluster zone only and refuses the rest.
    with pytest.raises(dns.DNSServerError) as caught:
        client.resolve_a("example.com")
    assert caught.value.rcode == "REFUSED"


def test_a_silent_server_times_out_within_the_deadline():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        client = DNSClient(silent.getsockname(), timeout=0.3)
        started = time.monotonic()
        with pytest.raises(dns.DNSTimeout):
            client.members(TEST_ZONE)
    assert time.monotonic() - started < 2.0
    assert client.queries_sent == 1


def test_nobody_listening_is_a_connection_error():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        address = closed.getsockname()
    client = DNSClient(address, timeout=TIMEOUT)
    with pytest.raises(dns.DNSConnectionError):
        client.resolve_a("ps0." + TEST_ZONE)


def same_port_tcp_and_udp(attempts: int = 20) -> tuple[socket.socket, socket.socket]:
    """A listening TCP socket and a UDP socket on one loopback port (a port free
    for TCP may be taken for UDP: try a few)."""
    for _ in range(attempts):
        tcp = socket.create_server(("127.0.0.1", 0))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.bind(tcp.getsockname())
        except OSError:
            tcp.close()
            udp.close()
            continue
        return tcp, udp
    pytest.fail(f"no port free for both TCP and UDP in {attempts} attempts")


@pytest.fixture
def truncating_server() -> Iterator[tuple[str, int]]:
    """Answers every UDP query truncated, and accepts TCP connections but never
    answers on them: the TCP retry must give up at the query's deadline."""
    tcp, udp = same_port_tcp_and_udp()
    udp.settimeout(0.1)
    stop = threading.Event()

    def answer_truncated() -> None:
        while not stop.is_set():
            try:
                packet, peer = udp.recvfrom(4096)
            except TimeoutError:
                continue
            reply = dnslib.DNSRecord.parse(packet).reply()
            reply.header.tc = 1
            udp.sendto(reply.pack(), peer)

    thread = threading.Thread(target=answer_truncated, daemon=True)
    thread.start()
    try:
        yield tcp.getsockname()
    finally:
        stop.set()
        thread.join(timeout=5)
        udp.close()
        tcp.close()


def test_the_tcp_retry_shares_the_query_deadline(truncating_server):
    client = DNSClient(truncating_server, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(dns.DNSTimeout):
        client.members(TEST_ZONE)
    assert time.monotonic() - started < 3.0
    assert (client.queries_sent, client.tcp_retries) == (2, 1)


@pytest.mark.parametrize(
    ("text", "server"),
    [
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("10.0.0.2", ("10.0.0.2", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("::1", ("::1", 53)),
    ],
)
def test_parse_server(text, server):
    assert dns.parse_server(text) == server


@pytest.mark.parametrize("text", ["127.0.0.1:x", "127.0.0.1:0", "127.0.0.1:70000"])
def test_parse_server_rejects_bad_ports(text):
    with pytest.raises(ValueError):
        dns.parse_server(text)


def test_a_held_answer_includes_every_write_up_to_the_count(client, etcd, clean_cluster):
    # No waiting for CoreDNS here: the question itself waits for the 20 members.
    path = records.cluster_path(TEST_CLUSTER)
    for i in range(20):
        value = records.record_value(f"127.0.50.{i + 1}", 2222, ttl=5)
        etcd.put(records.srv_key(path, TEST_ZONE, Member("worker", i)), value)
    found = client.members(TEST_ZONE, expected=20, hold=5.0)
    assert len(found) == 20
    assert client.queries_sent == 1
