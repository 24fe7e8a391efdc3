"""Checks for config values, each written for the place the value lands.

A value that reaches a template must keep the template's structure: a path
in a systemd unit is one token with no ``%`` (a specifier) or ``$`` (an
expansion), an address in the Corefile is one token with no brace, a URL is
parsed, not pattern-matched. Each check is a function that returns the
value (normalised) or raises a ValueError whose message reads after the key,
e.g. ``must be an integer >= 1 and <= 1000, got 0``; the ``Annotated`` types
at the end carry them into the schema (`schema.py`) and the `Layout` fields.
Every pattern must match the whole value: a regex's ``$`` alone lets a final
newline through.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import SplitResult, urlsplit

from pydantic import PlainValidator

CONTROL_NODE = "control-node"
"""``etcd: control-node``: launch a control node running etcd."""

_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# One token in a unit file, a shell word, the Corefile and resolved.conf alike.
_PATH = re.compile(r"/[A-Za-z0-9._+\-/@,=:~]*")
_NAME = re.compile(r"[A-Za-z0-9._+\-]+")
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def integer(low: int, high: int) -> Callable[[Any], int]:
    """A check for an integer from ``low`` to ``high`` (not a bool, a float or a string)."""

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"must be an integer >= {low} and <= {high}, got {value!r}")
        return value

    return check


def matching(pattern: str, what: str) -> Callable[[Any], str]:
    """A check for a string matching ``pattern``; ``what`` completes "must ..."."""
    regex = re.compile(pattern)

    def check(value: Any) -> str:
        if not isinstance(value, str) or not regex.fullmatch(value):
            raise ValueError(f"must {what}, got {value!r}")
        return value

    return check


cluster_name = matching(
    "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", "be a DNS label (a-z, 0-9, '-', at most 63)"
)
"""A cluster name, in a config or a --cluster option: one DNS label, never a pattern
(EC2's tag filters would read ``*`` and ``?`` as wildcards)."""


def one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def one_line(value: Any, what: str) -> str:
    """A non-empty printable string: no newline, tab or other control character."""
    if not isinstance(value, str) or not value.strip() or not value.isprintable():
        raise ValueError(f"must be {what} on one line, got {value!r}")
    return value


def path(value: Any) -> str:
    if not isinstance(value, str) or not _PATH.fullmatch(value):
        raise ValueError(
            "must be an absolute path of letters, digits and ._+-/@,=:~ "
            f"(no spaces, quotes or control characters), got {value!r}"
        )
    return value


def command(value: Any) -> str:
    """A program: a name looked up on PATH, or an absolute path."""
    if isinstance(value, str) and _NAME.fullmatch(value):
        return value
    try:
        return path(value)
    except ValueError:
        raise ValueError(f"must be a program name or an absolute path, got {value!r}") from None


def ipv4(value: Any) -> str:
    try:
        return str(ipaddress.IPv4Address(value if isinstance(value, str) else ""))
    except ValueError:
        raise ValueError(f"must be an IPv4 address, got {value!r}") from None


def host_port(value: Any) -> str:
    """``HOST:PORT`` for a CoreDNS listener: an IP address ([v6]) or nothing (every address)."""
    url = parse_url(f"http://{value}" if isinstance(value, str) else None)
    if (
        url is None
        or url.port is None
        or url.netloc != value
        or "@" in url.netloc
        or (url.hostname and not is_ip(url.hostname))
    ):
        raise ValueError(f"must be HOST:PORT with an IP address as HOST, got {value!r}")
    return str(value)


def duration(value: Any) -> int:
    """``90m``, ``12h``, ``2d``, ``1d12h``, ``3600s``: seconds, 10 minutes to 30 days."""
    found = _DURATION.fullmatch(value) if isinstance(value, str) and value else None
    if found is None:
        raise ValueError(f"must be a duration such as 90m, 12h or 2d, got {value!r}")
    days, hours, minutes, seconds = (int(part or 0) for part in found.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if not 10 * 60 <= total <= 30 * 86400:
        raise ValueError(f"must be between 10m and 30d, got {value!r}")
    return total


def url_expiry(value: Any) -> int:
    """A presigned URL's lifetime: a `duration`, at most 7 days (SigV4's limit)."""
    seconds = duration(value)
    if seconds > 7 * 86400:
        raise ValueError(f"must be at most 7d (the longest a presigned URL lives), got {value!r}")
    return seconds


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_hostname(host: str) -> bool:
    """A DNS name of letters, digits and hyphens (a trailing dot allowed)."""
    labels = host.removesuffix(".").split(".")
    return len(host) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def parse_url(value: Any) -> SplitResult | None:
    """``urlsplit`` of a printable string without whitespace; None if it cannot be one.

    urlsplit alone would silently drop tabs and newlines, and say nothing of
    spaces or braces in the host.
    """
    if not isinstance(value, str) or not value.isprintable() or any(c.isspace() for c in value):
        return None
    try:
        url = urlsplit(value)
        port = url.port  # ValueError for a port out of range or not a number
    except ValueError:
        return None
    if port is not None and not re.fullmatch(r"[0-9]{1,5}", url.netloc.rpartition(":")[2]):
        return None  # int() would also take "+80" or " 80"
    if url.hostname is not None and not (is_ip(url.hostname) or is_hostname(url.hostname)):
        return None
    return url


def server_url(value: Any, key: str, *, port: bool) -> str:
    """``http(s)://HOST[:PORT]`` (no path, query or user), normalised; ``key`` names it."""
    url = parse_url(value)
    if url is None or url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"{key} must look like http://HOST:PORT, got {value!r}")
    if port and url.port is None:
        raise ValueError(f"{key} must look like http://HOST:PORT, got {value!r}")
    if url.path not in ("", "/") or url.query or url.fragment or "@" in url.netloc:
        raise ValueError(f"{key} has no path, query or user, got {value!r}")
    return f"{url.scheme}://{url.netloc.lower()}"


def zone(value: Any) -> str:
    """A DNS zone for task names: two labels or more, neither localhost nor reverse."""
    name = value.rstrip(".").lower() if isinstance(value, str) else ""
    labels = name.split(".")
    # Two labels at least: resolvers treat single-label names specially (LLMNR, search lists).
    if len(labels) < 2 or len(name) > 200 or not is_hostname(name):
        raise ValueError(f"must be a DNS name of two labels or more, got {value!r}")
    if labels[-1] == "localhost" or name.endswith((".in-addr.arpa", ".ip6.arpa")):
        raise ValueError(f"must not be localhost or a reverse zone, got {value!r}")
    return name


def cidr(value: Any) -> str:
    try:
        return str(ipaddress.ip_network(value if isinstance(value, str) else "", strict=True))
    except ValueError as exc:
        raise ValueError(f"must be a CIDR such as 203.0.113.7/32: {exc}") from None


def etcd(value: Any) -> tuple[str, ...]:
    """``control-node`` (no endpoints: launch one) or a list of etcd client URLs."""
    if value == CONTROL_NODE or value == ():
        return ()
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"must be {CONTROL_NODE!r} or a list of client URLs, got {value!r}")
    endpoints = tuple(server_url(item, "an etcd endpoint", port=True) for item in value)
    for endpoint in endpoints:
        if not endpoint.startswith("http://"):
            # The agent's etcd client speaks plain HTTP: refuse here what it would refuse at boot.
            raise ValueError(f"an etcd endpoint must be http:// (no TLS yet), got {endpoint!r}")
    return endpoints


