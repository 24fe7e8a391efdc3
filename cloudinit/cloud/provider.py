"""The node provider interface: what `tfcluster up/down/status/ls` need from a cloud.

A provider owns machines ("nodes") and one firewall group per cluster. Every
resource it creates carries the cluster's name as a tag, so that listing,
replacing and removing a cluster never depends on local state: the cloud is
the only record of what exists.

Node lifecycle (EC2's instance states, which other backends imitate)::

    pending --> running --> shutting-down --> terminated
        \\                        ^
         `--> stopping --> stopped

* ``launch`` returns nodes in ``pending`` (or already ``running``).
* ``terminate`` moves every given node towards ``terminated``; the call
  returns before they get there, ``wait_terminated`` waits.
* ``terminated`` is final. A terminated node still shows in listings for a
  while (EC2 keeps it about an hour), so listings leave it out unless asked.
* ``stopping``/``stopped`` nodes are never created by tfcluster; they are
  listed (they still cost storage and hold their index) and ``down``
  terminates them like any other.

Exceptions are named for what the caller does next: fix credentials
(`CredentialsError`), ask for permissions (`AccessDenied`), ask for a quota or
launch fewer (`LimitExceeded`), pick another image (`UnknownAMI`) or region
(`UnknownRegion`), check the network or endpoint (`EndpointUnreachable`,
`InvalidEndpoint`), wait for another run or clear its lock (`ClusterBusy`),
wait longer or look at the console (`ProviderTimeout`), or read the wrapped
cloud error (`LaunchFailed`, plain `ProviderError`). Each message is one line.

Clusters are selected by the exact value of their tag. Cloud filters may
treat ``*`` and ``?`` as wildcards, so a backend filters to narrow the
listing and then compares the tag value itself: ``demo`` never selects
``demo-prod``.

One ``up`` or ``down`` at a time per cluster: a run first takes the
cluster's lock, a resource whose creation the cloud makes atomic (a second
creation of the same name fails). The lock names its holder and expires, so
a lock left by a crashed run blocks the cluster only until then, or until
``tfcluster unlock`` removes it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tfcluster.cloudinit.stage.manifest import StagedObject

TAG_CLUSTER = "tfcluster:cluster"
TAG_ROLE = "tfcluster:role"
TAG_INDEX = "tfcluster:index"
TAG_ZONE = "tfcluster:zone"
TAG_EXPIRES = "tfcluster:expires"
"""On an instance: when ``max_lifetime`` shuts it down (ISO 8601, UTC)."""
TAG_LOCK_HOLDER = "tfcluster:lock-holder"
TAG_LOCK_EXPIRES = "tfcluster:lock-expires"

CONTROL_ROLE = "control"

PENDING = "pending"
RUNNING = "running"
SHUTTING_DOWN = "shutting-down"
TERMINATED = "terminated"
STOPPING = "stopping"
STOPPED = "stopped"
LIVE_STATES = (PENDING, RUNNING, SHUTTING_DOWN, STOPPING, STOPPED)
"""Every state but ``terminated``: what a cluster still holds."""

Progress = Callable[[str], None]


def no_progress(_message: str) -> None:
    """The default progress callback."""


class ProviderError(Exception):
    """A cloud operation failed; the message is one line meant for the operator."""


class CredentialsError(ProviderError):
    """No usable credentials: configure them and run again."""


class AccessDenied(ProviderError):
    """The credentials lack a permission: grant it (the message names the action)."""


class LimitExceeded(ProviderError):
    """An account quota is exhausted: raise it or ask for fewer or smaller nodes."""


class UnknownAMI(ProviderError):
    """The machine image does not exist in this region: pick another."""


class UnknownRegion(ProviderError):
    """No region given, or one the SDK does not know: pass a valid one."""


class EndpointUnreachable(ProviderError):
    """The API endpoint did not answer: check the network or the endpoint URL."""


class InvalidEndpoint(ProviderError):
    """The endpoint URL is malformed, or what answers there is not the cloud's API."""


class ClusterBusy(ProviderError):
    """Another ``up`` or ``down`` holds the cluster's lock: wait, or clear a stale one."""


class ProviderTimeout(ProviderError):
    """Nodes did not reach the awaited state in time; they may still get there."""


class LaunchFailed(ProviderError):
    """A launch failed for another reason; ``code`` holds the cloud's error code."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Node:
    """One machine of a cluster, as the cloud reports it right now.

    ``index`` is the task index: the explicit ``tfcluster:index`` tag of a
    replacement node, otherwise ``launch_index`` (EC2's ami-launch-index,
    which counts within one launch call of one role).
    """

    instance_id: str
    role: str
    index: int
    state: str
    private_ip: str | None
    launch_index: int
    zone: str | None = None
    expires: datetime | None = None
    explicit_index: bool = False
    """True for a replacement node, whose index comes from its tag."""
    public_ip: str | None = None
    key_name: str | None = None
    """The EC2 key pair it was launched with (ssh), or None."""

    @property
    def label(self) -> str:
        """``worker2``; the control node is ``control0``."""
        return f"{self.role}{self.index}"


@dataclass(frozen=True)
class PortRange:
    """A TCP port range opened between the cluster's own nodes."""

    from_port: int
    to_port: int
    purpose: str


