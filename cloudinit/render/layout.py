"""Where things go on an instance: paths, ports, the commands the script calls.

A config-level type with no dependency on the config itself, so that the
config can validate ``layout`` overrides against it and the renderer can use
it, without the two importing each other.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

ETCD_CLIENT_PORT = 2379


@dataclass(frozen=True)
class Layout:
    """Where things go on an instance and which commands the script calls.

    The defaults are an EC2 instance's; the local cloud gives each simulated
    instance its own directories, IMDS emulator and service manager command.
    """

    install_dir: str = "/opt/tfcluster"
    config_dir: str = "/etc/tfcluster"
    state_dir: str = "/var/lib/tfcluster"
    unit_dir: str = "/etc/systemd/system"
    resolved_dropin: str = "/etc/systemd/resolved.conf.d/tfcluster.conf"
    nsswitch: str = "/etc/nsswitch.conf"
    imds_endpoint: str = "http://169.254.169.254"
    tf_config_path: str = "/run/tfcluster/tf_config.json"
    service_user: str = "tfcluster"
    python: str = "python3"
    systemctl: str = "systemctl"
    dns_bind: str = "127.0.0.1"
    dns_port: int = 5353
    health_addr: str = "127.0.0.1:8080"
    ready_addr: str = "127.0.0.1:8181"
    etcd_client_port: int = ETCD_CLIENT_PORT
    etcd_peer_port: int = 2380
    agent_venv: str = ""
    """An existing virtualenv that holds the agent; empty: the script creates
    one under ``install_dir`` and pip-installs the config's agent_package."""
    etcd_listen_host: str = "0.0.0.0"
    """etcd's client address: every interface on EC2; the control node's own locally."""
    distinct_ports: bool = False
    """One TF port per task: every task shares one host (the local cloud's loopback mode)."""
    check_system_resolver: bool = True
    """False where getaddrinfo cannot reach CoreDNS (loopback mode: no resolv.conf of its own)."""
    tf_config_addresses: str = "names"
    """``ips`` where TensorFlow's getaddrinfo cannot resolve the zone (loopback mode)."""

    @property
    def bin_dir(self) -> str:
        return f"{self.install_dir}/bin"

    @property
    def venv_dir(self) -> str:
        return self.agent_venv or f"{self.install_dir}/venv"

    @property
    def agent_config(self) -> str:
        return f"{self.config_dir}/agent.json"


DEFAULT_LAYOUT = Layout()


def control_endpoint(private_ip: str, layout: Layout = DEFAULT_LAYOUT) -> str:
    """The etcd client URL of a control node launched with this user-data."""
    address = ipaddress.ip_address(private_ip)
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{host}:{layout.etcd_client_port}"
