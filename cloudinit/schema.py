"""The schema of ``tfcluster.yaml``: a pydantic model that mirrors the file.

Each key has a type that checks its value for the place it lands (`checks`,
and the `Layout` fields' own types); ``extra="forbid"`` makes an unknown key
an error. `error_line` turns pydantic's first error into the project's one
line, dotted key first; `set_dotted` applies an override (``a.b=value``)
where the schema says the key lives. `config.py` documents every key.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, get_type_hints

from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError, create_model
from pydantic import model_validator as after_fields

from tfcluster.cloudinit import checks
from tfcluster.cloudinit.checks import Boolean, Port, integer, matching, one_line
from tfcluster.cloudinit.render.layout import Layout

DEFAULT_INSTANCE_TYPES = {
    "control": "t3.small",
    "chief": "m5.large",
    "ps": "m5.large",
    "worker": "m5.large",
}
MAX_TASKS = 1000
"""Per role: far above what an account may launch, far below what exhausts memory."""
MIN_DISK_GB = 8
MAX_DISK_GB = 16384
"""A root volume: the smallest Ubuntu image's own size; gp3's largest volume (16 TiB)."""

#: Zone suffixes reserved for private use: mDNS (RFC 6762, whose appendix G
#: also names lan, home, corp, private, intranet), ICANN's .internal, RFC
#: 8375's home.arpa and RFC 2606's test, example and invalid. Names under
#: them never collide with a public DNS name that the instances also need.
PRIVATE_ZONES = (
    "local", "internal", "home.arpa", "test", "example", "invalid",
    "lan", "home", "corp", "private", "intranet",
)  # fmt: skip


class ConfigError(ValueError):
    """The cluster config is invalid; the message names the key."""


def _aws_id(prefix: str) -> PlainValidator:
    return PlainValidator(matching(f"{prefix}-[0-9a-f]{{8,17}}", f"look like {prefix}-0abc..."))


def _one_line(what: str) -> PlainValidator:
    return PlainValidator(lambda value: one_line(value, what))


def _upload_interval(value: Any) -> int:
    """A `checks.duration` of at most a day (the agent uploads at least daily)."""
    seconds = checks.duration(value)
    if seconds > 86400:
        raise ValueError(f"must be at most 1d, got {value!r}")
    return seconds


_label = checks.cluster_name
_instance_type = matching(r"[a-z][a-z0-9-]*\.[a-z0-9]+", "be an EC2 instance type such as m5.large")
Label = Annotated[str, PlainValidator(_label)]
Region = Annotated[
    str | None, PlainValidator(matching("[a-z]{2}(-[a-z]+)+-[0-9]+", "look like us-east-1"))
]
Count = Annotated[int, PlainValidator(integer(1, MAX_TASKS))]
InstanceType = Annotated[str, PlainValidator(_instance_type)]
_STRICT = ConfigDict(extra="forbid", frozen=True)


class InstanceTypes(BaseModel):
    model_config = _STRICT
    control: InstanceType = DEFAULT_INSTANCE_TYPES["control"]
    chief: InstanceType = DEFAULT_INSTANCE_TYPES["chief"]
    ps: InstanceType = DEFAULT_INSTANCE_TYPES["ps"]
    worker: InstanceType = DEFAULT_INSTANCE_TYPES["worker"]


class RoleSettings(BaseModel):
    """``roles.<role>``: what differs for one role's instances."""

    model_config = _STRICT
    instance_type: InstanceType | None = None
    ami: Annotated[str | None, _aws_id("ami")] = None
    disk_gb: Annotated[int | None, PlainValidator(integer(MIN_DISK_GB, MAX_DISK_GB))] = None


class Roles(BaseModel):
    model_config = _STRICT
    control: RoleSettings = RoleSettings()
    chief: RoleSettings = RoleSettings()
    ps: RoleSettings = RoleSettings()
    worker: RoleSettings = RoleSettings()


class ArtifactFields(BaseModel):
    model_config = _STRICT
    url: Annotated[str | None, PlainValidator(checks.artifact_url)] = None
    sha256: Annotated[str | None, PlainValidator(checks.sha256)] = None


class Artifacts(BaseModel):
    model_config = _STRICT
    coredns: ArtifactFields = ArtifactFields()
    etcd: ArtifactFields = ArtifactFields()


#: ``layout``: any `Layout` field, each checked by the type the field declares.
LayoutFields: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "LayoutFields",
    __config__=_STRICT,
    **{name: (hint, None) for name, hint in get_type_hints(Layout, include_extras=True).items()},
)