@dataclass(frozen=True)
class LaunchSpec:
    """What every node of one launch shares besides its user-data."""

    image_id: str
    instance_type: str
    security_group_id: str
    subnet_id: str | None = None
    key_name: str | None = None
    spot: bool = False
    expires: datetime | None = None
    """When the nodes shut themselves down (``max_lifetime``); tagged for ``status``."""
    root_device: str | None = None
    disk_gb: int | None = None
    """The root volume's size (on ``root_device``, the image's); None: the image's own."""


X86_64 = "x86_64"
ARM64 = "arm64"
GO_ARCH = {X86_64: "amd64", ARM64: "arm64"}
"""EC2's architecture names -> Go's, which name the staged binaries."""


@dataclass(frozen=True)
class MachineType:
    """What an instance type runs: its CPU architecture (EC2's name: x86_64 or
    arm64), and its accelerator, if any (``nvidia``, ``neuron``, ``other``)."""

    name: str
    arch: str
    accelerator: str | None = None

    @property
    def go_arch(self) -> str:
        """Go's name of the architecture (amd64, arm64): the staged binaries' suffix."""
        return GO_ARCH[self.arch]


@dataclass(frozen=True)
class Image:
    """What matters about a machine image for launching it."""

    image_id: str
    arch: str
    root_device: str | None
    root_gb: int | None
    """The size of the image's root snapshot: a root volume cannot be smaller."""


@dataclass(frozen=True)
class ClusterLock:
    """The claim one ``up`` or ``down`` holds on a cluster until it releases it."""

    cluster: str
    lock_id: str
    holder: str
    expires: datetime

    def describe(self) -> str:
        return f"{self.holder}, until {self.expires:%Y-%m-%d %H:%M:%S} UTC"


@dataclass(frozen=True)
class ClusterSummary:
    """One cluster found by its tags: live nodes per state, firewall groups, a lock left."""

    name: str
    states: dict[str, int] = field(default_factory=dict)
    security_groups: tuple[str, ...] = ()
    lock: ClusterLock | None = None
    bucket: str | None = None
    """The cluster bucket, tagged for it (`BucketStore`), or None."""

    @property
    def live_nodes(self) -> int:
        return sum(self.states.values())


