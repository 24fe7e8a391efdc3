"""From DNS membership to what TensorFlow reads: a cluster spec, TF_CONFIG, a resolver.

Nothing here imports TensorFlow at module level: the agent builds and writes
TF_CONFIG without paying TensorFlow's import time and memory, and only the
process that runs TensorFlow loads it (``make_dns_cluster_resolver``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from tfcluster.discovery import records
from tfcluster.discovery.dns import DNSClient, Endpoint
from tfcluster.discovery.records import Member


class ClusterSpecError(ValueError):
    """The members cannot form a TensorFlow cluster spec (a task index is missing,
    or this task is not part of the cluster)."""


def task_addresses(
    members: Mapping[Member, Endpoint], zone: str, use_names: bool
) -> dict[str, dict[int, str]]:
    """``{"ps": {0: "ps0.<zone>:2222"}, ...}``, roles in ROLES order, indices sorted.

    With ``use_names`` TensorFlow dials the DNS names, and gRPC re-resolves a
    name whose instance was replaced; otherwise it dials the addresses seen now.
    """
    jobs: dict[str, dict[int, str]] = {}
    for member in sorted(members, key=lambda m: (records.ROLES.index(m.role), m.index)):
        endpoint = members[member]
        host = member.name(zone) if use_names else endpoint.host_ip
        jobs.setdefault(member.role, {})[member.index] = f"{host}:{endpoint.port}"
    return jobs


def build_cluster_spec(
    members: Mapping[Member, Endpoint], zone: str, use_names: bool
) -> dict[str, list[str]]:
    """The ``cluster`` of TF_CONFIG: each role's addresses in task-index order.

    A list position IS the task index in TF_CONFIG, so a gap (worker1 missing
    while worker2 is there) would silently renumber tasks: it is an error.
    """
    spec: dict[str, list[str]] = {}
    for role, tasks in task_addresses(members, zone, use_names).items():
        if list(tasks) != list(range(len(tasks))):
            missing = sorted(set(range(max(tasks) + 1)) - set(tasks))
            raise ClusterSpecError(f"{role} tasks {missing} are missing from the cluster")
        spec[role] = list(tasks.values())
    return spec


def tf_config(cluster_spec: Mapping[str, list[str]], role: str, index: int) -> dict[str, Any]:
    """The TF_CONFIG document for task ``role``/``index`` of ``cluster_spec``."""
    if not 0 <= index < len(cluster_spec.get(role, ())):
        raise ClusterSpecError(f"task {role}{index} is not in the cluster spec")
    return {"cluster": dict(cluster_spec), "task": {"type": role, "index": index}}


def write_tf_config(
    path: str | os.PathLike[str], cluster_spec: Mapping[str, list[str]], role: str, index: int
) -> dict[str, Any]:
    """Write TF_CONFIG to ``path`` atomically (mode 0644) and return it.

    A temporary file in the same folder renamed over ``path`` means a reader
    (the TF server starting, an operator) sees the old file or the new one,
    never a half-written one.
    """
    document = tf_config(cluster_spec, role, index)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return document


def read_tf_config(text: str) -> dict[str, Any]:
    """Parse and check a TF_CONFIG document (from a file or the environment)."""
    try:
        document = json.loads(text)
        cluster, task = document["cluster"], document["task"]
        role, index = task["type"], task["index"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ClusterSpecError(f"not a TF_CONFIG document: {exc}") from None
    if not isinstance(cluster, dict) or not isinstance(role, str) or not isinstance(index, int):
        raise ClusterSpecError("not a TF_CONFIG document: bad cluster, task type or index")
    tf_config(cluster, role, index)
    return dict(document)


def make_dns_cluster_resolver(
    client: DNSClient,
    zone: str,
    task_type: str | None = None,
    task_id: int | None = None,
    *,
    use_names: bool = True,
    rpc_layer: str = "grpc",
) -> Any:
    """A ``tf.distribute.cluster_resolver.ClusterResolver`` over the zone's SRV view.

    Each ``cluster_spec()`` call sends ONE SRV query, so a replaced instance's
    new address and a member that has gone are seen on the next call; a
    missing index shows as a hole in that job (TensorFlow's sparse job form).
    Imports TensorFlow.
    """
    return _resolver_class()(client, zone, task_type, task_id, use_names, rpc_layer)


@cache
def _resolver_class() -> type:
    """Defined on first use: the base class lives in TensorFlow."""
    import tensorflow as tf

    base = tf.distribute.cluster_resolver.ClusterResolver

    class DNSClusterResolver(base):  # type: ignore[misc, valid-type]
        """Cluster membership from the CoreDNS SRV view of the cluster's zone."""

        def __init__(
            self,
            client: DNSClient,
            zone: str,
            task_type: str | None,
            task_id: int | None,
            use_names: bool,
            rpc_layer: str,
        ) -> None:
            self._client = client
            self._zone = zone
            self._use_names = use_names
            # The base class's task_type/task_id/rpc_layer properties read these.
            self._task_type = task_type
            self._task_id = task_id
            self._rpc_layer = rpc_layer

        @property
        def rpc_layer(self) -> str:
            return self._rpc_layer

        @rpc_layer.setter
        def rpc_layer(self, rpc_layer: str) -> None:
            self._rpc_layer = rpc_layer

        def cluster_spec(self) -> Any:
            members = self._client.members(self._zone)
            return tf.train.ClusterSpec(task_addresses(members, self._zone, self._use_names))

        def master(
            self,
            task_type: str | None = None,
            task_id: int | None = None,
            rpc_layer: str | None = None,
        ) -> str:
            """``grpc://host:port`` of the given task (default: this task), as
            TFConfigClusterResolver does; "" when no task is known."""
            task_type = self._task_type if task_type is None else task_type
            task_id = self._task_id if task_id is None else task_id
            if task_type is None or task_id is None:
                return ""
            address = self.cluster_spec().task_address(task_type, task_id)
            layer = self._rpc_layer if rpc_layer is None else rpc_layer
            return f"{layer}://{address}" if layer else address

        def num_accelerators(
            self,
            task_type: str | None = None,
            task_id: int | None = None,
            config_proto: Any = None,
        ) -> dict[str, int]:
            """None: the cluster is CPU only (the base class would open a session to ask)."""
            return {}

    return DNSClusterResolver
