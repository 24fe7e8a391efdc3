"""Wait until every expected peer resolves through CoreDNS.

One poll is ONE SRV query for ``_tensorflow._tcp.<zone>`` to the instance's
own CoreDNS: its cost to this agent does not grow with the cluster. The
question carries tfzone's hold option (``coredns/tfzone``: EDNS0 65002,
"answer once this many members are registered, at most ``hold`` seconds"),
so the agent holds no etcd watch of its own: tfzone already follows etcd,
and answers the held question the moment its watch delivers the last claim.
On a cluster of N instances etcd then feeds N watch streams (one per
instance's CoreDNS), not 2N.

States of ``wait``:

    ASK      send the held question                -> COMPLETE, INCOMPLETE, ERROR
    INCOMPLETE  the hold ran out (a peer is still missing): ASK again at once;
             an answer well before the hold (a server that does not hold,
             or a stale record filling the count): back off, then ASK
    ERROR    no answer (CoreDNS not up yet, or restarting): back off
             (``interval`` doubling to ``max_interval``), then ASK
    COMPLETE every expected member is in the answer; unless turned off
             (hosts whose system resolver does not use CoreDNS),
             ``getaddrinfo`` - what TensorFlow's gRPC uses - must return
             each peer's address from that answer, else back off and ASK.
             The system resolver is asked only after the SRV answer is
             complete, so it never caches a denial for a peer that has not
             registered yet.                        -> PASSED
    any state past the deadline                     -> BarrierTimeout, naming
             the members still missing

When ``stop`` is set (the agent's shutdown), ``wait`` raises
``InterruptedError`` at once, in a back-off or in a held question.
"""

from __future__ import annotations

import logging
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
        hold: float = 10.0,
        interval: float = 0.1,
        max_interval: float = 2.0,
        progress_every: float = 10.0,
        resolve: Callable[[str, int], set[str]] = system_resolves,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dns = dns
        self.zone = zone
        self.expected = frozenset(expected)
        self.check_system_resolver = check_system_resolver
        self.hold = hold
        self.interval = interval
        self.max_interval = max_interval
        self.progress_every = progress_every
        self.resolve = resolve
        self.now = now
        self.polls = 0
        self._missing: list[str] | None = None  # None: no answer yet
        self._lock = threading.Lock()

    def progress(self) -> tuple[int, int, list[str]] | None:
        """(expected members registered, expected, the missing labels) from
        the last answer, for the agent's report; None before any answer."""
        with self._lock:
            missing = None if self._missing is None else list(self._missing)
        if missing is None:
            return None
        return len(self.expected) - len(missing), len(self.expected), missing

    def wait(self, timeout: float, stop: threading.Event | None = None) -> dict[Member, Endpoint]:
        """Return every expected member's endpoint, or raise ``BarrierTimeout``.

        ``stop`` (set by a signal handler) ends the wait early with
        ``InterruptedError``, a held question included.
        """
        stop = stop if stop is not None else threading.Event()
        deadline = self.now() + timeout
        next_progress = self.now() + self.progress_every
        delay = self.interval
        missing: list[str] = sorted(m.label for m in self.expected)
        while True:
            if stop.is_set():
                raise InterruptedError("barrier interrupted")
            asked = self.now()
            hold = max(0.0, min(self.hold, deadline - asked))
            found, missing, answered = self._poll(hold, stop)
            if found is not None:
                log.info("barrier passed: all %d members resolve", len(self.expected))
                return found
            now = self.now()
            if now >= deadline:
                raise BarrierTimeout(timeout, missing)
            if now >= next_progress:
                log.info(
                    "barrier: %d/%d members resolve; waiting for %s",
                    len(self.expected) - len(missing), len(self.expected), ", ".join(missing),
                )  # fmt: skip
                next_progress = now + self.progress_every
            if answered and hold > 0 and now - asked >= hold / 2:
                delay = self.interval  # held as asked: ask again at once
                continue
            if stop.wait(min(delay, deadline - now)):
                raise InterruptedError("barrier interrupted")
            delay = min(delay * 2, self.max_interval)

    def _poll(
        self, hold: float, stop: threading.Event
    ) -> tuple[dict[Member, Endpoint] | None, list[str], bool]:
        """(all endpoints, [], True) when the barrier holds, else (None,
        missing labels, whether CoreDNS answered the set it has)."""
        self.polls += 1
        try:
            members = self.dns.members(
                self.zone, expected=len(self.expected), hold=hold, interrupt=stop
            )
        except DNSQueryError as exc:
            log.debug("barrier poll failed: %s", exc)
            return None, sorted(m.label for m in self.expected), False
        missing = sorted(m.label for m in self.expected - members.keys())
        with self._lock:
            self._missing = missing
        if missing:
            return None, missing, True
        found = {m: members[m] for m in self.expected}
        if self.check_system_resolver:
            unresolved = self._unresolved_by_system(found)
            if unresolved:
                return None, [f"{label} (system resolver)" for label in unresolved], False
        return dict(sorted(found.items())), [], True

    def _unresolved_by_system(self, found: Mapping[Member, Endpoint]) -> list[str]:
        return sorted(
            member.label
            for member, endpoint in found.items()
            if endpoint.host_ip not in self.resolve(member.name(self.zone), endpoint.port)
        )
