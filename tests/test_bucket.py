"""The cluster bucket against a moto server: naming, settings, staging, user-data, removal.

``up`` runs in this process (`provision.up` with the EC2 provider pointed at
the server through its endpoint URL), with a config of only ``cluster``,
``ps``, ``workers`` and ``ami``: the static binaries come from this checkout's
``.tools/bin`` (``make setup``) and are staged in the bucket. The server counts
every S3 call (``controlled_moto.s3_action``), so "a second up uploads
nothing" is a count of PutObject calls.

moto does not verify presigned signatures (nor expiry): a URL whose signature
were wrong would still be served here. The tests therefore check the signed
request's own parameters (SigV4, the expiry asked for, the bucket and key) and
that the bytes behind the URL are what the user-data's SHA-256 names.

``-s`` prints the figures: bytes and seconds of staging, cold and warm.
"""

from __future__ import annotations

import email
import gzip
import hashlib
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
import requests
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from moto.ec2.models.amis import AMIS
from test_userdata import Sandbox

from conftest import require_tool, stand_in_staged
from controlled_moto import ControlledMoto, running, use_fake_aws
from tfcluster.cloudinit import cli, plan, provision
from tfcluster.cloudinit.cloud.bucket import BucketConflict, bucket_name
from tfcluster.cloudinit.cloud.ec2 import Ec2Provider
from tfcluster.cloudinit.cloud.provider import TAG_CLUSTER
from tfcluster.cloudinit.config import Artifact, ClusterConfig, load_cluster_config
from tfcluster.cloudinit.localcloud.imds_emulator import IMDSEmulator, InstanceMetadata
from tfcluster.cloudinit.render.userdata import RenderError, render_parts
from tfcluster.cloudinit.stage import artifacts, bundle, wheel

REGION = "us-east-1"
AMI = str(AMIS[0]["ami_id"])
CLUSTER = "demo"
MINIMAL = {"cluster": CLUSTER, "region": REGION, "ps": 1, "workers": 2, "ami": AMI}
"""The whole config: no artifacts section, no checksums pasted."""
CLUSTER_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
S3_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


# -- naming (pure) ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    cluster=st.from_regex(CLUSTER_NAME, fullmatch=True),
    account=st.from_regex(r"[0-9]{12}", fullmatch=True),
    region=st.sampled_from(["us-east-1", "eu-central-1", "ap-southeast-2", "us-gov-west-1"]),
)
def test_any_cluster_name_gives_a_valid_bucket_name(cluster: str, account: str, region: str):
    name = bucket_name(cluster, account, region)
    assert S3_NAME.fullmatch(name), name
    assert 3 <= len(name) <= 63
    assert not re.fullmatch(r"\d+\.\d+\.\d+\.\d+", name)
    assert not name.startswith(("xn--", "sthree-", "amzn-s3-demo-"))
    assert not name.endswith(("-s3alias", "--ol-s3", "--x-s3", "--table-s3"))
    assert name == bucket_name(cluster, account, region)  # deterministic
    other_account = f"{(int(account) + 1) % 10**12:012d}"
    assert name != bucket_name(cluster, other_account, region)
    assert name != bucket_name(cluster, account, "sa-east-1")


def test_long_names_sharing_a_prefix_still_differ():
    a, b = "x" * 62 + "a", "x" * 62 + "b"
    assert bucket_name(a, "123456789012", REGION) != bucket_name(b, "123456789012", REGION)
    assert len(bucket_name(a, "123456789012", REGION)) <= 63


# -- against a moto server -------------------------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[ControlledMoto]:
    yield from running()


