"""EC2 provisioning against moto: `up`, `down`, `status`, `ls`, replacement, rollback.

Tests run with fake credentials and the instance metadata credential lookup
disabled, inside moto's in-process mock; the two that exercise an endpoint
URL talk to a moto server or a closed port on 127.0.0.1. Failures that moto
cannot produce (permissions, quotas) are injected at the botocore level: a
``before-call`` hook answers the chosen operation with an EC2 error
response, which botocore turns into the same ``ClientError`` a real
endpoint would cause, and the provider code path is unchanged.
"""

from __future__ import annotations

import base64
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import moto.settings
import pytest
import yaml
from botocore.awsrequest import AWSResponse
from click.testing import CliRunner, Result
from moto import mock_aws
from moto.ec2.models.amis import AMIS as DEFAULT_AMIS
from moto.server import ThreadedMotoServer

from controlled_moto import use_fake_aws
from tfcluster.cloudinit import cli, plan, provision
from tfcluster.cloudinit.cloud.ec2 import Ec2Provider
from tfcluster.cloudinit.cloud.provider import (
    LIVE_STATES,
    TAG_CLUSTER,
    TAG_INDEX,
    TAG_ROLE,
    TAG_ZONE,
    LaunchSpec,
    LimitExceeded,
    PortRange,
    UnknownAMI,
)
from tfcluster.cloudinit.config import ClusterConfig, load_cluster_config
from tfcluster.cloudinit.localcloud import parts
from tfcluster.cloudinit.render.layout import control_endpoint
from tfcluster.cloudinit.render.userdata import render_user_data
from tfcluster.discovery import records

REGION = "us-east-1"
CLUSTER = "demo"
ZONE = "tensorflow.local"
AMI = str(DEFAULT_AMIS[0]["ami_id"])
"""One of the images moto holds in every region."""
ARTIFACTS = {"coredns": {"sha256": "a" * 64}, "etcd": {"sha256": "b" * 64}}
MUTATING_PREFIXES = ("Run", "Create", "Authorize", "Revoke", "Terminate", "Delete", "Stop")
LOCK_CALLS = ["CreateKeyPair", "DeleteKeyPair"]
"""The cluster lock that every up and down takes, then releases."""


def mutating(calls: list[str]) -> list[str]:
    """The calls that change the account, the lock's taking and release left out once."""
    changes = [c for c in calls if c.startswith(MUTATING_PREFIXES)]
    if changes[:1] == LOCK_CALLS[:1] and changes[-1:] == LOCK_CALLS[1:]:
        changes = changes[1:-1]
    return changes


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials; nothing read from the machine's AWS setup or its metadata service."""
    use_fake_aws(monkeypatch, tmp_path, REGION)


@pytest.fixture
def aws(aws_env: None) -> Iterator[None]:
    """moto in-process: every boto3 call in the test is answered here."""
    with mock_aws(config={"core": {"mock_credentials": False}}):
        yield


@pytest.fixture
def session(aws: None) -> boto3.session.Session:
    """One session for the test's client and the provider: the EC2 model loads once."""
    return boto3.session.Session()


@pytest.fixture
def ec2(session: boto3.session.Session) -> Any:
    """A client of our own for looking at what the code under test left behind."""
    return session.client("ec2", region_name=REGION)


@pytest.fixture
def provider(session: boto3.session.Session) -> Ec2Provider:
    return Ec2Provider(REGION, session=session, poll_interval=0.01, max_poll_interval=0.05)


BASE_CONFIG: dict[str, Any] = {
    "cluster": CLUSTER,
    "region": REGION,
    "zone": ZONE,
    "chief": 1,
    "ps": 2,
    "workers": 3,
    "ami": AMI,
    "artifacts": ARTIFACTS,
}
"""1 chief, 2 ps, 3 workers: with the control node, 7 instances."""


def make_config(**overrides: Any) -> ClusterConfig:
    return load_cluster_config(None, {**BASE_CONFIG, **overrides})


