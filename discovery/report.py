"""The agent's reports: a small JSON document in the cluster bucket, written
behind the agent's back.

The operator cannot reach etcd (it sits in the cluster's security group), so
each agent tells the operator how it is doing through the cluster bucket
(DESIGN.md section 10): a presigned POST, signed by ``up``, whose policy
allows only the agent's prefix, a size range and an expiry. No instance holds
AWS credentials. The operator reads the reports back with
``tfcluster.cloudinit.observe.status``.

What a report holds (``REPORT_VERSION`` 1): the agent's state, when it
entered it and its recent state history; instance id, address and DNS name;
barrier progress (members seen, expected, who is missing); the TensorFlow
process (server up, or the program's exit code); the agent's exit; the last
lines of its log (at most ``LOG_LINES`` lines and ``LOG_BYTES`` bytes); on
the chief, its output upload (``outputs``: files and bytes uploaded, whether
the final upload is complete, the last error).

States are the agent's own names (discovery/agent.py: IDENTIFY, CLAIM,
BARRIER, CONFIGURE, SERVE, UPLOAD (the chief's final upload of its outputs),
STOP); a reporter starts in ``STARTING``. The
operator's ``status`` counts an agent as claimed once it has been in BARRIER,
CONFIGURE or SERVE, and past its barrier once in CONFIGURE or SERVE.

When it is written: on every state change and as a heartbeat every
``heartbeat`` seconds (15 by default), never more than once a second
(``MIN_INTERVAL``). Changes that arrive faster are coalesced: the latest
state wins. Barrier progress and log lines ride along with the next write.

The key: one fixed key per agent, ``reports/<role><index>/report.json``,
overwritten by each write. ``status`` then costs one LIST for up to 1,000
agents and one GET per agent, whatever the job's age, and the bucket holds
one small object per agent. One key per write would give a history, but
``status`` would have to list a growing prefix (240 new objects per agent
per hour at the default heartbeat) to find the newest, and ``down`` would
delete them all; S3 charges a PUT/POST the same either way. S3 is strongly
consistent for overwrites, so a GET after a write sees it. ``log_total``
counts every log line ever added, so a reader can tell how many lines fell
out of the tail between two reports it saw.

Never in the agent's way: the public methods only update the document under
a lock that no network call holds, and wake the writer thread. The writer
uploads with its own timeout, logs a failure and retries with capped
exponential backoff. ``stop`` flushes the final state within a deadline and
then returns, written or not. After the policy's expiry (at most 7 days
after ``up`` signed it, SigV4's limit) S3 would refuse every write: the
writer stops writing, says so once, and the agent goes on.

Standard library only (urllib, multipart/form-data by hand): the agent
imports no boto3 (tests/test_entry_point.py).
"""

from __future__ import annotations

import base64
import binascii
import calendar
import copy
import hashlib
import http.client
import io
import json
import logging
import os
import re
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from tfcluster.discovery.agent_config import AgentConfig
from tfcluster.discovery.records import Member

log = logging.getLogger(__name__)

REPORTS_PREFIX = "reports/"
REPORT_NAME = "report.json"
REPORT_VERSION = 1
MIN_INTERVAL = 1.0
"""Seconds: no two writes of one agent start closer together than this."""
DEFAULT_HEARTBEAT = 15.0
DEFAULT_TIMEOUT = 10.0
"""Seconds each socket operation of an upload may take."""
BACKOFF_FIRST, BACKOFF_MAX = 2.0, 60.0
"""A failed write is retried after 2, 4, 8 ... seconds, at most 60 apart."""
LOG_LINES, LOG_BYTES, LINE_CHARS = 50, 8 * 1024, 500
"""The log tail: at most 50 lines and 8 KiB; one line at most 500 characters."""
MAX_MISSING = 32
"""Barrier progress lists at most this many missing members (and counts them all)."""
HISTORY = 16
"""State changes kept in a report (the newest)."""
DEFAULT_MAX_BYTES = 16 * 1024
"""A report's size limit when the policy states none."""
EXPIRY_MARGIN = 5.0
"""Seconds before the policy's expiry at which writing stops (clock skew, upload time)."""


EXPIRED = "expired"


class ReportWriteError(Exception):
    """One upload (a report or an output file) failed; the message is one line
    (status, S3 error code, or why unreachable)."""


