"""The cluster as the operator sees it: EC2's instances joined with the agents'
reports, for ``status``, ``up``'s wait, ``logs`` and ``ssh``.

EC2 knows which instances exist and their addresses; the reports know how
far each agent got. Joined by the task's label (``worker1``): an instance
without a report shows ``NO REPORT``, a report without an instance (the
instance is gone, its last report stays in the bucket) shows EC2 state ``-``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from tfcluster.cloudinit.cloud.aws_errors import translate_errors
from tfcluster.cloudinit.cloud.provider import RUNNING, Node, NodeProvider
from tfcluster.cloudinit.observe import status
from tfcluster.cloudinit.observe.status import StatusRow
from tfcluster.cloudinit.observe.wait import Snapshot
from tfcluster.discovery.records import ROLES, parse_label


@dataclass(frozen=True)
class MemberView:
    """One member of the cluster: its instance (if EC2 lists one) and its agent's report."""

    name: str
    role: str
    index: int
    instance_id: str | None
    ec2_state: str | None
    address: str | None
    """The private address (EC2's, else the report's)."""
    public_address: str | None
    dns_name: str | None
    agent: StatusRow | None
    """None for the control node, which runs no agent."""


def expected_names(counts: Mapping[str, int]) -> list[str]:
    """``chief0, ps0, worker0, worker1`` for ``{"chief": 1, "ps": 1, "worker": 2}``."""
    return [f"{role}{i}" for role in ROLES for i in range(counts.get(role, 0))]


def read_rows(
    s3: Any, bucket: str, expected: Iterable[str], now: datetime | None = None
) -> list[StatusRow]:
    """The agents' rows from the bucket; S3 failures as one-line `ProviderError`."""
    with translate_errors(f"reading the agents' reports in bucket {bucket}"):
        reports = status.read_reports(s3, bucket)
    return status.status_rows(reports, now, expected=expected)


def read_row(s3: Any, bucket: str, name: str) -> StatusRow | None:
    """One agent's row (one GET); None while it has written no report."""
    with translate_errors(f"reading {name}'s report in bucket {bucket}"):
        report = status.read_report(s3, bucket, name)
    return None if report is None else status.row_of(report, datetime.now(timezone.utc))


def snapshot(nodes: Sequence[Node], rows: Sequence[StatusRow], expected: Sequence[str]) -> Snapshot:
    """What ``up`` shows while it waits: EC2's running instances and the agents' counts."""
    names = set(expected)
    mine = [n for n in nodes if n.label in names and n.role in ROLES]
    running = sum(1 for n in mine if n.state == RUNNING)
    instances = tuple((n.label, n.instance_id) for n in mine)
    return Snapshot(tuple(rows), status.progress(rows, expected), running, instances)


def reader(
    provider: NodeProvider, s3: Any, bucket: str, cluster: str, expected: Sequence[str]
) -> Callable[[], Snapshot]:
    """The reading `wait.wait_ready` polls: EC2's instances (one listing) and the
    reports (one LIST, one GET per agent), as a `Snapshot`."""

    def look() -> Snapshot:
        rows = read_rows(s3, bucket, expected)
        return snapshot(provider.nodes(cluster), rows, expected)

    return look


def cluster_view(nodes: Sequence[Node], rows: Sequence[StatusRow]) -> list[MemberView]:
    """Every instance and every report, joined by label, control node first."""
    by_name = {r.name: r for r in rows}
    views = []
    for node in nodes:
        agent = by_name.pop(node.label, None)
        task = node.role in ROLES
        zone_name = f"{node.label}.{node.zone}" if task and node.zone else None
        views.append(
            MemberView(
                name=node.label,
                role=node.role,
                index=node.index,
                instance_id=node.instance_id,
                ec2_state=node.state,
                address=node.private_ip or (agent.address if agent else None),
                public_address=node.public_ip,
                dns_name=(agent.dns_name if agent and agent.dns_name else zone_name),
                agent=agent if task else None,
            )
        )
    for name, row in by_name.items():
        member = parse_label(name)
        if member is None or row.state == status.NO_REPORT:
            continue  # an expected name with neither instance nor report
        views.append(
            MemberView(
                name, member.role, member.index, row.instance_id, None, row.address, None,
                row.dns_name, row,
            )
        )  # fmt: skip
    order = {role: i for i, role in enumerate(("control", *ROLES))}
    return sorted(views, key=lambda v: (order.get(v.role, len(order)), v.index, v.name))


def view_json(views: Sequence[MemberView]) -> list[dict[str, Any]]:
    """``status --json``: one object per member, the agent's fields under ``agent``."""
    out = []
    for view in views:
        item = asdict(view)
        item["agent"] = status.rows_json([view.agent])[0] if view.agent is not None else None
        out.append(item)
    return out


class SshUnavailable(ValueError):
    """The cluster cannot be reached by ssh as launched; the message says what is missing."""


def ssh_argv(
    node: Node,
    sources: Sequence[str],
    *,
    user: str = "ubuntu",
    identity: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``ssh`` command line for ``node``: its public address, else its private one.

    ``sources`` are the CIDRs the cluster's security group admits ssh from;
    without them, or without the key pair the instance was launched with,
    `SshUnavailable` says which config key to set (and that it takes a new
    ``up``: a key pair is fixed at launch).
    """
    missing = []
    if node.key_name is None:
        missing.append("key_name (the EC2 key pair; set at launch, so the instance must be new)")
    if not sources:
        missing.append("ssh_cidr (the addresses allowed to ssh in; 'up' adds the rule)")
    if missing:
        raise SshUnavailable(f"{node.label} cannot be reached by ssh: set {' and '.join(missing)}")
    address = node.public_ip or node.private_ip
    if address is None:
        raise SshUnavailable(f"{node.label} ({node.instance_id}) has no address yet")
    argv = ["ssh"]
    if identity is not None:
        argv += ["-i", identity]
    return [*argv, f"{user}@{address}", *extra]
