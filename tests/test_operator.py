"""The operator's view of a running cluster, against a moto server: `up` waits on
the agents' reports, `status`, `logs`, `fetch`, `down`'s output guard, `ssh`.

`tfcluster` runs as its own process (``--endpoint-url``) like in
test_lifecycle. No instance boots in moto, so the agents' side is played by
the real report writer (`discovery.report.Reporter`), configured from the
agent config that `up` rendered into each instance's user-data: the POST
policy each agent writes with is the one `up` signed for that launch. The
chief's outputs go up through `post_object` with the output policy `up`
signed. moto does not enforce POST policies, so the policies themselves are
read and checked (`observe.policy.policy_terms`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from click.testing import CliRunner
from moto.ec2.models.amis import AMIS

from controlled_moto import ControlledMoto, fake_aws_env, s3_client, use_fake_aws
from harness import AgentProcess, make_agent
from tfcluster.cloudinit import cli
from tfcluster.cloudinit.localcloud.parts import split_user_data
from tfcluster.cloudinit.observe import outputs, policy, view, wait
from tfcluster.cloudinit.observe.status import StatusRow
from tfcluster.discovery.agent_config import AgentConfig, dump_agent_config, parse_agent_config
from tfcluster.discovery.records import Member
from tfcluster.discovery.report import PostTarget, Reporter, post_object, reporter_for
from tfcluster.discovery.waiting import wait_for

REGION = "us-east-1"
AMI = str(AMIS[0]["ami_id"])
TFCLUSTER = str(Path(sys.executable).parent / "tfcluster")
EXIT_TIMEOUT = 180.0
MEMBERS = [Member("chief", 0), Member("ps", 0), Member("worker", 0), Member("worker", 1)]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TFCLUSTER_"))},
        **fake_aws_env(tmp_path, REGION),
    }


def write_config(tmp_path: Path, cluster: str = "demo", **extra: Any) -> Path:
    """1 chief, 1 ps, 2 workers; etcd's binary overridden, CoreDNS staged: the cluster gets
    its bucket (22 MB to moto once per test)."""
    config = {
        "cluster": cluster,
        "region": REGION,
        "ami": AMI,
        "ps": 1,
        "workers": 2,
        "artifacts": {"etcd": {"sha256": "b" * 64}},
        "program": ["python3", "train.py"],
        "url_expiry": "2h",
        **extra,
    }
    path = tmp_path / f"{cluster}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [TFCLUSTER, *args], env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"tfcluster did not exit in {EXIT_TIMEOUT} s:\n{err}") from None
    assert "Traceback" not in out + err, err
    return proc.returncode, out, err


def tfcluster(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    return finish(start(env, *args))


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error: ")]


def ec2(server: ControlledMoto) -> Any:
    return boto3.client(
        "ec2", endpoint_url=server.url, region_name=REGION,
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip


def instances(server: ControlledMoto, cluster: str = "demo") -> dict[str, dict[str, Any]]:
    """label -> live instance of the cluster's TensorFlow tasks."""
    found = {}
    pages = (
        ec2(server)
        .get_paginator("describe_instances")
        .paginate(
            Filters=[
                {"Name": "tag:tfcluster:cluster", "Values": [cluster]},
                {"Name": "instance-state-name", "Values": ["pending", "running"]},
            ]
        )
    )
    for page in pages:
        for reservation in page["Reservations"]:
            for instance in reservation["Instances"]:
                tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                if tags.get("tfcluster:role") in ("chief", "ps", "worker"):
                    index = tags.get("tfcluster:index", instance["AmiLaunchIndex"])
                    found[f"{tags['tfcluster:role']}{index}"] = instance
    return found


_AGENT_JSON = re.compile(
    r"write_file /etc/tfcluster/agent\.json 0644 <<'TFCLUSTER_EOF'\n(.*?)\nTFCLUSTER_EOF\n", re.S
)


def agent_config_of(server: ControlledMoto, instance_id: str) -> AgentConfig:
    """The agent config an instance would boot with, read out of its user-data."""
    answer = ec2(server).describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    raw = base64.b64decode(answer["UserData"]["Value"])
    script = next(p.text for p in split_user_data(raw) if p.content_type == "text/x-shellscript")
    found = _AGENT_JSON.search(script)
    assert found is not None, "no agent.json in the user-data"
    return parse_agent_config(json.loads(found.group(1)))


