"""The EC2 backend of `NodeProvider`, on boto3.

Every call goes through one client with connect/read timeouts and bounded
retries in botocore's standard mode. Retrying RunInstances is safe: botocore
fills its ClientToken once per call, so a retried request cannot start a
second set of instances. Every botocore failure leaves this module as one of
the typed `ProviderError`s of `tfcluster.cloudinit.provider`.

Resources are tagged at creation (TagSpecifications), never afterwards: an
instance or group that exists is always findable by its cluster tag, even if
the process dies between two calls. ``endpoint_url`` points the client
elsewhere than AWS, e.g. at a moto server for the local cloud.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar
from urllib.parse import urlsplit

import boto3
import botocore.config
import botocore.exceptions
import botocore.parsers

from tfcluster.cloudinit.provider import (
    LIVE_STATES,
    RUNNING,
    SHUTTING_DOWN,
    STOPPED,
    STOPPING,
    TAG_CLUSTER,
    TAG_EXPIRES,
    TAG_INDEX,
    TAG_LOCK_EXPIRES,
    TAG_LOCK_HOLDER,
    TAG_ROLE,
    TAG_ZONE,
    TERMINATED,
    AccessDenied,
    ClusterBusy,
    ClusterLock,
    ClusterSummary,
    CredentialsError,
    EndpointUnreachable,
    InvalidEndpoint,
    LaunchFailed,
    LaunchSpec,
    LimitExceeded,
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

METADATA_OPTIONS = {
    "HttpTokens": "required",
    "HttpEndpoint": "enabled",
    "HttpPutResponseHopLimit": 1,
}
"""IMDSv2 only; hop limit 1 keeps the metadata out of reach of containers."""

USER_DATA_LIMIT = 16384
"""EC2 rejects user-data above 16 KB (before base64)."""

PAGE_SIZE = 1000
"""DescribeInstances page size: listing a cluster takes one call per 1000 nodes."""

TERMINATE_BATCH = 1000

LOCK_PREFIX = "tfcluster-lock-"
"""The cluster's lock is the EC2 key pair ``tfcluster-lock-<cluster>``: key pair
names are unique in a region (whatever the VPC), CreateKeyPair of a taken name
fails atomically, and a key pair costs nothing. Its private key is discarded."""

_CREDENTIAL_ERRORS = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.CredentialRetrievalError,
    botocore.exceptions.ProfileNotFound,
    botocore.exceptions.TokenRetrievalError,
    botocore.exceptions.SSOError,
)
_UNREACHABLE_ERRORS = (
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
)
_CREDENTIAL_CODES = frozenset(
    {
        "AuthFailure",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "RequestExpired",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
    }
)
_ACCESS_CODES = frozenset({"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"})
_LIMIT_CODES = frozenset(
    {
        "InstanceLimitExceeded",
        "MaxSpotInstanceCountExceeded",
        "RulesPerSecurityGroupLimitExceeded",
        "SecurityGroupLimitExceeded",
        "VcpuLimitExceeded",
    }
)


def _one_line(text: str) -> str:
    """AWS messages may span lines or carry an encoded policy blob; keep the gist."""
    text = text.split("Encoded authorization failure message")[0]
    return " ".join(text.split()).rstrip(".")


def known_regions(session: boto3.session.Session) -> frozenset[str]:
    """EC2 regions of every partition botocore knows (from its bundled data, no call)."""
    return frozenset(
        region
        for partition in session.get_available_partitions()
        for region in session.get_available_regions("ec2", partition_name=partition)
    )


_BotoFailure = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    botocore.parsers.ResponseParserError,
)
"""What a botocore call raises when it fails: its own errors, the cloud's, and an
answer it cannot parse (not a BotoCoreError: an endpoint that is not the API)."""


def as_provider_error(
    exc: Exception,
    action: str,
    *,
    launching: bool = False,
) -> ProviderError:
    """The typed provider error for a botocore failure while doing ``action``.

    With ``launching`` an unrecognised cloud error is a `LaunchFailed`.
    """
    if isinstance(exc, _CREDENTIAL_ERRORS):
        return CredentialsError(
            f"no usable AWS credentials ({_one_line(str(exc))}): set AWS_PROFILE or "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(exc, botocore.exceptions.NoRegionError):
        return UnknownRegion("no AWS region: pass --region or set AWS_REGION")
    if isinstance(exc, _UNREACHABLE_ERRORS):
        return EndpointUnreachable(f"{action}: {_one_line(str(exc))}")
    if isinstance(exc, botocore.parsers.ResponseParserError):
        return InvalidEndpoint(
            f"{action}: the endpoint's answer is not the EC2 API's (it could not be parsed)"
        )
    if not isinstance(exc, botocore.exceptions.ClientError):
        return ProviderError(f"{action}: {type(exc).__name__}: {_one_line(str(exc))}")
    error = exc.response.get("Error", {})
    code = str(error.get("Code", "Unknown"))
    message = _one_line(str(error.get("Message", "")))
    if code in _CREDENTIAL_CODES:
        return CredentialsError(f"AWS rejected the credentials ({code}): {message}")
    if code in _ACCESS_CODES:
        return AccessDenied(f"not allowed to call {exc.operation_name} ({code}): {message}")
    if code in _LIMIT_CODES:
        return LimitExceeded(f"{action}: {code}: {message}")
    if code.startswith("InvalidAMIID") or code == "ParameterNotFound":
        return UnknownAMI(f"{action}: {code}: {message}")
    if launching:
        return LaunchFailed(f"{action}: {code}: {message}", code=code)
    return ProviderError(f"{action}: {code}: {message}")


@contextlib.contextmanager
def translate_errors(action: str, *, launching: bool = False) -> Iterator[None]:
    """Raise every botocore failure inside the block as its `as_provider_error`."""
    try:
        yield
    except _BotoFailure as exc:
        raise as_provider_error(exc, action, launching=launching) from exc


def _error_code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def check_endpoint_url(url: str) -> str:
    """``url`` if it can be an API endpoint (http(s)://HOST[:PORT]); else `InvalidEndpoint`."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidEndpoint(
            f"endpoint-url: must look like http://HOST:PORT or https://HOST, got {url!r}"
        )
    return url


