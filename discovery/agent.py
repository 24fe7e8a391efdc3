"""The instance agent: identity -> claim -> record -> DNS -> barrier -> TF_CONFIG -> server.

States and transitions (``Agent.run`` walks them in order)::

    IDENTIFY   read ami-launch-index, local-ipv4, instance-id from IMDSv2 and
               validate them against the config; the chief creates its
               output_dir                            -> CLAIM
               IMDS or config failure                -> exit 3 / 2, nothing written
    CLAIM      one etcd transaction puts the record and the membership entry
               under a fresh lease                   -> BARRIER
               name held by another live instance    -> exit 4, nothing written
               etcd unreachable past claim_timeout   -> exit 6, nothing written
    BARRIER    one SRV query, held by tfzone until every member is
               registered (asked again when its 10 s hold runs out), then
               getaddrinfo for every peer            -> CONFIGURE
               barrier_timeout                       -> revoke, exit 5
    CONFIGURE  write TF_CONFIG (names or addresses)  -> SERVE
    SERVE      the TF server (ps, worker) or the chief's program runs as a
               child process; the lease is kept alive every lease_ttl/3.
               A ps or worker's TF process is started right after the claim
               and imports TensorFlow while the barrier waits; CONFIGURE
               then tells it to start (a line on its stdin). The chief's
               program gets TFCLUSTER_OUTPUT_DIR; with output_post the agent
               uploads what changed there every output_interval s.
               lease lost (expired while etcd was cut off)   -> claim again
               name taken meanwhile                  -> stop child, exit 4
               SIGTERM / SIGINT (``shutdown()``)      -> STOP
               on_chief_exit down: the job-done key appears  -> STOP
               child exits (ps, worker)              -> STOP
               the chief's program exits             -> UPLOAD
    UPLOAD     the chief only, with output_post: the output directory's last
               changes, then the marker output/.tfcluster-complete (the
               lease still kept alive)               -> STOP
               not uploaded within the final timeout -> STOP, exit 8 (the job
                                                        is not marked done)
               on_chief_exit down: put the job-done key (no lease)
    STOP       stop the child, revoke the lease (the name leaves DNS at once);
               exit 0, or 7 if the child failed. With on_chief_exit down and
               the job done, run ``shutdown_command -P now`` first.

With ``report_post`` the agent reports each state change, barrier progress,
the TF process, its exit and the tail of its log (its own and its child's
output, which it relays to its own stdout) to the cluster bucket
(discovery/report.py); a report that cannot be written never holds it up.
Without it, nothing is reported and the child writes to the agent's stdout
directly.

A revoked or expired lease removes both keys, so a crashed agent's name leaves
DNS within lease_ttl (plus record_ttl in caches), and a clean stop removes it
at once. etcd restarting keeps its leases, so agents just keep refreshing.
"""

from __future__ import annotations

import logging
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
from tfcluster.discovery.output import FINAL_TIMEOUT, OUTPUT_ENV, OutputUploader
from tfcluster.discovery.registry import EtcdUnavailable, NameTaken, Registry, RegistryError
from tfcluster.discovery.report import LogTail, PostTarget, Reporter, reporter_for
from tfcluster.discovery.tfconfig import build_cluster_spec, write_tf_config
from tfcluster.discovery.waiting import WaitTimeout, wait_for

log = logging.getLogger(__name__)

# Exit codes of `tfcluster agent` (also in discovery/README.md).
EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_IMDS = 3
EXIT_NAME_TAKEN = 4
EXIT_BARRIER_TIMEOUT = 5
EXIT_ETCD = 6
EXIT_SERVER_FAILED = 7
EXIT_OUTPUT = 8

