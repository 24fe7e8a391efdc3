"""Background processes that tfcluster starts on this machine and can find again.

Each daemon has a name; its pid file and log live in a run folder. ``stop``
only signals a process whose command line still names the run folder, so a
recycled pid is never killed, and stopping what is already gone succeeds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tfcluster.discovery.waiting import WaitTimeout, wait_for


class DaemonError(RuntimeError):
    """A daemon could not be started or stopped."""


def pid_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pid"


def log_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.log"


def start(
    run_dir: Path,
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
) -> int:
    """Start ``argv`` in its own session, logging to ``<name>.log``.

    The run folder must appear in ``argv`` (as a data dir or config path): that
    is how ``running`` and ``stop`` recognise the process later.
    """
    if not any(str(run_dir) in arg for arg in argv):
        raise DaemonError(f"{name}: the command line must name the run folder {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if running(run_dir, name) is not None:
        raise DaemonError(f"{name} is already running (pid file {pid_file(run_dir, name)})")
    with open(log_file(run_dir, name), "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
        )
    pid_file(run_dir, name).write_text(f"{proc.pid}\n")
    return proc.pid


def running(run_dir: Path, name: str) -> int | None:
    """The daemon's pid if its pid file names a live process started for this run folder."""
    try:
        pid = int(pid_file(run_dir, name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None
    if state == "Z":
        return None
    # An empty command line is a process caught mid-exec (seen under gVisor).
    if cmdline and str(run_dir) not in cmdline:
        return None
    return pid


def await_ready(
    run_dir: Path,
    name: str,
    ready: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    error: type[Exception] = DaemonError,
) -> None:
    """Wait until ``ready()``; raise ``error`` naming the log if the daemon
    exits first or the time runs out."""

    def check() -> bool | None:
        if running(run_dir, name) is None:
            raise error(f"{name} exited during start-up; see {log_file(run_dir, name)}")
        return True if ready() else None

    try:
        wait_for(check, what=what, timeout=timeout)
    except WaitTimeout as exc:
        raise error(f"{exc}; see {log_file(run_dir, name)}") from None


def stop(run_dir: Path, name: str, timeout: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL after ``timeout``; True if a process was stopped."""
    pid = running(run_dir, name)
    if pid is None:
        pid_file(run_dir, name).unlink(missing_ok=True)
        return False

    def gone() -> bool | None:
        _reap(pid)
        return True if running(run_dir, name) is None else None

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        try:
            wait_for(gone, what=f"{name} (pid {pid}) to exit after {sig.name}", timeout=timeout)
            break
        except WaitTimeout:
            if sig is signal.SIGKILL:
                raise DaemonError(f"{name} (pid {pid}) survived SIGKILL") from None
    pid_file(run_dir, name).unlink(missing_ok=True)
    return True


def _reap(pid: int) -> None:
    """Collect the exit status when the daemon is our own child (tests, CLI)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
