"""The agent's reports and the chief's outputs, end to end: real agents as
processes against the real etcd and CoreDNS, the cluster bucket in moto's S3
(tests/controlled_moto.py), real TensorFlow where marked.

moto checks neither signatures nor POST policies, so what S3 would enforce is
checked by reading the signed policy documents (``allows``)."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from controlled_moto import ControlledMoto, s3_client
from harness import AgentProcess, free_port_block, make_agent
from tfcluster.cloudinit.observe.policy import (
    allows,
    output_post_config,
    policy_terms,
    report_post_config,
)
from tfcluster.discovery import records
from tfcluster.discovery.etcdclient import child_environment
from tfcluster.discovery.identity import Identity
from tfcluster.discovery.output import MARKER_KEY
from tfcluster.discovery.records import Member
from tfcluster.discovery.registry import Registry
from tfcluster.discovery.report import report_key
from tfcluster.discovery.waiting import wait_for

REPORT_TIMEOUT = 60.0


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


def bucket_keys(url: str, bucket: str, roles: dict[str, int], **extra: Any) -> dict[str, Any]:
    """The agent config keys ``up`` adds for the bucket: one report policy per role."""
    names = [role for role, count in roles.items() if count]
    post = report_post_config(s3_client(url), bucket, names)
    return {"report_post": post, "report_heartbeat": 1, **extra}


def launch(
    agents: list[AgentProcess], tmp_path: Path, stack: Any, role: str, index: int, ip: str,
    roles: dict[str, int], *, server: bool = False, **kw: Any,
) -> AgentProcess:  # fmt: skip
    agent = make_agent(
        tmp_path, stack, role=role, launch_index=index, ip=ip, roles=roles,
        instance_id=instance_id_of(role, index, ip), **kw,
    )  # fmt: skip
    agents.append(agent)
    return agent.start(no_server=not server)


def instance_id_of(role: str, index: int, ip: str) -> str:
    return "i-" + hashlib.sha256(f"{role}{index}@{ip}".encode()).hexdigest()[:17]


def stored(url: str, bucket: str, label: str) -> dict[str, Any] | None:
    s3 = s3_client(url)
    try:
        body = s3.get_object(Bucket=bucket, Key=report_key(label))["Body"].read()
    except (s3.exceptions.NoSuchKey, s3.exceptions.NoSuchBucket):
        return None
    return dict(json.loads(body))


def wait_report(
    url: str, bucket: str, label: str, what: str, check: Callable[[dict[str, Any]], bool],
    timeout: float = REPORT_TIMEOUT,
) -> dict[str, Any]:  # fmt: skip
    def ready() -> dict[str, Any] | None:
        doc = stored(url, bucket, label)
        return doc if doc is not None and check(doc) else None

    return wait_for(ready, what=f"{label}'s report to show {what}", timeout=timeout)


def states(doc: dict[str, Any]) -> list[str]:
    return [entry[0] for entry in doc["history"]]


def objects(url: str, bucket: str) -> dict[str, bytes]:
    s3 = s3_client(url)
    listed = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def assert_within_policies(url: str, bucket: str, config_keys: dict[str, Any]) -> None:
    """Every object in the bucket is one that S3 would have taken from some
    policy the agents were given (key prefix, size, expiry)."""
    terms = [
        policy_terms(fields)
        for key in ("report_post", "output_post")
        if key in config_keys
        for fields in config_keys[key]["fields"].values()
    ]
    now = datetime.now(timezone.utc)
    for key, body in objects(url, bucket).items():
        assert any(allows(t, key, len(body), now) for t in terms), key


def listening(ip: str, port: int) -> bool | None:
    try:
        with socket.create_connection((ip, port), timeout=1.0):
            return True
    except OSError:
        return None


# -- reports per state -------------------------------------------------------------------


def test_reports_follow_the_agents_states(stack, clean_cluster, agents, moto, bucket, tmp_path):
    roles = {"worker": 2}
    keys = bucket_keys(moto.url, bucket, roles)
    first = launch(agents, tmp_path, stack, "worker", 0, "127.0.40.1", roles, raw=keys)
    doc = wait_report(
        moto.url, bucket, "worker0", "the barrier waiting for worker1",
        lambda d: d["state"] == "BARRIER" and (d["barrier"] or {}).get("seen") == 1,
    )  # fmt: skip
    assert doc["barrier"] == {"seen": 1, "expected": 2, "missing": ["worker1"], "missing_count": 1}
    assert states(doc) == ["STARTING", "IDENTIFY", "CLAIM", "BARRIER"]
    assert doc["address"] == "127.0.40.1" and doc["dns_name"] == "worker0.tensorflow.local"
    assert doc["instance_id"] == instance_id_of("worker", 0, "127.0.40.1") and doc["exit"] is None
    assert doc["outputs"] is None  # a worker uploads no outputs
    assert any("claimed worker0.tensorflow.local" in line for line in doc["log"])

    second = launch(agents, tmp_path, stack, "worker", 1, "127.0.40.2", roles, raw=keys)
    for label in ("worker0", "worker1"):
        doc = wait_report(moto.url, bucket, label, "SERVE", lambda d: d["state"] == "SERVE")
        assert doc["barrier"] == {"seen": 2, "expected": 2, "missing": [], "missing_count": 0}
        assert states(doc)[-3:] == ["BARRIER", "CONFIGURE", "SERVE"]
    # Heartbeats while nothing changes (report_heartbeat 1 s).
    seq = doc["seq"]
    wait_report(moto.url, bucket, "worker1", "two heartbeats", lambda d: d["seq"] >= seq + 2)

    for agent in (first, second):
        agent.signal(signal.SIGTERM)
    assert [first.wait_exit(20), second.wait_exit(20)] == [0, 0]
    for label in ("worker0", "worker1"):
        doc = stored(moto.url, bucket, label)
        assert doc is not None and doc["state"] == "STOP"
        assert doc["exit"] == {"code": 0, "message": f"{label} stopped"}
        assert states(doc) == ["STARTING", "IDENTIFY", "CLAIM", "BARRIER", "CONFIGURE", "SERVE",
                               "STOP"]  # fmt: skip
    assert_within_policies(moto.url, bucket, keys)
    assert sorted(objects(moto.url, bucket)) == [report_key("worker0"), report_key("worker1")]


def test_a_second_claimant_does_not_overwrite_the_holders_report(
    stack, clean_cluster, agents, moto, bucket, tmp_path
):
    """One report key per name: an instance refused the name writes none.
    (No heartbeats here: any POST after the holder's SERVE is the second's.)"""
    roles = {"worker": 1}
    keys = bucket_keys(moto.url, bucket, roles, report_heartbeat=3600)
    holder = launch(agents, tmp_path, stack, "worker", 0, "127.0.40.7", roles, raw=keys)
    wait_report(moto.url, bucket, "worker0", "SERVE", lambda d: d["state"] == "SERVE")
    posts = moto.calls["PostObject"]
    second = launch(agents, tmp_path, stack, "worker", 0, "127.0.40.8", roles, raw=keys)
    assert second.wait_exit(30) == 4
    assert "is held by instance" in second.log() and "Traceback" not in second.log()
    assert moto.calls["PostObject"] == posts
    doc = stored(moto.url, bucket, "worker0")
    assert doc is not None and doc["address"] == "127.0.40.7" and doc["exit"] is None
    holder.signal(signal.SIGTERM)
    assert holder.wait_exit(20) == 0
    final = stored(moto.url, bucket, "worker0")
    assert final is not None and final["address"] == "127.0.40.7" and final["state"] == "STOP"


def test_without_report_post_nothing_is_written(
    stack, clean_cluster, agents, moto, bucket, tmp_path
):
    agent = launch(agents, tmp_path, stack, "worker", 0, "127.0.40.5", {"worker": 1})
    agent.wait_passed_barrier()
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit(20) == 0
    assert moto.calls["PostObject"] == 0 and "not written" not in agent.log()


# -- the bucket in the way ------------------------------------------------------------------


def test_a_hanging_bucket_does_not_hold_the_agents_up(
    stack, clean_cluster, agents, moto, bucket, tmp_path
):
    """Each agent's first report upload is held by the server, unanswered.
    The agents pass their barrier meanwhile; once the uploads are let go,
    the reports catch up with the state the agents are in."""
    roles = {"ps": 1, "worker": 1}
    keys = bucket_keys(moto.url, bucket, roles)
    holds = [
        moto.hold("PostObject", lambda p, label=label: p.get("Key") == report_key(label),
                  before=True)
        for label in ("ps0", "worker0")
    ]  # fmt: skip
    pair = [
        launch(agents, tmp_path, stack, "ps", 0, "127.0.41.1", roles, raw=keys),
        launch(agents, tmp_path, stack, "worker", 0, "127.0.41.2", roles, raw=keys),
    ]
    for hold in holds:
        hold.wait_reached()
    for agent in pair:
        agent.wait_passed_barrier(timeout=30)
    assert not any(hold.released.is_set() for hold in holds)
    assert moto.calls["PostObject"] == 2  # one upload each, both still hanging
    for hold in holds:
        hold.release()
    for label in ("ps0", "worker0"):
        wait_report(moto.url, bucket, label, "SERVE", lambda d: d["state"] == "SERVE")
    for agent in pair:
        agent.signal(signal.SIGTERM)
        assert agent.wait_exit(20) == 0


@pytest.mark.tf
def test_an_unreachable_bucket_neither_stops_nor_slows_the_agents(
    stack, clean_cluster, agents, tmp_path
):
    """The bucket's endpoint refuses connections (bound, not listening): the
    agents still pass their barrier and their TensorFlow servers listen;
    the reports resume when the endpoint answers."""
    roles = {"ps": 1, "worker": 1}
    server = ControlledMoto()
    url = server.reserve()
    try:
        keys = bucket_keys(url, "tfc-outage", roles)  # signing needs no server
        base = free_port_block(2)
        pair = [
            launch(agents, tmp_path, stack, role, 0, ip, roles, server=True, raw=keys,
                   tf_port=base, tf_config_addresses="ips", barrier_timeout=120)
            for role, ip in (("ps", "127.0.42.1"), ("worker", "127.0.42.2"))
        ]  # fmt: skip
        for n, agent in enumerate(pair):
            agent.wait_passed_barrier(timeout=60)
            wait_for(
                lambda n=n, agent=agent: listening(agent.ip, base + n),
                what=f"{agent.name}'s TF server to listen",
                timeout=120,
            )
        for agent in pair:
            assert "not written: cannot reach" in agent.log()
            assert agent.proc is not None and agent.proc.poll() is None

        server.start()
        s3_client(url).create_bucket(Bucket="tfc-outage")
        for label in ("ps0", "worker0"):
            doc = wait_report(
                url, "tfc-outage", label, "SERVE with its server up",
                lambda d: d["state"] == "SERVE" and (d["tensorflow"] or {}).get("running"),
                timeout=120,  # the writer's backoff: at most 60 s between tries
            )  # fmt: skip
            assert doc["tensorflow"]["kind"] == "server"
            assert any("not written" in line for line in doc["log"])  # the outage, in its log
            assert any(f"tfserver: {label} serving" in line for line in doc["log"])
        for agent in pair:
            agent.signal(signal.SIGTERM)
            assert agent.wait_exit(30) == 0, agent.log()
    finally:
        server.stop()


# -- outputs and on_chief_exit -------------------------------------------------------------

PROGRAM = textwrap.dedent(
    """
    # The chief's program in this test: writes one file, waits (bounded) for
    # the test's go-ahead file, writes another, exits.
    import os, pathlib, sys, time
    out = pathlib.Path(os.environ["TFCLUSTER_OUTPUT_DIR"])
    (out / "early.txt").write_text("written while the program runs\\n")
    print("program: wrote early.txt", flush=True)
    go, deadline = pathlib.Path(sys.argv[1]), time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    (out / "sub").mkdir(exist_ok=True)
    (out / "sub" / "late.bin").write_bytes(os.urandom(100000))
    print("program: done", flush=True)
    sys.exit(0 if go.exists() else 3)
    """
)

SHUTDOWN = '#!/bin/sh\necho "$@" > {record}\n'


def shutdown_stand_in(tmp_path: Path, label: str) -> tuple[str, Path]:
    """A stand-in for ``shutdown``: it records its arguments in a file. The
    real command would power off the machine the tests run on; what the agent
    owes is to call it, with ``-P now``, after it has stopped. EC2 turns the
    power-off into a termination (terminate-on-shutdown), outside the agent."""
    record = tmp_path / f"{label}.shutdown"
    script = tmp_path / f"{label}-shutdown.sh"
    script.write_text(SHUTDOWN.format(record=record))
    script.chmod(0o755)
    return str(script), record


def test_outputs_upload_while_running_and_at_exit_then_every_agent_shuts_down(
    stack, etcd, clean_cluster, agents, moto, bucket, tmp_path
):
    roles = {"chief": 1, "worker": 1}
    s3 = s3_client(moto.url)
    keys = bucket_keys(
        moto.url, bucket, roles, output_post=output_post_config(s3, bucket),
        output_interval=1, on_chief_exit="down",
    )  # fmt: skip
    program = tmp_path / "program.py"
    program.write_text(PROGRAM)
    go = tmp_path / "go"
    chief_shutdown, chief_record = shutdown_stand_in(tmp_path, "chief0")
    worker_shutdown, worker_record = shutdown_stand_in(tmp_path, "worker0")
    out = tmp_path / "chief-output"
    chief = launch(
        agents, tmp_path, stack, "chief", 0, "127.0.43.1", roles, server=True,
        raw={**keys, "shutdown_command": chief_shutdown, "output_dir": str(out)},
        program=(sys.executable, str(program), str(go)),
    )  # fmt: skip
    worker = launch(
        agents, tmp_path, stack, "worker", 0, "127.0.43.2", roles,
        raw={**keys, "shutdown_command": worker_shutdown},
    )  # fmt: skip

    # While the program runs: a periodic pass uploads early.txt; no marker yet.
    wait_for(
        lambda: "output/early.txt" in objects(moto.url, bucket) or None,
        what="a periodic upload of early.txt",
        timeout=60,
    )
    doc = stored(moto.url, bucket, "chief0")
    assert (
        doc is not None and doc["tensorflow"]["running"] and doc["tensorflow"]["kind"] == "program"
    )
    assert MARKER_KEY not in objects(moto.url, bucket)
    assert not chief_record.exists() and not worker_record.exists()
    go.touch()

    assert chief.wait_exit(60) == 0, chief.log()
    assert worker.wait_exit(30) == 0, worker.log()
    stored_objects = objects(moto.url, bucket)
    marker = json.loads(stored_objects[MARKER_KEY])
    assert marker["complete"] and marker["exit_code"] == 0
    assert [f["path"] for f in marker["files"]] == ["early.txt", "sub/late.bin"]
    for entry in marker["files"]:
        body = stored_objects["output/" + entry["path"]]
        assert (out / entry["path"]).read_bytes() == body
        assert entry["size"] == len(body) and entry["sha256"] == hashlib.sha256(body).hexdigest()

    # The job-done key, outside the zone's keys; each agent called the shutdown stand-in.
    value, _ = etcd.get(records.job_done_key(records.cluster_path(stack.cluster)))
    done = json.loads(value)
    assert done["by"] == "chief0" and done["exit_code"] == 0
    assert chief_record.read_text().split() == ["-P", "now"]
    assert worker_record.read_text().split() == ["-P", "now"]

    chief_doc = stored(moto.url, bucket, "chief0")
    assert chief_doc is not None and states(chief_doc)[-3:] == ["SERVE", "UPLOAD", "STOP"]
    assert chief_doc["exit"] == {"code": 0, "message": "chief0 finished"}
    assert chief_doc["tensorflow"]["exit_code"] == 0
    assert chief_doc["outputs"] == {
        "files": 2, "bytes": marker["bytes"], "complete": True, "error": None,
    }  # fmt: skip
    assert "program: done" in chief_doc["log"]  # the program's output, relayed
    assert "program: done" in chief.log()  # and still on the agent's own stdout
    worker_doc = stored(moto.url, bucket, "worker0")
    assert worker_doc is not None and worker_doc["state"] == "STOP"
    assert worker_doc["exit"] == {"code": 0, "message": "worker0 stopped: the job is done"}
    assert worker_doc["detail"] == "the job is done: shutting the instance down"
    assert_within_policies(moto.url, bucket, keys)


def test_a_job_done_key_older_than_the_claim_is_an_earlier_jobs(stack, etcd, clean_cluster):
    """An etcd that outlives a cluster (``down`` removes no etcd it did not
    create) may still hold an earlier job's key under the same cluster name."""
    key = records.job_done_key(records.cluster_path(stack.cluster))
    etcd.put(key, json.dumps({"by": "chief0", "exit_code": 0}))
    registry = Registry(etcd, stack.cluster, stack.zone, lease_ttl=4, record_ttl=1, follow_job=True)
    member = Member("worker", 0)
    registry.claim(Identity(member, "127.0.43.20", 2222, instance_id_of("worker", 0, "x")))
    try:
        assert registry.claim_revision > 0
        assert registry.job_done() is None  # the earlier job's
        etcd.put(key, json.dumps({"by": "chief0", "exit_code": 3}))
        assert registry.job_done() == {"by": "chief0", "exit_code": 3}  # this job's
    finally:
        registry.release()


