"""Follow the cluster's membership in etcd, so the barrier knows when to look.

The agent already talks to etcd; a watch on the membership prefix tells it
the moment a peer claims (or loses) a name. ``MembershipWatch`` keeps the
set of members etcd holds and wakes the barrier when that set becomes
complete (or stops being complete), so the barrier asks CoreDNS only when
etcd holds every expected member, instead of once per peer event. A broken
watch stream (etcd restarted) is not trusted: ``missing`` then names nobody
and the barrier falls back to polling DNS.

The watch goes through etcd's HTTP/JSON gateway (``/v3/kv/range`` then
``/v3/watch`` from the next revision, on the client port), read with the
standard library: one JSON line per event costs a few tens of microseconds,
where the gRPC client (etcd3) spends about 0.3 ms of CPU per event - 80 ms
for a 256-member cluster's claims, on the barrier's critical path.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import socket
import threading
from collections.abc import Iterable
from typing import Any

from tfcluster.discovery import records
from tfcluster.discovery.etcdclient import parse_endpoint

log = logging.getLogger(__name__)


class WatchError(Exception):
    """etcd's gateway refused or ended the watch."""


def prefix_range_end(prefix: str) -> bytes:
    """etcd's range_end for every key starting with ``prefix``."""
    end = bytearray(prefix.encode())
    end[-1] += 1
    return bytes(end)


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


class MembershipWatch:
    """The members under ``srv_prefix`` as seen through one etcd watch."""

    def __init__(
        self,
        endpoint: str,
        cluster: str,
        zone: str,
        expected: Iterable[records.Member],
        wake: threading.Event,
        timeout: float = 5.0,
    ) -> None:
        self.host, self.port = parse_endpoint(endpoint)
        self.path = records.cluster_path(cluster)
        self.zone = zone
        self.prefix = records.srv_prefix(self.path, zone)
        self.expected = frozenset(expected)
        self.wake = wake
        self.timeout = timeout
        self._lock = threading.Lock()
        self._present: set[records.Member] = set()
        # Labels of expected members etcd does not hold, kept up to date per
        # event: the barrier asks after every event, and recomputing from
        # the whole set each time would cost O(N) per event.
        self._missing: set[str] = {member.label for member in self.expected}
        self._broken = True
        self._revision = 0  # the latest mod_revision seen under the prefix
        self._stopping = threading.Event()
        self._conn: http.client.HTTPConnection | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Read what is there at revision R, then watch from R + 1 (so no claim is missed)."""
        try:
            revision, keys, latest = self._list()
            conn, stream = self._open(revision + 1)
        except (OSError, ValueError, KeyError, http.client.HTTPException, WatchError) as exc:
            # The watch only saves DNS queries; polling still works.
            log.warning("no etcd watch on %s (%s); polling DNS only", self.prefix, exc)
            return
        with self._lock:
            for key in keys:
                self._apply(key, present=True)
            self._revision = latest
            self._broken = False
        self._conn = conn
        self._thread = threading.Thread(
            target=self._follow, args=(stream,), name=f"watch {self.prefix}", daemon=True
        )
        self._thread.start()
        self.wake.set()

    def revision(self) -> int:
        """The etcd revision of the latest change seen (0 before any)."""
        with self._lock:
            return self._revision

    def missing(self) -> list[str]:
        """Expected members etcd does not hold; empty also when the watch cannot tell."""
        with self._lock:
            if self._broken or not self._missing:
                return []
            return sorted(self._missing)

    def progress(self) -> tuple[int, int, list[str]] | None:
        """(expected members etcd holds, expected, the missing labels) for the
        agent's report; None while the watch cannot tell (not started, broken)."""
        with self._lock:
            if self._broken:
                return None
            missing = list(self._missing)
        return len(self.expected) - len(missing), len(self.expected), missing

    def stop(self) -> None:
        self._stopping.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            # The reader sees end of stream; the connection is closed after
            # it has returned, never under it.
            with contextlib.suppress(OSError):  # already closed by etcd
                conn.sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(self.timeout)
        if conn is not None:
            conn.close()
        self._conn = self._thread = None

    def _post(self, conn: http.client.HTTPConnection, path: str, body: dict[str, Any]) -> Any:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        return conn.getresponse()

    def _list(self) -> tuple[int, list[str], int]:
        """(the read's revision, the keys, the latest mod_revision among them)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            body = {
                "key": _b64(self.prefix),
                "range_end": _b64(prefix_range_end(self.prefix)),
                "keys_only": True,
            }
            response = self._post(conn, "/v3/kv/range", body)
            data = json.loads(response.read())
            if response.status != 200:
                raise WatchError(f"range: HTTP {response.status}: {data}")
            kvs = data.get("kvs", [])
            keys = [base64.b64decode(kv["key"]).decode() for kv in kvs]
            latest = max((int(kv.get("mod_revision", 0)) for kv in kvs), default=0)
            return int(data["header"]["revision"]), keys, latest
        finally:
            conn.close()

    def _open(self, start_revision: int) -> tuple[http.client.HTTPConnection, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            create = {
                "key": _b64(self.prefix),
                "range_end": _b64(prefix_range_end(self.prefix)),
                "start_revision": start_revision,
            }
            stream = self._post(conn, "/v3/watch", {"create_request": create})
            if stream.status != 200:
                raise WatchError(f"watch: HTTP {stream.status}")
            first = json.loads(stream.readline() or b"{}")
            if not first.get("result", {}).get("created"):
                raise WatchError(f"watch not created: {first}")
            if conn.sock is not None:
                conn.sock.settimeout(None)  # a quiet cluster sends nothing for long
            return conn, stream
        except BaseException:
            conn.close()
            raise

    def _follow(self, stream: Any) -> None:
        try:
            while True:
                line = stream.readline()
                if not line:
                    raise WatchError("etcd closed the watch stream")
                message = json.loads(line)
                result = message.get("result")
                if result is None or result.get("canceled"):
                    raise WatchError(message.get("error") or f"watch canceled: {result}")
                events = result.get("events")
                if not events:
                    continue
                with self._lock:
                    was_complete = not self._missing
                    for event in events:
                        key = base64.b64decode(event["kv"]["key"]).decode()
                        self._apply(key, present=event.get("type") != "DELETE")
                        revision = int(event["kv"].get("mod_revision", 0))
                        self._revision = max(self._revision, revision)
                    changed = was_complete != (not self._missing)
                # The barrier has nothing to do while etcd still lacks
                # someone: wake it only when the set becomes complete (or
                # stops being so), not once per claim.
                if changed:
                    self.wake.set()
        except (OSError, ValueError, KeyError, http.client.HTTPException, WatchError) as exc:
            if self._stopping.is_set():
                return
            log.info("etcd watch ended (%s); polling DNS until the barrier passes", exc)
            with self._lock:
                self._broken = True
            self.wake.set()

    def _apply(self, key: str, present: bool) -> None:
        member = records.member_from_srv_key(self.path, self.zone, key)
        if member is None:
            return
        if present:
            self._present.add(member)
            self._missing.discard(member.label)
        else:
            self._present.discard(member)
            if member in self.expected:
                self._missing.add(member.label)
