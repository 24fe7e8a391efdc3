"""The agent's report writer against a real S3 API (moto on loopback): reports
arrive under the agent's prefix, the agent is never held up by the bucket,
writes are paced and coalesced, and they resume when the bucket is back."""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import boto3
import pytest

from controlled_moto import ControlledMoto, s3_client
from tfcluster.cloudinit.observe.policy import SIGNING_CONFIG, allows, policy_terms, sign_post
from tfcluster.discovery.agent_config import ConfigError, dump_agent_config, parse_agent_config
from tfcluster.discovery.records import Member
from tfcluster.discovery.report import (
    LOG_BYTES,
    LOG_LINES,
    LogTail,
    Pacer,
    PostTarget,
    Reporter,
    encode_post,
    report_key,
    reporter_for,
)
from tfcluster.discovery.waiting import wait_for

FAST = {"backoff_first": 1.0, "backoff_max": 1.0}
"""Retries once a second (the floor): outage tests stay short."""


# -- fixtures ------------------------------------------------------------------------


def target(url: str, bucket: str, label: str, **options: Any) -> PostTarget:
    post = sign_post(s3_client(url), bucket, f"reports/{label}/", **options)
    return PostTarget(post.url, post.fields)


def stored(url: str, bucket: str, label: str) -> dict[str, Any] | None:
    """The report in the bucket, or None."""
    s3 = s3_client(url)
    try:
        body = s3.get_object(Bucket=bucket, Key=report_key(label))["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    return json.loads(body)


def wait_stored(url: str, bucket: str, label: str, what: str, check: Any) -> dict[str, Any]:
    """Wait until the stored report satisfies ``check``."""

    def ready() -> dict[str, Any] | None:
        doc = stored(url, bucket, label)
        return doc if doc is not None and check(doc) else None

    return wait_for(ready, what=f"{label}'s report in the bucket to show {what}", timeout=20)


@pytest.fixture
def reporters() -> Iterator[list[Reporter]]:
    """Reporters a test made; stopped afterwards so no writer thread outlives it."""
    made: list[Reporter] = []
    yield made
    for reporter in made:
        reporter.stop(timeout=2)


# -- pacing (a clock passed in, no sleeping) -----------------------------------------


def drive(pacer: Pacer, until: float, changes: list[float], ok: bool = True) -> list[float]:
    """Run the pacer on a simulated clock: changes at the given times, every
    write taking no time; returns when writes started."""
    pending = sorted(changes)
    starts: list[float] = []
    now = 0.0
    while now <= until:
        while pending and pending[0] <= now:
            pending.pop(0)
            pacer.change()
        if pacer.next_write() <= now:
            pacer.begin(now)
            starts.append(now)
            pacer.end(now, ok)
        now = round(now + 0.01, 2)
    return starts


def test_first_write_at_once_then_heartbeats():
    starts = drive(Pacer(15), until=61, changes=[])
    assert starts == [0.0, 15.0, 30.0, 45.0, 60.0]


def test_a_burst_of_changes_coalesces_to_one_write_a_second():
    changes = [i / 100 for i in range(1, 1000)]  # 999 changes in 10 s
    starts = drive(Pacer(15), until=10, changes=changes)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) == 11 and min(gaps) >= 1.0
    # The last change is written: after 10 s nothing is pending.
    pacer = Pacer(15)
    drive(pacer, until=11, changes=changes)
    assert not pacer.pending()


def test_a_change_is_written_as_soon_as_a_second_has_passed():
    starts = drive(Pacer(15), until=20, changes=[0.3, 5.0, 5.2, 5.9])
    assert starts == [0.0, 1.0, 5.0, 6.0]  # 5.9 rides with 5.2's write; next heartbeat at 21


def test_heartbeat_below_a_second_is_raised_to_one():
    assert Pacer(0.1).heartbeat == 1.0
    assert Pacer(15, min_interval=0.01).min_interval == 1.0


