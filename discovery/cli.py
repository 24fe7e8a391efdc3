"""The `tfcluster` command: the instance's own commands (`agent`, `wait`,
`records`) and the group that the console script runs.

Library code does the work (tfcluster.discovery); these only parse options,
set up logging to stderr, turn signals into a clean shutdown and failures into
one-line messages with the agent's documented exit codes.

The operator's commands (`up`, `down`, `status`, `ls`, `render`) live in
tfcluster.cloudinit.cli and are imported only when one of them runs (or
`tfcluster --help` lists them), so an instance starting its agent loads no
boto3, jinja2 or YAML (tests/test_entry_point.py).
"""

from __future__ import annotations

import importlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from tfcluster.discovery.agent_config import AgentConfig, ConfigError, load_agent_config

OPERATOR_COMMANDS = {
    "up": "tfcluster.cloudinit.cli:up",
    "down": "tfcluster.cloudinit.cli:down",
    "status": "tfcluster.cloudinit.cli:status",
    "ls": "tfcluster.cloudinit.cli:list_clusters",
    "render": "tfcluster.cloudinit.cli:render",
    "unlock": "tfcluster.cloudinit.cli:unlock",
    "logs": "tfcluster.cloudinit.cli_cluster:logs",
    "fetch": "tfcluster.cloudinit.cli_cluster:fetch",
    "ssh": "tfcluster.cloudinit.cli_cluster:ssh",
}
"""Command name -> "module:attribute" of a click command, imported on first use."""

CONFIG_HELP = "agent config file (JSON) written by the user-data"


def _config(path: Path) -> AgentConfig:
    try:
        return load_agent_config(path)
    except ConfigError as exc:
        _fail(2, str(exc))


def _fail(code: int, message: str) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


class LazyGroup(click.Group):
    """A click group whose commands named in ``lazy`` ("module:attribute") are
    imported only when asked for by name."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        module_name, _, attribute = self.lazy[cmd_name].partition(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{self.lazy[cmd_name]} is not a click command")
        self.add_command(command, cmd_name)
        return command

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Usage errors in one line (``Error: ...``, exit 2) instead of click's usage block."""
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            hint = ""
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=LazyGroup, lazy=OPERATOR_COMMANDS)
def main() -> None:
    """tfcluster: distributed TensorFlow on plain cloud machines."""


@main.command()
@click.option("--config", "config_path", required=True, type=Path, help=CONFIG_HELP)
@click.option("--no-server", is_flag=True, help="hold the name only; start no TensorFlow process")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def agent(config_path: Path, no_server: bool, verbose: bool) -> None:
    """Run this instance's agent in the foreground (for a systemd unit).

    Reads the instance's identity from IMDSv2, claims <role><index>.<zone> in
    etcd, waits until every peer resolves, writes TF_CONFIG and runs the
    TensorFlow server (or the chief's program). SIGTERM or SIGINT removes the
    name from DNS and exits 0.

    \b
    Exit codes: 0 done or stopped; 2 bad config; 3 instance metadata failed;
    4 the name is held by another live instance; 5 barrier timed out;
    6 etcd unreachable; 7 the TensorFlow process failed.
    """
    _logging(verbose)
    from tfcluster.discovery.agent import Agent
    from tfcluster.discovery.imds import IMDSClient, IMDSError

    config = _config(config_path)
    # Where this agent's code comes from: on an instance, the venv the user-data made.
    logging.getLogger("tfcluster.agent").info(
        "tfcluster agent from %s", Path(__file__).resolve().parent.parent
    )
    try:
        imds = IMDSClient(config.imds_endpoint)
    except IMDSError as exc:
        _fail(2, str(exc))
    runner = Agent(config, imds, start_server=not no_server)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: runner.shutdown())
    result = runner.run()
    if result.code != 0:
        _fail(result.code, result.message)
    logging.getLogger("tfcluster.agent").info("%s", result.message)


@main.command()
@click.option("--config", "config_path", required=True, type=Path, help=CONFIG_HELP)
@click.option("--timeout", type=float, default=None, help="seconds (default: barrier_timeout)")
def wait(config_path: Path, timeout: float | None) -> None:
    """Wait until every member of the cluster resolves; print them.

    The barrier alone, for scripts: exits 0 once all names resolve through
    CoreDNS (and the system resolver, if the config asks), 5 on timeout.
    """
    _logging(False)
    from tfcluster.discovery.barrier import Barrier, BarrierTimeout
    from tfcluster.discovery.dns import DNSClient

    config = _config(config_path)
    barrier = Barrier(
        DNSClient(config.dns_server),
        config.zone,
        config.members(),
        check_system_resolver=config.check_system_resolver,
    )
    try:
        members = barrier.wait(timeout if timeout is not None else config.barrier_timeout)
    except BarrierTimeout as exc:
        _fail(5, str(exc))
    for member, endpoint in members.items():
        click.echo(f"{member.name(config.zone)}\t{endpoint.host_ip}\t{endpoint.port}")


@main.command()
@click.option("--config", "config_path", type=Path, help=CONFIG_HELP)
@click.option("--etcd", "endpoint", help="etcd endpoint, http://HOST:PORT (instead of --config)")
@click.option("--cluster", help="cluster name (instead of --config)")
@click.option("--zone", default="tensorflow.local", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def records(
    config_path: Path | None, endpoint: str | None, cluster: str | None, zone: str, as_json: bool
) -> None:
    """List the cluster's DNS records as etcd holds them."""
    from tfcluster.discovery import etcdclient
    from tfcluster.discovery.registry import RegistryError, list_records

    if config_path is not None:
        config = _config(config_path)
        endpoint, cluster, zone = config.etcd_endpoints[0], config.cluster, config.zone
    if endpoint is None or cluster is None:
        _fail(2, "give --config, or --etcd and --cluster")
    try:
        client = etcdclient.connect(str(endpoint))
        items = list_records(client, str(cluster), zone)
    except (ValueError, RegistryError) as exc:
        _fail(6, str(exc))
    if as_json:
        click.echo(json.dumps(dict(items), indent=2, sort_keys=True))
        return
    for key, value in items:
        click.echo(f"{key}\t{json.dumps(value, sort_keys=True)}")
