"""Each local instance's network: a namespace on a bridge, at its EC2 private IP.

As root, a cluster gets one bridge (``tfc-<hash8>``, gateway .1 of the
subnet) and each instance a network namespace ``tfc-<cluster>-<id8>`` joined
to it by a veth pair, holding:

* the private IP the EC2 API gave the instance, on ``eth0``: instances and
  the host reach each other on the subnet, and nothing else (no default
  route, so no packet of an instance can leave this machine);
* ``lo`` up, with 169.254.169.254/32 on it, so the instance's IMDS emulator
  serves at the real IMDS address and the user-data needs no change;
* ``/etc/netns/<ns>/resolv.conf`` naming 127.0.0.1 (written before any
  process starts: ``ip netns exec`` bind-mounts it over /etc/resolv.conf),
  so getaddrinfo inside asks the instance's own CoreDNS on 127.0.0.1:53.

Every interface carries the alias ``tfcluster:<cluster>`` and every name the
cluster's label, so `remove_cluster` finds all of it after a crash too.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

CIDR = "198.18.0.0/24"
"""RFC 2544's benchmark range: addresses assigned only inside our own namespaces."""
IMDS_ADDRESS = "169.254.169.254"
NETNS_ETC = Path("/etc/netns")
COMMAND_TIMEOUT = 15.0
"""Seconds for one ``ip`` command."""


class NetworkError(RuntimeError):
    """A namespace, interface or address could not be set up or removed."""


def available() -> bool:
    """True when this process may create network namespaces (root, ``ip netns`` works)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    try:
        probe = subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _hash8(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:8]


def label(cluster: str) -> str:
    return f"tfcluster:{cluster}"


def bridge_name(cluster: str) -> str:
    """At most 15 characters (IFNAMSIZ), whatever the cluster's name."""
    return f"tfc-{_hash8(cluster)}"


def namespace(cluster: str, instance_id: str) -> str:
    """``tfc-<cluster>-<last 8 hex digits of the instance id>``."""
    return f"tfc-{cluster}-{instance_id.removeprefix('i-')[-8:]}"


def _veth(cluster: str, instance_id: str) -> str:
    return f"tfv-{_hash8(cluster, instance_id)}"


def gateway(cidr: str = CIDR) -> str:
    """The bridge's address: the first host of the subnet (EC2 reserves it for its router)."""
    return str(next(ipaddress.ip_network(cidr).hosts()))