@pytest.fixture
def config() -> ClusterConfig:
    return make_config()


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tfcluster.yaml"
    path.write_text(yaml.safe_dump(BASE_CONFIG))
    return path


def record_calls(client: Any) -> list[str]:
    """Every EC2 operation the client sends from now on, in order (retries excluded)."""
    calls: list[str] = []
    client.meta.events.register(
        "before-call.ec2.*", lambda model, **_: calls.append(model.name), unique_id="record"
    )
    return calls


def _role_of(params: dict[str, Any]) -> str:
    tags = params["TagSpecifications"][0]["Tags"]
    return next(t["Value"] for t in tags if t["Key"] == TAG_ROLE)


def _tag_in_body(body: dict[str, Any], key: str) -> str | None:
    """The value of tag ``key`` in a serialised RunInstances request."""
    for name, value in body.items():
        if name.endswith(".Key") and value == key:
            return str(body.get(name[: -len("Key")] + "Value"))
    return None


def inject_error(client: Any, operation: str, code: str, *, role: str | None = None) -> None:
    """Answer ``operation`` (only for instances of ``role`` when given) with EC2 error ``code``."""

    def answer(model: Any, params: dict[str, Any], **_: Any) -> Any:
        if role is not None and _tag_in_body(params.get("body", {}), TAG_ROLE) != role:
            return None
        response = AWSResponse("https://ec2.us-east-1.amazonaws.com/", 400, {}, None)
        error = {"Code": code, "Message": f"{code} (injected by the test)."}
        metadata = {"HTTPStatusCode": 400, "RequestId": "injected"}  # as EC2's errors carry
        return response, {"Error": error, "ResponseMetadata": metadata}

    client.meta.events.register(f"before-call.ec2.{operation}", answer)


def cli_with_fault(
    monkeypatch: pytest.MonkeyPatch, operation: str, code: str, *, role: str | None = None
) -> None:
    """Make the CLI's provider answer ``operation`` with ``code``."""
    real = Ec2Provider

    def make(*args: Any, **kwargs: Any) -> Ec2Provider:
        made = real(*args, **kwargs)
        inject_error(made.ec2, operation, code, role=role)
        return made

    monkeypatch.setattr(cli, "Ec2Provider", make)


def instances(ec2: Any, cluster: str = CLUSTER, states: tuple[str, ...] = LIVE_STATES) -> list[Any]:
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[
            {"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]},
            {"Name": "instance-state-name", "Values": list(states)},
        ]
    )
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


