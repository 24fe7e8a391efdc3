"""The IMDSv2 client against the real emulator on 127.0.0.1: tokens, retries, faults."""

from __future__ import annotations

import http.client
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tfcluster.cloudinit.localcloud.imds_emulator import IMDSEmulator, InstanceMetadata
from tfcluster.discovery import imds
from tfcluster.discovery.imds import IMDSClient, InstanceIdentity

USER_DATA = b"\x1f\x8b\x08\x00 not utf-8 \xff\n#!/bin/sh\n"
METADATA = InstanceMetadata(
    launch_index=2,
    local_ipv4="127.0.0.12",
    instance_id="i-0123456789abcdef0",
    availability_zone="us-east-1b",
    user_data=USER_DATA,
)
IDENTITY = InstanceIdentity(2, "127.0.0.12", "i-0123456789abcdef0", "us-east-1b")


class Clock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.time = 1000.0

    def __call__(self) -> float:
        return self.time


@pytest.fixture
def emulator() -> Iterator[IMDSEmulator]:
    with IMDSEmulator(METADATA) as emu:
        yield emu


def client(url: str, sleeps: list[float] | None = None, **options: Any) -> IMDSClient:
    """A client that records its back-off sleeps instead of sleeping."""
    recorded = [] if sleeps is None else sleeps
    options.setdefault("sleep", recorded.append)
    options.setdefault("timeout", 5.0)
    return IMDSClient(url, **options)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raw(emu: IMDSEmulator, method: str, path: str, headers: dict[str, str]) -> int:
    host, port = emu.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def test_identity_is_read(emulator: IMDSEmulator) -> None:
    assert client(emulator.url).identity() == IDENTITY


def test_token_is_requested_once_and_reused(emulator: IMDSEmulator) -> None:
    imds_client = client(emulator.url)
    imds_client.identity()
    assert imds_client.get("instance-id") == IDENTITY.instance_id
    assert emulator.count("PUT") == 1
    assert emulator.count("GET") == 5


def test_token_is_refreshed_before_expiry(emulator: IMDSEmulator) -> None:
    clock = Clock()
    imds_client = client(emulator.url, token_ttl=600, now=clock)  # refreshes 60 s early
    imds_client.get("instance-id")
    clock.time += 539
    imds_client.get("instance-id")
    assert emulator.count("PUT") == 1
    clock.time += 2
    imds_client.get("instance-id")
    assert emulator.count("PUT") == 2


def test_expired_token_is_renewed_after_401() -> None:
    server_clock = Clock()
    with IMDSEmulator(METADATA, now=server_clock) as emu:
        imds_client = client(emu.url, token_ttl=60, now=Clock())
        imds_client.get("instance-id")
        server_clock.time += 61  # the server expires the token; the client does not know
        assert imds_client.get("local-ipv4") == "127.0.0.12"
        assert (emu.count("PUT"), emu.count("GET")) == (2, 3)


def test_revoked_token_is_renewed(emulator: IMDSEmulator) -> None:
    imds_client = client(emulator.url)
    imds_client.get("instance-id")
    emulator.revoke_tokens()
    assert imds_client.identity() == IDENTITY
    assert emulator.count("PUT") == 2


def test_unreachable_endpoint_fails_after_bounded_retries() -> None:
    sleeps: list[float] = []
    imds_client = client(f"http://127.0.0.1:{closed_port()}", sleeps, attempts=3, backoff=0.5)
    with pytest.raises(imds.IMDSUnreachable) as caught:
        imds_client.identity()
    assert not isinstance(caught.value, imds.IMDSTimeout)
    assert sleeps == [0.5, 1.0]
    assert "\n" not in str(caught.value)


def test_backoff_is_capped() -> None:
    sleeps: list[float] = []
    imds_client = client(f"http://127.0.0.1:{closed_port()}", sleeps, attempts=6, max_backoff=2.0)
    with pytest.raises(imds.IMDSUnreachable):
        imds_client.get("instance-id")
    assert sleeps == [0.5, 1.0, 2.0, 2.0, 2.0]


def test_dropped_connections_are_unreachable(emulator: IMDSEmulator) -> None:
    emulator.set_fault("drop")
    with pytest.raises(imds.IMDSUnreachable):
        client(emulator.url, attempts=2).identity()
    assert emulator.count("PUT") == 2


def test_token_refused(emulator: IMDSEmulator) -> None:
    emulator.set_fault("token-refused")
    with pytest.raises(imds.IMDSTokenRefused, match="HttpEndpoint=enabled"):
        client(emulator.url).identity()
    assert emulator.count("PUT") == 1  # a refusal is an answer, not retried


def test_missing_path(emulator: IMDSEmulator) -> None:
    emulator.remove_path("local-ipv4")
    imds_client = client(emulator.url)
    with pytest.raises(imds.IMDSPathMissing, match="local-ipv4"):
        imds_client.identity()
    with pytest.raises(imds.IMDSPathMissing):
        imds_client.get("/latest/meta-data/no/such/path")


