"""The local cloud's ``systemctl``: the one adapter between an EC2 image and this machine.

    python -m tfcluster.cloudinit.localcloud.servicectl --root ROOT COMMAND [UNIT...]

The user-data calls ``$systemctl`` three ways, and this answers exactly those:

* ``daemon-reload``: nothing to reload, units are read when started;
* ``restart systemd-resolved.service``: nothing to restart: in the local
  cloud the namespace's /etc/resolv.conf already names the instance's
  CoreDNS (see network.py), which is what the resolved drop-in achieves on EC2;
* ``enable --now UNIT...``: read each unit file from ROOT's unit folder and
  start its ExecStart, in the given order, as a background process with
  the unit's Environment= and EnvironmentFile=; pid file and log are
  ``<unit>.pid`` and ``<unit>.log`` in ROOT, which every command line of
  our units names (as `tfcluster.cloudinit.localcloud.daemons` requires). It runs in
  the caller's namespaces: the user-data script already runs inside the
  instance's.

Units may use only the keys our templates use; anything else fails loudly.
Keys a local instance has no use for are accepted and not acted on:
ordering (the script starts units in dependency order), restarts, users
(everything runs as the caller), resource limits, and the stop settings
(the local cloud stops an instance by SIGTERM to each of its processes,
as an EC2 shutdown does).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from tfcluster.cloudinit.localcloud import daemons

NO_OPS = (("daemon-reload",), ("restart", "systemd-resolved.service"))
IGNORED = {
    "Unit": {"Description", "Wants", "After"},
    "Service": {
        "Type", "User", "DynamicUser", "Restart", "RestartSec", "RestartPreventExitStatus",
        "KillSignal", "KillMode", "TimeoutStopSec", "LimitNOFILE",
    },
    "Install": {"WantedBy"},
}  # fmt: skip
USED = {"ExecStart", "Environment", "EnvironmentFile", "RuntimeDirectory"}
UNIT_DIR = "units"


class UnitError(ValueError):
    """A unit file uses something this stand-in does not do, or cannot start."""


@dataclass(frozen=True)
class Unit:
    """What starting a unit needs: its command, environment and runtime folders."""

    name: str
    argv: tuple[str, ...]
    environment: tuple[tuple[str, str], ...]
    runtime_dirs: tuple[str, ...]


def parse_unit(name: str, text: str, root: Path) -> Unit:
    """Read the subset of systemd's unit syntax our templates use."""
    section = ""
    values: dict[str, list[str]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        known = IGNORED.get(section, set()) | (USED if section == "Service" else set())
        if not sep or key not in known:
            raise UnitError(f"{name}:{number}: [{section}] {key!r} is not supported locally")
        values.setdefault(key, []).append(value)
    if len(values.get("ExecStart", [])) != 1:
        raise UnitError(f"{name}: needs exactly one ExecStart=")
    argv = tuple(shlex.split(values["ExecStart"][0]))
    if not argv or not argv[0].startswith("/"):
        raise UnitError(f"{name}: ExecStart= must start with an absolute path")
    environment: list[tuple[str, str]] = []
    for path in values.get("EnvironmentFile", []):
        environment += _assignments(name, Path(path).read_text().splitlines(), skip_comments=True)
    for line in values.get("Environment", []):
        environment += _assignments(name, shlex.split(line), skip_comments=False)
    runtime = tuple(
        str(root / "run" / d) for line in values.get("RuntimeDirectory", []) for d in line.split()
    )
    return Unit(name, argv, tuple(environment), runtime)


def _assignments(name: str, items: list[str], *, skip_comments: bool) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        item = item.strip()
        if not item or (skip_comments and item[0] in "#;"):
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UnitError(f"{name}: {item!r} is not a KEY=VALUE assignment")
        pairs.append((key, value))
    return pairs


def start(root: Path, unit: Unit) -> int:
    """Start the unit's process in the background (idempotent); its pid."""
    pid = daemons.running(root, unit.name)
    if pid is not None:
        return pid
    for folder in unit.runtime_dirs:
        Path(folder).mkdir(parents=True, exist_ok=True)
    base = {key: os.environ[key] for key in ("PATH", "LANG", "HOME") if key in os.environ}
    try:
        return daemons.start(root, unit.name, unit.argv, env={**base, **dict(unit.environment)})
    except daemons.DaemonError as exc:
        raise UnitError(f"{unit.name}: {exc}") from None


def run(root: Path, command: list[str]) -> list[str]:
    """Carry out one systemctl command; what was done, one line each."""
    if tuple(command) in NO_OPS:
        return [f"{' '.join(command)}: nothing to do in the local cloud"]
    if command[:2] != ["enable", "--now"] or len(command) < 3:
        raise UnitError(f"'systemctl {' '.join(command)}' is not supported locally")
    done = []
    for name in command[2:]:
        path = root / UNIT_DIR / name
        try:
            text = path.read_text()
        except OSError as exc:
            raise UnitError(f"{name}: cannot read {path}: {exc.strerror}") from None
        pid = start(root, parse_unit(name, text, root))
        done.append(f"started {name} (pid {pid}, log {daemons.log_file(root, name)})")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="systemctl", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="the instance's root folder")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        for line in run(args.root, args.command):
            print(f"servicectl: {line}", file=sys.stderr)
    except (UnitError, OSError) as exc:
        print(f"servicectl: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
