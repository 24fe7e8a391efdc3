"""The tfcluster command line: a thin layer over library functions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import click

from tfcluster.cloudinit import cli_cluster, plan, provision, terminal
from tfcluster.cloudinit.cloud.ec2 import Ec2Provider
from tfcluster.cloudinit.config import (
    INSTANCE_ROLES,
    Artifact,
    parse_overrides,
)
from tfcluster.cloudinit.observe import view, wait
from tfcluster.cloudinit.render.userdata import RenderError, render_parts, render_user_data
from tfcluster.cloudinit.terminal import (
    cluster_option,
    confirm_launch,
    load_config,
    local_cluster,
    one_line_errors,
    print_nodes,
    progress,
    sigterm_interrupts,
    table,
)
from tfcluster.discovery.cli import main as main  # the tfcluster group; these load lazily


def commands() -> ModuleType:
    """The local cloud's command bodies, imported only for --local."""
    from tfcluster.cloudinit.localcloud import commands as local_commands

    return local_commands


_region_option = click.option("--region", help="AWS region (default: boto3's configured one).")
_endpoint_option = click.option(
    "--endpoint-url",
    envvar="TFCLUSTER_ENDPOINT_URL",
    help="EC2 API endpoint instead of AWS's, e.g. a moto server.",
)
_local_option = click.option(
    "--local",
    is_flag=True,
    help="The local cloud: moto as the EC2 API, instances booted on this machine (root).",
)


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Cluster config (tfcluster.yaml); options below override it.",
)
@click.option("--cluster", help="Cluster name (overrides the config's).")
@_region_option
@click.option("--workers", type=int, help="Number of workers.")
@click.option("--ps", type=int, help="Number of parameter servers.")
@click.option(
    "--program-dir",
    metavar="DIR",
    help="A folder staged in the cluster bucket and unpacked on the chief as its "
    "program's working directory (the config's program_dir).",
)
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted for nested keys).")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option(
    "--yes",
    is_flag=True,
    help="Launch without asking, also when the cluster is larger than max_instances "
    "or uses GPU instance types.",
)
@_endpoint_option
@_local_option
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    help="With --local: the chief trains the built-in model for this many steps.",
)
@click.option(
    "--loopback",
    is_flag=True,
    help="With --local: each instance on a 127.77.0.x address instead of a network "
    "namespace (no root needed; the default when namespaces are not available).",
)
@click.option(
    "--no-wait",
    is_flag=True,
    help="Return once the instances run, without waiting for the agents to serve.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    help=f"Seconds to wait for every agent to serve (boot, install, names, barrier, TF); "
    f"default {wait.READY_TIMEOUT:g}.",
)
def up(
    config_path: Path | None,
    cluster: str | None,
    region: str | None,
    workers: int | None,
    ps: int | None,
    program_dir: str | None,
    settings: tuple[str, ...],
    dry_run: bool,
    yes: bool,
    endpoint_url: str | None,
    local: bool,
    steps: int | None,
    loopback: bool,
    no_wait: bool,
    timeout: float | None,
) -> None:
    """Launch the cluster, or the part of it that is missing, and wait until it serves.

    Prints the instances per type first, and asks before launching more than
    max_instances (default 16) or GPU instances. Ctrl-C or SIGTERM rolls back
    what this run created; a second one stops the rollback and prints what is
    left. One up or down of a cluster runs at a time (a lock in the cloud).

    Then it waits (unless --no-wait) with a live line: instances running,
    names claimed, barrier passed, TF serving, read from the agents' reports
    in the cluster bucket; it ends with a table of names, addresses and
    states. If an agent fails or --timeout passes, it names the stuck agent,
    its state and last log lines and exits 1, leaving the cluster up for
    `status`, `logs` and `down`.

    With --local, moto plays EC2 and S3 and every instance runs its own
    user-data on this machine; the wait is the same.
    """
    if steps is not None and not local:
        raise click.UsageError("--steps applies to --local only (set 'program' in the config)")
    if loopback and not local:
        raise click.UsageError("--loopback applies to --local only")
    with one_line_errors(), sigterm_interrupts():
        overrides = parse_overrides(settings)
        named = {
            "cluster": cluster,
            "region": region,
            "workers": workers,
            "ps": ps,
            "program_dir": program_dir,
        }
        overrides.update({key: value for key, value in named.items() if value is not None})
        if local:
            commands().up_local(
                config_path, overrides, endpoint_url, dry_run, steps, loopback, no_wait, timeout
            )
            return
        config = load_config(config_path, overrides)
        provider = Ec2Provider(config.region, endpoint_url=endpoint_url)
        result = provision.up(
            config,
            provider,
            dry_run=dry_run,
            on_event=progress,
            confirm=confirm_launch(yes),
        )
    print_nodes(result, config.zone)
    if not dry_run and not no_wait:
        expected = view.expected_names(config.counts)
        cli_cluster.wait_until_ready(
            provider, config.cluster, expected, wait.READY_TIMEOUT if timeout is None else timeout
        )


