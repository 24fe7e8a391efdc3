"""A Docker engine for the tests: the host's when one answers, else one of our own.

Our own ``dockerd`` keeps everything under the test's run folder (data root,
exec root, socket, pid file) and is started with ``--bridge=none`` and without
touching iptables or IP forwarding: it creates no network interface, and the
containers the tests run use the host's network on loopback only. It is
stopped, and its folder removed, when the tests are done.

Without an engine and without the means to start one (not root, no
``dockerd``, or it does not come up), the tests that need Docker are skipped
with that reason; the check costs nothing when ``docker`` is not installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tfcluster.discovery.waiting import WaitTimeout, wait_for

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class Docker:
    """The ``docker`` CLI and the environment that points it at one engine."""

    cli: str
    env: Mapping[str, str]
    own: bool

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` (a docker or compose command line) against this engine."""
        return _run(argv, env={**self.env, **(env or {})}, timeout=timeout, check=check)

    def docker(
        self, *args: str, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run([self.cli, *args], timeout=timeout, check=check)


def _run(
    argv: Sequence[str], *, env: Mapping[str, str], timeout: float, check: bool
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv),
        env=dict(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def answers(cli: str, env: Mapping[str, str], timeout: float = 10.0) -> bool:
    """Whether the engine ``env`` points at answers the API."""
    try:
        proc = _run([cli, "version", "--format", "{{.Server.Version}}"], env=env,
                    timeout=timeout, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0 and bool(proc.stdout.strip())


def dockerd_argv(dockerd: str, root: Path) -> list[str]:
    """An engine of our own: its state under ``root``, no bridge, host firewall untouched."""
    return [
        dockerd,
        "--host", f"unix://{root / 'docker.sock'}",
        "--data-root", str(root / "data"),
        "--exec-root", str(root / "exec"),
        "--pidfile", str(root / "docker.pid"),
        "--bridge=none",
        "--iptables=false",
        "--ip-forward=false",
        "--ip-masq=false",
    ]  # fmt: skip


@contextmanager
def docker_engine(root: Path) -> Iterator[Docker]:
    """The host's engine if it answers; otherwise our own dockerd under ``root``."""
    cli = shutil.which("docker")
    if cli is None:
        pytest.skip("docker is not installed (make setup installs docker.io when run as root)")
    if answers(cli, os.environ):
        yield Docker(cli, dict(os.environ), own=False)
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        pytest.skip("no Docker engine answers and dockerd is not installed")
    if os.geteuid() != 0:
        pytest.skip("no Docker engine answers, and starting dockerd needs root")

    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DOCKER_HOST": f"unix://{root / 'docker.sock'}"}
    log_path = root / "dockerd.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            dockerd_argv(dockerd, root),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def up() -> bool | None:
            if proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with status {proc.returncode}")
            return True if answers(cli, env, timeout=5.0) else None

        try:
            wait_for(up, what="our dockerd to answer on its socket", timeout=START_TIMEOUT,
                     interval=0.1, max_interval=0.5)  # fmt: skip
        except (RuntimeError, WaitTimeout) as exc:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            pytest.skip(f"dockerd could not start: {exc}\n" + "\n".join(tail))
        yield Docker(cli, env, own=True)
    finally:
        _stop(proc)
        # A clean shutdown unmounts the image layers but leaves libnetwork's
        # namespace mount (exec/netns/default); every mount below root is ours.
        for mount in _mounts_below(root):
            subprocess.run(["umount", "--lazy", mount], check=False, timeout=30)
        shutil.rmtree(root / "data", ignore_errors=True)
        shutil.rmtree(root / "exec", ignore_errors=True)
        left = _mounts_below(root)
        assert not left, f"mounts left under {root}: {left}"


def _mounts_below(root: Path) -> list[str]:
    """Mount points under ``root``, deepest first."""
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mounts") as table:
        points = [line.split()[1] for line in table]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (dockerd stops its containers and containerd), then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
