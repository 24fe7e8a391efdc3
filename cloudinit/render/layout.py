"""Where things go on an instance and which commands its user-data calls.

The defaults are an EC2 instance's; the config's ``layout`` key overrides
fields (the local cloud gives each simulated instance its own directories,
IMDS emulator and service manager). Each field's type says where its value
lands and is checked for it (`checks`, through the config's schema): paths
and commands are one token in a unit file and the script, addresses are
parsed, ports are in range.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import PlainValidator

from tfcluster.cloudinit.checks import (
    AbsPath,
    Boolean,
    Command,
    HostPort,
    IPv4,
    Port,
    User,
    host_port,
    ipv4,
    one_of,
    path,
    server_url,
)

ETCD_CLIENT_PORT = 2379


def _imds(value: Any) -> str:
    return server_url(value, "the metadata service", port=False)


def _site_packages(value: Any) -> str:
    return "" if value == "" else path(value)


def _forward(value: Any) -> str:
    """An upstream for CoreDNS's ``forward``: an IPv4 address, ``IPv4:PORT``, or empty."""
    if value == "":
        return ""
    try:
        return ipv4(value)
    except ValueError:
        pass
    try:
        address = host_port(value)
        ipv4(address.rpartition(":")[0])
    except ValueError:
        raise ValueError(
            f"must be an IPv4 address or IPv4:PORT (or empty), got {value!r}"
        ) from None
    return address


ImdsUrl = Annotated[str, PlainValidator(_imds)]
SitePackages = Annotated[str, PlainValidator(_site_packages)]
Forward = Annotated[str, PlainValidator(_forward)]
AddressMode = Annotated[str, PlainValidator(one_of("names", "ips"))]


@dataclass(frozen=True)
class Layout:
    """Where things go on an instance; see the module docstring."""

    install_dir: AbsPath = "/opt/tfcluster"
    config_dir: AbsPath = "/etc/tfcluster"
    state_dir: AbsPath = "/var/lib/tfcluster"
    unit_dir: AbsPath = "/etc/systemd/system"
    resolved_dropin: AbsPath = "/etc/systemd/resolved.conf.d/tfcluster.conf"
    nsswitch: AbsPath = "/etc/nsswitch.conf"
    imds_endpoint: ImdsUrl = "http://169.254.169.254"
    tf_config_path: AbsPath = "/run/tfcluster/tf_config.json"
    service_user: User = "tfcluster"
    python: Command = "python3"
    systemctl: Command = "systemctl"
    shutdown_command: Command = "shutdown"
    """What the script calls to schedule ``max_lifetime``'s shutdown (``-P +MINUTES``)
    and the agent runs for ``on_chief_exit: down`` (``-P now``)."""
    sudoers_dir: AbsPath = "/etc/sudoers.d"
    shutdown_sudo: Boolean = True
    """The agent runs as ``service_user``, which may not power off: with
    ``on_chief_exit: down`` the script lets it run ``shutdown -P now`` (and
    nothing else) through sudo. False where the shutdown command needs no
    privilege (the local cloud's stand-in)."""
    dns_bind: IPv4 = "127.0.0.1"
    dns_port: Port = 5353
    dns_forward: Forward = "169.254.169.253"
    """Where CoreDNS sends every name outside the zone: the VPC's Route 53 Resolver
    (also at the VPC's base address + 2). systemd-resolved asks a global DNS=
    server for every name that no routing domain claims, so CoreDNS answers
    those by forwarding rather than with REFUSED. Empty: no forwarding (the
    local cloud, whose instances must not send anything off this machine)."""
    health_addr: HostPort = "127.0.0.1:8080"
    ready_addr: HostPort = "127.0.0.1:8181"
    etcd_client_port: Port = ETCD_CLIENT_PORT
    etcd_peer_port: Port = 2380
    image_site_packages: SitePackages = ""
    """The local cloud's image adapter, empty on EC2. A Deep Learning AMI has
    TensorFlow in its system Python, which the agent's venv sees through
    ``--system-site-packages``; the local "image" has it in another folder
    (the operator's virtualenv), which the script then names in a ``.pth``
    file of the new venv, and pip installs with ``--no-index``: everything
    the wheel needs is already there, and nothing is downloaded."""
    etcd_listen_host: IPv4 = "0.0.0.0"
    """etcd's client address: every interface on EC2; the control node's own locally."""
    distinct_ports: Boolean = False
    """One TF port per task: every task shares one host (the local cloud's loopback mode)."""
    check_system_resolver: Boolean = True
    """False where getaddrinfo cannot reach CoreDNS (loopback mode: no resolv.conf of its own)."""
    tf_config_addresses: AddressMode = "names"
    """``ips`` where TensorFlow's getaddrinfo cannot resolve the zone (loopback mode)."""

    @property
    def bin_dir(self) -> str:
        return f"{self.install_dir}/bin"

    @property
    def venv_dir(self) -> str:
        """The agent's venv, created by the user-data on the image's python3."""
        return f"{self.install_dir}/venv"

    @property
    def dist_dir(self) -> str:
        """Where the user-data keeps the fetched wheel and constraints."""
        return f"{self.install_dir}/dist"

    @property
    def program_dir(self) -> str:
        """Where the chief unpacks the program bundle: the program's working directory."""
        return f"{self.install_dir}/program"

    @property
    def output_dir(self) -> str:
        """The chief program's TFCLUSTER_OUTPUT_DIR, which its agent uploads."""
        return f"{self.state_dir}/output"

    @property
    def agent_config(self) -> str:
        return f"{self.config_dir}/agent.json"


DEFAULT_LAYOUT = Layout()


def control_endpoint(private_ip: str, layout: Layout = DEFAULT_LAYOUT) -> str:
    """The etcd client URL of a control node launched with this user-data."""
    address = ipaddress.ip_address(private_ip)
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{host}:{layout.etcd_client_port}"
