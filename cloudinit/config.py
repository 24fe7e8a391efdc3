"""The cluster config (``tfcluster.yaml``): read, override, validate, freeze.

Everything is checked here, before the first API call, so that a typo costs
a one-line error instead of half a cluster. The schema is a pydantic model
that mirrors the file (`_File`); each value is checked for the place it
lands (`checks`). Each failure is a ``ConfigError`` whose message starts
with the offending key, e.g. ``workers: must be an integer >= 1 and <= 1000, got 'x'``.
Unknown keys are errors too: a misspelt ``wokers`` must not silently fall
back to the default. ``null`` means "the default" for every key.

The file (every key optional except ``cluster``)::

    cluster: demo                    # DNS label; names the etcd prefix and the AWS resources
    region: us-east-1                # null: boto3's configured default region
    zone: tensorflow.local           # DNS zone of the task names, under a PRIVATE_ZONES suffix
    allow_public_zone: false         # true: any other zone (never a reverse zone or localhost)
    chief: 1                         # 0 or 1
    ps: 1                            # 1..1000
    workers: 2                       # 1..1000
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
    max_instances: 16                # up asks for confirmation above this many instances
    max_lifetime: null               # e.g. 12h, 90m, 2d (10m..30d): every instance shuts
                                     #   itself down (and so terminates) after that long
    layout: {}                       # where things go on an instance: fields of
                                     #   layout.Layout, e.g. {dns_port: 53}; the
                                     #   local cloud sets it, EC2 needs none

Overrides (the command line's ``--set``) use the same keys, dotted for nested
ones: ``workers``, ``instance_types.worker``, ``artifacts.coredns.sha256``.
They are applied on top of the file before validation, so an override is
checked exactly like the file would be. `config_warnings` lists what is
allowed but probably wrong (ssh open to the world, a TF port taken).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, cast, get_type_hints

import yaml
from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError, create_model
from pydantic import model_validator as after_fields

from tfcluster.cloudinit import checks
from tfcluster.cloudinit.checks import Boolean, Port, integer, matching, one_line, server_url
from tfcluster.cloudinit.layout import DEFAULT_LAYOUT, Layout
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
MAX_TASKS = 1000
"""Per role: far above what an account may launch, far below what exhausts memory."""

#: Zone suffixes reserved for private use: mDNS (RFC 6762, whose appendix G
#: also names lan, home, corp, private, intranet), ICANN's .internal, RFC
#: 8375's home.arpa and RFC 2606's test, example and invalid. Names under
#: them never collide with a public DNS name that the instances also need.
PRIVATE_ZONES = (
    "local", "internal", "home.arpa", "test", "example", "invalid",
    "lan", "home", "corp", "private", "intranet",
)  # fmt: skip
REVERSE_ZONES = ("in-addr.arpa", "ip6.arpa")


class ConfigError(ValueError):
    """The cluster config is invalid; the message names the key."""


def _zone(value: Any) -> str:
    zone = value.rstrip(".").lower() if isinstance(value, str) else ""
    labels = zone.split(".")
    # Two labels at least: resolvers treat single-label names specially (LLMNR, search lists).
    if len(labels) < 2 or len(zone) > 200 or not checks.is_hostname(zone) or "_" in zone:
        raise ValueError(f"must be a DNS name of two labels or more, got {value!r}")
    if labels[-1] == "localhost" or zone.endswith(tuple(f".{r}" for r in REVERSE_ZONES)):
        raise ValueError(f"must not be localhost or a reverse zone, got {value!r}")
    return zone


def _cidr(value: Any) -> str:
    try:
        return str(ipaddress.ip_network(value if isinstance(value, str) else "", strict=True))
    except ValueError as exc:
        raise ValueError(f"must be a CIDR such as 203.0.113.7/32: {exc}") from None


def _etcd(value: Any) -> tuple[str, ...]:
    if value == CONTROL_NODE or value == ():
        return ()
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"must be {CONTROL_NODE!r} or a list of client URLs, got {value!r}")
    return tuple(server_url(item, "an etcd endpoint", port=True) for item in value)


def _artifact_url(value: Any) -> str:
    url = checks.parse_url(value)
    if url is None or url.scheme not in ("https", "http", "file") or not url.path:
        raise ValueError(f"must be an https, http or file URL, got {value!r}")
    return str(value)


def _sha256(value: Any) -> str:
    if not isinstance(value, str):  # YAML reads an unquoted all-digit value as a number
        raise ValueError("must be a quoted string of 64 hex digits")
    return matching(r"^[0-9a-f]{64}$", "be 64 hex digits")(value.lower())


def _program(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot split {value!r} into arguments: {exc}") from None
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        argv = list(value)
    else:
        raise ValueError(f"must be a command string or a list of strings, got {value!r}")
    if not argv or not all(arg.isprintable() for arg in argv):
        raise ValueError(f"must be a non-empty command on one line, got {value!r}")
    return tuple(argv)


def _v(check: Any) -> PlainValidator:
    return PlainValidator(check)


Label = Annotated[str, _v(matching(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", "be a DNS label (a-z, 0-9, '-', at most 63)"))]  # fmt: skip # noqa: E501
Count = Annotated[int, _v(integer(1, MAX_TASKS))]
InstanceType = Annotated[str, _v(matching(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$", "be an EC2 instance type such as m5.large"))]  # fmt: skip # noqa: E501
Sha256 = Annotated[str | None, _v(_sha256)]
Region = Annotated[str | None, _v(matching(r"^[a-z]{2}(-[a-z]+)+-[0-9]+$", "look like us-east-1"))]
_STRICT = ConfigDict(extra="forbid", frozen=True)


def _id(prefix: str) -> Any:
    check = matching(rf"^{prefix}-[0-9a-f]{{8,17}}$", f"look like {prefix}-0abc...")
    return Annotated[str | None, _v(check)]


class _InstanceTypes(BaseModel):
    model_config = _STRICT
    control: InstanceType = DEFAULT_INSTANCE_TYPES["control"]
    chief: InstanceType = DEFAULT_INSTANCE_TYPES["chief"]
    ps: InstanceType = DEFAULT_INSTANCE_TYPES["ps"]
    worker: InstanceType = DEFAULT_INSTANCE_TYPES["worker"]


class _Artifact(BaseModel):
    model_config = _STRICT
    url: Annotated[str | None, _v(_artifact_url)] = None
    sha256: Sha256 = None


class _Artifacts(BaseModel):
    model_config = _STRICT
    coredns: _Artifact = _Artifact()
    etcd: _Artifact = _Artifact()


#: ``layout``: any `Layout` field, each checked by the type the field declares.
_Layout = create_model(  # type: ignore[call-overload]
    "_Layout",
    __config__=_STRICT,
    **{name: (hint, None) for name, hint in get_type_hints(Layout, include_extras=True).items()},
)


class _File(BaseModel):
    """The schema: the file's keys (see the module docstring), each with its check."""

    model_config = _STRICT
    cluster: Label
    region: Region = None
    zone: Annotated[str, _v(_zone)] = "tensorflow.local"
    allow_public_zone: Boolean = False
    chief: Annotated[int, _v(integer(0, 1))] = 1
    ps: Count = 1
    workers: Count = 2
    instance_types: _InstanceTypes = _InstanceTypes()
    ami: _id("ami") = None  # type: ignore[valid-type]
    subnet_id: _id("subnet") = None  # type: ignore[valid-type]
    vpc_id: _id("vpc") = None  # type: ignore[valid-type]
    key_name: Annotated[str | None, _v(lambda v: one_line(v, "the name of an EC2 key pair"))] = None
    ssh_cidr: Annotated[str | None, _v(_cidr)] = None
    spot_workers: Boolean = False
    etcd: Annotated[tuple[str, ...], _v(_etcd)] = ()
    artifacts: _Artifacts = _Artifacts()
    agent_package: Annotated[str, _v(lambda v: one_line(v, "a pip requirement"))] = "tfcluster[tf]"
    tf_port: Port = 2222
    lease_ttl: Annotated[int, _v(integer(2, 3600))] = 10
    record_ttl: Annotated[int, _v(integer(1, 3600))] = 5
    program: Annotated[tuple[str, ...] | None, _v(_program)] = None
    max_instances: Annotated[int, _v(integer(1, 4 * MAX_TASKS))] = 16
    max_lifetime: Annotated[int | None, _v(checks.duration)] = None
    layout: _Layout = _Layout()  # type: ignore[valid-type]

    @after_fields(mode="after")
    def _together(self) -> _File:
        if self.program is not None and self.chief == 0:
            raise ValueError("program: runs on the chief, but chief is 0")
        if self.subnet_id is not None and self.vpc_id is not None:
            raise ValueError("vpc_id: give subnet_id or vpc_id, not both (a subnet has one VPC)")
        if not self.allow_public_zone and not self.zone.endswith(
            tuple(f".{suffix}" for suffix in PRIVATE_ZONES)
        ):
            raise ValueError(
                f"zone: {self.zone} is not under a private-use suffix "
                f"({', '.join(PRIVATE_ZONES)}); set allow_public_zone: true to use it anyway"
            )
        return self


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
    external etcd endpoints); ``max_lifetime`` is in seconds.
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
    layout: Mapping[str, str | int | bool] = field(default_factory=lambda: MappingProxyType({}))
    max_instances: int = 16
    max_lifetime: int | None = None

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
    raw = _without_nulls(_read_yaml(path) if path is not None else {})
    given = {key: value for key, value in overrides.items() if value is not None}
    for key, value in given.items():
        _set_dotted(raw, key, _without_nulls(value))
    for name in DEFAULT_ARTIFACT_URLS:
        # A new url never inherits the checksum of the file's download.
        if f"artifacts.{name}.url" in given and f"artifacts.{name}.sha256" not in given:
            raw["artifacts"][name].pop("sha256", None)
    try:
        return _build(_File.model_validate(raw))
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


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
            problem = getattr(exc, "problem", None) or "not valid YAML"
            raise ConfigError(
                f"{key.strip()}: cannot read {value!r} as YAML ({problem}); quote it"
            ) from None
    return overrides