def test_failures_back_off_exponentially_capped_and_reset_on_success():
    pacer = Pacer(15)
    now, waits = 0.0, []
    for _ in range(8):
        pacer.begin(now)
        pacer.end(now, ok=False)
        waits.append(pacer.next_write() - now)
        now = pacer.next_write()
    assert waits == [2, 4, 8, 16, 32, 60, 60, 60]
    pacer.change()  # a change does not jump the backoff
    assert pacer.next_write() == now
    pacer.begin(now)
    pacer.end(now, ok=True)
    assert pacer.next_write() == now + 15 and pacer.failures == 0


def test_when_stopping_retries_ignore_backoff_but_keep_the_second():
    pacer = Pacer(15)
    for now in (0.0, 2.0, 6.0):
        pacer.begin(now)
        pacer.end(now, ok=False)
    assert pacer.next_write() == 6.0 + 8
    pacer.final = True
    assert pacer.next_write() == 7.0


def request_bytes(post: PostTarget, label: str, lines: int, width: int) -> tuple[int, int]:
    """(report size, HTTP request size) of one write with ``lines`` log lines of ``width``."""
    reporter = Reporter(None, label)
    reporter.identity("i-0123456789abcdef0", "10.0.1.12", f"{label}.tensorflow.local")
    reporter.state("SERVE")
    reporter.tensorflow(program=False, running=True, pid=4242)
    for i in range(lines):
        reporter.log_line(
            f"2026-12-03 08:00:00,123 INFO tfcluster.agent: {i:04d} ".ljust(width, "x")
        )
    doc = reporter.snapshot()
    doc.update(seq=240, time=1.8e9)
    report = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    body, content_type = encode_post(post.fields, report_key(label), report)
    host = post.url.split("/")[2]
    headers = (  # what urllib sends before the body
        f"POST / HTTP/1.1\r\nAccept-Encoding: identity\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nHost: {host}\r\nUser-Agent: Python-urllib/3.11\r\n"
        "Connection: close\r\n\r\n"
    )
    return len(report), len(body) + len(headers)


def test_traffic_per_agent_hour():
    """The figures for the note: one agent at the default heartbeat with the
    state changes of a normal start (six in its first minute). The POST is
    signed as ``up`` would sign it for a real bucket (signing is local)."""
    starts = drive(Pacer(), until=3600 - 0.01, changes=[0.1, 0.5, 2.0, 20.0, 20.2, 25.0])
    assert 240 <= len(starts) <= 246
    s3 = boto3.client(
        "s3",
        region_name="eu-west-1",
        aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        config=SIGNING_CONFIG,
    )
    signed = sign_post(s3, "tfc-demo-123456789012-eu-west-1", "reports/worker12/")
    assert signed.url == "https://tfc-demo-123456789012-eu-west-1.s3.eu-west-1.amazonaws.com/"
    post = PostTarget(signed.url, signed.fields)
    response = 350  # S3's 204 answer: status line, request ids, ETag, Location, Date, Server
    figures = []
    for case, lines, width in (("quiet", 10, 80), ("full tail", LOG_LINES, 200)):
        report, request = request_bytes(post, "worker12", lines, width)
        per_hour = len(starts) * (request + response)
        figures.append(
            f"{case}: report {report} B, request {request} B, "
            f"{len(starts)} POSTs = {per_hour / 1024:.0f} KiB/h up+down"
        )
        assert report <= 16 * 1024  # within the policy's content-length-range
        assert request < 12 * 1024
    print("\nreport traffic per agent-hour at 15 s: " + "; ".join(figures))


# -- the log tail --------------------------------------------------------------------


def test_log_tail_keeps_the_newest_lines_within_its_bounds():
    tail = LogTail()
    for i in range(200):
        tail.add(f"line {i}")
    lines, total = tail.snapshot()
    assert lines == [f"line {i}" for i in range(150, 200)] and total == 200
    for i in range(40):
        tail.add(f"{i:03d}" + "x" * 1000)
    lines, total = tail.snapshot()
    assert sum(len(line) + 1 for line in lines) <= LOG_BYTES
    assert all(len(line) == 500 and line.endswith("...") for line in lines)
    assert lines[-1].startswith("039") and total == 240


