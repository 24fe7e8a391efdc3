"""`tfcluster up`, `down`, `status`, `ls`: decide from what the cloud holds, then act.

``plan_up`` only reads: it lists the cluster's nodes and firewall group by
tag and works out what is missing. ``up`` carries the plan out. The cloud's
tags are the only state, so ``up`` repairs a cluster (one launch per missing
task, carrying its index explicitly) and is a no-op on a complete one.

``up`` and ``down`` each hold the cluster's lock (`NodeProvider.acquire_lock`)
from before they read the cluster until they are done: a second run of
either, from this machine or another, is refused instead of launching a
second set of instances.

Progress goes to an ``on_event(str)`` callback: this module never prints.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from tfcluster.cloudinit.cloud.provider import (
    CONTROL_ROLE,
    TAG_CLUSTER,
    BucketStore,
    ClusterLock,
    ClusterSummary,
    LaunchSpec,
    Node,
    NodeProvider,
    Progress,
    ProviderError,
    no_progress,
)
from tfcluster.cloudinit.config import Artifact, ClusterConfig
from tfcluster.cloudinit.observe import policy
from tfcluster.cloudinit.plan import (
    Confirm,
    Launch,
    Plan,
    confirmation_reasons,
    fetch_name,
    ingress_ports,
    plan_up,
)
from tfcluster.cloudinit.render.layout import control_endpoint
from tfcluster.cloudinit.render.userdata import render_user_data
from tfcluster.cloudinit.stage import manifest
from tfcluster.discovery.records import ROLES

log = logging.getLogger(__name__)

RUN_TIMEOUT = 600.0
"""Seconds for launched instances to run (EC2 takes ~30-90 s per batch)."""
TERMINATE_TIMEOUT = 600.0
"""Seconds for instances to terminate (EC2 takes ~30-120 s)."""
GROUP_DELETE_TIMEOUT = 300.0
"""Seconds for a firewall group to become deletable once its instances are gone."""
LOCK_TTL = 3600.0
"""Seconds a run's lock lasts: longer than any up or down, short enough that a
lock left by a crashed run does not block the cluster for long."""

DnsCheck = Callable[[str], bool | None]
"""Whether a DNS name has its record (None: cannot tell)."""


class UpFailed(ProviderError):
    """``up`` failed and undid its own changes; ``cause`` is the original error."""

    def __init__(self, message: str, cause: BaseException) -> None:
        super().__init__(message)
        self.cause = cause


class UpCancelled(ProviderError):
    """The operator declined the launch when asked; nothing was created."""


@dataclass(frozen=True)
class UpResult:
    """The cluster after ``up``: every live node and what this run launched."""

    plan: Plan
    nodes: tuple[Node, ...]
    launched: tuple[Node, ...] = ()
    security_group: str | None = None
    bucket: str | None = None
    uploaded: int = 0
    """Bytes this run uploaded to the cluster bucket (0: everything was there)."""
    staging_seconds: float = 0.0
    """Time spent making sure the bucket holds every staged object (listing, uploads)."""

    @property
    def changed(self) -> bool:
        return bool(self.launched) or self.plan.security_group != self.security_group


@dataclass(frozen=True)
class DownResult:
    """What ``down`` removed, and what it could not (``left_*``: run ``down`` again)."""

    terminated: tuple[str, ...]
    security_groups: tuple[str, ...]
    left_instances: tuple[str, ...] = ()
    left_security_groups: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    buckets: tuple[str, ...] = ()
    left_buckets: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return not (self.left_instances or self.left_security_groups or self.left_buckets)

    def describe_left(self) -> str:
        parts = [f"instance(s) {', '.join(self.left_instances)}"] if self.left_instances else []
        if self.left_security_groups:
            parts.append(f"security group(s) {', '.join(self.left_security_groups)}")
        if self.left_buckets:
            parts.append(f"bucket(s) {', '.join(self.left_buckets)}")
        return " and ".join(parts)


@dataclass(frozen=True)
class StatusRow:
    node: Node
    dns_name: str | None
    dns_present: bool | None = None


def dns_name(node: Node, zone: str) -> str | None:
    """``worker2.<zone>`` for a TensorFlow task; None for the control node."""
    if node.role not in ROLES:
        return None
    return f"{node.role}{node.index}.{zone}"


def lock_holder(operation: str) -> str:
    """Who holds a lock, for the message another run shows: ``up by ana@laptop pid 4242``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{operation} by {user}@{socket.gethostname()} pid {os.getpid()}"


