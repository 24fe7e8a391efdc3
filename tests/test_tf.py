"""TF_CONFIG from DNS membership, and a real ParameterServerStrategy job on real
TensorFlow servers whose chief finds the cluster through CoreDNS.

The servers (1 ps, 2 workers) run as child processes on distinct ports of
127.0.0.1, started once for the module: each costs a TensorFlow import and
about 550 MB.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import TEST_CLUSTER, TEST_ZONE, put_members
from tfcluster.discovery import records, tfconfig
from tfcluster.discovery.dns import DNSClient, Endpoint
from tfcluster.discovery.etcdclient import child_environment
from tfcluster.discovery.records import Member
from tfcluster.discovery.waiting import wait_for

SERVER_START_TIMEOUT = 120.0
TRAIN_TIMEOUT = 300.0
SERVER_STOP_TIMEOUT = 30.0
TFSERVER = (sys.executable, "-m", "tfcluster.discovery.tfserver")
TRAIN = (sys.executable, "-m", "tfcluster.discovery.train")

MEMBERS = {
    Member("chief", 0): Endpoint("127.0.0.1", 2222),
    Member("ps", 0): Endpoint("10.0.0.5", 2222),
    Member("worker", 0): Endpoint("10.0.0.6", 2222),
    Member("worker", 1): Endpoint("10.0.0.7", 2223),
}


# --- cluster spec and TF_CONFIG (no TensorFlow) ---------------------------------


def test_cluster_spec_lists_each_role_in_index_order():
    shuffled = dict(reversed(list(MEMBERS.items())))
    assert tfconfig.build_cluster_spec(shuffled, TEST_ZONE, use_names=True) == {
        "chief": ["chief0.tensorflow.local:2222"],
        "ps": ["ps0.tensorflow.local:2222"],
        "worker": ["worker0.tensorflow.local:2222", "worker1.tensorflow.local:2223"],
    }
    assert tfconfig.build_cluster_spec(shuffled, TEST_ZONE, use_names=False) == {
        "chief": ["127.0.0.1:2222"],
        "ps": ["10.0.0.5:2222"],
        "worker": ["10.0.0.6:2222", "10.0.0.7:2223"],
    }


def test_a_missing_index_is_not_renumbered():
    members = {m: e for m, e in MEMBERS.items() if m != Member("worker", 0)}
    with pytest.raises(tfconfig.ClusterSpecError, match=r"worker tasks \[0\]"):
        tfconfig.build_cluster_spec(members, TEST_ZONE, use_names=True)


def test_tf_config_names_a_task_of_the_cluster():
    spec = tfconfig.build_cluster_spec(MEMBERS, TEST_ZONE, use_names=True)
    assert tfconfig.tf_config(spec, "worker", 1) == {
        "cluster": spec,
        "task": {"type": "worker", "index": 1},
    }
    with pytest.raises(tfconfig.ClusterSpecError):
        tfconfig.tf_config(spec, "worker", 2)
    with pytest.raises(tfconfig.ClusterSpecError):
        tfconfig.tf_config(spec, "evaluator", 0)


def test_write_tf_config_replaces_the_file_whole_and_readable(tmp_path):
    spec = tfconfig.build_cluster_spec(MEMBERS, TEST_ZONE, use_names=True)
    path = tmp_path / "run" / "tf_config.json"
    tfconfig.write_tf_config(path, spec, "ps", 0)
    written = tfconfig.write_tf_config(path, spec, "worker", 1)

    assert json.loads(path.read_text()) == written
    assert written["task"] == {"type": "worker", "index": 1}
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["tf_config.json"]
    assert tfconfig.read_tf_config(path.read_text()) == written


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        '{"cluster": {}}',
        '{"cluster": {"ps": ["a:1"]}, "task": {"type": "ps"}}',
        '{"cluster": {"ps": ["a:1"]}, "task": {"type": "ps", "index": 1}}',
        '{"cluster": {"ps": ["a:1"]}, "task": {"type": ["ps"], "index": 0}}',
    ],
)
def test_read_tf_config_rejects_what_is_not_a_task_of_its_cluster(text):
    with pytest.raises(tfconfig.ClusterSpecError):
        tfconfig.read_tf_config(text)


def test_the_agent_side_modules_do_not_import_tensorflow():
    code = (
        "import sys\n"
        "import tfcluster.discovery.dns, tfcluster.discovery.tfconfig\n"
        "import tfcluster.discovery.tfserver, tfcluster.discovery.train\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_tfserver_without_tf_config_fails_with_one_line():
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    result = subprocess.run(TFSERVER, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tfserver: no TF_CONFIG: pass --tf-config PATH or set TF_CONFIG"
    ]


def test_the_chief_program_runs_in_its_folder_with_the_interpreters_bin_first(tmp_path):
    """What the chief's agent starts: ``python3`` must be the agent venv's (the folder of
    the interpreter running tfserver), in the unpacked bundle's folder."""
    tf_config = tmp_path / "tf_config.json"
    tf_config.write_text(
        json.dumps(
            {"cluster": {"chief": ["chief0.x.local:2222"]}, "task": {"type": "chief", "index": 0}}
        )
    )
    program_dir = tmp_path / "program"
    program_dir.mkdir()
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    show = 'pwd; command -v python3; echo "$TF_CONFIG"'
    argv = [*TFSERVER, "--tf-config", str(tf_config), "--program-dir", str(program_dir)]
    result = subprocess.run(
        [*argv, "--", "sh", "-c", show], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    cwd, python3, document = result.stdout.splitlines()
    assert cwd == str(program_dir)
    assert python3 == str(Path(sys.executable).parent / "python3")
    assert json.loads(document)["task"] == {"type": "chief", "index": 0}


# --- real TensorFlow -----------------------------------------------------------


def free_tcp_ports(count: int) -> list[int]:
    """``count`` distinct ports free on all interfaces, where TF servers bind."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.create_server(("0.0.0.0", 0))) for _ in range(count)]
        return [int(sock.getsockname()[1]) for sock in socks]


def start_task(config: Path) -> subprocess.Popen[bytes]:
    """``tfserver`` for one task, logging next to its TF_CONFIG."""
    with open(config.with_suffix(".log"), "wb") as log:
        return subprocess.Popen(
            [*TFSERVER, "--tf-config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_environment(),
        )


def wait_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    def listening() -> bool | None:
        if process.poll() is not None:
            pytest.fail(f"TF server exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
        except OSError:
            return None
        return True

    wait_for(listening, what=f"a TF server on 127.0.0.1:{port}", timeout=SERVER_START_TIMEOUT)


def stop(process: subprocess.Popen[bytes]) -> int:
    process.terminate()
    try:
        return process.wait(timeout=SERVER_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout=SERVER_STOP_TIMEOUT)


@dataclass(frozen=True)
class LocalCluster:
    members: dict[Member, Endpoint]
    spec: dict[str, list[str]]
    config_dir: Path
    dns_server: tuple[str, int]


@pytest.fixture(scope="module")
def tf_cluster(stack, etcd, tmp_path_factory) -> Iterator[LocalCluster]:
    """ps0, worker0, worker1 serving; chief0 registered. TF_CONFIG is built from
    what DNS answers, as the agent does."""
    prefix = records.cluster_path(TEST_CLUSTER) + "/"
    config_dir = tmp_path_factory.mktemp("tf")
    servers: dict[Member, subprocess.Popen[bytes]] = {}
    etcd.delete_prefix(prefix)
    try:
        tasks = [Member("chief", 0), Member("ps", 0), Member("worker", 0), Member("worker", 1)]
        registered = {
            member: Endpoint("127.0.0.1", port)
            for member, port in zip(tasks, free_tcp_ports(len(tasks)), strict=True)
        }
        put_members(etcd, registered)
        members = DNSClient(stack.dns_server).members(TEST_ZONE)
        assert members == registered
        spec = tfconfig.build_cluster_spec(members, TEST_ZONE, use_names=False)
        for member in members:
            config = config_dir / f"{member.label}.json"
            tfconfig.write_tf_config(config, spec, member.role, member.index)
            if member.role != "chief":
                servers[member] = start_task(config)
        for member, process in servers.items():
            wait_listening(process, members[member].port, config_dir / f"{member.label}.log")
        yield LocalCluster(members, spec, config_dir, stack.dns_server)
    finally:
        for process in servers.values():
            stop(process)
        etcd.delete_prefix(prefix)


def run_chief(
    cluster: LocalCluster, *program: str, env: dict[str, str] | None = None
) -> tuple[list[tuple[int, float]], dict]:
    """Run the chief through tfserver; its loss lines and its summary."""
    argv = [*TFSERVER, "--tf-config", str(cluster.config_dir / "chief0.json")]
    if program:
        argv += ["--", *program]
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=TRAIN_TIMEOUT,
        env={**child_environment(), **(env or {})},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    steps = (line.split() for line in lines[:-1] if line.startswith("step "))
    losses = [(int(f[1]), float(f[3])) for f in steps]
    return losses, json.loads(lines[-1])


@pytest.mark.tf
def test_chief_trains_with_the_dns_cluster_resolver(tf_cluster):
    host, port = tf_cluster.dns_server
    losses, summary = run_chief(
        tf_cluster,
        *TRAIN,
        *("--steps", "200", "--log-every", "50", "--zone", TEST_ZONE),
        *("--dns-server", f"{host}:{port}", "--addresses", "ips"),
    )
    assert [step for step, _ in losses] == [1, 50, 100, 150, 200]
    assert summary["steps"] == 200
    assert summary["first_loss"] == pytest.approx(losses[0][1], abs=1e-4)
    assert summary["last_loss"] < summary["first_loss"] / 2


@pytest.mark.tf
def test_chief_default_program_trains_from_tf_config(tf_cluster):
    losses, summary = run_chief(tf_cluster)
    assert losses[0][0] == 1 and losses[-1][0] == summary["steps"]
    assert summary["last_loss"] < summary["first_loss"] / 2


@pytest.mark.tf
def test_the_default_program_leaves_a_checkpoint_tensorflow_loads(tf_cluster, tmp_path):
    """With TFCLUSTER_OUTPUT_DIR (as the chief's agent sets it) the built-in job
    writes a checkpoint and metrics.json; a fresh TensorFlow process restores
    the checkpoint and finds the weights the job learned (y = 3x + 2)."""
    out = tmp_path / "output"
    _, summary = run_chief(tf_cluster, env={"TFCLUSTER_OUTPUT_DIR": str(out)})
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == summary["steps"] and metrics["losses"][0][0] == 1
    assert metrics["weight"] == pytest.approx(summary["weight"])
    assert metrics["checkpoint"].startswith("checkpoint/ckpt-")
    probe = (
        "import json, sys, tensorflow as tf\n"
        "w, b = tf.Variable(0.0), tf.Variable(0.0)\n"
        "path = tf.train.latest_checkpoint(sys.argv[1])\n"
        "tf.train.Checkpoint(weight=w, bias=b).restore(path).assert_consumed()\n"
        "print(json.dumps([path, float(w.numpy()), float(b.numpy())]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(out / "checkpoint")],
        capture_output=True, text=True, timeout=120, env=child_environment(), check=True,
    )  # fmt: skip
    path, weight, bias = json.loads(result.stdout.strip().splitlines()[-1])
    assert path == str(out / metrics["checkpoint"])
    assert weight == pytest.approx(metrics["weight"]) and bias == pytest.approx(metrics["bias"])
    assert weight == pytest.approx(3.0, abs=0.3) and bias == pytest.approx(2.0, abs=0.3)


@pytest.mark.tf
def test_dns_cluster_resolver_reads_membership_on_every_call(tf_cluster, etcd):
    tf = pytest.importorskip("tensorflow")
    client = DNSClient(tf_cluster.dns_server)
    resolver = tfconfig.make_dns_cluster_resolver(client, TEST_ZONE, "chief", 0, use_names=False)
    assert isinstance(resolver, tf.distribute.cluster_resolver.ClusterResolver)
    assert (resolver.task_type, resolver.task_id, resolver.rpc_layer) == ("chief", 0, "grpc")
    assert resolver.num_accelerators() == {}
    chief = tf_cluster.members[Member("chief", 0)]
    assert resolver.master() == f"grpc://127.0.0.1:{chief.port}"

    sent = client.queries_sent
    assert resolver.cluster_spec().as_dict() == tf_cluster.spec
    assert client.queries_sent == sent + 1

    # A member appears (with a hole before it), is replaced at a new address, goes.
    # CoreDNS caches the membership set for a second, so each change is awaited.
    def seen(check, what):
        wait_for(lambda: True if check() else None, what=what, timeout=3, interval=0.1)

    def worker5() -> str | None:
        try:
            return resolver.cluster_spec().task_address("worker", 5)
        except ValueError:
            return None

    extra = Member("worker", 5)
    path = records.cluster_path(TEST_CLUSTER)
    try:
        put_members(etcd, {extra: Endpoint("127.0.0.1", 2300)})
        seen(lambda: worker5() == "127.0.0.1:2300", "worker5 to appear")
        put_members(etcd, {extra: Endpoint("127.0.0.9", 2301)})
        seen(lambda: worker5() == "127.0.0.9:2301", "worker5's new address")
    finally:
        etcd.delete(records.srv_key(path, TEST_ZONE, extra))
        etcd.delete(records.record_key(path, TEST_ZONE, extra))
    seen(lambda: resolver.cluster_spec().as_dict() == tf_cluster.spec, "worker5 to go")

    named = tfconfig.make_dns_cluster_resolver(client, TEST_ZONE, "chief", 0)
    assert named.master() == f"grpc://chief0.{TEST_ZONE}:{chief.port}"


@pytest.mark.tf
def test_a_server_stops_cleanly_on_sigterm_and_reports_a_taken_port(tmp_path):
    port, worker_port = free_tcp_ports(2)
    spec = {"ps": [f"127.0.0.1:{port}"], "worker": [f"127.0.0.1:{worker_port}"]}
    config = tmp_path / "ps0.json"
    tfconfig.write_tf_config(config, spec, "ps", 0)
    first = start_task(config)
    try:
        wait_listening(first, port, config.with_suffix(".log"))
        # The same task again cannot bind the port: a one-line error, not a traceback.
        second = subprocess.run(
            [*TFSERVER, "--tf-config", str(config)],
            capture_output=True,
            text=True,
            timeout=SERVER_START_TIMEOUT,
            env=child_environment(),
        )
        assert second.returncode == 2
        assert second.stderr.strip().splitlines()[-1].startswith("tfserver: ps0: ")
        assert "Traceback" not in second.stderr
    finally:
        code = stop(first)  # SIGTERM
    assert code == 0
    assert "stopping on SIGTERM" in config.with_suffix(".log").read_text()
