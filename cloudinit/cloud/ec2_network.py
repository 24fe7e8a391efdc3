"""Can instances in a subnet reach S3? Decided before launch from the VPC's own records.

Every instance fetches its binaries (and the agent) from the cluster bucket
by presigned URL. A subnet reaches S3 when its route table (the one
associated with it, else the VPC's main table) has

* an S3 gateway VPC endpoint (``com.amazonaws.<region>.s3``) attached, or
* a default route (0.0.0.0/0) to a NAT gateway, or
* a default route to an internet gateway, and the subnet gives instances a
  public IP at launch (``MapPublicIpOnLaunch``; `up` does not ask for one).

A default route to anything else (a transit gateway, a peering connection,
a firewall appliance) may well lead to the internet, but nothing here can
tell: it is taken as reaching. `s3_route_problem` is pure: the provider
reads the subnet, its table and the VPC's endpoints and passes them in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

ANYWHERE = "0.0.0.0/0"


def s3_service(region: str) -> str:
    """The service name of S3's gateway endpoint in ``region``."""
    return f"com.amazonaws.{region}.s3"


def s3_route_problem(
    subnet: Mapping[str, Any],
    table: Mapping[str, Any] | None,
    endpoints: Sequence[Mapping[str, Any]],
    region: str,
) -> str | None:
    """None when instances in ``subnet`` can reach S3; else one line saying why not.

    ``table`` is the subnet's route table (None: the VPC has none, which EC2
    never allows); ``endpoints`` the VPC's endpoints as DescribeVpcEndpoints
    answers them.
    """
    name = str(subnet["SubnetId"])
    if table is None:
        return f"subnet {name} has no route table: instances cannot reach S3"
    table_id = str(table["RouteTableId"])
    for endpoint in endpoints:
        if (
            endpoint.get("ServiceName") == s3_service(region)
            and endpoint.get("VpcEndpointType", "Gateway") == "Gateway"
            and endpoint.get("State", "available").lower() == "available"
            and table_id in endpoint.get("RouteTableIds", [])
        ):
            return None
    defaults = [
        route
        for route in table.get("Routes", [])
        if route.get("DestinationCidrBlock") == ANYWHERE and route.get("State") != "blackhole"
    ]
    fix = (
        "instances could not fetch their binaries from the cluster bucket; add a NAT "
        "gateway route or an S3 gateway endpoint to it, or use a public subnet (subnet_id)"
    )
    if not defaults:
        return (
            f"subnet {name} cannot reach S3: its route table {table_id} has no default "
            f"route (0.0.0.0/0) and no S3 gateway endpoint; {fix}"
        )
    route = defaults[0]
    gateway = str(route.get("GatewayId", ""))
    if gateway.startswith("igw-") and not subnet.get("MapPublicIpOnLaunch", False):
        return (
            f"subnet {name} cannot reach S3: its default route goes to internet gateway "
            f"{gateway}, but the subnet gives instances no public IP (MapPublicIpOnLaunch "
            f"is off) and {table_id} has no S3 gateway endpoint; {fix}"
        )
    return None