@contextlib.contextmanager
def cluster_lock(
    provider: NodeProvider, cluster: str, operation: str, on_event: Progress = no_progress
) -> Iterator[ClusterLock]:
    """Hold the cluster's lock for the block; `ClusterBusy` if another run holds it."""
    lock = provider.acquire_lock(cluster, lock_holder(operation), LOCK_TTL)
    try:
        yield lock
    finally:
        try:
            provider.release_lock(lock)
        except ProviderError as exc:
            on_event(
                f"warning: could not release the lock of cluster {cluster} ({exc}); it expires "
                f"{lock.expires:%H:%M:%S} UTC, or run 'tfcluster unlock --cluster {cluster}'"
            )


@dataclass
class _Made:
    """What this run has created so far, for the rollback and its report."""

    instances: list[str] = field(default_factory=list)
    security_group: str | None = None
    bucket: str | None = None


def up(
    config: ClusterConfig,
    provider: NodeProvider,
    *,
    dry_run: bool = False,
    on_event: Progress = no_progress,
    confirm: Confirm | None = None,
    run_timeout: float = RUN_TIMEOUT,
    terminate_timeout: float = TERMINATE_TIMEOUT,
) -> UpResult:
    """Bring the cluster to its configured shape; report each step to ``on_event``.

    Order: the cluster's lock (a concurrent ``up`` or ``down`` raises
    `ClusterBusy` before anything is read); the plan, and ``confirm`` when
    `confirmation_reasons` says so; security group; the cluster bucket, when
    the plan stages objects (created or reused, then only the objects it
    lacks are uploaded); the control node, whose
    private IP goes into every task's user-data as its etcd endpoint; then
    one launch per role (count N, so the launch index is the task index), or
    one per missing index when repairing; then one wait until everything runs.

    On failure or interruption (KeyboardInterrupt, which the CLI also raises
    for SIGTERM) ``up`` rolls back: it terminates every node of the cluster
    that was not there when it began (found by tag, so even a launch whose
    answer was lost is caught), waits for them to terminate, and deletes the
    security group and the bucket if none existed before; then raises `UpFailed` saying
    what failed and what was undone. An interruption of the rollback itself
    stops it, and `UpFailed` names what is left and the ``down`` command that
    removes it. Nodes that were already there are never touched.
    ``dry_run`` reads and reports the plan only, without the lock.
    """
    if dry_run:
        plan = plan_up(config, provider)
        for line in plan.describe():
            on_event(line)
        on_event("dry run: nothing changed")
        return UpResult(plan, plan.existing, security_group=plan.security_group)
    with cluster_lock(provider, config.cluster, "up", on_event):
        plan = plan_up(config, provider)
        for line in plan.describe():
            on_event(line)
        if plan.complete:
            on_event(f"cluster {config.cluster} is complete: nothing to do")
            return UpResult(plan, plan.existing, security_group=plan.security_group)
        reasons = confirmation_reasons(config, plan)
        if reasons and confirm is not None and not confirm(plan, reasons):
            raise UpCancelled(f"up cancelled ({'; '.join(reasons)}): nothing was created")
        made = _Made()
        try:
            return _apply(config, provider, plan, made, on_event, run_timeout)
        except (Exception, KeyboardInterrupt) as exc:
            summary = _roll_back(config.cluster, provider, plan, made, on_event, terminate_timeout)
            if isinstance(exc, KeyboardInterrupt):
                reason = "interrupted"
            elif isinstance(exc, ProviderError):
                reason = str(exc)
            else:
                reason = f"{type(exc).__name__}: {exc}"
            raise UpFailed(f"up failed: {reason}; {summary}", exc) from exc


