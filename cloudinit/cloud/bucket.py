"""The cluster bucket on S3: what `up` stages for instances, by content address.

One bucket per cluster (DESIGN.md section 10). Its name is a pure function of
the cluster, the account and the region (`bucket_name`), so ``down`` finds it
again even if the process died between CreateBucket and PutBucketTagging, and
``ls`` finds it by its tag. Every call goes through the same client settings
as EC2 (timeouts, bounded retries) and the same error table (`aws_errors`).

Names are global across every AWS account. The name carries a hash of the
account, region and cluster, so two accounts (or regions) using the same
cluster name get different buckets. A bucket of that name that another
account owns, or that is tagged for another cluster, is refused in one line:
the name is never varied to dodge it, since ``down`` and ``ls`` must find the
same bucket again.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Sequence
from typing import Any

import botocore.exceptions

from tfcluster.cloudinit.cloud.aws_errors import error_code, translate_errors
from tfcluster.cloudinit.cloud.provider import TAG_CLUSTER, InvalidEndpoint, ProviderError
from tfcluster.cloudinit.stage.manifest import OBJECTS_PREFIX, StagedObject

log = logging.getLogger(__name__)

BUCKET_PREFIX = "tfcluster-"
"""Every cluster bucket's name starts here; ``ls`` reads the tags of these only."""
_HASH_CHARS = 12
"""48 bits of SHA-256: a chance collision between two (account, region, cluster)
triples that share the readable part is negligible."""
MAX_URL_EXPIRY = 7 * 86400
"""SigV4 presigned URLs are valid for at most 7 days."""
_DELETE_BATCH = 1000
"""DeleteObjects takes at most 1000 keys per call."""
_VALID = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")


class BucketConflict(ProviderError):
    """The cluster's bucket name is taken by another account or another cluster."""


def bucket_name(cluster: str, account: str, region: str) -> str:
    """``tfcluster-<cluster, shortened>-<12 hex of sha256(account/region/cluster)>``.

    Deterministic, 3..63 characters of ``a-z0-9-``, starting and ending with a
    letter or digit, never an IP address form, and none of S3's reserved
    prefixes or suffixes (``xn--``, ``sthree-``, ``-s3alias``, ``--ol-s3``,
    ``--x-s3``). The readable part is cut to fit; the hash keeps the full
    cluster name, so two long names with one prefix still differ.
    """
    digest = hashlib.sha256(f"{account}/{region}/{cluster}".encode()).hexdigest()[:_HASH_CHARS]
    room = 63 - len(BUCKET_PREFIX) - 1 - _HASH_CHARS
    readable = re.sub(r"[^a-z0-9-]", "-", cluster.lower())[:room].strip("-")
    name = f"{BUCKET_PREFIX}{readable}-{digest}" if readable else f"{BUCKET_PREFIX}{digest}"
    if not _VALID.fullmatch(name):  # cannot happen for a DNS-label cluster name
        raise ProviderError(f"cannot derive a bucket name for cluster {cluster!r}")
    return name


def _tags(answer: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in answer.get("TagSet", [])}


