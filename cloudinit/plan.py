"""What `up` would do: read the cluster from the cloud's tags, decide, change nothing.

``plan_up`` lists the cluster's nodes and firewall group by tag and works out
what is missing: one launch per role with count N for a role that has no
node (so the launch index is the task index), one launch per missing index
when repairing. The plan also says what it costs (instances per type) and
why the operator should be asked first (`confirmation_reasons`), and what
goes into the cluster bucket (`staged_objects`): the static binaries that
the config gives no ``artifacts`` override for, the tfcluster wheel with its
constraints, the program bundle of ``program_dir``; and how many of their
bytes the bucket still lacks.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tfcluster.cloudinit.cloud.provider import (
    CONTROL_ROLE,
    PENDING,
    RUNNING,
    BucketStore,
    Node,
    NodeProvider,
    PortRange,
    ProviderError,
)
from tfcluster.cloudinit.config import UBUNTU_AMI_SSM_PARAMETER, ClusterConfig
from tfcluster.cloudinit.render.layout import DEFAULT_LAYOUT
from tfcluster.cloudinit.stage import artifacts, bundle, manifest, wheel
from tfcluster.cloudinit.stage.manifest import StagedObject
from tfcluster.discovery.records import ROLES

_ACCELERATED = re.compile(r"^(p[0-9]|g[0-9]|gr[0-9]|dl[0-9]|trn[0-9]|inf[0-9])")
"""EC2 families with GPUs or other accelerators (p5, g6e, trn2, ...): the costly ones."""


class ControlNodeLost(ProviderError):
    """Task nodes exist but the control node (their etcd) is gone: recreate the cluster."""


@dataclass(frozen=True)
class Launch:
    """One launch call: ``count`` nodes of ``role``; ``index`` set for a replacement."""

    role: str
    count: int
    index: int | None = None

    def describe(self) -> str:
        if self.index is not None:
            return f"launch {self.role}{self.index} (replacement, explicit index {self.index})"
        if self.role == CONTROL_ROLE:
            return "launch the control node (etcd)"
        return f"launch {self.role}0..{self.role}{self.count - 1} ({self.count} in one call)"


@dataclass(frozen=True)
class Plan:
    """What ``up`` found and what it would do about it.

    ``existing`` holds the live (pending/running) nodes that count towards the
    cluster; ``stale`` the cluster's other non-terminated nodes (stopped, or
    shutting down), which are replaced but not touched; ``surplus`` live
    nodes beyond the configured counts, which ``up`` leaves alone.
    """

    cluster: str
    security_group: str | None
    existing: tuple[Node, ...]
    launches: tuple[Launch, ...]
    stale: tuple[Node, ...] = ()
    surplus: tuple[Node, ...] = ()
    image_id: str | None = None
    subnet_id: str | None = None
    instance_types: tuple[tuple[str, int], ...] = ()
    """(instance type, count) of what ``launches`` start, biggest count first."""
    staged: tuple[StagedObject, ...] = ()
    """What the launches fetch from the cluster bucket (empty: no bucket needed)."""
    bucket: str | None = None
    """The cluster's bucket, when ``staged`` is not empty (it may not exist yet)."""
    bucket_exists: bool = False
    to_upload: tuple[StagedObject, ...] = ()
    """The staged objects the bucket lacks now."""

    @property
    def complete(self) -> bool:
        return self.security_group is not None and not self.launches

    @property
    def new_instances(self) -> int:
        return sum(count for _, count in self.instance_types)

    def describe(self) -> list[str]:
        """The plan as lines for the operator."""
        lines = [
            f"cluster {self.cluster}: {len(self.existing)} live instance(s), "
            + (
                f"security group {self.security_group}"
                if self.security_group
                else "no security group"
            )
        ]
        if self.security_group is None:
            lines.append("create the security group")
        lines.extend(launch.describe() for launch in self.launches)
        if self.launches and self.image_id:
            lines.append(f"image {self.image_id}")
        if self.staged:
            total = sum(o.size for o in self.staged)
            sending = sum(o.size for o in self.to_upload)
            where = "bucket" if self.bucket_exists else "new bucket"
            lines.append(
                f"stage {len(self.staged)} object(s), {_mb(total)} in {where} {self.bucket}: "
                f"{len(self.to_upload)} to upload ({_mb(sending)}), "
                f"{len(self.staged) - len(self.to_upload)} already there"
            )
            lines.extend(
                f"  {o.filename} {_mb(o.size)} sha256 {o.sha256}"
                + ("" if o in self.to_upload else " (present)")
                for o in self.staged
            )
        if self.instance_types:
            per_type = ", ".join(f"{count} x {kind}" for kind, count in self.instance_types)
            lines.append(f"instances to launch: {per_type} ({self.new_instances} in all)")
        lines.extend(f"ignore {n.label} {n.instance_id}: {n.state}" for n in self.stale)
        lines.extend(
            f"leave {n.label} {n.instance_id} running: beyond the configured count"
            for n in self.surplus
        )
        return lines


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


