"""The local instances' ``shutdown``: what an EC2 instance's power-off does, here.

On EC2 the user-data schedules ``shutdown -P +MINUTES`` (``max_lifetime``)
and an agent with ``on_chief_exit: down`` runs ``shutdown -P now``; the
instance was launched with terminate-on-shutdown, so powering off
terminates it. A local instance shares this machine's kernel: the real
``shutdown`` would power off the machine itself. The local layout's
``shutdown_command`` is therefore this stand-in (``bin/shutdown`` of the
cluster's folder):

- ``-P now``: terminate this instance through the cluster's EC2 API (moto),
  as EC2 does; the local cloud stops the instance's processes when it next
  syncs (``status --local``, ``up --local``) or at ``down --local``.
- ``-P +MINUTES`` and ``-c``: recorded, not enforced (a local instance does
  not outlive the local cloud; ``down --local`` removes it).

The instance finds its own id where cloud-init leaves it on EC2,
``/var/lib/cloud/data/instance-id`` under the machine root. Every request
is appended to ``var/log/tfcluster-shutdown.log`` under the same root.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tfcluster.cloudinit.localcloud import motoserver

INSTANCE_ID = "var/lib/cloud/data/instance-id"
LOG = "var/log/tfcluster-shutdown.log"


def write_shutdown(path: Path, root: Path, endpoint_file: Path) -> None:
    """The ``shutdown`` a local instance calls: this module on ``root``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    command = f"{sys.executable} -m tfcluster.cloudinit.localcloud.poweroff"
    path.write_text(
        f'#!/bin/sh\nexec {command} --root "{root}" --endpoint-file "{endpoint_file}" "$@"\n'
    )
    path.chmod(0o755)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shutdown", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--endpoint-file", type=Path, required=True)
    parser.add_argument("-P", "--poweroff", dest="when", metavar="WHEN")
    parser.add_argument("-c", dest="cancel", action="store_true")
    args = parser.parse_args(argv)
    try:
        instance_id = (args.root / INSTANCE_ID).read_text().strip()
    except OSError as exc:
        print(f"shutdown: cannot read this instance's id: {exc}", file=sys.stderr)
        return 1
    request = "-c" if args.cancel else f"-P {args.when}"
    log = args.root / LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {request}\n")
    if args.cancel or args.when != "now":
        print(f"shutdown {request}: recorded; the local cloud does not enforce it")
        return 0
    try:
        endpoint = args.endpoint_file.read_text().strip()
        client = motoserver.session().client(
            "ec2", region_name=motoserver.REGION, endpoint_url=endpoint
        )
        client.terminate_instances(InstanceIds=[instance_id])
    except Exception as exc:  # any failure is this command's one line
        print(f"shutdown: could not terminate {instance_id}: {exc}", file=sys.stderr)
        return 1
    print(f"shutdown: {instance_id} terminated (its processes stop at the next sync)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
