"""The chief's outputs against a real S3 API (moto on loopback): the uploader
sends changed files only, streams large ones, writes the completion marker,
retries within its deadline; the output policy read from the signed document;
the agent config's output and on_chief_exit keys."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import boto3
import pytest

from controlled_moto import ControlledMoto, s3_client
from tfcluster.cloudinit.observe.policy import (
    OUTPUT_SIZE,
    SIGNING_CONFIG,
    allows,
    output_post_config,
    policy_terms,
    sign_post,
)
from tfcluster.discovery import output
from tfcluster.discovery.agent_config import ConfigError, dump_agent_config, parse_agent_config
from tfcluster.discovery.output import MARKER_KEY, OutputUploader
from tfcluster.discovery.records import Member
from tfcluster.discovery.report import PostTarget, ReportWriteError, post_file
from tfcluster.discovery.waiting import wait_for


def output_target(url: str, bucket: str, **options: Any) -> PostTarget:
    post = output_post_config(s3_client(url), bucket, **options)
    return PostTarget(post["url"], post["fields"]["chief"])


def objects(url: str, bucket: str) -> dict[str, bytes]:
    s3 = s3_client(url)
    listed = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the policy ------------------------------------------------------------------------


def test_the_output_policy_pins_the_prefix_a_size_range_and_the_expiry():
    """Signed as ``up`` signs it for a real bucket (signing is local); read back
    from the signed document, since moto checks none of it."""
    s3 = boto3.client(
        "s3",
        region_name="eu-west-1",
        aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        config=SIGNING_CONFIG,
    )
    before = datetime.now(timezone.utc)
    value = output_post_config(s3, "tfc-demo-bucket", expires_in=3600)
    assert value["url"] == "https://tfc-demo-bucket.s3.eu-west-1.amazonaws.com/"
    assert set(value["fields"]) == {"chief"}
    terms = policy_terms(value["fields"]["chief"])
    assert terms.key_prefix == "output/" and terms.bucket == "tfc-demo-bucket"
    assert terms.size_range == OUTPUT_SIZE == (0, 5 * 1024**3)
    assert before + timedelta(seconds=3590) <= terms.expiration
    assert terms.expiration <= datetime.now(timezone.utc) + timedelta(seconds=3601)
    now = datetime.now(timezone.utc)
    assert allows(terms, "output/checkpoint/ckpt-1.index", 0, now)
    assert allows(terms, MARKER_KEY, 2000, now)
    assert not allows(terms, "reports/chief0/report.json", 100, now)
    assert not allows(terms, "outputs/x", 100, now)
    assert not allows(terms, "output/big", 5 * 1024**3 + 1, now)
    assert not allows(terms, "output/x", 100, terms.expiration)
    # Seven days at most, whatever is asked for.
    longest = policy_terms(output_post_config(s3, "b", expires_in=30 * 86400)["fields"]["chief"])
    assert longest.expiration <= datetime.now(timezone.utc) + timedelta(days=7, seconds=1)


def test_only_the_chief_gets_an_output_policy(moto, bucket):
    s3 = s3_client(moto.url)
    assert set(output_post_config(s3, bucket, ["chief0"])["fields"]) == {"chief0"}
    for names in (["worker"], ["chief", "ps0"], []):
        with pytest.raises(ValueError, match="outputs are uploaded by the chief only"):
            output_post_config(s3, bucket, names)


# -- the uploader ------------------------------------------------------------------------


def test_changed_files_only_then_a_marker_that_lists_them(moto, bucket, tmp_path):
    target = output_target(moto.url, bucket)
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("first\n")
    (out / "sub" / "b.bin").write_bytes(os.urandom(3000))
    (out / "empty").write_bytes(b"")
    told: list[dict[str, Any]] = []
    uploader = OutputUploader(target, out, interval=3600, progress=told.append)

    assert sorted(uploader.sync().uploaded) == ["a.txt", "empty", "sub/b.bin"]
    assert told[-1] == {"files": 3, "bytes": 3006, "complete": False, "error": None}
    assert moto.calls["PostObject"] == 3
    assert uploader.sync().uploaded == [] and moto.calls["PostObject"] == 3  # nothing changed
    (out / "a.txt").write_text("second, longer\n")
    assert uploader.sync().uploaded == ["a.txt"] and moto.calls["PostObject"] == 4

    (out / "empty").unlink()  # gone before the end: uploaded once, not listed
    assert uploader.finish(0, timeout=30) is True
    assert told[-1]["complete"] is True and told[-1]["error"] is None
    stored = objects(moto.url, bucket)
    assert stored["output/a.txt"] == b"second, longer\n"
    assert stored["output/sub/b.bin"] == (out / "sub" / "b.bin").read_bytes()
    marker = json.loads(stored[MARKER_KEY])
    assert marker["version"] == 1 and marker["complete"] is True and marker["exit_code"] == 0
    assert marker["files"] == [
        {"path": p, "size": len(stored[f"output/{p}"]), "sha256": sha256(stored[f"output/{p}"])}
        for p in ("a.txt", "sub/b.bin")
    ]
    assert marker["bytes"] == sum(f["size"] for f in marker["files"])
    assert marker["skipped"] == []
    terms = policy_terms(target.fields)
    now = datetime.now(timezone.utc)
    assert all(allows(terms, key, len(body), now) for key, body in stored.items())


def test_a_large_file_is_streamed_whole(moto, bucket, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    data = os.urandom(24 * 1024 * 1024)
    (out / "model.bin").write_bytes(data)
    uploader = OutputUploader(output_target(moto.url, bucket), out, interval=3600)
    assert uploader.sync().uploaded == ["model.bin"]
    assert uploader.done["model.bin"].sha256 == sha256(data)
    assert objects(moto.url, bucket)["output/model.bin"] == data


def test_a_file_that_shrinks_during_its_upload_fails_that_upload_only(moto, bucket, tmp_path):
    """The size is taken before the upload; fewer bytes on reading (the file was
    rewritten meanwhile) fail the upload at once instead of leaving S3 waiting."""
    path = tmp_path / "ckpt"
    path.write_bytes(b"x" * 100)
    target = output_target(moto.url, bucket)
    with pytest.raises(ReportWriteError, match=r"^100 bytes short: the file shrank"):
        post_file(target, "output/ckpt", path, 200, timeout=10)
    assert post_file(target, "output/ckpt", path, 100, timeout=10) == sha256(b"x" * 100)
    assert objects(moto.url, bucket) == {"output/ckpt": b"x" * 100}


def test_a_file_larger_than_the_policy_allows_is_named_not_sent(moto, bucket, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "small").write_bytes(b"x" * 100)
    (out / "big").write_bytes(b"x" * 101)
    (out / ".tfcluster-complete").write_text("the program's own file of the marker's name")
    uploader = OutputUploader(output_target(moto.url, bucket, size=(0, 100)), out, 3600)
    assert uploader.finish(0, timeout=30) is True
    stored = objects(moto.url, bucket)
    assert sorted(stored) == [MARKER_KEY, "output/small"]
    marker = json.loads(stored[MARKER_KEY])
    assert [f["path"] for f in marker["files"]] == ["small"]
    assert [(s["path"], s["size"]) for s in marker["skipped"]] == [
        (".tfcluster-complete", 43),
        ("big", 101),
    ]
    assert "larger than the policy allows (100 bytes)" in marker["skipped"][1]["reason"]


def test_the_final_upload_retries_until_the_bucket_answers(moto, bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(output, "RETRY_FIRST", 0.2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    moto.fail("PostObject", "ServiceUnavailable", times=2, status=503)
    uploader = OutputUploader(output_target(moto.url, bucket), out, interval=3600)
    assert uploader.finish(1, timeout=60) is True
    marker = json.loads(objects(moto.url, bucket)[MARKER_KEY])
    assert [f["path"] for f in marker["files"]] == ["metrics.json"] and marker["exit_code"] == 1


def test_the_final_upload_gives_up_by_its_deadline(tmp_path, monkeypatch):
    """The bucket's endpoint refuses connections (bound, not listening)."""
    monkeypatch.setattr(output, "RETRY_FIRST", 0.2)
    server = ControlledMoto()
    url = server.reserve()
    try:
        post = sign_post(s3_client(url), "tfc-nowhere", "output/")
        out = tmp_path / "out"
        out.mkdir()
        (out / "metrics.json").write_text("{}")
        uploader = OutputUploader(PostTarget(post.url, post.fields), out, interval=3600)
        t0 = time.monotonic()
        assert uploader.finish(0, timeout=2) is False
        assert time.monotonic() - t0 < 2 + 10  # the deadline, plus one upload's timeout
        assert "metrics.json" not in uploader.done
    finally:
        server.stop()