def agent_prefix(label: str) -> str:
    """The agent's own prefix in the bucket, e.g. ``reports/worker0/``."""
    return f"{REPORTS_PREFIX}{label}/"


def report_key(label: str) -> str:
    """The agent's report object, overwritten by every write."""
    return agent_prefix(label) + REPORT_NAME


def decode_policy_document(fields: Mapping[str, str]) -> dict[str, Any]:
    """The POST policy in ``fields`` (base64 JSON, as S3 and boto3 spell it).

    The signature covers exactly this text: what it says is what S3 enforces.
    """
    encoded = fields.get("policy", fields.get("Policy"))
    if encoded is None:
        raise ValueError("the form fields hold no policy")
    try:
        document = json.loads(base64.b64decode(encoded, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"the policy is not base64 JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError("the policy is not a JSON object")
    return document


def parse_expiration(text: str) -> float:
    """A policy's ``expiration`` (ISO 8601 UTC, e.g. ``2026-12-10T08:00:00Z``) as epoch seconds."""
    match = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d+)?Z", text)
    if match is None:
        raise ValueError(f"policy expiration is not ISO 8601 UTC: {text!r}")
    parts = [int(p) for p in match.groups()[:6]]
    return calendar.timegm((*parts, 0, 0, 0)) + float(match.group(7) or 0)


@dataclass(frozen=True)
class PostTarget:
    """A presigned POST: the URL and the signed form fields (``key`` ends in
    ``${filename}``, the policy allows any key under that prefix)."""

    url: str
    fields: Mapping[str, str]

    def policy(self) -> dict[str, Any] | None:
        """The signed policy document, or None when it cannot be read."""
        try:
            return decode_policy_document(self.fields)
        except ValueError:
            return None

    def expires_at(self) -> float | None:
        """Epoch seconds after which S3 refuses this POST; None if the policy does not say."""
        document = self.policy()
        if document is None or not isinstance(document.get("expiration"), str):
            return None
        try:
            return parse_expiration(document["expiration"])
        except ValueError:
            return None

    def key_prefix(self) -> str | None:
        """The prefix the policy's ``starts-with $key`` condition allows, if any."""
        document = self.policy() or {}
        for condition in document.get("conditions", ()):
            if isinstance(condition, list) and condition[:2] == ["starts-with", "$key"]:
                return str(condition[2]) if len(condition) > 2 else None
        return None

    def max_bytes(self) -> int | None:
        """The upper bound of the policy's ``content-length-range``, if any."""
        document = self.policy() or {}
        for condition in document.get("conditions", ()):
            if isinstance(condition, list) and condition[:1] == ["content-length-range"]:
                try:
                    return int(condition[2])
                except (IndexError, TypeError, ValueError):
                    return None
        return None


def form_envelope(
    fields: Mapping[str, str],
    key: str,
    *,
    filename: str = REPORT_NAME,
    content_type: str = "application/json",
    boundary: str | None = None,
) -> tuple[bytes, bytes, str]:
    """(what precedes the file, what follows it, the Content-Type) of an S3 POST.

    The signed fields go first with ``key`` set to the object's key (the
    policy allows it by prefix), the file last, as S3 requires.
    """
    boundary = boundary or secrets.token_hex(16)
    head = bytearray()
    for name, value in {**fields, "key": key}.items():
        head += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        head += value.encode() + b"\r\n"
    safe_name = re.sub(r'["\r\n\\]', "_", filename) or "file"
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{safe_name}"'
        f"\r\nContent-Type: {content_type}\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return bytes(head), tail, f"multipart/form-data; boundary={boundary}"


def encode_post(
    fields: Mapping[str, str], key: str, body: bytes, *, boundary: str | None = None
) -> tuple[bytes, str]:
    """The multipart/form-data body of an S3 POST of a JSON document and its Content-Type."""
    head, tail, content_type = form_envelope(fields, key, boundary=boundary)
    return head + body + tail, content_type


def _s3_error(body: bytes) -> str:
    """``Code: Message`` from an S3 error document, or the start of the body."""
    text = body.decode(errors="replace")
    code = re.search(r"<Code>([^<]*)</Code>", text)
    message = re.search(r"<Message>([^<]*)</Message>", text)
    if code:
        return code.group(1) + (f": {message.group(1)}" if message else "")
    return " ".join(text.split())[:200]


def _send(target: PostTarget, data: Any, content_type: str, length: int, timeout: float) -> None:
    """POST ``data`` (bytes, or a file-like object of ``length`` bytes) to the bucket."""
    headers = {"Content-Type": content_type, "Content-Length": str(length)}
    request = urllib.request.Request(target.url, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(4096)
    except urllib.error.HTTPError as exc:
        detail = _s3_error(exc.read(4096))
        exc.close()
        raise ReportWriteError(f"HTTP {exc.code} {detail}".strip()) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, FileShrank):
            raise ReportWriteError(str(exc.reason)) from None
        raise ReportWriteError(f"cannot reach {target.url}: {exc.reason}") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # timeouts, resets, a garbled or cut-off answer, a bad URL, a file that shrank
        raise ReportWriteError(f"upload to {target.url} failed: {exc!r}") from None


def post_object(target: PostTarget, key: str, body: bytes, timeout: float) -> None:
    """Upload ``body`` to ``key`` with the presigned POST; ``ReportWriteError`` on any failure.

    ``timeout`` bounds each socket operation (connect, send, each read); a
    report is a few KiB, so that bounds the whole upload to a small multiple.
    """
    payload, content_type = encode_post(target.fields, key, body)
    _send(target, payload, content_type, len(payload), timeout)


class FileShrank(OSError):
    """The file held fewer bytes than its upload announced (it changed meanwhile)."""


class _FileForm(io.RawIOBase):
    """The multipart body of a file upload, read in blocks: the envelope's head,
    exactly ``size`` bytes of the file (hashed on the way), the tail. A file
    that has shrunk meanwhile fails the read instead of leaving S3 waiting."""

    def __init__(self, head: bytes, handle: BinaryIO, size: int, tail: bytes) -> None:
        super().__init__()
        self._head, self._tail = head, tail
        self._handle, self._left = handle, size
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        want = 64 * 1024 if size is None or size < 0 else size
        if self._head:
            chunk, self._head = self._head[:want], self._head[want:]
            return chunk
        if self._left > 0:
            chunk = self._handle.read(min(want, self._left))
            if not chunk:
                raise FileShrank(f"{self._left} bytes short: the file shrank while uploading")
            self._left -= len(chunk)
            self.sha256.update(chunk)
            return chunk
        chunk, self._tail = self._tail[:want], self._tail[want:]
        return chunk


def post_file(
    target: PostTarget, key: str, path: str | os.PathLike[str], size: int, timeout: float
) -> str:
    """Upload the first ``size`` bytes of the file at ``path`` to ``key``, streamed
    (the file is never held in memory whole); its SHA-256 (hex) when S3 took it.
    ``ReportWriteError`` on any failure, the file unreadable included."""
    head, tail, content_type = form_envelope(
        target.fields, key, filename=os.path.basename(path),
        content_type="application/octet-stream",
    )  # fmt: skip
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below, after the upload)
    except OSError as exc:
        raise ReportWriteError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        form = _FileForm(head, handle, size, tail)
        _send(target, form, content_type, len(head) + size + len(tail), timeout)
    return form.sha256.hexdigest()