def config_warnings(config: ClusterConfig) -> list[str]:
    """What the config allows but is probably a mistake, one line each."""
    found = []
    if config.ssh_cidr is not None and ipaddress.ip_network(config.ssh_cidr).prefixlen == 0:
        found.append(f"ssh_cidr: {config.ssh_cidr} lets every address on the internet try ssh")
    if config.record_ttl > config.lease_ttl:
        found.append(
            f"record_ttl: {config.record_ttl} s is longer than lease_ttl ({config.lease_ttl} s): "
            "resolvers keep a dead instance's address after its name is gone"
        )
    layout = dataclasses.replace(DEFAULT_LAYOUT, **config.layout)
    taken = {
        22: "ssh", 53: "DNS", 80: "the metadata service",
        layout.dns_port: "CoreDNS (layout.dns_port)",
        int(layout.health_addr.rpartition(":")[2]): "CoreDNS health (layout.health_addr)",
        int(layout.ready_addr.rpartition(":")[2]): "CoreDNS ready (layout.ready_addr)",
        layout.etcd_client_port: "etcd clients (layout.etcd_client_port)",
        layout.etcd_peer_port: "etcd peers (layout.etcd_peer_port)",
    }  # fmt: skip
    if config.tf_port in taken:
        found.append(f"tf_port: {config.tf_port} is already used by {taken[config.tf_port]}")
    return found