class NodeProvider(abc.ABC):
    """Nodes and the firewall group of clusters, found by the cluster tag.

    Implementations keep the number of API calls independent of the number
    of nodes: one launch call per role, listings by tag filter with
    pagination, waits that poll a listing rather than each node.
    """

    @abc.abstractmethod
    def acquire_lock(self, cluster: str, holder: str, ttl: float) -> ClusterLock:
        """Take the cluster's lock for ``ttl`` seconds, atomically, or raise `ClusterBusy`.

        A lock whose time is up is removed and taken afresh; the message of
        `ClusterBusy` names the holder and when its lock expires.
        """

    @abc.abstractmethod
    def release_lock(self, lock: ClusterLock) -> None:
        """Remove this lock (and only it); a lock already gone is no error."""

    @abc.abstractmethod
    def find_lock(self, cluster: str) -> ClusterLock | None:
        """The cluster's lock, expired or not, or None. Changes nothing."""

    @abc.abstractmethod
    def find_security_group(self, cluster: str) -> str | None:
        """The id of the cluster's group, or None. Changes nothing."""

    @abc.abstractmethod
    def ensure_security_group(
        self,
        cluster: str,
        ports: Sequence[PortRange],
        *,
        ssh_cidr: str | None = None,
        subnet_id: str | None = None,
        vpc_id: str | None = None,
    ) -> tuple[str, bool]:
        """Create the cluster's group if missing; return ``(group id, created)``.

        Guarantees on return: the group carries the cluster tag from its
        creation on, and admits TCP on each of ``ports`` only from members of
        the same group, plus port 22 from ``ssh_cidr`` when one is given.
        Nothing else is admitted. Missing rules of an existing group are added.
        A new group goes into ``vpc_id``, or the network of ``subnet_id``, or
        the default network.
        """

    @abc.abstractmethod
    def subnet_in(self, vpc_id: str) -> str:
        """A subnet of ``vpc_id`` to launch into when the config names only the VPC."""

    @abc.abstractmethod
    def delete_security_groups(self, cluster: str, *, timeout: float) -> list[str]:
        """Delete every group tagged for the cluster; return their ids.

        Call it after the nodes are terminated: a group still attached to a
        network interface cannot be deleted, and the attempt is retried until
        ``timeout`` (seconds) before `ProviderTimeout`. No group: no-op.
        """

    @abc.abstractmethod
    def resolve_image(self, parameter: str) -> str:
        """The image id that a public parameter (e.g. SSM) names right now."""

    @abc.abstractmethod
    def describe_image(self, image_id: str) -> Image:
        """The image's architecture and root device; `UnknownAMI` unless it exists
        here and may be launched."""

    @abc.abstractmethod
    def machine_types(self, names: Sequence[str]) -> dict[str, MachineType]:
        """Architecture and accelerator of each instance type, in one call;
        `ProviderError` naming any type this region does not offer."""

    @abc.abstractmethod
    def s3_route_problem(self, subnet_id: str | None) -> str | None:
        """Why instances launched into ``subnet_id`` (None: a default subnet of the
        default VPC) cannot reach S3, in one line; None when they can, or when it
        cannot be told. Changes nothing."""

    @abc.abstractmethod
    def launch(
        self,
        cluster: str,
        role: str,
        count: int,
        user_data: bytes,
        spec: LaunchSpec,
        *,
        index: int | None = None,
        zone: str | None = None,
    ) -> list[Node]:
        """Start ``count`` nodes of one role in ONE call, tagged at creation.

        One call makes the launch index of each node its task index. ``index``
        (only with ``count == 1``) marks a replacement node that carries its
        task index explicitly. Either every node starts or `ProviderError` is
        raised and none does.
        """

    @abc.abstractmethod
    def user_data(self, instance_id: str) -> bytes:
        """The node's user-data as it was launched with (before base64)."""

    @abc.abstractmethod
    def nodes(self, cluster: str, states: Sequence[str] = LIVE_STATES) -> list[Node]:
        """The cluster's nodes in ``states`` (default: every state but terminated)."""

    @abc.abstractmethod
    def clusters(self) -> list[ClusterSummary]:
        """Every cluster that still holds a live node, a firewall group or a lock (and,
        for a provider that is also a `BucketStore`, a bucket)."""

    @abc.abstractmethod
    def terminate(self, instance_ids: Sequence[str]) -> None:
        """Ask for the nodes to be terminated (not stopped); returns at once."""

    @abc.abstractmethod
    def wait_running(
        self,
        cluster: str,
        instance_ids: Sequence[str],
        *,
        timeout: float,
        on_progress: Progress = no_progress,
    ) -> list[Node]:
        """Wait until every node is running and has a private IP; return them.

        Bounded by ``timeout`` seconds (`ProviderTimeout`); a node that ends
        up terminated instead raises `LaunchFailed` at once.
        """

    @abc.abstractmethod
    def wait_terminated(
        self,
        cluster: str,
        instance_ids: Sequence[str],
        *,
        timeout: float,
        on_progress: Progress = no_progress,
    ) -> None:
        """Wait until every node is terminated (or gone); bounded by ``timeout``."""


class BucketStore(abc.ABC):
    """The cluster bucket: what ``up`` stages for instances, content-addressed.

    A provider that has one implements this beside `NodeProvider` (the EC2
    provider does, with S3). Lifecycle: ``up`` calls `ensure_bucket`, uploads
    the objects whose keys `bucket_keys` lacks, and renders each launch's
    user-data with `presign` URLs; a failed ``up`` that created the bucket,
    and every ``down``, call `delete_bucket`; ``ls`` reads `buckets`. The
    bucket carries the cluster tag, blocks public access and encrypts at rest.
    """

    @property
    @abc.abstractmethod
    def s3(self) -> Any:
        """The S3 client of the bucket calls: ``up`` signs the agents' report and
        output POSTs with it, ``status``, ``logs`` and ``fetch`` read through it."""

    @abc.abstractmethod
    def bucket_name(self, cluster: str) -> str:
        """The cluster's bucket name: the same on every call, for every run."""

    @abc.abstractmethod
    def find_bucket(self, cluster: str) -> str | None:
        """The cluster's bucket if it exists, or None. Changes nothing.

        `ProviderError` (a `BucketConflict`) when the name belongs to another
        account or is tagged for another cluster.
        """

    @abc.abstractmethod
    def ensure_bucket(self, cluster: str) -> tuple[str, bool]:
        """Create the bucket if missing, with its tag and settings; ``(name, created)``."""

    @abc.abstractmethod
    def bucket_keys(self, bucket: str) -> list[str]:
        """The staged objects' keys the bucket holds now."""

    @abc.abstractmethod
    def upload(self, bucket: str, objects: Sequence[StagedObject]) -> int:
        """Put each object under its key (no check for presence: pass the missing
        ones); return the bytes sent."""

    @abc.abstractmethod
    def presign(self, bucket: str, key: str, expiry: int) -> str:
        """A URL that reads ``key`` without credentials for ``expiry`` seconds (<= 7 days)."""

    @abc.abstractmethod
    def delete_bucket(self, cluster: str) -> tuple[str | None, int]:
        """Empty (every object and version) and delete the cluster's bucket;
        ``(name, objects deleted)``, or ``(None, 0)`` when there is none."""

    @abc.abstractmethod
    def buckets(self) -> dict[str, str]:
        """cluster -> bucket for every bucket tagged for a cluster in this region."""
