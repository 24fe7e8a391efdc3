"""The agents' reports read back: rows for ``tfcluster status``, its JSON form,
and the counts ``up`` shows while it waits.

Pure apart from ``read_reports``, which takes a boto3 S3 client (built by the
caller from its own config) and costs one LIST per 1,000 agents plus one GET
per agent: each agent overwrites one key (discovery/report.py says why).

A heartbeat is stale when the report is older than ``STALE_FACTOR`` times
the agent's heartbeat interval; the age is taken from S3's LastModified, so
an instance's clock does not enter into it. An agent that has exited stops
writing on purpose and is never marked stale.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from tfcluster.discovery.records import ROLES, parse_label
from tfcluster.discovery.report import DEFAULT_HEARTBEAT, REPORT_NAME, REPORTS_PREFIX, report_key

STALE_FACTOR = 3.0
MAX_REPORT_BYTES = 1024 * 1024
"""A report larger than this is not read (the agents' policies allow 16 KiB)."""
NO_REPORT = "NO REPORT"
CLAIMED_STATES = frozenset({"BARRIER", "CONFIGURE", "SERVE"})
"""An agent that has been in one of these holds (or held) its name."""
PASSED_STATES = frozenset({"CONFIGURE", "SERVE"})
"""An agent that has been in one of these passed its barrier."""


@dataclass(frozen=True)
class AgentReport:
    """One report object: its name, when S3 got it, the document (or why it is unreadable)."""

    name: str
    key: str
    last_modified: datetime
    doc: Mapping[str, Any] | None
    error: str | None = None


@dataclass(frozen=True)
class StatusRow:
    """One agent as ``status`` shows it."""

    name: str
    instance_id: str | None
    address: str | None
    dns_name: str | None
    state: str
    age: float | None
    """Seconds since S3 received the last report; None without a report."""
    stale: bool
    program: str
    """``-``, ``serving``, ``running``, ``exited 0``, ``failed (exit 1)``."""
    exit_code: int | None
    """The agent's own exit code, once it has exited."""
    detail: str
    log: tuple[str, ...]
    states: tuple[str, ...] = ()
    """The agent's recent states, oldest first (the report's ``history``)."""
    log_total: int = 0
    """Lines the agent ever logged: how many fell out of ``log`` between two reads."""
    waiting_for: tuple[str, ...] = ()
    """At its barrier: the members it does not see yet (the report's ``barrier``)."""


@dataclass(frozen=True)
class Progress:
    """What ``up`` shows while it waits: N of M agents at each stage."""

    expected: int
    reporting: int
    claimed: int
    barrier_passed: int
    serving: int
    failed: tuple[str, ...]
    """Agents that exited non-zero or whose TensorFlow process failed."""
    stale: tuple[str, ...]

    @property
    def ready(self) -> bool:
        return self.serving == self.expected and not self.failed


def _name_of(key: str, prefix: str) -> str | None:
    """``reports/worker0/report.json`` -> ``worker0``; None for other keys."""
    rest = key[len(prefix) :] if key.startswith(prefix) else ""
    name, sep, leaf = rest.partition("/")
    return name if sep and leaf == REPORT_NAME and parse_label(name) else None


def parse_report(raw: bytes) -> Mapping[str, Any]:
    """A report document; ``ValueError`` if it is not one."""
    doc = json.loads(raw)
    if not isinstance(doc, dict) or not isinstance(doc.get("state"), str):
        raise ValueError("not a report: no state")
    return doc


def _get_report(
    s3: Any, bucket: str, key: str, name: str, modified: datetime
) -> AgentReport | None:
    """GET one report object; None if it went away since it was listed."""
    try:
        response = s3.get_object(Bucket=bucket, Key=key)
    except s3.exceptions.NoSuchKey:
        return None
    with response["Body"] as body:
        raw = body.read(MAX_REPORT_BYTES + 1)
    if len(raw) > MAX_REPORT_BYTES:
        return AgentReport(name, key, modified, None, "too large")
    try:
        doc, error = parse_report(raw), None
    except ValueError as exc:
        doc, error = None, f"unreadable: {exc}"
    return AgentReport(name, key, response.get("LastModified", modified), doc, error)


def read_reports(s3: Any, bucket: str, *, prefix: str = REPORTS_PREFIX) -> list[AgentReport]:
    """Every agent report in ``bucket``. A report deleted between LIST and GET is
    left out; an unreadable one is returned with ``error``; any other S3 error
    (no bucket, access denied, unreachable) is raised to the caller."""
    reports = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", ()):
            name = _name_of(item["Key"], prefix)
            if name is None:
                continue
            modified = item["LastModified"]
            if item.get("Size", 0) > MAX_REPORT_BYTES:
                reports.append(AgentReport(name, item["Key"], modified, None, "too large"))
                continue
            found = _get_report(s3, bucket, item["Key"], name, modified)
            if found is not None:
                reports.append(found)
    return reports


def read_report(s3: Any, bucket: str, name: str) -> AgentReport | None:
    """One agent's report (``worker0``), one GET; None while it has written none."""
    return _get_report(s3, bucket, report_key(name), name, datetime.now(timezone.utc))


def _order(name: str) -> tuple[int, int, str]:
    member = parse_label(name)
    if member is None:
        return (len(ROLES), 0, name)
    return (ROLES.index(member.role), member.index, name)


def program_state(tensorflow: Any) -> str:
    """The TensorFlow process in a word or two."""
    if not isinstance(tensorflow, dict):
        return "-"
    if tensorflow.get("running"):
        return "running" if tensorflow.get("kind") == "program" else "serving"
    code = tensorflow.get("exit_code")
    if code is None:
        return "-"
    return f"exited {code}" if code == 0 else f"failed (exit {code})"


def row_of(report: AgentReport, now: datetime, stale_factor: float = STALE_FACTOR) -> StatusRow:
    """One report as a row, its age measured at ``now`` (aware, UTC)."""
    age = max(0.0, (now - report.last_modified).total_seconds())
    doc = report.doc
    if doc is None:
        return StatusRow(
            report.name, None, None, None, "UNREADABLE", age, False, "-", None,
            report.error or "", (),
        )  # fmt: skip
    heartbeat = doc.get("heartbeat")
    if not isinstance(heartbeat, (int, float)) or heartbeat <= 0:
        heartbeat = DEFAULT_HEARTBEAT
    exited = doc.get("exit") if isinstance(doc.get("exit"), dict) else None
    log = doc.get("log")
    raw_history = doc.get("history")
    history: list[Any] = raw_history if isinstance(raw_history, list) else []
    states = tuple(str(h[0]) for h in history if isinstance(h, list) and h)
    raw_barrier = doc.get("barrier")
    barrier: dict[str, Any] = raw_barrier if isinstance(raw_barrier, dict) else {}
    missing = barrier.get("missing") if doc["state"] == "BARRIER" else None
    return StatusRow(
        name=report.name,
        instance_id=doc.get("instance_id"),
        address=doc.get("address"),
        dns_name=doc.get("dns_name"),
        state=str(doc["state"]),
        age=age,
        stale=exited is None and age > stale_factor * heartbeat,
        program=program_state(doc.get("tensorflow")),
        exit_code=exited.get("code") if exited else None,
        detail=str(doc.get("detail") or (exited or {}).get("message") or ""),
        log=tuple(str(line) for line in log) if isinstance(log, list) else (),
        states=states,
        log_total=doc["log_total"] if isinstance(doc.get("log_total"), int) else 0,
        waiting_for=tuple(str(name) for name in missing) if isinstance(missing, list) else (),
    )


def status_rows(
    reports: Iterable[AgentReport],
    now: datetime | None = None,
    *,
    expected: Iterable[str] = (),
    stale_factor: float = STALE_FACTOR,
) -> list[StatusRow]:
    """One row per reporting agent, plus a ``NO REPORT`` row for each expected
    name without one; in the order chief, ps, worker by index."""
    now = now or datetime.now(timezone.utc)
    rows = {r.name: row_of(r, now, stale_factor) for r in reports}
    for name in expected:
        if name not in rows:
            rows[name] = StatusRow(
                name, None, None, None, NO_REPORT, None, False, "-", None, "", ()
            )
    return [rows[name] for name in sorted(rows, key=_order)]


def rows_json(rows: Sequence[StatusRow], *, log: bool = False) -> list[dict[str, Any]]:
    """The rows for ``status --json``: plain JSON values, ages in seconds (0.1 s)."""
    out = []
    for row in rows:
        item = asdict(row)
        item["age"] = None if row.age is None else round(row.age, 1)
        item["log"] = list(row.log) if log else None
        if not log:
            del item["log"]
        out.append(item)
    return out


def _age_text(row: StatusRow) -> str:
    if row.age is None:
        return "-"
    text = f"{row.age:.0f}s" if row.age < 120 else f"{row.age / 60:.0f}m"
    return text + " STALE" if row.stale else text


def format_table(rows: Sequence[StatusRow]) -> str:
    """The rows as an aligned text table (name, address, state, heartbeat age, program)."""
    header = ("NAME", "INSTANCE", "ADDRESS", "STATE", "HEARTBEAT", "PROGRAM")
    lines = [header] + [
        (r.name, r.instance_id or "-", r.address or "-", r.state, _age_text(r), r.program)
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def progress(rows: Sequence[StatusRow], expected: Iterable[str]) -> Progress:
    """How far the expected agents are: reporting, claimed, barrier passed,
    serving (a program that finished with 0 counts: it served)."""
    names = set(expected)
    mine = [r for r in rows if r.name in names]
    seen = {r.name: {r.state, *r.states} for r in mine}
    failed = tuple(
        r.name for r in mine if (r.exit_code not in (None, 0)) or r.program.startswith("failed")
    )
    return Progress(
        expected=len(names),
        reporting=sum(r.state not in (NO_REPORT, "UNREADABLE") for r in mine),
        claimed=sum(bool(seen[r.name] & CLAIMED_STATES) for r in mine),
        barrier_passed=sum(bool(seen[r.name] & PASSED_STATES) for r in mine),
        serving=sum(
            (r.state == "SERVE" and r.program in ("serving", "running")) or r.program == "exited 0"
            for r in mine
        ),
        failed=failed,
        stale=tuple(r.name for r in mine if r.stale),
    )