STAGE_ARCH = "amd64"
"""Instances are linux/amd64 for now (arm64 instance types are not told apart yet)."""


def staged_binaries(config: ClusterConfig) -> list[StagedObject]:
    """The static binaries the instances fetch from the cluster bucket, hashed here.

    Those the config overrides (``artifacts``) are not staged; etcd and
    etcdctl only with a control node. Found locally (a checkout's
    ``.tools/bin``, then ``PATH``), or with ``download_binaries`` from the
    pinned releases, checked; a `StageError` otherwise, before anything is created.
    """
    wanted = [] if "coredns" in config.artifacts else ["coredns"]
    if config.control_node and "etcd" not in config.artifacts:
        wanted += ["etcd", "etcdctl"]
    if not wanted:
        return []
    found = artifacts.instance_binaries(
        STAGE_ARCH, checkout=wheel.find_checkout(), download=config.download_binaries
    )
    return artifacts.stage_binaries(STAGE_ARCH, {name: found[name] for name in wanted})


def staged_bundle(config: ClusterConfig) -> StagedObject | None:
    """``program_dir`` packed as the chief's program bundle, or None without one.

    Built in the cache under a name derived from the folder's path, so two
    clusters' programs do not overwrite each other; a missing folder or a
    bundle over the limit is a one-line `StageError` before anything is created.
    """
    if config.program_dir is None:
        return None
    folder = config.program_dir
    where = hashlib.sha256(folder.encode()).hexdigest()[:16]
    out = artifacts.cache_root() / "bundles" / where / bundle.BUNDLE_FILENAME
    return bundle.build_bundle(Path(folder), out).staged()


def staged_objects(config: ClusterConfig) -> list[StagedObject]:
    """Everything the instances fetch from the cluster bucket, built and hashed here.

    The binaries (`staged_binaries`), the wheel of this tfcluster and the
    constraints it is installed with (always: every task installs its agent
    from them), and the program bundle when ``program_dir`` is set.
    """
    objects = staged_binaries(config) + wheel.stage_wheel(artifacts.cache_root())
    program = staged_bundle(config)
    return objects if program is None else [*objects, program]


FETCHED_BY_NAME = ("wheel", "constraints", "bundle")
"""Staged objects the user-data asks for by manifest name; binaries go by file name."""


def fetch_name(obj: StagedObject) -> str:
    """The name the user-data knows a staged object by: ``etcd``, ``wheel``, ``bundle``.

    A binary's manifest name carries its architecture (``etcd-amd64``), which
    one instance never needs to tell apart; its file name is the binary's.
    """
    return obj.name if obj.name in FETCHED_BY_NAME else obj.filename


def ingress_ports(config: ClusterConfig) -> list[PortRange]:
    """The TCP ports the cluster's nodes dial on each other, and no other.

    DNS needs none: each node's CoreDNS answers on its own loopback and reads
    etcd over the etcd client port.
    """
    ports = [PortRange(config.tf_port, config.tf_port, "tensorflow")]
    if config.control_node:
        # Only the client port: the single etcd member's peer port listens on loopback.
        client = DEFAULT_LAYOUT.etcd_client_port
        ports.append(PortRange(client, client, "etcd client"))
    return ports


