"""EC2 instances of a cluster: the launch request, and reading nodes back from tags.

``run_instances_params`` is pure: the whole RunInstances request for one role,
so that what every launch asks EC2 for (tags at creation, IMDSv2 only,
terminate on shutdown, one-time spot, the root volume's size) can be read
and tested in one place.
"""

from __future__ import annotations

from typing import Any

from tfcluster.cloudinit.cloud.provider import (
    TAG_CLUSTER,
    TAG_EXPIRES,
    TAG_INDEX,
    TAG_ROLE,
    TAG_ZONE,
    LaunchFailed,
    LaunchSpec,
    Node,
)
from tfcluster.cloudinit.cloud.tags import iso, parse_time, tag_list, tags_of

METADATA_OPTIONS = {
    "HttpTokens": "required",
    "HttpEndpoint": "enabled",
    "HttpPutResponseHopLimit": 1,
}
"""IMDSv2 only; hop limit 1 keeps the metadata out of reach of containers."""

USER_DATA_LIMIT = 16384
"""EC2 rejects user-data above 16 KB (before base64)."""

TERMINATE_BATCH = 1000


def run_instances_params(
    cluster: str,
    role: str,
    count: int,
    user_data: bytes,
    spec: LaunchSpec,
    *,
    index: int | None = None,
    zone: str | None = None,
) -> dict[str, Any]:
    """The RunInstances request that starts ``count`` nodes of ``role`` in one call."""
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
        tags[TAG_EXPIRES] = iso(spec.expires)
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
            {"ResourceType": "instance", "Tags": tag_list(tags)},
            {"ResourceType": "volume", "Tags": tag_list({TAG_CLUSTER: cluster})},
        ],
    }
    if spec.disk_gb is not None and spec.root_device is not None:
        # The image's root device with our size; gp3, and gone with the instance.
        params["BlockDeviceMappings"] = [
            {
                "DeviceName": spec.root_device,
                "Ebs": {
                    "VolumeSize": spec.disk_gb,
                    "VolumeType": "gp3",
                    "DeleteOnTermination": True,
                },
            }
        ]
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
    return params


def node_of(instance: dict[str, Any]) -> Node:
    tags = tags_of(instance)
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
        explicit_index=explicit is not None,
        expires=parse_time(tags.get(TAG_EXPIRES)),
        public_ip=instance.get("PublicIpAddress") or None,
        key_name=instance.get("KeyName") or None,
    )
