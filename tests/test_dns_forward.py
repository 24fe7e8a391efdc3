"""An instance's CoreDNS answers every name systemd-resolved sends it.

systemd-resolved asks a global DNS= server for every name that no routing
domain claims, so the instance's CoreDNS gets names outside the zone too. It
answers the zone from etcd and forwards the rest to the VPC resolver
(``layout.dns_forward``). Here the Corefile comes from a worker's rendered
user-data, the real parser of render-check reads it, and the real CoreDNS
runs it against the session's etcd, with a dnslib server on loopback standing
in for the VPC resolver (no query leaves this machine).
"""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dnslib
import pytest
from dnslib.server import BaseResolver, DNSServer
from test_render_properties import coredns_directives
from test_userdata import embedded_files

from conftest import REPO, TEST_CLUSTER, TEST_ZONE
from tfcluster.cloudinit.config import Artifact, load_cluster_config
from tfcluster.cloudinit.localcloud import localstack
from tfcluster.cloudinit.localcloud.localstack import free_port
from tfcluster.cloudinit.render.layout import DEFAULT_LAYOUT
from tfcluster.cloudinit.render.userdata import AGENT_OBJECTS, render_parts
from tfcluster.discovery.waiting import wait_for

UPSTREAM_ANSWER = "192.0.2.53"
"""What the stand-in VPC resolver answers for every name (a documentation address)."""


class Recording(BaseResolver):  # type: ignore[misc]
    """Answers every A question with UPSTREAM_ANSWER and remembers the names asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.lock = threading.Lock()

    def resolve(self, request: Any, handler: Any) -> Any:
        name = str(request.q.qname)
        with self.lock:
            self.asked.append(name)
        reply = request.reply()
        if request.q.qtype == dnslib.QTYPE.A:
            reply.add_answer(*dnslib.RR.fromZone(f"{name} 30 A {UPSTREAM_ANSWER}"))
        return reply


@pytest.fixture
def upstream() -> Iterator[tuple[Recording, str]]:
    resolver = Recording()
    port = free_port()
    server = DNSServer(resolver, address="127.0.0.1", port=port)
    server.start_thread()
    try:
        yield resolver, f"127.0.0.1:{port}"
    finally:
        server.stop()


def worker_corefile(etcd: str, forward: str, dns_port: int) -> str:
    config = load_cluster_config(
        None,
        {
            "cluster": TEST_CLUSTER,
            "zone": TEST_ZONE,
            "etcd": [etcd],
            "artifacts": {"coredns": {"sha256": "a" * 64}},
            "layout": {
                "dns_port": dns_port,
                "dns_forward": forward,
                "ready_addr": f"127.0.0.1:{free_port()}",
                "health_addr": f"127.0.0.1:{free_port()}",
            },
        },
    )
    # Never fetched here: only the Corefile of the script is used.
    staged = {name: Artifact(f"http://127.0.0.1:9/{name}", "0" * 64) for name in AGENT_OBJECTS}
    script = render_parts(config, "worker", staged=staged)[1].content
    return embedded_files(script)[f"{DEFAULT_LAYOUT.config_dir}/Corefile"]


def ask(port: int, name: str) -> dnslib.DNSRecord:
    packet = dnslib.DNSRecord.question(name, "A").send("127.0.0.1", port, timeout=5)
    return dnslib.DNSRecord.parse(packet)


def test_instance_coredns_forwards_other_names_and_keeps_the_zone(
    stack: localstack.StackSettings, upstream: tuple[Recording, str], tmp_path: Path
) -> None:
    recording, address = upstream
    port = free_port()
    text = worker_corefile(stack.etcd_endpoint, address, port)
    assert f"forward . {address}" in text
    corefile = tmp_path / "Corefile"
    corefile.write_text(text)

    checked = subprocess.run(
        [str(REPO / ".tools" / "bin" / "render-check"), "corefile",
         "-directives", coredns_directives(), str(corefile)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    row = json.loads(checked.stdout)
    assert not row.get("error"), row
    assert sum(1 for item in row["shape"] if "forward" in item) == 1, row["shape"]

    ready = next(line.split()[1] for line in text.splitlines() if line.strip().startswith("ready"))
    log = (tmp_path / "coredns.log").open("w")
    process = subprocess.Popen(
        [str(localstack.DEFAULT_BIN / "coredns"), "-conf", str(corefile)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:

        def is_ready() -> bool | None:
            try:
                with urllib.request.urlopen(f"http://{ready}/ready", timeout=1) as answer:
                    return answer.status == 200 or None
            except OSError:
                return None

        wait_for(is_ready, what="the instance's CoreDNS to be ready", timeout=20)
        outside = ask(port, "www.example.org")
        assert dnslib.RCODE[outside.header.rcode] == "NOERROR"
        assert [str(rr.rdata) for rr in outside.rr] == [UPSTREAM_ANSWER]
        assert "www.example.org." in recording.asked

        inside = ask(port, f"worker0.{TEST_ZONE}")
        assert dnslib.RCODE[inside.header.rcode] == "NXDOMAIN"  # no such member: from etcd
        assert not [name for name in recording.asked if name.endswith(f"{TEST_ZONE}.")]
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def test_without_a_forward_the_corefile_answers_the_zone_only(
    stack: localstack.StackSettings,
) -> None:
    """The local cloud's setting (nothing leaves the machine): no "." block at all."""
    text = worker_corefile(stack.etcd_endpoint, "", free_port())
    assert "forward" not in text and "\n.:" not in text


def test_the_default_forward_is_the_vpc_resolver() -> None:
    assert DEFAULT_LAYOUT.dns_forward == "169.254.169.253"
    with pytest.raises(ValueError, match="IPv4 address or IPv4:PORT"):
        load_cluster_config(None, {"cluster": "x", "layout": {"dns_forward": "[::1]:53"}})
