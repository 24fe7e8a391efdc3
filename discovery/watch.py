"""Follow the cluster's membership in etcd, so the barrier knows when to look.

The agent already talks to etcd; a watch on the membership prefix tells it
the moment a peer claims (or loses) a name. ``MembershipWatch`` wakes the
barrier on every change and keeps the set of members etcd holds, so the
barrier asks CoreDNS only when etcd holds every expected member, instead of
once per peer event. A broken watch stream (etcd restarted) is not trusted:
``missing`` then names nobody and the barrier falls back to polling DNS.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from tfcluster.discovery import records
from tfcluster.discovery.etcdclient import etcd3

log = logging.getLogger(__name__)


class MembershipWatch:
    """The members under ``srv_prefix`` as seen through one etcd watch."""

    def __init__(
        self,
        client: Any,
        cluster: str,
        zone: str,
        expected: Iterable[records.Member],
        wake: threading.Event,
    ) -> None:
        self.client = client
        self.path = records.cluster_path(cluster)
        self.zone = zone
        self.prefix = records.srv_prefix(self.path, zone)
        self.expected = frozenset(expected)
        self.wake = wake
        self._lock = threading.Lock()
        self._present: set[records.Member] = set()
        # Labels of expected members etcd does not hold, kept up to date per
        # event: the barrier asks after every event, and recomputing from
        # the whole set each time would cost O(N) per event.
        self._missing: set[str] = {member.label for member in self.expected}
        self._broken = True
        self._watch_id: Any = None

    def start(self) -> None:
        """Watch first, then read what is already there (so no claim is missed)."""
        try:
            self._watch_id = self.client.add_watch_prefix_callback(self.prefix, self._on_event)
            existing = list(self.client.get_prefix(self.prefix, keys_only=True))
        except Exception as exc:  # the watch only saves DNS queries; polling still works
            log.warning("no etcd watch on %s (%s); polling DNS only", self.prefix, exc)
            return
        with self._lock:
            for _value, meta in existing:
                self._apply(meta.key, present=True)
            self._broken = False
        self.wake.set()

    def missing(self) -> list[str]:
        """Expected members etcd does not hold; empty also when the watch cannot tell."""
        with self._lock:
            if self._broken or not self._missing:
                return []
            return sorted(self._missing)

    def stop(self) -> None:
        if self._watch_id is not None:
            try:
                self.client.cancel_watch(self._watch_id)
            except Exception as exc:  # the watch dies with the client anyway
                log.debug("cancel_watch: %s", exc)
            self._watch_id = None

    def _on_event(self, response: Any) -> None:
        with self._lock:
            if isinstance(response, Exception):
                log.info("etcd watch ended (%s); polling DNS until the barrier passes", response)
                self._broken = True
            else:
                for event in response.events:
                    self._apply(event.key, present=not isinstance(event, etcd3.events.DeleteEvent))
        self.wake.set()

    def _apply(self, key: bytes, present: bool) -> None:
        member = records.member_from_srv_key(self.path, self.zone, key.decode())
        if member is None:
            return
        if present:
            self._present.add(member)
            self._missing.discard(member.label)
        else:
            self._present.discard(member)
            if member in self.expected:
                self._missing.add(member.label)
