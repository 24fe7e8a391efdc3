"""The commands on a running cluster, through its bucket: ``logs``, ``fetch``,
``ssh``, and the pieces ``up`` (its wait), ``status`` and ``down`` (its output
guard) share. Option parsing and printing only; the work is in `observe`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from tfcluster.cloudinit import provision, terminal
from tfcluster.cloudinit.cloud.aws_errors import translate_errors
from tfcluster.cloudinit.cloud.ec2 import Ec2Provider
from tfcluster.cloudinit.cloud.provider import RUNNING, BucketStore, NodeProvider, ProviderError
from tfcluster.cloudinit.observe import outputs, view, wait
from tfcluster.cloudinit.observe.status import NO_REPORT, StatusRow
from tfcluster.cloudinit.terminal import cluster_option, one_line_errors, table, time_left
from tfcluster.discovery.records import ROLES

region_option = click.option("--region", help="AWS region (default: boto3's configured one).")
endpoint_option = click.option(
    "--endpoint-url",
    envvar="TFCLUSTER_ENDPOINT_URL",
    help="EC2 and S3 API endpoint instead of AWS's, e.g. a moto server.",
)
cluster_required = click.option("--cluster", required=True, help="The cluster's name.")
cluster_or_local = click.option("--cluster", help="The cluster's name (with --local: 'local').")
role_argument = click.argument("role", type=click.Choice(ROLES))
index_argument = click.argument("index", type=click.IntRange(min=0))


local_option = click.option(
    "--local",
    is_flag=True,
    help="The local cloud's cluster (default name 'local'), through its moto server.",
)


def provider_for(
    cluster: str | None, local: bool, region: str | None, endpoint_url: str | None
) -> tuple[str, NodeProvider]:
    """The cluster's name and provider: EC2 (or --endpoint-url), or the local cloud's moto."""
    name = terminal.local_cluster(cluster, local, endpoint_url)
    if local:
        if region is not None:
            raise click.UsageError("--local runs its own EC2 API; --region does not apply")
        from tfcluster.cloudinit.localcloud import commands  # loaded only for --local

        return name, commands.local_cloud(name).provider()
    return name, Ec2Provider(region, endpoint_url=endpoint_url)


def bucket_of(provider: NodeProvider, cluster: str) -> str:
    """The cluster's bucket; `ProviderError` when there is none (nothing to read)."""
    bucket = provider.find_bucket(cluster) if isinstance(provider, BucketStore) else None
    if bucket is None:
        raise ProviderError(
            f"cluster {cluster} has no bucket: the agents had nowhere to report "
            "(no such cluster, or every binary is overridden in 'artifacts')"
        )
    return bucket


def _s3(provider: NodeProvider) -> Any:
    if not isinstance(provider, BucketStore):
        raise ProviderError("this cloud has no cluster bucket")
    return provider.s3


def _hint(cluster: str, local: bool = False) -> str:
    which = f"--cluster {cluster}" + (" --local" if local else "")
    return (
        f"the cluster is left running: look with 'tfcluster status {which}' "
        f"and 'tfcluster logs ROLE INDEX {which}'; remove it with "
        f"'tfcluster down {which}'"
    )


def _echo_log(row: StatusRow) -> None:
    """The last log lines an agent reported, to stderr."""
    lines = row.log[-wait.LOG_LINES_SHOWN :]
    click.echo(
        f"last log lines of {row.name}:" if lines else f"{row.name} reported no log lines",
        err=True,
    )
    for line in lines:
        click.echo(f"  {line}", err=True)


def _describe(row: StatusRow) -> str:
    """``BARRIER (waiting for worker1), heartbeat 4s`` for a stuck agent."""
    text = row.state
    if row.detail:
        text += f" ({row.detail})"
    if row.state == NO_REPORT:
        text += " (its agent never wrote a report: the instance's console output tells why)"
    if row.exit_code is not None:
        text += f", agent exit code {row.exit_code}"
    if row.program not in ("-", ""):
        text += f", program {row.program}"
    if row.age is not None:
        text += f", last report {row.age:.0f}s ago" + (" (stale)" if row.stale else "")
    return text