def _expiry(config: ClusterConfig) -> datetime | None:
    if config.max_lifetime is None:
        return None
    return datetime.now(timezone.utc) + timedelta(seconds=config.max_lifetime)


def _apply(
    config: ClusterConfig,
    provider: NodeProvider,
    plan: Plan,
    made: _Made,
    on_event: Progress,
    run_timeout: float,
) -> UpResult:
    group_id, created = provider.ensure_security_group(
        config.cluster,
        ingress_ports(config),
        ssh_cidr=config.ssh_cidr,
        subnet_id=plan.subnet_id,
        vpc_id=config.vpc_id,
    )
    if created:
        made.security_group = group_id
    on_event(f"{'created' if created else 'using'} security group {group_id}")
    expires = _expiry(config)
    bucket, uploaded, seconds = _stage(config, provider, plan, made, on_event)

    def signed(role: str) -> dict[str, Artifact] | None:
        """Presigned URLs made afresh for each launch (signing is local: no call),
        of the binaries built for the role's architecture."""
        if bucket is None or not isinstance(provider, BucketStore):
            return None  # nothing staged: _stage makes a bucket only on a BucketStore
        return {
            fetch_name(o): Artifact(provider.presign(bucket, o.key, config.url_expiry), o.sha256)
            for o in plan.staged_for(role)
        }

    def posts(item: Launch) -> dict[str, Any] | None:
        """The agents' report (and the chief's output) POSTs, signed afresh for each launch."""
        if bucket is None or not isinstance(provider, BucketStore) or item.role not in ROLES:
            return None
        return agent_posts(provider.s3, bucket, item.role, item.index, config.url_expiry)

    def launch(item: Launch, etcd: Sequence[str] | None) -> list[Node]:
        image = plan.image_for(item.role)
        user_data = render_user_data(
            config,
            item.role,
            index=item.index,
            etcd_endpoints=list(etcd) if etcd else None,
            staged=signed(item.role),
            posts=posts(item),
        )
        spec = LaunchSpec(
            image_id=image.image.image_id,
            instance_type=image.machine.name,
            security_group_id=group_id,
            subnet_id=plan.subnet_id,
            key_name=config.key_name,
            spot=config.spot_workers and item.role == "worker",
            expires=expires,
            root_device=image.image.root_device,
            disk_gb=image.disk_gb,
        )
        nodes = provider.launch(
            config.cluster,
            item.role,
            item.count,
            user_data,
            spec,
            index=item.index,
            zone=config.zone,
        )
        made.instances.extend(n.instance_id for n in nodes)
        on_event(f"{item.describe()}: {', '.join(n.instance_id for n in nodes)}")
        return nodes

    def wait(nodes: Sequence[Node], what: str) -> list[Node]:
        on_event(f"waiting for {what}")
        ids = [n.instance_id for n in nodes]
        return provider.wait_running(config.cluster, ids, timeout=run_timeout, on_progress=on_event)

    launched: list[Node] = []
    etcd = list(config.etcd_endpoints)
    if config.control_node:
        control = [n for n in plan.existing if n.role == CONTROL_ROLE][:1]
        if not control:
            control = launch(Launch(CONTROL_ROLE, 1), None)
            launched.extend(control)
        ready = wait(control, "the control node's private IP")
        if ready[0].private_ip is None:
            raise ProviderError(f"control node {ready[0].instance_id} has no private IP")
        etcd = [control_endpoint(ready[0].private_ip)]
    for item in plan.launches:
        if item.role != CONTROL_ROLE:
            launched.extend(launch(item, etcd))
    running = wait(launched, f"{len(launched)} instance(s) to run") if launched else []
    nodes = sorted([*plan.existing, *running], key=lambda n: (n.role, n.index, n.instance_id))
    return UpResult(plan, tuple(nodes), tuple(running), group_id, bucket, uploaded, seconds)


