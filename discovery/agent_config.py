"""The agent config file: one schema for the file the user-data writes and the
agent reads (``/etc/tfcluster/agent.json``).

``AgentConfig`` is the contract. Each field states in its metadata how its
JSON value is read (checked, one-line ``ConfigError`` naming the key) and
written back, so the renderer (``dump_agent_config``) and the agent
(``parse_agent_config``) cannot drift apart: a key exists here or nowhere.
Plain dataclasses, no schema library: the agent starts on every instance at
boot, and a library such as pydantic would add its import (about 130 ms here,
more than the whole `tfcluster` entry point) and a compiled package to every
instance's install, for some twenty keys.

Keys whose value is the default and marked ``quiet`` are left out of the file
(``index``, ``program``, ``distinct_ports`` ...), so a rendered file states
what differs from an ordinary EC2 instance.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from tfcluster.discovery.records import ROLES, Member, parse_label

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_COMMAND = re.compile(r"^(/[A-Za-z0-9._+/-]+|[A-Za-z0-9._+-]+)$")
ADDRESS_MODES = ("names", "ips")
CHIEF_EXIT_MODES = ("keep", "down")

Reader = Callable[[str, Any, Mapping[str, Any]], Any]
"""(key, JSON value, the fields read so far) -> the field's value, or ConfigError."""


class ConfigError(ValueError):
    """The agent's config is unusable; the message names the field."""


def _same(value: Any) -> Any:
    return value


def _key(read: Reader, write: Callable[[Any], Any] = _same, quiet: bool = False) -> dict[str, Any]:
    """Field metadata: how the key is read from and written to JSON."""
    return {"read": read, "write": write, "quiet": quiet}


# Readers. Each gets the key (for the message), the raw JSON value, and the
# fields before it, already read (roles and role come before index).


def _int(key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{key}: must be an integer from {low} to {high}, got {value!r}")
    return value


def _int_in(low: int, high: int) -> Reader:
    return lambda key, value, _: _int(key, value, low, high)


def _bool(key: str, value: Any, _: Mapping[str, Any]) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    return value


def _text(key: str, value: Any, _: Mapping[str, Any]) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must be a non-empty string, got {value!r}")
    return value


def _label(key: str, value: Any, _: Mapping[str, Any] | None = None) -> str:
    if not isinstance(value, str) or not _LABEL.match(value):
        raise ConfigError(f"{key}: must be a DNS label (a-z, 0-9, '-', at most 63), got {value!r}")
    return value


def _zone(key: str, value: Any, _: Mapping[str, Any]) -> str:
    if not isinstance(value, str) or len(value) > 253 or not value:
        raise ConfigError(f"{key}: must be a DNS name, got {value!r}")
    for label in value.rstrip(".").split("."):
        _label(key, label)
    return value.rstrip(".")


def _roles(key: str, value: Any, _: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must map chief/ps/worker to task counts")
    unknown = sorted(set(value) - set(ROLES))
    if unknown:
        raise ConfigError(f"{key}: unknown role(s) {', '.join(unknown)}")
    counts = tuple((role, _int(f"{key}.{role}", value.get(role, 0), 0, 10000)) for role in ROLES)
    if dict(counts)["chief"] > 1:
        raise ConfigError(f"{key}.chief: a cluster has at most one chief")
    return counts


def _role(key: str, value: Any, read: Mapping[str, Any]) -> str:
    if value not in ROLES:
        raise ConfigError(f"{key}: must be one of {', '.join(ROLES)}, got {value!r}")
    if dict(read["roles"]).get(value, 0) == 0:
        raise ConfigError(f"{key}: the cluster has no {value} tasks (roles.{value} is 0)")
    return str(value)


def _index(key: str, value: Any, read: Mapping[str, Any]) -> int | None:
    if value is None:
        return None
    return _int(key, value, 0, dict(read["roles"])[read["role"]] - 1)


def _endpoints(key: str, value: Any, _: Mapping[str, Any]) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(e, str) and e.startswith("http://") for e in value)
    ):
        raise ConfigError(f"{key}: must be a non-empty list of http://HOST:PORT URLs")
    return tuple(value)


def _server(key: str, value: Any, _: Mapping[str, Any]) -> tuple[str, int]:
    host, sep, port = str(value).rpartition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{key}: must be IP:PORT, got {value!r}") from None
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: must be IP:PORT, got {value!r}")
    return host, int(port)


def _seconds(key: str, value: Any, _: Mapping[str, Any]) -> float:
    return float(_int(key, value, 1, 86400))


def _path(key: str, value: Any, read: Mapping[str, Any]) -> Path:
    return Path(_text(key, value, read))


