"""`tfcluster wait`, `records` and `agent` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import TEST_CLUSTER, TEST_ZONE, put_members
from tfcluster.discovery.agent_config import AgentConfig, dump_agent_config, role_counts
from tfcluster.discovery.dns import Endpoint
from tfcluster.discovery.records import Member

TFCLUSTER = str(Path(sys.executable).parent / "tfcluster")
ROLES = {"ps": 1, "worker": 1}


def config(tmp_path: Path, stack, **raw) -> Path:
    """A worker's agent config written through the schema; ``raw`` replaces
    keys of the JSON as written (to write invalid values)."""
    valid = AgentConfig(
        cluster=TEST_CLUSTER,
        zone=TEST_ZONE,
        roles=role_counts(ROLES),
        role="worker",
        etcd_endpoints=(stack.etcd_endpoint,),
        dns_server=stack.dns_server,
        check_system_resolver=False,
    )
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({**dump_agent_config(valid), **raw}))
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TFCLUSTER, *args], capture_output=True, text=True, timeout=60)


def test_wait_prints_the_cluster_once_it_resolves(stack, etcd, clean_cluster, tmp_path):
    put_members(
        etcd,
        {
            Member("ps", 0): Endpoint("127.0.36.1", 2222),
            Member("worker", 0): Endpoint("127.0.36.2", 2223),
        },
    )
    result = run("wait", "--config", str(config(tmp_path, stack)), "--timeout", "10")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "ps0.tensorflow.local\t127.0.36.1\t2222",
        "worker0.tensorflow.local\t127.0.36.2\t2223",
    ]


def test_wait_times_out_naming_the_missing_peer(stack, etcd, clean_cluster, tmp_path):
    put_members(etcd, {Member("ps", 0): Endpoint("127.0.36.1", 2222)})
    result = run("wait", "--config", str(config(tmp_path, stack)), "--timeout", "1")
    assert result.returncode == 5
    assert result.stderr.strip().splitlines() == [
        "Error: barrier timed out after 1 s; still missing: worker0"
    ]


def test_records_lists_what_etcd_holds(stack, etcd, clean_cluster, tmp_path):
    put_members(etcd, {Member("ps", 0): Endpoint("127.0.36.1", 2222)})
    result = run("records", "--config", str(config(tmp_path, stack)), "--json")
    assert result.returncode == 0, result.stderr
    held = json.loads(result.stdout)
    assert held == {
        "/tfcluster-test/local/tensorflow/_tcp/_tensorflow/ps0": {
            "host": "127.0.36.1", "port": 2222, "ttl": 5,
        },
        "/tfcluster-test/local/tensorflow/ps0/tf": {"host": "127.0.36.1", "port": 2222, "ttl": 5},
    }  # fmt: skip


def test_bad_config_is_one_line_and_exit_2(stack, tmp_path):
    for overrides, message in [
        ({"role": "boss"}, "role: must be one of chief, ps, worker, got 'boss'"),
        ({"lease_ttl": 1}, "lease_ttl: must be an integer from 2 to 3600, got 1"),
        ({"colour": "blue"}, "unknown agent config key(s): colour"),
    ]:
        result = run("agent", "--config", str(config(tmp_path, stack, **overrides)))
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1] == f"Error: {message}"
        assert "Traceback" not in result.stderr
    missing = run("agent", "--config", str(tmp_path / "nope.json"))
    assert missing.returncode == 2
    assert "cannot read agent config" in missing.stderr
