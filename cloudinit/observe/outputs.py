"""The chief's outputs in the cluster bucket: the POST it uploads them with,
``tfcluster fetch``, and what ``down`` needs to know before it deletes them.

The chief's agent uploads its program's output directory to
``output/<relpath>`` with a presigned POST for that prefix (signed here by
``up``, `policy.output_post_config`) and, once its program has exited and every
file is up, writes the completion marker ``output/.tfcluster-complete``
(discovery/output.py): ``{"files": [{"path", "size", "sha256"}, ...],
"skipped": [{"path", "size", "reason"}, ...], ...}``, the output folder as it
was at the end. With the marker, `fetch` downloads exactly the files it
lists and checks each one's SHA-256; objects it does not list are files the
program deleted after an upload (superseded checkpoints: a POST cannot
delete) and stay in the bucket. A listed file missing from the bucket, a
skipped file (too large for the policy) or no marker at all (the program
still runs, or died before its last upload) make the fetch partial.

"Fetched" must hold across machines (the operator who runs ``down`` may not
be the one who fetched), so it is an object of the bucket itself,
``tfcluster/fetched.json``: each output key with the ETag it had when it
was fetched. An output is unfetched when its key is not there or its ETag
changed since (the chief uploaded a newer checkpoint). No instance can write
there: the agents' policies allow ``reports/`` and ``output/`` only.

A bucket kept by ``down --keep-output`` carries the tag ``tfcluster:kept``
(when, ISO 8601); the next plain ``down`` leaves it, ``down --purge`` deletes it.

Every function takes a boto3 S3 client built by the caller; S3 failures are
raised as botocore's exceptions (the commands translate them).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import botocore.exceptions

from tfcluster.discovery.output import MARKER_KEY as COMPLETE_MARKER
from tfcluster.discovery.output import OUTPUT_PREFIX

FETCHED_KEY = "tfcluster/fetched.json"
TAG_KEPT = "tfcluster:kept"
_CHUNK = 1024 * 1024


class OutputError(ValueError):
    """An output cannot be fetched as it is (a key that leaves the folder, a bad checksum)."""


@dataclass(frozen=True)
class OutputObject:
    key: str
    size: int
    etag: str
    last_modified: datetime

    @property
    def relpath(self) -> str:
        return self.key[len(OUTPUT_PREFIX) :]


@dataclass(frozen=True)
class FetchResult:
    """What ``fetch`` brought back and whether it is the whole job's output."""

    files: tuple[str, ...]
    """Relative paths written under the destination, sorted."""
    bytes: int
    complete: bool
    """The completion marker was there and every file it names was fetched."""
    verified: int
    """Files whose SHA-256 matched the marker."""
    missing: tuple[str, ...] = ()
    """Files the marker names that the bucket does not hold."""
    skipped: tuple[str, ...] = ()
    """Files the marker says the chief could not upload (too large, a bad name)."""
    leftovers: int = 0
    """Objects under ``output/`` the marker does not list, left in the bucket."""


def list_outputs(s3: Any, bucket: str) -> list[OutputObject]:
    """Every object under ``output/``, the completion marker included."""
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=OUTPUT_PREFIX):
        for item in page.get("Contents", ()):
            found.append(
                OutputObject(
                    str(item["Key"]),
                    int(item.get("Size", 0)),
                    str(item.get("ETag", "")),
                    item["LastModified"],
                )
            )
    return sorted(found, key=lambda o: o.key)


def read_marker(s3: Any, bucket: str) -> Mapping[str, Any] | None:
    """The completion marker's JSON object, or None while there is none."""
    try:
        answer = s3.get_object(Bucket=bucket, Key=COMPLETE_MARKER)
    except s3.exceptions.NoSuchKey:
        return None
    with answer["Body"] as body:
        raw = body.read(_CHUNK)
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise OutputError(f"the completion marker {COMPLETE_MARKER} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise OutputError(f"the completion marker {COMPLETE_MARKER} is not a JSON object")
    return doc


def _entries(marker: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    entries = marker.get(key)
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("path"), str) for e in entries
    ):
        raise OutputError(f"the completion marker's {key!r} is not a list of files with a path")
    return entries


def marker_files(marker: Mapping[str, Any]) -> dict[str, str | None]:
    """relpath -> SHA-256 hex (None when the entry gives none) of the files the marker lists."""
    listed: dict[str, str | None] = {}
    for entry in _entries(marker, "files"):
        digest = entry.get("sha256")
        listed[entry["path"]] = digest.lower() if isinstance(digest, str) else None
    return listed


def marker_skipped(marker: Mapping[str, Any]) -> list[str]:
    """The files the chief could not upload, as the marker lists them."""
    return [entry["path"] for entry in _entries(marker, "skipped")] if "skipped" in marker else []


