"""Who this instance is: the agent's config file plus what IMDS says.

The user-data writes the cluster layout to the agent's config file (JSON);
the role comes from there, the task index from the instance's
ami-launch-index unless the config names one (a replacement instance). Every
field is validated here, before anything is written anywhere, and a bad value
raises ``ConfigError`` naming the field.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tfcluster.discovery.records import ROLES, Member

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
ADDRESS_MODES = ("names", "ips")


class ConfigError(ValueError):
    """The agent's config is unusable; the message names the field."""


@dataclass(frozen=True)
class AgentConfig:
    """The agent config file, validated. Field meanings: discovery/README.md."""

    cluster: str
    zone: str
    roles: tuple[tuple[str, int], ...]
    role: str
    etcd_endpoints: tuple[str, ...]
    index: int | None = None
    tf_port: int = 2222
    distinct_ports: bool = False
    dns_server: tuple[str, int] = ("127.0.0.1", 5353)
    imds_endpoint: str = "http://169.254.169.254"
    lease_ttl: int = 10
    record_ttl: int = 5
    barrier_timeout: float = 600.0
    check_system_resolver: bool = True
    tf_config_path: Path = Path("/run/tfcluster/tf_config.json")
    tf_config_addresses: str = "names"
    program: tuple[str, ...] | None = None

    def count(self, role: str) -> int:
        return dict(self.roles).get(role, 0)

    def members(self) -> list[Member]:
        """Every task of the cluster, in the order chief, ps, worker."""
        return [Member(role, i) for role in ROLES for i in range(self.count(role))]

    def port_of(self, member: Member) -> int:
        """The task's TF port: one port for all, or one per task on a shared host."""
        if not self.distinct_ports:
            return self.tf_port
        return self.tf_port + self.members().index(member)


@dataclass(frozen=True)
class Identity:
    """This instance as a cluster member."""

    member: Member
    ip: str
    port: int
    instance_id: str


def load_agent_config(path: Path) -> AgentConfig:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read agent config {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"agent config {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"agent config {path} must hold a JSON object")
    return parse_agent_config(data)


def parse_agent_config(data: Mapping[str, Any]) -> AgentConfig:
    known = set(AgentConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown agent config key(s): {', '.join(unknown)}")
    for key in ("cluster", "zone", "roles", "role", "etcd_endpoints"):
        if key not in data:
            raise ConfigError(f"{key}: required")

    cluster = _label("cluster", data["cluster"])
    zone = _zone(data["zone"])
    roles = _roles(data["roles"])
    role = data["role"]
    if role not in ROLES:
        raise ConfigError(f"role: must be one of {', '.join(ROLES)}, got {role!r}")
    if dict(roles).get(role, 0) == 0:
        raise ConfigError(f"role: the cluster has no {role} tasks (roles.{role} is 0)")
    index = data.get("index")
    if index is not None:
        index = _int("index", index, 0, dict(roles)[role] - 1)
    endpoints = data["etcd_endpoints"]
    if (
        not isinstance(endpoints, list)
        or not endpoints
        or not all(isinstance(e, str) and e.startswith("http://") for e in endpoints)
    ):
        raise ConfigError("etcd_endpoints: must be a non-empty list of http://HOST:PORT URLs")
    mode = data.get("tf_config_addresses", "names")
    if mode not in ADDRESS_MODES:
        raise ConfigError(f"tf_config_addresses: must be 'names' or 'ips', got {mode!r}")
    program = data.get("program")
    if program is not None and (
        not isinstance(program, list) or not program or not all(isinstance(a, str) for a in program)
    ):
        raise ConfigError("program: must be a non-empty list of strings (an argv) or null")

    config = AgentConfig(
        cluster=cluster,
        zone=zone,
        roles=roles,
        role=role,
        etcd_endpoints=tuple(endpoints),
        index=index,
        tf_port=_int("tf_port", data.get("tf_port", AgentConfig.tf_port), 1, 65535),
        distinct_ports=_bool("distinct_ports", data.get("distinct_ports", False)),
        dns_server=_server("dns_server", data.get("dns_server", "127.0.0.1:5353")),
        imds_endpoint=str(data.get("imds_endpoint", AgentConfig.imds_endpoint)),
        lease_ttl=_int("lease_ttl", data.get("lease_ttl", AgentConfig.lease_ttl), 2, 3600),
        record_ttl=_int("record_ttl", data.get("record_ttl", AgentConfig.record_ttl), 1, 3600),
        barrier_timeout=float(_int("barrier_timeout", data.get("barrier_timeout", 600), 1, 86400)),
        check_system_resolver=_bool(
            "check_system_resolver", data.get("check_system_resolver", True)
        ),
        tf_config_path=Path(data.get("tf_config_path", str(AgentConfig.tf_config_path))),
        tf_config_addresses=mode,
        program=tuple(program) if program is not None else None,
    )
    last_port = config.tf_port + (len(config.members()) - 1 if config.distinct_ports else 0)
    if last_port > 65535:
        raise ConfigError(f"tf_port: {config.tf_port} + one port per task exceeds 65535")
    return config


def resolve_identity(
    config: AgentConfig, launch_index: int, local_ipv4: str, instance_id: str
) -> Identity:
    """The member this instance is: explicit index first, else the launch index."""
    index = config.index if config.index is not None else launch_index
    count = config.count(config.role)
    if not 0 <= index < count:
        source = "index" if config.index is not None else "ami-launch-index"
        raise ConfigError(
            f"{source} {index} is out of range: the cluster has {count} {config.role} task(s)"
        )
    try:
        ipaddress.ip_address(local_ipv4)
    except ValueError:
        raise ConfigError(f"local-ipv4 {local_ipv4!r} is not an IP address") from None
    member = Member(config.role, index)
    return Identity(member, local_ipv4, config.port_of(member), instance_id)


def _label(field: str, value: Any) -> str:
    if not isinstance(value, str) or not _LABEL.match(value):
        raise ConfigError(
            f"{field}: must be a DNS label (a-z, 0-9, '-', at most 63), got {value!r}"
        )
    return value


def _zone(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 253 or not value:
        raise ConfigError(f"zone: must be a DNS name, got {value!r}")
    for label in value.rstrip(".").split("."):
        _label("zone", label)
    return value.rstrip(".")


def _roles(value: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, dict):
        raise ConfigError("roles: must map chief/ps/worker to task counts")
    unknown = sorted(set(value) - set(ROLES))
    if unknown:
        raise ConfigError(f"roles: unknown role(s) {', '.join(unknown)}")
    counts = tuple((role, _int(f"roles.{role}", value.get(role, 0), 0, 10000)) for role in ROLES)
    if dict(counts)["chief"] > 1:
        raise ConfigError("roles.chief: a cluster has at most one chief")
    return counts


def _int(field: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{field}: must be an integer from {low} to {high}, got {value!r}")
    return value


def _bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{field}: must be true or false, got {value!r}")
    return value


def _server(field: str, value: Any) -> tuple[str, int]:
    host, sep, port = str(value).rpartition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{field}: must be IP:PORT, got {value!r}") from None
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{field}: must be IP:PORT, got {value!r}")
    return host, int(port)
