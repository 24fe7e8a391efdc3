"""The TensorFlow process the agent spawns once TF_CONFIG is written.

    python -m tfcluster.discovery.tfserver [--tf-config PATH] [--program-dir DIR] [-- PROGRAM...]
    python -m tfcluster.discovery.tfserver --tf-config PATH --wait-config

ps and worker tasks run a gRPC ``tf.distribute.Server`` for their task; it
listens on all interfaces at the port of the task's address in the cluster
spec (so several tasks on one host need distinct ports). The chief runs the
training program (default: ``python -m tfcluster.discovery.train``) in place of
this process, with TF_CONFIG in its environment, the folder of this
interpreter (the agent venv's bin) first on PATH, so that ``python3`` in the
program's command is the venv's, and ``--program-dir`` (where the chief
unpacked the program bundle) as its working directory.

Without ``--tf-config`` the document is read from the TF_CONFIG variable.
SIGTERM and SIGINT stop a server with exit status 0.

``--wait-config`` (ps and worker; the agent starts it while its barrier
waits) imports TensorFlow first, then waits for one line on standard input
(``go``) before it reads the TF_CONFIG file and starts the server: the
seconds TensorFlow takes to import overlap the barrier instead of following
it. End of input without ``go`` (the agent gave up) exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from tfcluster.discovery.tfconfig import ClusterSpecError, read_tf_config

DEFAULT_PROGRAM = (sys.executable, "-m", "tfcluster.discovery.train")
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class ServerStartError(RuntimeError):
    """TensorFlow could not start the task's server (e.g. its port is taken)."""


def serve(
    document: dict[str, Any], stopped: Callable[[], signal.Signals] | None = None
) -> signal.Signals:
    """Run the task's server until SIGTERM or SIGINT; return the signal.

    ``Server.join()`` blocks inside TensorFlow, where Python signal handlers
    never run; so the stop signals are blocked before TensorFlow starts its
    threads (which inherit the mask) and this thread waits for them instead
    (or ``stopped``, when another thread already waits for them).
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    import tensorflow as tf

    task = document["task"]
    try:
        server = tf.distribute.Server(
            tf.train.ClusterSpec(document["cluster"]),
            job_name=task["type"],
            task_index=task["index"],
            protocol="grpc",
            start=True,
        )
    except tf.errors.OpError as exc:
        raise ServerStartError(f"{task['type']}{task['index']}: {exc.message}") from exc
    print(f"tfserver: {task['type']}{task['index']} serving at {server.target}", flush=True)
    if stopped is not None:
        return stopped()
    return signal.Signals(signal.sigwait(_STOP_SIGNALS))


IMPORTED = "TensorFlow imported; waiting for the barrier"
"""What a preloaded TF process prints once its import is done."""


def preload_then_serve(tf_config: str) -> signal.Signals | None:
    """Import TensorFlow, wait for ``go`` on stdin, then serve (see --wait-config).

    None when the agent gave up (end of input) or a stop signal came first.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    received: list[signal.Signals] = []
    arrived = threading.Event()

    def wait_for_signal() -> None:
        received.append(signal.Signals(signal.sigwait(_STOP_SIGNALS)))
        arrived.set()
        if not serving.is_set():
            # Still importing or waiting for go: nothing to shut down.
            print(f"tfserver: stopping on {received[0].name} before serving", flush=True)
            os._exit(0)

    serving = threading.Event()
    threading.Thread(target=wait_for_signal, name="stop signals", daemon=True).start()
    import tensorflow  # noqa: F401  (the slow part, done while the barrier waits)

    print(f"tfserver: {IMPORTED}", flush=True)
    line = sys.stdin.readline()
    if line.strip() != "go":
        return None
    with open(tf_config) as handle:
        document = read_tf_config(handle.read())
    if document["task"]["type"] == "chief":
        raise ClusterSpecError("--wait-config is for ps and worker tasks, not the chief")
    serving.set()
    if arrived.is_set():
        return received[0]

    def stopped() -> signal.Signals:
        arrived.wait()
        return received[0]

    return serve(document, stopped)


def program_environment(document: dict[str, Any], environ: dict[str, str]) -> dict[str, str]:
    """The chief program's environment: TF_CONFIG, and this interpreter's folder first on PATH.

    That folder is the agent venv's bin, where ``python3`` sees TensorFlow
    and tfcluster; the system's python3 (systemd's PATH) sees neither.
    """
    bin_dir = os.path.dirname(sys.executable)
    rest = [p for p in environ.get("PATH", os.defpath).split(os.pathsep) if p and p != bin_dir]
    return dict(environ, TF_CONFIG=json.dumps(document), PATH=os.pathsep.join([bin_dir, *rest]))


def run_program(document: dict[str, Any], program: list[str], program_dir: str | None) -> None:
    """Replace this process with the chief's program: signals reach it directly."""
    if program_dir is not None:
        os.chdir(program_dir)
    os.execvpe(program[0], program, program_environment(document, dict(os.environ)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tfserver", description="Run this task's TF process.")
    parser.add_argument("--tf-config", help="TF_CONFIG file (default: the TF_CONFIG variable)")
    parser.add_argument(
        "--wait-config", action="store_true",
        help="ps/worker: import TensorFlow, then wait for 'go' on stdin before reading the config",
    )  # fmt: skip
    parser.add_argument(
        "--program-dir", help="chief only: the program's working directory (its unpacked bundle)"
    )
    parser.add_argument("program", nargs="*", help="chief only: program to run, after --")
    args = parser.parse_args(argv)
    try:
        if args.wait_config:
            if args.tf_config is None:
                raise ClusterSpecError("--wait-config needs --tf-config PATH")
            preloaded = preload_then_serve(args.tf_config)
            if preloaded is None:
                print("tfserver: no go from the agent; exiting", flush=True)
                return 0
            print(f"tfserver: stopping on {preloaded.name}", flush=True)
            return 0
        if args.tf_config is not None:
            with open(args.tf_config) as handle:
                text = handle.read()
        else:
            text = os.environ.get("TF_CONFIG", "")
            if not text:
                raise ClusterSpecError("no TF_CONFIG: pass --tf-config PATH or set TF_CONFIG")
        document = read_tf_config(text)
        if document["task"]["type"] == "chief":
            run_program(document, args.program or list(DEFAULT_PROGRAM), args.program_dir)
        stopped = serve(document)
    except (OSError, ClusterSpecError, ServerStartError) as exc:
        print(f"tfserver: {exc}", file=sys.stderr)
        return 2
    print(f"tfserver: stopping on {stopped.name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
