"""The operator's side of the reports: the signed POST policies (read from the
signed document: moto enforces none of it) and ``status`` reading back what
real report writers put into moto's S3."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import boto3
import pytest
from botocore.config import Config

from controlled_moto import ControlledMoto, running, s3_client
from tfcluster.cloudinit.observe import policy, status
from tfcluster.cloudinit.observe.status import AgentReport, StatusRow
from tfcluster.discovery.agent_config import parse_agent_config
from tfcluster.discovery.records import Member
from tfcluster.discovery.report import PostTarget, Reporter, report_key, reporter_for
from tfcluster.discovery.waiting import wait_for

NOW = datetime(2026, 12, 3, 8, 0, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def moto() -> Iterator[ControlledMoto]:
    yield from running()


@pytest.fixture
def s3(moto: ControlledMoto) -> Any:
    return s3_client(moto.url)


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"tfc-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def signed_at(fields: dict[str, str]) -> datetime:
    """When the POST was signed: its x-amz-date field."""
    return datetime.strptime(fields["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)


# -- the policy document ----------------------------------------------------------------


def test_policy_pins_prefix_size_and_expiry(s3, bucket):
    post = policy.sign_post(s3, bucket, "reports/worker0/", expires_in=3600)
    terms = policy.policy_terms(post.fields)
    assert terms.bucket == bucket and terms.key_prefix == "reports/worker0/" and terms.key is None
    assert terms.size_range == policy.REPORT_SIZE == (1, 16 * 1024)
    assert 3599 <= (terms.expiration - signed_at(post.fields)).total_seconds() <= 3600
    assert post.expires_at == terms.expiration and not post.clamped
    assert post.fields["x-amz-algorithm"] == "AWS4-HMAC-SHA256"
    assert post.fields["key"] == "reports/worker0/${filename}"

    during = signed_at(post.fields) + timedelta(seconds=60)
    assert policy.allows(terms, "reports/worker0/report.json", 2000, during)
    assert not policy.allows(terms, "reports/worker1/report.json", 2000, during)
    assert not policy.allows(terms, "reports/worker0x/report.json", 2000, during)
    assert not policy.allows(terms, "output/model.ckpt", 2000, during)
    assert not policy.allows(terms, "reports/worker0/report.json", 16 * 1024 + 1, during)
    assert not policy.allows(terms, "reports/worker0/report.json", 0, during)
    assert not policy.allows(terms, "reports/worker0/report.json", 2000, terms.expiration)


def test_expiry_is_clamped_to_sigv4s_seven_days(s3, bucket):
    post = policy.sign_post(s3, bucket, "reports/ps0/", expires_in=30 * 24 * 3600)
    terms = policy.policy_terms(post.fields)
    seconds = (terms.expiration - signed_at(post.fields)).total_seconds()
    assert post.clamped and 7 * 24 * 3600 - 1 <= seconds <= 7 * 24 * 3600
    default = policy.sign_post(s3, bucket, "reports/ps0/")
    assert not default.clamped and default.expires_at >= post.expires_at


def test_a_role_policy_covers_every_task_of_the_role_only(s3, bucket):
    assert policy.report_prefix("worker") == "reports/worker"
    assert policy.report_prefix("worker3") == "reports/worker3/"
    with pytest.raises(ValueError, match="not an agent label or role"):
        policy.report_prefix("gpu0")
    terms = policy.policy_terms(policy.sign_post(s3, bucket, "reports/worker").fields)
    during = datetime.now(timezone.utc)
    assert policy.allows(terms, report_key("worker0"), 100, during)
    assert policy.allows(terms, report_key("worker17"), 100, during)
    assert not policy.allows(terms, report_key("ps0"), 100, during)
    assert not policy.allows(terms, report_key("chief0"), 100, during)


def test_a_client_that_does_not_sign_with_sigv4_is_refused(moto, bucket):
    with pytest.raises(ValueError, match="signature_version='s3v4'"):
        policy.sign_post(s3_client(moto.url, signature="s3"), bucket, "reports/ps0/")


def test_a_global_bucket_url_for_another_region_is_refused():
    """A new bucket outside us-east-1 answers its global name with a 307, which
    a POST does not follow. Signing is local: these clients send nothing."""

    def client(config: Config) -> Any:
        return boto3.client(
            "s3",
            region_name="eu-west-1",
            aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
            aws_secret_access_key="testing",
            config=config,
        )

    with pytest.raises(ValueError, match="global name"):
        policy.sign_post(client(Config(signature_version="s3v4")), "tfc-demo", "reports/ps0/")
    post = policy.sign_post(client(policy.SIGNING_CONFIG), "tfc-demo", "reports/ps0/")
    assert post.url == "https://tfc-demo.s3.eu-west-1.amazonaws.com/"


def test_empty_prefix_and_bad_sizes_are_refused(s3, bucket):
    with pytest.raises(ValueError, match="whole bucket"):
        policy.sign_post(s3, bucket, "")
    with pytest.raises(ValueError, match="content-length-range"):
        policy.sign_post(s3, bucket, "reports/ps0/", size=(10, 5))


def test_a_tampered_policy_reads_as_what_it_says_not_what_was_signed():
    """The decoder reads the document; it is S3 that checks the signature. An
    unreadable document is an error, not an empty policy."""
    with pytest.raises(ValueError, match="no policy"):
        policy.policy_terms({"key": "reports/"})
    with pytest.raises(ValueError, match="not base64 JSON"):
        policy.policy_terms({"policy": "%%%"})


def test_report_post_config_is_what_the_agent_config_reads(s3, bucket):
    value = policy.report_post_config(s3, bucket, ["chief0", "ps", "worker0", "worker1"])
    config = parse_agent_config(
        {
            "cluster": "demo",
            "zone": "tensorflow.local",
            "roles": {"chief": 1, "ps": 2, "worker": 2},
            "role": "ps",
            "etcd_endpoints": ["http://10.0.1.23:2379"],
            "report_post": value,
        }
    )
    assert config.report_post is not None and config.report_post.url == value["url"]
    ps1 = config.report_post.fields_for(Member("ps", 1))
    assert ps1 == value["fields"]["ps"]
    assert policy.policy_terms(ps1).key_prefix == "reports/ps"
    worker1 = config.report_post.fields_for(Member("worker", 1))
    assert worker1 is not None
    assert policy.policy_terms(worker1).key_prefix == "reports/worker1/"


# -- status: reports written by real writers, read back ---------------------------------


def write_report(url: str, post: Any, label: str, steps: Any) -> None:
    """One agent's reporter, driven through ``steps(reporter)``, flushed and stopped."""
    reporter = Reporter(PostTarget(post.url, post.fields), label, heartbeat=3600)
    steps(reporter)
    reporter.start()
    assert reporter.stop(timeout=10), f"{label}'s report was not written"


