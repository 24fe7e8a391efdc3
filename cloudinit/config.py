"""The cluster config (``tfcluster.yaml``): read, override, validate, freeze.

Everything is checked here, before the first API call, so that a typo costs
a one-line error instead of half a cluster. The schema is a pydantic model
that mirrors the file (`schema.ConfigFile`); each value is checked for the
place it lands (`checks`). Each failure is a ``ConfigError`` whose message starts
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
    ami: null                        # every role's image; null: chosen per instance type
                                     #   (cloud/ec2_images.py): Ubuntu 24.04 LTS for CPU
                                     #   types (amd64 or arm64), the AWS Deep Learning
                                     #   AMI for GPU types, the Neuron DLAMI for trn/inf
    roles:                           # per-role overrides, each key optional:
      worker: {instance_type: g5.xlarge, ami: null, disk_gb: 120}
                                     #   instance_type: instead of instance_types.<role>
                                     #     (give it in one place); ami: instead of ami;
                                     #   disk_gb: root volume, 8..16384 (default 16 for
                                     #     control, 30 for CPU tasks, 120 for GPU tasks,
                                     #     never below the image's own snapshot)
    subnet_id: null                  # at most one of subnet_id and vpc_id;
    vpc_id: null                     #   neither: the default VPC
    key_name: null                   # EC2 key pair for ssh
    ssh_cidr: null                   # e.g. 203.0.113.7/32; null: no ssh ingress at all
    spot_workers: false
    etcd: control-node               # or a list of existing client URLs
    artifacts:                       # optional overrides, for users who mirror the binaries:
      coredns: {url: ..., sha256: ...}   #   each given one is downloaded by the instance and
      etcd: {url: ..., sha256: ...}      #   checked; the others are staged in the cluster
                                     #   bucket (etcd's archive carries etcdctl too)
    url_expiry: 6h                   # lifetime of the bucket's presigned URLs (10m..7d): the
                                     #   binaries' GETs and the agents' report and output POSTs
    download_binaries: false         # true: fetch missing static binaries from the pinned
                                     #   releases on this machine (checked) before staging
    tf_port: 2222
    lease_ttl: 10                    # seconds an instance's names outlive it
    record_ttl: 5                    # DNS TTL of each record
    program: null                    # chief only: the training command, e.g. "python3 train.py";
                                     #   runs with the agent venv's bin first on PATH
    program_dir: null                # chief only: a folder here (relative: to the current
                                     #   one), staged as a bundle (.tfclusterignore honoured,
                                     #   64 MiB compressed at most) and unpacked on the chief
                                     #   as the program's working directory
    max_instances: 16                # up asks for confirmation above this many instances
    on_chief_exit: keep              # down: once the chief's program has exited and its outputs
                                     #   are uploaded, every instance shuts down (the bucket stays
                                     #   for `tfcluster fetch`); needs program
    preload_tensorflow: true         # ps and workers import TensorFlow while their barrier
                                     #   waits and start their server the moment it passes;
                                     #   false: import after the barrier (one process less
                                     #   while waiting)
    output_interval: 15m             # the chief uploads its output folder this often while its
                                     #   program runs (10m..1d), and once more when it exits
    max_lifetime: null               # e.g. 12h, 90m, 2d, 1d12h (10m..30d): every instance shuts
                                     #   itself down (and so terminates) after that long
    layout: {}                       # where things go on an instance: fields of
                                     #   layout.Layout, e.g. {dns_port: 53}; the
                                     #   local cloud sets it, EC2 needs none

Overrides (the command line's ``--set``) use the same keys, dotted for nested
ones: ``workers``, ``instance_types.worker``, ``roles.worker.disk_gb``,
``artifacts.coredns.sha256``.
They are applied on top of the file before validation, so an override is
checked exactly like the file would be. `config_warnings` lists what is
allowed but probably wrong (ssh open to the world, a TF port taken).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from pydantic import ValidationError

from tfcluster.cloudinit.checks import CONTROL_NODE as CONTROL_NODE
from tfcluster.cloudinit.checks import server_url
from tfcluster.cloudinit.render.layout import DEFAULT_LAYOUT
from tfcluster.cloudinit.schema import DEFAULT_INSTANCE_TYPES as DEFAULT_INSTANCE_TYPES
from tfcluster.cloudinit.schema import MAX_TASKS as MAX_TASKS
from tfcluster.cloudinit.schema import PRIVATE_ZONES as PRIVATE_ZONES
from tfcluster.cloudinit.schema import ConfigError as ConfigError
from tfcluster.cloudinit.schema import ConfigFile, error_line, kind, set_dotted
from tfcluster.discovery.records import ROLES

#: The pinned releases, for an override that gives only a SHA-256. Their
#: checksums cannot ship here unverified, and a download without a checksum
#: is not installed, so such an override names the SHA-256 (published next
#: to each release asset). Without an override the binary is staged instead.
DEFAULT_ARTIFACT_URLS = {
    "coredns": "https://github.com/coredns/coredns/releases/download/v1.14.7/"
    "coredns_1.14.7_linux_amd64.tgz",
    "etcd": "https://github.com/etcd-io/etcd/releases/download/v3.7.3/"
    "etcd-v3.7.3-linux-amd64.tar.gz",
}

#: Instance roles: ``control`` runs etcd, the others are TensorFlow tasks.
INSTANCE_ROLES = ("control", *ROLES)


@dataclass(frozen=True)
class Artifact:
    """A download that is installed only if its SHA-256 matches."""

    url: str
    sha256: str


@dataclass(frozen=True)
class ClusterConfig:
    """A validated cluster config; see the module docstring for each key.

    ``instance_types`` holds every role's type, ``roles.<role>.instance_type``
    applied; ``amis`` and ``disk_gb`` hold only the roles whose ``roles.<role>``
    gives one (`ami_for`, `disk_for`);
    ``etcd_endpoints`` empty means "launch a control node running etcd";
    ``artifacts`` holds only the overrides given that this config uses (no
    ``etcd`` entry with external etcd endpoints): every other binary is
    staged in the cluster bucket; ``max_lifetime`` and ``url_expiry`` are in
    seconds.
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
    tf_port: int
    lease_ttl: int
    record_ttl: int
    program: tuple[str, ...] | None
    program_dir: str | None = None
    layout: Mapping[str, str | int | bool] = field(default_factory=lambda: MappingProxyType({}))
    max_instances: int = 16
    max_lifetime: int | None = None
    url_expiry: int = 6 * 3600
    download_binaries: bool = False
    on_chief_exit: str = "keep"
    preload_tensorflow: bool = True
    output_interval: int = 15 * 60
    amis: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    disk_gb: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

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

    def ami_for(self, role: str) -> str | None:
        """The role's own ``ami``, else the config's; None: chosen by instance type."""
        return self.amis.get(role, self.ami)

    def disk_for(self, role: str) -> int | None:
        """The role's ``disk_gb``; None: the default for its instance type."""
        return self.disk_gb.get(role)