def confirmation_reasons(config: ClusterConfig, plan: Plan) -> list[str]:
    """Why launching ``plan`` should be confirmed first: size over ``max_instances``, GPUs."""
    reasons = []
    total = len(plan.existing) + plan.new_instances
    if plan.new_instances and total > config.max_instances:
        reasons.append(
            f"the cluster would have {total} instances, more than max_instances "
            f"({config.max_instances})"
        )
    accelerated = sorted({kind for kind, _ in plan.instance_types if _ACCELERATED.match(kind)})
    if accelerated:
        reasons.append(f"it launches GPU/accelerator instance types ({', '.join(accelerated)})")
    return reasons


def _missing_launches(role: str, wanted: int, live: Sequence[Node]) -> list[Launch]:
    """One call with count N when a role has no node; else one call per missing index."""
    present = {n.index for n in live if n.role == role}
    missing = [i for i in range(wanted) if i not in present]
    if not missing:
        return []
    if len(missing) == wanted:
        return [Launch(role, wanted)]
    return [Launch(role, 1, index) for index in missing]


def plan_up(config: ClusterConfig, provider: NodeProvider) -> Plan:
    """Read what the cluster holds and decide what ``up`` launches. Changes nothing.

    Raises `ControlNodeLost` when task nodes exist without their control
    node: they were configured with the old control node's etcd address, and
    a new one would split the cluster.
    """
    all_nodes = provider.nodes(config.cluster)
    live = [n for n in all_nodes if n.state in (PENDING, RUNNING)]
    stale = [n for n in all_nodes if n.state not in (PENDING, RUNNING)]
    counts = {CONTROL_ROLE: 1 if config.control_node else 0, **config.counts}
    surplus = [n for n in live if n.index >= counts.get(n.role, 0)]
    launches: list[Launch] = []
    for role, wanted in counts.items():
        launches.extend(_missing_launches(role, wanted, live))
    has_control = any(n.role == CONTROL_ROLE for n in live)
    if config.control_node and not has_control and any(n.role in ROLES for n in live):
        raise ControlNodeLost(
            f"cluster {config.cluster} has task nodes but no control node; their etcd is "
            f"gone: run 'tfcluster down --cluster {config.cluster}' and 'up' again"
        )
    image_id = None
    subnet_id = config.subnet_id
    if launches:
        image_id = config.ami or provider.resolve_image(UBUNTU_AMI_SSM_PARAMETER)
        provider.check_image(image_id)
        if subnet_id is None and config.vpc_id is not None:
            subnet_id = provider.subnet_in(config.vpc_id)
    types: Counter[str] = Counter()
    for item in launches:
        types[config.instance_type(item.role)] += item.count
    staged = tuple(staged_objects(config)) if launches else ()
    bucket, exists, to_upload = None, False, staged
    if staged:
        if not isinstance(provider, BucketStore):
            raise ProviderError(
                "this cloud has no cluster bucket to stage the agent's wheel and the binaries in"
            )
        found = provider.find_bucket(config.cluster)
        exists = found is not None
        bucket = found or provider.bucket_name(config.cluster)
        if found is not None:
            to_upload = tuple(manifest.missing(staged, provider.bucket_keys(found)))
    return Plan(
        cluster=config.cluster,
        security_group=provider.find_security_group(config.cluster),
        existing=tuple(live),
        launches=tuple(launches),
        stale=tuple(stale),
        surplus=tuple(surplus),
        image_id=image_id,
        subnet_id=subnet_id,
        instance_types=tuple(types.most_common()),
        staged=staged,
        bucket=bucket,
        bucket_exists=exists,
        to_upload=to_upload,
    )


Confirm = Callable[[Plan, list[str]], bool]
"""Asked before launching when `confirmation_reasons` finds any; False cancels."""