def test_log_tail_is_a_logging_handler():
    tail = LogTail()
    logger = logging.getLogger("tfcluster.test.report.tail")
    logger.addHandler(tail)
    logger.setLevel(logging.INFO)
    try:
        logger.warning("two\nlines")
        logger.debug("below the level")
    finally:
        logger.removeHandler(tail)
    lines, _ = tail.snapshot()
    assert len(lines) == 2 and lines[0].endswith("WARNING tfcluster.test.report.tail: two")
    assert lines[1] == "lines"


# -- the POST itself -----------------------------------------------------------------


def test_post_body_is_multipart_with_signed_fields_first_and_the_file_last():
    fields = {"key": "reports/ps0/${filename}", "policy": "cG9saWN5", "x-amz-signature": "ab"}
    body, content_type = encode_post(fields, "reports/ps0/report.json", b'{"state":"SERVE"}')
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    parts = [(p.get_param("name", header="content-disposition"), p) for p in message.iter_parts()]
    assert [name for name, _ in parts] == ["key", "policy", "x-amz-signature", "file"]
    assert parts[0][1].get_content().strip() == "reports/ps0/report.json"
    assert parts[-1][1].get_content() == b'{"state":"SERVE"}'
    assert parts[-1][1].get_content_type() == "application/json"


def test_reports_arrive_under_the_agents_prefix(moto, bucket, reporters):
    post = target(moto.url, bucket, "worker0")
    reporter = Reporter(post, "worker0", heartbeat=3600)
    reporters.append(reporter)
    reporter.identity("i-0123456789abcdef0", "10.0.1.5", "worker0.tensorflow.local")
    reporter.state("BARRIER")
    reporter.barrier(2, 4, ["worker1", "ps0"])
    for i in range(3):
        reporter.log_line(f"barrier: waiting ({i})")
    reporter.start()
    doc = wait_stored(moto.url, bucket, "worker0", "state BARRIER", lambda d: True)
    assert doc["state"] == "BARRIER" and doc["name"] == "worker0" and doc["seq"] == 1
    assert doc["instance_id"] == "i-0123456789abcdef0" and doc["address"] == "10.0.1.5"
    assert doc["dns_name"] == "worker0.tensorflow.local"
    assert doc["barrier"] == {
        "seen": 2,
        "expected": 4,
        "missing": ["ps0", "worker1"],
        "missing_count": 2,
    }
    assert doc["log"][-1] == "barrier: waiting (2)" and doc["log_total"] == 3
    assert [h[0] for h in doc["history"]] == ["STARTING", "BARRIER"]

    reporter.tensorflow(program=False, running=True, pid=4242)
    reporter.state("SERVE")
    doc = wait_stored(moto.url, bucket, "worker0", "state SERVE", lambda d: d["state"] == "SERVE")
    assert doc["tensorflow"] == {"kind": "server", "running": True, "exit_code": None, "pid": 4242}

    # Everything written sits under the prefix the policy allows, within its size.
    terms = policy_terms(post.fields)
    objects = s3_client(moto.url).list_objects_v2(Bucket=bucket)["Contents"]
    assert [o["Key"] for o in objects] == ["reports/worker0/report.json"]
    now = datetime.now(timezone.utc)
    assert all(allows(terms, o["Key"], o["Size"], now) for o in objects)


def test_a_policy_for_another_agent_is_named_at_start(moto, bucket, reporters, caplog):
    """moto would take the write; S3 would refuse it. The agent says so at once."""
    reporter = Reporter(target(moto.url, bucket, "worker0"), "worker1", heartbeat=3600)
    reporters.append(reporter)
    with caplog.at_level(logging.ERROR, logger="tfcluster.discovery.report"):
        reporter.start()
    assert "allows keys under reports/worker0/ only, not reports/worker1/report.json" in caplog.text
    own = Reporter(target(moto.url, bucket, "worker2"), "worker2", heartbeat=3600)
    reporters.append(own)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="tfcluster.discovery.report"):
        own.start()
    assert "allows keys" not in caplog.text