def wait_until_ready(
    provider: NodeProvider,
    cluster: str,
    expected: Sequence[str],
    timeout: float,
    *,
    local: bool = False,
) -> wait.Snapshot | None:
    """``up``'s wait: a live line until every agent serves, then the table; the
    last reading (None: no bucket, so nothing to wait on).

    On a failure or the timeout: one ``Error:`` line naming the stuck agent
    and its state, its last log lines, how to look and how to remove; exit 1.
    The cluster is not touched.
    """
    try:
        bucket = provider.find_bucket(cluster) if isinstance(provider, BucketStore) else None
    except ProviderError as exc:
        click.echo(f"Error: {exc}; {_hint(cluster, local)}", err=True)
        raise SystemExit(terminal.EXIT_PROVIDER) from None
    if bucket is None:
        click.echo(
            "not waiting: the cluster has no bucket for the agents' reports "
            "(every binary is overridden in 'artifacts')",
            err=True,
        )
        return None
    look = view.reader(provider, _s3(provider), bucket, cluster, expected)
    click.echo(f"waiting up to {timeout:g} s for {len(expected)} agent(s) to serve", err=True)
    try:
        with terminal.live_line() as show:
            done = wait.wait_ready(look, timeout=timeout, on_snapshot=lambda s: show(s.line()))
    except wait.NotReady as exc:
        row = exc.row
        if row is None:
            hint = _hint(cluster, local)
            click.echo(f"Error: cluster {cluster} not ready: {exc.reason}; {hint}", err=True)
        else:
            snapshot = exc.snapshot
            instance = (snapshot.instance_of(row.name) if snapshot else None) or row.instance_id
            click.echo(
                f"Error: cluster {cluster} not ready ({exc.reason}): {row.name} "
                f"({instance or 'no instance'}) is {_describe(row)}",
                err=True,
            )
            if row.state != NO_REPORT:
                _echo_log(row)
            waiting = [r for r in snapshot.rows if row.name in r.waiting_for] if snapshot else []
            if waiting:
                names = ", ".join(r.name for r in waiting)
                click.echo(f"waiting for {row.name} at their barrier: {names}", err=True)
                _echo_log(waiting[-1])
            click.echo(_hint(cluster, local), err=True)
        raise SystemExit(terminal.EXIT_PROVIDER) from None
    except ProviderError as exc:
        click.echo(f"Error: {exc}; {_hint(cluster, local)}", err=True)
        raise SystemExit(terminal.EXIT_PROVIDER) from None
    except KeyboardInterrupt:
        click.echo(f"Error: interrupted while waiting; {_hint(cluster, local)}", err=True)
        raise SystemExit(terminal.EXIT_INTERRUPTED) from None
    views = view.cluster_view(provider.nodes(cluster), done.rows)
    rows = [
        (v.name, v.instance_id, v.address, v.dns_name, v.agent.state if v.agent else None,
         v.agent.program if v.agent else None)
        for v in views
        if v.role in ROLES
    ]  # fmt: skip
    click.echo(table(("NAME", "INSTANCE", "ADDRESS", "DNS NAME", "STATE", "PROGRAM"), rows))
    return done


def show_status(
    cluster: str,
    provider: NodeProvider,
    as_json: bool,
    dns_check: provision.DnsCheck | None,
) -> None:
    """``status``: EC2's instances joined with the agents' reports."""
    with one_line_errors():
        nodes_rows = provision.status(cluster, provider, dns_check=dns_check)
        bucket = provider.find_bucket(cluster) if isinstance(provider, BucketStore) else None
        nodes = [r.node for r in nodes_rows]
        expected = [n.label for n in nodes if n.role in ROLES]
        rows = view.read_rows(_s3(provider), bucket, expected) if bucket else []
    views = view.cluster_view(nodes, rows)
    now = datetime.now(timezone.utc)
    by_id = {r.node.instance_id: r for r in nodes_rows}
    left = {r.node.instance_id: time_left(r.node, now) for r in nodes_rows}
    if as_json:
        members = view.view_json(views)
        for item in members:
            item["time_left"] = left.get(item["instance_id"])
            found = by_id.get(item["instance_id"])
            item["dns_record"] = found.dns_present if found else None
        click.echo(json.dumps({"cluster": cluster, "bucket": bucket, "members": members}, indent=1))
        return
    if not views:
        click.echo(f"cluster {cluster}: no instances and no reports")
        return
    if bucket is None:
        click.echo(f"cluster {cluster} has no bucket: no agent reports", err=True)
    headers = ["INSTANCE", "ROLE", "INDEX", "STATE", "ADDRESS", "DNS NAME", "AGENT", "HEARTBEAT",
               "PROGRAM"]  # fmt: skip
    if dns_check is not None:
        headers.append("DNS RECORD")
    headers.append("TIME LEFT")
    dns_words = {True: "present", False: "missing", None: "unknown"}
    out = []
    for v in views:
        agent = v.agent
        age = None
        if agent is not None and agent.age is not None:
            age = f"{agent.age:.0f}s" + (" STALE" if agent.stale else "")
        row: list[object] = [
            v.instance_id, v.role, v.index, v.ec2_state, v.address, v.dns_name,
            agent.state if agent else None, age, agent.program if agent else None,
        ]  # fmt: skip
        if dns_check is not None:
            found = by_id.get(v.instance_id or "")
            row.append(dns_words[found.dns_present] if found and found.dns_name else None)
        out.append([*row, left.get(v.instance_id or "")])
    click.echo(table(headers, out))