def load_cluster_config(path: Path | None, overrides: Mapping[str, Any]) -> ClusterConfig:
    """Read ``path`` (None: no file), apply ``overrides`` (dotted keys; a None
    value means "not given" and is skipped), validate everything."""
    raw = _without_nulls(_read_yaml(path) if path is not None else {})
    given = {key: value for key, value in overrides.items() if value is not None}
    for key, value in given.items():
        set_dotted(raw, key, _without_nulls(value))
    for name in DEFAULT_ARTIFACT_URLS:
        # A new url never inherits the checksum of the file's download.
        if f"artifacts.{name}.url" in given and f"artifacts.{name}.sha256" not in given:
            raw["artifacts"][name].pop("sha256", None)
    try:
        return _build(ConfigFile.model_validate(raw))
    except ValidationError as exc:
        raise ConfigError(error_line(exc)) from None


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
        raise ConfigError(f"config: {path} must hold a mapping of keys, got {kind(data)}")
    return data


def _build(file: ConfigFile) -> ClusterConfig:
    names = ("coredns", "etcd") if not file.etcd else ("coredns",)
    artifacts = {}
    for name in names:
        given = getattr(file.artifacts, name)
        if given.url is None and given.sha256 is None:
            continue  # staged in the cluster bucket by `up`
        url = given.url or DEFAULT_ARTIFACT_URLS[name]
        if given.sha256 is None:
            why = "when the url is set" if given.url else f"to install {url}"
            raise ConfigError(
                f"artifacts.{name}.sha256 is required {why} (the release's published SHA-256)"
            )
        artifacts[name] = Artifact(url=url, sha256=given.sha256)
    own = {"instance_types", "artifacts", "layout"}
    roles = file.roles.model_dump()
    types = file.instance_types.model_dump()
    types |= {r: v["instance_type"] for r, v in roles.items() if v["instance_type"] is not None}
    same = [f.name for f in dataclasses.fields(ClusterConfig) if f.name in ConfigFile.model_fields]
    return ClusterConfig(
        **{name: getattr(file, name) for name in same if name not in own},
        instance_types=MappingProxyType(types),
        amis=MappingProxyType({r: v["ami"] for r, v in roles.items() if v["ami"] is not None}),
        disk_gb=MappingProxyType(
            {r: v["disk_gb"] for r, v in roles.items() if v["disk_gb"] is not None}
        ),
        etcd_endpoints=file.etcd,
        artifacts=MappingProxyType(artifacts),
        layout=MappingProxyType(file.layout.model_dump(exclude_unset=True)),
    )


def _without_nulls(value: Any) -> Any:
    """``null`` means the default: drop it (and make every key a string)."""
    if isinstance(value, dict):
        return {str(k): _without_nulls(v) for k, v in value.items() if v is not None}
    return value