class ClusterBuckets:
    """The S3 side of the EC2 provider: one bucket per cluster in ``region``.

    ``s3`` and ``sts`` are boto3 clients made like the EC2 one (`Ec2Provider._client`).
    The account id is read once (STS GetCallerIdentity) when a name is first needed.
    """

    def __init__(self, s3: Any, sts: Any, region: str) -> None:
        self.s3 = s3
        self.sts = sts
        self.region = region
        self._account: str | None = None

    @property
    def account(self) -> str:
        if self._account is None:
            with translate_errors("reading the AWS account id (sts:GetCallerIdentity)"):
                try:
                    self._account = str(self.sts.get_caller_identity()["Account"])
                except KeyError as exc:  # botocore's XML parser, on a page that is not STS's
                    raise InvalidEndpoint(
                        f"GetCallerIdentity: what answers at the endpoint is not the AWS API "
                        f"(no {exc} in its answer)"
                    ) from None
        return self._account

    def name(self, cluster: str) -> str:
        return bucket_name(cluster, self.account, self.region)

    def _head(self, bucket: str) -> bool:
        """True if the bucket exists and is this account's; False if it does not exist."""
        try:
            with translate_errors(f"looking up bucket {bucket}"):
                self.s3.head_bucket(Bucket=bucket, ExpectedBucketOwner=self.account)
        except ProviderError as exc:
            cause = exc.__cause__
            if isinstance(cause, botocore.exceptions.ClientError):
                code = error_code(cause)
                if code in ("404", "NoSuchBucket", "NotFound"):
                    return False
                if code in ("403", "Forbidden", "AccessDenied"):
                    raise BucketConflict(
                        f"bucket {bucket} exists but this account ({self.account}) may not use "
                        "it (another account owns it, or s3:ListBucket is not granted)"
                    ) from exc
            raise
        return True

    def _cluster_tag(self, bucket: str) -> str | None:
        try:
            with translate_errors(f"reading the tags of bucket {bucket}"):
                answer = self.s3.get_bucket_tagging(Bucket=bucket, ExpectedBucketOwner=self.account)
        except ProviderError as exc:
            cause = exc.__cause__
            if isinstance(cause, botocore.exceptions.ClientError) and error_code(cause) in (
                "NoSuchTagSet",
                "NoSuchTagSetError",
            ):
                return None
            raise
        return _tags(answer).get(TAG_CLUSTER)

    def find(self, cluster: str) -> str | None:
        """The cluster's bucket, or None. `BucketConflict` if the name is someone else's."""
        bucket = self.name(cluster)
        if not self._head(bucket):
            return None
        tag = self._cluster_tag(bucket)
        if tag not in (None, cluster):
            raise BucketConflict(f"bucket {bucket} is tagged for cluster {tag}, not {cluster}")
        return bucket

    def ensure(self, cluster: str) -> tuple[str, bool]:
        """Create the cluster's bucket if missing; return ``(name, created)``.

        On return it is tagged ``tfcluster:cluster=<cluster>``, blocks every
        form of public access, encrypts new objects with SSE-S3 and enforces
        bucket-owner object ownership (no ACLs). These settings are put again
        on a bucket that exists: each is one idempotent call.
        """
        bucket = self.find(cluster)
        created = bucket is None
        bucket = bucket or self.name(cluster)
        if created:
            params: dict[str, Any] = {"Bucket": bucket, "ObjectOwnership": "BucketOwnerEnforced"}
            if self.region != "us-east-1":
                params["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            try:
                with translate_errors(f"creating bucket {bucket}"):
                    self.s3.create_bucket(**params)
            except ProviderError as exc:
                cause = exc.__cause__
                code = (
                    error_code(cause) if isinstance(cause, botocore.exceptions.ClientError) else ""
                )
                if code == "BucketAlreadyExists":
                    raise BucketConflict(
                        f"bucket {bucket} belongs to another AWS account: the cluster name "
                        f"{cluster} cannot be used in this account and region"
                    ) from exc
                if code != "BucketAlreadyOwnedByYou":
                    raise
                created = False  # a concurrent create of our own; the lock makes it rare
        with translate_errors(f"setting up bucket {bucket}"):
            self.s3.put_bucket_tagging(
                Bucket=bucket,
                Tagging={"TagSet": [{"Key": TAG_CLUSTER, "Value": cluster}]},
                ExpectedBucketOwner=self.account,
            )
            self.s3.put_public_access_block(
                Bucket=bucket,
                PublicAccessBlockConfiguration={
                    "BlockPublicAcls": True,
                    "IgnorePublicAcls": True,
                    "BlockPublicPolicy": True,
                    "RestrictPublicBuckets": True,
                },
                ExpectedBucketOwner=self.account,
            )
            self.s3.put_bucket_encryption(
                Bucket=bucket,
                ServerSideEncryptionConfiguration={
                    "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
                },
                ExpectedBucketOwner=self.account,
            )
        return bucket, created

    def keys(self, bucket: str, prefix: str = OBJECTS_PREFIX) -> list[str]:
        """Every key under ``prefix`` (paginated: one call per 1000 keys)."""
        keys: list[str] = []
        with translate_errors(f"listing bucket {bucket}"):
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, ExpectedBucketOwner=self.account
            )
            for page in pages:
                keys.extend(str(o["Key"]) for o in page.get("Contents", []))
        return keys

    def upload(self, bucket: str, objects: Sequence[StagedObject]) -> int:
        """PutObject each of ``objects`` (the caller passes only the missing ones); bytes sent.

        One PUT per object (the binaries are tens of MB, far below PUT's 5 GB),
        with its SHA-256 as S3's checksum: S3 refuses a body that does not
        match, so a corrupt upload never lands under its content address.
        """
        sent = 0
        for obj in objects:
            action = f"uploading {obj.filename} to bucket {bucket}"
            with translate_errors(action), open(obj.path, "rb") as body:
                self.s3.put_object(
                    Bucket=bucket,
                    Key=obj.key,
                    Body=body,
                    ContentLength=obj.size,
                    ChecksumSHA256=_b64_sha256(obj.sha256),
                    ExpectedBucketOwner=self.account,
                )
            sent += obj.size
        return sent

    def presign(self, bucket: str, key: str, expiry: int) -> str:
        """A presigned GET URL of ``key``, valid ``expiry`` seconds (at most 7 days).

        Signing is local (no call). The URL grants reading that one object
        until it expires, to whoever holds it, and nothing else; with
        temporary credentials it ends when they do, whichever comes first.
        """
        if not 1 <= expiry <= MAX_URL_EXPIRY:
            raise ProviderError(f"url_expiry: must be 1 s..7 days, got {expiry} s")
        with translate_errors(f"signing a URL for {key}"):
            return str(
                self.s3.generate_presigned_url(
                    "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expiry
                )
            )

    def delete(self, cluster: str) -> tuple[str | None, int]:
        """Empty and delete the cluster's bucket; return ``(name or None, objects deleted)``.

        Every object version and delete marker goes (a bucket with versioning
        turned on by hand cannot be deleted otherwise). No bucket: ``(None, 0)``.
        """
        bucket = self.find(cluster)
        if bucket is None:
            return None, 0
        deleted = 0
        with translate_errors(f"emptying bucket {bucket}"):
            pages = self.s3.get_paginator("list_object_versions").paginate(
                Bucket=bucket, ExpectedBucketOwner=self.account
            )
            for page in pages:
                items = [
                    {"Key": v["Key"], "VersionId": v["VersionId"]}
                    for v in (*page.get("Versions", []), *page.get("DeleteMarkers", []))
                ]
                for start in range(0, len(items), _DELETE_BATCH):
                    batch = items[start : start + _DELETE_BATCH]
                    answer = self.s3.delete_objects(
                        Bucket=bucket,
                        Delete={"Objects": batch, "Quiet": True},
                        ExpectedBucketOwner=self.account,
                    )
                    errors = answer.get("Errors", [])
                    if errors:
                        first = errors[0]
                        raise ProviderError(
                            f"emptying bucket {bucket}: {len(errors)} object(s) not deleted "
                            f"({first.get('Code')}: {first.get('Key')})"
                        )
                    deleted += len(batch)
        with translate_errors(f"deleting bucket {bucket}"):
            self.s3.delete_bucket(Bucket=bucket, ExpectedBucketOwner=self.account)
        return bucket, deleted

    def tagged(self) -> dict[str, str]:
        """cluster -> bucket, for every ``tfcluster-`` bucket of this account tagged for a
        cluster. One ListBuckets, then one GetBucketTagging per bucket of that prefix."""
        with translate_errors("listing buckets"):
            listed = self.s3.list_buckets().get("Buckets", [])
        found: dict[str, str] = {}
        for entry in listed:
            bucket = str(entry["Name"])
            if not bucket.startswith(BUCKET_PREFIX):
                continue
            if entry.get("BucketRegion", self.region) != self.region:
                continue  # another region's cluster: `ls` there shows it
            try:
                tag = self._cluster_tag(bucket)
            except ProviderError as exc:
                log.debug("skipping bucket %s: %s", bucket, exc)
                continue  # another region's bucket (redirect), or one we may not read
            if tag is not None:
                found[tag] = bucket
        return found


def _b64_sha256(hex_digest: str) -> str:
    """S3's ChecksumSHA256 is the base64 of the raw digest."""
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()