def etcd_endpoint(key: str, value: Any) -> str:
    """Check one etcd client URL (``http://10.0.0.5:2379``); ``key`` names it in errors."""
    try:
        return server_url(value, "an etcd endpoint", port=True)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config: {path} is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"config: {path} is not valid YAML: {detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of keys, got {_kind(data)}")
    return data


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def _submodel(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    kind = model.model_fields[key].annotation
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def _unknown(model: type[BaseModel], key: str) -> str:
    known = list(model.model_fields)
    close = difflib.get_close_matches(key, known, n=1)
    return f"unknown key (did you mean {close[0]!r}?)" if close else f"unknown key (known: {', '.join(known)})"  # fmt: skip # noqa: E501


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node, prefix = raw, ""
    model: type[BaseModel] = _File
    for part in parents:
        if part not in model.model_fields:
            raise ConfigError(f"{prefix}{part}: {_unknown(model, part)}")
        sub = _submodel(model, part)
        if sub is None:
            raise ConfigError(f"{prefix}{part}: has no sub-keys (in override {dotted!r})")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node, model, prefix = node[part], sub, f"{prefix}{part}."
    node[leaf] = value


def _one_line(error: ValidationError) -> str:
    """The first error, as ``dotted.key: what is wrong``."""
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    if first["type"] == "value_error":
        message = str(first["ctx"]["error"])
    elif first["type"] == "extra_forbidden":
        model: type[BaseModel] = _File
        for part in loc[:-1]:
            model = _submodel(model, part) or model
        message = _unknown(model, loc[-1])
    elif first["type"] == "missing":
        message = "required"
    elif first["type"] in ("model_type", "model_attributes_type", "dict_type"):
        message = f"must be a mapping, got {_kind(first['input'])}"
    else:
        message = f"{first['msg']}, got {first['input']!r}"
    return f"{'.'.join(loc)}: {message}" if loc else message


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _build(file: _File) -> ClusterConfig:
    names = ("coredns", "etcd") if not file.etcd else ("coredns",)
    artifacts = {}
    for name in names:
        given: _Artifact = getattr(file.artifacts, name)
        url = given.url or DEFAULT_ARTIFACT_URLS[name]
        if given.sha256 is None:
            why = "when the url is set" if given.url else f"to install {url}"
            raise ConfigError(
                f"artifacts.{name}.sha256 is required {why} (the release's published SHA-256)"
            )
        artifacts[name] = Artifact(url=url, sha256=given.sha256)
    own = {"instance_types", "artifacts", "layout"}
    same = [f.name for f in dataclasses.fields(ClusterConfig) if f.name in _File.model_fields]
    return ClusterConfig(
        **{name: getattr(file, name) for name in same if name not in own},
        instance_types=MappingProxyType(file.instance_types.model_dump()),
        etcd_endpoints=file.etcd,
        artifacts=MappingProxyType(artifacts),
        layout=MappingProxyType(cast(BaseModel, file.layout).model_dump(exclude_unset=True)),
    )