class LogTail(logging.Handler):
    """The last lines of the agent's log, bounded in lines and bytes.

    A logging handler (attach it to the agent's logger) that also takes
    lines directly (``add``, e.g. the TensorFlow process's output). It does
    no I/O: emitting is a deque append under a lock.
    """

    def __init__(
        self, max_lines: int = LOG_LINES, max_bytes: int = LOG_BYTES, line_chars: int = LINE_CHARS
    ) -> None:
        super().__init__()
        self.max_lines, self.max_bytes, self.line_chars = max_lines, max_bytes, line_chars
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._lines: deque[str] = deque()
        self._bytes = 0
        self._total = 0
        self._guard = threading.Lock()

    def add(self, line: str) -> None:
        """Append one line (cut to ``line_chars``); the oldest lines fall out."""
        line = line.rstrip("\n")
        if len(line) > self.line_chars:
            line = line[: self.line_chars - 3] + "..."
        size = len(line.encode()) + 1
        with self._guard:
            self._lines.append(line)
            self._bytes += size
            self._total += 1
            while self._lines and (
                len(self._lines) > self.max_lines or self._bytes > self.max_bytes
            ):
                self._bytes -= len(self._lines.popleft().encode()) + 1

    def emit(self, record: logging.LogRecord) -> None:
        try:
            for line in self.format(record).splitlines() or [""]:
                self.add(line)
        except Exception:  # a logging handler must not raise into the caller
            self.handleError(record)

    def snapshot(self) -> tuple[list[str], int]:
        """(the lines held, oldest first; how many lines were ever added)."""
        with self._guard:
            return list(self._lines), self._total