def _optional_path(key: str, value: Any, read: Mapping[str, Any]) -> Path | None:
    if value is None:
        return None
    path = _path(key, value, read)
    if not path.is_absolute():
        raise ConfigError(f"{key}: must be an absolute path, got {value!r}")
    return path


def _write_optional_path(value: Path | None) -> str | None:
    return None if value is None else str(value)


def _address_mode(key: str, value: Any, _: Mapping[str, Any]) -> str:
    if value not in ADDRESS_MODES:
        raise ConfigError(f"{key}: must be 'names' or 'ips', got {value!r}")
    return str(value)


def _argv(key: str, value: Any, _: Mapping[str, Any]) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise ConfigError(f"{key}: must be a non-empty list of strings (an argv) or null")
    return tuple(value)


def _chief_exit(key: str, value: Any, _: Mapping[str, Any]) -> str:
    if value not in CHIEF_EXIT_MODES:
        raise ConfigError(f"{key}: must be 'keep' or 'down', got {value!r}")
    return str(value)


def _command(key: str, value: Any, _: Mapping[str, Any]) -> str:
    if not isinstance(value, str) or not _COMMAND.match(value):
        raise ConfigError(f"{key}: must be a program name or an absolute path, got {value!r}")
    return value


@dataclass(frozen=True)
class ReportPost:
    """Where the agent writes to the cluster bucket: a presigned S3 POST
    (discovery/report.py). The same shape serves ``report_post`` (reports)
    and ``output_post`` (the chief's outputs).

    ``url`` is the bucket's POST URL; ``fields`` holds the signed form fields
    per agent label (``worker0``) or per role (``worker``), as boto3's
    ``generate_presigned_post`` returns them. An agent uses its label's entry,
    else its role's: the operator can sign one policy per agent (per-agent
    prefixes; the right shape when each instance gets its own user-data) or
    one per role (one user-data per role launch stays small).
    """

    url: str
    fields: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]

    def fields_for(self, member: Member) -> dict[str, str] | None:
        """The form fields ``member`` signs its writes with, or None."""
        by_name = dict(self.fields)
        found = by_name.get(member.label, by_name.get(member.role))
        return None if found is None else dict(found)


def _report_post(key: str, value: Any, read: Mapping[str, Any]) -> ReportPost | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"url", "fields"}:
        raise ConfigError(f"{key}: must be an object with 'url' and 'fields', or null")
    url = value["url"]
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise ConfigError(f"{key}.url: must be an http(s) URL, got {url!r}")
    posts = value["fields"]
    if not isinstance(posts, dict) or not posts:
        raise ConfigError(f"{key}.fields: must map agent labels or roles to form fields")
    counts = dict(read["roles"])
    entries = []
    for name, form in posts.items():
        member = parse_label(name)
        known = counts.get(name, 0) > 0 or (
            member is not None and member.index < counts.get(member.role, 0)
        )
        if not known:
            raise ConfigError(f"{key}.fields: {name!r} is no agent label or role of this cluster")
        if (
            not isinstance(form, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in form.items())
            or not {"key", "policy"} <= set(form)
        ):
            raise ConfigError(
                f"{key}.fields.{name}: must be an object of strings with 'key' and 'policy'"
            )
        entries.append((name, tuple(sorted(form.items()))))
    return ReportPost(url, tuple(sorted(entries)))


def _write_report_post(value: ReportPost | None) -> dict[str, Any] | None:
    if value is None:
        return None
    return {"url": value.url, "fields": {name: dict(form) for name, form in value.fields}}


