"""The bodies of `tfcluster up/status/down --local`: option checks, then `LocalCloud`.

`cli` imports this module only when ``--local`` is given, so the EC2 commands
load nothing of the local cloud.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tfcluster.cloudinit import cli_cluster
from tfcluster.cloudinit.localcloud.cloud import (
    READY_TIMEOUT,
    LocalCloud,
    LocalCloudError,
    training_program,
)
from tfcluster.cloudinit.observe import view
from tfcluster.cloudinit.terminal import (
    local_cluster,
    one_line_errors,
    print_nodes,
    progress,
    table,
)


def local_cloud(cluster: str, loopback: bool | None = None) -> LocalCloud:
    return LocalCloud(cluster, loopback=loopback)


def up_local(
    config_path: Path | None,
    overrides: dict[str, Any],
    endpoint_url: str | None,
    dry_run: bool,
    steps: int | None,
    loopback: bool,
    no_wait: bool = False,
    timeout: float | None = None,
) -> None:
    """``up --local``: the same provisioning against moto, then boot, and (unless
    ``no_wait``) the same wait on the agents' reports as on EC2, then the DNS table."""
    if config_path is not None:
        raise click.UsageError("--local takes its settings from options, not --config")
    if overrides.pop("region", None) is not None:
        raise click.UsageError("--local runs its own EC2 API; --region does not apply")
    cluster = local_cluster(overrides.pop("cluster", None), True, endpoint_url)
    cloud = local_cloud(cluster, True if loopback else None)
    if loopback and cloud.mode != "loopback":
        raise click.UsageError(f"local cluster {cluster} runs in {cloud.mode} mode; down it first")
    if steps is not None:
        overrides["program"] = training_program(steps)
    progress(f"starting the local cloud for cluster {cloud.cluster} ({cloud.mode} mode)")
    config = cloud.prepare(overrides)
    result = cloud.up(config, on_event=progress, dry_run=dry_run, wait=False)
    print_nodes(result, config.zone)
    if dry_run or no_wait:
        return
    done = cli_cluster.wait_until_ready(
        cloud.provider(),
        cluster,
        view.expected_names(config.counts),
        READY_TIMEOUT if timeout is None else timeout,
        local=True,
    )
    ended = done.program_ended() if done is not None else None
    try:
        entries = [] if ended else cloud.dns_table()
    except LocalCloudError:
        if cloud.find("chief0") is not None:
            raise
        ended = "ended"  # the chief powered off while it was asked
    if ended:
        click.echo(
            f"\nthe chief's program has {ended} already: no DNS to show "
            f"(see 'tfcluster logs chief 0 --local --cluster {cluster}' and 'tfcluster fetch')"
        )
        return
    click.echo("\nDNS, as the cluster's CoreDNS answers on the chief:")
    click.echo(table(("NAME", "ADDRESS", "PORT"), [(e.name, e.address, e.port) for e in entries]))
    chief = cloud.find("chief0")
    if chief is not None:
        click.echo(f"\nchief log (training output): {cloud.agent_log(chief)}")


def status_local(cluster: str) -> None:
    with one_line_errors():
        rows = local_cloud(cluster).status()
    if not rows:
        click.echo(f"local cluster {cluster}: no instances booted")
        return
    headers = ("INSTANCE", "ROLE", "INDEX", "STATE", "PRIVATE IP", "NAMESPACE", "PROCESSES",
               "BARRIER")  # fmt: skip
    click.echo(
        table(
            headers,
            [
                (
                    r.instance_id,
                    r.node.role if r.node else None,
                    r.node.index if r.node else None,
                    r.node.state if r.node else "unknown to EC2",
                    r.node.private_ip if r.node else None,
                    r.namespace,
                    r.processes,
                    {True: "passed", False: "waiting", None: None}[r.barrier_passed],
                )
                for r in rows
            ],
        )
    )
