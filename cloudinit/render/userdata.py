"""What an instance receives as user-data: a MIME multipart of a small
cloud-config (packages) and one bash script (templates/user-data.sh.j2) that
does everything else, so the local cloud can run the same script alone.

What the script installs comes from the cluster bucket by presigned URL,
each checked against the SHA-256 that `up` computed: the binaries, and on
every task the agent's wheel with its constraints (installed into a venv
that sees the image's own packages), and on the chief the program bundle.

Every file the script writes is rendered here, on the operator's side, and
embedded in the script; the only value the instance adds itself is the
control node's private address, which etcd advertises.

The resolver: systemd-resolved sends names under the zone to the local
CoreDNS (the routing domain ``~zone`` in its drop-in). Its DNS= there is a
global server, and resolved asks the global server for every name that no
routing domain claims as well (systemd-resolved.service(8), "Protocols and
routing"), so the Corefile has a ``.`` block that forwards those names to
the VPC resolver (``layout.dns_forward``) instead of answering REFUSED.

EC2 limits user-data to 16384 bytes before base64. Above that the multipart
is gzip-compressed (cloud-init detects gzip); above that again it is an error.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from email.message import EmailMessage
from email.policy import default as default_policy
from typing import Any
from urllib.parse import urlsplit

from tfcluster.cloudinit.config import INSTANCE_ROLES, Artifact, ClusterConfig, etcd_endpoint
from tfcluster.cloudinit.render.corefile import CorefileSettings, render_corefile
from tfcluster.cloudinit.render.layout import DEFAULT_LAYOUT, Layout
from tfcluster.cloudinit.render.templating import render
from tfcluster.cloudinit.stage.manifest import ManifestError, check_filename

log = logging.getLogger(__name__)

USER_DATA_LIMIT = 16384
_EOF = "TFCLUSTER_EOF"


class RenderError(ValueError):
    """The requested user-data cannot be rendered (role, index, endpoints)."""


class UserDataTooLarge(RenderError):
    """Even gzip-compressed, the user-data exceeds EC2's 16384 bytes."""


def layout_of(config: ClusterConfig) -> Layout:
    """The instances' layout: EC2's defaults with the config's ``layout`` overrides."""
    return replace(DEFAULT_LAYOUT, **config.layout)


@dataclass(frozen=True)
class Part:
    """One part of the multipart: what ``tfcluster render`` shows."""

    filename: str
    content_type: str
    content: str


@dataclass(frozen=True)
class Download:
    """One file the script fetches and checks: the executables ``names`` come from it.

    ``var`` names its shell variables (``<var>_url``, ``<var>_sha256``).
    """

    var: str
    url: str
    sha256: str
    names: tuple[str, ...]


#: What each role installs: per config override, the executables its download holds.
_BINARIES = {"coredns": ("coredns",), "etcd": ("etcd", "etcdctl")}


def downloads(
    config: ClusterConfig, role: str, staged: Mapping[str, Artifact] | None = None
) -> list[Download]:
    """The binaries one role installs, each as a download the script checks.

    An ``artifacts`` override of the config is one download (an etcd release
    archive carries etcd and etcdctl); otherwise each executable is its own
    staged file, ``staged[name]`` (a presigned URL and the SHA-256 that ``up``
    computed). A binary with neither is a `RenderError`.
    """
    wanted = ["coredns", "etcd"] if role == "control" else ["coredns"]
    out: list[Download] = []
    for artifact in wanted:
        override = config.artifacts.get(artifact)
        if override is not None:
            out.append(Download(artifact, override.url, override.sha256, _BINARIES[artifact]))
            continue
        for name in _BINARIES[artifact]:
            got = (staged or {}).get(name)
            if got is None:
                raise RenderError(
                    f"artifacts.{artifact}: no override in the config and {name} is not "
                    "staged (`tfcluster up` stages it in the cluster bucket)"
                )
            out.append(Download(name, got.url, got.sha256, (name,)))
    return out


#: What a task fetches besides its binaries: the agent's wheel and its pins (every task)
#: and, on the chief of a config with ``program_dir``, the program bundle.
AGENT_OBJECTS = ("wheel", "constraints")
BUNDLE = "bundle"


def _staged(staged: Mapping[str, Artifact] | None, name: str, why: str) -> Artifact:
    got = (staged or {}).get(name)
    if got is None:
        raise RenderError(f"{name}: not staged ({why}; `tfcluster up` stages it in the bucket)")
    return got


