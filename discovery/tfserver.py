"""The TensorFlow process the agent spawns once TF_CONFIG is written.

    python -m tfcluster.discovery.tfserver [--tf-config PATH] [-- PROGRAM ARG...]

ps and worker tasks run a gRPC ``tf.distribute.Server`` for their task; it
listens on all interfaces at the port of the task's address in the cluster
spec (so several tasks on one host need distinct ports). The chief runs the
training program (default: ``python -m tfcluster.discovery.train``) in place of
this process, with TF_CONFIG in its environment.

Without ``--tf-config`` the document is read from the TF_CONFIG variable.
SIGTERM and SIGINT stop a server with exit status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

from tfcluster.discovery.tfconfig import ClusterSpecError, read_tf_config

DEFAULT_PROGRAM = (sys.executable, "-m", "tfcluster.discovery.train")
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class ServerStartError(RuntimeError):
    """TensorFlow could not start the task's server (e.g. its port is taken)."""


def serve(document: dict[str, Any]) -> signal.Signals:
    """Run the task's server until SIGTERM or SIGINT; return the signal.

    ``Server.join()`` blocks inside TensorFlow, where Python signal handlers
    never run; so the stop signals are blocked before TensorFlow starts its
    threads (which inherit the mask) and this thread waits for them instead.
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
    return signal.Signals(signal.sigwait(_STOP_SIGNALS))


def run_program(document: dict[str, Any], program: list[str]) -> None:
    """Replace this process with the chief's program: signals reach it directly."""
    env = dict(os.environ, TF_CONFIG=json.dumps(document))
    os.execvpe(program[0], program, env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tfserver", description="Run this task's TF process.")
    parser.add_argument("--tf-config", help="TF_CONFIG file (default: the TF_CONFIG variable)")
    parser.add_argument("program", nargs="*", help="chief only: program to run, after --")
    args = parser.parse_args(argv)
    try:
        if args.tf_config is not None:
            with open(args.tf_config) as handle:
                text = handle.read()
        else:
            text = os.environ.get("TF_CONFIG", "")
            if not text:
                raise ClusterSpecError("no TF_CONFIG: pass --tf-config PATH or set TF_CONFIG")
        document = read_tf_config(text)
        if document["task"]["type"] == "chief":
            run_program(document, args.program or list(DEFAULT_PROGRAM))
        stopped = serve(document)
    except (OSError, ClusterSpecError, ServerStartError) as exc:
        print(f"tfserver: {exc}", file=sys.stderr)
        return 2
    print(f"tfserver: stopping on {stopped.name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
