"""Lifecycle safety against a real moto server, with `tfcluster` as its own process.

What is shown here, each with the API calls and seconds it took (``-s``
prints them):
* a cluster is selected by the exact value of its tag: ``demo*`` is refused,
  ``demo`` never touches ``demo-prod``;
* two ``up`` of one cluster at the same moment give one set of instances;
* SIGINT or SIGTERM at each phase of ``up`` leaves nothing of that run;
* a second interrupt stops the rollback and prints what is left and the
  ``down`` that removes it, never a traceback;
* ``max_lifetime`` reaches the launch request and the instances' tags;
* ``down`` twice is a no-op the second time; a ``down`` that cannot finish
  lists what is left, exits 1, and a second ``down`` finishes;
* bad input is one line and exit 2, with nothing created.

Each process gets fake credentials and talks to the server on 127.0.0.1
through ``--endpoint-url``; moto does what EC2 would, and ``controlled_moto``
holds or fails chosen calls to reach a phase or a failure moto cannot make.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from moto.ec2.models.amis import AMIS

from controlled_moto import ControlledMoto, fake_aws_env, tag_value, without_aws
from tfcluster.cloudinit.cloud.provider import TAG_CLUSTER, TAG_EXPIRES, TAG_ROLE

REGION = "us-east-1"
AMI = str(AMIS[0]["ami_id"])
TFCLUSTER = str(Path(sys.executable).parent / "tfcluster")
EXIT_TIMEOUT = 180.0


@dataclass
class Run:
    """A finished `tfcluster` process."""

    code: int
    stdout: str
    stderr: str
    seconds: float

    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("Error: ")]

    def one_line_error(self, code: int) -> str:
        assert self.code == code, f"exit {self.code}, wanted {code}:\n{self.stderr}"
        assert "Traceback" not in self.stderr + self.stdout, self.stderr
        errors = self.errors()
        assert len(errors) == 1, self.stderr
        return errors[0]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """Fake credentials; nothing read from this machine's AWS set-up."""
    return {**without_aws(os.environ), **fake_aws_env(tmp_path, REGION)}


