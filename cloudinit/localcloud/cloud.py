"""`tfcluster up/down/status --local`: the EC2 code path against moto, instances booted here.

``up`` runs `provision.up` with the EC2 provider against this cluster's moto
server, exactly as against EC2, then ``sync`` boots every instance the API
reports running (instance.py) and shuts down every instance it no longer
does, and ``up`` waits until every agent reports that it serves. ``down``
runs `provision.down` against moto, then removes every process, namespace,
interface and file of the cluster, found by the cluster's label, so it also
cleans up after a crash; it is idempotent.

Two modes, chosen once per cluster (``mode`` file): ``netns`` when this
process is root and ``ip netns`` works (each instance a network namespace
on 198.18.0.0/24), else ``loopback`` (each instance a 127.77.0.x address of
this machine); see instance.py for how each boots the user-data.

Everything of a cluster lives under ``.run/localcloud/<cluster>/``::

    mode, config.json   the mode and the config overrides of the last prepare
    moto/               the moto server's pid file, URL and log
    image/              the local "AMI"'s Python packages (image.py)
    bin/systemctl       the servicectl wrapper the user-data calls (netns mode)
    bin/shutdown        what an instance's power-off does here (poweroff.py)
    machine/            the machine root: mount point of each instance's fs/
    instances/<id>/     user-data, IMDS emulator, cloud-init-output.log, fs/
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tfcluster.cloudinit import plan, provision
from tfcluster.cloudinit.cloud.provider import (
    CONTROL_ROLE,
    LIVE_STATES,
    RUNNING,
    TERMINATED,
    Node,
    NodeProvider,
    Progress,
    ProviderError,
    no_progress,
)
from tfcluster.cloudinit.config import ClusterConfig, load_cluster_config
from tfcluster.cloudinit.localcloud import (
    daemons,
    image,
    instance,
    motoserver,
    network,
    parts,
    paths,
)
from tfcluster.cloudinit.localcloud.hosts import LOOPBACK, NETNS, Host, LoopbackHost, NetnsHost
from tfcluster.cloudinit.localcloud.localstack import DEFAULT_BIN
from tfcluster.cloudinit.observe import view
from tfcluster.cloudinit.observe import wait as ready
from tfcluster.cloudinit.stage.errors import StageError
from tfcluster.discovery.waiting import WaitTimeout, wait_for

DEFAULT_RUN = paths.run_root() / "localcloud"
READY_TIMEOUT = 300.0
"""Seconds for every agent to serve: five venvs, agent installs and TF imports on two
cores take about a minute."""
RUN_TIMEOUT = 60.0
"""Seconds for moto to report launched instances running."""
STOP_TIMEOUT = 20.0
"""Seconds an instance's processes get after SIGTERM (the agent revokes, TF stops)."""
DNS_TIMEOUT = 30.0
BOOTED = "booted"
AGENT = "tfcluster-agent.service"


