"""The tfcluster command line: a thin layer over library functions."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import click

from tfcluster.cloudinit import provision
from tfcluster.cloudinit.config import (
    INSTANCE_ROLES,
    ConfigError,
    load_cluster_config,
    parse_overrides,
)
from tfcluster.cloudinit.ec2 import Ec2Provider
from tfcluster.cloudinit.provider import ProviderError
from tfcluster.cloudinit.userdata import RenderError, render_parts, render_user_data


@click.group()
def main() -> None:
    """tfcluster: distributed TensorFlow on plain cloud machines."""


EXIT_PROVIDER = 1
EXIT_USAGE = 2


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """Known failures end the command with ``Error: ...`` and an exit code, no traceback:
    2 for the config (fix the input), 1 for the cloud (look at the account or retry)."""
    try:
        yield
    except ConfigError as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(EXIT_USAGE) from None
    except ProviderError as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(EXIT_PROVIDER) from None


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, ``-`` for a missing value."""
    cells = [list(headers)] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _progress(message: str) -> None:
    click.echo(message, err=True)


_region_option = click.option("--region", help="AWS region (default: boto3's configured one).")
_endpoint_option = click.option(
    "--endpoint-url",
    envvar="TFCLUSTER_ENDPOINT_URL",
    help="EC2 API endpoint instead of AWS's, e.g. a moto server.",
)


@main.command()
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
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted for nested keys).")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@_endpoint_option
def up(
    config_path: Path | None,
    cluster: str | None,
    region: str | None,
    workers: int | None,
    ps: int | None,
    settings: tuple[str, ...],
    dry_run: bool,
    endpoint_url: str | None,
) -> None:
    """Launch the cluster, or the part of it that is missing."""
    with _one_line_errors():
        overrides = parse_overrides(settings)
        named = {"cluster": cluster, "region": region, "workers": workers, "ps": ps}
        overrides.update({key: value for key, value in named.items() if value is not None})
        config = load_cluster_config(config_path, overrides)
        provider = Ec2Provider(config.region, endpoint_url=endpoint_url)
        result = provision.up(config, provider, dry_run=dry_run, on_event=_progress)
    rows = [
        (n.instance_id, n.role, n.index, n.private_ip, provision.dns_name(n, config.zone))
        for n in result.nodes
    ]
    if rows:
        click.echo(_table(("INSTANCE", "ROLE", "INDEX", "PRIVATE IP", "DNS NAME"), rows))


@main.command()
@click.option("--cluster", required=True, help="Cluster to remove.")
@_region_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_endpoint_option
def down(cluster: str, region: str | None, yes: bool, endpoint_url: str | None) -> None:
    """Terminate every instance of the cluster and delete its security group."""
    with _one_line_errors():
        provider = Ec2Provider(region, endpoint_url=endpoint_url)
        if not yes:
            click.confirm(
                f"Terminate every instance of cluster {cluster} in {provider.region} "
                "and delete its security group?",
                abort=True,
            )
        provision.down(cluster, provider, on_event=_progress)


@main.command()
@click.option("--cluster", required=True, help="Cluster to show.")
@_region_option
@_endpoint_option
@click.option(
    "--etcd",
    "etcd_endpoint",
    help="the cluster's etcd, http://HOST:2379 (reachable from here), to show whether "
    "each DNS record is present",
)
def status(
    cluster: str, region: str | None, endpoint_url: str | None, etcd_endpoint: str | None
) -> None:
    """One line per instance of the cluster, with its DNS name."""
    dns_check = _record_check(cluster, etcd_endpoint) if etcd_endpoint is not None else None
    with _one_line_errors():
        provider = Ec2Provider(region, endpoint_url=endpoint_url)
        rows = provision.status(cluster, provider, dns_check=dns_check)
    if not rows:
        click.echo(f"cluster {cluster}: no instances")
        return
    headers = ("INSTANCE", "ROLE", "INDEX", "STATE", "PRIVATE IP", "DNS NAME", "DNS RECORD")
    dns = {True: "present", False: "missing", None: "unknown"}
    click.echo(
        _table(
            headers,
            [
                (
                    r.node.instance_id,
                    r.node.role,
                    r.node.index,
                    r.node.state,
                    r.node.private_ip,
                    r.dns_name,
                    dns[r.dns_present] if r.dns_name else None,
                )
                for r in rows
            ],
        )
    )


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


@main.command(name="ls")
@_region_option
@_endpoint_option
def list_clusters(region: str | None, endpoint_url: str | None) -> None:
    """Every cluster in the region that still holds instances or a security group."""
    with _one_line_errors():
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
        )
        for c in clusters
    ]
    click.echo(_table(("CLUSTER", "INSTANCES", "STATES", "SECURITY GROUPS"), rows))


@main.command()
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
    or with --raw the exact bytes RunInstances gets."""
    with _one_line_errors():
        config = load_cluster_config(config_path, parse_overrides(overrides))
        endpoints = list(etcd_endpoints) or None
        try:
            data = render_user_data(config, role, index, endpoints)
            parts = render_parts(config, role, index, endpoints)
        except RenderError as exc:
            click.echo(f"Error: {exc}", err=True)
            raise SystemExit(EXIT_USAGE) from None
    if raw:
        click.echo(data, nl=False)  # bytes go to the binary stream unchanged
        return
    for number, part in enumerate(parts, 1):
        click.echo(f"# ---- part {number}/{len(parts)}: {part.content_type} ({part.filename})")
        click.echo(part.content, nl=False)
    packed = "gzip-compressed" if data[:2] == b"\x1f\x8b" else "plain"
    click.echo(f"# ---- {len(data)} bytes of user-data ({packed})")


def _register_agent_commands() -> None:
    from tfcluster.cloudinit.agent_cli import agent, records, wait

    for command in (agent, wait, records):
        main.add_command(command)


_register_agent_commands()