def agent_downloads(
    config: ClusterConfig, role: str, staged: Mapping[str, Artifact] | None = None
) -> list[Download]:
    """What a task fetches and checks besides its binaries (none on the control node).

    The wheel's file name is the last part of its URL's path (the object's
    key ends in it), since pip reads the version and tags from that name.
    """
    if role == "control":
        return []
    out = [
        Download(name, got.url, got.sha256, (_url_filename(got.url),))
        for name in AGENT_OBJECTS
        for got in [_staged(staged, name, "every task installs its agent from it")]
    ]
    if role == "chief" and config.program_dir is not None:
        got = _staged(staged, BUNDLE, "program_dir is set")
        out.append(Download(BUNDLE, got.url, got.sha256, (_url_filename(got.url),)))
    return out


def _url_filename(url: str) -> str:
    """``tfcluster-0.1.0-py3-none-any.whl`` from ``https://host/bucket/objects/<sha>/<it>?...``."""
    name = urlsplit(url).path.rsplit("/", 1)[-1]
    try:
        return check_filename(name)
    except ManifestError as exc:
        raise RenderError(f"{url.split('?')[0]}: {exc}") from None


@dataclass(frozen=True)
class _File:
    path: str
    mode: str
    content: str


def render_user_data(
    config: ClusterConfig,
    role: str,
    index: int | None = None,
    etcd_endpoints: Sequence[str] | None = None,
    layout: Layout | None = None,
    staged: Mapping[str, Artifact] | None = None,
    posts: Mapping[str, Any] | None = None,
) -> bytes:
    """The exact bytes to pass as RunInstances' UserData (before base64).

    ``layout`` defaults to the config's (`layout_of`); ``staged`` maps each
    binary without a config override, the wheel and its constraints and the
    program bundle to a presigned URL and SHA-256 (`downloads`, `agent_downloads`);
    ``posts`` are the agent's presigned POSTs (`agent_config`).
    """
    parts = render_parts(config, role, index, etcd_endpoints, layout, staged, posts)
    plain = _multipart(parts)
    if len(plain) <= USER_DATA_LIMIT:
        return plain
    packed = gzip.compress(plain, mtime=0)
    log.debug("user-data for %s is %d bytes, %d gzip-compressed", role, len(plain), len(packed))
    if len(packed) > USER_DATA_LIMIT:
        raise UserDataTooLarge(
            f"user-data for {role} is {len(packed)} bytes even gzip-compressed "
            f"({len(plain)} plain); EC2 accepts at most {USER_DATA_LIMIT}"
        )
    return packed


def render_parts(
    config: ClusterConfig,
    role: str,
    index: int | None = None,
    etcd_endpoints: Sequence[str] | None = None,
    layout: Layout | None = None,
    staged: Mapping[str, Artifact] | None = None,
    posts: Mapping[str, Any] | None = None,
) -> tuple[Part, ...]:
    """The cloud-config and the script of one instance, readable.

    ``role`` is ``control`` (the etcd node) or a TensorFlow role; ``index`` is
    an explicit task index for a replacement instance (None: the agent uses
    its ami-launch-index). ``etcd_endpoints`` defaults to the config's; with
    ``etcd: control-node`` the task roles need the control node's
    ``control_endpoint(private_ip)`` here.
    """
    _check_role_and_index(config, role, index)
    layout = layout or layout_of(config)
    control = role == "control"
    endpoints = _endpoints(config, role, etcd_endpoints, layout)
    ctx = {"role": role, "cluster": config.cluster, "zone": config.zone}
    packages = ["curl"] if control else ["curl", "python3-venv"]
    files = _files(config, role, index, endpoints, layout, posts)
    installs = downloads(config, role, staged)
    fetched = agent_downloads(config, role, staged)
    services = ("etcd", "coredns") if control else ("coredns", "agent")
    script = render(
        "user-data.sh.j2",
        **ctx,
        control=control,
        bundle=any(d.var == BUNDLE for d in fetched),
        image_site_packages=bool(layout.image_site_packages),
        power_off_by_sudo=_power_off_by_sudo(config, role, layout),
        variables=_script_variables(config, role, layout, [*installs, *fetched]),
        installs=[(d.var, d.names) for d in installs],
        lifetime=_duration(config.max_lifetime),
        files=files,
        eof=_EOF,
        units=[f"tfcluster-{name}.service" for name in services],
    )
    return (
        Part(
            "cloud-config.yaml",
            "text/cloud-config",
            render("cloud-config.yaml.j2", **ctx, packages=packages),
        ),
        Part(f"tfcluster-{role}.sh", "text/x-shellscript", script),
    )


def _check_role_and_index(config: ClusterConfig, role: str, index: int | None) -> None:
    if role not in INSTANCE_ROLES:
        raise RenderError(f"role: must be one of {', '.join(INSTANCE_ROLES)}, got {role!r}")
    if role == "control":
        if not config.control_node:
            raise RenderError("role: control exists only with etcd: control-node")
        if index is not None:
            raise RenderError("index: the control node has no task index")
        return
    count = config.counts[role]
    if count == 0:
        raise RenderError(f"role: this cluster has no {role} (count 0)")
    if index is not None and not 0 <= index < count:
        raise RenderError(f"index: must be 0..{count - 1} for {role}, got {index}")