def test_a_failing_shutdown_command_is_logged_and_reported(
    stack, clean_cluster, agents, moto, bucket, tmp_path
):
    """``shutdown`` refused (as for an unprivileged user without a polkit rule)."""
    roles = {"chief": 1}
    script = tmp_path / "refuse.sh"
    script.write_text("#!/bin/sh\necho 'Access denied' >&2\nexit 1\n")
    script.chmod(0o755)
    keys = bucket_keys(moto.url, bucket, roles, on_chief_exit="down", shutdown_command=str(script))
    chief = launch(
        agents, tmp_path, stack, "chief", 0, "127.0.43.5", roles, server=True, raw=keys,
        program=(sys.executable, "-c", "print('the job')"), output_dir=tmp_path / "out",
    )  # fmt: skip
    assert chief.wait_exit(60) == 0, chief.log()
    assert "refuse.sh exited with status 1: Access denied" in chief.log()
    doc = stored(moto.url, bucket, "chief0")
    assert doc is not None and any(
        "exited with status 1: Access denied" in line for line in doc["log"]
    )


def test_keep_leaves_the_others_running(stack, etcd, clean_cluster, agents, moto, bucket, tmp_path):
    roles = {"chief": 1, "worker": 1}
    worker_shutdown, worker_record = shutdown_stand_in(tmp_path, "worker0")
    keys = bucket_keys(moto.url, bucket, roles, shutdown_command=worker_shutdown)
    worker = launch(agents, tmp_path, stack, "worker", 0, "127.0.43.8", roles, raw=keys)
    chief = launch(
        agents, tmp_path, stack, "chief", 0, "127.0.43.7", roles, server=True, raw=keys,
        program=(sys.executable, "-c", "print('the job')"), output_dir=tmp_path / "out",
    )  # fmt: skip
    assert chief.wait_exit(60) == 0, chief.log()
    # The worker goes on: it is in SERVE and reports so after the chief's exit.
    exited = stored(moto.url, bucket, "chief0")
    assert exited is not None and exited["exit"]["code"] == 0
    doc = wait_report(
        moto.url, bucket, "worker0", "a heartbeat after the chief's exit",
        lambda d: d["time"] > exited["time"] + 2 and d["state"] == "SERVE",
    )  # fmt: skip
    assert worker.proc is not None and worker.proc.poll() is None and not worker_record.exists()
    assert etcd.get(records.job_done_key(records.cluster_path(stack.cluster)))[0] is None
    assert doc["exit"] is None
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(20) == 0