def groups(ec2: Any, cluster: str = CLUSTER) -> list[Any]:
    return list(
        ec2.describe_security_groups(Filters=[{"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]}])[
            "SecurityGroups"
        ]
    )


def tags(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def user_data(ec2: Any, instance_id: str) -> bytes:
    attribute = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(attribute["UserData"]["Value"])


def rendered_like(data: bytes, config: ClusterConfig, role: str, **kwargs: Any) -> bytes:
    """What ``config`` renders for ``role`` with the presigned URLs and POSTs found in
    ``data``: they are signed at launch (with its time), so the same bytes need them."""
    script = next(p.text for p in parts.split_user_data(data) if p.content_type.endswith("script"))
    staged, posts = parts.staged_downloads(script), parts.signed_posts(script)
    return render_user_data(config, role, staged=staged, posts=posts, **kwargs)


def assert_nothing_left(ec2: Any, cluster: str = CLUSTER) -> None:
    live = [(i["InstanceId"], i["State"]["Name"]) for i in instances(ec2, cluster)]
    assert live == [], f"instances left behind: {live}"
    left = [g["GroupId"] for g in groups(ec2, cluster)]
    assert left == [], f"security groups left behind: {left}"


def run_cli(*args: str) -> Result:
    if args[:1] == ("up",) and "--dry-run" not in args:
        args = (*args, "--no-wait")  # no agent runs in moto; the wait is test_operator.py's
    return CliRunner().invoke(cli.main, list(args))


def assert_one_line_error(result: Result, exit_code: int, *fragments: str) -> str:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# -- up ---------------------------------------------------------------------------


def test_up_launches_each_role_in_one_call_with_tags_imds_and_user_data(
    ec2: Any, provider: Ec2Provider, config: ClusterConfig
) -> None:
    calls = record_calls(provider.ec2)
    events: list[str] = []
    result = provision.up(config, provider, on_event=events.append)

    assert calls.count("RunInstances") == 4, calls  # control, chief, ps, worker
    assert "CreateTags" not in calls, "tags must be set at creation"
    found = instances(ec2)
    assert len(found) == 1 + 1 + 2 + 3
    assert {n.instance_id for n in result.nodes} == {i["InstanceId"] for i in found}
    by_role: dict[str, list[Any]] = {}
    for instance in found:
        by_role.setdefault(tags(instance)[TAG_ROLE], []).append(instance)
    assert {role: len(v) for role, v in by_role.items()} == {
        "control": 1,
        "chief": 1,
        "ps": 2,
        "worker": 3,
    }
    for role, members in by_role.items():
        assert sorted(i["AmiLaunchIndex"] for i in members) == list(range(len(members))), role

    (group,) = groups(ec2)
    assert tags(group)[TAG_CLUSTER] == CLUSTER
    control = by_role["control"][0]
    etcd = [control_endpoint(control["PrivateIpAddress"])]
    for instance in found:
        instance_tags = tags(instance)
        role = instance_tags[TAG_ROLE]
        assert instance_tags[TAG_CLUSTER] == CLUSTER
        assert instance_tags[TAG_ZONE] == ZONE
        assert TAG_INDEX not in instance_tags, "only replacements carry an explicit index"
        options = instance["MetadataOptions"]
        assert options["HttpTokens"] == "required"
        assert options["HttpEndpoint"] == "enabled"
        assert options["HttpPutResponseHopLimit"] == 1
        assert [g["GroupId"] for g in instance["SecurityGroups"]] == [group["GroupId"]]
        got = user_data(ec2, instance["InstanceId"])
        endpoints = None if role == "control" else etcd
        assert got == rendered_like(got, config, role, etcd_endpoints=endpoints), role

    names = {provision.dns_name(n, ZONE) for n in result.nodes}
    assert {"chief0.tensorflow.local", "ps1.tensorflow.local", "worker2.tensorflow.local"} <= names
    assert any("launch worker0..worker2 (3 in one call)" in e for e in events), events


def _rules(group: dict[str, Any]) -> set[tuple[Any, ...]]:
    rules = set()
    for perm in group["IpPermissions"]:
        head = (perm["IpProtocol"], perm.get("FromPort"), perm.get("ToPort"))
        rules |= {(*head, pair["GroupId"]) for pair in perm["UserIdGroupPairs"]}
        rules |= {(*head, r["CidrIp"]) for r in perm["IpRanges"]}
        rules |= {(*head, r["CidrIpv6"]) for r in perm.get("Ipv6Ranges", [])}
    return rules


@pytest.mark.parametrize("ssh_cidr", [None, "203.0.113.7/32"])
def test_security_group_admits_only_the_group_itself_and_asked_for_ssh(
    ec2: Any, provider: Ec2Provider, ssh_cidr: str | None
) -> None:
    config = make_config(ssh_cidr=ssh_cidr)
    provision.up(config, provider)
    (group,) = groups(ec2)
    gid = group["GroupId"]
    expected = {("tcp", 2222, 2222, gid), ("tcp", 2379, 2379, gid)}
    if ssh_cidr is not None:
        expected.add(("tcp", 22, 22, ssh_cidr))
    assert _rules(group) == expected
    assert not any("0.0.0.0/0" in rule for rule in _rules(group))


def test_ensure_security_group_removes_rules_nobody_asked_for(
    ec2: Any, provider: Ec2Provider
) -> None:
    ports = [PortRange(2222, 2222, "tensorflow")]
    gid, created = provider.ensure_security_group(CLUSTER, ports)
    assert created
    ec2.authorize_security_group_ingress(
        GroupId=gid,
        IpPermissions=[
            {
                "IpProtocol": "tcp",
                "FromPort": 22,
                "ToPort": 22,
                "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
            }
        ],
    )
    again, created = provider.ensure_security_group(CLUSTER, ports)
    assert (again, created) == (gid, False)
    assert _rules(groups(ec2)[0]) == {("tcp", 2222, 2222, gid)}


def test_api_calls_do_not_grow_with_the_number_of_workers(provider: Ec2Provider) -> None:
    counts: dict[int, tuple[Counter[str], Counter[str]]] = {}
    for workers in (3, 300):
        config = make_config(cluster=f"scale{workers}", workers=workers)
        calls = record_calls(provider.ec2)
        result = provision.up(config, provider)
        assert len(result.launched) == 1 + 1 + 2 + workers
        up_calls = Counter(calls)
        calls.clear()
        provision.down(config.cluster, provider)
        counts[workers] = (up_calls, Counter(calls))
        provider.ec2.meta.events.unregister("before-call.ec2.*", unique_id="record")
    summary = (
        f"up: {sum(counts[3][0].values())} calls with 3 workers, "
        f"{sum(counts[300][0].values())} with 300; "
        f"down: {sum(counts[3][1].values())} and {sum(counts[300][1].values())}; "
        f"detail {counts}"
    )
    print(summary)
    assert counts[3] == counts[300], summary


def test_dry_run_reads_only_and_reports_the_plan(
    ec2: Any, provider: Ec2Provider, config: ClusterConfig
) -> None:
    calls = record_calls(provider.ec2)
    events: list[str] = []
    result = provision.up(config, provider, dry_run=True, on_event=events.append)
    assert not result.changed
    assert mutating(calls) == [] and "CreateKeyPair" not in calls, calls
    assert_nothing_left(ec2)
    assert "create the security group" in events
    assert "launch the control node (etcd)" in events
    assert "launch ps0..ps1 (2 in one call)" in events
    assert events[-1] == "dry run: nothing changed"


def test_up_dry_run_through_the_cli(ec2: Any, config_file: Path) -> None:
    result = run_cli("up", "--config", str(config_file), "--dry-run", "--workers", "5")
    assert result.exit_code == 0, result.output
    assert "launch worker0..worker4 (5 in one call)" in result.stderr
    assert_nothing_left(ec2)


def test_up_replaces_a_missing_worker_with_its_explicit_index(
    ec2: Any, provider: Ec2Provider, config: ClusterConfig
) -> None:
    first = provision.up(config, provider)
    control_ip = next(n.private_ip for n in first.nodes if n.role == "control")
    assert control_ip is not None
    worker1 = next(n for n in first.nodes if n.role == "worker" and n.index == 1)
    ec2.terminate_instances(InstanceIds=[worker1.instance_id])

    calls = record_calls(provider.ec2)
    second = provision.up(config, provider)
    assert mutating(calls) == ["RunInstances"], calls
    (replacement,) = second.launched
    assert (replacement.role, replacement.index, replacement.launch_index) == ("worker", 1, 0)
    (described,) = ec2.describe_instances(InstanceIds=[replacement.instance_id])["Reservations"][0][
        "Instances"
    ]
    assert tags(described)[TAG_INDEX] == "1"
    got = user_data(ec2, replacement.instance_id)
    endpoints = [control_endpoint(control_ip)]
    assert got == rendered_like(got, config, "worker", index=1, etcd_endpoints=endpoints)
    assert sorted((n.role, n.index) for n in second.nodes if n.role == "worker") == [
        ("worker", 0),
        ("worker", 1),
        ("worker", 2),
    ]

    calls.clear()
    events: list[str] = []
    third = provision.up(config, provider, on_event=events.append)
    assert mutating(calls) == [], calls
    assert not third.changed
    assert f"cluster {CLUSTER} is complete: nothing to do" in events


# -- down, status, ls ---------------------------------------------------------------


def test_down_removes_everything_and_a_second_down_is_a_no_op(
    ec2: Any, provider: Ec2Provider, config: ClusterConfig
) -> None:
    provision.up(config, provider)
    other = make_config(cluster="other", ps=1, workers=1)
    provision.up(other, provider)

    first = run_cli("down", "--cluster", CLUSTER, "--yes")
    assert first.exit_code == 0, first.output
    assert "terminating 7 instance(s)" in first.stderr
    assert_nothing_left(ec2)
    assert len(instances(ec2, CLUSTER, states=("terminated",))) == 7
    assert len(instances(ec2, "other")) == 4, "down must not touch another cluster"

    second = run_cli("down", "--cluster", CLUSTER, "--yes")
    assert second.exit_code == 0, second.output
    assert "nothing to remove" in second.stderr


def test_down_asks_first_unless_yes(ec2: Any, provider: Ec2Provider, config: ClusterConfig) -> None:
    provision.up(config, provider)
    declined = CliRunner().invoke(cli.main, ["down", "--cluster", CLUSTER], input="n\n")
    assert declined.exit_code != 0
    assert len(instances(ec2)) == 7
    accepted = CliRunner().invoke(cli.main, ["down", "--cluster", CLUSTER], input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert_nothing_left(ec2)


def test_up_status_ls_through_the_cli(ec2: Any, config_file: Path) -> None:
    up = run_cli("up", "--config", str(config_file))
    assert up.exit_code == 0, up.output
    table = up.stdout.splitlines()
    assert table[0].split() == ["INSTANCE", "ROLE", "INDEX", "PRIVATE", "IP", "DNS", "NAME"]
    assert len(table) == 1 + 7
    assert any(line.split()[1:3] == ["worker", "2"] and "worker2.tensorflow.local" in line
               for line in table)  # fmt: skip

    status = run_cli("status", "--cluster", CLUSTER)
    assert status.exit_code == 0, status.output
    rows = status.stdout.splitlines()[1:]
    assert len(rows) == 7
    assert all(" running " in row for row in rows)
    # every task has its DNS name; the control node has none. No agent runs in moto:
    # the bucket holds no report, so each task's agent column says so.
    assert sum(".tensorflow.local" in row for row in rows) == 6
    assert sum(" NO REPORT " in row for row in rows) == 6, rows
    assert status.stderr == ""

    listing = run_cli("ls")
    assert listing.exit_code == 0, listing.output
    assert listing.stdout.splitlines()[1].split()[:4] == [CLUSTER, "7", "7", "running"]

    assert run_cli("down", "--cluster", CLUSTER, "--yes").exit_code == 0
    assert "no clusters" in run_cli("ls").stdout


def test_status_shows_which_dns_records_etcd_holds(
    ec2: Any, config_file: Path, stack, etcd
) -> None:
    assert run_cli("up", "--config", str(config_file)).exit_code == 0
    prefix = records.cluster_path(CLUSTER) + "/"
    value = records.record_value("10.0.0.9", 2222, ttl=5)
    try:
        etcd.put(records.record_key(prefix[:-1], ZONE, records.Member("worker", 1)), value)
        status = run_cli("status", "--cluster", CLUSTER, "--etcd", stack.etcd_endpoint)
    finally:
        etcd.delete_prefix(prefix)
    assert status.exit_code == 0, status.output
    header = status.stdout.splitlines()[0].split()
    assert header[-3:] == ["RECORD", "TIME", "LEFT"], header
    cells = {tuple(r.split()[1:3]): r.split()[-2] for r in status.stdout.splitlines()[1:]}
    assert cells[("worker", "1")] == "present"
    assert cells[("worker", "0")] == "missing"
    assert cells[("ps", "0")] == "missing"


# -- failures -----------------------------------------------------------------------


def test_failed_worker_launch_rolls_back_everything_this_run_created(
    ec2: Any, provider: Ec2Provider, config: ClusterConfig
) -> None:
    inject_error(provider.ec2, "RunInstances", "InsufficientInstanceCapacity", role="worker")
    events: list[str] = []
    with pytest.raises(provision.UpFailed) as failure:
        provision.up(config, provider, on_event=events.append)
    message = str(failure.value)
    assert "InsufficientInstanceCapacity" in message
    assert "rolled back: terminated 4 instance(s) it launched, deleted security group" in message
    assert "\n" not in message
    assert_nothing_left(ec2)


def test_failed_replacement_keeps_the_instances_that_were_there(
    ec2: Any, provider: Ec2Provider, config: ClusterConfig
) -> None:
    first = provision.up(config, provider)
    worker1 = next(n for n in first.nodes if n.role == "worker" and n.index == 1)
    ec2.terminate_instances(InstanceIds=[worker1.instance_id])
    inject_error(provider.ec2, "RunInstances", "InstanceLimitExceeded", role="worker")
    with pytest.raises(provision.UpFailed) as failure:
        provision.up(config, provider)
    assert isinstance(failure.value.cause, LimitExceeded)
    assert "nothing to roll back" in str(failure.value)
    assert len(instances(ec2)) == 6
    assert len(groups(ec2)) == 1


@pytest.mark.parametrize("profile", [None, "missing-profile"])
def test_no_credentials_is_one_line_and_creates_nothing(
    ec2: Any, config_file: Path, monkeypatch: pytest.MonkeyPatch, profile: str | None
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    if profile is not None:
        monkeypatch.setenv("AWS_PROFILE", profile)
    result = run_cli("up", "--config", str(config_file))
    assert_one_line_error(result, 1, "no usable AWS credentials")
    assert_nothing_left(ec2)  # our own client was made while credentials were set


def test_access_denied_is_one_line_and_rolls_back(
    ec2: Any, config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """moto's IAM enforcement would need users and policies; the denial is injected
    as the UnauthorizedOperation answer EC2 gives, on the first launch."""
    cli_with_fault(monkeypatch, "RunInstances", "UnauthorizedOperation")
    result = run_cli("up", "--config", str(config_file))
    line = assert_one_line_error(
        result, 1, "not allowed to call RunInstances (UnauthorizedOperation)", "rolled back"
    )
    assert "deleted security group" in line
    assert_nothing_left(ec2)


def test_instance_limit_is_one_line_and_rolls_back(
    ec2: Any, config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli_with_fault(monkeypatch, "RunInstances", "InstanceLimitExceeded", role="worker")
    result = run_cli("up", "--config", str(config_file))
    assert_one_line_error(
        result, 1, "InstanceLimitExceeded", "rolled back: terminated 4 instance(s)"
    )
    assert_nothing_left(ec2)


def test_unknown_ami_is_one_line_and_creates_nothing(
    ec2: Any, tmp_path: Path, config_file: Path
) -> None:
    data = yaml.safe_load(config_file.read_text())
    data["ami"] = "ami-0123456789abcdef0"
    bad = tmp_path / "bad-ami.yaml"
    bad.write_text(yaml.safe_dump(data))
    result = run_cli("up", "--config", str(bad))
    line = assert_one_line_error(result, 1, "InvalidAMIID", "ami-0123456789abcdef0")
    assert "rolled back" not in line, "the image is checked before anything is created"
    assert_nothing_left(ec2)


def test_launch_with_an_unknown_ami_is_unknown_ami(
    provider: Ec2Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images can vanish between the check and the launch; moto validates on request."""
    monkeypatch.setattr(moto.settings, "ENABLE_AMI_VALIDATION", True)
    group_id, _ = provider.ensure_security_group(CLUSTER, [PortRange(2222, 2222, "tf")])
    spec = LaunchSpec("ami-0123456789abcdef0", "t3.micro", group_id)
    with pytest.raises(UnknownAMI, match="InvalidAMIID"):
        provider.launch(CLUSTER, "worker", 2, b"#!/bin/sh\n", spec)
    assert provider.nodes(CLUSTER) == []


@pytest.mark.parametrize(
    ("args", "exit_code", "fragment"),
    [
        (("--region", "xx-nowhere-1"), 1, "unknown AWS region 'xx-nowhere-1'"),
        (("--workers", "0"), 2, "workers: must be an integer >= 1"),
    ],
)
def test_bad_region_and_bad_config_are_one_line(
    ec2: Any, config_file: Path, args: tuple[str, ...], exit_code: int, fragment: str
) -> None:
    result = run_cli("up", "--config", str(config_file), *args)
    assert_one_line_error(result, exit_code, fragment)
    assert_nothing_left(ec2)


def test_lost_control_node_is_refused_without_launching(
    ec2: Any, provider: Ec2Provider, config: ClusterConfig
) -> None:
    first = provision.up(config, provider)
    control = next(n for n in first.nodes if n.role == "control")
    ec2.terminate_instances(InstanceIds=[control.instance_id])
    calls = record_calls(provider.ec2)
    with pytest.raises(plan.ControlNodeLost, match="no control node"):
        provision.up(config, provider)
    assert mutating(calls) == [], calls
    assert len(instances(ec2)) == 6


def test_unreachable_endpoint_is_one_line(aws_env: None) -> None:
    """A closed port on loopback: the connection is refused, retried, then reported."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_cli("ls", "--endpoint-url", f"http://127.0.0.1:{port}")
    assert_one_line_error(result, 1, "listing instances", f"127.0.0.1:{port}")


def test_set_overrides_any_config_key(ec2: Any, config_file: Path) -> None:
    result = run_cli(
        "up", "--config", str(config_file), "--set", "chief=0", "--set", "tf_port=2345"
    )
    assert result.exit_code == 0, result.output
    roles = Counter(tags(i)[TAG_ROLE] for i in instances(ec2))
    assert roles == {"control": 1, "ps": 2, "worker": 3}
    ports = {perm["FromPort"] for perm in groups(ec2)[0]["IpPermissions"]}
    assert ports == {2345, 2379}


def test_image_parameter_resolves_through_ssm(provider: Ec2Provider) -> None:
    """moto serves Amazon Linux's public parameters (not Canonical's Ubuntu ones)."""
    parameter = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
    assert provider.resolve_image(parameter).startswith("ami-")


def test_missing_image_parameter_is_unknown_ami_before_anything_is_created(
    ec2: Any, config_file: Path, tmp_path: Path
) -> None:
    """Without ``ami`` the Ubuntu parameter is read, which moto does not hold."""
    data = yaml.safe_load(config_file.read_text())
    del data["ami"]
    no_ami = tmp_path / "no-ami.yaml"
    no_ami.write_text(yaml.safe_dump(data))
    result = run_cli("up", "--config", str(no_ami))
    line = assert_one_line_error(result, 1, "ParameterNotFound", "ubuntu")
    assert "rolled back" not in line
    assert_nothing_left(ec2)


def test_up_and_down_through_a_moto_server_endpoint(
    aws_env: None, config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local cloud's path: a moto server on loopback reached through --endpoint-url
    (AWS_ENDPOINT_URL too, so that no client of the test could reach anything else)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        up = run_cli("up", "--config", str(config_file), "--endpoint-url", endpoint)
        assert up.exit_code == 0, up.output
        assert len(up.stdout.splitlines()) == 1 + 7
        down = run_cli("down", "--cluster", CLUSTER, "--yes", "--endpoint-url", endpoint)
        assert down.exit_code == 0, down.output
        client = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint)
        assert_nothing_left(client)
    finally:
        server.stop()


def test_spot_workers_are_one_time_spot_instances(ec2: Any, provider: Ec2Provider) -> None:
    calls: list[dict[str, Any]] = []
    provider.ec2.meta.events.register(
        "provide-client-params.ec2.RunInstances", lambda params, **_: calls.append(params)
    )
    provision.up(make_config(spot_workers=True), provider)
    market: dict[str, Any] = {_role_of(c): c.get("InstanceMarketOptions") for c in calls}
    assert market["worker"]["SpotOptions"]["SpotInstanceType"] == "one-time"
    assert market["ps"] is None and market["chief"] is None
    lifecycle = {tags(i)[TAG_ROLE]: i.get("InstanceLifecycle") for i in instances(ec2)}
    assert lifecycle == {"control": None, "chief": None, "ps": None, "worker": "spot"}
