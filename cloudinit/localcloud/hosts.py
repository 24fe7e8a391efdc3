"""Where a local instance lives: its own network namespace, or a loopback address.

The two host modes differ in six things, and only here:

| | ``NetnsHost`` (root) | ``LoopbackHost`` (no root) |
| --- | --- | --- |
| subnet | 198.18.0.0/24 on the cluster's bridge | 127.77.0.0/24 of this machine |
| the moto server (EC2, S3) | on the bridge's own address, 198.18.0.1 | on 127.0.0.1 |
| boot | the user-data as EC2 holds it, in the namespace | re-rendered with its own layout |
| processes | every process in the namespace | the pid files in the instance's folder |
| release | detach the namespace | nothing |
| a command "on the instance" | run inside the namespace | run here |

`LocalCloud` holds one `Host` and never asks which it is.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path

from tfcluster.cloudinit.cloud.provider import CONTROL_ROLE, Node
from tfcluster.cloudinit.config import ClusterConfig
from tfcluster.cloudinit.localcloud import instance, network
from tfcluster.cloudinit.render.layout import control_endpoint

NETNS, LOOPBACK = "netns", "loopback"


class Host(abc.ABC):
    """How the instances of one local cluster are hosted on this machine."""

    mode: str
    cidr: str

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster

    def check(self) -> str | None:
        """Why this machine cannot host the cluster this way, or None."""
        return None

    @abc.abstractmethod
    def api_address(self) -> str:
        """The address of this machine where the instances reach the moto server.

        The presigned URLs of the cluster bucket are signed for it, so it must
        be one the instances can dial; it is made ready here if need be.
        """

    @abc.abstractmethod
    def boot(self, node: Node, user_data: bytes, folder: Path, control: Node | None) -> None:
        """Run the node's user-data as cloud-init would; its files under ``folder``."""

    @abc.abstractmethod
    def processes(self, instance_id: str, folder: Path) -> list[int]:
        """The pids of everything the instance runs."""

    def release(self, instance_id: str) -> None:
        """Give back what the instance held here once its processes are gone."""
        return None

    def on_instance(self, instance_id: str, argv: list[str]) -> list[str]:
        """``argv`` as run on the instance (where its resolver and addresses are)."""
        return argv

    def place(self, instance_id: str) -> str | None:
        """Where the instance lives, for ``status`` (its namespace), or None."""
        return None


class NetnsHost(Host):
    """Each instance in a network namespace on the cluster's bridge (needs root)."""

    mode = NETNS
    cidr = network.CIDR

    def __init__(self, cluster: str, machine_root: Path) -> None:
        super().__init__(cluster)
        self.machine_root = machine_root

    def check(self) -> str | None:
        if network.available():
            return None
        return (
            f"cluster {self.cluster} uses network namespaces, which need root and "
            "'ip netns'; run as root, or use another cluster with --loopback"
        )

    def api_address(self) -> str:
        """The bridge's own address: on the instances' subnet, assigned by the local cloud.

        A namespace has a loopback of its own, so the host's 127.0.0.1 is out
        of its reach; the bridge is made here, before any instance, so that
        the server can listen on it.
        """
        network.ensure_bridge(self.cluster, self.cidr)
        return network.gateway(self.cidr)

    def boot(self, node: Node, user_data: bytes, folder: Path, control: Node | None) -> None:
        instance.boot_netns(
            node, user_data, cluster=self.cluster, folder=folder, machine_root=self.machine_root
        )

    def processes(self, instance_id: str, folder: Path) -> list[int]:
        return network.pids(network.namespace(self.cluster, instance_id))

    def release(self, instance_id: str) -> None:
        network.detach(network.namespace(self.cluster, instance_id))

    def on_instance(self, instance_id: str, argv: list[str]) -> list[str]:
        return network.exec_argv(network.namespace(self.cluster, instance_id), argv)

    def place(self, instance_id: str) -> str | None:
        return network.namespace(self.cluster, instance_id)


class LoopbackHost(Host):
    """Each instance on its own 127.77.0.x address of this machine (no root).

    Instances share one network here, so the script is rendered again with
    the instance's own layout (after a byte-for-byte check against what EC2
    holds): ``config`` gives the cluster's config of the last ``prepare``.
    """

    mode = LOOPBACK
    cidr = instance.LOOPBACK_CIDR

    def __init__(self, cluster: str, config: Callable[[], ClusterConfig]) -> None:
        super().__init__(cluster)
        self.config = config

    def api_address(self) -> str:
        """This machine's 127.0.0.1, which every loopback instance shares."""
        return "127.0.0.1"

    def boot(self, node: Node, user_data: bytes, folder: Path, control: Node | None) -> None:
        etcd = None
        if node.role != CONTROL_ROLE and control is not None and control.private_ip:
            etcd = [control_endpoint(control.private_ip)]
        instance.boot_loopback(
            node,
            user_data,
            config=self.config(),
            index=node.index if node.explicit_index else None,
            etcd_endpoints=etcd,
            folder=folder,
        )

    def processes(self, instance_id: str, folder: Path) -> list[int]:
        return instance.processes(folder)