def test_an_output_dir_that_cannot_be_made_is_one_line_and_nothing_claimed(
    stack, etcd, clean_cluster, agents, tmp_path
):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    chief = launch(
        agents, tmp_path, stack, "chief", 0, "127.0.43.9", {"chief": 1}, server=True,
        output_dir=blocker / "out",
    )  # fmt: skip
    assert chief.wait_exit(30) == 2
    last = chief.log().strip().splitlines()[-1]
    assert last.startswith("Error: output_dir: cannot create ") and "Traceback" not in chief.log()
    assert list(etcd.get_prefix(clean_cluster)) == []


# -- the built-in training, end to end ---------------------------------------------------


@pytest.mark.tf
def test_the_chiefs_training_reaches_its_report_and_its_checkpoint_the_bucket(
    stack, clean_cluster, agents, moto, bucket, tmp_path
):
    """1 chief, 1 ps, 1 worker with real TensorFlow: the loss lines reach the
    chief's report (what ``logs chief 0`` shows), and the checkpoint fetched
    from the bucket loads in TensorFlow."""
    roles = {"chief": 1, "ps": 1, "worker": 1}
    keys = bucket_keys(
        moto.url, bucket, roles, output_post=output_post_config(s3_client(moto.url), bucket)
    )
    base = free_port_block(3)
    chief = None
    for n, (role, index) in enumerate([("chief", 0), ("ps", 0), ("worker", 0)]):
        agent = launch(
            agents, tmp_path, stack, role, index, f"127.0.44.{n + 1}", roles, server=True,
            raw=keys, tf_port=base, tf_config_addresses="ips", barrier_timeout=120,
            output_dir=tmp_path / f"{role}-output",
            program=(sys.executable, "-m", "tfcluster.discovery.train", "--steps", "100",
                     "--log-every", "20") if role == "chief" else None,
        )  # fmt: skip
        chief = chief or agent
    assert chief is not None
    assert chief.wait_exit(240) == 0, chief.log()
    doc = stored(moto.url, bucket, "chief0")
    assert doc is not None
    loss_lines = [line for line in doc["log"] if line.startswith("step ")]
    assert [line.split()[1] for line in loss_lines] == ["1", "20", "40", "60", "80", "100"]

    fetched = tmp_path / "fetched"
    for key, body in objects(moto.url, bucket).items():
        if key.startswith("output/"):
            path = fetched / key[len("output/") :]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
    metrics = json.loads((fetched / "metrics.json").read_text())
    probe = (
        "import json, sys, tensorflow as tf\n"
        "w, b = tf.Variable(0.0), tf.Variable(0.0)\n"
        "tf.train.Checkpoint(weight=w, bias=b).restore(\n"
        "    tf.train.latest_checkpoint(sys.argv[1])).assert_consumed()\n"
        "print(json.dumps([float(w.numpy()), float(b.numpy())]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(fetched / "checkpoint")],
        capture_output=True, text=True, timeout=120, check=True, env=child_environment(),
    )  # fmt: skip
    weight, bias = json.loads(result.stdout.strip().splitlines()[-1])
    assert weight == pytest.approx(metrics["weight"]) and bias == pytest.approx(metrics["bias"])
    assert json.loads(objects(moto.url, bucket)[MARKER_KEY])["exit_code"] == 0
    for agent in agents[1:]:
        agent.signal(signal.SIGTERM)
        assert agent.wait_exit(30) == 0, agent.log()


