"""Claim, hold and release one member's name in etcd.

A claim is ONE transaction: if neither the member's record key nor its
membership (SRV view) key exists (``create_revision == 0``), both are put
under a fresh lease; otherwise nothing is written. There is no get-then-put,
so two instances racing for ``worker2`` cannot both win. A name whose holder's
lease expired has no keys left, so it is free again. The one exception is a
name held by *this* instance (the agent restarted before its old lease ran
out): that stale claim is deleted, guarded by its revision, and claimed anew.

Lifecycle of a ``Registry`` (the agent drives it)::

    UNCLAIMED --claim()--> HELD --keepalive() False--> UNCLAIMED (claim again)
    HELD --release()--> RELEASED (lease revoked: CoreDNS stops answering at once)

etcd being unreachable is not a lost lease: ``keepalive`` reports it as
``EtcdUnavailable`` and the caller retries until the lease would have expired.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from tfcluster.discovery import records
from tfcluster.discovery.etcdclient import etcd3
from tfcluster.discovery.identity import Identity

log = logging.getLogger(__name__)

_ETCD_ERRORS = (etcd3.exceptions.Etcd3Exception, grpc.RpcError)


class RegistryError(RuntimeError):
    """Base of the registry's failures."""


class NameTaken(RegistryError):
    """Another live instance holds the name: do not take it."""


class EtcdUnavailable(RegistryError):
    """etcd did not answer within the call's deadline: retry later."""


@dataclass(frozen=True)
class Holder:
    """Who holds a name, as its record says."""

    instance_id: str
    host: str
    port: str


class Registry:
    """One member's name in one cluster's etcd prefix."""

    def __init__(
        self,
        client: Any,
        cluster: str,
        zone: str,
        lease_ttl: int,
        record_ttl: int,
        follow_job: bool = False,
    ):
        """``follow_job``: this member will look for the job-done key (on_chief_exit
        down), so its claim also reads the claim's revision; others skip that read."""
        self.client = client
        self.follow_job = follow_job
        self.path = records.cluster_path(cluster)
        self.zone = zone
        self.lease_ttl = lease_ttl
        self.record_ttl = record_ttl
        self.lease: Any = None
        self.identity: Identity | None = None
        self.claim_revision = 0
        """The etcd revision at which this member's name was first claimed."""

    def keys(self, identity: Identity) -> tuple[str, str]:
        member = identity.member
        return (
            records.record_key(self.path, self.zone, member),
            records.srv_key(self.path, self.zone, member),
        )

    def claim(self, identity: Identity) -> None:
        """Take the name of ``identity.member`` or raise ``NameTaken``."""
        record_key, srv_key = self.keys(identity)
        value = records.record_value(
            identity.ip, identity.port, self.record_ttl, owner=identity.instance_id
        )
        txn = self.client.transactions
        holder = None
        for _attempt in range(2):
            with _etcd("grant a lease"):
                lease = self.client.lease(self.lease_ttl)
            with _etcd(f"claim {identity.member.name(self.zone)}"):
                won, responses = self.client.transaction(
                    compare=[txn.create(record_key) == 0, txn.create(srv_key) == 0],
                    success=[
                        txn.put(record_key, value, lease=lease),
                        txn.put(srv_key, value, lease=lease),
                    ],
                    failure=[txn.get(record_key), txn.get(srv_key)],
                )
            if won:
                self.lease, self.identity = lease, identity
                log.info("claimed %s (lease %x)", identity.member.name(self.zone), lease.id)
                if self.follow_job:
                    self._note_claim_revision(record_key)
                return
            self._revoke(lease)
            held = [kv for response in responses for kv in response]
            holder = _holder(held)
            if holder is None or holder.instance_id != identity.instance_id:
                break
            log.info("removing this instance's stale claim on %s", identity.member.label)
            self._delete_stale(held)
        raise NameTaken(_taken_message(identity, self.zone, holder))

    def keepalive(self) -> bool:
        """Refresh the lease; False if it is gone (expired or revoked)."""
        if self.lease is None:
            return False
        with _etcd("refresh the lease"):
            responses = self.lease.refresh()
        alive = bool(responses) and all(r.TTL > 0 for r in responses)
        if not alive:
            log.warning("lease %x is gone; the name must be claimed again", self.lease.id)
            self.lease = None
        return alive

    def release(self) -> None:
        """Revoke the lease: both keys disappear from etcd and from DNS."""
        lease, self.lease = self.lease, None
        if lease is not None:
            self._revoke(lease)

    def _note_claim_revision(self, record_key: str) -> None:
        """Remember the etcd revision of the claim (one read): a job-done key
        older than that belongs to an earlier job of the same cluster name."""
        try:
            with _etcd("read the claim's revision"):
                _value, meta = self.client.get(record_key)
        except RegistryError as exc:
            log.warning("%s; an earlier job's job-done key could not be told apart", exc)
            return
        if meta is not None and not self.claim_revision:  # the first claim: the job's start
            self.claim_revision = int(meta.create_revision)

    def mark_job_done(self, value: dict[str, object]) -> None:
        """Put the cluster's job-done key (``value`` as JSON), under no lease:
        it must outlive the chief's own name, which leaves at once after."""
        with _etcd("mark the job done"):
            self.client.put(records.job_done_key(self.path), json.dumps(value, sort_keys=True))

    def job_done(self) -> dict[str, object] | None:
        """The job-done key's value, or None while the job runs.

        A key written before this member's claim is left alone: the chief
        marks the job done after the barrier, so after every claim of its
        job; an older key is an earlier job's under the same cluster name
        (an etcd that ``down`` does not remove). A replacement instance
        claiming after the job ended stays up (until max_lifetime).
        """
        with _etcd("read the job-done key"):
            value, meta = self.client.get(records.job_done_key(self.path))
        if value is None:
            return None
        if meta is not None and int(meta.mod_revision) < self.claim_revision:
            return None
        try:
            found = json.loads(value)
        except ValueError:
            found = None
        return found if isinstance(found, dict) else {"value": value.decode(errors="replace")}

    def _revoke(self, lease: Any) -> None:
        try:
            with _etcd("revoke the lease"):
                lease.revoke()
        except EtcdUnavailable as exc:
            log.warning("%s; the lease will expire by itself in %d s", exc, self.lease_ttl)
        except RegistryError:
            pass  # already expired: nothing to revoke

    def _delete_stale(self, held: list[tuple[bytes, Any]]) -> None:
        txn = self.client.transactions
        for _value, meta in held:
            with _etcd("delete a stale claim"):
                self.client.transaction(
                    compare=[txn.mod(meta.key) == meta.mod_revision],
                    success=[txn.delete(meta.key)],
                    failure=[],
                )


