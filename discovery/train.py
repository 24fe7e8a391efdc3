"""The built-in training job the chief runs: a small real ParameterServerStrategy job.

It fits y = 3x + 2 + noise with two variables held by the parameter servers;
the workers generate their own data, so the job needs nothing but the
cluster. It proves the cluster works end to end: variables on ps, steps
scheduled on workers by the chief's ClusterCoordinator, a loss that falls.
Keras 3 ``model.fit`` refuses plain datasets under this strategy, hence the
custom loop with ``create_per_worker_dataset``.

    python -m tfcluster.discovery.train --steps 200 [--dns-server HOST:PORT --zone ZONE]

Without ``--dns-server`` the cluster comes from TF_CONFIG. Prints
``step N loss L`` lines, then one JSON line with the summary.

With ``TFCLUSTER_OUTPUT_DIR`` set (the chief's agent sets it; ``--output-dir``
overrides it), the job writes there what the operator fetches back: a
TensorFlow checkpoint of the two variables (``checkpoint/ckpt-1.*``, found
by ``tf.train.latest_checkpoint``; restore it into
``tf.train.Checkpoint(weight=..., bias=...)``) and ``metrics.json`` (the
summary, every reported loss, the learned weight and bias).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tfcluster.discovery.dns import DNSClient, DNSQueryError, parse_server
from tfcluster.discovery.output import OUTPUT_ENV
from tfcluster.discovery.tfconfig import make_dns_cluster_resolver

TRUE_WEIGHT, TRUE_BIAS, NOISE = 3.0, 2.0, 0.1
BATCH, LEARNING_RATE = 64, 0.1
CHECKPOINT_DIR, METRICS_FILE = "checkpoint", "metrics.json"
CHIEF_DEVICE = "/job:chief/replica:0/task:0/device:CPU:0"


@dataclass(frozen=True)
class TrainResult:
    """What the summary line reports: whether the loss fell."""

    steps: int
    first_loss: float
    last_loss: float
    weight: float = float("nan")
    bias: float = float("nan")
    losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, loss) of every fetched step."""

    def summary(self) -> dict[str, Any]:
        """The summary line: the result without the loss list."""
        return {k: v for k, v in asdict(self).items() if k != "losses"}


def run(
    resolver: Any,
    steps: int,
    log_every: int = 20,
    report: Callable[[int, float], None] | None = None,
    output_dir: Path | None = None,
) -> TrainResult:
    """Train for ``steps`` steps on the cluster ``resolver`` describes.

    The loss of step 1 (before any update) and of the last step are fetched
    exactly; ``report`` also gets the loss of every ``log_every``-th step.
    With ``output_dir``, a checkpoint and the metrics are written there.
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    import tensorflow as tf

    strategy = tf.distribute.ParameterServerStrategy(resolver)
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    with strategy.scope():
        weight = tf.Variable(0.0, name="weight")
        bias = tf.Variable(0.0, name="bias")

    def dataset_fn() -> Any:
        x = tf.random.uniform((4096, 1), -1.0, 1.0, seed=1)
        y = TRUE_WEIGHT * x + TRUE_BIAS + tf.random.normal((4096, 1), stddev=NOISE, seed=2)
        return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(4096).repeat().batch(BATCH)

    batches = iter(coordinator.create_per_worker_dataset(dataset_fn))

    @tf.function
    def step(iterator: Any) -> Any:
        def replica_step(batch: Any) -> Any:
            x, y = batch
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(x * weight + bias - y))
            grad_w, grad_b = tape.gradient(loss, [weight, bias])
            weight.assign_sub(LEARNING_RATE * grad_w)
            bias.assign_sub(LEARNING_RATE * grad_b)
            return loss

        return strategy.run(replica_step, args=(next(iterator),))

    first_loss = last_loss = float("nan")
    losses: list[tuple[int, float]] = []
    for number in range(1, steps + 1):
        remote = coordinator.schedule(step, args=(batches,))
        if number == 1 or number == steps or number % log_every == 0:
            # Fetching waits for this step only; the others keep running.
            loss = float(remote.fetch())
            if number == 1:
                first_loss = loss
            last_loss = loss
            losses.append((number, loss))
            if report is not None:
                report(number, loss)
    coordinator.join()
    result = TrainResult(
        steps=steps,
        first_loss=first_loss,
        last_loss=last_loss,
        weight=float(weight.numpy()),
        bias=float(bias.numpy()),
        losses=losses,
    )
    if output_dir is not None:
        # Saving the strategy's variables would run SaveV2 on the parameter servers,
        # writing to *their* disks; copies on the chief are written on the chief's.
        with tf.device(CHIEF_DEVICE):
            local = {"weight": tf.Variable(result.weight), "bias": tf.Variable(result.bias)}
        save(tf.train.Checkpoint(**local), result, output_dir)
    return result


def save(checkpoint: Any, result: TrainResult, output_dir: Path) -> None:
    """The checkpoint (of the chief's copies of the variables) and
    ``metrics.json``, written whole (a temporary name, then renamed): an
    upload never sees half a metrics file."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint.save(str(output_dir / CHECKPOINT_DIR / "ckpt"))
    metrics = {**asdict(result), "checkpoint": os.path.relpath(path, output_dir)}
    partial = output_dir / f".{METRICS_FILE}.tmp"
    partial.write_text(json.dumps(metrics, indent=1) + "\n")
    partial.replace(output_dir / METRICS_FILE)


def _resolver(args: argparse.Namespace) -> Any:
    if args.dns_server is None:
        import tensorflow as tf

        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    client = DNSClient(parse_server(args.dns_server), timeout=args.dns_timeout)
    return make_dns_cluster_resolver(
        client, args.zone, "chief", 0, use_names=args.addresses == "names"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tfcluster-train", description="Train a small model on the cluster."
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=20, help="print the loss every N steps")
    parser.add_argument("--dns-server", help="HOST:PORT of CoreDNS; default: read TF_CONFIG")
    parser.add_argument("--zone", default="tensorflow.local")
    parser.add_argument("--addresses", choices=["names", "ips"], default="names")
    parser.add_argument("--dns-timeout", type=float, default=2.0)
    parser.add_argument(
        "--output-dir", type=Path, default=None,
        help=f"checkpoint and metrics.json go here (default: ${OUTPUT_ENV}; unset: none)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    output_dir = args.output_dir or (
        Path(os.environ[OUTPUT_ENV]) if os.environ.get(OUTPUT_ENV) else None
    )

    def report(number: int, loss: float) -> None:
        print(f"step {number} loss {loss:.4f}", flush=True)

    import tensorflow as tf

    try:
        result = run(_resolver(args), args.steps, args.log_every, report, output_dir)
    except (DNSQueryError, ValueError, OSError, tf.errors.OpError) as exc:
        print(f"tfcluster-train: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if output_dir is not None:
        print(f"wrote a checkpoint and {METRICS_FILE} to {output_dir}", flush=True)
    print(json.dumps(result.summary()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
