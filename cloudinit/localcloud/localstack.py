"""etcd + CoreDNS on this machine's loopback: the stack behind `make demo`,
`scripts/local-stack` and the test fixtures.

``up`` starts what is not yet running and returns once etcd reports healthy
and CoreDNS reports ready (bounded waits, never a fixed sleep). ``down`` stops
only the processes this run folder started. The settings of the last ``up``
are kept in ``stack.json`` so that ``status`` and ``down`` need no flags.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tfcluster.cloudinit.localcloud import daemons, paths
from tfcluster.cloudinit.render.corefile import CorefileSettings, render_corefile

DEFAULT_BIN = paths.bin_dir()
DEFAULT_RUN = paths.run_root() / "local-stack"


@dataclass(frozen=True)
class StackSettings:
    """Where the stack runs. Every port is unprivileged and configurable."""

    run_dir: Path = DEFAULT_RUN
    bin_dir: Path = DEFAULT_BIN
    cluster: str = "local"
    zone: str = "tensorflow.local"
    host: str = "127.0.0.1"
    etcd_port: int = 23790
    etcd_peer_port: int = 23800
    dns_port: int = 15353
    health_port: int = 18080
    ready_port: int = 18181
    record_ttl: int = 5
    upstreams: tuple[str, ...] = field(default_factory=tuple)

    @property
    def etcd_endpoint(self) -> str:
        return f"http://{self.host}:{self.etcd_port}"

    @property
    def dns_server(self) -> tuple[str, int]:
        return (self.host, self.dns_port)

    def corefile(self) -> CorefileSettings:
        return CorefileSettings(
            cluster=self.cluster,
            zone=self.zone,
            etcd_endpoints=(self.etcd_endpoint,),
            dns_bind=self.host,
            dns_port=self.dns_port,
            ready_addr=f"{self.host}:{self.ready_port}",
            health_addr=f"{self.host}:{self.health_port}",
            record_ttl=self.record_ttl,
            upstreams=self.upstreams,
        )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (in practice, for UDP too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def on_free_ports(run_dir: Path, **settings: Any) -> StackSettings:
    """Settings whose every port is free now: for tests, the demo, benchmarks."""
    ports = ("etcd_port", "etcd_peer_port", "dns_port", "health_port", "ready_port")
    chosen: dict[str, Any] = {name: free_port() for name in ports if name not in settings}
    return StackSettings(run_dir=run_dir, **chosen, **settings)


class StackError(RuntimeError):
    """The local stack could not be brought up (with the log to read)."""


def etcd_argv(
    binary: Path, data_dir: Path, host: str, client_port: int, peer_port: int
) -> list[str]:
    """A single-member etcd listening on ``host`` only."""
    peer = f"http://{host}:{peer_port}"
    client = f"http://{host}:{client_port}"
    return [
        str(binary),
        "--name", "default",
        "--data-dir", str(data_dir),
        "--listen-client-urls", client,
        "--advertise-client-urls", client,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"default={peer}",
        "--log-level", "warn",
    ]  # fmt: skip


def up(settings: StackSettings, timeout: float = 30.0) -> None:
    """Start etcd, then CoreDNS; return when both answer their health checks."""
    run = settings.run_dir
    if paths.missing_tools(settings.bin_dir):
        raise StackError(paths.tools_missing_message(settings.bin_dir))
    run.mkdir(parents=True, exist_ok=True)
    (run / "stack.json").write_text(json.dumps(_to_json(settings), indent=2) + "\n")

    if daemons.running(run, "etcd") is None:
        argv = etcd_argv(
            settings.bin_dir / "etcd", run / "etcd-data",
            settings.host, settings.etcd_port, settings.etcd_peer_port,
        )  # fmt: skip
        daemons.start(run, "etcd", argv)
    _await(run, "etcd", f"{settings.etcd_endpoint}/health", timeout)

    corefile = run / "Corefile"
    corefile.write_text(render_corefile(settings.corefile()))
    if daemons.running(run, "coredns") is None:
        daemons.start(run, "coredns", [str(settings.bin_dir / "coredns"), "-conf", str(corefile)])
    _await(run, "coredns", f"http://{settings.host}:{settings.ready_port}/ready", timeout)


def down(run_dir: Path = DEFAULT_RUN) -> list[str]:
    """Stop CoreDNS, then etcd; the names of what was running. Idempotent."""
    return [name for name in ("coredns", "etcd") if daemons.stop(run_dir, name)]


def status(run_dir: Path = DEFAULT_RUN) -> dict[str, object]:
    """Pids and health of the stack's processes, as a JSON-friendly dict."""
    saved = run_dir / "stack.json"
    settings = json.loads(saved.read_text()) if saved.exists() else {}
    host = settings.get("host", "127.0.0.1")
    checks = {
        "etcd": f"http://{host}:{settings.get('etcd_port')}/health",
        "coredns": f"http://{host}:{settings.get('ready_port')}/ready",
    }
    result: dict[str, object] = {"run_dir": str(run_dir), "settings": settings}
    for name, url in checks.items():
        pid = daemons.running(run_dir, name)
        result[name] = {"pid": pid, "healthy": pid is not None and _healthy(url)}
    return result


def _await(run_dir: Path, name: str, url: str, timeout: float) -> None:
    daemons.await_ready(
        run_dir, name, lambda: _healthy(url),
        what=f"{name} to answer {url}", timeout=timeout, error=StackError,
    )  # fmt: skip


def _healthy(url: str) -> bool:
    """etcd's /health says {"health":"true"}; CoreDNS's /ready answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            body = response.read()
    except (urllib.error.URLError, OSError):
        return False
    if url.endswith("/health"):
        try:
            return json.loads(body).get("health") == "true"
        except ValueError:
            return False
    return True


def _to_json(settings: StackSettings) -> dict[str, object]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()}


def main(argv: list[str] | None = None) -> int:
    """``scripts/local-stack up|down|status``."""
    parser = argparse.ArgumentParser(
        prog="local-stack",
        description="Run etcd and CoreDNS (etcd plugin) on loopback for tfcluster.",
    )
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN, help="pid files, logs, data")
    parser.add_argument("--bin-dir", type=Path, default=DEFAULT_BIN, help="etcd and coredns")
    parser.add_argument("--cluster", default="local", help="cluster name (etcd key prefix)")
    parser.add_argument("--zone", default="tensorflow.local")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--etcd-port", type=int, default=23790)
    parser.add_argument("--etcd-peer-port", type=int, default=23800)
    parser.add_argument("--dns-port", type=int, default=15353)
    parser.add_argument("--health-port", type=int, default=18080)
    parser.add_argument("--ready-port", type=int, default=18181)
    parser.add_argument(
        "--upstream", action="append", default=[],
        help="resolver for names outside the zone (repeatable); none: answer the zone only",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for health")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            settings = StackSettings(
                run_dir=args.run_dir, bin_dir=args.bin_dir, cluster=args.cluster, zone=args.zone,
                host=args.host, etcd_port=args.etcd_port, etcd_peer_port=args.etcd_peer_port,
                dns_port=args.dns_port, health_port=args.health_port, ready_port=args.ready_port,
                upstreams=tuple(args.upstream),
            )  # fmt: skip
            up(settings, timeout=args.timeout)
            print(f"etcd {settings.etcd_endpoint}  coredns {settings.host}:{settings.dns_port}")
        elif args.action == "down":
            stopped = down(args.run_dir)
            print("stopped " + ", ".join(stopped) if stopped else "nothing was running")
        else:
            print(json.dumps(status(args.run_dir), indent=2))
    except (StackError, daemons.DaemonError) as exc:
        print(f"local-stack: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