@click.command()
@role_argument
@index_argument
@cluster_or_local
@click.option("-f", "--follow", is_flag=True, help="Keep showing new lines as they are reported.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=wait.FOLLOW_TIMEOUT,
    show_default=True,
    help="With -f: seconds to follow at most.",
)
@region_option
@endpoint_option
@local_option
def logs(
    role: str,
    index: int,
    cluster: str | None,
    follow: bool,
    timeout: float,
    region: str | None,
    endpoint_url: str | None,
    local: bool,
) -> None:
    """Show the log of ROLE INDEX's agent (e.g. chief 0) as its reports carry it:
    the agent's lines and its program's output, at most the last 50 per report.

    With -f, follow new lines (read every 2 s) until the agent's program ends
    or the agent exits, or --timeout; Ctrl-C stops. Lines logged faster than
    the reports carry them are counted as not reported.
    """
    name = f"{role}{index}"
    with one_line_errors():
        cluster, provider = provider_for(cluster, local, region, endpoint_url)
        bucket = bucket_of(provider, cluster)
        s3 = _s3(provider)

        def emit(lines: Sequence[str]) -> None:
            for line in lines:
                click.echo(line)

        try:
            reason = wait.follow_log(
                lambda: view.read_row(s3, bucket, name), emit, follow=follow, timeout=timeout
            )
        except KeyboardInterrupt:
            raise SystemExit(terminal.EXIT_INTERRUPTED) from None
    if reason == "no report":
        click.echo(f"Error: {name} has written no report to bucket {bucket} yet", err=True)
        raise SystemExit(terminal.EXIT_PROVIDER)
    if follow:
        click.echo(f"({name}: {reason})", err=True)


@click.command()
@cluster_or_local
@click.option(
    "--to",
    "dest",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to download the outputs into (created).",
)
@region_option
@endpoint_option
@local_option
def fetch(
    cluster: str | None, dest: Path, region: str | None, endpoint_url: str | None, local: bool
) -> None:
    """Download the chief's outputs (the bucket's output/) into a folder.

    Each file is checked against the SHA-256 in the completion marker the
    chief writes once its program has exited and everything is uploaded;
    without the marker the outputs may be partial, and this says so. The
    fetch is recorded in the bucket, so that `down` (from any machine) no
    longer asks before deleting these outputs.
    """
    with one_line_errors():
        cluster, provider = provider_for(cluster, local, region, endpoint_url)
        bucket = bucket_of(provider, cluster)
        s3 = _s3(provider)
        with translate_errors(f"listing the outputs in bucket {bucket}"):
            listed = outputs.list_outputs(s3, bucket)
            if not [o for o in listed if o.key != outputs.COMPLETE_MARKER]:
                click.echo(f"Error: bucket {bucket} holds no outputs yet", err=True)
                raise SystemExit(terminal.EXIT_PROVIDER)
        try:
            with translate_errors(f"fetching the outputs of bucket {bucket}"):
                result = outputs.fetch(
                    s3, bucket, dest, on_file=lambda path, size: click.echo(f"{path}  {size}")
                )
        except (outputs.OutputError, OSError) as exc:
            click.echo(f"Error: {exc}", err=True)
            raise SystemExit(terminal.EXIT_PROVIDER) from None
    summary = f"fetched {len(result.files)} file(s), {result.bytes} bytes, into {dest}"
    if result.leftovers:
        click.echo(
            f"left {result.leftovers} object(s) in the bucket that the completion marker does "
            "not list (files the program deleted after an upload)",
            err=True,
        )
    if result.complete:
        click.echo(f"{summary}; complete ({result.verified} checked against the marker's SHA-256)")
    elif result.missing or result.skipped:
        gone = [*result.missing, *result.skipped]
        click.echo(
            f"{summary}; partial: {len(result.missing)} file(s) the completion marker lists are "
            f"not in the bucket and {len(result.skipped)} could not be uploaded "
            f"({', '.join(gone[:5])})"
        )
    else:
        click.echo(
            f"{summary}; partial: no completion marker yet (the program may still run, "
            "or it ended before its last upload)"
        )


