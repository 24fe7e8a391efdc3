"""IMDSv2 client: how an instance learns who it is before anything else runs.

The agent's first act on a fresh instance is to read its launch index, private
address and instance id from the instance metadata service (IMDS). It runs
before any dependency is guaranteed, so it uses the standard library only, and
it talks to the endpoint directly with ``http.client`` (not urllib's opener) so
that an ``http_proxy`` in the environment cannot send metadata requests to a
proxy.

The shape follows botocore's ``IMDSFetcher``: a session token from
``PUT /latest/api/token`` reused until shortly before it expires, bounded
retries with the retry decision passed in, and a fixed table for the token
endpoint's status codes. Unlike botocore, nothing falls back to IMDSv1 unless
asked, and every failure is a named exception whose message says what to do.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
META_PREFIX = "/latest/meta-data/"
USER_DATA_PATH = "/latest/user-data"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TOKEN_TTL = 21600

_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8,17}$")
_ZONE = re.compile(r"^[a-z]{2}-[a-z0-9-]+[a-z]$")
_INDEX = re.compile(r"^(0|[1-9][0-9]*)$")


class IMDSError(Exception):
    """Any failure to read instance metadata."""


class IMDSConfigError(IMDSError):
    """The client was given settings it cannot work with."""


class IMDSUnreachable(IMDSError):
    """No answer at all (connection refused, reset, or dropped) after every attempt."""


class IMDSTimeout(IMDSUnreachable):
    """No answer within the per-request timeout after every attempt."""


class IMDSUnavailable(IMDSError):
    """IMDS answered, but only with retryable errors (5xx, 429), after every attempt."""


class IMDSTokenRefused(IMDSError):
    """The token endpoint answered 403: IMDS is disabled or a proxy header was seen."""


class IMDSNotSupported(IMDSError):
    """The endpoint has no token API (IMDSv1 only) and IMDSv1 was not allowed."""


class IMDSPathMissing(IMDSError):
    """A metadata path answered 404."""


class IMDSBadResponse(IMDSError):
    """An answer the IMDS protocol does not allow (unexpected status, empty token)."""


class IMDSBadValue(IMDSError):
    """A metadata value that is not what the path promises (e.g. a negative launch index)."""


def default_retryable(status: int) -> bool:
    """Throttling and server errors are transient; everything else is an answer."""
    return status == 429 or status >= 500


@dataclass(frozen=True)
class InstanceIdentity:
    """What an instance needs to know about itself to claim its name.

    Validated on construction, so an identity built elsewhere (the local
    cloud) is held to the same rules as one read from IMDS.
    """

    launch_index: int
    local_ipv4: str
    instance_id: str
    availability_zone: str

    def __post_init__(self) -> None:
        if isinstance(self.launch_index, bool) or self.launch_index < 0:
            raise IMDSBadValue(f"launch index {self.launch_index!r} is not a non-negative integer")
        try:
            ipaddress.IPv4Address(self.local_ipv4)
        except ValueError:
            raise IMDSBadValue(f"local-ipv4 {self.local_ipv4!r} is not an IPv4 address") from None
        if not _INSTANCE_ID.match(self.instance_id):
            raise IMDSBadValue(f"instance-id {self.instance_id!r} is not of the form i-<hex>")
        if not _ZONE.match(self.availability_zone):
            raise IMDSBadValue(f"availability zone {self.availability_zone!r} is malformed")


class IMDSClient:
    """Reads instance metadata over IMDSv2.

    Each request makes at most ``attempts`` tries of at most ``timeout``
    seconds each, sleeping ``backoff``, ``2 * backoff``, ... (capped at
    ``max_backoff``) in between, so every call is bounded in time. ``now``
    and ``sleep`` are injectable so tests need neither real waiting nor a
    real clock. Not thread-safe: use one client per thread.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        timeout: float = 1.0,
        attempts: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 4.0,
        token_ttl: int = MAX_TOKEN_TTL,
        allow_v1: bool = False,
        retryable: Callable[[int], bool] = default_retryable,
        now: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        parts = urllib.parse.urlsplit(endpoint)
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
            raise IMDSConfigError(f"IMDS endpoint {endpoint!r} must look like http://host[:port]")
        if not 1 <= token_ttl <= MAX_TOKEN_TTL:
            raise IMDSConfigError(f"token TTL {token_ttl} is outside 1..{MAX_TOKEN_TTL} seconds")
        if attempts < 1 or timeout <= 0:
            raise IMDSConfigError("IMDS attempts must be >= 1 and timeout > 0")
        self.endpoint = endpoint
        self._host = parts.hostname
        self._port = parts.port or 80
        self._timeout = timeout
        self._attempts = attempts
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._ttl = token_ttl
        # Refresh ahead of expiry: at most a minute early, and at most a tenth
        # of the TTL early so that short TTLs are still reused.
        self._margin = min(60.0, token_ttl / 10)
        self._allow_v1 = allow_v1
        self._retryable = retryable
        self._now = now
        self._sleep = sleep
        self._token: str | None = None
        self._refresh_at = 0.0
        self._v1 = False

    def identity(self) -> InstanceIdentity:
        """Launch index, private IPv4, instance id and zone of this instance."""
        index = self.get("ami-launch-index").strip()
        if not _INDEX.match(index):
            raise IMDSBadValue(f"ami-launch-index {index!r} is not a non-negative integer")
        return InstanceIdentity(
            launch_index=int(index),
            local_ipv4=self.get("local-ipv4").strip(),
            instance_id=self.get("instance-id").strip(),
            availability_zone=self.get("placement/availability-zone").strip(),
        )

    def user_data(self) -> bytes | None:
        """The instance's user-data, or None when it was launched without any."""
        return self._get(USER_DATA_PATH)

    def get(self, path: str) -> str:
        """One metadata value; ``path`` is under /latest/meta-data/ unless it starts with /."""
        full = path if path.startswith("/") else META_PREFIX + path
        body = self._get(full)
        if body is None:
            raise IMDSPathMissing(f"IMDS has no {full} (404); check the path for this instance")
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise IMDSBadValue(f"IMDS value at {full} is not UTF-8 text") from None

    def _get(self, path: str) -> bytes | None:
        """GET with the current token; a 401 means it expired or was revoked: renew once."""
        for renewed in (False, True):
            token = self._current_token()
            headers = {} if token is None else {TOKEN_HEADER: token}
            status, body = self._call("GET", path, headers)
            if status == 200:
                return body
            if status == 404:
                return None
            if status == 401 and token is not None and not renewed:
                log.debug("IMDS rejected the token for %s; requesting a new one", path)
                self._token = None
                continue
            break
        raise IMDSBadResponse(
            f"IMDS answered HTTP {status} to GET {path}; check that {self.endpoint} "
            "is this instance's metadata service and that tokens are enabled"
        )

    def _current_token(self) -> str | None:
        if self._v1:
            return None
        if self._token is None or self._now() >= self._refresh_at:
            issued = self._now()  # before the request: errs towards refreshing early
            self._token = self._fetch_token()
            self._refresh_at = issued + self._ttl - self._margin
        return self._token

    def _fetch_token(self) -> str | None:
        status, body = self._call("PUT", TOKEN_PATH, {TTL_HEADER: str(self._ttl)})
        token = body.decode("latin-1").strip()
        if status == 200 and token and token.isprintable():
            return token
        if status in (404, 405) and self._allow_v1:
            log.warning("IMDS at %s has no token API; using IMDSv1", self.endpoint)
            self._v1 = True
            return None
        if status == 200:
            raise IMDSBadResponse(f"IMDS at {self.endpoint} issued an empty or malformed token")
        raise _token_failure(status, self.endpoint, self._ttl)

    def _call(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        """The first answer that is not retryable, or a named error after every attempt."""
        error: Exception | None = None
        status = 0
        for attempt in range(self._attempts):
            if attempt:
                self._sleep(min(self._max_backoff, self._backoff * 2 ** (attempt - 1)))
            try:
                status, body = self._send(method, path, headers)
            except (OSError, http.client.HTTPException) as exc:
                log.debug("IMDS %s %s attempt %d: %r", method, path, attempt + 1, exc)
                error = exc
                continue
            if not self._retryable(status):
                return status, body
            log.debug("IMDS %s %s attempt %d: HTTP %d", method, path, attempt + 1, status)
            error = None
        what = f"{method} {path} at {self.endpoint} ({self._attempts} attempts)"
        if error is None:
            raise IMDSUnavailable(f"IMDS kept answering HTTP {status} to {what}; retry later")
        if isinstance(error, TimeoutError):
            raise IMDSTimeout(
                f"no IMDS answer within {self._timeout}s to {what}; if the agent runs in a "
                "container set the instance's HttpPutResponseHopLimit to 2"
            )
        raise IMDSUnreachable(
            f"cannot reach IMDS for {what}: {error!r}; check the endpoint and that the "
            "metadata service is enabled (HttpEndpoint=enabled)"
        )

    def _send(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        try:
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


def _token_failure(status: int, endpoint: str, ttl: int) -> IMDSError:
    """The fixed table of token endpoint answers that end the attempt."""
    if status == 400:
        return IMDSBadResponse(f"IMDS rejected token TTL {ttl}; use 1..{MAX_TOKEN_TTL} seconds")
    if status == 403:
        return IMDSTokenRefused(
            f"IMDS at {endpoint} refused a token (403); enable the metadata service "
            "(HttpEndpoint=enabled) and send no X-Forwarded-For header"
        )
    if status in (404, 405):
        return IMDSNotSupported(
            f"IMDS at {endpoint} has no token API (IMDSv1 only); point the agent at an "
            "IMDSv2 endpoint, or allow IMDSv1 explicitly if you trust this one"
        )
    return IMDSBadResponse(f"IMDS at {endpoint} answered HTTP {status} to the token request")