class Pacer:
    """When the next write is due. Pure: the caller passes the clock's readings.

    * a change (``change``) is written as soon as ``min_interval`` has passed
      since the last write started; changes meanwhile coalesce into one write;
    * with nothing changed, a heartbeat ``heartbeat`` seconds after the last
      good write started;
    * after a failure, a retry after ``backoff_first`` seconds, doubling up to
      ``backoff_max``; a good write resets it;
    * ``final``: the agent is stopping: retries ignore the backoff (the stop
      deadline bounds them) but still keep ``min_interval``.
    """

    def __init__(
        self,
        heartbeat: float = DEFAULT_HEARTBEAT,
        *,
        min_interval: float = MIN_INTERVAL,
        backoff_first: float = BACKOFF_FIRST,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.min_interval = max(min_interval, MIN_INTERVAL)
        self.heartbeat = max(heartbeat, self.min_interval)
        self.backoff_first = max(backoff_first, self.min_interval)
        self.backoff_max = max(backoff_max, self.backoff_first)
        self.dirty = True  # nothing written yet
        self.failures = 0
        self.final = False
        self.last_start: float | None = None
        self.last_good: float | None = None
        self.retry_at = 0.0

    def change(self) -> None:
        """The document changed in a way worth writing now."""
        self.dirty = True

    def pending(self) -> bool:
        """Something is not yet written: a change, or a failed write."""
        return self.dirty or self.failures > 0

    def next_write(self) -> float:
        """The clock reading at which the next write is due (may be past: write now)."""
        earliest = float("-inf") if self.last_start is None else self.last_start + self.min_interval
        if self.failures and not self.final:
            due = self.retry_at
        elif self.pending():
            due = earliest
        else:  # nothing pending: the last write succeeded
            last = self.last_good if self.last_good is not None else self.last_start
            due = (last or 0.0) + self.heartbeat
        return max(due, earliest)

    def begin(self, now: float) -> None:
        """A write of the current document starts at ``now``."""
        self.last_start = now
        self.dirty = False

    def end(self, now: float, ok: bool) -> None:
        """The write begun last ended at ``now``."""
        if ok:
            self.failures = 0
            self.last_good = self.last_start
            return
        self.failures += 1
        self.retry_at = now + self.backoff()

    def backoff(self) -> float:
        """Seconds the next retry waits after the current number of failures."""
        if not self.failures:
            return 0.0
        return min(self.backoff_first * 2 ** (self.failures - 1), self.backoff_max)


BarrierSource = Callable[[], "tuple[int, int, Sequence[str]] | None"]
"""Barrier progress on demand: (members seen, expected, missing labels), or None."""


def _progress(seen: int, expected: int, missing: Sequence[str]) -> dict[str, Any]:
    return {
        "seen": seen,
        "expected": expected,
        "missing": sorted(missing)[:MAX_MISSING],
        "missing_count": len(missing),
    }


class Reporter:
    """The report writer: the agent updates the document, a thread writes it.

    Every public method returns without waiting on the network: it changes
    the document under ``_cond``'s lock, which the writer thread releases
    before each upload, and notifies the thread. With ``target`` None the
    document is kept (``snapshot``) but nothing is written and no thread runs.
    A ``pacer`` passed in brings its own heartbeat (``heartbeat`` is then unused);
    ``wall`` is the clock reports are stamped with and the policy's expiry is
    checked against.
    """

    def __init__(
        self,
        target: PostTarget | None,
        label: str,
        *,
        heartbeat: float = DEFAULT_HEARTBEAT,
        timeout: float = DEFAULT_TIMEOUT,
        tail: LogTail | None = None,
        pacer: Pacer | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.target = target
        self.label = label
        self.key = report_key(label)
        self.timeout = timeout
        self.tail = tail if tail is not None else LogTail()
        self.pacer = pacer if pacer is not None else Pacer(heartbeat)
        self._clock, self._wall = time.monotonic, wall
        self._cond = threading.Condition()
        self._expires_at = target.expires_at() if target is not None else None
        policy_max = target.max_bytes() if target is not None else None
        self.max_bytes = policy_max if policy_max is not None else DEFAULT_MAX_BYTES
        now = wall()
        self._doc: dict[str, Any] = {
            "version": REPORT_VERSION,
            "name": label,
            "state": "STARTING",
            "since": round(now, 3),
            "history": [["STARTING", round(now, 3)]],
            "detail": "",
            "heartbeat": self.pacer.heartbeat,
            "instance_id": None,
            "address": None,
            "dns_name": None,
            "barrier": None,
            "tensorflow": None,
            "exit": None,
            "outputs": None,
        }
        self._barrier_source: BarrierSource | None = None
        self._seq = 0
        self._stopping = False
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None
        self._thread_done = False
        # What the writer has done, for the agent's log and for tests.
        self.in_flight = False
        self.writes_ok = 0
        self.writes_failed = 0
        self.last_error: str | None = None
        self.written_seq = 0
        self.policy_expired = False

    # -- the agent's side: quick, never blocked by the network --------------------

    def start(self) -> None:
        """Start the writer thread (a no-op without a target)."""
        if self.target is None or self._thread is not None:
            return
        prefix = self.target.key_prefix()
        if prefix is not None and not self.key.startswith(prefix):
            log.error(
                "the report policy allows keys under %s only, not %s: S3 will refuse the reports",
                prefix,
                self.key,
            )
        self._thread = threading.Thread(target=self._run, name=f"report-{self.label}", daemon=True)
        self._thread.start()

    def state(self, state: str, detail: str = "") -> None:
        """The agent entered ``state`` (its state machine's name); written promptly."""
        with self._cond:
            now = round(self._wall(), 3)
            if state != self._doc["state"]:
                self._doc["since"] = now
                self._doc["history"] = [*self._doc["history"], [state, now]][-HISTORY:]
            self._doc["state"], self._doc["detail"] = state, detail
            self._changed(urgent=True)

    def identity(self, instance_id: str, address: str, dns_name: str) -> None:
        """Who this agent is; written with the next write."""
        self._set(urgent=True, instance_id=instance_id, address=address, dns_name=dns_name)

    def barrier(self, seen: int, expected: int, missing: Sequence[str]) -> None:
        """Barrier progress; rides with the next write (no write of its own)."""
        self._set(urgent=False, barrier=_progress(seen, expected, missing))

    def follow_barrier(self, source: BarrierSource | None) -> None:
        """Take barrier progress from ``source`` at each write (None: stop).

        Pulled rather than pushed: the barrier's last answer (``Barrier.progress``)
        is read when a report is written, at most once a second.
        ``source`` is called with the report's lock held, so it must not
        call back into the reporter; it returns (seen, expected, missing),
        or None when it cannot tell (the last progress then stays).
        """
        with self._cond:
            self._barrier_source = source

    def _pull_barrier(self) -> None:
        """Called with the lock held."""
        source = self._barrier_source
        progress = source() if source is not None else None
        if progress is not None:
            self._doc["barrier"] = _progress(*progress)

    def tensorflow(
        self, *, program: bool, running: bool, exit_code: int | None = None, pid: int | None = None
    ) -> None:
        """The TensorFlow process: a server (ps, worker, a chief without program)
        or the chief's program; running, or its exit code. Written promptly."""
        process = {
            "kind": "program" if program else "server",
            "running": running,
            "exit_code": exit_code,
            "pid": pid,
        }
        self._set(urgent=True, tensorflow=process)

    def finished(self, code: int, message: str) -> None:
        """The agent's result (its exit code and one-line message). Written promptly."""
        self._set(urgent=True, exit={"code": code, "message": message})

    def outputs(self, progress: Mapping[str, Any]) -> None:
        """The chief's output upload (discovery/output.py ``OutputUploader.progress``);
        written promptly once complete, else with the next write."""
        self._set(urgent=bool(progress.get("complete")), outputs=dict(progress))

    def log_line(self, line: str) -> None:
        """A line for the log tail (e.g. the TensorFlow process's output)."""
        self.tail.add(line)

    def snapshot(self) -> dict[str, Any]:
        """The document as the next write would send it (without seq and time)."""
        with self._cond:
            self._pull_barrier()
            doc = copy.deepcopy(self._doc)
        doc["log"], doc["log_total"] = self.tail.snapshot()
        return doc

    def stop(self, timeout: float = 5.0) -> bool:
        """Flush what is not yet written, for at most ``timeout`` seconds.

        True when the last state is in the bucket. Returns by the deadline
        even if an upload hangs (its thread is a daemon and is left behind).
        """
        if self._thread is None:
            return False
        deadline = self._clock() + timeout
        with self._cond:
            self._stopping = True
            self._deadline = deadline
            self.pacer.final = True
            self._cond.notify_all()
            while not self._thread_done and self._clock() < deadline:
                self._cond.wait(deadline - self._clock())
            flushed = self._thread_done and not self.pacer.pending()
        self._thread.join(max(0.0, deadline - self._clock()))
        return flushed

    # -- internals ------------------------------------------------------------------

    def _set(self, *, urgent: bool, **values: Any) -> None:
        with self._cond:
            self._doc.update(values)
            self._changed(urgent)

    def _changed(self, urgent: bool) -> None:
        """Called with the lock held."""
        if urgent:
            self.pacer.change()
            self._cond.notify_all()

    def _expired(self) -> bool:
        return self._expires_at is not None and self._wall() >= self._expires_at - EXPIRY_MARGIN

    def _encode(self, doc: dict[str, Any]) -> bytes:
        """The report as JSON, shortened to ``max_bytes`` by dropping the oldest log lines."""
        while True:
            body = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
            if len(body) <= self.max_bytes:
                return body
            if doc["log"]:
                doc["log"] = doc["log"][max(1, len(doc["log"]) // 4) :]
            elif doc.get("barrier") and doc["barrier"]["missing"]:
                doc["barrier"]["missing"] = []
            else:
                doc["detail"] = ""
                doc["history"] = doc["history"][-1:]
                doc["exit"] = doc["exit"] and {**doc["exit"], "message": ""}
                return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    def _next(self) -> dict[str, Any] | str | None:
        """Wait (lock held) until a write is due and take the document to write;
        None when the thread should end; ``EXPIRED`` once, when the policy has."""
        while True:
            now = self._clock()
            if self._stopping and (not self.pacer.pending() or now >= self._deadline):
                return None
            if self._expired():
                if not self.policy_expired:
                    self.policy_expired = True
                    self._cond.notify_all()
                    return EXPIRED
                if self._stopping:
                    return None
                self._cond.wait()
                continue
            due = self.pacer.next_write()
            if due <= now:
                break
            wait = due - now
            if self._stopping:
                wait = min(wait, self._deadline - now)
            self._cond.wait(wait)
        self.pacer.begin(now)
        self._seq += 1
        self._pull_barrier()
        doc = copy.deepcopy(self._doc)
        doc["seq"], doc["time"] = self._seq, round(self._wall(), 3)
        doc["log"], doc["log_total"] = self.tail.snapshot()
        self.in_flight = True
        return doc

    def _run(self) -> None:
        target = self.target
        try:
            while True:
                with self._cond:
                    doc = self._next()
                if doc is None or target is None:
                    return
                if isinstance(doc, str):
                    log.warning("report policy for %s expired; no more reports", self.key)
                    continue
                seq, error, recovered, retry = doc["seq"], None, None, 0.0
                try:
                    post_object(target, self.key, self._encode(doc), self.timeout)
                except ReportWriteError as exc:
                    error = str(exc)
                with self._cond:
                    self.in_flight = False
                    self.pacer.end(self._clock(), error is None)
                    if error is None:
                        self.writes_ok += 1
                        self.written_seq = seq
                        recovered, self.last_error = self.last_error, None
                    else:
                        self.writes_failed += 1
                        self.last_error = error
                        retry = self.pacer.backoff()
                    self._cond.notify_all()
                if error is not None:
                    log.warning("report %s not written: %s; retrying in %g s", seq, error, retry)
                elif recovered is not None:
                    log.info("report %s written again after failures", seq)
        finally:
            with self._cond:
                self._thread_done = True
                self._cond.notify_all()


def reporter_for(config: AgentConfig, member: Member, **options: Any) -> Reporter:
    """The reporter of ``member``'s agent as its config asks: writing to the
    presigned POST for its label (or role), or keeping the document only."""
    target = None
    if config.report_post is not None:
        fields = config.report_post.fields_for(member)
        if fields is not None:
            target = PostTarget(config.report_post.url, fields)
    options.setdefault("heartbeat", float(config.report_heartbeat))
    return Reporter(target, member.label, **options)