def agent_posts(
    s3: Any, bucket: str, role: str, index: int | None, expires_in: int
) -> dict[str, Any]:
    """The agent config's ``report_post`` for one launch, and ``output_post`` for the chief.

    A role launch (count N, one user-data) gets one report policy for the
    role; a replacement (explicit index) one for its own prefix. Both expire
    after ``expires_in`` seconds (``url_expiry``; SigV4 allows at most 7 days).
    """
    name = role if index is None else f"{role}{index}"
    value = {"report_post": policy.report_post_config(s3, bucket, [name], expires_in=expires_in)}
    if role == "chief":
        value["output_post"] = policy.output_post_config(s3, bucket, expires_in=expires_in)
    return value


def _stage(
    config: ClusterConfig, provider: NodeProvider, plan: Plan, made: _Made, on_event: Progress
) -> tuple[str | None, int, float]:
    """Make sure the cluster bucket holds every staged object; ``(bucket, bytes sent, s)``.

    The bucket is listed again here (the plan's listing may be stale) and only
    the keys it lacks are uploaded: keys are content addresses, so an
    unchanged binary is never sent twice.
    """
    if not plan.staged:
        return None, 0, 0.0
    if not isinstance(provider, BucketStore):
        raise ProviderError("the plan stages objects but this cloud has no cluster bucket")
    started = time.monotonic()
    bucket, created = provider.ensure_bucket(config.cluster)
    if created:
        made.bucket = bucket
    on_event(f"{'created' if created else 'using'} bucket {bucket}")
    todo = manifest.missing(plan.staged, provider.bucket_keys(bucket))
    sent = provider.upload(bucket, todo)
    seconds = time.monotonic() - started
    on_event(
        f"staged {len(plan.staged)} object(s) in {bucket}: uploaded {len(todo)} "
        f"({sent} bytes), {len(plan.staged) - len(todo)} already there, {seconds:.2f} s"
    )
    return bucket, sent, seconds


def _roll_back(
    cluster: str,
    provider: NodeProvider,
    plan: Plan,
    made: _Made,
    on_event: Progress,
    timeout: float,
) -> str:
    """Return the cluster to what ``plan`` found; say what was undone, in one clause.

    A second interruption stops the rollback: the clause then names what is
    left (what this run made, as far as it knows) and the command that
    removes it.
    """
    before = {n.instance_id for n in (*plan.existing, *plan.stale)}
    new = list(made.instances)
    done: list[str] = []
    asked = False
    try:
        listed = [n.instance_id for n in provider.nodes(cluster) if n.instance_id not in before]
        new = sorted(set(new) | set(listed))
        if new:
            on_event(f"rolling back: terminating {len(new)} instance(s) this run launched")
            asked = True
            provider.terminate(new)
            provider.wait_terminated(cluster, new, timeout=timeout, on_progress=on_event)
            done.append(f"terminated {len(new)} instance(s) it launched")
            new = []
        if plan.security_group is None:
            groups = provider.delete_security_groups(cluster, timeout=GROUP_DELETE_TIMEOUT)
            made.security_group = None
            if groups:
                done.append(f"deleted security group {', '.join(groups)}")
        if plan.staged and not plan.bucket_exists and isinstance(provider, BucketStore):
            # Found by its name, not only by made.bucket: a CreateBucket whose answer
            # was lost, or one not tagged yet, still goes.
            bucket, _ = provider.delete_bucket(cluster)
            made.bucket = None
            if bucket:
                done.append(f"deleted bucket {bucket}")
    except (ProviderError, KeyboardInterrupt) as exc:
        log.debug("roll back failed", exc_info=True)
        why = (
            "roll back interrupted"
            if isinstance(exc, KeyboardInterrupt)
            else (f"roll back incomplete ({exc})")
        )
        state = " (termination asked for, maybe not done)" if asked else ""
        left = [f"instance(s) {', '.join(new)}{state}"] if new else []
        if made.security_group is not None:
            left.append(f"security group {made.security_group}")
        if made.bucket is not None:
            left.append(f"bucket {made.bucket}")
        return (
            f"{why}; left: {' and '.join(left) or 'nothing known'}; "
            f"remove it with 'tfcluster down --cluster {cluster} --yes'"
        )
    if not done:
        return "nothing to roll back"
    return "rolled back: " + ", ".join(done)


