"""Boot one local instance the way cloud-init boots an EC2 instance, and stop it.

Each instance has a folder of its own (``instances/<id>/``) holding its
user-data, its IMDS emulator's pid file and log, ``cloud-init-output.log``
(the script's output) and ``fs/``, the instance's file system: every path
of its layout lies there, with the service pid files and logs (servicectl).

netns mode (root), `boot_netns`: every instance of a role receives the same
user-data, whose paths all lie under the cluster's *machine root* (the
config's ``layout``, `machine_layout`). The script runs with bash inside the
instance's network namespace and in a mount namespace where the instance's
``fs/`` is mounted over the machine root: like the identical paths of
identical EC2 machines, they are made distinct by the instance being a
machine of its own. Its IMDS emulator serves at 169.254.169.254:80 inside
the namespace. Nothing of the user-data differs from EC2's but the layout.

loopback mode (no root), `boot_loopback`: every instance shares this
machine's network, so its addresses (CoreDNS on its own 127.77.0.x, its IMDS
emulator's port, etcd's listen address) and paths must differ in the script
itself. The user-data is first checked byte for byte against what the
config renders for the instance, then rendered again with the instance's
own layout (`loopback_layout`) and run.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import MappingProxyType

from tfcluster.cloudinit.cloud.provider import Node
from tfcluster.cloudinit.config import ClusterConfig
from tfcluster.cloudinit.localcloud import daemons, motoserver, network, parts, poweroff, servicectl
from tfcluster.cloudinit.localcloud.localstack import free_port
from tfcluster.cloudinit.render.userdata import render_parts, render_user_data
from tfcluster.discovery.waiting import WaitTimeout, wait_for

IMDS = "imds"
BOOT_TIMEOUT = 120.0
"""Seconds for one instance's user-data script (it copies binaries, starts units)."""
IMDS_TIMEOUT = 20.0
"""Seconds for the IMDS emulator to listen (a Python start-up)."""
SCRIPT_LOG = "cloud-init-output.log"
FS = "fs"
TF_CONFIG = "run/tfcluster/tf_config.json"
AGENT_CONFIG = "etc/tfcluster/agent.json"
"""Paths under an instance's root (``RuntimeDirectory=tfcluster`` makes run/tfcluster)."""
LOOPBACK_CIDR = "127.77.0.0/24"
"""Loopback mode's subnet: every 127.x address is this machine's own."""


class BootError(RuntimeError):
    """An instance could not be booted; the message names the log to read."""


def _paths(root: Path, systemctl: Path) -> dict[str, str | int | bool]:
    """Every path of a layout under ``root``."""
    return {
        "install_dir": f"{root}/opt/tfcluster",
        "config_dir": f"{root}/etc/tfcluster",
        "state_dir": f"{root}/var/lib/tfcluster",
        "unit_dir": f"{root}/{servicectl.UNIT_DIR}",
        "resolved_dropin": f"{root}/etc/systemd/resolved.conf.d/tfcluster.conf",
        "nsswitch": f"{root}/etc/nsswitch.conf",
        "tf_config_path": f"{root}/{TF_CONFIG}",
        "service_user": pwd.getpwuid(os.geteuid()).pw_name,
        "systemctl": str(systemctl),
        # Never the real one: it would power off this machine (poweroff.py).
        "shutdown_command": str(systemctl.parent / "shutdown"),
        "shutdown_sudo": False,
        "sudoers_dir": f"{root}/etc/sudoers.d",
        # No forwarding of other names: nothing leaves this machine (EC2: the VPC resolver).
        "dns_forward": "",
    }


def machine_layout(machine_root: Path, systemctl: Path) -> dict[str, str | int | bool]:
    """The config's ``layout``: paths under the machine root, CoreDNS on 127.0.0.1:53.

    Port 53 because the namespace's resolv.conf names 127.0.0.1, so that
    getaddrinfo (what gRPC uses) asks the instance's own CoreDNS.
    """
    return {**_paths(machine_root, systemctl), "dns_port": 53}


def loopback_layout(
    root: Path, systemctl: Path, ip: str, imds_endpoint: str, etcd_peer_port: int
) -> dict[str, str | int | bool]:
    """One loopback instance's own layout: its paths, and its services on its address."""
    return {
        **_paths(root, systemctl),
        "imds_endpoint": imds_endpoint,
        "dns_bind": ip,
        "dns_port": 5353,
        "health_addr": f"{ip}:8080",
        "ready_addr": f"{ip}:8181",
        "etcd_listen_host": ip,
        "etcd_peer_port": etcd_peer_port,
        "distinct_ports": True,  # TF servers listen on every address of the one host
        # The host's resolver knows nothing of the zone: TensorFlow dials addresses.
        "check_system_resolver": False,
        "tf_config_addresses": "ips",
    }


def write_machine_commands(systemctl: Path, root: Path, endpoint_file: Path) -> None:
    """The one-word ``systemctl`` the user-data calls (servicectl on ``root``), and
    beside it the ``shutdown`` the user-data and the agent call (poweroff.py)."""
    systemctl.parent.mkdir(parents=True, exist_ok=True)
    command = f"{sys.executable} -m tfcluster.cloudinit.localcloud.servicectl"
    systemctl.write_text(f'#!/bin/sh\nexec {command} --root "{root}" "$@"\n')
    systemctl.chmod(0o755)
    poweroff.write_shutdown(systemctl.parent / "shutdown", root, endpoint_file)


