"""Names, etcd keys and record values: pure functions, no I/O.

CoreDNS's etcd plugin maps a DNS name to an etcd key by reversing its labels
under a path (plugin/etcd/msg/path.go): ``ps0.tensorflow.local`` under
``/tfcluster-demo`` is ``/tfcluster-demo/local/tensorflow/ps0``. A query reads
everything below the name's key, so each member writes two keys:

* its address record, at a fixed leaf below its own name
  (``.../local/tensorflow/ps0/tf``), so that a query for ``ps0.<zone>`` is
  answered from the first (prefix) read, and so that the leaf is the one key
  two instances contend for;
* its entry in the membership view, ``<role><index>._tensorflow._tcp.<zone>``
  (``.../local/tensorflow/_tcp/_tensorflow/ps0``), so that ONE SRV query for
  ``_tensorflow._tcp.<zone>`` answers every member with its port, and CoreDNS
  adds each member's address as glue.

Each cluster has its own path, so clusters sharing one etcd never see each
other's records.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

ROLES = ("chief", "ps", "worker")
KEY_ROOT = "/tfcluster"
RECORD_LEAF = "tf"
SRV_SERVICE = "_tensorflow._tcp"

_MEMBER_LABEL = re.compile(r"^(chief|ps|worker)(0|[1-9][0-9]*)$")


@dataclass(frozen=True, order=True)
class Member:
    """One TensorFlow task: a role and its index within the role."""

    role: str
    index: int

    @property
    def label(self) -> str:
        return f"{self.role}{self.index}"

    def name(self, zone: str) -> str:
        """The DNS name TensorFlow dials, e.g. ``worker2.tensorflow.local``."""
        return f"{self.label}.{zone}"


def parse_label(label: str) -> Member | None:
    """``"ps0"`` -> Member("ps", 0); anything else (other names in the zone) -> None."""
    match = _MEMBER_LABEL.match(label)
    if match is None:
        return None
    return Member(match.group(1), int(match.group(2)))


def cluster_path(cluster: str) -> str:
    """The etcd prefix of one cluster; the Corefile's etcd ``path``.

    One path component only: CoreDNS synthesises SRV targets by reversing the
    key below its first component (msg.Domain), so ``/tfcluster/demo`` would
    leak ``demo`` into every target name.
    """
    return f"{KEY_ROOT}-{cluster}"


def job_done_key(path: str) -> str:
    """The key the chief's agent puts when the job is done (``on_chief_exit: down``).

    Under the cluster's path, so ``down`` removes it with the rest and
    clusters sharing one etcd never see each other's, but outside every
    zone's keys: CoreDNS (which reads the whole path) files it under the
    name ``done.job.``, which no zone of a cluster answers.
    """
    return f"{path.rstrip('/')}/job/done"


def srv_name(zone: str) -> str:
    """The membership name: one SRV query for it lists every member."""
    return f"{SRV_SERVICE}.{zone}"


def name_to_key(path: str, name: str) -> str:
    """CoreDNS's msg.Path: reversed labels below ``path``."""
    labels = [label for label in name.rstrip(".").lower().split(".") if label]
    return "/".join([path.rstrip("/"), *reversed(labels)])


def record_key(path: str, zone: str, member: Member) -> str:
    """Key of the member's address record (and of its claim)."""
    return f"{name_to_key(path, member.name(zone))}/{RECORD_LEAF}"


def srv_key(path: str, zone: str, member: Member) -> str:
    """Key of the member's entry in the membership SRV view."""
    return name_to_key(path, f"{member.label}.{srv_name(zone)}")


def zone_prefix(path: str, zone: str) -> str:
    """Prefix holding every record of the zone (for listing and watching)."""
    return name_to_key(path, zone) + "/"


def srv_prefix(path: str, zone: str) -> str:
    """Prefix holding the membership view (for counting and watching)."""
    return name_to_key(path, srv_name(zone)) + "/"


def record_value(host: str, port: int, ttl: int, owner: str = "") -> str:
    """The SkyDNS message CoreDNS reads: an IP ``host`` yields A/AAAA (and SRV
    glue); ``port`` is the SRV port; a small ``ttl`` bounds how long resolvers
    keep an answer after the member has gone. ``owner`` (the instance id) is
    ours alone: CoreDNS ignores fields it does not know."""
    value: dict[str, object] = {"host": host, "port": port, "ttl": ttl}
    if owner:
        value["owner"] = owner
    return json.dumps(value, sort_keys=True)


def parse_value(raw: bytes | str) -> dict[str, object]:
    """The JSON of a record value; raises ValueError for anything else."""
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"record value is not a JSON object: {raw!r}")
    return value


def member_from_srv_key(path: str, zone: str, key: str) -> Member | None:
    """Inverse of srv_key for keys found under srv_prefix."""
    prefix = srv_prefix(path, zone)
    if not key.startswith(prefix):
        return None
    return parse_label(key[len(prefix) :])