def down(
    cluster: str,
    provider: NodeProvider,
    *,
    on_event: Progress = no_progress,
    timeout: float = TERMINATE_TIMEOUT,
    group_timeout: float = GROUP_DELETE_TIMEOUT,
    keep_bucket: bool = False,
) -> DownResult:
    """Terminate every instance tagged for ``cluster``, wait, delete its security groups
    and its bucket (``keep_bucket``: all but the bucket, which keeps the outputs).

    Holds the cluster's lock. Idempotent: with nothing tagged for the cluster
    it changes nothing and says so. Terminates rather than stops: a stopped
    instance still costs its disk and keeps the group in use. Transient API
    errors are retried with backoff (the provider's client); what still
    fails is returned in ``left_*`` and ``errors`` rather than raised, so the
    caller can say exactly what remains, and a second ``down`` finishes.
    """
    with cluster_lock(provider, cluster, "down", on_event):
        ids = [n.instance_id for n in provider.nodes(cluster)]
        errors: list[str] = []
        left: list[str] = []
        if ids:
            on_event(f"terminating {len(ids)} instance(s) of cluster {cluster}")
            try:
                provider.terminate(ids)
                provider.wait_terminated(cluster, ids, timeout=timeout, on_progress=on_event)
            except ProviderError as exc:
                errors.append(str(exc))
                left = [n.instance_id for n in provider.nodes(cluster)]
        groups: list[str] = []
        left_groups: list[str] = []
        if left:
            # A group still attached to an instance cannot go: say so, don't wait for it.
            found = provider.find_security_group(cluster)
            left_groups = [found] if found else []
        else:
            try:
                groups = provider.delete_security_groups(cluster, timeout=group_timeout)
            except ProviderError as exc:
                errors.append(str(exc))
                found = provider.find_security_group(cluster)
                left_groups = [found] if found else []
        if groups:
            on_event(f"deleted security group {', '.join(groups)}")
        buckets: list[str] = []
        left_buckets: list[str] = []
        if not keep_bucket:
            buckets, left_buckets = _delete_bucket(cluster, provider, errors, on_event)
        if not ids and not groups and not left_groups and not buckets and not left_buckets:
            on_event(
                f"nothing to remove: no instance, security group or bucket has "
                f"{TAG_CLUSTER}={cluster}"
            )
        removed = tuple(i for i in ids if i not in left)
        return DownResult(
            removed,
            tuple(groups),
            tuple(left),
            tuple(left_groups),
            tuple(errors),
            tuple(buckets),
            tuple(left_buckets),
        )


def _delete_bucket(
    cluster: str, provider: NodeProvider, errors: list[str], on_event: Progress
) -> tuple[list[str], list[str]]:
    """Empty and delete the cluster's bucket: ``([deleted], [left])``; a failure is
    added to ``errors`` and the bucket named as left, for a second ``down``."""
    if not isinstance(provider, BucketStore):
        return [], []
    try:
        bucket, objects = provider.delete_bucket(cluster)
    except ProviderError as exc:
        errors.append(str(exc))
        try:
            return [], [provider.bucket_name(cluster)]
        except ProviderError:
            return [], [f"the bucket of cluster {cluster}"]
    if bucket is None:
        return [], []
    on_event(f"deleted bucket {bucket} ({objects} object(s))")
    return [bucket], []


def status(
    cluster: str,
    provider: NodeProvider,
    *,
    zone: str | None = None,
    dns_check: DnsCheck | None = None,
) -> list[StatusRow]:
    """Every non-terminated node of the cluster, with its DNS name.

    ``zone`` defaults to the zone each node was tagged with at launch.
    ``dns_check`` (None: unknown) tells whether a name's record is present.
    """
    rows = []
    for node in provider.nodes(cluster):
        node_zone = zone or node.zone
        name = dns_name(node, node_zone) if node_zone else None
        present = dns_check(name) if dns_check is not None and name is not None else None
        rows.append(StatusRow(node, name, present))
    return rows


def list_clusters(provider: NodeProvider) -> list[ClusterSummary]:
    """Every cluster in the region with a live instance, a security group or a bucket left."""
    return provider.clusters()