def test_slow_answers_time_out_after_retries() -> None:
    threads_before = set(threading.enumerate())
    with IMDSEmulator(METADATA) as emu:
        imds_client = client(emu.url, timeout=0.2, attempts=2)
        imds_client.get("instance-id")
        emu.set_fault(delay=30)
        with pytest.raises(imds.IMDSTimeout, match="HttpPutResponseHopLimit"):
            imds_client.get("local-ipv4")
        assert emu.count("GET") == 3
    assert set(threading.enumerate()) == threads_before  # stop woke the delayed handlers


def test_unavailable_then_recovering_succeeds(emulator: IMDSEmulator) -> None:
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            emulator.set_fault(None)

    emulator.set_fault("unavailable")
    assert client(emulator.url, sleep=sleep).identity() == IDENTITY
    assert emulator.count("PUT") == 3
    assert sleeps == [0.5, 1.0]


def test_unavailable_throughout_fails(emulator: IMDSEmulator) -> None:
    emulator.set_fault("unavailable")
    with pytest.raises(imds.IMDSUnavailable, match="HTTP 503"):
        client(emulator.url, attempts=3).identity()
    assert emulator.count("PUT") == 3


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("ami-launch-index", "-1"),
        ("ami-launch-index", "two"),
        ("ami-launch-index", ""),
        ("local-ipv4", "300.0.0.1"),
        ("local-ipv4", "fe80::1"),
        ("instance-id", "not-an-id"),
        ("placement/availability-zone", ""),
    ],
)
def test_bad_values_are_rejected(path: str, value: str) -> None:
    metadata = InstanceMetadata(**{**METADATA.__dict__, "extra": {path: value}})
    with IMDSEmulator(metadata) as emu, pytest.raises(imds.IMDSBadValue):
        client(emu.url).identity()


def test_user_data_round_trip(emulator: IMDSEmulator) -> None:
    assert client(emulator.url).user_data() == USER_DATA


def test_no_user_data_is_none() -> None:
    metadata = InstanceMetadata(**{**METADATA.__dict__, "user_data": None})
    with IMDSEmulator(metadata) as emu:
        assert client(emu.url).user_data() is None


def test_v1_fallback_is_off_by_default(emulator: IMDSEmulator) -> None:
    emulator.set_fault("v1-only")
    with pytest.raises(imds.IMDSNotSupported):
        client(emulator.url).identity()


def test_v1_fallback_when_allowed(emulator: IMDSEmulator) -> None:
    emulator.set_fault("v1-only")
    assert client(emulator.url, allow_v1=True).identity() == IDENTITY
    assert emulator.count("PUT") == 1  # the missing token API is remembered


def test_emulator_enforces_tokens(emulator: IMDSEmulator) -> None:
    path = "/latest/meta-data/instance-id"
    assert raw(emulator, "GET", path, {}) == 401
    assert raw(emulator, "GET", path, {imds.TOKEN_HEADER: "forged"}) == 401
    assert raw(emulator, "PUT", imds.TOKEN_PATH, {}) == 400
    assert raw(emulator, "PUT", imds.TOKEN_PATH, {imds.TTL_HEADER: "0"}) == 400
    assert raw(emulator, "PUT", imds.TOKEN_PATH, {imds.TTL_HEADER: "21601"}) == 400
    assert raw(emulator, "PUT", imds.TOKEN_PATH, {imds.TTL_HEADER: "21600"}) == 200


def test_emulator_serves_v1_when_allowed() -> None:
    with IMDSEmulator(METADATA, allow_v1=True) as emu:
        assert raw(emu, "GET", "/latest/meta-data/instance-id", {}) == 200
        assert raw(emu, "GET", "/latest/meta-data/instance-id", {imds.TOKEN_HEADER: "x"}) == 401


@pytest.mark.parametrize(
    "options",
    [{"token_ttl": 0}, {"token_ttl": 21601}, {"attempts": 0}, {"timeout": 0}],
)
def test_bad_settings(options: dict[str, Any]) -> None:
    with pytest.raises(imds.IMDSConfigError):
        IMDSClient("http://127.0.0.1:1", **options)


@pytest.mark.parametrize("endpoint", ["https://169.254.169.254", "169.254.169.254", "http://h/x"])
def test_bad_endpoint(endpoint: str) -> None:
    with pytest.raises(imds.IMDSConfigError):
        IMDSClient(endpoint)


def test_main_prints_address_and_serves(tmp_path: Path) -> None:
    user_data = tmp_path / "user-data"
    user_data.write_bytes(USER_DATA)
    argv = [
        sys.executable,
        "-m",
        "tfcluster.cloudinit.localcloud.imds_emulator",
        "--bind",
        "127.0.0.1:0",
    ]
    argv += ["--launch-index", "2", "--local-ipv4", "127.0.0.12"]
    argv += ["--instance-id", "i-0123456789abcdef0", "--availability-zone", "us-east-1b"]
    argv += ["--user-data-file", str(user_data)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "the emulator printed no address within 30 s"
        host, port = proc.stdout.readline().strip().rsplit(":", 1)
        assert host == "127.0.0.1"
        imds_client = client(f"http://{host}:{port}")
        assert imds_client.identity() == IDENTITY
        assert imds_client.user_data() == USER_DATA
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
