"""The instance agent: identity -> claim -> record -> DNS -> barrier -> TF_CONFIG -> server.

States and transitions (``Agent.run`` walks them in order)::

    IDENTIFY   read ami-launch-index, local-ipv4, instance-id from IMDSv2 and
               validate them against the config     -> CLAIM
               IMDS or config failure                -> exit 3 / 2, nothing written
    CLAIM      one etcd transaction puts the record and the membership entry
               under a fresh lease                   -> BARRIER
               name held by another live instance    -> exit 4, nothing written
               etcd unreachable past claim_timeout   -> exit 6, nothing written
    BARRIER    one SRV query per poll, woken by an etcd watch, then
               getaddrinfo for every peer            -> CONFIGURE
               barrier_timeout                       -> revoke, exit 5
    CONFIGURE  write TF_CONFIG (names or addresses)  -> SERVE
    SERVE      the TF server (ps, worker) or the chief's program runs as a
               child process; the lease is kept alive every lease_ttl/3.
               A ps or worker's TF process is started right after the claim
               and imports TensorFlow while the barrier waits; CONFIGURE
               then tells it to start (a line on its stdin).
               lease lost (expired while etcd was cut off)   -> claim again
               name taken meanwhile                  -> stop child, exit 4
               SIGTERM / SIGINT (``shutdown()``)      -> STOP
               child exits                           -> STOP
    STOP       stop the child, revoke the lease (the name leaves DNS at once);
               exit 0, or 7 if the child failed.

A revoked or expired lease removes both keys, so a crashed agent's name leaves
DNS within lease_ttl (plus record_ttl in caches), and a clean stop removes it
at once. etcd restarting keeps its leases, so agents just keep refreshing.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tfcluster.discovery import etcdclient, records
from tfcluster.discovery.agent_config import AgentConfig, ConfigError
from tfcluster.discovery.barrier import Barrier, BarrierTimeout
from tfcluster.discovery.dns import DNSClient, Endpoint
from tfcluster.discovery.identity import Identity, resolve_identity
from tfcluster.discovery.imds import IMDSClient, IMDSError
from tfcluster.discovery.registry import EtcdUnavailable, NameTaken, Registry, RegistryError
from tfcluster.discovery.tfconfig import build_cluster_spec, write_tf_config
from tfcluster.discovery.waiting import WaitTimeout, wait_for
from tfcluster.discovery.watch import MembershipWatch

log = logging.getLogger(__name__)

# Exit codes of `tfcluster agent` (also in discovery/README.md).
EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_IMDS = 3
EXIT_NAME_TAKEN = 4
EXIT_BARRIER_TIMEOUT = 5
EXIT_ETCD = 6
EXIT_SERVER_FAILED = 7

# Set to 0 to start a ps or worker's TensorFlow only after the barrier (as
# before the overlap): for hosts that cannot spare its memory while waiting,
# and for measuring what the overlap saves.
PRELOAD_ENV = "TFCLUSTER_PRELOAD_TF"


class AgentExit(Exception):
    """Ends the agent with ``code``; the message is the one line the CLI prints."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class AgentResult:
    code: int
    message: str
    identity: Identity | None = None