def ip(*args: str, namespace_name: str | None = None, check: bool = True) -> str:
    """Run ``ip ARGS`` (inside ``namespace_name`` if given); its stdout."""
    argv = ["ip", *(("-n", namespace_name) if namespace_name else ()), *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetworkError(f"{' '.join(argv)}: {exc}") from None
    if check and done.returncode != 0:
        raise NetworkError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def _accept_on_bridge(bridge: str, action: str) -> None:
    """Insert (``-I``) or delete (``-D``) the rule that lets instances talk to each other.

    With br_netfilter loaded (net.bridge.bridge-nf-call-iptables = 1) frames
    between two ports of a bridge also pass the host's iptables FORWARD chain,
    whose policy a Docker engine sets to DROP; then no instance reaches
    another. The rule accepts traffic from this bridge to itself (as Docker
    does for its own bridge) and nothing else. Without iptables there is no
    such chain, and nothing to do.
    """
    if shutil.which("iptables") is None:
        return
    rule = ["FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]
    argv = ["iptables", "-w", "10"]
    present = subprocess.run([*argv, "-C", *rule], capture_output=True, timeout=COMMAND_TIMEOUT)
    if (present.returncode == 0) == (action == "-I"):
        return
    done = subprocess.run([*argv, action, *rule], capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT)  # fmt: skip
    if done.returncode != 0:
        raise NetworkError(f"iptables {action} {' '.join(rule)}: {done.stderr.strip()}")


def ensure_bridge(cluster: str, cidr: str = CIDR) -> str:
    """The cluster's bridge, up, with the gateway address; created if missing."""
    bridge = bridge_name(cluster)
    if not _links(bridge):
        ip("link", "add", bridge, "type", "bridge")
        ip("link", "set", bridge, "alias", label(cluster))
    _accept_on_bridge(bridge, "-I")
    prefix = ipaddress.ip_network(cidr).prefixlen
    address = f"{gateway(cidr)}/{prefix}"
    holder = _holder(gateway(cidr))
    if holder not in (None, bridge):
        raise NetworkError(
            f"{gateway(cidr)} is already on {holder} (another local cluster?): "
            f"the local subnet {cidr} serves one cluster at a time"
        )
    if holder is None:
        ip("addr", "add", address, "dev", bridge)
    ip("link", "set", bridge, "up")
    return bridge


def _holder(address: str) -> str | None:
    """The interface that holds ``address`` in this namespace, if any."""
    for link in json.loads(ip("-j", "addr", "show") or "[]"):
        if any(info.get("local") == address for info in link.get("addr_info", [])):
            return str(link["ifname"])
    return None


def attach(cluster: str, instance_id: str, private_ip: str, cidr: str = CIDR) -> str:
    """Create the instance's namespace at ``private_ip``; return its name."""
    network = ipaddress.ip_network(cidr)
    if ipaddress.ip_address(private_ip) not in network:
        raise NetworkError(f"{instance_id}: {private_ip} is outside the local subnet {cidr}")
    bridge = ensure_bridge(cluster, cidr)
    name = namespace(cluster, instance_id)
    host_side = _veth(cluster, instance_id)
    resolv = NETNS_ETC / name / "resolv.conf"
    resolv.parent.mkdir(parents=True, exist_ok=True)
    resolv.write_text("# tfcluster local cloud: the instance's own CoreDNS\nnameserver 127.0.0.1\n")
    ip("netns", "add", name)
    ip("link", "add", host_side, "type", "veth", "peer", "name", "eth0", "netns", name)
    ip("link", "set", host_side, "alias", label(cluster))
    ip("link", "set", host_side, "master", bridge)
    ip("link", "set", host_side, "up")
    inside = [
        ("link", "set", "lo", "up"),
        ("addr", "add", f"{IMDS_ADDRESS}/32", "dev", "lo"),
        ("addr", "add", f"{private_ip}/{network.prefixlen}", "dev", "eth0"),
        ("link", "set", "eth0", "up"),
    ]
    for args in inside:
        ip(*args, namespace_name=name)
    return name


def pids(namespace_name: str) -> list[int]:
    """Every process inside the namespace (none if it is gone)."""
    out = ip("netns", "pids", namespace_name, check=False)
    return [int(word) for word in out.split() if word.isdigit()]


def exec_argv(namespace_name: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside the namespace."""
    return ["ip", "netns", "exec", namespace_name, *argv]


def namespaces(cluster: str) -> list[str]:
    """The cluster's namespaces, found by name (those of a crashed run included)."""
    pattern = re.compile(rf"tfc-{re.escape(cluster)}-[0-9a-f]{{8}}")
    listed = {line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()}
    if NETNS_ETC.is_dir():
        listed |= {entry.name for entry in NETNS_ETC.iterdir()}
    return sorted(name for name in listed if pattern.fullmatch(name))


def detach(namespace_name: str) -> None:
    """Delete the namespace (its veth pair goes with it) and its /etc/netns entry."""
    if namespace_name in ip("netns", "list").split():
        ip("netns", "delete", namespace_name)
    shutil.rmtree(NETNS_ETC / namespace_name, ignore_errors=True)


def _links(name: str | None = None) -> list[dict[str, object]]:
    args = ("-j", "link", "show", *(("dev", name) if name else ()))
    out = ip(*args, check=name is None)
    return list(json.loads(out)) if out.strip() else []


def remove_cluster(cluster: str) -> list[str]:
    """Delete every namespace, interface and /etc/netns entry of the cluster; their names.

    Run it after the namespaces' processes are gone. Idempotent.
    """
    removed = []
    for name in namespaces(cluster):
        detach(name)
        removed.append(name)
    for link in _links():
        if link.get("ifalias") == label(cluster):
            if link.get("ifname") == bridge_name(cluster):
                _accept_on_bridge(bridge_name(cluster), "-D")
            ip("link", "delete", str(link["ifname"]), check=False)
            removed.append(str(link["ifname"]))
    return removed