def _answered_by_the_api(http_response: Any, parsed: dict[str, Any], model: Any, **_: Any) -> None:
    """Every answer of the AWS APIs, errors included, carries a request id. A web page
    from whatever else answers at the endpoint (a proxy's sign-in page) parses as an
    empty result instead of failing: refuse it, before it reads as "nothing there"."""
    if not parsed.get("ResponseMetadata", {}).get("RequestId"):
        kind = http_response.headers.get("content-type", "no content type")
        raise InvalidEndpoint(
            f"{model.name}: what answers at the endpoint is not the AWS API ({kind}, no request id)"
        )


def _tags(resource: dict[str, Any]) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in resource.get("Tags", [])}


def _of_cluster(resources: list[dict[str, Any]], cluster: str) -> list[dict[str, Any]]:
    """Only the resources whose cluster tag is exactly ``cluster``.

    EC2's tag filters treat ``*`` and ``?`` as wildcards: the filter narrows
    the listing, this comparison decides.
    """
    return [r for r in resources if _tags(r).get(TAG_CLUSTER) == cluster]


def _timestamp(value: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        return None


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")


def _node(instance: dict[str, Any]) -> Node:
    tags = _tags(instance)
    launch_index = int(instance.get("AmiLaunchIndex", 0))
    explicit = tags.get(TAG_INDEX)
    return Node(
        instance_id=instance["InstanceId"],
        role=tags.get(TAG_ROLE, "unknown"),
        index=int(explicit) if explicit is not None else launch_index,
        state=instance["State"]["Name"],
        private_ip=instance.get("PrivateIpAddress") or None,
        launch_index=launch_index,
        zone=tags.get(TAG_ZONE),
        expires=_timestamp(tags.get(TAG_EXPIRES)),
    )


def _lock(pair: dict[str, Any], cluster: str) -> ClusterLock:
    """The lock a key pair stands for; one without a readable expiry expires at its creation."""
    tags = _tags(pair)
    created = pair.get("CreateTime") or datetime.now(timezone.utc)
    return ClusterLock(
        cluster=cluster,
        lock_id=str(pair["KeyPairId"]),
        holder=tags.get(TAG_LOCK_HOLDER, "an unknown holder"),
        expires=_timestamp(tags.get(TAG_LOCK_EXPIRES)) or created,
    )


def _tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": key, "Value": value} for key, value in tags.items()]


Rule = tuple[str, int | None, int | None, str, str]
"""(protocol, from port, to port, source kind, source): one flattened ingress rule."""


def _flatten(permissions: Sequence[dict[str, Any]]) -> set[Rule]:
    """EC2 groups sources under one permission per port range; compare them one by one."""
    rules: set[Rule] = set()
    for perm in permissions:
        head = (perm["IpProtocol"], perm.get("FromPort"), perm.get("ToPort"))
        rules.update((*head, "group", pair["GroupId"]) for pair in perm.get("UserIdGroupPairs", []))
        rules.update((*head, "cidr", item["CidrIp"]) for item in perm.get("IpRanges", []))
        rules.update((*head, "cidr6", item["CidrIpv6"]) for item in perm.get("Ipv6Ranges", []))
        rules.update(
            (*head, "prefix", item["PrefixListId"]) for item in perm.get("PrefixListIds", [])
        )
    return rules


def _permission(rule: Rule, description: str | None = None) -> dict[str, Any]:
    protocol, from_port, to_port, kind, source = rule
    perm: dict[str, Any] = {"IpProtocol": protocol}
    if from_port is not None:
        perm["FromPort"] = from_port
    if to_port is not None:
        perm["ToPort"] = to_port
    extra = {"Description": description} if description else {}
    if kind == "group":
        perm["UserIdGroupPairs"] = [{"GroupId": source, **extra}]
    elif kind == "cidr":
        perm["IpRanges"] = [{"CidrIp": source, **extra}]
    elif kind == "cidr6":
        perm["Ipv6Ranges"] = [{"CidrIpv6": source, **extra}]
    else:
        perm["PrefixListIds"] = [{"PrefixListId": source}]
    return perm


class Ec2Provider(NodeProvider):
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

    def _client(self, service: str) -> Any:
        with translate_errors(f"setting up the {service} client"):
            client = self._session.client(
                service,
                region_name=self.region,
                endpoint_url=self.endpoint_url,
                config=CLIENT_CONFIG,
            )
        client.meta.events.register("after-call.*.*", _answered_by_the_api)
        return client

    # -- lock -------------------------------------------------------------------

    def acquire_lock(self, cluster: str, holder: str, ttl: float) -> ClusterLock:
        name = f"{LOCK_PREFIX}{cluster}"
        for _attempt in range(2):
            expires = datetime.now(timezone.utc) + timedelta(seconds=ttl)
            tags = {TAG_CLUSTER: cluster, TAG_LOCK_HOLDER: holder, TAG_LOCK_EXPIRES: _iso(expires)}
            try:
                pair = self.ec2.create_key_pair(
                    KeyName=name,
                    TagSpecifications=[{"ResourceType": "key-pair", "Tags": _tag_list(tags)}],
                )
                return ClusterLock(cluster, str(pair["KeyPairId"]), holder, expires)
            except botocore.exceptions.ClientError as exc:
                if _error_code(exc) != "InvalidKeyPair.Duplicate":
                    raise as_provider_error(exc, f"taking the lock of cluster {cluster}") from exc
            except (botocore.exceptions.BotoCoreError, botocore.parsers.ResponseParserError) as exc:
                raise as_provider_error(exc, f"taking the lock of cluster {cluster}") from exc
            held = self.find_lock(cluster)
            if held is not None and held.expires > datetime.now(timezone.utc):
                raise ClusterBusy(
                    f"cluster {cluster} is busy: {held.describe()}; wait for it to finish, or "
                    f"if that run is gone, run 'tfcluster unlock --cluster {cluster}'"
                )
            if held is not None:
                log.info("removing the expired lock of cluster %s (%s)", cluster, held.holder)
                self.release_lock(held)
        raise ClusterBusy(f"cluster {cluster} is busy: its lock changed hands twice; try again")

    def release_lock(self, lock: ClusterLock) -> None:
        # Deleted by name once its id is checked (moto ignores KeyPairId in
        # DeleteKeyPair): a lock another run has taken since has another id and stays.
        held = self.find_lock(lock.cluster)
        if held is None or held.lock_id != lock.lock_id:
            return
        with translate_errors(f"releasing the lock of cluster {lock.cluster}"):
            self.ec2.delete_key_pair(KeyName=f"{LOCK_PREFIX}{lock.cluster}")

    def _key_pairs(self, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with translate_errors("listing cluster locks"):
            return list(self.ec2.describe_key_pairs(Filters=filters)["KeyPairs"])

    def find_lock(self, cluster: str) -> ClusterLock | None:
        name = f"{LOCK_PREFIX}{cluster}"
        pairs = self._key_pairs([{"Name": "key-name", "Values": [name]}])
        found = [p for p in pairs if p.get("KeyName") == name]
        return _lock(found[0], cluster) if found else None

    # -- security group -------------------------------------------------------

    def _groups(self, cluster: str | None) -> list[dict[str, Any]]:
        """Groups with the cluster tag (any cluster when ``cluster`` is None)."""
        tag_filter = (
            {"Name": "tag-key", "Values": [TAG_CLUSTER]}
            if cluster is None
            else {"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]}
        )
        groups: list[dict[str, Any]] = []
        with translate_errors("listing security groups"):
            pages = self.ec2.get_paginator("describe_security_groups").paginate(
                Filters=[tag_filter], PaginationConfig={"PageSize": PAGE_SIZE}
            )
            for page in pages:
                groups.extend(page["SecurityGroups"])
        return groups if cluster is None else _of_cluster(groups, cluster)

    def find_security_group(self, cluster: str) -> str | None:
        groups = self._groups(cluster)
        return str(groups[0]["GroupId"]) if groups else None

    def ensure_security_group(
        self,
        cluster: str,
        ports: Sequence[PortRange],
        *,
        ssh_cidr: str | None = None,
        subnet_id: str | None = None,
        vpc_id: str | None = None,
    ) -> tuple[str, bool]:
        groups = self._groups(cluster)
        created = not groups
        if created:
            group_id = self._create_group(cluster, subnet_id, vpc_id)
            existing: set[Rule] = set()
        else:
            group_id = str(groups[0]["GroupId"])
            existing = _flatten(groups[0].get("IpPermissions", []))
        wanted = {("tcp", p.from_port, p.to_port, "group", group_id): p.purpose for p in ports}
        if ssh_cidr is not None:
            wanted[("tcp", 22, 22, "cidr6" if ":" in ssh_cidr else "cidr", ssh_cidr)] = "ssh"
        missing = [_permission(rule, wanted[rule]) for rule in wanted if rule not in existing]
        extra = [_permission(rule) for rule in sorted(existing - set(wanted), key=str)]
        with translate_errors(f"setting the rules of security group {group_id}"):
            if missing:
                self.ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=missing)
            if extra:
                self.ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=extra)
        return group_id, created

    def _create_group(self, cluster: str, subnet_id: str | None, vpc_id: str | None) -> str:
        params: dict[str, Any] = {
            "GroupName": f"tfcluster-{cluster}",
            "Description": f"tfcluster {cluster}: traffic between the cluster's nodes",
            "TagSpecifications": [
                {
                    "ResourceType": "security-group",
                    "Tags": _tag_list({TAG_CLUSTER: cluster, "Name": f"tfcluster-{cluster}"}),
                }
            ],
        }
        with translate_errors("creating the security group"):
            if vpc_id is not None:
                params["VpcId"] = vpc_id
            elif subnet_id is not None:
                subnets = self.ec2.describe_subnets(SubnetIds=[subnet_id])["Subnets"]
                params["VpcId"] = subnets[0]["VpcId"]
            return str(self.ec2.create_security_group(**params)["GroupId"])

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

    def delete_security_groups(self, cluster: str, *, timeout: float) -> list[str]:
        group_ids = [str(group["GroupId"]) for group in self._groups(cluster)]
        remaining = list(group_ids)

        def delete_remaining() -> bool | None:
            for group_id in list(remaining):
                if self._delete_group(group_id):
                    remaining.remove(group_id)
            return True if not remaining else None

        self._wait(delete_remaining, f"security groups {group_ids} to be deletable", timeout)
        return group_ids

    def _delete_group(self, group_id: str) -> bool:
        """True once the group is gone; False while an interface still uses it."""
        try:
            self.ec2.delete_security_group(GroupId=group_id)
        except botocore.exceptions.ClientError as exc:
            code = _error_code(exc)
            if code == "DependencyViolation":
                log.debug("security group %s still in use", group_id)
                return False
            if code != "InvalidGroup.NotFound":
                raise as_provider_error(exc, f"deleting security group {group_id}") from exc
        except (botocore.exceptions.BotoCoreError, botocore.parsers.ResponseParserError) as exc:
            raise as_provider_error(exc, f"deleting security group {group_id}") from exc
        return True

    # -- images -----------------------------------------------------------------

    def resolve_image(self, parameter: str) -> str:
        if self._ssm is None:
            self._ssm = self._client("ssm")
        with translate_errors(f"resolving the image parameter {parameter}"):
            return str(self._ssm.get_parameter(Name=parameter)["Parameter"]["Value"])

    def check_image(self, image_id: str) -> None:
        with translate_errors(f"looking up image {image_id}"):
            images = self.ec2.describe_images(ImageIds=[image_id])["Images"]
        if not images or images[0].get("State", "available") != "available":
            raise UnknownAMI(f"image {image_id} is not available in {self.region}")

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
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        if index is not None and count != 1:
            raise ValueError("an explicit index needs count == 1")
        if len(user_data) > USER_DATA_LIMIT:
            raise LaunchFailed(
                f"user-data for {role} is {len(user_data)} bytes; EC2 accepts {USER_DATA_LIMIT}"
            )
        tags = {TAG_CLUSTER: cluster, TAG_ROLE: role}
        if zone is not None:
            tags[TAG_ZONE] = zone
        if index is not None:
            tags[TAG_INDEX] = str(index)
        if spec.expires is not None:
            tags[TAG_EXPIRES] = _iso(spec.expires)
        tags["Name"] = f"{cluster}-{role}" if index is None else f"{cluster}-{role}{index}"
        params: dict[str, Any] = {
            "ImageId": spec.image_id,
            "InstanceType": spec.instance_type,
            # MinCount == MaxCount: all of the role's tasks start, or none does.
            "MinCount": count,
            "MaxCount": count,
            "UserData": user_data,
            "SecurityGroupIds": [spec.security_group_id],
            "MetadataOptions": METADATA_OPTIONS,
            # A node that powers itself off is gone, not a stopped leftover.
            "InstanceInitiatedShutdownBehavior": "terminate",
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": _tag_list(tags)},
                {"ResourceType": "volume", "Tags": _tag_list({TAG_CLUSTER: cluster})},
            ],
        }
        if spec.subnet_id is not None:
            params["SubnetId"] = spec.subnet_id
        if spec.key_name is not None:
            params["KeyName"] = spec.key_name
        if spec.spot:
            # One-time requests close once fulfilled: nothing outlives the instances.
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {
                    "SpotInstanceType": "one-time",
                    "InstanceInterruptionBehavior": "terminate",
                },
            }
        with translate_errors(f"launching {count} {role} node(s)", launching=True):
            reservation = self.ec2.run_instances(**params)
        return [_node(instance) for instance in reservation["Instances"]]

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
            (_node(i) for i in _of_cluster(instances, cluster)),
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
            per_state = states.setdefault(_tags(instance)[TAG_CLUSTER], {})
            state = instance["State"]["Name"]
            per_state[state] = per_state.get(state, 0) + 1
        groups: dict[str, list[str]] = {}
        for group in self._groups(None):
            groups.setdefault(_tags(group)[TAG_CLUSTER], []).append(str(group["GroupId"]))
        locks = {}
        for pair in self._key_pairs([{"Name": "tag-key", "Values": [TAG_CLUSTER]}]):
            name = _tags(pair)[TAG_CLUSTER]
            if pair.get("KeyName") == f"{LOCK_PREFIX}{name}":
                locks[name] = _lock(pair, name)
        return [
            ClusterSummary(name, states.get(name, {}), tuple(groups.get(name, ())), locks.get(name))
            for name in sorted(states.keys() | groups.keys() | locks.keys())
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