def local_path(dest: Path, relpath: str) -> Path:
    """Where ``relpath`` lands under ``dest``; `OutputError` for a key that would leave it."""
    parts = PurePosixPath(relpath).parts
    if not parts or relpath.startswith("/") or any(p in ("..", ".", "") for p in parts):
        raise OutputError(f"output key {OUTPUT_PREFIX}{relpath} does not name a file under it")
    return dest.joinpath(*parts)


def _download(s3: Any, bucket: str, key: str, target: Path) -> str:
    """Stream ``key`` into ``target`` (through a partial file); its SHA-256 hex."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    answer = s3.get_object(Bucket=bucket, Key=key)
    with answer["Body"] as body, open(partial, "wb") as out:
        for chunk in iter(lambda: body.read(_CHUNK), b""):
            digest.update(chunk)
            out.write(chunk)
    os.replace(partial, target)
    return digest.hexdigest()


def fetch(
    s3: Any, bucket: str, dest: Path, *, on_file: Callable[[str, int], None] | None = None
) -> FetchResult:
    """Download the outputs into ``dest`` (created): with a completion marker the
    files it lists, each checked against its SHA-256; without one, every object
    under ``output/``. Then record the fetch in the bucket (`FETCHED_KEY`).

    A file whose SHA-256 differs from the marker's is removed again and
    `OutputError` names it; nothing is recorded as fetched then.
    """
    objects = [o for o in list_outputs(s3, bucket) if o.key != COMPLETE_MARKER]
    marker = read_marker(s3, bucket)
    listed = marker_files(marker) if marker is not None else None
    wanted = objects if listed is None else [o for o in objects if o.relpath in listed]
    targets = [(o, local_path(dest, o.relpath)) for o in wanted]  # every key checked first
    dest.mkdir(parents=True, exist_ok=True)
    verified = 0
    for obj, target in targets:
        digest = _download(s3, bucket, obj.key, target)
        expected = (listed or {}).get(obj.relpath)
        if expected is not None:
            if digest != expected:
                target.unlink()
                raise OutputError(
                    f"{obj.key}: SHA-256 {digest} does not match the completion marker's {expected}"
                )
            verified += 1
        if on_file is not None:
            on_file(obj.relpath, obj.size)
    fetched = {o.relpath for o in wanted}
    missing = tuple(sorted(set(listed or ()) - fetched))
    skipped = tuple(marker_skipped(marker)) if marker is not None else ()
    record_fetched(s3, bucket, objects)
    return FetchResult(
        files=tuple(sorted(fetched)),
        bytes=sum(o.size for o in wanted),
        complete=marker is not None and not missing and not skipped,
        verified=verified,
        missing=missing,
        skipped=skipped,
        leftovers=len(objects) - len(wanted),
    )


def _fetched_record(s3: Any, bucket: str) -> dict[str, str]:
    try:
        answer = s3.get_object(Bucket=bucket, Key=FETCHED_KEY)
    except s3.exceptions.NoSuchKey:
        return {}
    with answer["Body"] as body:
        raw = body.read(16 * _CHUNK)
    try:
        objects = json.loads(raw).get("objects", {})
    except (ValueError, AttributeError):
        return {}  # an unreadable record counts as no fetch: down then asks
    return {str(k): str(v) for k, v in objects.items()} if isinstance(objects, dict) else {}


def record_fetched(s3: Any, bucket: str, objects: Sequence[OutputObject]) -> None:
    """Write who fetched which output versions (keys and ETags), for every machine's ``down``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    record = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "by": f"{user}@{socket.gethostname()}",
        "objects": {o.key: o.etag for o in objects},
    }
    body = json.dumps(record, indent=1, sort_keys=True).encode()
    s3.put_object(Bucket=bucket, Key=FETCHED_KEY, Body=body, ContentType="application/json")


def unfetched(s3: Any, bucket: str) -> list[OutputObject]:
    """The outputs (marker left out) not fetched in their current version."""
    record = _fetched_record(s3, bucket)
    return [
        o
        for o in list_outputs(s3, bucket)
        if o.key != COMPLETE_MARKER and record.get(o.key) != o.etag
    ]


def _tags(s3: Any, bucket: str) -> dict[str, str]:
    try:
        answer = s3.get_bucket_tagging(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchTagSet", "NoSuchTagSetError"):
            return {}
        raise
    return {t["Key"]: t["Value"] for t in answer.get("TagSet", [])}


def kept_since(s3: Any, bucket: str) -> str | None:
    """When ``down --keep-output`` kept the bucket (its ``tfcluster:kept`` tag), or None."""
    return _tags(s3, bucket).get(TAG_KEPT)


def mark_kept(s3: Any, bucket: str) -> str:
    """Tag the bucket as kept for its outputs (its other tags stay); returns the time set."""
    tags = _tags(s3, bucket)
    tags[TAG_KEPT] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    s3.put_bucket_tagging(
        Bucket=bucket, Tagging={"TagSet": [{"Key": k, "Value": v} for k, v in tags.items()]}
    )
    return tags[TAG_KEPT]