def launched(server: ControlledMoto, cluster: str = "demo") -> dict[str, AgentConfig]:
    """Wait until `up` launched every task; label -> its agent config."""
    by_label = wait_for(
        lambda: instances(server, cluster) if len(instances(server, cluster)) == 4 else None,
        what="up to launch 4 task instances",
        timeout=120,
        interval=0.2,
    )
    return {label: agent_config_of(server, i["InstanceId"]) for label, i in by_label.items()}


def agent(configs: dict[str, AgentConfig], member: Member, server: ControlledMoto) -> Reporter:
    """The member's report writer, as its agent would make it from its config."""
    reporter = reporter_for(configs[member.label], member, heartbeat=1.0)
    instance = instances(server)[member.label]
    reporter.identity(
        instance["InstanceId"], instance["PrivateIpAddress"], f"{member.label}.tensorflow.local"
    )
    return reporter


def signed_at(fields: dict[str, str]) -> datetime:
    return datetime.strptime(fields["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)


def serve(reporter: Reporter, member: Member) -> None:
    for state in ("IDENTIFY", "CLAIM", "BARRIER", "CONFIGURE", "SERVE"):
        reporter.state(state)
    reporter.tensorflow(program=member.role == "chief", running=True, pid=100)


# -- up waits -----------------------------------------------------------------------------


def test_up_signs_the_posts_into_each_launch_and_waits_until_every_agent_serves(
    server, env, tmp_path
):
    proc = start(env, "up", "--config", str(write_config(tmp_path)), "--endpoint-url",
                 server.url, "--timeout", "120")  # fmt: skip
    configs = launched(server)
    # What up signed: per role, its reports prefix; the chief also output/; url_expiry (2 h).
    for label, config in configs.items():
        role = label.rstrip("0123456789")
        assert config.report_post is not None and config.report_post.url.startswith(server.url)
        fields = config.report_post.fields_for(Member(role, 0))
        assert fields is not None
        terms = policy.policy_terms(fields)
        assert terms.key_prefix == f"reports/{role}" and terms.size_range == policy.REPORT_SIZE
        assert config.on_chief_exit == "keep" and config.output_interval == 900
        assert abs((terms.expiration - signed_at(fields)).total_seconds() - 2 * 3600) <= 1
        if role == "chief":
            assert config.output_post is not None
            form = config.output_post.fields_for(Member("chief", 0)) or {}
            out = policy.policy_terms(form)
            assert out.key_prefix == "output/" and out.size_range == policy.OUTPUT_SIZE
            assert abs((out.expiration - signed_at(form)).total_seconds() - 2 * 3600) <= 1
        else:
            assert config.output_post is None
    reporters = [agent(configs, m, server) for m in MEMBERS]
    try:
        for reporter in reporters:
            reporter.start()
            reporter.state("CLAIM")
        assert proc.poll() is None, "up returned before any agent served"
        for reporter, member in zip(reporters, MEMBERS, strict=True):
            serve(reporter, member)
        code, out, err = finish(proc)
    finally:
        for reporter in reporters:
            reporter.stop(timeout=5)
    assert code == 0, err
    assert "TF serving 4/4" in err and "instances running 4/4" in err
    table = out.split("NAME ", 1)[1].splitlines()[1:]
    names = [line.split()[0] for line in table]
    assert names == ["chief0", "ps0", "worker0", "worker1"]
    assert all(line.split()[4] == "SERVE" for line in table)


def test_up_that_times_out_names_the_stuck_instance_and_its_last_log_lines(server, env, tmp_path):
    proc = start(env, "up", "--config", str(write_config(tmp_path)), "--endpoint-url",
                 server.url, "--timeout", "15")  # fmt: skip
    configs = launched(server)
    reporters = {m.label: agent(configs, m, server) for m in MEMBERS}
    try:
        for member in MEMBERS:
            reporter = reporters[member.label]
            reporter.start()
            if member.label == "worker1":  # its peer never starts: stuck at the barrier
                for state in ("IDENTIFY", "CLAIM", "BARRIER"):
                    reporter.state(state, "waiting for ps1")
                reporter.barrier(3, 4, ["ps1"])
                for n in range(15):
                    reporter.log_line(f"barrier: 3/4 resolve, missing ps1 (try {n})")
            else:
                serve(reporter, member)
        began = time.monotonic()
        code, _out, err = finish(proc)
        seconds = time.monotonic() - began
    finally:
        for reporter in reporters.values():
            reporter.stop(timeout=5)
    assert code == 1, err
    assert seconds < 15 + 20
    (line,) = errors(err)
    worker1 = instances(server)["worker1"]["InstanceId"]
    assert "not ready after 15 s" in line and f"worker1 ({worker1}) is BARRIER" in line
    assert "barrier: 3/4 resolve, missing ps1 (try 14)" in err
    assert "(try 4)" not in err  # the last 10 lines only
    assert "tfcluster status --cluster demo" in err and "tfcluster down --cluster demo" in err
    assert len(instances(server)) == 4  # not torn down


def test_up_names_the_peer_that_never_started_and_the_agents_stuck_waiting_for_it(
    server, env, tmp_path, stack, clean_cluster
):
    """Real agents this time (each with its IMDS emulator, against the local etcd
    and CoreDNS), writing their reports with the POST `up` signed for their
    launch. worker1's instance runs but its agent never starts, so the other
    three cannot pass their barrier: `up` exits 1 within its timeout, names
    worker1 and its instance, and says who waits for it, with the last log
    lines of one of them."""
    proc = start(env, "up", "--config", str(write_config(tmp_path)), "--endpoint-url",
                 server.url, "--timeout", "25")  # fmt: skip
    configs = launched(server)
    launched_ids = {label: i["InstanceId"] for label, i in instances(server).items()}
    agents: list[AgentProcess] = []
    try:
        for n, member in enumerate(MEMBERS):
            if member.label == "worker1":
                continue  # its instance runs; its agent never starts
            signed = dump_agent_config(configs[member.label])["report_post"]
            agent = make_agent(
                tmp_path, stack, role=member.role, launch_index=member.index,
                ip=f"127.0.39.{n + 1}", roles={"chief": 1, "ps": 1, "worker": 2},
                instance_id=launched_ids[member.label], barrier_timeout=120,
                raw={"report_post": signed, "report_heartbeat": 2},
            )  # fmt: skip
            agents.append(agent.start())
        began = time.monotonic()
        code, _out, err = finish(proc)
        seconds = time.monotonic() - began
        logs = {agent.name: agent.log() for agent in agents}
    finally:
        for agent in agents:
            agent.stop()
    assert code == 1, err
    assert seconds < 25 + 20
    (line,) = errors(err)
    assert "not ready after 25 s" in line
    assert f"worker1 ({launched_ids['worker1']}) is NO REPORT" in line
    assert "worker1 reported no log lines" not in err  # the line above says so already
    assert "waiting for worker1 at their barrier: chief0, ps0, worker0" in err, (err, logs)
    shown = err.split("last log lines of worker0:\n", 1)[1].splitlines()
    assert any("waiting for worker1" in entry for entry in shown), (err, logs)
    assert "tfcluster down --cluster demo" in err
    assert len(instances(server)) == 4  # not torn down


def test_an_agent_that_fails_ends_the_wait_at_once(server, env, tmp_path):
    proc = start(env, "up", "--config", str(write_config(tmp_path)), "--endpoint-url",
                 server.url, "--timeout", "120")  # fmt: skip
    configs = launched(server)
    reporter = agent(configs, Member("ps", 0), server)
    reporter.start()
    try:
        reporter.state("CLAIM")
        reporter.log_line("ps0 is held by i-0fffffffffffffff0")
        reporter.state("STOP", "the name is held by another live instance")
        reporter.finished(4, "the name is held by another live instance")
        code, _out, err = finish(proc)
    finally:
        reporter.stop(timeout=5)
    assert code == 1
    (line,) = errors(err)
    assert "ps0 failed" in line and "agent exit code 4" in line
    assert "ps0 is held by i-0fffffffffffffff0" in err


# -- status, logs ---------------------------------------------------------------------------


def test_status_json_lists_every_member_with_its_report(server, env, tmp_path):
    code, _out, err = tfcluster(env, "up", "--config", str(write_config(tmp_path)),
                                "--endpoint-url", server.url, "--no-wait")  # fmt: skip
    assert code == 0, err
    configs = {
        label: agent_config_of(server, i["InstanceId"]) for label, i in instances(server).items()
    }
    reporters = [agent(configs, m, server) for m in MEMBERS[:3]]  # worker1 never reports
    for reporter, member in zip(reporters, MEMBERS[:3], strict=True):
        serve(reporter, member)
        reporter.start()
        assert reporter.stop(timeout=10)
    code, out, err = tfcluster(env, "status", "--cluster", "demo", "--endpoint-url", server.url,
                               "--json")  # fmt: skip
    assert code == 0, err
    document = json.loads(out)
    members = {m["name"]: m for m in document["members"]}
    assert set(members) == {"control0", "chief0", "ps0", "worker0", "worker1"}
    live = instances(server)
    for label in ("chief0", "ps0", "worker0", "worker1"):
        assert members[label]["instance_id"] == live[label]["InstanceId"]
        assert members[label]["ec2_state"] == "running"
        assert members[label]["dns_name"] == f"{label}.tensorflow.local"
    assert members["chief0"]["agent"]["state"] == "SERVE"
    assert members["chief0"]["agent"]["program"] == "running"
    assert members["ps0"]["agent"]["program"] == "serving"
    assert members["ps0"]["agent"]["age"] < 60 and not members["ps0"]["agent"]["stale"]
    assert members["worker1"]["agent"]["state"] == "NO REPORT"
    assert members["control0"]["agent"] is None
    code, out, err = tfcluster(env, "status", "--cluster", "demo", "--endpoint-url", server.url)
    assert code == 0, err
    rows = {line.split()[1] + line.split()[2]: line for line in out.splitlines()[1:]}
    assert " SERVE " in rows["chief0"] and " NO REPORT " in rows["worker1"]


def test_logs_follow_new_lines_until_the_program_ends(server, env, tmp_path):
    code, _out, err = tfcluster(env, "up", "--config", str(write_config(tmp_path)),
                                "--endpoint-url", server.url, "--no-wait")  # fmt: skip
    assert code == 0, err
    chief = Member("chief", 0)
    configs = {
        label: agent_config_of(server, i["InstanceId"]) for label, i in instances(server).items()
    }
    reporter = agent(configs, chief, server)
    serve(reporter, chief)
    reporter.log_line("step 0 loss 2.30")
    reporter.start()
    try:
        wait_for(lambda: reporter.writes_ok or None, what="chief0's first report", timeout=20)
        follow = start(env, "logs", "chief", "0", "-f", "--cluster", "demo", "--endpoint-url",
                       server.url, "--timeout", "60")  # fmt: skip
        for step in range(1, 6):
            written = reporter.writes_ok
            reporter.log_line(f"step {step * 10} loss {2.3 / (step + 1):.2f}")
            wait_for(lambda w=written: reporter.writes_ok > w or None, what="a report", timeout=20)
        # logs -f has read the report with step 50 (it is the only reader) ...
        polls = server.calls["GetObject"]
        wait_for(lambda: server.calls["GetObject"] > polls + 1 or None, what="a poll", timeout=20)
        # ... then 120 lines at once: more than a report carries (50).
        written = reporter.writes_ok
        for n in range(120):
            reporter.log_line(f"burst {n}")
        reporter.tensorflow(program=True, running=False, exit_code=0)
        wait_for(lambda: reporter.writes_ok > written or None, what="the last report", timeout=20)
        code, out, err = finish(follow)
    finally:
        reporter.stop(timeout=5)
    assert code == 0, err
    lines = out.splitlines()
    steps = [line for line in lines if line.startswith("step")]
    assert steps[0] == "step 0 loss 2.30" and steps[-1].startswith("step 50 ")
    assert len(steps) == 6 and len(set(steps)) == 6  # each line once
    assert "burst 119" in lines
    assert any(re.fullmatch(r"\.\.\. \d+ line\(s\) not reported \.\.\.", line) for line in lines)
    assert "program exited 0" in err

    once = tfcluster(env, "logs", "chief", "0", "--cluster", "demo", "--endpoint-url", server.url)
    assert once[0] == 0 and "burst 119" in once[1]
    missing = tfcluster(env, "logs", "worker", "1", "--cluster", "demo", "--endpoint-url",
                        server.url)  # fmt: skip
    assert missing[0] == 1 and errors(missing[2]) == [
        f"Error: worker1 has written no report to bucket {bucket_of(server)} yet"
    ]


def test_ctrl_c_ends_logs_follow_cleanly(server, env, tmp_path):
    code, _out, err = tfcluster(env, "up", "--config", str(write_config(tmp_path)),
                                "--endpoint-url", server.url, "--no-wait")  # fmt: skip
    assert code == 0, err
    follow = start(env, "logs", "worker", "0", "-f", "--cluster", "demo", "--endpoint-url",
                   server.url)  # fmt: skip
    wait_for(
        lambda: server.calls["GetObject"] >= 2 or None, what="logs -f to poll twice", timeout=30
    )
    follow.send_signal(signal.SIGINT)
    code, out, err = finish(follow)
    assert code == 130 and out == "" and err == ""


def bucket_of(server: ControlledMoto, cluster: str = "demo") -> str:
    s3 = s3_client(server.url)
    tagged = []
    for entry in s3.list_buckets()["Buckets"]:
        tags = s3.get_bucket_tagging(Bucket=entry["Name"]).get("TagSet", [])
        if {"Key": "tfcluster:cluster", "Value": cluster} in tags:
            tagged.append(entry["Name"])
    (bucket,) = tagged
    return bucket


# -- outputs: fetch, down's guard, keep-output, purge ------------------------------------------


def upload_outputs(
    server: ControlledMoto, files: dict[str, bytes], marker: bool = True, **extra: Any
) -> None:
    """What the chief's agent does: POST each file under output/ with the policy `up`
    signed for it, then the completion marker listing every file with its SHA-256
    (the marker's format: discovery/output.py)."""
    (chief,) = [i for label, i in instances(server).items() if label == "chief0"]
    config = agent_config_of(server, chief["InstanceId"])
    assert config.output_post is not None
    fields = config.output_post.fields_for(Member("chief", 0)) or {}
    target = PostTarget(config.output_post.url, fields)
    for relpath, body in files.items():
        post_object(target, f"output/{relpath}", body, timeout=10)
    if marker:
        listed = [
            {"path": p, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
            for p, b in sorted(files.items())
        ]
        document = json.dumps(
            {"version": 1, "complete": True, "exit_code": 0, "files": listed, **extra}
        ).encode()
        post_object(target, outputs.COMPLETE_MARKER, document, timeout=10)


def test_fetch_brings_the_outputs_back_and_down_guards_keeps_and_purges(server, env, tmp_path):
    code, _out, err = tfcluster(env, "up", "--config", str(write_config(tmp_path)),
                                "--endpoint-url", server.url, "--no-wait")  # fmt: skip
    assert code == 0, err
    bucket = bucket_of(server)
    files = {"metrics.json": b'{"loss": 0.12}\n', "ckpt/ckpt-1.index": os.urandom(4096)}
    # A checkpoint uploaded while the program ran, deleted by it later: not in the marker.
    upload_outputs(server, {"ckpt/ckpt-0.index": b"old"}, marker=False)
    upload_outputs(server, files)
    args = ("--cluster", "demo", "--endpoint-url", server.url)

    refused = tfcluster(env, "down", *args)
    assert refused[0] == 1 and errors(refused[2]) == [
        f"Error: bucket {bucket} holds 3 output file(s) not fetched: run 'tfcluster fetch "
        "--cluster demo --to DIR' first, or down --keep-output to keep only the bucket, "
        "or --yes to delete them"
    ]
    assert len(instances(server)) == 4  # nothing changed

    code, out, err = tfcluster(env, "fetch", *args, "--to", str(tmp_path / "out"))
    assert code == 0, err
    for relpath, body in files.items():
        assert (tmp_path / "out" / relpath).read_bytes() == body
    assert not (tmp_path / "out" / ".tfcluster-complete").exists()
    assert not (tmp_path / "out" / "ckpt" / "ckpt-0.index").exists()
    assert "left 1 object(s) in the bucket that the completion marker does not list" in err
    assert out.splitlines()[-1].endswith("complete (2 checked against the marker's SHA-256)")

    # A newer checkpoint after the fetch is unfetched again (the record holds ETags).
    upload_outputs(server, {"ckpt/ckpt-1.index": os.urandom(4096)}, marker=False)
    assert tfcluster(env, "down", *args)[0] == 1

    code, out, err = tfcluster(env, "down", *args, "--keep-output", "--yes")
    assert code == 0, err
    assert instances(server) == {} and f"kept bucket {bucket}" in out
    s3 = s3_client(server.url)
    assert outputs.kept_since(s3, bucket) is not None
    listing = tfcluster(env, "ls", "--endpoint-url", server.url)
    assert listing[0] == 0 and bucket in listing[1]

    again = tfcluster(env, "down", *args, "--yes")  # a kept bucket stays
    assert again[0] == 0 and s3.head_bucket(Bucket=bucket)
    code, out, err = tfcluster(env, "down", *args, "--purge", "--yes")
    assert code == 0, err
    assert f"deleted bucket {bucket}" in err
    assert "no clusters" in tfcluster(env, "ls", "--endpoint-url", server.url)[1]


def test_fetch_refuses_a_file_whose_checksum_differs_and_says_when_partial(server, env, tmp_path):
    code, _out, err = tfcluster(env, "up", "--config", str(write_config(tmp_path)),
                                "--endpoint-url", server.url, "--no-wait")  # fmt: skip
    assert code == 0, err
    args = ("--cluster", "demo", "--endpoint-url", server.url)
    nothing = tfcluster(env, "fetch", *args, "--to", str(tmp_path / "none"))
    assert nothing[0] == 1 and errors(nothing[2])[0].endswith("holds no outputs yet")
    upload_outputs(server, {"model.bin": b"x" * 100}, marker=False)
    code, out, err = tfcluster(env, "fetch", *args, "--to", str(tmp_path / "partial"))
    assert code == 0 and "partial: no completion marker yet" in out
    skipped = [{"path": "huge.bin", "size": 6 * 1024**3, "reason": "larger than the policy"}]
    upload_outputs(server, {"model.bin": b"w" * 100}, skipped=skipped)
    code, out, err = tfcluster(env, "fetch", *args, "--to", str(tmp_path / "skipped"))
    assert code == 0, err
    assert out.splitlines()[-1].endswith(
        "partial: 0 file(s) the completion marker lists are not in the bucket and 1 could not "
        "be uploaded (huge.bin)"
    )
    upload_outputs(server, {"model.bin": b"y" * 100})  # marker for y...
    upload_outputs(server, {"model.bin": b"z" * 100}, marker=False)  # ...but z lands after
    code, out, err = tfcluster(env, "fetch", *args, "--to", str(tmp_path / "bad"))
    assert code == 1 and "output/model.bin: SHA-256" in errors(err)[0]
    assert not (tmp_path / "bad" / "model.bin").exists()
    assert tfcluster(env, "down", *args, "--yes")[0] == 0


# -- ssh --------------------------------------------------------------------------------------


def test_ssh_builds_the_command_line_or_says_what_is_missing(
    server, tmp_path, monkeypatch: pytest.MonkeyPatch
):
    """The argv handed to exec is checked; no ssh session is opened (no sshd here)."""
    use_fake_aws(monkeypatch, tmp_path, REGION)
    ec2(server).create_key_pair(KeyName="ana")
    runner = CliRunner()
    bare = write_config(tmp_path, "bare", artifacts={"etcd": {"sha256": "b" * 64}})
    keyed = write_config(tmp_path, "keyed", key_name="ana", ssh_cidr="203.0.113.7/32")
    for config in (bare, keyed):
        up = runner.invoke(cli.main, ["up", "--config", str(config), "--endpoint-url",
                                      server.url, "--no-wait"])  # fmt: skip
        assert up.exit_code == 0, up.output
    execs: list[list[str]] = []
    monkeypatch.setattr(os, "execvp", lambda file, argv: execs.append([file, *argv]))
    missing = runner.invoke(
        cli.main, ["ssh", "worker", "1", "--cluster", "bare", "--endpoint-url", server.url]
    )
    assert missing.exit_code == 2 and execs == []
    assert missing.stderr.splitlines() == [
        "Error: worker1 cannot be reached by ssh: set key_name (the EC2 key pair; set at "
        "launch, so the instance must be new) and ssh_cidr (the addresses allowed to ssh in; "
        "'up' adds the rule)"
    ]
    worker1 = instances(server, "keyed")["worker1"]
    address = worker1.get("PublicIpAddress") or worker1["PrivateIpAddress"]
    ok = runner.invoke(cli.main, ["ssh", "worker", "1", "--cluster", "keyed", "--endpoint-url",
                                  server.url, "-i", "~/.ssh/ana.pem", "--", "uptime"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert execs == [["ssh", "ssh", "-i", "~/.ssh/ana.pem", f"ubuntu@{address}", "uptime"]]
    none = runner.invoke(cli.main, ["ssh", "ps", "3", "--cluster", "keyed", "--endpoint-url",
                                    server.url])  # fmt: skip
    assert none.exit_code == 1 and "no running instance for ps3" in none.stderr


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("logs", "boss", "0", "--cluster", "demo"),
        ("logs", "worker", "-1", "--cluster", "demo"),
        ("logs", "worker", "0", "--cluster", "demo*"),
        ("fetch", "--cluster", "demo"),
        ("down", "--cluster", "demo", "--keep-output", "--purge"),
        ("ssh", "chief", "x", "--cluster", "demo"),
        ("up", "--config", "c.yaml", "--timeout", "0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(env, args):
    code, out, err = tfcluster(env, *args)
    assert code == 2, err
    assert len(errors(err)) == 1 and out == ""


def test_bad_config_values_are_one_line(env, tmp_path, server):
    for key, value, message in (
        ("on_chief_exit", "stop", "on_chief_exit: must be one of keep, down, got 'stop'"),
        ("output_interval", "1m", "output_interval: must be between 10m and 30d, got '1m'"),
        ("output_interval", "2d", "output_interval: must be at most 1d, got '2d'"),
    ):
        config = str(write_config(tmp_path))
        setting = f"{key}={value}"
        code, _out, err = tfcluster(
            env, "up", "--config", config, "--set", setting, "--endpoint-url", server.url
        )
        assert code == 2 and errors(err) == [f"Error: {message}"]
    assert instances(server) == {}


# -- the loops themselves, on a fake clock ----------------------------------------------------


def row(name: str, state: str, log: tuple[str, ...] = (), total: int = 0, **kw: Any) -> StatusRow:
    values: dict[str, Any] = dict(
        instance_id=None, address=None, dns_name=None, age=1.0, stale=False, program="-",
        exit_code=None, detail="",
    )  # fmt: skip
    values.update(kw)
    return StatusRow(name=name, state=state, log=log, log_total=total, **values)


def test_new_lines_counts_what_fell_out_of_the_tail_and_a_restarted_agent():
    first, seen = wait.new_lines(row("w0", "SERVE", ("c", "d"), total=4), None)
    assert first == ["... 2 line(s) not reported ...", "c", "d"] and seen == 4
    assert wait.new_lines(row("w0", "SERVE", ("c", "d"), total=4), 4) == ([], 4)
    assert wait.new_lines(row("w0", "SERVE", ("d", "e"), total=5), 4) == (["e"], 5)
    lost, _ = wait.new_lines(row("w0", "SERVE", ("x", "y"), total=9), 5)
    assert lost == ["... 2 line(s) not reported ...", "x", "y"]
    again, seen = wait.new_lines(row("w0", "CLAIM", ("new",), total=1), 9)
    assert again == ["(a new agent: log starts again)", "new"] and seen == 1


def test_wait_ready_is_bounded_and_names_the_agent_furthest_behind():
    clock = [0.0]
    rows = (row("chief0", "SERVE", program="running"), row("ps0", "CLAIM"),
            row("worker0", "NO REPORT", age=None))  # fmt: skip
    expected = ["chief0", "ps0", "worker0"]
    snap = view.snapshot([], list(rows), expected)
    seen: list[str] = []
    with pytest.raises(wait.NotReady) as failure:
        wait.wait_ready(
            lambda: snap, timeout=10, interval=2, on_snapshot=lambda s: seen.append(s.line()),
            now=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + s),
        )  # fmt: skip
    assert failure.value.row is not None and failure.value.row.name == "worker0"
    assert len(seen) == 6 and clock[0] == 10
    assert seen[0] == (
        "instances running 0/3, names claimed 1/3, barrier passed 1/3, TF serving 1/3"
    )


def test_a_job_that_ended_during_the_wait_is_ready_and_says_so():
    """A short job can end before the wait's last reading: that reading is ready,
    and it says that the chief's program has ended (``up --local`` then skips its
    DNS table, whose instances may be powering off)."""
    expected = ["chief0", "ps0"]
    running = view.snapshot([], [row("chief0", "SERVE", program="running"),
                                 row("ps0", "SERVE", program="serving")], expected)  # fmt: skip
    assert running.progress.ready and running.program_ended() is None
    rows = [row("chief0", "STOP", program="exited 0"), row("ps0", "STOP", program="exited 0")]
    ended = wait.wait_ready(lambda: view.snapshot([], rows, expected), timeout=1)
    assert ended.program_ended() == "exited 0"