# -- traffic --------------------------------------------------------------------------------


class MeteredMoto(ControlledMoto):
    """Also records the size of each POST's body (the report and its signed fields)."""

    def __init__(self) -> None:
        super().__init__()
        self.posted: list[int] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD") == "POST" and "multipart" in environ.get(
            "CONTENT_TYPE", ""
        ):
            self.posted.append(int(environ.get("CONTENT_LENGTH") or 0))
        return super().__call__(environ, start_response)


REQUEST_HEADERS = 260
"""Bytes of the request line and headers urllib sends (method, host, type, length, agent)."""
RESPONSE = 350
"""Bytes of S3's 204 answer (status line, request ids, ETag, Location, Date, Server)."""


@pytest.mark.tf
def test_report_traffic_of_a_real_agent(stack, clean_cluster, agents, tmp_path):
    """The figures for the note: a ps and a worker agent with their TF servers,
    reporting at the shortest heartbeat (1 s) to get many samples quickly;
    the hourly figure is for the default 15 s: the start's writes plus 240
    heartbeats of the steady size."""
    roles = {"ps": 1, "worker": 1}
    server = MeteredMoto()
    server.start()
    try:
        s3_client(server.url).create_bucket(Bucket="tfc-metered")
        keys = bucket_keys(server.url, "tfc-metered", roles)
        base = free_port_block(2)
        for role, ip in (("ps", "127.0.45.1"), ("worker", "127.0.45.2")):
            launch(agents, tmp_path, stack, role, 0, ip, roles, server=True, raw=keys,
                   tf_port=base, tf_config_addresses="ips", barrier_timeout=120)  # fmt: skip
        docs = {}
        for label in ("ps0", "worker0"):
            docs[label] = wait_report(
                server.url, "tfc-metered", label, "SERVE with its server up",
                lambda d: d["state"] == "SERVE" and (d["tensorflow"] or {}).get("running"),
                timeout=120,
            )  # fmt: skip
        start_writes = max(doc["seq"] for doc in docs.values())
        before = len(server.posted)
        t0 = time.monotonic()
        wait_for(
            lambda: len(server.posted) >= before + 20 or None,
            what="20 more reports",
            timeout=60,
        )
        elapsed = time.monotonic() - t0
        steady = server.posted[before:]
        rate = len(steady) / elapsed / 2  # two agents
        size = sum(steady) / len(steady) + REQUEST_HEADERS
        per_hour = start_writes + 3600 / 15
        kib = per_hour * (size + RESPONSE) / 1024
        print(
            f"\nreal agent (TF server up, log tail of {len(docs['ps0']['log'])} lines): "
            f"{start_writes} writes to SERVE; steady {rate:.2f} writes/s at heartbeat 1 s; "
            f"request {size:.0f} B; at 15 s: {per_hour:.0f} POSTs/h, {kib:.0f} KiB/h up+down"
        )
        assert 0.5 <= rate <= 1.2  # the heartbeat, never more than once a second
        assert max(steady) < 16 * 1024 + 4096  # the policy's 16 KiB and the signed fields
        for agent in agents:
            agent.signal(signal.SIGTERM)
            assert agent.wait_exit(30) == 0, agent.log()
    finally:
        server.stop()
