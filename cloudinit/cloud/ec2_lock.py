"""The cluster's lock on EC2: the key pair ``tfcluster-lock-<cluster>``.

Key pair names are unique in a region, whatever the VPC, and CreateKeyPair
of a taken name fails atomically (``InvalidKeyPair.Duplicate``): that is the
claim. A key pair costs nothing; its private key is discarded. The holder
and the expiry are tags, so another run can say who holds the cluster and a
lock left by a crashed run expires. Releasing deletes by name once the id is
checked (moto ignores KeyPairId in DeleteKeyPair): a lock another run took
since has another id and stays.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any

import botocore.exceptions
import botocore.parsers

from tfcluster.cloudinit.cloud.aws_errors import as_provider_error, error_code, translate_errors
from tfcluster.cloudinit.cloud.provider import (
    TAG_CLUSTER,
    TAG_LOCK_EXPIRES,
    TAG_LOCK_HOLDER,
    ClusterBusy,
    ClusterLock,
)
from tfcluster.cloudinit.cloud.tags import iso, parse_time, tag_list, tags_of

log = logging.getLogger(__name__)

LOCK_PREFIX = "tfcluster-lock-"


def _lock_of(pair: dict[str, Any], cluster: str) -> ClusterLock:
    """The lock a key pair stands for; one without a readable expiry expires at its creation."""
    tags = tags_of(pair)
    created = pair.get("CreateTime") or datetime.now(timezone.utc)
    return ClusterLock(
        cluster=cluster,
        lock_id=str(pair["KeyPairId"]),
        holder=tags.get(TAG_LOCK_HOLDER, "an unknown holder"),
        expires=parse_time(tags.get(TAG_LOCK_EXPIRES)) or created,
    )


class ClusterLocks:
    """The locks of clusters, through one EC2 client."""

    def __init__(self, ec2: Any) -> None:
        self.ec2 = ec2

    def acquire(self, cluster: str, holder: str, ttl: float) -> ClusterLock:
        name = f"{LOCK_PREFIX}{cluster}"
        for _attempt in range(2):
            expires = datetime.now(timezone.utc) + timedelta(seconds=ttl)
            tags = {TAG_CLUSTER: cluster, TAG_LOCK_HOLDER: holder, TAG_LOCK_EXPIRES: iso(expires)}
            try:
                pair = self.ec2.create_key_pair(
                    KeyName=name,
                    TagSpecifications=[{"ResourceType": "key-pair", "Tags": tag_list(tags)}],
                )
                return ClusterLock(cluster, str(pair["KeyPairId"]), holder, expires)
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) != "InvalidKeyPair.Duplicate":
                    raise as_provider_error(exc, f"taking the lock of cluster {cluster}") from exc
            except (botocore.exceptions.BotoCoreError, botocore.parsers.ResponseParserError) as exc:
                raise as_provider_error(exc, f"taking the lock of cluster {cluster}") from exc
            held = self.find(cluster)
            if held is not None and held.expires > datetime.now(timezone.utc):
                raise ClusterBusy(
                    f"cluster {cluster} is busy: {held.describe()}; wait for it to finish, or "
                    f"if that run is gone, run 'tfcluster unlock --cluster {cluster}'"
                )
            if held is not None:
                log.info("removing the expired lock of cluster %s (%s)", cluster, held.holder)
                self.release(held)
        raise ClusterBusy(f"cluster {cluster} is busy: its lock changed hands twice; try again")

    def release(self, lock: ClusterLock) -> None:
        # Deleted by name once its id is checked (moto ignores KeyPairId in
        # DeleteKeyPair): a lock another run has taken since has another id and stays.
        held = self.find(lock.cluster)
        if held is None or held.lock_id != lock.lock_id:
            return
        with translate_errors(f"releasing the lock of cluster {lock.cluster}"):
            self.ec2.delete_key_pair(KeyName=f"{LOCK_PREFIX}{lock.cluster}")

    def _key_pairs(self, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with translate_errors("listing cluster locks"):
            return list(self.ec2.describe_key_pairs(Filters=filters)["KeyPairs"])

    def find(self, cluster: str) -> ClusterLock | None:
        name = f"{LOCK_PREFIX}{cluster}"
        pairs = self._key_pairs([{"Name": "key-name", "Values": [name]}])
        found = [p for p in pairs if p.get("KeyName") == name]
        return _lock_of(found[0], cluster) if found else None

    def all(self) -> dict[str, ClusterLock]:
        """Every cluster's lock, by cluster name."""
        locks = {}
        for pair in self._key_pairs([{"Name": "tag-key", "Values": [TAG_CLUSTER]}]):
            name = tags_of(pair)[TAG_CLUSTER]
            if pair.get("KeyName") == f"{LOCK_PREFIX}{name}":
                locks[name] = _lock_of(pair, name)
        return locks