def artifact_url(value: Any) -> str:
    """A mirror's URL the instance downloads from (https or http; its SHA-256 is checked)."""
    url = parse_url(value)
    if url is None or url.scheme not in ("https", "http") or not url.path:
        raise ValueError(f"must be an https or http URL, got {value!r}")
    return str(value)


def sha256(value: Any) -> str:
    if not isinstance(value, str):  # YAML reads an unquoted all-digit value as a number
        raise ValueError("must be a quoted string of 64 hex digits")
    return matching(r"^[0-9a-f]{64}$", "be 64 hex digits")(value.lower())


def program(value: Any) -> tuple[str, ...]:
    """A command line (split like a shell would) or a list of arguments."""
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot split {value!r} into arguments: {exc}") from None
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        argv = list(value)
    else:
        raise ValueError(f"must be a command string or a list of strings, got {value!r}")
    if not argv or not all(arg.isprintable() for arg in argv):
        raise ValueError(f"must be a non-empty command on one line, got {value!r}")
    return tuple(argv)


def program_dir(value: Any) -> str:
    """An existing folder on this machine (relative: to the current one), made absolute.

    Checked here so that a mistyped folder is a one-line error before
    anything is created; `stage.bundle` checks it again when it packs it.
    """
    if not isinstance(value, str) or not value.strip() or not value.isprintable():
        raise ValueError(f"must be the path of a folder, got {value!r}")
    folder = Path(value).expanduser().absolute()
    if not folder.is_dir():
        raise ValueError(
            f"{value} is not a folder" if folder.exists() else f"{value} does not exist"
        )
    return str(folder)


Boolean = Annotated[bool, PlainValidator(boolean)]
Port = Annotated[int, PlainValidator(integer(1, 65535))]
AbsPath = Annotated[str, PlainValidator(path)]
Command = Annotated[str, PlainValidator(command)]
IPv4 = Annotated[str, PlainValidator(ipv4)]
HostPort = Annotated[str, PlainValidator(host_port)]
User = Annotated[str, PlainValidator(matching(r"^[a-z_][a-z0-9_-]{0,31}$", "be a Linux user name"))]
