"""The two loops that wait on the agents' reports: ``up`` waiting until the
cluster is ready, and ``logs -f`` following one agent's log.

Both are bounded in time, poll at a fixed, modest rate (each poll is one
LIST plus one GET per agent, or one GET), and take the reading as a function
so that tests drive them with reports a real `Reporter` wrote. Neither
prints: what to show goes to a callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tfcluster.cloudinit.observe.status import NO_REPORT, Progress, StatusRow
from tfcluster.discovery.waiting import WaitTimeout, wait_for

POLL_INTERVAL = 2.0
"""Seconds between two readings of the bucket while waiting."""
READY_TIMEOUT = 900.0
"""Seconds ``up`` waits by default: boot, install (pip, TensorFlow), claim, barrier, TF start."""
FOLLOW_TIMEOUT = 3600.0
"""Seconds ``logs -f`` follows at most."""
LOG_LINES_SHOWN = 10
"""Log lines of a stuck agent ``up`` shows."""

_STAGE = {"STARTING": 1, "IDENTIFY": 1, "CLAIM": 2, "BARRIER": 3, "CONFIGURE": 4, "SERVE": 5}


@dataclass(frozen=True)
class Snapshot:
    """One reading: the agents' rows, their counts, and EC2's running instances."""

    rows: tuple[StatusRow, ...]
    progress: Progress
    running: int
    """Expected task instances EC2 reports running."""
    instances: tuple[tuple[str, str], ...] = ()
    """(label, instance id) of the expected instances EC2 lists."""

    def instance_of(self, name: str) -> str | None:
        return dict(self.instances).get(name)

    def program_ended(self) -> str | None:
        """The chief's program state once it has ended (``exited 0``), else None.

        A short job can end before the wait's last reading: its instances may
        then be shutting down (``on_chief_exit: down``).
        """
        chief = next((r for r in self.rows if r.name == "chief0"), None)
        if chief is not None and chief.program.startswith(("exited", "failed")):
            return chief.program
        return None

    def line(self) -> str:
        """The live progress line of ``up``."""
        p = self.progress
        m = p.expected
        text = (
            f"instances running {self.running}/{m}, names claimed {p.claimed}/{m}, "
            f"barrier passed {p.barrier_passed}/{m}, TF serving {p.serving}/{m}"
        )
        return text + (f" (failed: {', '.join(p.failed)})" if p.failed else "")


class NotReady(Exception):
    """The cluster did not get ready: an agent failed, or the time ran out.

    ``row`` is the agent held to be stuck (the failed one, else the one
    furthest behind), with its state and last log lines.
    """

    def __init__(self, reason: str, row: StatusRow | None, snapshot: Snapshot | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.row = row
        self.snapshot = snapshot


def _rank(row: StatusRow) -> tuple[int, int]:
    """How far an agent got: (stage, not stale); lower is further behind."""
    if row.state == NO_REPORT:
        return (0, 0)
    return (_STAGE.get(row.state, 1), 0 if row.stale else 1)


def stuck_agent(snapshot: Snapshot) -> StatusRow | None:
    """The agent to name: the first failed one, else the one furthest behind."""
    rows = {r.name: r for r in snapshot.rows}
    for name in snapshot.progress.failed:
        if name in rows:
            return rows[name]
    behind = [r for r in snapshot.rows if not _ready(r)]
    return min(behind, key=_rank) if behind else None


def _ready(row: StatusRow) -> bool:
    return (row.state == "SERVE" and row.program in ("serving", "running")) or (
        row.program == "exited 0"
    )


def wait_ready(
    look: Callable[[], Snapshot],
    *,
    timeout: float = READY_TIMEOUT,
    on_snapshot: Callable[[Snapshot], None] = lambda _s: None,
    interval: float = POLL_INTERVAL,
    now: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Snapshot:
    """Read (``look``) until every expected agent serves; the last reading.

    `NotReady` at once when an agent reports a failure (its own exit code or
    its TensorFlow process's), and when ``timeout`` runs out, naming the
    stuck agent. Each reading goes to ``on_snapshot`` (the live line).
    """
    last: list[Snapshot] = []

    def check() -> Snapshot | None:
        snapshot = look()
        last[:] = [snapshot]
        on_snapshot(snapshot)
        if snapshot.progress.failed:
            row = stuck_agent(snapshot)
            raise NotReady(f"{snapshot.progress.failed[0]} failed", row, snapshot)
        return snapshot if snapshot.progress.ready else None

    try:
        return wait_for(
            check,
            what="every agent to serve",
            timeout=timeout,
            interval=interval,
            max_interval=interval,
            now=now,
            sleep=sleep,
        )
    except WaitTimeout:
        snapshot = last[0] if last else None
        row = stuck_agent(snapshot) if snapshot is not None else None
        raise NotReady(f"not ready after {timeout:g} s", row, snapshot) from None


def new_lines(row: StatusRow, seen_total: int | None) -> tuple[list[str], int]:
    """The lines of ``row``'s log tail not shown yet, with a note for lines lost.

    ``seen_total`` is the ``log_total`` of the last report shown (None: none
    yet). A report keeps only the last lines, so lines logged between two
    readings beyond the tail's length are lost; a smaller total than before
    means a new agent took the name (a replacement instance).
    """
    log, total = list(row.log), row.log_total
    if seen_total is None or total < seen_total:
        fresh, note = len(log), "" if seen_total is None else "(a new agent: log starts again)"
        lost = max(0, total - len(log))
    else:
        fresh = total - seen_total
        lost = max(0, fresh - len(log))
        note = ""
    shown = log[len(log) - min(fresh, len(log)) :] if fresh > 0 else []
    if lost:
        shown.insert(0, f"... {lost} line(s) not reported ...")
    if note:
        shown.insert(0, note)
    return shown, total


def finished(row: StatusRow) -> str | None:
    """Why following ``row`` ends: its agent exited, or its program ended; None: not yet."""
    if row.exit_code is not None:
        return f"agent exited with code {row.exit_code}" + (f": {row.detail}" if row.detail else "")
    if row.program.startswith(("exited", "failed")):
        return f"program {row.program}"
    return None


def follow_log(
    read: Callable[[], StatusRow | None],
    emit: Callable[[Sequence[str]], None],
    *,
    follow: bool = True,
    timeout: float = FOLLOW_TIMEOUT,
    interval: float = POLL_INTERVAL,
    now: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Show an agent's log as reported; with ``follow``, new lines as they come.

    Returns why it stopped: the agent exited or its program ended (`finished`),
    ``no report`` (not following and none yet), ``shown`` (not following), or
    a timeout after ``timeout`` seconds.
    """
    seen: list[int | None] = [None]

    def check() -> str | None:
        row = read()
        if row is None:
            return None if follow else "no report"
        lines, seen[0] = new_lines(row, seen[0])
        if lines:
            emit(lines)
        if not follow:
            return "shown"
        return finished(row)

    try:
        return wait_for(
            check,
            what="the agent's program to end",
            timeout=timeout,
            interval=interval,
            max_interval=interval,
            now=now,
            sleep=sleep,
        )
    except WaitTimeout as exc:
        return str(exc)