@contextmanager
def _etcd(what: str) -> Iterator[None]:
    """Name the failure of one etcd call: unreachable (retry) or refused."""
    try:
        yield
    except (etcd3.exceptions.ConnectionFailedError, etcd3.exceptions.ConnectionTimeoutError):
        raise EtcdUnavailable(f"etcd did not answer while trying to {what}") from None
    except _ETCD_ERRORS as exc:
        raise RegistryError(f"etcd refused to {what}: {exc}") from None


def list_records(client: Any, cluster: str, zone: str) -> list[tuple[str, dict[str, object]]]:
    """Every record of the cluster's zone as etcd holds it: (key, value) sorted by key."""
    prefix = records.zone_prefix(records.cluster_path(cluster), zone)
    with _etcd("list records"):
        items = list(client.get_prefix(prefix))
    result = []
    for value, meta in items:
        try:
            result.append((meta.key.decode(), records.parse_value(value)))
        except ValueError:
            result.append((meta.key.decode(), {"unparsable": value.decode(errors="replace")}))
    return sorted(result, key=lambda item: item[0])


def held_names(client: Any, cluster: str, zone: str) -> set[str]:
    """The member names whose address record etcd holds now (one range read)."""
    path = records.cluster_path(cluster)
    prefix = records.zone_prefix(path, zone)
    names = set()
    for key, _value in list_records(client, cluster, zone):
        label = key[len(prefix) :].split("/")[0]
        member = records.parse_label(label)
        if member is not None and key == records.record_key(path, zone, member):
            names.add(member.name(zone))
    return names


def _holder(held: list[tuple[bytes, Any]]) -> Holder | None:
    for value, _meta in held:
        try:
            data = records.parse_value(value)
        except ValueError:
            continue
        return Holder(
            str(data.get("owner", "?")), str(data.get("host", "?")), str(data.get("port"))
        )
    return None


def _taken_message(identity: Identity, zone: str, holder: Holder | None) -> str:
    name = identity.member.name(zone)
    if holder is None:
        return f"{name} is held by another instance"
    return f"{name} is held by instance {holder.instance_id} at {holder.host}:{holder.port}"