class ConfigFile(BaseModel):
    """The file's keys, each with its default and its check."""

    model_config = _STRICT
    cluster: Label
    region: Region = None
    zone: Annotated[str, PlainValidator(checks.zone)] = "tensorflow.local"
    allow_public_zone: Boolean = False
    chief: Annotated[int, PlainValidator(integer(0, 1))] = 1
    ps: Count = 1
    workers: Count = 2
    instance_types: InstanceTypes = InstanceTypes()
    ami: Annotated[str | None, _aws_id("ami")] = None
    roles: Roles = Roles()
    subnet_id: Annotated[str | None, _aws_id("subnet")] = None
    vpc_id: Annotated[str | None, _aws_id("vpc")] = None
    key_name: Annotated[str | None, _one_line("the name of an EC2 key pair")] = None
    ssh_cidr: Annotated[str | None, PlainValidator(checks.cidr)] = None
    spot_workers: Boolean = False
    etcd: Annotated[tuple[str, ...], PlainValidator(checks.etcd)] = ()
    artifacts: Artifacts = Artifacts()
    tf_port: Port = 2222
    lease_ttl: Annotated[int, PlainValidator(integer(2, 3600))] = 10
    record_ttl: Annotated[int, PlainValidator(integer(1, 3600))] = 5
    program: Annotated[tuple[str, ...] | None, PlainValidator(checks.program)] = None
    program_dir: Annotated[str | None, PlainValidator(checks.program_dir)] = None
    max_instances: Annotated[int, PlainValidator(integer(1, 4 * MAX_TASKS))] = 16
    max_lifetime: Annotated[int | None, PlainValidator(checks.duration)] = None
    url_expiry: Annotated[int, PlainValidator(checks.url_expiry)] = 6 * 3600
    download_binaries: Boolean = False
    preload_tensorflow: Boolean = True
    on_chief_exit: Annotated[str, PlainValidator(checks.one_of("keep", "down"))] = "keep"
    output_interval: Annotated[int, PlainValidator(_upload_interval)] = 15 * 60
    layout: LayoutFields = LayoutFields()  # type: ignore[valid-type]  # a model made at import

    @after_fields(mode="after")
    def _together(self) -> ConfigFile:
        if self.program is not None and self.chief == 0:
            raise ValueError("program: runs on the chief, but chief is 0")
        if self.program_dir is not None and self.chief == 0:
            raise ValueError("program_dir: is unpacked on the chief, but chief is 0")
        if self.on_chief_exit == "down" and self.program is None:
            raise ValueError("on_chief_exit: down needs a program (else the chief never exits)")
        for role in Roles.model_fields:
            own = getattr(self.roles, role).instance_type
            if own is not None and role in self.instance_types.model_fields_set:
                raise ValueError(
                    f"roles.{role}.instance_type: instance_types.{role} sets it too; give one"
                )
        if self.subnet_id is not None and self.vpc_id is not None:
            raise ValueError("vpc_id: give subnet_id or vpc_id, not both (a subnet has one VPC)")
        if not self.allow_public_zone and not self.zone.endswith(
            tuple(f".{suffix}" for suffix in PRIVATE_ZONES)
        ):
            raise ValueError(
                f"zone: {self.zone!r} is not under a private-use suffix "
                f"({', '.join(PRIVATE_ZONES)}); set allow_public_zone: true to use it anyway"
            )
        return self


def _submodel(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    kind = model.model_fields[key].annotation
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def _unknown(model: type[BaseModel], key: str) -> str:
    known = list(model.model_fields)
    close = difflib.get_close_matches(key, known, n=1)
    return f"unknown key (did you mean {close[0]!r}?)" if close else f"unknown key (known: {', '.join(known)})"  # fmt: skip # noqa: E501


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """``raw[a][b] = value`` for ``a.b``; an unknown parent key or a leaf's sub-key is an error."""
    *parents, leaf = dotted.split(".")
    node, prefix = raw, ""
    model: type[BaseModel] = ConfigFile
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


def kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def error_line(error: ValidationError) -> str:
    """The first error, as ``dotted.key: what is wrong``."""
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    if first["type"] == "value_error":
        message = str(first["ctx"]["error"])
    elif first["type"] == "extra_forbidden":
        model: type[BaseModel] = ConfigFile
        for part in loc[:-1]:
            model = _submodel(model, part) or model
        message = _unknown(model, loc[-1])
    elif first["type"] == "missing":
        message = "required"
    elif first["type"] in ("model_type", "model_attributes_type", "dict_type"):
        message = f"must be a mapping, got {kind(first['input'])}"
    else:
        message = f"{first['msg']}, got {first['input']!r}"
    return f"{'.'.join(loc)}: {message}" if loc else message
