"""The one place that imports the ``etcd3`` package.

etcd3 0.12 ships protobuf modules generated before protobuf 4; with the
upb/C++ protobuf that TensorFlow requires they fail to import ("Descriptors
cannot be created directly") unless protobuf runs its pure-Python
implementation. The choice is made when protobuf is first imported, so only
processes that talk to etcd (the agent, the CLI) import this module, and the
TensorFlow server the agent spawns gets an environment without the variable.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any
from urllib.parse import urlsplit

_IMPL = "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"


class EtcdImportError(RuntimeError):
    """protobuf was imported with an implementation etcd3 cannot use."""


def _load_etcd3() -> Any:
    if "google.protobuf" in sys.modules and os.environ.get(_IMPL) != "python":
        from google.protobuf.internal import api_implementation

        if api_implementation.Type() != "python":
            raise EtcdImportError(
                "protobuf was imported before tfcluster.discovery.etcdclient; "
                f"import it first or set {_IMPL}=python"
            )
    os.environ[_IMPL] = "python"
    with warnings.catch_warnings():
        # Its old generated modules use protobuf's deprecated descriptor API.
        warnings.simplefilter("ignore", DeprecationWarning)
        import etcd3

    return etcd3


etcd3 = _load_etcd3()


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``http://10.0.0.5:2379`` -> ("10.0.0.5", 2379); a bare host:port works too."""
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"etcd endpoint must look like http://HOST:PORT, got {endpoint!r}")
    return parts.hostname, parts.port or 2379


def connect(endpoint: str, timeout: float = 5.0) -> Any:
    """An etcd3 client whose every call has a ``timeout`` deadline (seconds)."""
    host, port = parse_endpoint(endpoint)
    return etcd3.client(host=host, port=port, timeout=timeout)


def child_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child (the TF server): without the protobuf override."""
    child = dict(os.environ if env is None else env)
    child.pop(_IMPL, None)
    return child