def test_status_rows_from_the_bucket(moto, s3, bucket):
    url, posts = policy.report_posts(s3, bucket, ["chief0", "ps0", "worker0"])
    assert url == f"{moto.url}/{bucket}"

    def chief(r: Reporter) -> None:
        r.identity("i-0000000000000chief", "10.0.1.10", "chief0.tensorflow.local")
        for state in ("CLAIM", "BARRIER", "CONFIGURE", "SERVE"):
            r.state(state)
        r.tensorflow(program=True, running=True, pid=10)
        r.log_line("step 10 loss 0.25")

    def ps(r: Reporter) -> None:
        r.identity("i-00000000000000ps0", "10.0.1.11", "ps0.tensorflow.local")
        for state in ("CLAIM", "BARRIER", "CONFIGURE", "SERVE"):
            r.state(state)
        r.tensorflow(program=False, running=True, pid=11)

    def worker(r: Reporter) -> None:
        r.identity("i-00000000000worker0", "10.0.1.12", "worker0.tensorflow.local")
        r.state("CLAIM")
        r.state("BARRIER")
        r.barrier(3, 4, ["worker1"])

    for label, steps in (("chief0", chief), ("ps0", ps), ("worker0", worker)):
        write_report(moto.url, posts[label], label, steps)
    # Not reports: other keys under reports/, and one report that is not JSON.
    s3.put_object(Bucket=bucket, Key="reports/notes.txt", Body=b"x")
    s3.put_object(Bucket=bucket, Key="reports/worker0/old.json", Body=b"{}")
    s3.put_object(Bucket=bucket, Key="reports/ps1/report.json", Body=b"not json")
    expected = ["chief0", "ps0", "ps1", "worker0", "worker1"]

    moto.clear()
    reports = status.read_reports(s3, bucket)
    assert moto.calls["ListObjectsV2"] == 1 and moto.calls["GetObject"] == 4
    rows = status.status_rows(reports, expected=expected)
    assert [r.name for r in rows] == expected
    by = {r.name: r for r in rows}
    assert by["chief0"].state == "SERVE" and by["chief0"].program == "running"
    assert by["chief0"].log == ("step 10 loss 0.25",)
    assert by["ps0"].program == "serving" and by["ps0"].address == "10.0.1.11"
    assert by["worker0"].state == "BARRIER" and by["worker0"].program == "-"
    assert by["ps1"].state == "UNREADABLE" and by["ps1"].detail.startswith("unreadable")
    assert by["worker1"].state == status.NO_REPORT and by["worker1"].age is None
    assert all(r.age is not None and r.age < 60 and not r.stale for r in rows[:2])

    table = status.format_table(rows).splitlines()
    assert table[0].split() == ["NAME", "INSTANCE", "ADDRESS", "STATE", "HEARTBEAT", "PROGRAM"]
    assert table[1].split()[:4] == ["chief0", "i-0000000000000chief", "10.0.1.10", "SERVE"]
    assert table[5].split() == ["worker1", "-", "-", "NO", "REPORT", "-", "-"]
    document = json.loads(json.dumps(status.rows_json(rows)))
    assert [item["name"] for item in document] == expected
    assert document[0]["state"] == "SERVE" and "log" not in document[0]
    assert status.rows_json(rows, log=True)[0]["log"] == ["step 10 loss 0.25"]

    progress = status.progress(rows, expected)
    assert (progress.expected, progress.reporting, progress.claimed) == (5, 3, 3)
    assert (progress.barrier_passed, progress.serving, progress.ready) == (2, 2, False)


