"""The chief's outputs: its program's output directory, copied to the cluster bucket.

The chief's program gets ``TFCLUSTER_OUTPUT_DIR`` (the config's
``output_dir``). While it runs, the chief's agent uploads what changed there
every ``output_interval`` seconds (checkpoints survive a lost instance); when
it has exited, it uploads once more and then writes the marker
``output/.tfcluster-complete``, so that ``fetch`` and ``down`` can tell a
finished upload from one still running or cut off.

Each file goes to ``output/<path relative to the directory>`` with a
presigned POST (the config's ``output_post``) whose policy allows only the
``output/`` prefix, a size range and an expiry (signed by ``up``,
``tfcluster.cloudinit.observe.policy.output_post_config``). Files are streamed,
never held in memory whole, and hashed on the way. A file is uploaded again
only when its size or modification time changed since its last good upload.

The marker (``MARKER_VERSION`` 1), JSON::

    {"version": 1, "complete": true, "time": 1796280000.123,
     "exit_code": 0, "files": [{"path": "metrics.json", "size": 312,
     "sha256": "..."}, ...], "skipped": [{"path": "big.bin", "size": ...,
     "reason": "larger than the policy allows (...)"}], "bytes": 4711}

``files`` is the directory as it was at the end, sorted by path: a file
uploaded during the run and deleted later (a superseded checkpoint) may still
be in the bucket (the POST policy cannot delete), but it is not listed.

Standard library only, like the report writer (tests/test_entry_point.py).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tfcluster.discovery.report import (
    DEFAULT_TIMEOUT,
    PostTarget,
    ReportWriteError,
    post_file,
    post_object,
)

log = logging.getLogger(__name__)

OUTPUT_PREFIX = "output/"
MARKER_NAME = ".tfcluster-complete"
MARKER_KEY = OUTPUT_PREFIX + MARKER_NAME
MARKER_VERSION = 1
OUTPUT_ENV = "TFCLUSTER_OUTPUT_DIR"
"""The variable that names the output directory to the chief's program."""
FINAL_TIMEOUT = 600.0
"""Seconds the final upload may take, retries included."""
RETRY_FIRST, RETRY_MAX = 2.0, 30.0
"""A failed final pass is retried after 2, 4, 8 ... seconds, at most 30 apart."""


@dataclass(frozen=True)
class Uploaded:
    """One file as it was when its upload succeeded."""

    size: int
    mtime_ns: int
    sha256: str


@dataclass
class SyncResult:
    """One pass over the directory."""

    uploaded: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(path, why) of files whose upload failed; they are tried again next pass."""
    skipped: dict[str, tuple[int, str]] = field(default_factory=dict)
    """path -> (size, reason) of files no upload could take (too large, a name S3 cannot hold)."""


def output_key(relative: str) -> str:
    """The bucket key of a file at ``relative`` (POSIX) below the output directory."""
    return OUTPUT_PREFIX + relative


def walk(directory: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative POSIX path, stat) of every regular file below ``directory``,
    symbolic links not followed; a file that vanishes meanwhile is left out."""
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            try:
                info = path.lstat()
            except OSError:
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            yield path.relative_to(directory).as_posix(), info