def test_a_report_is_cut_to_the_policys_size_limit(moto, bucket, reporters):
    post = target(moto.url, bucket, "ps0", size=(1, 2048))
    reporter = Reporter(post, "ps0", heartbeat=3600)
    reporters.append(reporter)
    assert reporter.max_bytes == 2048
    for i in range(LOG_LINES):
        reporter.log_line(f"{i:02d} " + "y" * 120)
    reporter.state("SERVE")
    reporter.start()
    wait_stored(moto.url, bucket, "ps0", "a report", lambda d: True)
    obj = s3_client(moto.url).head_object(Bucket=bucket, Key=report_key("ps0"))
    doc = stored(moto.url, bucket, "ps0")
    assert doc is not None and obj["ContentLength"] <= 2048
    assert 0 < len(doc["log"]) < LOG_LINES and doc["log"][-1].startswith("49 ")
    assert doc["log_total"] == LOG_LINES


# -- never in the agent's way ----------------------------------------------------------


def test_the_agent_is_not_held_up_by_an_upload_that_hangs(moto, bucket, reporters):
    """The writer's first upload is held by the server. Meanwhile the agent's
    calls all complete: they cannot be waiting on the network, because the one
    request in flight has not been answered when they are done. Afterwards the
    state changes made during the hang are coalesced into one write."""
    hold = moto.hold("PostObject", before=True)
    reporter = Reporter(target(moto.url, bucket, "chief0"), "chief0", heartbeat=3600, timeout=60)
    reporters.append(reporter)
    reporter.start()
    hold.wait_reached()
    durations: list[float] = []

    def agent_work() -> None:
        for i in range(500):
            t0 = time.perf_counter()
            reporter.state("BARRIER" if i % 2 else "CLAIM")
            reporter.barrier(i, 500, [f"worker{i}"])
            reporter.log_line(f"work {i}")
            durations.append(time.perf_counter() - t0)
        reporter.state("SERVE")
        reporter.tensorflow(program=True, running=True)

    agent = threading.Thread(target=agent_work)
    agent.start()
    agent.join(timeout=30)  # bound only for a failure: the calls must not wait
    assert not agent.is_alive(), "agent calls blocked while an upload hung"
    assert reporter.in_flight and not hold.released.is_set() and moto.calls["PostObject"] == 1
    print(f"\nagent-side calls while the upload hung: max {max(durations) * 1e3:.2f} ms")

    hold.release()
    doc = wait_stored(moto.url, bucket, "chief0", "state SERVE", lambda d: d["state"] == "SERVE")
    assert doc["tensorflow"]["kind"] == "program" and doc["barrier"]["seen"] == 499
    assert doc["seq"] == 2 and moto.calls["PostObject"] == 2  # 1001 changes, one write