RELAY_CHUNK = 64 * 1024
"""The child's output is relayed in lines, or pieces of this many bytes."""
RELAY_JOIN = 5.0
"""Seconds the agent waits for its child's last output lines at the end."""
REPORT_FLUSH = 5.0
"""Seconds the agent's last report may take to be written when it exits."""
SHUTDOWN_TIMEOUT = 60.0
"""Seconds ``shutdown_command`` may take (``shutdown -P now`` returns at once)."""
MARK_DONE_TIMEOUT = 60.0
"""Seconds the chief tries to put the job-done key while etcd does not answer."""


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
        final_upload_timeout: float = FINAL_TIMEOUT,
    ) -> None:
        self.config = config
        self.imds = imds
        self.etcd = etcd if etcd is not None else etcdclient.connect(config.etcd_endpoints[0])
        self.dns = dns if dns is not None else DNSClient(config.dns_server)
        self.start_server = start_server
        self.claim_timeout = claim_timeout
        self.final_upload_timeout = final_upload_timeout
        self.registry = Registry(
            self.etcd,
            config.cluster,
            config.zone,
            config.lease_ttl,
            config.record_ttl,
            follow_job=config.on_chief_exit == "down",
        )
        self.identity: Identity | None = None
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.barrier_passed = threading.Event()
        # Wakes the keepalive loop: shutdown, the barrier passed, the child exited.
        self._nudge = threading.Event()
        self._lost_name: str | None = None
        # Reports (only with report_post): the log tail collects from the start.
        self.tail = LogTail() if config.report_post is not None else None
        self.reporter: Reporter | None = None
        self.outputs: OutputUploader | None = None
        self._relays: list[threading.Thread] = []
        """Threads that follow the child (its output, its exit) into the report."""
        self.job_done: dict[str, object] | None = None
        """The job-done key's value once seen or put (on_chief_exit: down)."""

    def shutdown(self) -> None:
        """Stop soon: safe from a signal handler or another thread."""
        self.stopping.set()
        self._nudge.set()

    def run(self) -> AgentResult:
        logger = logging.getLogger("tfcluster")
        if self.tail is not None:
            logger.addHandler(self.tail)
        try:
            result = self._walk()
            self._finish(result)
            return result
        finally:
            if self.tail is not None:
                logger.removeHandler(self.tail)

    def _walk(self) -> AgentResult:
        try:
            identity = self._identify()
            self.identity = identity
            self._start_reporting(identity)
            self._prepare_outputs(identity)
            self._enter("CLAIM")
            self._claim(identity)
            try:
                self._preload(identity)
                self._enter("BARRIER")
                members = self._barrier(identity)
                if self.stopping.is_set():
                    return self._result(EXIT_OK, "stopped before the barrier passed")
                self._enter("CONFIGURE")
                self._configure(identity, members)
                self._enter("SERVE")
                return self._serve(identity)
            finally:
                self._enter("STOP")
                if self.outputs is not None:
                    self.outputs.stop()
                self._stop_child()
                self.registry.release()
        except AgentExit as exc:
            return self._result(exc.code, str(exc))

    def _result(self, code: int, message: str) -> AgentResult:
        if self._lost_name is not None:
            code, message = EXIT_NAME_TAKEN, self._lost_name
        elif (
            self.job_done is not None
            and self.identity is not None
            and self.identity.member.role != "chief"
            and code == EXIT_OK
        ):
            message = f"{self.identity.member.label} stopped: the job is done"
        return AgentResult(code, message, self.identity)

    def _enter(self, state: str, detail: str = "") -> None:
        """A state change: logged, and reported when the agent reports."""
        log.debug("state %s %s", state, detail)
        if self.reporter is not None:
            self.reporter.state(state, detail)

    def _start_reporting(self, identity: Identity) -> None:
        if self.config.report_post is None:
            return
        member = identity.member
        reporter = self.reporter = reporter_for(self.config, member, tail=self.tail)
        if reporter.target is None:
            log.warning("report_post has no form fields for %s or %s", member.label, member.role)
        reporter.identity(identity.instance_id, identity.ip, member.name(self.config.zone))
        reporter.state("IDENTIFY", f"{identity.instance_id} at {identity.ip}")
        # The writer starts once the claim is not refused (see _claim).

    def _finish(self, result: AgentResult) -> None:
        """The end: the child's last lines, the last report, and, when the job
        is done under on_chief_exit down, the instance's shutdown."""
        for relay in self._relays:
            relay.join(RELAY_JOIN)
        self._enter("STOP")  # also after a failed claim, which ends before the barrier
        power_off = (
            self.config.on_chief_exit == "down"
            and self.job_done is not None
            and not self._lost_name
        )
        if power_off:
            self._enter("STOP", "the job is done: shutting the instance down")
            self._power_off()
        if self.reporter is not None:
            self.reporter.finished(result.code, result.message)
            if not self.reporter.stop(timeout=REPORT_FLUSH):
                log.warning("the last report was not written within %g s", REPORT_FLUSH)

    def _power_off(self) -> None:
        """Run ``shutdown_command -P now`` (EC2 terminates an instance launched
        with terminate-on-shutdown when it powers off)."""
        argv = [self.config.shutdown_command, "-P", "now"]
        if self.config.shutdown_sudo:
            argv = ["sudo", "-n", *argv]
        log.info("on_chief_exit down: running %s", " ".join(argv))
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=SHUTDOWN_TIMEOUT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.error("could not shut the instance down: %s", exc)
            return
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or [""])[-1]
            log.error("%s exited with status %d: %s", argv[0], done.returncode, why)

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
        """Claim the name. Reports start once the claim succeeds or etcd does
        not answer; an agent whose name another live instance holds writes
        none: its report would overwrite the holder's (one key per name)."""

        def attempt() -> bool | None:
            try:
                self.registry.claim(identity)
                return True
            except EtcdUnavailable as exc:
                log.warning("%s; retrying", exc)
                self._start_writing()
                return None

        try:
            wait_for(attempt, what="etcd to accept the claim", timeout=self.claim_timeout)
        except NameTaken as exc:
            raise AgentExit(EXIT_NAME_TAKEN, str(exc)) from None
        except (WaitTimeout, RegistryError) as exc:
            self._start_writing()
            raise AgentExit(EXIT_ETCD, str(exc)) from None
        self._start_writing()

    def _start_writing(self) -> None:
        if self.reporter is not None:
            self.reporter.start()

    def _prepare_outputs(self, identity: Identity) -> None:
        """The chief's output directory exists before anything is claimed; with
        output_post, its uploader is ready (started with the program)."""
        if identity.member.role != "chief" or not self.start_server:
            return
        directory = self.config.output_dir
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AgentExit(
                EXIT_CONFIG, f"output_dir: cannot create {directory}: {exc.strerror}"
            ) from None
        post = self.config.output_post
        fields = post.fields_for(identity.member) if post is not None else None
        if post is not None and fields is None:
            log.warning("output_post has no form fields for %s: no outputs are uploaded",
                        identity.member.label)  # fmt: skip
        if post is not None and fields is not None:
            self.outputs = OutputUploader(
                PostTarget(post.url, fields),
                directory,
                self.config.output_interval,
                progress=self.reporter.outputs if self.reporter is not None else None,
            )

    def _barrier(self, identity: Identity) -> dict[records.Member, Endpoint]:
        expected = self.config.members()
        barrier = Barrier(
            self.dns,
            self.config.zone,
            expected,
            check_system_resolver=self.config.check_system_resolver,
        )
        if self.reporter is not None:
            self.reporter.follow_barrier(barrier.progress)
        # The lease must be kept alive while we wait: the barrier may outlast it.
        keeper = threading.Thread(
            target=self._keep_alive_until, args=(identity, self.barrier_passed.is_set), daemon=True
        )
        keeper.start()
        passed = False
        try:
            found = barrier.wait(self.config.barrier_timeout, stop=self.stopping)
            passed = True
            return found
        except InterruptedError:
            return {}
        except BarrierTimeout as exc:
            raise AgentExit(EXIT_BARRIER_TIMEOUT, str(exc)) from None
        finally:
            self.barrier_passed.set()
            self._nudge.set()
            keeper.join()
            if self.reporter is not None:
                self.reporter.follow_barrier(None)
                if passed:
                    self.reporter.barrier(len(expected), len(expected), [])

    def _configure(self, identity: Identity, members: dict[records.Member, Endpoint]) -> None:
        spec = build_cluster_spec(
            members, self.config.zone, use_names=self.config.tf_config_addresses == "names"
        )
        member = identity.member
        write_tf_config(self.config.tf_config_path, spec, member.role, member.index)
        log.info("wrote TF_CONFIG to %s", self.config.tf_config_path)

    def _spawn(
        self, argv: list[str], env: dict[str, str], *, stdin: int | None = None
    ) -> subprocess.Popen[bytes]:
        """Start the TF process. When the agent reports, its output (stdout and
        stderr) comes through a pipe: relayed to the agent's stdout (the
        journal, as before) and into the report's log tail."""
        if self.tail is None:
            return subprocess.Popen(argv, stdin=stdin, env=env)
        env.setdefault("PYTHONUNBUFFERED", "1")  # lines reach the report as they are printed
        child = subprocess.Popen(
            argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        relay = threading.Thread(target=self._relay, args=(child,), name="relay", daemon=True)
        relay.start()
        self._relays.append(relay)
        return child

    def _relay(self, child: subprocess.Popen[bytes]) -> None:
        pipe, tail = child.stdout, self.tail
        if pipe is None or tail is None:
            return
        out = getattr(sys.stdout, "buffer", None)
        with pipe:
            for raw in iter(lambda: pipe.readline(RELAY_CHUNK), b""):
                try:
                    if out is not None:
                        out.write(raw)
                        out.flush()
                    else:
                        sys.stdout.write(raw.decode(errors="replace"))
                except (OSError, ValueError):
                    pass  # the agent's stdout is gone; the report still gets the line
                tail.add(raw.decode(errors="replace"))

    def _preload(self, identity: Identity) -> None:
        """Start a ps or worker's TF process now: it imports TensorFlow while
        the barrier waits, and starts its server when _serve says go."""
        if not self.start_server or identity.member.role == "chief":
            return
        if not self.config.preload_tensorflow:
            log.info("preload_tensorflow is false: TensorFlow starts after the barrier")
            return
        argv = [sys.executable, "-m", "tfcluster.discovery.tfserver"]
        argv += ["--tf-config", str(self.config.tf_config_path), "--wait-config"]
        self.child = self._spawn(argv, etcdclient.child_environment(), stdin=subprocess.PIPE)
        log.info("started %s (pid %d); it waits for TF_CONFIG", " ".join(argv), self.child.pid)
        if self.reporter is not None:
            self.reporter.tensorflow(program=False, running=False, pid=self.child.pid)

    def _serve(self, identity: Identity) -> AgentResult:
        child = self.child
        chief = identity.member.role == "chief"
        if child is not None and child.stdin is not None:
            try:
                child.stdin.write(b"go\n")
                child.stdin.close()
            except OSError as exc:  # it died while importing; its status tells why
                log.error("TensorFlow process gone before its start: %s", exc)
            log.info("told the TensorFlow process (pid %d) to start", child.pid)
            self._start_watching(child, program=False)
            self._report_listening(identity)
        elif self.start_server:
            argv = [sys.executable, "-m", "tfcluster.discovery.tfserver"]
            argv += ["--tf-config", str(self.config.tf_config_path)]
            if self.config.program_dir is not None and chief:
                argv += ["--program-dir", str(self.config.program_dir)]
            if self.config.program and chief:
                argv += ["--", *self.config.program]
            env = etcdclient.child_environment()
            if chief:
                env[OUTPUT_ENV] = str(self.config.output_dir)
            child = self.child = self._spawn(argv, env)
            log.info("started %s (pid %d)", " ".join(argv), child.pid)
            self._start_watching(child, program=chief)
            if chief:
                if self.reporter is not None:
                    self.reporter.tensorflow(program=True, running=True, pid=child.pid)
                if self.outputs is not None:
                    self.outputs.start()
            else:
                self._report_listening(identity)
        self._keep_alive_until(identity, lambda: child is not None and child.poll() is not None)
        if child is None or child.poll() is None:
            return self._result(EXIT_OK, f"{identity.member.label} stopped")
        code = child.returncode
        if chief:
            log.info("the chief's program exited with status %d", code)
            stopped = self._after_program(identity, code)
            if stopped is not None:
                return stopped
        if code == 0:
            return self._result(EXIT_OK, f"{identity.member.label} finished")
        return self._result(EXIT_SERVER_FAILED, f"TensorFlow process exited with status {code}")

    def _after_program(self, identity: Identity, code: int) -> AgentResult | None:
        """UPLOAD, then (on_chief_exit down) the job-done key. A result when
        that ends the agent differently from the program's own status."""
        if self.outputs is not None:
            self._enter("UPLOAD", "the final upload of the outputs")
            uploaded = self._final_upload(identity, code)
            if self.stopping.is_set() and not uploaded:
                return self._result(EXIT_OK, f"{identity.member.label} stopped during the upload")
            if not uploaded:
                message = f"the outputs were not uploaded within {self.final_upload_timeout:g} s"
                if self.config.on_chief_exit == "down":
                    message += "; the job is not marked done"
                return self._result(EXIT_OUTPUT, message)
        if self.config.on_chief_exit == "down":
            self._mark_done(identity, code)
        return None

    def _final_upload(self, identity: Identity, code: int) -> bool:
        """The outputs' final upload, in a thread: the lease is kept alive meanwhile."""
        outputs = self.outputs
        if outputs is None:
            return True
        finished = threading.Event()
        result: list[bool] = []

        def upload() -> None:
            try:
                result.append(
                    outputs.finish(code, timeout=self.final_upload_timeout, stop=self.stopping)
                )
            finally:
                finished.set()
                self._nudge.set()

        threading.Thread(target=upload, name="final upload", daemon=True).start()
        self._keep_alive_until(identity, finished.is_set)
        finished.wait(RELAY_JOIN)  # after a shutdown: the upload sees it and returns
        return bool(result and result[0])

    def _mark_done(self, identity: Identity, code: int) -> None:
        """Put the job-done key: every agent's keepalive loop sees it and stops."""
        value: dict[str, object] = {
            "by": identity.member.label,
            "instance_id": identity.instance_id,
            "exit_code": code,
            "time": round(time.time(), 3),
        }

        def attempt() -> bool | None:
            try:
                self.registry.mark_job_done(value)
                return True
            except EtcdUnavailable as exc:
                log.warning("%s; retrying", exc)
                return None

        try:
            wait_for(attempt, what="etcd to take the job-done key", timeout=MARK_DONE_TIMEOUT)
        except (WaitTimeout, RegistryError) as exc:
            log.error("could not mark the job done (%s): the instances stay up", exc)
            return
        self.job_done = value
        log.info("marked the job done: every agent shuts its instance down")

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
                child = self.child
                if self.reporter is not None and child is not None and child.poll() is None:
                    self.reporter.tensorflow(program=False, running=True, pid=child.pid)

        threading.Thread(target=report, name="listening", daemon=True).start()

    def _start_watching(self, child: subprocess.Popen[bytes], *, program: bool) -> None:
        watcher = threading.Thread(
            target=self._watch_child, args=(child, program), name="child", daemon=True
        )
        watcher.start()
        self._relays.append(watcher)  # joined at the end, like the output relays

    def _watch_child(self, child: subprocess.Popen[bytes], program: bool) -> None:
        child.wait()
        if self.reporter is not None:
            self.reporter.tensorflow(
                program=program, running=False, exit_code=child.returncode, pid=child.pid
            )
        self._nudge.set()

    def _keep_alive_until(self, identity: Identity, finished: Callable[[], bool]) -> None:
        """Refresh the lease every lease_ttl/3 until ``finished()`` or shutdown.

        A lost lease (it expired while etcd was cut off) is claimed again; if
        someone else took the name meanwhile, the agent stops. With
        on_chief_exit down, each refresh also looks for the job-done key.
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
            self._look_for_job_done(identity)

    def _look_for_job_done(self, identity: Identity) -> None:
        """on_chief_exit down: stop once the chief has put the job-done key.
        One read of one key per lease refresh (the chief puts it itself)."""
        if self.config.on_chief_exit != "down" or identity.member.role == "chief":
            return
        if self.config.count("chief") == 0 or self.stopping.is_set():
            return
        try:
            done = self.registry.job_done()
        except RegistryError as exc:
            log.warning("%s; will look again", exc)
            return
        if done is not None:
            self.job_done = done
            log.info(
                "the job is done (%s exited with status %s); stopping",
                done.get("by", "the chief"), done.get("exit_code", "?"),
            )  # fmt: skip
            self.shutdown()

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
