"""An IMDSv2 emulator serving the metadata of ONE instance.

moto's metadata mock answers the same values for every instance and ignores
tokens, so tests and the local cloud run one of these per simulated instance
instead. It enforces the token protocol as EC2 does (PUT for a token with a
TTL, 401 for a missing or expired one) and takes faults at run time (delays,
refusals, 503s, dropped connections, missing paths) so that the client's
failure handling is tested against a real HTTP server.

Run standalone (the local cloud does this; the bound address is printed)::

    python -m tfcluster.cloudinit.localcloud.imds_emulator --bind 127.0.0.1:0 \\
        --launch-index 2 --local-ipv4 127.0.0.12 --instance-id i-0123456789abcdef0
"""

from __future__ import annotations

import argparse
import collections
import logging
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from tfcluster.discovery.imds import (
    MAX_TOKEN_TTL,
    META_PREFIX,
    TOKEN_HEADER,
    TOKEN_PATH,
    TTL_HEADER,
    USER_DATA_PATH,
)

log = logging.getLogger(__name__)

FAULTS = ("token-refused", "unavailable", "drop", "v1-only")
HANDLER_TIMEOUT = 5.0  # seconds a client may take to send its request
POLL_INTERVAL = 0.1  # seconds; how long stop() may wait for the accept loop to notice


@dataclass
class InstanceMetadata:
    """The values one instance sees; ``extra`` adds or overrides paths.

    Keys of ``extra`` are under /latest/meta-data/ unless they start with /.
    """

    launch_index: int
    local_ipv4: str
    instance_id: str
    availability_zone: str = "us-east-1a"
    user_data: bytes | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def paths(self) -> dict[str, bytes]:
        served = {
            META_PREFIX + "ami-launch-index": str(self.launch_index).encode(),
            META_PREFIX + "local-ipv4": self.local_ipv4.encode(),
            META_PREFIX + "instance-id": self.instance_id.encode(),
            META_PREFIX + "placement/availability-zone": self.availability_zone.encode(),
        }
        if self.user_data is not None:
            served[USER_DATA_PATH] = self.user_data
        for path, value in self.extra.items():
            served[path if path.startswith("/") else META_PREFIX + path] = value.encode()
        return served


class IMDSEmulator:
    """A threaded HTTP server answering like IMDS for one instance.

    Use as a context manager; ``stop`` wakes delayed handlers and joins every
    thread. ``now`` is the clock for token expiry, injectable so tests can
    expire tokens without waiting.
    """

    def __init__(
        self,
        metadata: InstanceMetadata,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        allow_v1: bool = False,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._paths = metadata.paths()
        self._allow_v1 = allow_v1
        self._now = now
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}
        self._fail: str | None = None
        self._delay = 0.0
        self._requests: collections.Counter[str] = collections.Counter()
        self._stopping = threading.Event()
        self._server = _Server((host, port), _Handler, self)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> IMDSEmulator:
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(POLL_INTERVAL,), name="imds-emulator"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()  # joins the handler threads

    def __enter__(self) -> IMDSEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def set_fault(self, fail: str | None = None, delay: float = 0.0) -> None:
        """Answer every later request with ``fail`` (one of FAULTS) after ``delay`` seconds."""
        if fail is not None and fail not in FAULTS:
            raise ValueError(f"unknown fault {fail!r}; choose from {', '.join(FAULTS)}")
        with self._lock:
            self._fail, self._delay = fail, delay

    def remove_path(self, path: str) -> None:
        """Make ``path`` (absolute, or under /latest/meta-data/) answer 404."""
        with self._lock:
            self._paths.pop(path if path.startswith("/") else META_PREFIX + path, None)

    def revoke_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()

    def count(self, method: str) -> int:
        """How many ``method`` requests arrived, faults included."""
        with self._lock:
            return self._requests[method]

    def answer(self, method: str, path: str, headers: Message) -> tuple[int, bytes] | None:
        """The status and body for one request, or None to drop the connection."""
        with self._lock:
            self._requests[method] += 1
            fail, delay = self._fail, self._delay
        if delay and self._stopping.wait(delay):
            return None
        if fail == "drop":
            return None
        if fail == "unavailable":
            return 503, b""
        if method == "PUT":
            return self._issue_token(path, headers.get(TTL_HEADER), fail)
        with self._lock:
            token = headers.get(TOKEN_HEADER)
            if token is not None and self._tokens.get(token, 0.0) <= self._now():
                return 401, b""
            if token is None and not (self._allow_v1 or fail == "v1-only"):
                return 401, b""
            body = self._paths.get(path)
        return (404, b"") if body is None else (200, body)

    def _issue_token(self, path: str, ttl: str | None, fail: str | None) -> tuple[int, bytes]:
        if fail == "v1-only":
            return 404, b""
        if path != TOKEN_PATH:
            return 405, b""
        if fail == "token-refused":
            return 403, b""
        if ttl is None or not ttl.isdigit() or not 1 <= int(ttl) <= MAX_TOKEN_TTL:
            return 400, b""
        token = secrets.token_urlsafe(32)
        with self._lock:
            now = self._now()
            self._tokens = {t: expiry for t, expiry in self._tokens.items() if expiry > now}
            self._tokens[token] = now + int(ttl)
        return 200, token.encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # so that server_close() joins the handler threads

    def __init__(self, address: tuple[str, int], handler: Any, emulator: IMDSEmulator) -> None:
        self.emulator = emulator
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("IMDS emulator: client %s went away", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    timeout = HANDLER_TIMEOUT
    server: _Server

    def do_GET(self) -> None:
        self._respond("GET")

    def do_PUT(self) -> None:
        self._respond("PUT")

    def _respond(self, method: str) -> None:
        answer = self.server.emulator.answer(method, self.path, self.headers)
        if answer is None:
            self.close_connection = True
            return
        status, body = answer
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("IMDS emulator: " + format, *args)


def main(argv: list[str] | None = None) -> int:
    """Serve one instance's metadata until SIGTERM or SIGINT; print host:port when listening."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:0", help="host:port, port 0 picks one")
    parser.add_argument("--launch-index", type=int, required=True)
    parser.add_argument("--local-ipv4", required=True)
    parser.add_argument("--instance-id", required=True)
    parser.add_argument("--availability-zone", default="us-east-1a")
    parser.add_argument("--user-data-file", type=Path)
    parser.add_argument("--allow-v1", action="store_true", help="serve GETs without a token")
    args = parser.parse_args(argv)
    host, _, port = args.bind.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--bind {args.bind!r} must be host:port")
    try:
        user_data = args.user_data_file.read_bytes() if args.user_data_file else None
        metadata = InstanceMetadata(
            args.launch_index, args.local_ipv4, args.instance_id, args.availability_zone, user_data
        )
        emulator = IMDSEmulator(metadata, host, int(port), allow_v1=args.allow_v1)
    except OSError as exc:
        print(f"imds-emulator: {exc}", file=sys.stderr)
        return 1
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    with emulator:
        print("{}:{}".format(*emulator.address), flush=True)
        done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