@click.command()
@click.option("--cluster", help="Cluster to remove (with --local: default 'local').")
@_region_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=provision.TERMINATE_TIMEOUT,
    show_default=True,
    help="Seconds to wait for the instances to terminate, and again for the security group.",
)
@click.option(
    "--keep-output",
    is_flag=True,
    help="Remove everything but the bucket, which keeps the outputs (tagged; 'ls' lists it).",
)
@click.option("--purge", is_flag=True, help="Also delete a bucket an earlier --keep-output kept.")
@_endpoint_option
@_local_option
def down(
    cluster: str | None,
    region: str | None,
    yes: bool,
    timeout: float,
    keep_output: bool,
    purge: bool,
    endpoint_url: str | None,
    local: bool,
) -> None:
    """Terminate every instance of the cluster, delete its security group and empty
    and delete its bucket.

    Says what it removed; if anything could not be removed in time, lists it
    and exits 1 (run down again to finish). A second down is a no-op.

    A bucket holding outputs that nobody fetched (`tfcluster fetch`) is not
    deleted without --yes: down refuses in one line and changes nothing.
    --keep-output leaves only the bucket; a later down leaves it too, until
    down --purge.

    With --local, also remove every process, namespace, interface and file
    the local cloud made for the cluster (after a crash too).
    """
    cluster = local_cluster(cluster, local, endpoint_url)
    if keep_output and purge:
        raise click.UsageError("--keep-output keeps the bucket, --purge deletes it: give one")
    if local and (keep_output or purge):
        raise click.UsageError("--keep-output and --purge apply to EC2 clusters only")
    with one_line_errors():
        if local:
            if not yes:
                click.confirm(f"Remove local cluster {cluster} and everything it runs?", abort=True)
            removed = commands().local_cloud(cluster).down(on_event=progress)
            click.echo(f"removed {len(removed)} item(s)" if removed else "nothing to remove")
            return
        provider = Ec2Provider(region, endpoint_url=endpoint_url)
        bucket, keep = cli_cluster.output_guard(
            provider, cluster, yes=yes, keep_output=keep_output, purge=purge
        )
        if not yes:
            what = "security group" if keep else "security group and bucket"
            click.confirm(
                f"Terminate every instance of cluster {cluster} in {provider.region} "
                f"and delete its {what}?",
                abort=True,
            )
        result = provision.down(
            cluster,
            provider,
            on_event=progress,
            timeout=timeout,
            group_timeout=timeout,
            keep_bucket=keep,
        )
        if keep and bucket is not None:
            cli_cluster.keep_bucket(provider, cluster, bucket)
    removed = len(result.terminated) + len(result.security_groups) + len(result.buckets)
    if removed:
        click.echo(
            f"removed {len(result.terminated)} instance(s), "
            f"{len(result.security_groups)} security group(s) and "
            f"{len(result.buckets)} bucket(s) of cluster {cluster}"
        )
    if not result.complete:
        for error in result.errors:
            click.echo(f"warning: {error}", err=True)
        click.echo(
            f"Error: left {result.describe_left()}; run 'tfcluster down --cluster {cluster}' "
            "again to finish",
            err=True,
        )
        raise SystemExit(terminal.EXIT_PROVIDER)


@click.command()
@click.option("--cluster", help="Cluster to show (with --local: default 'local').")
@_region_option
@_endpoint_option
@click.option(
    "--etcd",
    "etcd_endpoint",
    help="the cluster's etcd, http://HOST:2379 (reachable from here), to show whether "
    "each DNS record is present",
)
@click.option("--json", "as_json", is_flag=True, help="The same as a JSON document, for scripts.")
@_local_option
def status(
    cluster: str | None,
    region: str | None,
    endpoint_url: str | None,
    etcd_endpoint: str | None,
    as_json: bool,
    local: bool,
) -> None:
    """One line per member of the cluster: its instance and EC2 state, address,
    DNS name, and from its agent's last report the agent's state, the age of
    that report (STALE when older than 3 heartbeats) and its program's state."""
    cluster = local_cluster(cluster, local, endpoint_url)
    if local:
        with one_line_errors():
            provider = commands().local_cloud(cluster).provider()
        cli_cluster.show_status(cluster, provider, as_json, None)
        if not as_json:  # and what runs of it on this machine
            commands().status_local(cluster)
        return
    dns_check = _record_check(cluster, etcd_endpoint) if etcd_endpoint is not None else None
    with one_line_errors():
        provider = Ec2Provider(region, endpoint_url=endpoint_url)
    cli_cluster.show_status(cluster, provider, as_json, dns_check)


