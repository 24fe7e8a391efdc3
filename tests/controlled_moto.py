"""A moto server on loopback whose answers a test can count, hold or fail.

moto plays the EC2 API; this wraps its WSGI app so that a test can
* count the calls per action (``calls``),
* hold one call's answer until the test has done something, e.g. send
  SIGINT to an ``up`` at a chosen phase (``hold``): the action is carried out
  first (``before=False``: the answer is "lost in flight", as when a client
  is interrupted while waiting) or only after the release (``before=True``),
* answer an action with an EC2 error a number of times (``fail``), for what
  moto cannot produce by itself (throttling, a group still in use).

S3 calls (path-style, as boto3 with an endpoint URL and the agents' presigned
POSTs send them) are named by ``s3_action`` (``PostObject``, ``GetObject``,
``ListObjectsV2`` ...), with ``Bucket`` and ``Key`` as their parameters, so the
same controls hold and fail them; a failure answers with S3's error document.
``reserve`` binds the server's address before ``start``: until then every
connection to ``url`` is refused, as by a bucket endpoint that cannot be reached.

The server is a real HTTP server on 127.0.0.1 and the code under test talks
to it through ``--endpoint-url`` from its own process. It serves one call at
a time: moto's handlers are not atomic under concurrent requests (two
CreateKeyPair of one name can both succeed), where EC2's are.
"""

from __future__ import annotations

import io
import os
import re
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import boto3
import requests
from botocore.config import Config
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

Params = dict[str, str]
HOLD_TIMEOUT = 120.0
"""No held answer waits longer than this, whatever the test does."""

ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
    "<Message>{message}</Message></Error></Errors><RequestID>injected</RequestID></Response>"
)
S3_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
    "<Message>{message}</Message><RequestId>injected</RequestId></Error>"
)


@dataclass
class Hold:
    """One held answer: ``reached`` is set when the call arrives; ``release()`` lets it go."""

    action: str
    match: Callable[[Params], bool]
    before: bool
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()

    def wait_reached(self, timeout: float = 60.0) -> None:
        if not self.reached.wait(timeout):
            raise AssertionError(f"no {self.action} call arrived within {timeout} s")


@dataclass
class Failure:
    action: str
    code: str
    times: int
    status: int


def tag_value(params: Params, key: str) -> str | None:
    """The value of tag ``key`` in a call's TagSpecification parameters."""
    for name, value in params.items():
        if name.endswith(".Key") and value == key and ".Tag." in name:
            return params.get(name[: -len(".Key")] + ".Value")
    return None


_BUCKET_SUBRESOURCES = frozenset(
    {"acl", "cors", "encryption", "lifecycle", "location", "ownershipControls", "policy",
     "publicAccessBlock", "tagging", "versioning"}
)  # fmt: skip


def s3_action(environ: dict[str, Any], body: bytes) -> tuple[str, Params]:
    """The S3 operation of a path-style request and its Bucket and Key; ("", {})
    for anything else. A bucket's sub-resource is named after the verb:
    ``PUT /b?tagging`` is ``PutBucketTagging``, ``GET /b?versions`` is
    ``ListObjectVersions``; object sub-resources are not told apart."""
    path = environ.get("PATH_INFO", "/")
    if path.startswith("/moto-api"):
        return "", {}
    method = environ.get("REQUEST_METHOD", "GET")
    bucket, _, key = path.lstrip("/").partition("/")
    query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    if not bucket:
        return ("ListBuckets", {}) if method == "GET" else ("", {})
    params = {"Bucket": bucket}
    if key:
        params["Key"] = key
        names = {"GET": "GetObject", "PUT": "PutObject", "DELETE": "DeleteObject"}
        return names.get(method, method.capitalize() + "Object"), params
    content_type = environ.get("CONTENT_TYPE", "")
    if method == "POST" and content_type.startswith("multipart/form-data"):
        field = re.search(rb'name="key"\r\n\r\n([^\r]*)\r\n', body)
        if field:
            params["Key"] = field.group(1).decode(errors="replace")
        return "PostObject", params
    if method == "POST" and "delete" in query:
        return "DeleteObjects", params
    if method == "GET" and "versions" in query:
        return "ListObjectVersions", params
    sub = next((name for name in query if name in _BUCKET_SUBRESOURCES), None)
    if sub is not None and method in ("GET", "PUT", "DELETE"):
        return f"{method.capitalize()}Bucket{sub[0].upper()}{sub[1:]}", params
    if method == "GET":
        return ("ListObjectsV2" if query.get("list-type") == ["2"] else "ListObjects"), params
    names = {"PUT": "CreateBucket", "DELETE": "DeleteBucket", "HEAD": "HeadBucket"}
    return names.get(method, method.capitalize() + "Bucket"), params