def training_program(steps: int, log_every: int | None = None) -> list[str]:
    """The chief's program: the built-in job for ``steps`` steps, printing the loss
    every ``log_every`` steps (default: about 20 lines in all).

    ``python3`` is the instance's agent venv's: the chief runs its program with
    that venv's bin first on PATH (discovery/tfserver.py)."""
    every = log_every or max(1, steps // 20)
    module = "tfcluster.discovery.train"
    return ["python3", "-m", module, "--steps", str(steps), "--log-every", str(every)]


class LocalCloudError(ProviderError):
    """The local cloud cannot run here, or an instance failed; one line for the operator."""


@dataclass(frozen=True)
class InstanceStatus:
    """One booted instance: what the EC2 API says and what runs here."""

    node: Node | None
    instance_id: str
    namespace: str | None
    processes: int
    barrier_passed: bool | None
    """None for the control node, which has no agent."""


@dataclass(frozen=True)
class DnsEntry:
    name: str
    address: str
    port: int


class LocalCloud:
    """One cluster of local instances behind a moto server; see the module docstring.

    ``loopback`` forces loopback mode (True) or netns mode (False) for a new
    cluster; None picks netns when possible. An existing cluster keeps its mode.
    """

    def __init__(
        self,
        cluster: str,
        *,
        loopback: bool | None = None,
        run_root: Path = DEFAULT_RUN,
        bin_dir: Path = DEFAULT_BIN,
    ) -> None:
        self.cluster = cluster
        self.folder = run_root / cluster
        self.bin_dir = bin_dir
        self.moto_dir = self.folder / "moto"
        self.machine_root = self.folder / "machine"
        self.instances_dir = self.folder / "instances"
        saved = self.folder / "mode"
        if saved.exists():
            mode = saved.read_text().strip()
        elif loopback is None:
            mode = NETNS if network.available() else LOOPBACK
        else:
            mode = LOOPBACK if loopback else NETNS
        self.host: Host = (
            NetnsHost(cluster, self.machine_root)
            if mode == NETNS
            else LoopbackHost(cluster, self.saved_config)
        )

    @property
    def mode(self) -> str:
        return self.host.mode

    @property
    def cidr(self) -> str:
        return self.host.cidr

    # -- set-up -----------------------------------------------------------------

    def check(self) -> None:
        """Raise `LocalCloudError` unless this machine can run local instances."""
        problem = self.host.check()
        if problem is not None:
            raise LocalCloudError(problem)
        if paths.missing_tools(self.bin_dir):
            raise LocalCloudError(paths.tools_missing_message(self.bin_dir))

    def prepare(self, overrides: Mapping[str, Any]) -> ClusterConfig:
        """Start (or reuse) moto, its VPC and subnet, the local image; the cluster's config.

        ``overrides`` are config keys as `load_cluster_config` takes them
        (``workers``, ``ps``, ``program``, ``program_dir``...); the local
        cloud's own keys (subnet, image, layout) come on top. Nothing is
        overridden in what `up` stages: the binaries, the wheel and the
        program bundle go through the cluster bucket in moto's S3, as on EC2.
        """
        self.check()
        # Bad options, a missing program_dir or one too large to bundle fail here,
        # before anything is started or written.
        given = load_cluster_config(None, {**overrides, "cluster": self.cluster})
        try:
            plan.staged_bundle(given)
        except StageError as exc:
            raise LocalCloudError(str(exc)) from None
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "mode").write_text(f"{self.mode}\n")
        provider = self.provider(start=True)
        systemctl = self.folder / "bin" / "systemctl"
        instance.write_machine_commands(
            systemctl, self.machine_root, motoserver.url_file(self.moto_dir)
        )
        self.machine_root.mkdir(parents=True, exist_ok=True)
        try:
            image_keys = image.build(self.folder / "image")
        except (image.ImageError, OSError) as exc:
            raise LocalCloudError(f"cannot make the local image: {exc}") from None
        local = {
            "cluster": self.cluster,
            "region": motoserver.REGION,
            "ami": provider.any_image(),
            "subnet_id": provider.ensure_subnet(self.cluster, self.cidr),
            "layout": {**instance.machine_layout(self.machine_root, systemctl), **image_keys},
        }
        if given.program_dir is not None:
            local["program_dir"] = given.program_dir  # absolute: boots re-read it from anywhere
        settings = {**overrides, **local}
        config = load_cluster_config(None, settings)
        (self.folder / "config.json").write_text(json.dumps(settings, indent=2) + "\n")
        return config

    def saved_config(self) -> ClusterConfig:
        """The config of the last ``prepare``, for booting in loopback mode."""
        try:
            return load_cluster_config(None, json.loads((self.folder / "config.json").read_text()))
        except (OSError, ValueError) as exc:
            raise LocalCloudError(f"cannot read the cluster's config: {exc}") from None

    def provider(self, *, start: bool = False) -> motoserver.MotoProvider:
        """The EC2 provider talking to this cluster's moto server (`Host.api_address`)."""
        try:
            if start:
                url: str | None = motoserver.ensure(self.moto_dir, self.host.api_address())
            else:
                url = motoserver.endpoint(self.moto_dir)
        except (motoserver.MotoServerError, daemons.DaemonError, network.NetworkError) as exc:
            raise LocalCloudError(str(exc)) from None
        if url is None:
            raise LocalCloudError(
                f"no moto server runs for cluster {self.cluster}: run 'up --local'"
            )
        return motoserver.MotoProvider(
            motoserver.REGION,
            endpoint_url=url,
            session=motoserver.session(),
            poll_interval=0.2,
            max_poll_interval=1.0,
        )

    # -- up ---------------------------------------------------------------------

    def up(
        self,
        config: ClusterConfig,
        on_event: Progress = no_progress,
        *,
        dry_run: bool = False,
        wait: bool = True,
        ready_timeout: float = READY_TIMEOUT,
    ) -> provision.UpResult:
        """`provision.up` against moto, ``sync``, then (``wait``) `wait_until_serving`."""
        result = provision.up(
            config, self.provider(), dry_run=dry_run, on_event=on_event, run_timeout=RUN_TIMEOUT
        )
        if dry_run:
            return result
        self.sync(on_event)
        if wait:
            self.wait_until_serving(config, ready_timeout, on_event)
        return result

    def ready_reader(self, config: ClusterConfig) -> Callable[[], ready.Snapshot]:
        """What `ready.wait_ready` polls, as for EC2: moto's instances and the
        agents' reports in the cluster bucket of moto's S3."""
        provider = self.provider()
        bucket = provider.find_bucket(self.cluster)
        if bucket is None:
            raise LocalCloudError(f"cluster {self.cluster} has no bucket for its agents' reports")
        expected = view.expected_names(config.counts)
        return view.reader(provider, provider.s3, bucket, self.cluster, expected)

    def wait_until_serving(
        self, config: ClusterConfig, timeout: float, on_event: Progress = no_progress
    ) -> None:
        """Until every agent reports that it serves (the same reports `up` reads on
        EC2); `LocalCloudError` naming the stuck agent and its log otherwise."""
        shown: list[str] = []

        def show(snapshot: ready.Snapshot) -> None:
            line = snapshot.line()
            if shown != [line]:
                on_event(line)
            shown[:] = [line]

        try:
            ready.wait_ready(self.ready_reader(config), timeout=timeout, on_snapshot=show)
        except ready.NotReady as exc:
            row = exc.row
            where = self.find(row.name) if row is not None else None
            what = f"{row.name} is {row.state}" if row is not None else "no agent reported"
            log = f"; see {self.agent_log(where)}" if where is not None else ""
            message = f"cluster {self.cluster} not ready ({exc.reason}): {what}{log}"
            raise LocalCloudError(message) from None

    def sync(self, on_event: Progress = no_progress) -> None:
        """Boot each running instance not booted yet; shut down each one no longer running."""
        provider = self.provider()
        nodes = provider.nodes(self.cluster, (*LIVE_STATES, TERMINATED))
        running = {n.instance_id: n for n in nodes if n.state == RUNNING}
        for instance_id in self._instance_ids():
            if instance_id not in running:
                on_event(f"shutting down {instance_id}: the EC2 API no longer reports it running")
                self._shut_down(instance_id)
        booted = set(self._booted())
        waiting = [n for n in running.values() if n.instance_id not in booted]
        waiting.sort(key=lambda n: (n.role != CONTROL_ROLE, n.role, n.index))
        control = [n for n in running.values() if n.role == CONTROL_ROLE]
        for node in waiting:
            on_event(f"booting {node.label} ({node.instance_id}) at {node.private_ip}")
            self._boot(provider, node, control[0] if control else None)

    def _boot(self, provider: NodeProvider, node: Node, control: Node | None) -> None:
        folder = self.instances_dir / node.instance_id
        if folder.exists():  # a boot interrupted earlier: start from scratch
            self._shut_down(node.instance_id)
        folder.mkdir(parents=True)
        try:
            user_data = provider.user_data(node.instance_id)
            self.host.boot(node, user_data, folder, control)
        except (
            instance.BootError,
            parts.UserDataError,
            ProviderError,
            network.NetworkError,
            daemons.DaemonError,
        ) as exc:
            raise LocalCloudError(str(exc)) from None
        (folder / BOOTED).write_text(f"{node.role} {node.index}\n")

    def _instance_ids(self) -> list[str]:
        """Every instance with a folder here, booted or not."""
        if not self.instances_dir.is_dir():
            return []
        return sorted(d.name for d in self.instances_dir.iterdir() if d.is_dir())

    def _booted(self) -> list[str]:
        return [i for i in self._instance_ids() if (self.instances_dir / i / BOOTED).exists()]

    def _processes(self, instance_id: str) -> list[int]:
        return self.host.processes(instance_id, self.instances_dir / instance_id)

    def _shut_down(self, instance_id: str) -> None:
        """What an EC2 shutdown does: SIGTERM to every process, SIGKILL after a while."""
        _stop_processes(
            functools.partial(self._processes, instance_id), f"{instance_id}'s processes"
        )
        try:
            self.host.release(instance_id)
        except network.NetworkError as exc:
            raise LocalCloudError(str(exc)) from None
        shutil.rmtree(self.instances_dir / instance_id, ignore_errors=True)

    # -- the barrier and DNS ------------------------------------------------------

    def _fs(self, instance_id: str) -> Path:
        return self.instances_dir / instance_id / instance.FS

    def _role(self, instance_id: str) -> str:
        try:
            return (self.instances_dir / instance_id / BOOTED).read_text().split()[0]
        except (OSError, IndexError):
            return ""

    def _task_instances(self) -> list[tuple[str, str]]:
        """(instance id, label) of each booted TensorFlow task."""
        found = []
        for instance_id in self._booted():
            role, index = (self.instances_dir / instance_id / BOOTED).read_text().split()
            if role != CONTROL_ROLE:
                found.append((instance_id, f"{role}{index}"))
        return found

    def _tf_config(self, instance_id: str) -> Path:
        """Written by the agent once its barrier passed."""
        return self._fs(instance_id) / instance.TF_CONFIG

    def agent_log(self, instance_id: str) -> Path:
        """The agent's log; on the chief it holds the training's output."""
        return daemons.log_file(self._fs(instance_id), AGENT)

    def find(self, label: str) -> str | None:
        """The booted instance holding ``label`` (``chief0``, ``worker1``), or None."""
        return next((i for i, name in self._task_instances() if name == label), None)

    def dns_table(self, timeout: float = DNS_TIMEOUT) -> list[DnsEntry]:
        """Every member as the cluster's CoreDNS answers it, asked on an instance.

        The question is asked on the chief (else any task) with the agent's
        own barrier command and config. In netns mode it runs inside the
        namespace, where CoreDNS listens on 127.0.0.1:53, and getaddrinfo is
        checked there too.
        """
        tasks = self._task_instances()
        if not tasks:
            return []
        instance_id = next((i for i, label in tasks if label == "chief0"), tasks[0][0])
        agent_json = self._fs(instance_id) / instance.AGENT_CONFIG
        argv = [str(Path(sys.executable).parent / "tfcluster"), "wait", "--config", str(agent_json)]
        argv += ["--timeout", str(timeout)]
        argv = self.host.on_instance(instance_id, argv)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
        if done.returncode != 0:
            raise LocalCloudError(f"asking the cluster's CoreDNS failed: {done.stderr.strip()}")
        entries = []
        for line in done.stdout.splitlines():
            name, address, port = line.split("\t")
            entries.append(DnsEntry(name, address, int(port)))
        return entries

    # -- status and down ---------------------------------------------------------

    def status(self) -> list[InstanceStatus]:
        """Every booted instance, with what the EC2 API (if moto runs) says of it."""
        nodes: dict[str, Node] = {}
        if motoserver.endpoint(self.moto_dir) is not None:
            nodes = {n.instance_id: n for n in self.provider().nodes(self.cluster)}
        rows = []
        for instance_id in self._booted():
            control = self._role(instance_id) == CONTROL_ROLE
            rows.append(
                InstanceStatus(
                    nodes.get(instance_id),
                    instance_id,
                    self.host.place(instance_id),
                    len(self._processes(instance_id)),
                    None if control else self._tf_config(instance_id).exists(),
                )
            )
        return rows

    def down(self, on_event: Progress = no_progress) -> list[str]:
        """Terminate in moto, then remove everything of the cluster here; what was removed."""
        removed: list[str] = []
        if motoserver.endpoint(self.moto_dir) is not None:
            provision.down(self.cluster, self.provider(), on_event=on_event, timeout=RUN_TIMEOUT)
        ids = self._instance_ids()
        control = [i for i in ids if self._role(i) == CONTROL_ROLE]
        for instance_id in [i for i in ids if i not in control] + control:
            on_event(f"shutting down {instance_id}")
            self._shut_down(instance_id)
            removed.append(instance_id)
        if motoserver.stop(self.moto_dir):
            removed.append("moto server")
        if network.available():  # namespaces need root: a cluster that has some can have them
            try:
                for ns in network.namespaces(self.cluster):
                    _stop_processes(functools.partial(network.pids, ns), f"the processes in {ns}")
                removed += network.remove_cluster(self.cluster)
            except network.NetworkError as exc:
                raise LocalCloudError(str(exc)) from None
        marker = str(self.folder)
        stray = _stop_processes(lambda: _processes_naming(marker), f"processes naming {marker}")
        removed += [f"pid {pid}" for pid in stray]
        if self.folder.exists():
            shutil.rmtree(self.folder)
            removed.append(str(self.folder))
        return removed


def _stop_processes(find: Callable[[], list[int]], what: str) -> list[int]:
    """SIGTERM every process ``find`` lists, SIGKILL what is left after STOP_TIMEOUT."""
    first = find()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in find():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

        def gone() -> bool | None:
            for pid in find():
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            return True if not find() else None

        try:
            wait_for(gone, what=f"{what} to exit after {sig.name}", timeout=STOP_TIMEOUT)
            return first
        except WaitTimeout:
            if sig is signal.SIGKILL:
                raise LocalCloudError(f"{what} survived SIGKILL") from None
    return first


def _processes_naming(marker: str) -> list[int]:
    """Live processes (not this one) whose command line names ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return found