def _write_seconds(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _write_list(value: tuple[Any, ...] | None) -> list[Any] | None:
    return None if value is None else list(value)


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """The agent config file, validated. Field meanings: discovery/README.md.

    The field order is the order keys are read in (``roles`` and ``role``
    before ``index``) and written out.
    """

    cluster: str = field(metadata=_key(_label))
    zone: str = field(metadata=_key(_zone))
    roles: tuple[tuple[str, int], ...] = field(metadata=_key(_roles, dict))
    """(role, task count) for chief, ps, worker; a JSON object in the file."""
    role: str = field(metadata=_key(_role))
    index: int | None = field(default=None, metadata=_key(_index, quiet=True))
    """An explicit task index (a replacement instance); else the ami-launch-index."""
    tf_port: int = field(default=2222, metadata=_key(_int_in(1, 65535)))
    etcd_endpoints: tuple[str, ...] = field(metadata=_key(_endpoints, list))
    dns_server: tuple[str, int] = field(
        default=("127.0.0.1", 5353), metadata=_key(_server, lambda s: f"{s[0]}:{s[1]}")
    )
    imds_endpoint: str = field(default="http://169.254.169.254", metadata=_key(_text))
    lease_ttl: int = field(default=10, metadata=_key(_int_in(2, 3600)))
    record_ttl: int = field(default=5, metadata=_key(_int_in(1, 3600)))
    tf_config_path: Path = field(
        default=Path("/run/tfcluster/tf_config.json"), metadata=_key(_path, str)
    )
    distinct_ports: bool = field(default=False, metadata=_key(_bool, quiet=True))
    """One TF port per task (tf_port + the task's position): every task on one host."""
    check_system_resolver: bool = field(default=True, metadata=_key(_bool, quiet=True))
    tf_config_addresses: str = field(default="names", metadata=_key(_address_mode, quiet=True))
    program: tuple[str, ...] | None = field(
        default=None, metadata=_key(_argv, _write_list, quiet=True)
    )
    """The chief's program (an argv); None: the chief only holds its name."""
    program_dir: Path | None = field(
        default=None, metadata=_key(_optional_path, _write_optional_path, quiet=True)
    )
    """The chief program's working directory (where the user-data unpacked the
    program bundle); None: the agent's own."""
    barrier_timeout: float = field(
        default=600.0, metadata=_key(_seconds, _write_seconds, quiet=True)
    )
    report_post: ReportPost | None = field(
        default=None, metadata=_key(_report_post, _write_report_post, quiet=True)
    )
    """The presigned POST for the agent's reports; None: the agent writes none."""
    report_heartbeat: int = field(default=15, metadata=_key(_int_in(1, 3600), quiet=True))
    """Seconds between reports while nothing changes (never more than one a second)."""
    output_post: ReportPost | None = field(
        default=None, metadata=_key(_report_post, _write_report_post, quiet=True)
    )
    """The presigned POST for the chief's outputs (``output/``); None: nothing is uploaded."""
    output_dir: Path = field(default=Path("/var/lib/tfcluster/output"), metadata=_key(_path, str))
    """The chief's program gets this directory as TFCLUSTER_OUTPUT_DIR."""
    output_interval: int = field(default=900, metadata=_key(_int_in(1, 30 * 86400), quiet=True))
    """Seconds between uploads of changed outputs while the chief's program runs."""
    on_chief_exit: str = field(default="keep", metadata=_key(_chief_exit, quiet=True))
    """``down``: once the chief's program has exited and its outputs are
    uploaded, every agent shuts its instance down; ``keep``: they stay."""
    preload_tensorflow: bool = field(default=True, metadata=_key(_bool, quiet=True))
    """A ps or worker starts its TensorFlow process before the barrier: it imports
    TensorFlow while the barrier waits and starts its server when TF_CONFIG is
    written. False: the process starts after the barrier."""
    shutdown_command: str = field(default="shutdown", metadata=_key(_command, quiet=True))
    """What ``on_chief_exit: down`` runs (with ``-P now``) to power the instance off."""
    shutdown_sudo: bool = field(default=False, metadata=_key(_bool, quiet=True))
    """Run it through ``sudo -n``: the agent's user may not power off on its own
    (the user-data allows that one command)."""

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


def role_counts(counts: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    """``AgentConfig.roles`` from a mapping such as ``{"ps": 1, "worker": 2}``."""
    return tuple((role, counts.get(role, 0)) for role in ROLES)


_FIELDS: tuple[Field[Any], ...] = fields(AgentConfig)


def parse_agent_config(data: Mapping[str, Any]) -> AgentConfig:
    """The config from its JSON object; ``ConfigError`` names the first bad key."""
    unknown = sorted(set(data) - {f.name for f in _FIELDS})
    if unknown:
        raise ConfigError(f"unknown agent config key(s): {', '.join(unknown)}")
    for f in _FIELDS:
        if f.default is MISSING and f.name not in data:
            raise ConfigError(f"{f.name}: required")
    read: dict[str, Any] = {}
    for f in _FIELDS:
        if f.name in data:
            read[f.name] = f.metadata["read"](f.name, data[f.name], read)
    config = AgentConfig(**read)
    last_port = config.tf_port + (len(config.members()) - 1 if config.distinct_ports else 0)
    if last_port > 65535:
        raise ConfigError(f"tf_port: {config.tf_port} + one port per task exceeds 65535")
    return config


def dump_agent_config(config: AgentConfig) -> dict[str, Any]:
    """The JSON object for ``config``, as ``parse_agent_config`` reads it back."""
    data: dict[str, Any] = {}
    for f in _FIELDS:
        value = getattr(config, f.name)
        if f.metadata["quiet"] and value == f.default:
            continue
        data[f.name] = f.metadata["write"](value)
    return data


def load_agent_config(path: Path) -> AgentConfig:
    """Read and validate the agent config file at ``path``."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read agent config {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"agent config {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"agent config {path} must hold a JSON object")
    return parse_agent_config(data)