def test_periodic_passes_upload_what_appears_while_running(moto, bucket, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    uploader = OutputUploader(output_target(moto.url, bucket), out, interval=0.2)
    uploader.start()
    try:
        (out / "ckpt-1").write_bytes(b"one")
        wait_for(
            lambda: "output/ckpt-1" in objects(moto.url, bucket) or None,
            what="a periodic pass to upload ckpt-1",
            timeout=20,
        )
        assert MARKER_KEY not in objects(moto.url, bucket)  # not complete while running
    finally:
        uploader.stop()


# -- the agent config -------------------------------------------------------------------

BASE = {
    "cluster": "demo",
    "zone": "tensorflow.local",
    "roles": {"chief": 1, "ps": 1, "worker": 2},
    "role": "chief",
    "etcd_endpoints": ["http://10.0.1.23:2379"],
}
FORM = {"key": "output/${filename}", "policy": "e30=", "x-amz-signature": "ab"}


def test_output_and_chief_exit_keys_are_optional_and_round_trip():
    plain = parse_agent_config(BASE)
    assert plain.output_post is None and plain.output_dir == Path("/var/lib/tfcluster/output")
    assert plain.output_interval == 900 and plain.on_chief_exit == "keep"
    assert plain.shutdown_command == "shutdown"
    new_keys = {"output_post", "output_interval", "on_chief_exit", "shutdown_command"}
    assert not new_keys & set(dump_agent_config(plain))  # left out while they have their default
    assert dump_agent_config(plain)["output_dir"] == "/var/lib/tfcluster/output"
    data = {
        **BASE,
        "output_post": {"url": "https://b.s3.eu-west-1.amazonaws.com/", "fields": {"chief": FORM}},
        "output_dir": "/data/out",
        "output_interval": 60,
        "on_chief_exit": "down",
        "shutdown_command": "/usr/sbin/poweroff-now",
    }
    config = parse_agent_config(data)
    assert config.output_post is not None
    assert config.output_post.fields_for(Member("chief", 0)) == FORM
    assert config.output_dir == Path("/data/out") and config.on_chief_exit == "down"
    dumped = dump_agent_config(config)
    assert {k: dumped[k] for k in data} == data and parse_agent_config(dumped) == config


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("output_post", {"url": "s3://b", "fields": {"chief": FORM}}, "output_post.url: must be"),
        ("output_post", {"url": "https://x/", "fields": {"ps1": FORM}}, "output_post.fields:"),
        ("output_interval", 0, "output_interval: must be an integer from 1 to 2592000"),
        ("output_dir", "", "output_dir: must be a non-empty string"),
        ("on_chief_exit", "terminate", "on_chief_exit: must be 'keep' or 'down'"),
        ("shutdown_command", "shutdown -P now", "shutdown_command: must be a program name or"),
        ("shutdown_command", "rel/path", "shutdown_command: must be a program name or"),
    ],
)
def test_bad_output_keys_are_one_line_naming_the_key(key, value, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)) as caught:
        parse_agent_config({**BASE, key: value})
    assert "\n" not in str(caught.value)
