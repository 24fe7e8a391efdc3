"""Tags: how every resource of a cluster is found again, with nothing kept locally."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from tfcluster.cloudinit.cloud.provider import TAG_CLUSTER

PAGE_SIZE = 1000
"""Page size of listings by tag: a cluster of any size takes one call per 1000."""


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in resource.get("Tags", [])}


def of_cluster(resources: list[dict[str, Any]], cluster: str) -> list[dict[str, Any]]:
    """Only the resources whose cluster tag is exactly ``cluster``.

    EC2's tag filters treat ``*`` and ``?`` as wildcards: the filter narrows
    the listing, this comparison decides.
    """
    return [r for r in resources if tags_of(r).get(TAG_CLUSTER) == cluster]


def parse_time(value: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        return None


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")


def tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    """The TagSpecifications form of ``tags``."""
    return [{"Key": key, "Value": value} for key, value in tags.items()]
