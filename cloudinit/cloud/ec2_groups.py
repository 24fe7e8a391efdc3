"""The cluster's security group on EC2: found by tag, rules made exact, deleted when free.

A group admits TCP on the given ports only from its own members, plus ssh
from one CIDR when asked; ``ensure`` adds missing rules and revokes any
other, so a group edited by hand converges again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import botocore.exceptions
import botocore.parsers

from tfcluster.cloudinit.cloud.aws_errors import as_provider_error, error_code, translate_errors
from tfcluster.cloudinit.cloud.provider import TAG_CLUSTER, PortRange
from tfcluster.cloudinit.cloud.tags import PAGE_SIZE, of_cluster, tag_list

log = logging.getLogger(__name__)

Wait = Callable[[Callable[[], "bool | None"], str, float], object]
"""The provider's bounded wait: (check, what, timeout)."""

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


class SecurityGroups:
    """The security groups of clusters, through one EC2 client."""

    def __init__(self, ec2: Any) -> None:
        self.ec2 = ec2

    def listed(self, cluster: str | None) -> list[dict[str, Any]]:
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
        return groups if cluster is None else of_cluster(groups, cluster)

    def find(self, cluster: str) -> str | None:
        groups = self.listed(cluster)
        return str(groups[0]["GroupId"]) if groups else None

    def ssh_sources(self, cluster: str) -> list[str]:
        """The CIDRs the cluster's group admits on port 22 (empty: no ssh)."""
        groups = self.listed(cluster)
        rules = _flatten(groups[0].get("IpPermissions", [])) if groups else set()
        return sorted(
            source
            for _proto, low, high, kind, source in rules
            if kind in ("cidr", "cidr6") and low is not None and high is not None
            and low <= 22 <= high
        )  # fmt: skip

    def ensure(
        self,
        cluster: str,
        ports: Sequence[PortRange],
        *,
        ssh_cidr: str | None = None,
        subnet_id: str | None = None,
        vpc_id: str | None = None,
    ) -> tuple[str, bool]:
        groups = self.listed(cluster)
        created = not groups
        if created:
            group_id = self._create(cluster, subnet_id, vpc_id)
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

    def _create(self, cluster: str, subnet_id: str | None, vpc_id: str | None) -> str:
        params: dict[str, Any] = {
            "GroupName": f"tfcluster-{cluster}",
            "Description": f"tfcluster {cluster}: traffic between the cluster's nodes",
            "TagSpecifications": [
                {
                    "ResourceType": "security-group",
                    "Tags": tag_list({TAG_CLUSTER: cluster, "Name": f"tfcluster-{cluster}"}),
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

    def delete(self, cluster: str, *, wait: Wait, timeout: float) -> list[str]:
        group_ids = [str(group["GroupId"]) for group in self.listed(cluster)]
        remaining = list(group_ids)

        def delete_remaining() -> bool | None:
            for group_id in list(remaining):
                if self._delete(group_id):
                    remaining.remove(group_id)
            return True if not remaining else None

        wait(delete_remaining, f"security groups {group_ids} to be deletable", timeout)
        return group_ids

    def _delete(self, group_id: str) -> bool:
        """True once the group is gone; False while an interface still uses it."""
        try:
            self.ec2.delete_security_group(GroupId=group_id)
        except botocore.exceptions.ClientError as exc:
            code = error_code(exc)
            if code == "DependencyViolation":
                log.debug("security group %s still in use", group_id)
                return False
            if code != "InvalidGroup.NotFound":
                raise as_provider_error(exc, f"deleting security group {group_id}") from exc
        except (botocore.exceptions.BotoCoreError, botocore.parsers.ResponseParserError) as exc:
            raise as_provider_error(exc, f"deleting security group {group_id}") from exc
        return True