def write_config(tmp_path: Path, cluster: str = "demo", **extra: Any) -> Path:
    config = {
        "cluster": cluster,
        "region": REGION,
        "ami": AMI,
        "ps": 1,
        "workers": 2,
        "artifacts": {"coredns": {"sha256": "a" * 64}, "etcd": {"sha256": "b" * 64}},
        **extra,
    }
    path = tmp_path / f"{cluster}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], float]:
    if args[:1] == ("up",) and "--dry-run" not in args:
        args = (*args, "--no-wait")  # no agent runs in moto; the wait is test_operator.py's
    proc = subprocess.Popen(
        [TFCLUSTER, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, time.monotonic()


def finish(started: tuple[subprocess.Popen[str], float]) -> Run:
    proc, began = started
    try:
        stdout, stderr = proc.communicate(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"tfcluster did not exit in {EXIT_TIMEOUT} s:\n{stderr}") from None
    return Run(proc.returncode, stdout, stderr, time.monotonic() - began)


def tfcluster(env: dict[str, str], *args: str) -> Run:
    return finish(start(env, *args))


def ec2(server: ControlledMoto) -> Any:
    return boto3.client(
        "ec2",
        region_name=REGION,
        endpoint_url=server.url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


LIVE = ["pending", "running", "shutting-down", "stopping", "stopped"]


def all_instances(
    server: ControlledMoto, cluster: str | None = None, states: list[str] | None = None
) -> list[dict[str, Any]]:
    filters = [{"Name": "instance-state-name", "Values": states}] if states else []
    pages = ec2(server).get_paginator("describe_instances").paginate(Filters=filters)
    found = [i for page in pages for r in page["Reservations"] for i in r["Instances"]]
    return [i for i in found if cluster is None or tags(i).get(TAG_CLUSTER) == cluster]


def live_instances(server: ControlledMoto, cluster: str | None = None) -> list[dict[str, Any]]:
    return all_instances(server, cluster, LIVE)


def tags(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def leftovers(server: ControlledMoto, cluster: str = "demo") -> dict[str, list[str]]:
    """Every resource of ``cluster``: instances, security groups, its lock."""
    client = ec2(server)
    groups = client.describe_security_groups()["SecurityGroups"]
    pairs = client.describe_key_pairs()["KeyPairs"]
    return {
        "instances": [i["InstanceId"] for i in live_instances(server, cluster)],
        "groups": [g["GroupId"] for g in groups if tags(g).get(TAG_CLUSTER) == cluster],
        "locks": [p["KeyName"] for p in pairs if tags(p).get(TAG_CLUSTER) == cluster],
    }


NOTHING: dict[str, list[str]] = {"instances": [], "groups": [], "locks": []}


def role_is(role: str) -> Any:
    return lambda params: tag_value(params, TAG_ROLE) == role


def report(what: str, server: ControlledMoto, seconds: float) -> None:
    print(f"\n{what}: {sum(server.calls.values())} API calls {dict(server.calls)}, {seconds:.1f} s")


# -- exact names ---------------------------------------------------------------------


def test_a_wildcard_name_is_refused_and_demo_never_touches_demo_prod(
    server: ControlledMoto, env: dict[str, str], tmp_path: Path
) -> None:
    for cluster in ("demo", "demo-prod"):
        assert tfcluster(env, "up", "--config", str(write_config(tmp_path, cluster)),
                         "--endpoint-url", server.url).code == 0  # fmt: skip
    prod = sorted(i["InstanceId"] for i in live_instances(server, "demo-prod"))
    assert len(prod) == 5
    server.clear()

    for pattern in ("demo*", "demo?", "demo-*", "*"):
        run = tfcluster(env, "down", "--cluster", pattern, "--yes", "--endpoint-url", server.url)
        assert "cluster: must be a DNS label" in run.one_line_error(2)
        status = tfcluster(env, "status", "--cluster", pattern, "--endpoint-url", server.url)
        status.one_line_error(2)
    assert server.mutating_calls() == []

    status = tfcluster(env, "status", "--cluster", "demo", "--endpoint-url", server.url)
    assert status.code == 0, status.stderr
    assert not any(i in status.stdout for i in prod), status.stdout
    down = tfcluster(env, "down", "--cluster", "demo", "--yes", "--endpoint-url", server.url)
    assert down.code == 0, down.stderr
    report("down demo", server, down.seconds)
    assert leftovers(server, "demo") == NOTHING
    assert sorted(i["InstanceId"] for i in live_instances(server, "demo-prod")) == prod
    assert leftovers(server, "demo-prod")["groups"]


def test_the_provider_compares_tag_values_itself(server: ControlledMoto) -> None:
    """Resources tagged with a wildcard-looking value (not made by tfcluster) stay apart."""
    from tfcluster.cloudinit.cloud.ec2 import Ec2Provider

    client = ec2(server)
    for value in ("demo", "demo*", "demo-prod"):
        client.run_instances(
            ImageId=AMI, MinCount=1, MaxCount=1,
            TagSpecifications=[{"ResourceType": "instance",
                                "Tags": [{"Key": TAG_CLUSTER, "Value": value}]}],
        )  # fmt: skip
    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    )
    provider = Ec2Provider(REGION, endpoint_url=server.url, session=session)
    for value in ("demo", "demo*", "demo-prod"):
        found = provider.nodes(value)
        assert len(found) == 1, (value, found)
    assert provider.nodes("dem?") == []


# -- one up at a time ------------------------------------------------------------------


def test_a_second_up_while_one_runs_is_refused_and_names_the_holder(
    server: ControlledMoto, env: dict[str, str], tmp_path: Path
) -> None:
    config = str(write_config(tmp_path))
    hold = server.hold("CreateSecurityGroup", before=True)
    first = start(env, "up", "--config", config, "--endpoint-url", server.url)
    hold.wait_reached()
    try:
        second = tfcluster(env, "up", "--config", config, "--endpoint-url", server.url)
        line = second.one_line_error(1)
        assert "cluster demo is busy: up by" in line and f"pid {first[0].pid}" in line, line
        assert "tfcluster unlock --cluster demo" in line
        down = tfcluster(env, "down", "--cluster", "demo", "--yes", "--endpoint-url", server.url)
        assert "is busy" in down.one_line_error(1)
    finally:
        hold.release()
    done = finish(first)
    assert done.code == 0, done.stderr
    assert len(live_instances(server, "demo")) == 5
    assert leftovers(server)["locks"] == []


def test_two_ups_started_together_give_one_set_of_instances(
    server: ControlledMoto, env: dict[str, str], tmp_path: Path
) -> None:
    config = str(write_config(tmp_path))
    runs = [start(env, "up", "--config", config, "--endpoint-url", server.url) for _ in range(2)]
    results = [finish(run) for run in runs]
    report("two concurrent ups", server, max(r.seconds for r in results))
    assert server.calls["RunInstances"] == 4, server.calls  # control, chief, ps, worker
    assert len(live_instances(server, "demo")) == 5
    assert any(r.code == 0 for r in results), [r.stderr for r in results]
    for r in results:
        if r.code != 0:
            assert "is busy" in r.one_line_error(1)
    assert leftovers(server)["locks"] == []


def test_an_expired_lock_is_taken_over_and_unlock_clears_a_stale_one(
    server: ControlledMoto, env: dict[str, str], tmp_path: Path
) -> None:
    client = ec2(server)

    def leave_lock(expires: str) -> None:
        client.create_key_pair(
            KeyName="tfcluster-lock-demo",
            TagSpecifications=[{"ResourceType": "key-pair", "Tags": [
                {"Key": TAG_CLUSTER, "Value": "demo"},
                {"Key": "tfcluster:lock-holder", "Value": "up by ana@laptop pid 1"},
                {"Key": "tfcluster:lock-expires", "Value": expires},
            ]}],
        )  # fmt: skip

    leave_lock("2000-01-01T00:00:00+00:00")
    down = tfcluster(env, "down", "--cluster", "demo", "--yes", "--endpoint-url", server.url)
    assert down.code == 0, down.stderr
    assert leftovers(server) == NOTHING

    leave_lock("2999-01-01T00:00:00+00:00")
    listed = tfcluster(env, "ls", "--endpoint-url", server.url)
    assert "up by ana@laptop pid 1" in listed.stdout, listed.stdout
    refused = tfcluster(env, "up", "--config", str(write_config(tmp_path)),
                        "--endpoint-url", server.url)  # fmt: skip
    assert "up by ana@laptop pid 1" in refused.one_line_error(1)
    assert live_instances(server, "demo") == []
    unlock = tfcluster(env, "unlock", "--cluster", "demo", "--endpoint-url", server.url)
    assert unlock.code == 0 and "removed the lock" in unlock.stdout, unlock.stderr
    assert leftovers(server) == NOTHING


# -- interrupted up ----------------------------------------------------------------------

PHASES = {
    "after-security-group": ("AuthorizeSecurityGroupIngress", lambda _p: True),
    "after-control-node": ("RunInstances", role_is("control")),
    "during-role-launches": ("RunInstances", role_is("ps")),
}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("phase", list(PHASES))
def test_an_interrupted_up_leaves_nothing_of_its_run(
    server: ControlledMoto, env: dict[str, str], tmp_path: Path, phase: str, sig: int
) -> None:
    action, match = PHASES[phase]
    # The call is carried out, then its answer held: the interrupt arrives while
    # the client waits, as when a launch's answer is lost.
    hold = server.hold(action, match)
    run = start(env, "up", "--config", str(write_config(tmp_path)), "--endpoint-url", server.url)
    hold.wait_reached()
    run[0].send_signal(sig)
    hold.release()
    done = finish(run)
    report(f"up interrupted ({signal.Signals(sig).name}) {phase}", server, done.seconds)
    line = done.one_line_error(1)
    assert "up failed: interrupted; rolled back:" in line, line
    assert leftovers(server) == NOTHING


def test_a_second_interrupt_stops_the_rollback_and_says_what_is_left(
    server: ControlledMoto, env: dict[str, str], tmp_path: Path
) -> None:
    launch = server.hold("RunInstances", role_is("worker"))
    terminate = server.hold("TerminateInstances", before=True)
    run = start(env, "up", "--config", str(write_config(tmp_path)), "--endpoint-url", server.url)
    launch.wait_reached()
    run[0].send_signal(signal.SIGINT)
    launch.release()
    terminate.wait_reached()
    run[0].send_signal(signal.SIGINT)
    terminate.release()
    done = finish(run)
    line = done.one_line_error(1)
    assert "roll back interrupted; left: instance(s)" in line, line
    # The interrupted TerminateInstances had been sent: EC2 may act on it or not.
    assert "(termination asked for, maybe not done)" in line, line
    launched = [i["InstanceId"] for i in all_instances(server, "demo")]
    assert len(launched) == 5 and all(i in line for i in launched), (line, launched)
    left = leftovers(server)
    assert left["groups"] and all(g in line for g in left["groups"]), (line, left)
    assert "remove it with 'tfcluster down --cluster demo --yes'" in line
    down = tfcluster(env, "down", "--cluster", "demo", "--yes", "--endpoint-url", server.url)
    assert down.code == 0, down.stderr
    assert leftovers(server) == NOTHING


# -- cost guards -------------------------------------------------------------------------


def test_max_lifetime_reaches_the_launch_and_status_shows_the_time_left(
    server: ControlledMoto, env: dict[str, str], tmp_path: Path
) -> None:
    config = str(write_config(tmp_path, max_lifetime="12h"))
    run = tfcluster(env, "up", "--config", config, "--endpoint-url", server.url)
    assert run.code == 0, run.stderr
    client = ec2(server)
    instances = live_instances(server, "demo")
    assert len(instances) == 5
    for instance in instances:
        behaviour = client.describe_instance_attribute(
            InstanceId=instance["InstanceId"], Attribute="instanceInitiatedShutdownBehavior"
        )["InstanceInitiatedShutdownBehavior"]["Value"]
        assert behaviour == "terminate"
        assert TAG_EXPIRES in tags(instance)
    status = tfcluster(env, "status", "--cluster", "demo", "--endpoint-url", server.url)
    rows = status.stdout.splitlines()[1:]
    assert len(rows) == 5 and all(row.split()[-1] in ("11h59m", "12h00m") for row in rows), rows


def test_up_prints_the_instances_per_type_and_asks_beyond_max_instances(
    server: ControlledMoto, env: dict[str, str], tmp_path: Path
) -> None:
    config = str(write_config(tmp_path, max_instances=4))
    refused = tfcluster(env, "up", "--config", config, "--endpoint-url", server.url)
    line = refused.one_line_error(2)
    assert "more than max_instances (4)" in line and "--yes" in line, line
    assert "instances to launch: 4 x m5.large, 1 x t3.small (5 in all)" in refused.stderr, (
        refused.stderr
    )
    assert live_instances(server) == [] and leftovers(server) == NOTHING
    gpu = tfcluster(env, "up", "--config", str(write_config(tmp_path)), "--set",
                    "instance_types.worker=g5.xlarge", "--endpoint-url", server.url)  # fmt: skip
    assert "GPU/accelerator instance types (g5.xlarge)" in gpu.one_line_error(2)
    launched = tfcluster(env, "up", "--config", config, "--yes", "--endpoint-url", server.url)
    assert launched.code == 0, launched.stderr
    assert len(live_instances(server, "demo")) == 5


# -- down --------------------------------------------------------------------------------


def test_down_twice_is_a_no_op_the_second_time(
    server: ControlledMoto, env: dict[str, str], tmp_path: Path
) -> None:
    assert tfcluster(env, "up", "--config", str(write_config(tmp_path)),
                     "--endpoint-url", server.url).code == 0  # fmt: skip
    server.clear()
    first = tfcluster(env, "down", "--cluster", "demo", "--yes", "--endpoint-url", server.url)
    assert first.code == 0, first.stderr
    # The overrides cover the binaries; the agent's wheel and constraints are always staged.
    assert "removed 5 instance(s), 1 security group(s) and 1 bucket(s)" in first.stdout
    report("down", server, first.seconds)
    server.clear()
    second = tfcluster(env, "down", "--cluster", "demo", "--yes", "--endpoint-url", server.url)
    assert second.code == 0, second.stderr
    assert "nothing to remove" in second.stderr
    assert server.mutating_calls() == ["CreateKeyPair", "DeleteKeyPair"], server.log
    assert leftovers(server) == NOTHING


def test_a_down_that_cannot_finish_lists_what_is_left_and_a_second_down_finishes(
    server: ControlledMoto, env: dict[str, str], tmp_path: Path
) -> None:
    assert tfcluster(env, "up", "--config", str(write_config(tmp_path)),
                     "--endpoint-url", server.url).code == 0  # fmt: skip
    server.clear()
    server.fail("TerminateInstances", "RequestLimitExceeded", times=2, status=503)
    server.fail("DeleteSecurityGroup", "DependencyViolation", times=1000)
    first = tfcluster(
        env, "down", "--cluster", "demo", "--yes", "--timeout", "3", "--endpoint-url", server.url
    )
    report("down with throttling and a group in use", server, first.seconds)
    assert server.calls["TerminateInstances"] == 3, server.calls  # throttled twice, retried
    line = first.one_line_error(1)
    (group,) = leftovers(server)["groups"]
    assert f"left security group(s) {group}" in line, line
    assert "run 'tfcluster down --cluster demo' again" in line
    assert leftovers(server)["instances"] == []
    server.clear()
    second = tfcluster(env, "down", "--cluster", "demo", "--yes", "--endpoint-url", server.url)
    assert second.code == 0, second.stderr
    assert leftovers(server) == NOTHING


# -- bad input ---------------------------------------------------------------------------


class _Html(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = b"<html><body>Sign in to the corporate proxy</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def html_endpoint() -> Iterator[str]:
    """Something on loopback that answers every request with an HTML page."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Html)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join(timeout=10)


def test_a_bad_endpoint_url_is_one_line_and_exit_2(
    server: ControlledMoto, env: dict[str, str], tmp_path: Path, html_endpoint: str
) -> None:
    config = str(write_config(tmp_path))
    for url in ("notaurl", "http://", "http://[::1", "ftp://127.0.0.1:1", html_endpoint):
        for args in (("ls",), ("down", "--cluster", "demo", "--yes"), ("up", "--config", config)):
            run = tfcluster(env, *args, "--endpoint-url", url)
            line = run.one_line_error(2)
            assert "endpoint" in line, line
    assert server.log == []


def test_bad_config_input_is_one_line_and_exit_2_with_nothing_created(
    server: ControlledMoto, env: dict[str, str], tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(config.read_bytes() + "# caf\xe9\n".encode("latin-1"))
    up = ("up", "--config", str(config), "--endpoint-url", server.url)
    cases = {
        "not UTF-8": ("up", "--config", str(latin1), "--endpoint-url", server.url),
        "zone wildcard": (*up, "--set", "zone=*.local"),
        "reverse zone": (*up, "--set", "zone=10.in-addr.arpa"),
        "public zone": (*up, "--set", "zone=example.com"),
        "huge count": (*up, "--ps", "10000000000000000000000", "--dry-run"),
        "float count": (*up, "--set", "ps=1e8"),
        "etcd host with spaces": (*up, "--set", "etcd=[http://a b:2379]"),
        "etcd host with braces": (*up, "--set", "etcd=['http://{a}:2379']"),
        "newline in a layout path": (
            *up,
            "--set",
            'layout.config_dir="/etc/x\\nExecStartPre=/bin/sh"',
        ),
        "usage error": (*up, "--ps", "1e8"),
    }
    for name, args in cases.items():
        run = tfcluster(env, *args)
        line = run.one_line_error(2)
        assert len(line) < 300, (name, line)
    assert server.mutating_calls() == [], server.log
