"""Presigned POST policies: what an instance may write to the cluster bucket.

``up`` signs, with the operator's credentials, one POST per agent prefix
(``reports/worker0/``) or per role (``reports/worker``) and hands the URL and
form fields to the agents in their config (``report_post``); and one POST for
the chief's outputs, any key under ``output/`` (``output_post``). S3 enforces the
signed policy: keys under the prefix only, a size range, an expiry. moto
enforces none of it (it accepts a tampered signature and a key outside the
prefix), so the tests read the signed document with ``policy_terms`` and
check it with ``allows``, which applies S3's rules to it.

Expiry. SigV4 caps a presigned POST at 7 days (``SIGV4_MAX_EXPIRY``); a
longer request is clamped to that and said so (``SignedPost.clamped``).
After the expiry S3 answers 403: the agent stops writing reports (it knows
the expiry from the policy and says so once in its log) and goes on with its
work; ``status`` then shows its last report as stale. A POST signed with
temporary credentials (an STS session, SSO) dies with them, whatever its
expiry: sign with long-term credentials, or keep ``up``'s session as long as
the reports are needed. For jobs longer than 7 days the AWS way is an
instance profile whose role may only ``s3:PutObject`` on the bucket's
``reports/*`` and ``output/*``: not built here.

The URL. By default botocore signs a POST for the global name
``<bucket>.s3.amazonaws.com``; for a bucket outside us-east-1 that S3 created
minutes ago, that name answers 307 (for up to a day), and the agent does not
follow a redirected POST. Sign with a client of the bucket's region made with
``SIGNING_CONFIG`` (SigV4, virtual-hosted): the URL is then
``<bucket>.s3.<region>.amazonaws.com``. ``sign_post`` refuses a global URL for
another region. (Tests against moto use path-style URLs on 127.0.0.1.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from botocore.config import Config

from tfcluster.discovery.output import OUTPUT_PREFIX
from tfcluster.discovery.records import ROLES, parse_label
from tfcluster.discovery.report import (
    DEFAULT_MAX_BYTES,
    REPORTS_PREFIX,
    agent_prefix,
    decode_policy_document,
    parse_expiration,
)

SIGV4_MAX_EXPIRY = 7 * 24 * 3600
"""Seconds: the longest validity SigV4 allows a presigned request."""
SIGNING_CONFIG = Config(signature_version="s3v4", s3={"addressing_style": "virtual"})
"""For the S3 client that signs against AWS: SigV4 and the regional bucket URL."""
REPORT_SIZE = (1, DEFAULT_MAX_BYTES)
"""content-length-range for reports: non-empty, at most 16 KiB (what the agent fits into)."""
OUTPUT_SIZE = (0, 5 * 1024**3)
"""content-length-range for each output file: empty files too, at most 5 GiB (S3's POST limit)."""


@dataclass(frozen=True)
class SignedPost:
    """One presigned POST: what the agent gets, and what was asked for."""

    url: str
    fields: dict[str, str]
    prefix: str
    expires_at: datetime
    clamped: bool
    """The expiry asked for exceeded SigV4's 7 days and was cut to it."""


@dataclass(frozen=True)
class PolicyTerms:
    """What a signed POST policy allows, read from the document itself."""

    expiration: datetime
    bucket: str | None
    key_prefix: str | None
    """From ``["starts-with", "$key", prefix]``."""
    key: str | None
    """From an exact ``{"key": ...}`` condition."""
    size_range: tuple[int, int] | None
    """From ``["content-length-range", min, max]``."""
    conditions: tuple[Any, ...]


def report_prefix(name: str) -> str:
    """The key prefix a policy for ``name`` allows: an agent label's own
    folder (``reports/worker0/``) or a role's (``reports/worker``)."""
    if name in ROLES:
        return REPORTS_PREFIX + name
    if parse_label(name) is None:
        raise ValueError(f"not an agent label or role: {name!r}")
    return agent_prefix(name)


def sign_post(
    s3: Any,
    bucket: str,
    prefix: str,
    *,
    size: tuple[int, int] = REPORT_SIZE,
    expires_in: int = SIGV4_MAX_EXPIRY,
) -> SignedPost:
    """Sign a POST that may write any key under ``prefix`` of ``bucket``.

    ``s3`` is a boto3 S3 client that signs with SigV4
    (``Config(signature_version="s3v4")``; SigV2 is refused: S3 no longer
    takes it in newer regions); signing is local, no request is made.
    ``expires_in`` is clamped to 1 s .. 7 days.
    """
    if not prefix:
        raise ValueError("an empty prefix would allow the whole bucket")
    low, high = size
    if not 0 <= low <= high:
        raise ValueError(f"bad content-length-range {size!r}")
    seconds = min(max(int(expires_in), 1), SIGV4_MAX_EXPIRY)
    post = s3.generate_presigned_post(
        Bucket=bucket,
        Key=prefix + "${filename}",  # botocore turns this into starts-with $key prefix
        Conditions=[["content-length-range", low, high]],
        ExpiresIn=seconds,
    )
    fields = {str(k): str(v) for k, v in post["fields"].items()}
    if fields.get("x-amz-algorithm") != "AWS4-HMAC-SHA256":
        raise ValueError(
            "the S3 client does not sign with SigV4: create it with "
            "botocore.config.Config(signature_version='s3v4')"
        )
    host = urlsplit(post["url"]).hostname or ""
    region = s3.meta.region_name
    if host.endswith(".s3.amazonaws.com") and region not in (None, "us-east-1"):
        raise ValueError(
            f"the POST URL {post['url']} is S3's global name; a new bucket in {region} "
            "answers it with a redirect: sign with a client made with SIGNING_CONFIG"
        )
    terms = policy_terms(fields)
    return SignedPost(post["url"], fields, prefix, terms.expiration, seconds < expires_in)


def _posts(
    s3: Any,
    bucket: str,
    prefixes: Mapping[str, str],
    *,
    size: tuple[int, int],
    expires_in: int,
) -> tuple[str, dict[str, SignedPost]]:
    """One POST per name, for its prefix: (the one bucket URL, name -> signed POST)."""
    signed = {
        name: sign_post(s3, bucket, prefix, size=size, expires_in=expires_in)
        for name, prefix in prefixes.items()
    }
    urls = {post.url for post in signed.values()}
    if len(urls) != 1:
        raise ValueError(f"expected one bucket URL, got {sorted(urls)}")
    return urls.pop(), signed


def report_posts(
    s3: Any, bucket: str, names: Iterable[str], *, expires_in: int = SIGV4_MAX_EXPIRY
) -> tuple[str, dict[str, SignedPost]]:
    """One report POST per agent label or role: (the URL, name -> signed POST)."""
    prefixes = {name: report_prefix(name) for name in names}
    return _posts(s3, bucket, prefixes, size=REPORT_SIZE, expires_in=expires_in)


def report_post_config(
    s3: Any, bucket: str, names: Iterable[str], *, expires_in: int = SIGV4_MAX_EXPIRY
) -> dict[str, Any]:
    """The agent config's ``report_post`` value for ``names`` (labels or roles)."""
    url, signed = report_posts(s3, bucket, names, expires_in=expires_in)
    return {"url": url, "fields": {name: post.fields for name, post in signed.items()}}


def output_post_config(
    s3: Any,
    bucket: str,
    names: Iterable[str] = ("chief",),
    *,
    size: tuple[int, int] = OUTPUT_SIZE,
    expires_in: int = SIGV4_MAX_EXPIRY,
) -> dict[str, Any]:
    """The agent config's ``output_post`` value: a POST for any key under
    ``output/`` of at most ``size`` bytes per file, for the chief (its role,
    ``chief``, or its label, ``chief0``): only the chief uploads outputs."""
    names = list(names)
    wrong = [name for name in names if name not in ("chief", "chief0")]
    if wrong or not names:
        raise ValueError(f"outputs are uploaded by the chief only (chief or chief0), got {wrong}")
    url, signed = _posts(
        s3, bucket, dict.fromkeys(names, OUTPUT_PREFIX), size=size, expires_in=expires_in
    )
    return {"url": url, "fields": {name: post.fields for name, post in signed.items()}}


def policy_terms(fields: Mapping[str, str]) -> PolicyTerms:
    """Read the signed policy document in ``fields`` (``ValueError`` if unreadable)."""
    document = decode_policy_document(fields)
    expiration = document.get("expiration")
    if not isinstance(expiration, str):
        raise ValueError("the policy has no expiration")
    conditions = document.get("conditions")
    if not isinstance(conditions, list):
        raise ValueError("the policy has no conditions list")
    bucket = key = prefix = None
    size = None
    for condition in conditions:
        if isinstance(condition, dict):
            bucket = condition.get("bucket", bucket)
            key = condition.get("key", key)
        elif isinstance(condition, list) and len(condition) == 3:
            op, name, value = condition
            if op == "starts-with" and name == "$key":
                prefix = value
            elif op == "content-length-range":
                size = (int(name), int(value))
    when = datetime.fromtimestamp(parse_expiration(expiration), tz=timezone.utc)
    return PolicyTerms(when, bucket, prefix, key, size, tuple(conditions))


def allows(terms: PolicyTerms, key: str, size: int, at: datetime) -> bool:
    """Whether S3 would accept a POST of ``size`` bytes to ``key`` at ``at``
    under these terms (the key, size and expiry rules; not the signature)."""
    if at >= terms.expiration:
        return False
    if terms.key is not None and key != terms.key:
        return False
    if terms.key_prefix is not None and not key.startswith(terms.key_prefix):
        return False
    if terms.key is None and terms.key_prefix is None:
        return False  # S3 requires a condition on every form field, key included
    return terms.size_range is None or terms.size_range[0] <= size <= terms.size_range[1]