class OutputUploader:
    """Copies one directory to ``output/`` in the bucket: periodic passes from
    a thread (``start``), and a final pass plus the marker (``finish``).

    One pass runs at a time (a lock), so the final pass never races a
    periodic one. ``stop`` ends the periodic passes; a pass in progress
    finishes the file it is on.
    """

    def __init__(
        self,
        target: PostTarget,
        directory: Path,
        interval: float,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        wall: Callable[[], float] = time.time,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.target = target
        self._progress = progress
        self.directory = Path(directory)
        self.interval = interval
        self.timeout = timeout
        self._wall = wall
        self.max_bytes = target.max_bytes()
        self.done: dict[str, Uploaded] = {}
        self._pass = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = 0
        prefix = target.key_prefix()
        if prefix is not None and not OUTPUT_PREFIX.startswith(prefix):
            log.error(
                "the output policy allows keys under %s only, not %s: S3 will refuse the outputs",
                prefix,
                OUTPUT_PREFIX,
            )

    def start(self) -> None:
        """Upload what changed every ``interval`` seconds until ``stop``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="outputs", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End the periodic passes (waits for the current file, at most ``timeout``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            result = self.sync(self._stop)
            if result.failed:
                path, why = result.failed[0]
                log.warning(
                    "outputs: %d file(s) not uploaded (%s: %s); next try in %g s",
                    len(result.failed), path, why, self.interval,
                )  # fmt: skip

    def sync(self, stop: threading.Event | None = None) -> SyncResult:
        """Upload every file that changed since its last good upload."""
        result = SyncResult()
        with self._pass:
            self.passes += 1
            if not self.directory.is_dir():
                return result
            for relative, info in walk(self.directory):
                if stop is not None and stop.is_set():
                    break
                seen = self.done.get(relative)
                if seen is not None and (seen.size, seen.mtime_ns) == (
                    info.st_size, info.st_mtime_ns
                ):  # fmt: skip
                    continue
                reason = self._refused(relative, info.st_size)
                if reason is not None:
                    result.skipped[relative] = (info.st_size, reason)
                    continue
                try:
                    digest = post_file(
                        self.target, output_key(relative), self.directory / relative,
                        info.st_size, self.timeout,
                    )  # fmt: skip
                except ReportWriteError as exc:
                    result.failed.append((relative, str(exc)))
                    continue
                self.done[relative] = Uploaded(info.st_size, info.st_mtime_ns, digest)
                result.uploaded.append(relative)
        if result.uploaded:
            log.info("outputs: uploaded %d file(s) to %s", len(result.uploaded), OUTPUT_PREFIX)
        self._tell(complete=False, error=result.failed[0][1] if result.failed else None)
        return result

    def _tell(self, *, complete: bool, error: str | None) -> None:
        """Pass the upload's progress on (the agent's report)."""
        if self._progress is not None:
            self._progress(self.progress(complete=complete, error=error))

    def progress(self, *, complete: bool = False, error: str | None = None) -> dict[str, Any]:
        """Files and bytes uploaded so far, whether the final upload is complete, the last error."""
        return {
            "files": len(self.done),
            "bytes": sum(up.size for up in self.done.values()),
            "complete": complete,
            "error": error,
        }

    def _refused(self, relative: str, size: int) -> str | None:
        """Why S3 would refuse this file under the policy (None: it would take it)."""
        if relative == MARKER_NAME:
            return f"{MARKER_NAME} is the name of the completion marker"
        if len(output_key(relative).encode()) > 1024:
            return "its key would exceed S3's 1024 bytes"
        if self.max_bytes is not None and size > self.max_bytes:
            return f"larger than the policy allows ({self.max_bytes} bytes)"
        return None

    def finish(
        self,
        exit_code: int | None,
        *,
        timeout: float = FINAL_TIMEOUT,
        stop: threading.Event | None = None,
    ) -> bool:
        """The final upload: stop the periodic passes, upload what changed
        until a pass has nothing left to upload or fail, then write the marker.

        Retries with backoff within ``timeout``; ``stop`` (the agent's
        shutdown) ends it early. True when the marker is in the bucket.
        """
        deadline = time.monotonic() + timeout
        self.stop(timeout=max(0.0, min(30.0, deadline - time.monotonic())))
        delay = RETRY_FIRST
        while True:
            result = self.sync(stop)
            stopped = stop is not None and stop.is_set()
            if not result.failed and not result.uploaded and not stopped:
                marker = self.marker(exit_code, result)
                try:
                    post_object(self.target, MARKER_KEY, marker, self.timeout)
                except ReportWriteError as exc:
                    result.failed.append((MARKER_NAME, str(exc)))
                else:
                    log.info("outputs: final upload complete (%d files)", len(self.done))
                    self._tell(complete=True, error=None)
                    return True
            if stopped:
                log.warning("outputs: final upload interrupted by shutdown")
                return False
            if result.failed:
                remaining = deadline - time.monotonic()
                path, why = result.failed[0]
                if remaining <= 0:
                    log.error(
                        "outputs: final upload failed after %g s: %d file(s) not uploaded "
                        "(%s: %s)", timeout, len(result.failed), path, why,
                    )  # fmt: skip
                    return False
                log.warning("outputs: %s not uploaded (%s); retrying in %g s", path, why, delay)
                if stop is not None:
                    if stop.wait(min(delay, remaining)):
                        continue
                else:
                    time.sleep(min(delay, remaining))
                delay = min(delay * 2, RETRY_MAX)

    def marker(self, exit_code: int | None, last: SyncResult) -> bytes:
        """The completion marker for the directory as it is now."""
        present = dict(walk(self.directory)) if self.directory.is_dir() else {}
        files = [
            {"path": path, "size": up.size, "sha256": up.sha256}
            for path, up in sorted(self.done.items())
            if path in present
        ]
        skipped = [
            {"path": path, "size": size, "reason": reason}
            for path, (size, reason) in sorted(last.skipped.items())
        ]
        document: dict[str, Any] = {
            "version": MARKER_VERSION,
            "complete": True,
            "time": round(self._wall(), 3),
            "exit_code": exit_code,
            "files": files,
            "skipped": skipped,
            "bytes": sum(f["size"] for f in files),
        }
        return json.dumps(document, indent=1, sort_keys=True).encode()