class Agent:
    """One instance's agent. ``run`` blocks until the agent is done or ``shutdown`` is called."""

    def __init__(
        self,
        config: AgentConfig,
        imds: IMDSClient,
        *,
        etcd: Any = None,
        dns: DNSClient | None = None,
        start_server: bool = True,
        claim_timeout: float = 60.0,
    ) -> None:
        self.config = config
        self.imds = imds
        self.etcd = etcd if etcd is not None else etcdclient.connect(config.etcd_endpoints[0])
        self.dns = dns if dns is not None else DNSClient(config.dns_server)
        self.start_server = start_server
        self.claim_timeout = claim_timeout
        self.registry = Registry(
            self.etcd, config.cluster, config.zone, config.lease_ttl, config.record_ttl
        )
        self.identity: Identity | None = None
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.barrier_passed = threading.Event()
        # Wake-ups: the barrier's (a peer claimed, or shutdown) and the keepalive
        # loop's (shutdown, the barrier passed, the child exited).
        self._barrier_wake = threading.Event()
        self._nudge = threading.Event()
        self._lost_name: str | None = None

    def shutdown(self) -> None:
        """Stop soon: safe from a signal handler or another thread."""
        self.stopping.set()
        self._barrier_wake.set()
        self._nudge.set()

    def run(self) -> AgentResult:
        try:
            identity = self._identify()
            self.identity = identity
            self._claim(identity)
            try:
                self._preload(identity)
                members = self._barrier(identity)
                if self.stopping.is_set():
                    return self._result(EXIT_OK, "stopped before the barrier passed")
                self._configure(identity, members)
                return self._serve(identity)
            finally:
                self._stop_child()
                self.registry.release()
        except AgentExit as exc:
            return self._result(exc.code, str(exc))

    def _result(self, code: int, message: str) -> AgentResult:
        if self._lost_name is not None:
            code, message = EXIT_NAME_TAKEN, self._lost_name
        return AgentResult(code, message, self.identity)

    def _identify(self) -> Identity:
        try:
            meta = self.imds.identity()
            return resolve_identity(
                self.config, meta.launch_index, meta.local_ipv4, meta.instance_id
            )
        except IMDSError as exc:
            raise AgentExit(EXIT_IMDS, f"instance metadata: {exc}") from None
        except ConfigError as exc:
            raise AgentExit(EXIT_CONFIG, str(exc)) from None

    def _claim(self, identity: Identity) -> None:
        def attempt() -> bool | None:
            try:
                self.registry.claim(identity)
                return True
            except EtcdUnavailable as exc:
                log.warning("%s; retrying", exc)
                return None

        try:
            wait_for(attempt, what="etcd to accept the claim", timeout=self.claim_timeout)
        except NameTaken as exc:
            raise AgentExit(EXIT_NAME_TAKEN, str(exc)) from None
        except (WaitTimeout, RegistryError) as exc:
            raise AgentExit(EXIT_ETCD, str(exc)) from None

    def _barrier(self, identity: Identity) -> dict[records.Member, Endpoint]:
        expected = self.config.members()
        watch = MembershipWatch(
            self.config.etcd_endpoints[0],
            self.config.cluster,
            self.config.zone,
            expected,
            self._barrier_wake,
        )
        watch.start()
        barrier = Barrier(
            self.dns,
            self.config.zone,
            expected,
            check_system_resolver=self.config.check_system_resolver,
            wake=self._barrier_wake,
            etcd_missing=watch.missing,
            etcd_revision=watch.revision,
        )
        # The lease must be kept alive while we wait: the barrier may outlast it.
        keeper = threading.Thread(
            target=self._keep_alive_until, args=(identity, self.barrier_passed.is_set), daemon=True
        )
        keeper.start()
        try:
            return barrier.wait(self.config.barrier_timeout, stop=self.stopping)
        except InterruptedError:
            return {}
        except BarrierTimeout as exc:
            raise AgentExit(EXIT_BARRIER_TIMEOUT, str(exc)) from None
        finally:
            self.barrier_passed.set()
            self._nudge.set()
            keeper.join()
            watch.stop()

    def _configure(self, identity: Identity, members: dict[records.Member, Endpoint]) -> None:
        spec = build_cluster_spec(
            members, self.config.zone, use_names=self.config.tf_config_addresses == "names"
        )
        member = identity.member
        write_tf_config(self.config.tf_config_path, spec, member.role, member.index)
        log.info("wrote TF_CONFIG to %s", self.config.tf_config_path)

    def _preload(self, identity: Identity) -> None:
        """Start a ps or worker's TF process now: it imports TensorFlow while
        the barrier waits, and starts its server when _serve says go."""
        if not self.start_server or identity.member.role == "chief":
            return
        if os.environ.get(PRELOAD_ENV, "1") == "0":
            log.info("%s=0: TensorFlow starts after the barrier", PRELOAD_ENV)
            return
        argv = [sys.executable, "-m", "tfcluster.discovery.tfserver"]
        argv += ["--tf-config", str(self.config.tf_config_path), "--wait-config"]
        self.child = subprocess.Popen(
            argv, stdin=subprocess.PIPE, env=etcdclient.child_environment()
        )
        log.info("started %s (pid %d); it waits for TF_CONFIG", " ".join(argv), self.child.pid)

    def _serve(self, identity: Identity) -> AgentResult:
        child = self.child
        if child is not None and child.stdin is not None:
            try:
                child.stdin.write(b"go\n")
                child.stdin.close()
            except OSError as exc:  # it died while importing; its status tells why
                log.error("TensorFlow process gone before its start: %s", exc)
            log.info("told the TensorFlow process (pid %d) to start", child.pid)
            threading.Thread(target=self._watch_child, args=(child,), daemon=True).start()
            self._report_listening(identity)
        elif self.start_server:
            argv = [sys.executable, "-m", "tfcluster.discovery.tfserver"]
            argv += ["--tf-config", str(self.config.tf_config_path)]
            if self.config.program_dir is not None and identity.member.role == "chief":
                argv += ["--program-dir", str(self.config.program_dir)]
            if self.config.program and identity.member.role == "chief":
                argv += ["--", *self.config.program]
            child = self.child = subprocess.Popen(argv, env=etcdclient.child_environment())
            log.info("started %s (pid %d)", " ".join(argv), child.pid)
            threading.Thread(target=self._watch_child, args=(child,), daemon=True).start()
            if identity.member.role != "chief":
                self._report_listening(identity)
        self._keep_alive_until(identity, lambda: child is not None and child.poll() is not None)
        if child is None or child.poll() is None:
            return self._result(EXIT_OK, f"{identity.member.label} stopped")
        if child.returncode == 0:
            return self._result(EXIT_OK, f"{identity.member.label} finished")
        return self._result(
            EXIT_SERVER_FAILED, f"TensorFlow process exited with status {child.returncode}"
        )

    def _report_listening(self, identity: Identity, timeout: float = 120.0) -> None:
        """Log when this task's TF server accepts connections (and how long
        after the barrier passed), from a thread: the agent does not wait."""
        passed = time.monotonic()

        def listening() -> bool | None:
            if self.child is None or self.child.poll() is not None or self.stopping.is_set():
                return False
            try:
                with socket.create_connection((identity.ip, identity.port), timeout=1.0):
                    return True
            except OSError:
                return None

        def report() -> None:
            try:
                up = wait_for(
                    listening, what="the TF server to listen", timeout=timeout, interval=0.01,
                    max_interval=0.05,
                )  # fmt: skip
            except WaitTimeout as exc:
                log.warning("%s", exc)
                return
            if up:
                log.info(
                    "TF server listening at %s:%d, %.3f s after the barrier passed",
                    identity.ip, identity.port, time.monotonic() - passed,
                )  # fmt: skip

        threading.Thread(target=report, name="listening", daemon=True).start()

    def _watch_child(self, child: subprocess.Popen[bytes]) -> None:
        child.wait()
        self._nudge.set()

    def _keep_alive_until(self, identity: Identity, finished: Callable[[], bool]) -> None:
        """Refresh the lease every lease_ttl/3 until ``finished()`` or shutdown.

        A lost lease (it expired while etcd was cut off) is claimed again; if
        someone else took the name meanwhile, the agent stops.
        """
        interval = self.config.lease_ttl / 3
        next_refresh = time.monotonic() + interval
        while not self.stopping.is_set() and not finished():
            self._nudge.wait(max(0.0, next_refresh - time.monotonic()))
            self._nudge.clear()
            if self.stopping.is_set() or finished() or time.monotonic() < next_refresh:
                continue
            next_refresh = time.monotonic() + interval
            try:
                if not self.registry.keepalive():
                    self.registry.claim(identity)
                    log.info("claimed %s again", identity.member.label)
            except NameTaken as exc:
                self._lost_name = f"lost the name: {exc}"
                log.error("%s; stopping", self._lost_name)
                self.shutdown()
            except RegistryError as exc:
                log.warning("%s; will retry in %.1f s", exc, interval)

    def _stop_child(self) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return
        child.terminate()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log.warning("TensorFlow process did not stop on SIGTERM; killing it")
            child.kill()
            child.wait(timeout=15)