def test_reports_resume_when_the_bucket_comes_back(reporters):
    """The bucket's endpoint refuses connections (bound, not listening), then
    answers; the agent goes on through the outage, and its reports resume."""
    server = ControlledMoto()
    url = server.reserve()
    try:
        s3 = s3_client(url)  # signing needs no server
        post = sign_post(s3, "tfc-outage", "reports/worker1/")
        tail = LogTail()
        logging.getLogger("tfcluster.discovery.report").addHandler(tail)
        reporter = Reporter(
            PostTarget(post.url, post.fields),
            "worker1",
            heartbeat=3600,
            tail=tail,
            pacer=Pacer(3600, **FAST),
        )
        reporters.append(reporter)
        reporter.state("CLAIM")
        reporter.start()
        wait_for(
            lambda: reporter.writes_failed >= 2 or None,
            what="two refused report writes",
            timeout=20,
        )
        assert reporter.writes_ok == 0 and "Connection refused" in (reporter.last_error or "")
        reporter.state("BARRIER")
        reporter.state("SERVE")  # the agent goes on meanwhile

        server.start()
        assert server.url == url
        s3.create_bucket(Bucket="tfc-outage")
        doc = wait_stored(url, "tfc-outage", "worker1", "SERVE", lambda d: d["state"] == "SERVE")
        assert [h[0] for h in doc["history"]] == ["STARTING", "CLAIM", "BARRIER", "SERVE"]
        assert any("not written" in line for line in doc["log"])  # the outage, in its log
        wait_for(lambda: reporter.writes_ok or None, what="the writer's success", timeout=20)
        assert reporter.last_error is None
    finally:
        logging.getLogger("tfcluster.discovery.report").removeHandler(tail)
        server.stop()


def test_s3_errors_are_retried_and_named(moto, bucket, reporters):
    moto.fail("PostObject", "ServiceUnavailable", times=1, status=503)
    moto.fail("PostObject", "AccessDenied", times=1, status=403)
    reporter = Reporter(
        target(moto.url, bucket, "ps1"), "ps1", heartbeat=3600, pacer=Pacer(3600, **FAST)
    )
    reporters.append(reporter)
    reporter.state("CLAIM")
    reporter.start()
    doc = wait_stored(moto.url, bucket, "ps1", "a report", lambda d: True)
    wait_for(lambda: reporter.writes_ok or None, what="the writer to see its success", timeout=20)
    assert doc["state"] == "CLAIM" and reporter.writes_failed == 2
    assert moto.log.count("PostObject") == 3


def test_s3_error_messages_name_status_and_code(moto, bucket, reporters):
    moto.fail("PostObject", "AccessDenied", times=100, status=403)
    reporter = Reporter(target(moto.url, bucket, "ps2"), "ps2", heartbeat=3600)
    reporters.append(reporter)
    reporter.start()
    wait_for(lambda: reporter.writes_failed or None, what="a refused write", timeout=20)
    assert reporter.last_error == "HTTP 403 AccessDenied: injected by the test"


# -- stopping --------------------------------------------------------------------------


def test_stop_flushes_the_final_state(moto, bucket, reporters):
    reporter = Reporter(target(moto.url, bucket, "chief0"), "chief0", heartbeat=3600)
    reporter.start()
    wait_stored(moto.url, bucket, "chief0", "a first report", lambda d: True)
    reporter.tensorflow(program=True, running=False, exit_code=0)
    reporter.finished(0, "chief0 finished")
    reporter.state("STOP")
    assert reporter.stop(timeout=10) is True
    doc = stored(moto.url, bucket, "chief0")
    assert doc is not None and doc["state"] == "STOP"
    assert doc["exit"] == {"code": 0, "message": "chief0 finished"}
    assert doc["tensorflow"]["exit_code"] == 0


def test_stop_returns_by_its_deadline_when_the_upload_hangs(moto, bucket, reporters):
    hold = moto.hold("PostObject", before=True)
    reporter = Reporter(target(moto.url, bucket, "worker3"), "worker3", timeout=60)
    reporter.start()
    hold.wait_reached()
    reporter.state("STOP")
    t0 = time.monotonic()
    assert reporter.stop(timeout=0.5) is False
    elapsed = time.monotonic() - t0
    assert not hold.released.is_set()  # it returned while the upload still hung
    assert elapsed < 10, f"stop took {elapsed:.1f} s"
    hold.release()


def test_an_expired_policy_stops_the_reports_not_the_agent(moto, bucket, reporters):
    post = target(moto.url, bucket, "worker4", expires_in=3600)
    later = time.time() + 2 * 3600
    reporter = Reporter(post, "worker4", wall=lambda: later)
    reporters.append(reporter)
    reporter.start()
    wait_for(lambda: reporter.policy_expired or None, what="the expiry to be seen", timeout=20)
    reporter.state("SERVE")  # the agent's calls still work
    assert reporter.stop(timeout=2) is False
    assert moto.calls["PostObject"] == 0


