"""Who this instance is: the role from the agent config, the task index from
the instance's ami-launch-index unless the config names one (a replacement
instance), the address and instance id from IMDS.

The config file itself (its keys, its validation) is ``agent_config.py``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from tfcluster.discovery.agent_config import AgentConfig, ConfigError
from tfcluster.discovery.records import Member


@dataclass(frozen=True)
class Identity:
    """This instance as a cluster member."""

    member: Member
    ip: str
    port: int
    instance_id: str


def resolve_identity(
    config: AgentConfig, launch_index: int, local_ipv4: str, instance_id: str
) -> Identity:
    """The member this instance is: explicit index first, else the launch index."""
    index = config.index if config.index is not None else launch_index
    count = config.count(config.role)
    if not 0 <= index < count:
        source = "index" if config.index is not None else "ami-launch-index"
        raise ConfigError(
            f"{source} {index} is out of range: the cluster has {count} {config.role} task(s)"
        )
    try:
        ipaddress.ip_address(local_ipv4)
    except ValueError:
        raise ConfigError(f"local-ipv4 {local_ipv4!r} is not an IP address") from None
    member = Member(config.role, index)
    return Identity(member, local_ipv4, config.port_of(member), instance_id)