@pytest.fixture
def server(moto: ControlledMoto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The server, emptied; fake credentials and nothing read from this machine's AWS set-up."""
    use_fake_aws(monkeypatch, tmp_path, REGION)
    moto.reset_state()
    yield moto
    moto.clear()


@pytest.fixture
def provider(server: ControlledMoto) -> Ec2Provider:
    return Ec2Provider(REGION, endpoint_url=server.url, poll_interval=0.01, max_poll_interval=0.05)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    """test_userdata's sandbox: one instance's file system, its own metadata service."""
    for tool in ("curl", "sha256sum", "bash"):
        require_tool(tool)
    metadata = InstanceMetadata(
        launch_index=0, local_ipv4="127.0.0.9", instance_id="i-0123456789abcdef0"
    )
    with IMDSEmulator(metadata) as emulator:
        box = Sandbox(tmp_path / "instance", emulator.url)
        yield box
        box.close()


def client(server: ControlledMoto, service: str) -> Any:
    return boto3.client(
        service,
        endpoint_url=server.url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def config(**extra: Any) -> ClusterConfig:
    return load_cluster_config(None, {**MINIMAL, **extra})


def binaries() -> dict[str, Path]:
    """What `up` stages: the checkout's static builds (make setup)."""
    try:
        return artifacts.instance_binaries("amd64", checkout=Path(__file__).parents[1])
    except artifacts.BinaryNotFound as exc:
        pytest.skip(f"no static binaries to stage ({exc}): run make setup")


def up(provider: Ec2Provider, cfg: ClusterConfig | None = None) -> provision.UpResult:
    events: list[str] = []
    result = provision.up(cfg or config(), provider, on_event=events.append, run_timeout=60)
    return result


def script_text(user_data: bytes) -> str:
    """The shell script part of a user-data multipart (gzip undone first)."""
    if user_data[:2] == b"\x1f\x8b":
        user_data = gzip.decompress(user_data)
    message = email.message_from_bytes(user_data)
    return next(
        p.get_payload(decode=True).decode()
        for p in message.walk()
        if p.get_content_type() == "text/x-shellscript"
    )


def script_variables(user_data: bytes) -> dict[str, str]:
    """The ``name=value`` lines at the top of the script part, unquoted."""
    script = script_text(user_data)
    found = {}
    for line in script.split("\nlog() {")[0].splitlines():  # the variables block only
        match = re.fullmatch(r"([a-z0-9_]+)=(.*)", line)
        if match:
            found[match.group(1)] = shlex.split(match.group(2))[0]
    return found


def test_bucket_is_created_tagged_private_and_encrypted(server, provider):
    name, created = provider.ensure_bucket(CLUSTER)
    assert created and name == bucket_name(CLUSTER, "123456789012", REGION)
    s3 = client(server, "s3")
    tags = s3.get_bucket_tagging(Bucket=name)["TagSet"]
    assert {"Key": TAG_CLUSTER, "Value": CLUSTER} in tags
    block = s3.get_public_access_block(Bucket=name)["PublicAccessBlockConfiguration"]
    assert block == dict.fromkeys(
        ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets"),
        True,
    )
    rules = s3.get_bucket_encryption(Bucket=name)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    ownership = s3.get_bucket_ownership_controls(Bucket=name)["OwnershipControls"]
    assert ownership["Rules"] == [{"ObjectOwnership": "BucketOwnerEnforced"}]
    server.clear()
    assert provider.ensure_bucket(CLUSTER) == (name, False)  # reused
    assert server.calls["CreateBucket"] == 0


def test_a_bucket_of_another_cluster_or_account_is_a_one_line_error(server, provider):
    name = provider.bucket_name(CLUSTER)
    s3 = client(server, "s3")
    s3.create_bucket(Bucket=name)
    s3.put_bucket_tagging(
        Bucket=name, Tagging={"TagSet": [{"Key": TAG_CLUSTER, "Value": "someone-else"}]}
    )
    with pytest.raises(BucketConflict, match=f"^bucket {name} is tagged for cluster someone-else"):
        provider.ensure_bucket(CLUSTER)
    # Another account's bucket answers HeadBucket with 403 (moto has one account: injected).
    server.fail("HeadBucket", "403", status=403)
    with pytest.raises(BucketConflict, match="another account owns it"):
        provider.find_bucket("other")
    # ... or CreateBucket with BucketAlreadyExists when the name is taken elsewhere.
    server.fail("CreateBucket", "BucketAlreadyExists", status=409)
    with pytest.raises(BucketConflict, match="belongs to another AWS account"):
        provider.ensure_bucket("other")


def test_dry_run_says_what_would_be_staged_and_creates_nothing(server, provider):
    found = binaries()
    events: list[str] = []
    server.clear()
    provision.up(config(), provider, dry_run=True, on_event=events.append)
    total = sum(found[n].stat().st_size for n in ("coredns", "etcd", "etcdctl"))
    total += sum(o.size for o in wheel.stage_wheel(artifacts.cache_root()))
    line = next(e for e in events if e.startswith("stage "))
    assert line.startswith(f"stage 5 object(s), {total / 1e6:.1f} MB in new bucket tfcluster-demo-")
    assert "5 to upload" in line
    assert any(e.split()[:1] == ["wheel"] for e in events), events  # listed by name
    assert not [c for c in server.log if c.startswith(("Create", "Put", "Run"))], server.log


def test_up_stages_once_and_a_second_up_uploads_nothing(server, provider, capsys):
    binaries()
    cold = up(provider)
    staged = plan.staged_objects(config())
    assert server.calls["PutObject"] == len(staged) == 5
    assert cold.uploaded == sum(o.size for o in staged)
    keys = provider.bucket_keys(cold.bucket or "")
    assert sorted(keys) == sorted(
        f"objects/{hashlib.sha256(o.path.read_bytes()).hexdigest()}/{o.filename}" for o in staged
    )
    # A worker lost: the repair launches one instance and stages again, from the bucket.
    worker = next(n for n in cold.nodes if n.label == "worker1")
    client(server, "ec2").terminate_instances(InstanceIds=[worker.instance_id])
    server.clear()
    warm = up(provider)
    assert [n.label for n in warm.launched] == ["worker1"]
    assert server.calls["PutObject"] == 0 and warm.uploaded == 0
    assert server.calls["CreateBucket"] == 0
    with capsys.disabled():
        print(
            f"\nstaging: cold {cold.uploaded} bytes in {cold.staging_seconds:.2f} s, "
            f"warm {warm.uploaded} bytes in {warm.staging_seconds:.2f} s"
        )


def test_every_user_data_fetches_only_presigned_urls_of_the_bucket(server, provider, tmp_path):
    binaries()
    program = tmp_path / "program"
    program.mkdir()
    (program / "train.py").write_text("print('training')\n")
    cfg = config(url_expiry="2h", program_dir=str(program), program="python3 train.py")
    staged = {plan.fetch_name(o): o for o in plan.staged_objects(cfg)}
    result = up(provider, cfg)
    bucket = result.bucket
    assert bucket is not None
    s3 = client(server, "s3")
    agent = {"coredns", "wheel", "constraints"}
    expected = {"control": {"coredns", "etcd", "etcdctl"}, "chief": agent | {"bundle"}}
    for node in result.nodes:
        user_data = provider.user_data(node.instance_id)
        script = script_text(user_data)
        assert "github.com" not in script  # no release site: only the bucket
        # Nothing installs by the project's name from an index: pip gets the staged files.
        assert "agent_package" not in script and "tfcluster[tf]" not in script
        if node.role == "control":
            assert "pip install" not in script and "/bin/pip" not in script
        else:
            after = script.split('"$venv_dir/bin/pip" install', 1)[1]
            words = " ".join(after.split("\n")[:2]).replace("\\", " ").split()
            assert words[-3:] == [
                "--constraint", '"$dist_dir/$constraints_file"', '"$dist_dir/${wheel_file}[tf]"'
            ]  # fmt: skip
            assert "--index-url" not in script and "--extra-index-url" not in script
        variables = script_variables(user_data)
        urls = {k[: -len("_url")]: v for k, v in variables.items() if k.endswith("_url")}
        assert set(urls) == expected.get(node.role, agent), node.label
        for name, url in urls.items():
            parts = urlsplit(url)
            query = parse_qs(parts.query)
            sha = variables[f"{name}_sha256"]
            assert f"{parts.scheme}://{parts.netloc}" == server.url
            assert parts.path == f"/{bucket}/objects/{sha}/{staged[name].filename}"
            # moto ignores the signature: check what was signed instead.
            assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
            assert query["X-Amz-Expires"] == ["7200"]
            assert query["X-Amz-SignedHeaders"] == ["host"]
            assert len(query["X-Amz-Signature"][0]) == 64
            assert sha == hashlib.sha256(staged[name].path.read_bytes()).hexdigest()
            key = f"objects/{sha}/{staged[name].filename}"
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            assert hashlib.sha256(body).hexdigest() == sha
            fetched = requests.get(url, timeout=30)
            assert fetched.status_code == 200
            assert hashlib.sha256(fetched.content).hexdigest() == sha
        if node.role not in expected:
            assert variables["wheel_file"] == "tfcluster-0.1.0-py3-none-any.whl"


def test_a_tampered_object_is_refused_and_nothing_starts(server, provider, sandbox):
    """The instance's own check: the control script, run in the sandbox, fetches each
    binary from the bucket with the URLs and SHA-256 values that up put in the
    user-data; one object changed in the bucket after up stops the script."""
    binaries()
    result = up(provider)
    control = next(n for n in result.nodes if n.role == "control")
    variables = script_variables(provider.user_data(control.instance_id))
    staged = {
        name: Artifact(variables[f"{name}_url"], variables[f"{name}_sha256"])
        for name in ("coredns", "etcd", "etcdctl")
    }
    cfg = config()
    key = f"objects/{staged['etcd'].sha256}/etcd"
    client(server, "s3").put_object(Bucket=result.bucket, Key=key, Body=b"#!/bin/sh\necho evil\n")
    refused = sandbox.run(cfg, "control", staged=staged)
    assert refused.returncode != 0
    assert re.search(r"tfcluster user-data: etcd: SHA-256 mismatch .*: refused", refused.stderr)
    assert staged["etcd"].url not in refused.stderr  # the presigned URL is not logged
    assert not sandbox.path("opt/bin/etcd").exists()
    assert not sandbox.calls.exists()  # no service was started
    # The same script with the object restored installs every binary on its own.
    with open(binaries()["etcd"], "rb") as body:
        client(server, "s3").put_object(Bucket=result.bucket, Key=key, Body=body)
    accepted = sandbox.run(cfg, "control", staged=staged)
    assert accepted.returncode == 0, accepted.stderr
    for name in ("coredns", "etcd", "etcdctl"):
        assert sandbox.path(f"opt/bin/{name}").read_bytes() == binaries()[name].read_bytes()


def test_a_failed_up_removes_the_bucket_it_created(server, provider):
    binaries()
    server.fail("RunInstances", "InsufficientInstanceCapacity", times=1)
    with pytest.raises(provision.UpFailed, match="deleted bucket tfcluster-demo-"):
        up(provider)
    assert provider.find_bucket(CLUSTER) is None
    assert provider.buckets() == {}


def test_a_failed_up_keeps_a_bucket_that_was_there(server, provider):
    binaries()
    name, _ = provider.ensure_bucket(CLUSTER)
    server.fail("RunInstances", "InsufficientInstanceCapacity", times=1)
    with pytest.raises(provision.UpFailed):
        up(provider)
    assert provider.find_bucket(CLUSTER) == name


def test_down_removes_bucket_and_objects_and_a_second_down_is_a_no_op(server, provider):
    binaries()
    result = up(provider)
    s3 = client(server, "s3")
    s3.put_bucket_versioning(Bucket=result.bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket=result.bucket, Key="reports/x", Body=b"1")
    s3.put_object(Bucket=result.bucket, Key="reports/x", Body=b"2")  # two versions
    first = provision.down(CLUSTER, provider, timeout=60, group_timeout=60)
    assert first.complete and first.buckets == (result.bucket,)
    assert result.bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    server.clear()
    events: list[str] = []
    second = provision.down(CLUSTER, provider, on_event=events.append)
    assert second.complete and second.buckets == () and second.terminated == ()
    assert any("nothing to remove" in e for e in events)
    assert not [c for c in server.log if c.startswith("Delete") and c != "DeleteKeyPair"]


def test_ls_shows_a_bucket_that_a_failed_down_left(server, provider):
    binaries()
    result = up(provider)
    server.fail("DeleteBucket", "InternalError", times=10, status=500)  # beyond the retries
    first = provision.down(CLUSTER, provider, timeout=60, group_timeout=60)
    assert not first.complete
    assert first.left_buckets == (result.bucket,)
    assert f"bucket(s) {result.bucket}" in first.describe_left()
    listed = {c.name: c for c in provision.list_clusters(provider)}
    assert listed[CLUSTER].bucket == result.bucket and listed[CLUSTER].live_nodes == 0
    shown = CliRunner().invoke(cli.list_clusters, ["--endpoint-url", server.url])
    assert shown.exit_code == 0, shown.output
    header, row = shown.output.splitlines()
    assert header.split() == ["CLUSTER", "INSTANCES", "STATES", "SECURITY", "GROUPS", "BUCKET",
                              "LOCK"]  # fmt: skip
    assert row.split() == [CLUSTER, "0", result.bucket, "-"]
    server.clear()
    second = provision.down(CLUSTER, provider)
    assert second.complete and second.buckets == (result.bucket,)
    assert provision.list_clusters(provider) == []


def test_render_needs_a_staged_url_or_an_override():
    with pytest.raises(RenderError, match=r"^artifacts\.coredns: no override in the config and"):
        render_parts(config(), "control")
    staged = {n: Artifact(f"https://b.invalid/{n}?sig", n[0] * 64) for n in ("coredns", "etcd")}
    with pytest.raises(RenderError, match="etcdctl is not staged"):
        render_parts(config(), "control", staged=staged)
    worker = render_parts(config(), "worker", etcd_endpoints=["http://10.0.0.5:2379"], staged={
        "coredns": staged["coredns"], **stand_in_staged()})[1].content  # fmt: skip
    with pytest.raises(RenderError, match=r"^wheel: not staged"):
        render_parts(config(), "worker", etcd_endpoints=["http://10.0.0.5:2379"], staged=staged)
    assert 'install_artifact "$coredns_url" "$coredns_sha256" coredns' in worker
    assert "etcd_url" not in worker


def test_a_missing_or_oversized_program_dir_is_one_line_before_anything_is_created(
    server, provider, tmp_path
):
    binaries()
    missing = CliRunner().invoke(
        cli.up, ["--endpoint-url", server.url, "--set", f"ami={AMI}", "--cluster", CLUSTER,
                 "--region", REGION, "--program-dir", str(tmp_path / "nowhere"), "--yes"],
    )  # fmt: skip
    assert missing.exit_code == 2
    assert missing.output.strip().splitlines() == [
        f"Error: program_dir: {tmp_path / 'nowhere'} does not exist"
    ]
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "data.bin", "wb") as data:  # incompressible, just over the limit
        for _ in range((bundle.DEFAULT_LIMIT >> 20) + 1):
            data.write(os.urandom(1 << 20))
    server.clear()
    over = CliRunner().invoke(
        cli.up, ["--endpoint-url", server.url, "--set", f"ami={AMI}", "--cluster", CLUSTER,
                 "--region", REGION, "--program-dir", str(big), "--yes"],
    )  # fmt: skip
    assert over.exit_code == 2, over.output
    last = over.output.strip().splitlines()[-1]
    assert last.startswith(f"Error: {big}: the compressed bundle is over the limit of 64 MiB")
    # Only the run's lock (a key pair) was taken, and given back: no bucket, no object.
    made = [c for c in server.log if c.startswith(("Create", "Put", "Run"))]
    assert made == ["CreateKeyPair"] and server.log[-1] == "DeleteKeyPair", server.log


def test_plan_stages_only_what_the_config_does_not_override():
    binaries()
    assert [o.name for o in plan.staged_binaries(config())] == [
        "coredns-amd64", "etcd-amd64", "etcdctl-amd64"
    ]  # fmt: skip
    only_etcd = config(**{"artifacts.coredns.sha256": "a" * 64})
    assert [o.filename for o in plan.staged_binaries(only_etcd)] == ["etcd", "etcdctl"]
    both = config(**{"artifacts.coredns.sha256": "a" * 64, "artifacts.etcd.sha256": "b" * 64})
    assert plan.staged_binaries(both) == []
