"""The cluster config (``tfcluster.yaml``): read, override, validate, freeze.

Everything is checked here, before the first API call, so that a typo costs
a one-line error instead of half a cluster. Each failure is a ``ConfigError``
whose message starts with the offending key, e.g.
``workers: must be an integer >= 1, got 'x'``. Unknown keys are errors too:
a misspelt ``wokers`` must not silently fall back to the default.

The file (every key optional except ``cluster``)::

    cluster: demo                    # DNS label; names the etcd prefix and the AWS resources
    region: us-east-1                # null: boto3's configured default region
    zone: tensorflow.local           # DNS zone of the task names
    chief: 1                         # 0 or 1
    ps: 1                            # >= 1
    workers: 2                       # >= 1
    instance_types: {control: t3.small, chief: m5.large, ps: m5.large, worker: m5.large}
    ami: null                        # null: current Ubuntu LTS from UBUNTU_AMI_SSM_PARAMETER
    subnet_id: null                  # at most one of subnet_id and vpc_id;
    vpc_id: null                     #   neither: the default VPC
    key_name: null                   # EC2 key pair for ssh
    ssh_cidr: null                   # e.g. 203.0.113.7/32; null: no ssh ingress at all
    spot_workers: false
    etcd: control-node               # or a list of existing client URLs
    artifacts:                       # pinned downloads, each verified by SHA-256
      coredns: {url: ..., sha256: ...}
      etcd: {url: ..., sha256: ...}  # needed only with etcd: control-node
    agent_package: tfcluster[tf]     # pip requirement installed into the agent's venv
    tf_port: 2222
    lease_ttl: 10                    # seconds an instance's names outlive it
    record_ttl: 5                    # DNS TTL of each record
    program: null                    # chief only: the training command, e.g. "python3 train.py"
    layout: {}                       # where things go on an instance: fields of
                                     #   render.layout.Layout, e.g. {dns_port: 53}; the
                                     #   local cloud sets it, EC2 needs none

Overrides (the command line's ``--set``) use the same keys, dotted for nested
ones: ``workers``, ``instance_types.worker``, ``artifacts.coredns.sha256``.
They are applied on top of the file before validation, so an override is
checked exactly like the file would be.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import yaml

from tfcluster.cloudinit.render.layout import DEFAULT_LAYOUT
from tfcluster.discovery.records import ROLES

#: Public SSM parameter holding the current Ubuntu 24.04 LTS AMI of a region.
UBUNTU_AMI_SSM_PARAMETER = (
    "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
)

#: The pinned releases. Their checksums cannot ship here unverified, and a
#: download without a checksum is not installed, so the config must name
#: each SHA-256 (published next to each release asset) for what it uses.
DEFAULT_ARTIFACT_URLS = {
    "coredns": "https://github.com/coredns/coredns/releases/download/v1.14.7/"
    "coredns_1.14.7_linux_amd64.tgz",
    "etcd": "https://github.com/etcd-io/etcd/releases/download/v3.7.3/"
    "etcd-v3.7.3-linux-amd64.tar.gz",
}

#: Instance roles: ``control`` runs etcd, the others are TensorFlow tasks.
INSTANCE_ROLES = ("control", *ROLES)
DEFAULT_INSTANCE_TYPES = {
    "control": "t3.small",
    "chief": "m5.large",
    "ps": "m5.large",
    "worker": "m5.large",
}
CONTROL_NODE = "control-node"

# The accepted keys: a nested dict of key -> sub-keys (None for a leaf).
_ARTIFACT_KEYS: dict[str, Any] = {"url": None, "sha256": None}
_KEYS: dict[str, Any] = {
    "cluster": None, "region": None, "zone": None, "chief": None, "ps": None, "workers": None,
    "instance_types": dict.fromkeys(INSTANCE_ROLES),
    "ami": None, "subnet_id": None, "vpc_id": None, "key_name": None, "ssh_cidr": None,
    "spot_workers": None, "etcd": None,
    "artifacts": {"coredns": _ARTIFACT_KEYS, "etcd": _ARTIFACT_KEYS},
    "agent_package": None, "tf_port": None, "lease_ttl": None, "record_ttl": None,
    "program": None, "layout": None, "max_instances": None, "max_lifetime": None,
}  # fmt: skip

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]+$")
_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ConfigError(ValueError):
    """The cluster config is invalid; the message names the key."""


@dataclass(frozen=True)
class Artifact:
    """A download that is installed only if its SHA-256 matches."""

    url: str
    sha256: str


@dataclass(frozen=True)
class ClusterConfig:
    """A validated cluster config; see the module docstring for each key.

    ``etcd_endpoints`` empty means "launch a control node running etcd";
    ``artifacts`` holds only what this config uses (no ``etcd`` entry with
    external etcd endpoints).
    """

    cluster: str
    region: str | None
    zone: str
    chief: int
    ps: int
    workers: int
    instance_types: Mapping[str, str]
    ami: str | None
    subnet_id: str | None
    vpc_id: str | None
    key_name: str | None
    ssh_cidr: str | None
    spot_workers: bool
    etcd_endpoints: tuple[str, ...]
    artifacts: Mapping[str, Artifact]
    agent_package: str
    tf_port: int
    lease_ttl: int
    record_ttl: int
    program: tuple[str, ...] | None
    layout: Mapping[str, str | int] = field(default_factory=lambda: MappingProxyType({}))
    max_instances: int = 16
    max_lifetime: int | None = None
    """Seconds after launch when every instance shuts itself down; None: never."""

    @property
    def control_node(self) -> bool:
        """True when ``up`` launches its own etcd on a control node."""
        return not self.etcd_endpoints

    @property
    def counts(self) -> dict[str, int]:
        """Tasks per TensorFlow role, keyed as TF_CONFIG and the agent name them."""
        return {"chief": self.chief, "ps": self.ps, "worker": self.workers}

    def instance_type(self, role: str) -> str:
        return self.instance_types[role]


def load_cluster_config(path: Path | None, overrides: Mapping[str, Any]) -> ClusterConfig:
    """Read ``path`` (None: no file), apply ``overrides`` (dotted keys; a None
    value means "not given" and is skipped), validate everything."""
    raw = _read_yaml(path) if path is not None else {}
    _check_keys(raw, _KEYS, "")
    given = {key: value for key, value in overrides.items() if value is not None}
    for key, value in given.items():
        _set_dotted(raw, key, value)
    for name in DEFAULT_ARTIFACT_URLS:
        # A new url never inherits the checksum of the file's download.
        if f"artifacts.{name}.url" in given and f"artifacts.{name}.sha256" not in given:
            raw["artifacts"][name].pop("sha256", None)
    return _build(raw)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["workers=4", "spot_workers=true"]`` -> typed overrides.

    Each value is read as YAML, so it gets the type it would have in the file.
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{item}: an override must look like key=value")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key.strip()}: cannot read value {value!r}: {exc}") from None
    return overrides


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"config: {path} is not valid YAML: {detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of keys, got {_kind(data)}")
    return data


def _check_keys(data: Mapping[Any, Any], known: Mapping[str, Any], prefix: str) -> None:
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(_unknown(name, str(key), known))
        if known[key] is not None and value is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: must be a mapping, got {_kind(value)}")
            _check_keys(value, known[key], f"{name}.")


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node, known, prefix = raw, _KEYS, ""
    for depth, part in enumerate(parts):
        name = f"{prefix}{part}"
        if part not in known:
            raise ConfigError(_unknown(name, part, known))
        if depth == len(parts) - 1:
            if known[part] is not None:
                if not isinstance(value, dict):
                    raise ConfigError(f"{name}: must be a mapping, got {_kind(value)}")
                _check_keys(value, known[part], f"{name}.")
            node[part] = value
            return
        if known[part] is None:
            raise ConfigError(f"{name}: has no sub-keys (in override {dotted!r})")
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        node, known, prefix = child, known[part], f"{name}."


def _unknown(name: str, key: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
    return f"{name}: unknown key{hint}"


def _build(raw: Mapping[str, Any]) -> ClusterConfig:
    sections: Mapping[str, Any] = raw.get("instance_types") or {}
    counts = {
        "chief": _integer(raw, "chief", 1, 0, 1),
        "ps": _integer(raw, "ps", 1, 1, None),
        "workers": _integer(raw, "workers", 2, 1, None),
    }
    etcd_endpoints = _etcd(raw.get("etcd", CONTROL_NODE))
    program = _program(raw.get("program"))
    if program is not None and counts["chief"] == 0:
        raise ConfigError("program: runs on the chief, but chief is 0")
    subnet_id = _optional(
        raw, "subnet_id", re.compile(r"^subnet-[0-9a-f]{8,17}$"), "subnet-0abc..."
    )
    vpc_id = _optional(raw, "vpc_id", re.compile(r"^vpc-[0-9a-f]{8,17}$"), "vpc-0abc...")
    if subnet_id is not None and vpc_id is not None:
        raise ConfigError("vpc_id: give subnet_id or vpc_id, not both (a subnet has one VPC)")
    region = _optional(raw, "region", _REGION, "us-east-1")
    return ClusterConfig(
        cluster=_cluster(raw.get("cluster")),
        region=region,
        zone=_zone(raw.get("zone", "tensorflow.local")),
        **counts,
        instance_types=MappingProxyType(
            {
                role: _instance_type(role, sections.get(role, DEFAULT_INSTANCE_TYPES[role]))
                for role in INSTANCE_ROLES
            }
        ),
        ami=_optional(raw, "ami", re.compile(r"^ami-[0-9a-f]{8,17}$"), "ami-0abc..."),
        subnet_id=subnet_id,
        vpc_id=vpc_id,
        key_name=_key_name(raw.get("key_name")),
        ssh_cidr=_cidr(raw.get("ssh_cidr")),
        spot_workers=_boolean(raw, "spot_workers", False),
        etcd_endpoints=etcd_endpoints,
        artifacts=MappingProxyType(
            _artifacts(raw.get("artifacts") or {}, with_etcd=not etcd_endpoints)
        ),
        agent_package=_agent_package(raw.get("agent_package", "tfcluster[tf]")),
        tf_port=_integer(raw, "tf_port", 2222, 1, 65535),
        lease_ttl=_integer(raw, "lease_ttl", 10, 2, 3600),
        record_ttl=_integer(raw, "record_ttl", 5, 1, 3600),
        program=program,
        layout=MappingProxyType(_layout(raw.get("layout"))),
        max_instances=_integer(raw, "max_instances", 16, 1, 10000),
        max_lifetime=_duration(raw.get("max_lifetime")),
    )


_DURATION = re.compile(r"^([0-9]+)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(value: Any) -> int | None:
    if value is None:
        return None
    match = _DURATION.match(value) if isinstance(value, str) else None
    seconds = int(match[1]) * _UNIT_SECONDS[match[2]] if match else 0
    if not 600 <= seconds <= 30 * 86400:
        raise ConfigError(f"max_lifetime: must be a duration 10m..30d such as 12h, got {value!r}")
    return seconds


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _integer(raw: Mapping[str, Any], key: str, default: int, low: int, high: int | None) -> int:
    value = raw.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bounds = f">= {low}" if high is None else f"{low}..{high}"
        raise ConfigError(f"{key}: must be an integer {bounds}, got {value!r}")
    return value


def _boolean(raw: Mapping[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    return value


def _optional(
    raw: Mapping[str, Any], key: str, pattern: re.Pattern[str], example: str
) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not pattern.match(value):
        raise ConfigError(f"{key}: must look like {example}, got {value!r}")
    return value


def _cluster(value: Any) -> str:
    if value is None:
        raise ConfigError("cluster: required (a DNS label such as 'demo')")
    if not isinstance(value, str) or not _LABEL.match(value):
        raise ConfigError(
            f"cluster: must be a DNS label (a-z, 0-9, '-', at most 63), got {value!r}"
        )
    return value


def _zone(value: Any) -> str:
    zone = value.rstrip(".").lower() if isinstance(value, str) else ""
    labels = zone.split(".")
    # Two labels at least: resolvers treat single-label names specially (LLMNR, search lists).
    if len(labels) < 2 or len(zone) > 200 or not all(_LABEL.match(label) for label in labels):
        raise ConfigError(f"zone: must be a DNS name of two labels or more, got {value!r}")
    return zone


def _instance_type(role: str, value: Any) -> str:
    if not isinstance(value, str) or not _INSTANCE_TYPE.match(value):
        raise ConfigError(
            f"instance_types.{role}: must be an EC2 instance type such as m5.large, got {value!r}"
        )
    return value


def _key_name(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 255 or not value.isprintable():
        raise ConfigError(f"key_name: must be the name of an EC2 key pair, got {value!r}")
    return value


def _cidr(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"ssh_cidr: must be a CIDR such as 203.0.113.7/32: {exc}") from None


def _etcd(value: Any) -> tuple[str, ...]:
    if value == CONTROL_NODE:
        return ()
    if not isinstance(value, list) or not value:
        raise ConfigError(f"etcd: must be {CONTROL_NODE!r} or a list of client URLs, got {value!r}")
    return tuple(etcd_endpoint("etcd", item) for item in value)


def etcd_endpoint(key: str, value: Any) -> str:
    """Check one etcd client URL (``http://10.0.0.5:2379``); ``key`` names it in errors."""
    try:
        url = urlsplit(value) if isinstance(value, str) else None
        port = url.port if url is not None else None
    except ValueError:
        url, port = None, None
    if url is None or url.scheme not in ("http", "https") or not url.hostname or port is None:
        raise ConfigError(f"{key}: an etcd endpoint must look like http://HOST:PORT, got {value!r}")
    if url.path not in ("", "/") or url.query or url.fragment or url.username:
        raise ConfigError(f"{key}: an etcd endpoint has no path, query or user, got {value!r}")
    return f"{url.scheme}://{url.netloc}"


def _artifacts(raw: Mapping[str, Any], with_etcd: bool) -> dict[str, Artifact]:
    names = ("coredns", "etcd") if with_etcd else ("coredns",)
    return {name: _artifact(name, raw.get(name) or {}) for name in names}


def _artifact(name: str, raw: Mapping[str, Any]) -> Artifact:
    key = f"artifacts.{name}"
    url = raw.get("url", DEFAULT_ARTIFACT_URLS[name])
    if not isinstance(url, str) or urlsplit(url).scheme not in ("https", "http", "file"):
        raise ConfigError(f"{key}.url: must be an https, http or file URL, got {url!r}")
    sha256 = raw.get("sha256")
    if sha256 is None:
        why = "when the url is set" if "url" in raw else f"to install {url}"
        raise ConfigError(f"{key}.sha256 is required {why} (the release's published SHA-256)")
    if not isinstance(sha256, str):  # YAML reads an unquoted all-digit value as a number
        raise ConfigError(f"{key}.sha256: must be a quoted string of 64 hex digits")
    if not _SHA256.match(sha256.lower()):
        raise ConfigError(f"{key}.sha256: must be 64 hex digits, got {sha256!r}")
    return Artifact(url=url, sha256=sha256.lower())


def _agent_package(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or not value.isprintable():
        raise ConfigError(f"agent_package: must be a pip requirement on one line, got {value!r}")
    return value.strip()


def _layout(value: Any) -> dict[str, str | int]:
    """Overrides of `render.layout.Layout` fields, each of the field's own type."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"layout: must be a mapping, got {_kind(value)}")
    known = {f.name: type(getattr(DEFAULT_LAYOUT, f.name)) for f in fields(DEFAULT_LAYOUT)}
    for key, item in value.items():
        if key not in known:
            raise ConfigError(_unknown(f"layout.{key}", str(key), known))
        kind = known[key]
        if isinstance(item, bool) != (kind is bool) or not isinstance(item, kind):
            raise ConfigError(f"layout.{key}: must be {kind.__name__}, got {_kind(item)}")
    return dict(value)


def _program(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise ConfigError(f"program: cannot split {value!r} into arguments: {exc}") from None
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        argv = list(value)
    else:
        raise ConfigError(f"program: must be a command string or a list of strings, got {value!r}")
    if not argv or not all(arg.isprintable() for arg in argv):
        raise ConfigError(f"program: must be a non-empty command on one line, got {value!r}")
    return tuple(argv)