def _record_check(cluster: str, endpoint: str) -> Callable[[str], bool | None]:
    """Whether etcd holds a name's record: one read per zone; None if etcd fails."""
    from tfcluster.discovery import etcdclient
    from tfcluster.discovery.registry import RegistryError, held_names

    held: dict[str, set[str] | None] = {}

    def check(name: str) -> bool | None:
        zone = name.split(".", 1)[1]
        if zone not in held:
            try:
                held[zone] = held_names(etcdclient.connect(endpoint), cluster, zone)
            except (ValueError, RegistryError) as exc:
                click.echo(f"warning: DNS records unknown: {exc}", err=True)
                held[zone] = None
        names = held[zone]
        return None if names is None else name in names

    return check


@click.command(name="ls")
@_region_option
@_endpoint_option
def list_clusters(region: str | None, endpoint_url: str | None) -> None:
    """Every cluster in the region that still holds instances, a security group or a
    bucket (a bucket alone is what a failed down leaves)."""
    with one_line_errors():
        provider = Ec2Provider(region, endpoint_url=endpoint_url)
        clusters = provision.list_clusters(provider)
    if not clusters:
        click.echo(f"no clusters in {provider.region}")
        return
    rows = [
        (
            c.name,
            c.live_nodes,
            ", ".join(f"{n} {state}" for state, n in sorted(c.states.items())),
            ", ".join(c.security_groups),
            c.bucket,
            c.lock.describe() if c.lock else None,
        )
        for c in clusters
    ]
    headers = ("CLUSTER", "INSTANCES", "STATES", "SECURITY GROUPS", "BUCKET", "LOCK")
    click.echo(table(headers, rows))


@click.command()
@click.option("--cluster", required=True, help="Cluster whose lock to remove.")
@_region_option
@_endpoint_option
def unlock(cluster: str, region: str | None, endpoint_url: str | None) -> None:
    """Remove the lock a crashed up or down left on the cluster.

    Only for a lock whose run is gone (the lock names its holder and host;
    it also expires by itself after an hour): removing the lock of a run
    still going lets a second up launch beside it.
    """
    with one_line_errors():
        cluster = cluster_option(cluster)
        provider = Ec2Provider(region, endpoint_url=endpoint_url)
        lock = provider.find_lock(cluster)
        if lock is None:
            click.echo(f"cluster {cluster} has no lock")
            return
        provider.release_lock(lock)
    click.echo(f"removed the lock of cluster {cluster} ({lock.describe()})")


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path))
@click.option("--role", required=True, type=click.Choice(INSTANCE_ROLES))
@click.option("--index", type=click.IntRange(min=0), help="Explicit task index (replacement).")
@click.option("--etcd-endpoint", "etcd_endpoints", multiple=True, metavar="URL",
              help="etcd client URL, e.g. the control node's http://10.0.0.5:2379.")  # fmt: skip
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted for nested keys), as `up` does.")  # fmt: skip
@click.option("--raw", is_flag=True, help="Write the exact user-data bytes (maybe gzip).")
def render(
    config_path: Path,
    role: str,
    index: int | None,
    etcd_endpoints: tuple[str, ...],
    overrides: tuple[str, ...],
    raw: bool,
) -> None:
    """Print the user-data one instance of ROLE would receive: readable parts,
    or with --raw the exact bytes RunInstances gets.

    What `up` would stage (binaries, wheel, constraints, program bundle) is
    shown with its SHA-256 (computed here) and a stand-in URL: the presigned
    URL exists only once `up` has signed it."""
    with one_line_errors():
        config = load_config(config_path, parse_overrides(overrides))
        endpoints = list(etcd_endpoints) or None
        staged = {
            plan.fetch_name(o): Artifact(
                f"https://cluster-bucket.invalid/{o.key}?presigned-by-up", o.sha256
            )
            for o in plan.staged_objects(config)
        }
        try:
            data = render_user_data(config, role, index, endpoints, staged=staged)
            parts = render_parts(config, role, index, endpoints, staged=staged)
        except RenderError as exc:
            click.echo(f"Error: {exc}", err=True)
            raise SystemExit(terminal.EXIT_USAGE) from None
    if raw:
        click.echo(data, nl=False)  # bytes go to the binary stream unchanged
        return
    for number, part in enumerate(parts, 1):
        click.echo(f"# ---- part {number}/{len(parts)}: {part.content_type} ({part.filename})")
        click.echo(part.content, nl=False)
    packed = "gzip-compressed" if data[:2] == b"\x1f\x8b" else "plain"
    click.echo(f"# ---- {len(data)} bytes of user-data ({packed})")
