"""The EC2 backend of `NodeProvider`, on boto3.

Every call goes through one client with connect/read timeouts and bounded
retries in botocore's standard mode. Retrying RunInstances is safe: botocore
fills its ClientToken once per call, so a retried request cannot start a
second set of instances. Every botocore failure leaves this room as one of
the typed `ProviderError`s of `provider` (the table is in `aws_errors`).

Resources are tagged at creation (TagSpecifications), never afterwards: an
instance or group that exists is always findable by its cluster tag, even if
the process dies between two calls. ``endpoint_url`` points the client
elsewhere than AWS, e.g. at a moto server for the local cloud.

This module holds the instances and the waits, and makes the calls whose
answers `ec2_images` (image and root volume per role) and `ec2_network` (can
a subnet reach S3) decide on; the security group (`ec2_groups`), the lock
(`ec2_lock`) and the cluster bucket on S3 (`bucket`, the `BucketStore` side)
each have their own.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import boto3
import botocore.config

from tfcluster.cloudinit.cloud.aws_errors import (
    answered_by_the_api,
    check_endpoint_url,
    known_regions,
    translate_errors,
)
from tfcluster.cloudinit.cloud.bucket import ClusterBuckets
from tfcluster.cloudinit.cloud.ec2_groups import SecurityGroups
from tfcluster.cloudinit.cloud.ec2_images import image_of, machine_of
from tfcluster.cloudinit.cloud.ec2_instances import TERMINATE_BATCH, node_of, run_instances_params
from tfcluster.cloudinit.cloud.ec2_lock import ClusterLocks
from tfcluster.cloudinit.cloud.ec2_network import s3_route_problem
from tfcluster.cloudinit.cloud.provider import (
    LIVE_STATES,
    RUNNING,
    SHUTTING_DOWN,
    STOPPED,
    STOPPING,
    TAG_CLUSTER,
    TERMINATED,
    AccessDenied,
    BucketStore,
    ClusterLock,
    ClusterSummary,
    Image,
    LaunchFailed,
    LaunchSpec,
    MachineType,
    Node,
    NodeProvider,
    PortRange,
    Progress,
    ProviderError,
    ProviderTimeout,
    UnknownAMI,
    UnknownRegion,
    no_progress,
)
from tfcluster.cloudinit.cloud.tags import (
    PAGE_SIZE,
    of_cluster,
    tags_of,
)
from tfcluster.cloudinit.stage.manifest import StagedObject
from tfcluster.discovery.waiting import WaitTimeout, wait_for

log = logging.getLogger(__name__)

T = TypeVar("T")

CLIENT_CONFIG = botocore.config.Config(
    connect_timeout=5,
    read_timeout=30,
    retries={"mode": "standard", "max_attempts": 5},
)
"""Each attempt is bounded by the timeouts; throttling and transient errors
are retried at most 4 times with backoff, anything else fails at once."""


S3_CONFIG = CLIENT_CONFIG.merge(botocore.config.Config(signature_version="s3v4"))
"""S3 gets the same bounds; presigned URLs are SigV4 (SigV2 is refused in newer regions)."""


class Ec2Provider(NodeProvider, BucketStore):
    """Clusters of EC2 instances in one region.

    ``ec2`` is the boto3 client every EC2 call goes through (tests register
    botocore event hooks on it). ``poll_interval``/``max_poll_interval`` pace
    the waits, which back off between the two.
    """

    def __init__(
        self,
        region: str | None = None,
        *,
        endpoint_url: str | None = None,
        session: boto3.session.Session | None = None,
        poll_interval: float = 2.0,
        max_poll_interval: float = 15.0,
    ) -> None:
        with translate_errors("reading the AWS configuration"):
            self._session = session or boto3.session.Session()
            resolved = region or self._session.region_name
        if not resolved:
            raise UnknownRegion("no AWS region: pass --region or set AWS_REGION")
        if endpoint_url is not None:
            check_endpoint_url(endpoint_url)
        elif resolved not in known_regions(self._session):
            raise UnknownRegion(
                f"unknown AWS region {resolved!r} (not in botocore's list of EC2 regions)"
            )
        self.region: str = resolved
        self.endpoint_url = endpoint_url
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.ec2: Any = self._client("ec2")
        self._ssm: Any = None
        self._buckets_: ClusterBuckets | None = None
        self._groups = SecurityGroups(self.ec2)
        self._locks = ClusterLocks(self.ec2)

    def _client(self, service: str) -> Any:
        config = CLIENT_CONFIG
        if service == "s3":
            # A custom endpoint (moto) serves buckets by path, not by host name.
            style = "path" if self.endpoint_url else "virtual"
            config = S3_CONFIG.merge(botocore.config.Config(s3={"addressing_style": style}))
        with translate_errors(f"setting up the {service} client"):
            client = self._session.client(
                service,
                region_name=self.region,
                endpoint_url=self.endpoint_url,
                config=config,
            )
        client.meta.events.register("after-call.*.*", answered_by_the_api)
        return client

    # -- lock (ec2_lock) ----------------------------------------------------------

    def acquire_lock(self, cluster: str, holder: str, ttl: float) -> ClusterLock:
        return self._locks.acquire(cluster, holder, ttl)

    def release_lock(self, lock: ClusterLock) -> None:
        self._locks.release(lock)

    def find_lock(self, cluster: str) -> ClusterLock | None:
        return self._locks.find(cluster)

    # -- security group (ec2_groups) ----------------------------------------------

    def find_security_group(self, cluster: str) -> str | None:
        return self._groups.find(cluster)

    def ensure_security_group(
        self,
        cluster: str,
        ports: Sequence[PortRange],
        *,
        ssh_cidr: str | None = None,
        subnet_id: str | None = None,
        vpc_id: str | None = None,
    ) -> tuple[str, bool]:
        return self._groups.ensure(
            cluster, ports, ssh_cidr=ssh_cidr, subnet_id=subnet_id, vpc_id=vpc_id
        )

    def ssh_sources(self, cluster: str) -> list[str]:
        """The CIDRs the cluster's security group admits ssh from (``ssh_cidr``)."""
        return self._groups.ssh_sources(cluster)

    def delete_security_groups(self, cluster: str, *, timeout: float) -> list[str]:
        return self._groups.delete(cluster, wait=self._wait, timeout=timeout)

    def subnet_in(self, vpc_id: str) -> str:
        with translate_errors(f"listing the subnets of {vpc_id}"):
            subnets = self.ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])
        available = sorted(
            (s["AvailabilityZone"], s["SubnetId"])
            for s in subnets["Subnets"]
            if s.get("State", "available") == "available"
        )
        if not available:
            raise ProviderError(f"{vpc_id} has no available subnet to launch into")
        return str(available[0][1])

    # -- cluster bucket (bucket) -------------------------------------------------

    @property
    def _buckets(self) -> ClusterBuckets:
        """S3 and STS clients are made on first use: a run that stages nothing makes none."""
        if self._buckets_ is None:
            self._buckets_ = ClusterBuckets(self._client("s3"), self._client("sts"), self.region)
        return self._buckets_

    @property
    def s3(self) -> Any:
        """The S3 client every bucket call goes through (tests register hooks on it)."""
        return self._buckets.s3

    def bucket_name(self, cluster: str) -> str:
        return self._buckets.name(cluster)

    def find_bucket(self, cluster: str) -> str | None:
        return self._buckets.find(cluster)

    def ensure_bucket(self, cluster: str) -> tuple[str, bool]:
        return self._buckets.ensure(cluster)

    def bucket_keys(self, bucket: str) -> list[str]:
        return self._buckets.keys(bucket)

    def upload(self, bucket: str, objects: Sequence[StagedObject]) -> int:
        return self._buckets.upload(bucket, objects)

    def presign(self, bucket: str, key: str, expiry: int) -> str:
        return self._buckets.presign(bucket, key, expiry)

    def delete_bucket(self, cluster: str) -> tuple[str | None, int]:
        return self._buckets.delete(cluster)

    def buckets(self) -> dict[str, str]:
        return self._buckets.tagged()

    # -- images -----------------------------------------------------------------

    def resolve_image(self, parameter: str) -> str:
        if self._ssm is None:
            self._ssm = self._client("ssm")
        with translate_errors(f"resolving the image parameter {parameter}"):
            return str(self._ssm.get_parameter(Name=parameter)["Parameter"]["Value"])

    def describe_image(self, image_id: str) -> Image:
        with translate_errors(f"looking up image {image_id}"):
            images = self.ec2.describe_images(ImageIds=[image_id])["Images"]
        if not images or images[0].get("State", "available") != "available":
            raise UnknownAMI(f"image {image_id} is not available in {self.region}")
        return image_of(images[0])

    def machine_types(self, names: Sequence[str]) -> dict[str, MachineType]:
        wanted = sorted(set(names))
        with translate_errors(f"looking up instance types {', '.join(wanted)}"):
            answer = self.ec2.describe_instance_types(InstanceTypes=wanted)["InstanceTypes"]
        found = {m.name: m for m in map(machine_of, answer)}
        missing = [name for name in wanted if name not in found]
        if missing:
            raise ProviderError(f"{self.region} offers no instance type {', '.join(missing)}")
        return found

    # -- network ----------------------------------------------------------------

    def s3_route_problem(self, subnet_id: str | None) -> str | None:
        try:
            return self._s3_route_problem(subnet_id)
        except AccessDenied as exc:
            # A check the credentials may not allow: say so, but do not stop the launch.
            return f"cannot check the route to S3: {exc}"

    def _s3_route_problem(self, subnet_id: str | None) -> str | None:
        with translate_errors("checking the subnet's route to S3"):
            if subnet_id is not None:
                subnets = self.ec2.describe_subnets(SubnetIds=[subnet_id])["Subnets"]
            else:
                subnets = self.ec2.describe_subnets(
                    Filters=[{"Name": "default-for-az", "Values": ["true"]}]
                )["Subnets"]
                if not subnets:
                    return f"{self.region} has no default VPC: set subnet_id or vpc_id"
            vpc_id = subnets[0]["VpcId"]
            tables = self.ec2.describe_route_tables(
                Filters=[{"Name": "vpc-id", "Values": [vpc_id]}]
            )["RouteTables"]
            endpoints = self.ec2.describe_vpc_endpoints(
                Filters=[{"Name": "vpc-id", "Values": [vpc_id]}]
            )["VpcEndpoints"]
        # EC2 picks the default subnet: a problem only if every one of them has it.
        problems = [
            s3_route_problem(subnet, _table_of(subnet, tables), endpoints, self.region)
            for subnet in subnets
        ]
        return None if None in problems else problems[0]

    # -- instances --------------------------------------------------------------

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
        params = run_instances_params(cluster, role, count, user_data, spec, index=index, zone=zone)
        with translate_errors(f"launching {count} {role} node(s)", launching=True):
            reservation = self.ec2.run_instances(**params)
        return [node_of(instance) for instance in reservation["Instances"]]

    def user_data(self, instance_id: str) -> bytes:
        with translate_errors(f"reading the user-data of {instance_id}"):
            answer = self.ec2.describe_instance_attribute(
                InstanceId=instance_id, Attribute="userData"
            )
        encoded = answer.get("UserData", {}).get("Value")
        if not encoded:
            raise ProviderError(f"{instance_id} has no user-data")
        return base64.b64decode(encoded)

    def _describe(self, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
        instances: list[dict[str, Any]] = []
        with translate_errors("listing instances"):
            pages = self.ec2.get_paginator("describe_instances").paginate(
                Filters=filters, PaginationConfig={"PageSize": PAGE_SIZE}
            )
            for page in pages:
                for reservation in page["Reservations"]:
                    instances.extend(reservation["Instances"])
        return instances

    def nodes(self, cluster: str, states: Sequence[str] = LIVE_STATES) -> list[Node]:
        instances = self._describe(
            [
                {"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]},
                {"Name": "instance-state-name", "Values": list(states)},
            ]
        )
        return sorted(
            (node_of(i) for i in of_cluster(instances, cluster)),
            key=lambda n: (n.role, n.index, n.instance_id),
        )

    def clusters(self) -> list[ClusterSummary]:
        instances = self._describe(
            [
                {"Name": "tag-key", "Values": [TAG_CLUSTER]},
                {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
            ]
        )
        states: dict[str, dict[str, int]] = {}
        for instance in instances:
            per_state = states.setdefault(tags_of(instance)[TAG_CLUSTER], {})
            state = instance["State"]["Name"]
            per_state[state] = per_state.get(state, 0) + 1
        groups: dict[str, list[str]] = {}
        for group in self._groups.listed(None):
            groups.setdefault(tags_of(group)[TAG_CLUSTER], []).append(str(group["GroupId"]))
        locks = self._locks.all()
        buckets = self.buckets()
        return [
            ClusterSummary(
                name,
                states.get(name, {}),
                tuple(groups.get(name, ())),
                locks.get(name),
                buckets.get(name),
            )
            for name in sorted(states.keys() | groups.keys() | locks.keys() | buckets.keys())
        ]

    def terminate(self, instance_ids: Sequence[str]) -> None:
        ids = list(instance_ids)
        with translate_errors("terminating instances"):
            for start in range(0, len(ids), TERMINATE_BATCH):
                self.ec2.terminate_instances(InstanceIds=ids[start : start + TERMINATE_BATCH])

    # -- waiting ----------------------------------------------------------------

    def _wait(self, check: Callable[[], T | None], what: str, timeout: float) -> T:
        try:
            return wait_for(
                check,
                what=what,
                timeout=timeout,
                interval=self.poll_interval,
                max_interval=self.max_poll_interval,
            )
        except WaitTimeout as exc:
            raise ProviderTimeout(str(exc)) from exc

    def wait_running(
        self,
        cluster: str,
        instance_ids: Sequence[str],
        *,
        timeout: float,
        on_progress: Progress = no_progress,
    ) -> list[Node]:
        wanted = set(instance_ids)
        reported: list[int] = []

        def check() -> list[Node] | None:
            # One listing of the cluster per poll, whatever the number of nodes.
            found = [
                n
                for n in self.nodes(cluster, (*LIVE_STATES, TERMINATED))
                if n.instance_id in wanted
            ]
            for node in found:
                if node.state in (SHUTTING_DOWN, TERMINATED, STOPPING, STOPPED):
                    raise LaunchFailed(f"{node.instance_id} ({node.label}) went {node.state}")
            ready = [n for n in found if n.state == RUNNING and n.private_ip is not None]
            if not reported or reported[-1] != len(ready):
                reported.append(len(ready))
                on_progress(f"{len(ready)}/{len(wanted)} instances running")
            return ready if len(ready) == len(wanted) else None

        return self._wait(check, f"{len(wanted)} instances to run", timeout)

    def wait_terminated(
        self,
        cluster: str,
        instance_ids: Sequence[str],
        *,
        timeout: float,
        on_progress: Progress = no_progress,
    ) -> None:
        wanted = set(instance_ids)
        reported: list[int] = []

        def check() -> bool | None:
            live = {n.instance_id for n in self.nodes(cluster)}
            done = len(wanted - live)
            if not reported or reported[-1] != done:
                reported.append(done)
                on_progress(f"{done}/{len(wanted)} instances terminated")
            return True if done == len(wanted) else None

        self._wait(check, f"{len(wanted)} instances to terminate", timeout)


def _table_of(subnet: dict[str, Any], tables: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The route table a subnet uses: its own association, else the VPC's main table."""
    for table in tables:
        if any(a.get("SubnetId") == subnet["SubnetId"] for a in table.get("Associations", [])):
            return table
    for table in tables:
        if any(a.get("Main") for a in table.get("Associations", [])):
            return table
    return None
