"""How the operator's commands meet a terminal: one-line errors and exit codes,
signals, prompts, tables and progress lines. Library code never prints; the
commands in `cli` and `localcloud.commands` print only through these.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from tfcluster.cloudinit import plan, provision
from tfcluster.cloudinit.checks import cluster_name
from tfcluster.cloudinit.cloud.provider import InvalidEndpoint, Node, ProviderError
from tfcluster.cloudinit.config import (
    ClusterConfig,
    ConfigError,
    config_warnings,
    load_cluster_config,
)
from tfcluster.cloudinit.stage.errors import StageError

EXIT_PROVIDER = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Known failures end the command with ``Error: ...`` and an exit code, no traceback:
    2 for bad input (fix the config, an option or the endpoint URL; a binary to stage
    that is not found), 1 for the cloud
    (look at the account or retry), 130 for an interruption outside ``up``'s rollback."""
    try:
        yield
    except (ConfigError, InvalidEndpoint, StageError) as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(EXIT_USAGE) from None
    except ProviderError as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(EXIT_PROVIDER) from None
    except KeyboardInterrupt:
        click.echo("Error: interrupted", err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None


def load_config(path: Path | None, overrides: dict[str, Any]) -> ClusterConfig:
    """The validated config; what it allows but is probably a mistake goes to stderr."""
    config = load_cluster_config(path, overrides)
    for warning in config_warnings(config):
        click.echo(f"warning: {warning}", err=True)
    return config


def cluster_option(name: str) -> str:
    """The --cluster value, held to the config's rule: a wildcard never selects clusters."""
    try:
        return cluster_name(name)
    except ValueError as exc:
        raise ConfigError(f"cluster: {exc}") from None


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (from CI runners, ``timeout``, systemd) acts as Ctrl-C: ``up`` rolls back."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def confirm_launch(yes: bool) -> plan.Confirm:
    """Ask on a terminal; without one, only --yes goes ahead."""

    def confirm(_plan: plan.Plan, reasons: list[str]) -> bool:
        if yes:
            return True
        why = "; ".join(reasons)
        if not sys.stdin.isatty():
            raise ConfigError(f"confirmation needed ({why}): pass --yes to launch anyway")
        return click.confirm(f"Launch anyway? {why}", err=True)

    return confirm


def time_left(node: Node, now: datetime) -> str | None:
    if node.expires is None:
        return None
    seconds = int((node.expires - now).total_seconds())
    if seconds <= 0:
        return "expired"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, ``-`` for a missing value."""
    cells = [list(headers)] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def progress(message: str) -> None:
    click.echo(message, err=True)


@contextlib.contextmanager
def live_line() -> Iterator[Callable[[str], None]]:
    """A status line on stderr that each call replaces: rewritten in place (with a
    spinner) on a terminal; elsewhere (CI logs, pipes) printed whenever it changes.
    The last line stays on the screen."""
    from rich.console import Console  # only the commands that wait load rich

    console = Console(stderr=True, highlight=False, markup=False)
    last: list[str] = []
    if not console.is_terminal:

        def show(text: str) -> None:
            if last != [text]:
                click.echo(text, err=True)
            last[:] = [text]

        yield show
        return
    with console.status("") as line:

        def update(text: str) -> None:
            last[:] = [text]
            line.update(text)

        try:
            yield update
        finally:
            if last:
                console.print(last[0])


LOCAL_CLUSTER = "local"


def local_cluster(cluster: str | None, local: bool, endpoint_url: str | None) -> str:
    """The cluster name: ``local`` by default with --local, required without; validated."""
    if local and endpoint_url is not None:
        raise click.UsageError("--local runs its own EC2 API; --endpoint-url does not apply")
    if cluster is None and not local:
        raise click.UsageError("Missing option '--cluster' (or give --local).")
    with one_line_errors():
        return cluster_option(cluster or LOCAL_CLUSTER)


def print_nodes(result: provision.UpResult, zone: str) -> None:
    rows = [
        (n.instance_id, n.role, n.index, n.private_ip, provision.dns_name(n, zone))
        for n in result.nodes
    ]
    if rows:
        click.echo(table(("INSTANCE", "ROLE", "INDEX", "PRIVATE IP", "DNS NAME"), rows))
