"""Agents as real processes, each with its own IMDS emulator and loopback address."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tfcluster.cloudinit.localcloud.imds_emulator import IMDSEmulator, InstanceMetadata
from tfcluster.cloudinit.localcloud.localstack import StackSettings, free_port
from tfcluster.discovery.agent_config import AgentConfig, dump_agent_config, role_counts
from tfcluster.discovery.waiting import wait_for


@dataclass
class AgentProcess:
    """One simulated instance: IMDS emulator + `tfcluster agent` subprocess."""

    name: str
    ip: str
    config_path: Path
    tf_config_path: Path
    log_path: Path
    emulator: IMDSEmulator
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self, no_server: bool = True) -> AgentProcess:
        argv = [str(Path(sys.executable).parent / "tfcluster"), "agent"]
        argv += ["--config", str(self.config_path)]
        if no_server:
            argv.append("--no-server")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.extra_env}
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def wait_passed_barrier(self, timeout: float = 60.0) -> dict[str, Any]:
        """TF_CONFIG is written right after the barrier passes."""

        def written() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited early:\n{self.log()}")
            if self.tf_config_path.exists():
                return dict(json.loads(self.tf_config_path.read_text()))
            return None

        return wait_for(written, what=f"{self.name} to pass the barrier", timeout=timeout)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.emulator.stop()


def make_agent(
    tmp: Path,
    stack: StackSettings,
    *,
    role: str,
    launch_index: int,
    ip: str,
    roles: dict[str, int],
    instance_id: str | None = None,
    raw: dict[str, Any] | None = None,
    **overrides: Any,
) -> AgentProcess:
    """Config file + running IMDS emulator for one instance (agent not started).

    ``overrides`` replace fields of the config; ``raw`` adds keys to the file
    as JSON values (e.g. ``report_post`` as ``up`` signs it)."""
    name = f"{role}{launch_index}-{ip}"
    emulator = IMDSEmulator(
        InstanceMetadata(
            launch_index=launch_index,
            local_ipv4=ip,
            instance_id=instance_id or "i-" + hashlib.sha1(name.encode()).hexdigest()[:17],
        ),
        host=ip,
    ).start()
    tf_config_path = tmp / f"{name}.tf_config.json"
    config = AgentConfig(
        cluster=stack.cluster,
        zone=stack.zone,
        roles=role_counts(roles),
        role=role,
        etcd_endpoints=(stack.etcd_endpoint,),
        dns_server=stack.dns_server,
        imds_endpoint=emulator.url,
        lease_ttl=4,
        record_ttl=1,
        barrier_timeout=60,
        check_system_resolver=False,
        distinct_ports=True,
        tf_config_path=tf_config_path,
    )
    config_path = tmp / f"{name}.agent.json"
    data = {**dump_agent_config(replace(config, **overrides)), **(raw or {})}
    config_path.write_text(json.dumps(data))
    return AgentProcess(name, ip, config_path, tf_config_path, tmp / f"{name}.log", emulator)


def free_port_block(count: int) -> int:
    """A base port such that base .. base+count-1 are free on every address."""
    for _ in range(50):
        base = free_port()
        if base + count < 65536 and all(_tcp_free(base + i) for i in range(count)):
            return base
    raise AssertionError("no block of free ports")


def _tcp_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True