def output_guard(
    provider: NodeProvider, cluster: str, *, yes: bool, keep_output: bool, purge: bool
) -> tuple[str | None, bool]:
    """What ``down`` does with the bucket: ``(bucket, keep it)``.

    A bucket kept by an earlier ``--keep-output`` stays unless ``--purge``.
    A bucket holding outputs not fetched in their current version is not
    deleted without ``--yes``: exit 1 with one line naming the ways on.
    """
    bucket = provider.find_bucket(cluster) if isinstance(provider, BucketStore) else None
    if bucket is None:
        return None, False
    s3 = _s3(provider)
    with translate_errors(f"reading the tags and outputs of bucket {bucket}"):
        kept = outputs.kept_since(s3, bucket)
        if keep_output or (kept is not None and not purge):
            return bucket, True
        pending = outputs.unfetched(s3, bucket)
    if pending and not yes:
        click.echo(
            f"Error: bucket {bucket} holds {len(pending)} output file(s) not fetched: run "
            f"'tfcluster fetch --cluster {cluster} --to DIR' first, or down --keep-output "
            "to keep only the bucket, or --yes to delete them",
            err=True,
        )
        raise SystemExit(terminal.EXIT_PROVIDER)
    return bucket, False


def keep_bucket(provider: NodeProvider, cluster: str, bucket: str) -> None:
    """Tag the kept bucket (``ls`` lists it) and say how it goes."""
    with translate_errors(f"tagging bucket {bucket} as kept"):
        outputs.mark_kept(_s3(provider), bucket)
    click.echo(
        f"kept bucket {bucket} with the outputs; 'tfcluster fetch --cluster {cluster} --to DIR' "
        f"reads them, 'tfcluster down --cluster {cluster} --purge' removes it"
    )


@click.command()
@role_argument
@index_argument
@cluster_required
@click.option("--user", default="ubuntu", show_default=True, help="Login name on the instance.")
@click.option("-i", "--identity", help="Private key file for the cluster's key pair.")
@click.argument("ssh_args", nargs=-1, type=click.UNPROCESSED)
@region_option
@endpoint_option
def ssh(
    role: str,
    index: int,
    cluster: str,
    user: str,
    identity: str | None,
    ssh_args: tuple[str, ...],
    region: str | None,
    endpoint_url: str | None,
) -> None:
    """Open a shell on ROLE INDEX's instance (its public address, else its private one).

    Needs a cluster launched with key_name (the EC2 key pair) and ssh_cidr
    (the addresses let in on port 22); otherwise says which is missing.
    Arguments after -- go to ssh (a command to run, options).
    """
    name = f"{role}{index}"
    with one_line_errors():
        cluster = cluster_option(cluster)
        provider = Ec2Provider(region, endpoint_url=endpoint_url)
        node = next(
            (n for n in provider.nodes(cluster, (RUNNING,)) if n.label == name and n.role in ROLES),
            None,
        )
        if node is None:
            click.echo(f"Error: cluster {cluster} has no running instance for {name}", err=True)
            raise SystemExit(terminal.EXIT_PROVIDER)
        try:
            argv = view.ssh_argv(
                node, provider.ssh_sources(cluster), user=user, identity=identity, extra=ssh_args
            )
        except view.SshUnavailable as exc:
            click.echo(f"Error: {exc}", err=True)
            raise SystemExit(terminal.EXIT_USAGE) from None
    os.execvp(argv[0], argv)