def test_without_a_target_nothing_is_written_and_nothing_waits():
    reporter = Reporter(None, "ps0")
    reporter.start()
    reporter.state("SERVE")
    assert reporter.snapshot()["state"] == "SERVE"
    assert reporter.stop(timeout=5) is False and reporter.writes_ok == 0


# -- the agent config ------------------------------------------------------------------

BASE = {
    "cluster": "demo",
    "zone": "tensorflow.local",
    "roles": {"chief": 1, "ps": 1, "worker": 2},
    "role": "worker",
    "etcd_endpoints": ["http://10.0.1.23:2379"],
}
FORM = {"key": "reports/worker0/${filename}", "policy": "e30=", "x-amz-signature": "ab"}
ROLE_FORM = {"key": "reports/worker${filename}", "policy": "e30=", "x-amz-signature": "cd"}


def test_report_keys_are_optional_and_round_trip():
    plain = parse_agent_config(BASE)
    assert plain.report_post is None and plain.report_heartbeat == 15
    assert "report_post" not in dump_agent_config(plain)
    data = {
        **BASE,
        "report_post": {
            "url": "https://b.s3.amazonaws.com/",
            "fields": {"worker0": FORM, "worker": ROLE_FORM},
        },
        "report_heartbeat": 30,
    }
    config = parse_agent_config(data)
    assert parse_agent_config(dump_agent_config(config)) == config
    assert dump_agent_config(config)["report_post"] == data["report_post"]
    assert config.report_post is not None
    assert config.report_post.fields_for(Member("worker", 0)) == FORM
    assert config.report_post.fields_for(Member("worker", 1)) == ROLE_FORM  # the role's
    assert config.report_post.fields_for(Member("ps", 0)) is None
    worker1 = reporter_for(config, Member("worker", 1))
    assert worker1.target is not None and worker1.target.fields == ROLE_FORM
    assert worker1.key == "reports/worker1/report.json" and worker1.pacer.heartbeat == 30
    assert reporter_for(config, Member("ps", 0)).target is None
    assert reporter_for(plain, Member("worker", 0)).target is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"url": "ftp://x/", "fields": {"worker0": FORM}}, "report_post.url: must be an http(s)"),
        ({"url": "https://x/"}, "report_post: must be an object with 'url' and 'fields'"),
        ({"url": "https://x/", "fields": {}}, "report_post.fields: must map"),
        ({"url": "https://x/", "fields": {"worker2": FORM}}, "report_post.fields: 'worker2' is"),
        ({"url": "https://x/", "fields": {"ps1": FORM}}, "report_post.fields: 'ps1' is no"),
        ({"url": "https://x/", "fields": {"gpu": FORM}}, "report_post.fields: 'gpu' is no"),
        ({"url": "https://x/", "fields": {"worker0": {"key": "k"}}}, "report_post.fields.worker0"),
        ({"url": "https://x/", "fields": {"worker0": {**FORM, "n": 1}}}, "report_post.fields.w"),
    ],
)
def test_bad_report_post_is_one_line_naming_the_key(value, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)) as caught:
        parse_agent_config({**BASE, "report_post": value})
    assert "\n" not in str(caught.value)


def test_report_heartbeat_is_checked():
    with pytest.raises(ConfigError, match=r"^report_heartbeat: must be an integer from 1 to 3600"):
        parse_agent_config({**BASE, "report_heartbeat": 0})


def test_the_report_writer_loads_no_operator_code():
    probe = "import sys, tfcluster.discovery.report; print(sorted(sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = result.stdout
    for name in ("'boto3'", "'botocore'", "'tfcluster.cloudinit'", "'jinja2'", "'yaml'"):
        assert name not in loaded
    assert "'tfcluster.discovery.report'" in loaded