def _endpoints(
    config: ClusterConfig, role: str, given: Sequence[str] | None, layout: Layout
) -> tuple[str, ...]:
    if role == "control":
        if given:
            raise RenderError("etcd_endpoints: the control node runs etcd itself; give none")
        return (f"http://127.0.0.1:{layout.etcd_client_port}",)
    if given is None:
        given = config.etcd_endpoints
    if not given:
        raise RenderError(
            f"etcd_endpoints: required for {role} with etcd: control-node "
            "(the control node's private address, known once it is launched)"
        )
    try:
        return tuple(etcd_endpoint("etcd_endpoints", url) for url in given)
    except ValueError as exc:
        raise RenderError(str(exc)) from None


def _script_variables(
    config: ClusterConfig, role: str, layout: Layout, installs: Sequence[Download]
) -> list[tuple[str, str]]:
    """The shell variables at the top of the script, quoted; only those the role uses."""
    values: dict[str, Any] = {
        "bin_dir": layout.bin_dir,
        "service_user": layout.service_user,
        "nsswitch": layout.nsswitch,
        "systemctl": layout.systemctl,
    }
    for item in installs:
        values |= {f"{item.var}_url": item.url, f"{item.var}_sha256": item.sha256}
    if role == "control":
        values |= {
            "etcd_env": _etcd_env(layout),
            "etcd_data_dir": _etcd_data_dir(layout),
            "etcd_client_port": layout.etcd_client_port,
            "imds": layout.imds_endpoint,
        }
    else:
        values |= {
            "python": layout.python,
            "venv_dir": layout.venv_dir,
            "dist_dir": layout.dist_dir,
        }
        for item in installs:
            if item.var in (*AGENT_OBJECTS, BUNDLE):
                values[f"{item.var}_file"] = item.names[0]
        if any(item.var == BUNDLE for item in installs):
            values["program_dir"] = layout.program_dir
        if layout.image_site_packages:
            values["image_site_packages"] = layout.image_site_packages
        if role == "chief":
            values["output_dir"] = layout.output_dir
        if _power_off_by_sudo(config, role, layout):
            values |= {"shutdown": layout.shutdown_command, "sudoers_dir": layout.sudoers_dir}
    if config.max_lifetime is not None:
        values |= {
            "shutdown": layout.shutdown_command,
            "lifetime_minutes": -(-config.max_lifetime // 60),
        }
    return [(name, _quote(str(value))) for name, value in values.items()]


def _power_off_by_sudo(config: ClusterConfig, role: str, layout: Layout) -> bool:
    """Whether this task's agent powers its instance off through sudo
    (``on_chief_exit: down`` with a shutdown command that needs root)."""
    return role != "control" and config.on_chief_exit == "down" and layout.shutdown_sudo


def _quote(value: str) -> str:
    """``shlex.quote``, and quotes too around a bare word with ``+`` or ``-``
    (``python+3``, ``python-3``), which shellcheck reads as attempted
    arithmetic (SC2100)."""
    quoted = shlex.quote(value)
    return f"'{value}'" if quoted == value and ("+" in value or "-" in value) else quoted


def _duration(seconds: int | None) -> str:
    """``90m``, ``12h``, ``2d12h`` (``""`` for None): the config's own notation."""
    minutes = -(-(seconds or 0) // 60)
    days, hours, minutes = minutes // 1440, minutes // 60 % 24, minutes % 60
    return "".join(f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n)


def _etcd_env(layout: Layout) -> str:
    return f"{layout.config_dir}/etcd.env"


def _etcd_data_dir(layout: Layout) -> str:
    return f"{layout.state_dir}/etcd"


def _files(
    config: ClusterConfig,
    role: str,
    index: int | None,
    endpoints: tuple[str, ...],
    layout: Layout,
    posts: Mapping[str, Any] | None = None,
) -> list[_File]:
    control = role == "control"
    corefile = f"{layout.config_dir}/Corefile"
    common = {
        "cluster": config.cluster,
        "zone": config.zone,
        "role": role,
        "control": control,
        "bin_dir": layout.bin_dir,
        "dns_bind": layout.dns_bind,
        "dns_port": layout.dns_port,
        "service_user": layout.service_user,
    }
    settings = CorefileSettings(
        cluster=config.cluster,
        zone=config.zone,
        etcd_endpoints=endpoints,
        dns_bind=layout.dns_bind,
        dns_port=layout.dns_port,
        ready_addr=layout.ready_addr,
        health_addr=layout.health_addr,
        record_ttl=config.record_ttl,
        upstreams=(layout.dns_forward,) if layout.dns_forward else (),
    )
    files = [
        _File(corefile, "0644", render_corefile(settings)),
        _File(layout.resolved_dropin, "0644", render("resolved.conf.j2", **common)),
        _File(
            f"{layout.unit_dir}/tfcluster-coredns.service",
            "0644",
            render("tfcluster-coredns.service.j2", **common, corefile=corefile),
        ),
    ]
    if control:
        etcd = {
            "etcd_env": _etcd_env(layout),
            "etcd_data_dir": _etcd_data_dir(layout),
            "etcd_client_port": layout.etcd_client_port,
            "etcd_peer_port": layout.etcd_peer_port,
            "etcd_listen_host": layout.etcd_listen_host,
        }
        files += [
            _File(_etcd_env(layout), "0644", render("etcd.env.j2", **common, **etcd)),
            _File(
                f"{layout.unit_dir}/tfcluster-etcd.service",
                "0644",
                render("tfcluster-etcd.service.j2", **common, **etcd),
            ),
        ]
    else:
        agent = agent_config(config, role, index, endpoints, layout, posts)
        files += [
            _File(layout.agent_config, "0644", json.dumps(agent, indent=2) + "\n"),
            _File(
                f"{layout.unit_dir}/tfcluster-agent.service",
                "0644",
                render(
                    "tfcluster-agent.service.j2",
                    **common,
                    venv_dir=layout.venv_dir,
                    agent_config=layout.agent_config,
                ),
            ),
        ]
    for file in files:
        if _EOF in file.content.splitlines() or not file.content.endswith("\n"):
            raise RenderError(f"{file.path}: cannot be embedded in the script as a here-document")
    return [_File(shlex.quote(file.path), file.mode, file.content) for file in files]


def agent_config(
    config: ClusterConfig,
    role: str,
    index: int | None,
    endpoints: Sequence[str],
    layout: Layout = DEFAULT_LAYOUT,
    posts: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The agent's /etc/tfcluster/agent.json, written through the agent's own schema
    (tfcluster.discovery.agent_config), which reads it back on the instance.

    ``posts`` holds the presigned POSTs ``up`` signed for this launch: the
    agent config values ``report_post`` and (the chief's) ``output_post``."""
    from pathlib import Path

    from tfcluster.discovery.agent_config import (
        AgentConfig,
        dump_agent_config,
        parse_agent_config,
        role_counts,
    )

    data = dump_agent_config(
        AgentConfig(
            cluster=config.cluster,
            zone=config.zone,
            roles=role_counts(config.counts),
            role=role,
            etcd_endpoints=tuple(endpoints),
            index=index,
            tf_port=config.tf_port,
            distinct_ports=layout.distinct_ports,
            dns_server=(layout.dns_bind, layout.dns_port),
            imds_endpoint=layout.imds_endpoint,
            lease_ttl=config.lease_ttl,
            record_ttl=config.record_ttl,
            check_system_resolver=layout.check_system_resolver,
            tf_config_path=Path(layout.tf_config_path),
            tf_config_addresses=layout.tf_config_addresses,
            program=config.program if role == "chief" else None,
            program_dir=(
                Path(layout.program_dir)
                if role == "chief" and config.program_dir is not None
                else None
            ),
            output_dir=Path(layout.output_dir),
            output_interval=config.output_interval,
            on_chief_exit=config.on_chief_exit,
            preload_tensorflow=config.preload_tensorflow,
            # Only what on_chief_exit down runs needs it; the default leaves it out.
            shutdown_command=(
                layout.shutdown_command if config.on_chief_exit == "down" else "shutdown"
            ),
            shutdown_sudo=_power_off_by_sudo(config, role, layout),
        )
    )
    if posts:
        # The signed values go through the agent's own reader: a shape it refuses fails here.
        data = dump_agent_config(parse_agent_config({**data, **posts}))
    return data


def _multipart(parts: Sequence[Part]) -> bytes:
    """A MIME multipart/mixed as cloud-init reads it; byte-for-byte stable for
    the same parts (the boundary is derived from their content)."""
    digest = hashlib.sha256("".join(p.content for p in parts).encode()).hexdigest()[:32]
    message = EmailMessage(policy=default_policy.clone(linesep="\n", max_line_length=0))
    message["MIME-Version"] = "1.0"
    message.make_mixed(boundary=f"==tfcluster-{digest}==")
    for part in parts:
        sub = EmailMessage(policy=message.policy)
        subtype = part.content_type.split("/", 1)[1]
        sub.set_content(part.content, subtype=subtype, cte="8bit")
        sub.add_header("Content-Disposition", "attachment", filename=part.filename)
        message.attach(sub)
    return message.as_bytes()
