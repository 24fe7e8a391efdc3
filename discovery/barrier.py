"""Wait until every expected peer resolves through CoreDNS.

One poll is ONE SRV query for ``_tensorflow._tcp.<zone>``: its cost to this
agent does not grow with the cluster. The barrier is woken by a peer's claim
(``wake``, set from an etcd watch on the membership prefix) and otherwise
backs off from ``interval`` to ``max_interval``. While the watch can tell that
etcd does not hold every member yet (``etcd_missing`` names someone), the
barrier does not ask CoreDNS at all: each agent asks about once, not once per
peer's claim, and never caches an incomplete set in CoreDNS for the others.
A broken watch names nobody, so the barrier falls back to polling DNS.
Every agent learns of the last claim at the same moment and asks at once:
CoreDNS (the tfzone plugin) answers from memory, so there is no cache to
warm and nothing to spread out. ``spread`` (default 0) can still delay each
agent by a random fraction of it, for a name server that builds each answer
from etcd. The query goes over TCP at once when the expected members cannot
fit in a UDP answer, so each poll is one query. CoreDNS follows etcd through
its own watch, a moment behind: the question carries the etcd revision at
which this agent saw the set complete (``etcd_revision``), and tfzone
answers once its own watch has reached it. Should an answer still lack a
member that etcd holds, the barrier asks again after ``settle`` (doubling),
not after the ordinary back-off.

The barrier passes when the SRV answer lists every expected member, and then
- unless turned off for hosts whose system resolver does not use CoreDNS -
when ``getaddrinfo`` (what TensorFlow's gRPC uses) returns each peer's address
from that answer. The system resolver is asked only after the SRV answer is
complete, so it never caches a denial for a peer that has not registered yet.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from tfcluster.discovery.dns import DNSClient, DNSQueryError, Endpoint
from tfcluster.discovery.records import Member

log = logging.getLogger(__name__)


class BarrierTimeout(TimeoutError):
    """Some peers did not resolve in time; the message names them."""

    def __init__(self, timeout: float, missing: Iterable[str]) -> None:
        self.missing = sorted(missing)
        super().__init__(
            f"barrier timed out after {timeout:g} s; still missing: {', '.join(self.missing)}"
        )


def system_resolves(name: str, port: int) -> set[str]:
    """The addresses ``getaddrinfo`` gives for ``name`` (empty if none)."""
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return set()
    return {str(info[4][0]) for info in infos}


class Barrier:
    """One agent's wait for its peers; ``wait`` may be called once."""

    def __init__(
        self,
        dns: DNSClient,
        zone: str,
        expected: Iterable[Member],
        *,
        check_system_resolver: bool = True,
        wake: threading.Event | None = None,
        etcd_missing: Callable[[], list[str]] | None = None,
        etcd_revision: Callable[[], int] | None = None,
        interval: float = 0.1,
        max_interval: float = 2.0,
        progress_every: float = 10.0,
        spread: float = 0.0,
        settle: float = 0.005,
        rng: random.Random | None = None,
        resolve: Callable[[str, int], set[str]] = system_resolves,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dns = dns
        self.zone = zone
        self.expected = frozenset(expected)
        self.check_system_resolver = check_system_resolver
        self.wake = wake if wake is not None else threading.Event()
        self.etcd_missing = etcd_missing
        self.etcd_revision = etcd_revision
        self.interval = interval
        self.max_interval = max_interval
        self.progress_every = progress_every
        self.spread = spread
        self.settle = settle
        self.rng = rng if rng is not None else random.Random()
        self.resolve = resolve
        self.now = now
        self.polls = 0

    def wait(self, timeout: float, stop: threading.Event | None = None) -> dict[Member, Endpoint]:
        """Return every expected member's endpoint, or raise ``BarrierTimeout``.

        ``stop`` (set by a signal handler) ends the wait early with
        ``InterruptedError``.
        """
        deadline = self.now() + timeout
        next_progress = self.now() + self.progress_every
        delay = self.interval
        not_before: float | None = None  # set once etcd holds every member
        missing: list[str] = sorted(m.label for m in self.expected)
        behind = 0  # answers from CoreDNS that lacked members etcd holds
        while True:
            self.wake.clear()
            now = self.now()
            absent_in_etcd = self.etcd_missing() if self.etcd_missing is not None else []
            if not_before is None and not absent_in_etcd:
                not_before = now + (self.rng.uniform(0, self.spread) if self.spread > 0 else 0.0)
            if absent_in_etcd:
                missing = absent_in_etcd
            elif not_before is not None and now >= not_before:
                found, missing = self._poll()
                if found is not None:
                    log.info("barrier passed: all %d members resolve", len(self.expected))
                    return found
                if self.etcd_missing is not None:
                    behind += 1
            now = self.now()
            if now >= deadline:
                raise BarrierTimeout(timeout, missing)
            if now >= next_progress:
                log.info(
                    "barrier: %d/%d members resolve; waiting for %s",
                    len(self.expected) - len(missing), len(self.expected), ", ".join(missing),
                )  # fmt: skip
                next_progress = now + self.progress_every
            pause = min(delay, deadline - now)
            if not_before is not None and now < not_before:
                pause = min(pause, not_before - now)
            elif behind and self.etcd_missing is not None and not self.etcd_missing():
                pause = min(pause, self.settle * 2 ** min(behind - 1, 10))
            woken = self.wake.wait(pause)
            if stop is not None and stop.is_set():
                raise InterruptedError("barrier interrupted")
            delay = self.interval if woken else min(delay * 2, self.max_interval)

    def _poll(self) -> tuple[dict[Member, Endpoint] | None, list[str]]:
        """(all endpoints, []) when the barrier holds, else (None, missing labels)."""
        self.polls += 1
        try:
            revision = self.etcd_revision() if self.etcd_revision is not None else None
            members = self.dns.members(
                self.zone, expected=len(self.expected), min_revision=revision
            )
        except DNSQueryError as exc:
            log.debug("barrier poll failed: %s", exc)
            return None, sorted(m.label for m in self.expected)
        missing = sorted(m.label for m in self.expected - members.keys())
        if missing:
            return None, missing
        found = {m: members[m] for m in self.expected}
        if self.check_system_resolver:
            unresolved = self._unresolved_by_system(found)
            if unresolved:
                return None, [f"{label} (system resolver)" for label in unresolved]
        return dict(sorted(found.items())), []

    def _unresolved_by_system(self, found: Mapping[Member, Endpoint]) -> list[str]:
        return sorted(
            member.label
            for member, endpoint in found.items()
            if endpoint.host_ip not in self.resolve(member.name(self.zone), endpoint.port)
        )
