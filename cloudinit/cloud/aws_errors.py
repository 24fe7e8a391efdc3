"""AWS failures as the typed errors of `provider`: one table, one translation.

botocore raises its own exceptions (no credentials, no connection, an answer
it cannot parse) and the cloud's (``ClientError`` with a code). Each leaves
the cloud room as the `ProviderError` subclass that says what the operator
does next, with a one-line message. ``check_endpoint_url`` and
``answered_by_the_api`` refuse an endpoint that is malformed or is not AWS
(a proxy's sign-in page parses as an empty, successful answer otherwise).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.exceptions
import botocore.parsers

from tfcluster.cloudinit.cloud.provider import (
    AccessDenied,
    CredentialsError,
    EndpointUnreachable,
    InvalidEndpoint,
    LaunchFailed,
    LimitExceeded,
    ProviderError,
    UnknownAMI,
    UnknownRegion,
)

_CREDENTIAL_ERRORS = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.CredentialRetrievalError,
    botocore.exceptions.ProfileNotFound,
    botocore.exceptions.TokenRetrievalError,
    botocore.exceptions.SSOError,
)
_UNREACHABLE_ERRORS = (
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
)
_CREDENTIAL_CODES = frozenset(
    {
        "AuthFailure",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "RequestExpired",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
    }
)
_ACCESS_CODES = frozenset({"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"})
_LIMIT_CODES = frozenset(
    {
        "InstanceLimitExceeded",
        "MaxSpotInstanceCountExceeded",
        "RulesPerSecurityGroupLimitExceeded",
        "SecurityGroupLimitExceeded",
        "VcpuLimitExceeded",
    }
)


def _one_line(text: str) -> str:
    """AWS messages may span lines or carry an encoded policy blob; keep the gist."""
    text = text.split("Encoded authorization failure message")[0]
    return " ".join(text.split()).rstrip(".")


def known_regions(session: boto3.session.Session) -> frozenset[str]:
    """EC2 regions of every partition botocore knows (from its bundled data, no call)."""
    return frozenset(
        region
        for partition in session.get_available_partitions()
        for region in session.get_available_regions("ec2", partition_name=partition)
    )


BOTO_FAILURES = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    botocore.parsers.ResponseParserError,
)
"""What a botocore call raises when it fails: its own errors, the cloud's, and an
answer it cannot parse (not a BotoCoreError: an endpoint that is not the API)."""


def as_provider_error(
    exc: Exception,
    action: str,
    *,
    launching: bool = False,
) -> ProviderError:
    """The typed provider error for a botocore failure while doing ``action``.

    With ``launching`` an unrecognised cloud error is a `LaunchFailed`.
    """
    if isinstance(exc, _CREDENTIAL_ERRORS):
        return CredentialsError(
            f"no usable AWS credentials ({_one_line(str(exc))}): set AWS_PROFILE or "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(exc, botocore.exceptions.NoRegionError):
        return UnknownRegion("no AWS region: pass --region or set AWS_REGION")
    if isinstance(exc, _UNREACHABLE_ERRORS):
        return EndpointUnreachable(f"{action}: {_one_line(str(exc))}")
    if isinstance(exc, botocore.parsers.ResponseParserError):
        return InvalidEndpoint(
            f"{action}: the endpoint's answer is not the EC2 API's (it could not be parsed)"
        )
    if not isinstance(exc, botocore.exceptions.ClientError):
        return ProviderError(f"{action}: {type(exc).__name__}: {_one_line(str(exc))}")
    error = exc.response.get("Error", {})
    code = str(error.get("Code", "Unknown"))
    message = _one_line(str(error.get("Message", "")))
    if code in _CREDENTIAL_CODES:
        return CredentialsError(f"AWS rejected the credentials ({code}): {message}")
    if code in _ACCESS_CODES:
        return AccessDenied(f"not allowed to call {exc.operation_name} ({code}): {message}")
    if code in _LIMIT_CODES:
        return LimitExceeded(f"{action}: {code}: {message}")
    if code.startswith("InvalidAMIID") or code == "ParameterNotFound":
        return UnknownAMI(f"{action}: {code}: {message}")
    if launching:
        return LaunchFailed(f"{action}: {code}: {message}", code=code)
    return ProviderError(f"{action}: {code}: {message}")


@contextlib.contextmanager
def translate_errors(action: str, *, launching: bool = False) -> Iterator[None]:
    """Raise every botocore failure inside the block as its `as_provider_error`."""
    try:
        yield
    except BOTO_FAILURES as exc:
        raise as_provider_error(exc, action, launching=launching) from exc


def error_code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def check_endpoint_url(url: str) -> str:
    """``url`` if it can be an API endpoint (http(s)://HOST[:PORT]); else `InvalidEndpoint`."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidEndpoint(
            f"endpoint-url: must look like http://HOST:PORT or https://HOST, got {url!r}"
        )
    return url


_REQUEST_ID_HEADERS = ("x-amz-request-id", "x-amzn-requestid", "x-amzn-request-id")


def answered_by_the_api(http_response: Any, parsed: dict[str, Any], model: Any, **_: Any) -> None:
    """Every answer of the AWS APIs, errors included, carries a request id. A web page
    from whatever else answers at the endpoint (a proxy's sign-in page) parses as an
    empty result instead of failing: refuse it, before it reads as "nothing there".

    The id is read from the parsed answer, else from the headers: S3 sends it as
    ``x-amz-request-id`` (other services as ``x-amzn-requestid``), and botocore
    does not parse it for an error without a body (HeadBucket's 404)."""
    headers = http_response.headers
    if not (
        parsed.get("ResponseMetadata", {}).get("RequestId")
        or any(headers.get(name) for name in _REQUEST_ID_HEADERS)
    ):
        kind = headers.get("content-type", "no content type")
        raise InvalidEndpoint(
            f"{model.name}: what answers at the endpoint is not the AWS API ({kind}, no request id)"
        )