def _prepare(folder: Path, node: Node, user_data: bytes) -> str:
    """Keep the user-data in the folder, check it; its shell script. The
    instance id goes where cloud-init leaves it (read by ``shutdown``)."""
    (folder / FS / "etc").mkdir(parents=True, exist_ok=True)
    own_id = folder / FS / poweroff.INSTANCE_ID
    own_id.parent.mkdir(parents=True, exist_ok=True)
    own_id.write_text(f"{node.instance_id}\n")
    if Path("/etc/nsswitch.conf").exists():
        shutil.copyfile("/etc/nsswitch.conf", folder / FS / "etc" / "nsswitch.conf")
    (folder / "user-data").write_bytes(user_data)
    try:
        return parts.shell_script(user_data, folder)
    except parts.UserDataError as exc:
        raise BootError(str(exc)) from None


def boot_netns(
    node: Node,
    user_data: bytes,
    *,
    cluster: str,
    folder: Path,
    machine_root: Path,
    timeout: float = BOOT_TIMEOUT,
) -> str:
    """Boot ``node`` from ``user_data`` in its own namespace; the namespace's name."""
    ip = _private_ip(node)
    script = folder / "user-data.sh"
    script.write_text(_prepare(folder, node, user_data))
    ns = network.attach(cluster, node.instance_id, ip)

    def inside(argv: Sequence[str]) -> list[str]:
        return network.exec_argv(ns, argv)

    _start_imds(node, folder, f"{network.IMDS_ADDRESS}:80", inside)
    mount_and_run = 'mount --bind "$1" "$2" && exec bash "$3"'
    _run(node, folder, inside(["sh", "-c", mount_and_run, "boot", str(folder / FS),
                               str(machine_root), str(script)]), timeout)  # fmt: skip
    return ns


def boot_loopback(
    node: Node,
    user_data: bytes,
    *,
    config: ClusterConfig,
    index: int | None,
    etcd_endpoints: Sequence[str] | None,
    folder: Path,
    timeout: float = BOOT_TIMEOUT,
) -> None:
    """Boot ``node`` on its loopback address: the same user-data with its own layout.

    ``index`` (a replacement's explicit task index) and ``etcd_endpoints``
    are what `provision.up` rendered the user-data with.
    """
    ip = _private_ip(node)
    script = _prepare(folder, node, user_data)
    # The presigned URLs and POSTs were signed at launch: the same config renders
    # the same bytes only with the same values, so they are read back from the script.
    staged, posts = parts.staged_downloads(script), parts.signed_posts(script)
    rendered = render_user_data(
        config, node.role, index, etcd_endpoints, staged=staged, posts=posts
    )
    if rendered != user_data:
        raise BootError(
            f"{node.label} ({node.instance_id}): its user-data is not what this cluster's "
            "config renders for it; run 'down --local' and 'up --local' again"
        )
    port = free_port(ip)
    systemctl = folder / "bin" / "systemctl"
    # The cluster's moto server: instances/<id> lies in the cluster's folder (cloud.py).
    write_machine_commands(systemctl, folder / FS, motoserver.url_file(folder.parents[1] / "moto"))
    imds = f"http://{ip}:{port}"
    own = loopback_layout(folder / FS, systemctl, ip, imds, free_port("127.0.0.1"))
    local = dataclasses.replace(config, layout=MappingProxyType({**config.layout, **own}))
    own_script = folder / "user-data.loopback.sh"
    own_script.write_text(
        render_parts(local, node.role, index, etcd_endpoints, staged=staged, posts=posts)[1].content
    )
    _start_imds(node, folder, f"{ip}:{port}", list)
    _run(node, folder, ["bash", str(own_script)], timeout)


def _private_ip(node: Node) -> str:
    if node.private_ip is None:
        raise BootError(f"{node.instance_id} has no private IP yet")
    return node.private_ip


def _run(node: Node, folder: Path, argv: list[str], timeout: float) -> None:
    """Run the user-data script as cloud-init does: as root (here: us), to completion."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
    }
    log_path = folder / SCRIPT_LOG
    with open(log_path, "ab") as log:
        try:
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, timeout=timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise BootError(
                f"{node.label} ({node.instance_id}): user-data ran longer than {timeout:.0f} s; "
                f"see {log_path}"
            ) from None
    if done.returncode != 0:
        raise BootError(
            f"{node.label} ({node.instance_id}): user-data exited with {done.returncode}; "
            f"see {log_path}"
        )


def _start_imds(
    node: Node, folder: Path, bind: str, wrap: Callable[[list[str]], list[str]]
) -> None:
    """The instance's IMDS emulator on ``bind``; returns once it listens."""
    argv = [
        sys.executable, "-m", "tfcluster.cloudinit.localcloud.imds_emulator", "--bind", bind,
        "--launch-index", str(node.launch_index), "--local-ipv4", str(node.private_ip),
        "--instance-id", node.instance_id, "--user-data-file", str(folder / "user-data"),
    ]  # fmt: skip
    daemons.start(folder, IMDS, wrap(argv))
    log_path = daemons.log_file(folder, IMDS)

    def listening() -> bool | None:
        if daemons.running(folder, IMDS) is None:
            raise BootError(f"{node.label}: the IMDS emulator exited; see {log_path}")
        return True if bind in log_path.read_text(errors="replace") else None

    try:
        wait_for(listening, what=f"{node.label}'s IMDS emulator to listen", timeout=IMDS_TIMEOUT)
    except WaitTimeout as exc:
        raise BootError(f"{exc}; see {log_path}") from None


def processes(folder: Path) -> list[int]:
    """Every live process of a loopback instance: the sessions its pid files name.

    Each daemon leads a session of its own, and its children (the agent's
    TensorFlow process) stay in it, even when the leader is gone.
    """
    sessions = set()
    for pid_file in [*folder.glob("*.pid"), *(folder / FS).glob("*.pid")]:
        try:
            sessions.add(int(pid_file.read_text()))
        except (OSError, ValueError):
            continue
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) in sessions:
            found.append(int(entry.name))
    return found