class ControlledMoto:
    """The WSGI middleware around moto, and the server that runs it."""

    def __init__(self) -> None:
        self.app = DomainDispatcherApplication(create_backend_app)
        self.calls: Counter[str] = Counter()
        self.log: list[str] = []
        self._holds: list[Hold] = []
        self._failures: list[Failure] = []
        self._lock = threading.Lock()
        self._serial = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._reserved: socket.socket | None = None
        self.url = ""

    # -- test controls ----------------------------------------------------------

    def hold(
        self,
        action: str,
        match: Callable[[Params], bool] = lambda _params: True,
        *,
        before: bool = False,
    ) -> Hold:
        """Hold the next ``action`` call whose parameters ``match``."""
        hold = Hold(action, match, before)
        with self._lock:
            self._holds.append(hold)
        return hold

    def fail(self, action: str, code: str, *, times: int = 1, status: int = 400) -> None:
        """Answer the next ``times`` calls of ``action`` with the error ``code``
        (EC2's error document, or S3's for an S3 action)."""
        with self._lock:
            self._failures.append(Failure(action, code, times, status))

    def clear(self) -> None:
        """No more holds (each released) or failures; counters reset."""
        with self._lock:
            for hold in self._holds:
                hold.release()
            self._holds.clear()
            self._failures.clear()
            self.calls.clear()
            self.log.clear()

    def mutating_calls(self) -> list[str]:
        prefixes = ("Run", "Create", "Authorize", "Revoke", "Terminate", "Delete", "Stop")
        return [action for action in self.log if action.startswith(prefixes)]

    # -- WSGI ---------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        params = {k: v[0] for k, v in parse_qs(body.decode(errors="replace")).items()}
        action = params.get("Action", "")
        s3 = False
        if not action:
            action, params = s3_action(environ, body)
            s3 = bool(action)
        with self._lock:
            if action:
                self.calls[action] += 1
                self.log.append(action)
            failure = next((f for f in self._failures if f.action == action and f.times), None)
            if failure is not None:
                failure.times -= 1
            hold = next((h for h in self._holds if h.action == action and h.match(params)), None)
            if hold is not None:
                self._holds.remove(hold)
        if failure is not None:
            template = S3_ERROR_BODY if s3 else ERROR_BODY
            text = template.format(code=failure.code, message="injected by the test")
            headers = [("Content-Type", "text/xml")]
            if s3:  # S3 names its request in a header, also for a HEAD without a body
                headers.append(("x-amz-request-id", "injected"))
            start_response(f"{failure.status} Error", headers)
            return [text.encode()]
        if hold is not None and hold.before:
            hold.reached.set()
            hold.released.wait(HOLD_TIMEOUT)
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured["status"], captured["headers"] = status, headers
            return lambda _data: None

        with self._serial:
            chunks = list(self.app(environ, capture))
        if hold is not None and not hold.before:
            hold.reached.set()
            hold.released.wait(HOLD_TIMEOUT)
        start_response(captured["status"], captured["headers"])
        return chunks

    # -- server -------------------------------------------------------------------

    def reserve(self) -> str:
        """Take a loopback port now and serve on it from ``start`` on; until then
        connections to the returned URL are refused (bound, not listening)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._reserved = sock
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def start(self) -> str:
        sock, self._reserved = self._reserved, None
        if sock is None:
            self._server = make_server(
                "127.0.0.1", 0, self, threaded=True, request_handler=MotoRequestHandler
            )
        else:
            sock.listen(64)
            host, port = sock.getsockname()[:2]
            self._server = make_server(
                host, port, self, threaded=True, request_handler=MotoRequestHandler,
                fd=sock.fileno(),
            )  # fmt: skip
            sock.close()  # the server holds its own duplicate of the socket
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self.url

    def reset_state(self) -> None:
        """moto's own state back to empty (its reset endpoint), controls cleared."""
        self.clear()
        requests.post(f"{self.url}/moto-api/reset", timeout=10).raise_for_status()
        self.clear()

    def stop(self) -> None:
        self.clear()
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None
        if self._server is not None:
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)


def running() -> Iterator[ControlledMoto]:
    """For a fixture: a started server, stopped afterwards."""
    server = ControlledMoto()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def s3_client(url: str, signature: str = "s3v4") -> Any:
    """An S3 client for ``url`` with fake credentials and no retries (tests see each call)."""
    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(signature_version=signature, retries={"max_attempts": 1}),
    )


def fake_aws_env(folder: Path, region: str = "us-east-1") -> dict[str, str]:
    """What a test process needs from the environment to use AWS clients with fake
    credentials and nothing of this machine's AWS set-up or metadata service."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": region,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(folder / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(folder / "no-aws-credentials"),
    }


def without_aws(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` less every AWS_ and TFCLUSTER_ variable (profiles, endpoints, tokens)."""
    return {k: v for k, v in environ.items() if not k.startswith(("AWS_", "TFCLUSTER_"))}


def use_fake_aws(monkeypatch: Any, folder: Path, region: str = "us-east-1") -> None:
    """`fake_aws_env` for this test's own process (a pytest ``monkeypatch``)."""
    for name in set(os.environ) - set(without_aws(os.environ)):
        monkeypatch.delenv(name)
    for name, value in fake_aws_env(folder, region).items():
        monkeypatch.setenv(name, value)