def test_a_bucket_that_is_not_there_is_an_error_not_an_empty_cluster(s3):
    with pytest.raises(s3.exceptions.NoSuchBucket):
        status.read_reports(s3, "tfc-no-such-bucket")


def test_an_empty_bucket_has_no_reports(s3, bucket):
    assert status.read_reports(s3, bucket) == []


def test_a_report_written_through_the_agent_config(moto, s3, bucket):
    """The whole hand-over: policy signed per role, carried in the agent
    config, used by the agent's reporter, read back by status."""
    value = policy.report_post_config(s3, bucket, ["worker"])
    config = parse_agent_config(
        {
            "cluster": "demo",
            "zone": "tensorflow.local",
            "roles": {"ps": 1, "worker": 3},
            "role": "worker",
            "etcd_endpoints": ["http://10.0.1.23:2379"],
            "report_post": value,
            "report_heartbeat": 5,
        }
    )
    reporter = reporter_for(config, Member("worker", 2))
    reporter.state("CLAIM")
    reporter.start()
    try:
        wait_for(
            lambda: status.read_reports(s3, bucket) or None,
            what="worker2's report in the bucket",
            timeout=20,
        )
    finally:
        reporter.stop(timeout=5)
    (row,) = status.status_rows(status.read_reports(s3, bucket))
    assert row.name == "worker2" and row.state == "CLAIM"


# -- staleness and words: pure ------------------------------------------------------------


def report(name: str, age: float, **doc: Any) -> AgentReport:
    return AgentReport(
        name, report_key(name), NOW - timedelta(seconds=age), {"state": "SERVE", **doc}
    )


def test_a_heartbeat_older_than_three_intervals_is_stale():
    rows = status.status_rows(
        [
            report("worker0", 44, heartbeat=15),
            report("worker1", 46, heartbeat=15),
            report("worker2", 16, heartbeat=5),
            report("worker3", 46),  # no interval in the report: the default, 15 s
            report("chief0", 3600, heartbeat=15, exit={"code": 0, "message": "done"}),
        ],
        NOW,
    )
    stale = {r.name: r.stale for r in rows}
    assert stale == {
        "chief0": False,
        "worker0": False,
        "worker1": True,
        "worker2": True,
        "worker3": True,
    }
    assert "46s STALE" in status.format_table(rows)
    assert rows[0].exit_code == 0 and rows[0].detail == "done"


def test_program_words():
    assert status.program_state(None) == "-"
    assert status.program_state({"kind": "server", "running": True}) == "serving"
    assert status.program_state({"kind": "program", "running": True}) == "running"
    assert status.program_state({"kind": "program", "running": False, "exit_code": 0}) == "exited 0"
    failed = {"kind": "program", "running": False, "exit_code": 3}
    assert status.program_state(failed) == "failed (exit 3)"


def test_progress_counts_what_each_agent_has_been_through():
    def row(name: str, state: str, states: tuple[str, ...], program: str = "-", code: Any = None):
        return StatusRow(name, None, None, None, state, 1.0, False, program, code, "", (), states)

    rows = [
        row("chief0", "STOP", ("CLAIM", "BARRIER", "CONFIGURE", "SERVE", "STOP"), "exited 0", 0),
        row("ps0", "SERVE", ("CLAIM", "BARRIER", "CONFIGURE", "SERVE"), "serving"),
        row("worker0", "STOP", ("CLAIM", "BARRIER", "STOP"), "-", 5),
        row("worker1", "CLAIM", ("STARTING", "CLAIM")),
    ]
    p = status.progress(rows, ["chief0", "ps0", "worker0", "worker1", "worker2"])
    assert (p.expected, p.reporting, p.claimed, p.barrier_passed, p.serving) == (5, 4, 3, 2, 2)
    assert p.failed == ("worker0",) and not p.ready
    done = status.progress(rows[:2], ["chief0", "ps0"])
    assert done.ready
