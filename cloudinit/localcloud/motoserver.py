"""The EC2 and S3 APIs of the local cloud: a moto server, started once per cluster.

    python -m tfcluster.cloudinit.localcloud.motoserver --state-dir RUN --host H --port P

runs moto's server on H:P until SIGTERM (the state folder is named on the
command line so that `tfcluster.cloudinit.localcloud.daemons` can find the
process again). ``ensure`` starts it in the background, or reuses the one
already running, and returns its endpoint once it answers HTTP. moto keeps
its state in memory: a restarted server knows no instances, and
``LocalCloud.sync`` tears down whatever it booted for the old one.

The host is where the instances can reach it, because they fetch what `up`
staged in the cluster bucket (moto's S3) with presigned URLs, and a URL is
signed for the endpoint the client uses: 127.0.0.1 in loopback mode, the
bridge's own address (the subnet's first host, which the local cloud gives
itself) in netns mode, whose namespaces cannot reach the host's loopback.
Every client, the operator's included, uses that one endpoint.

Clients use a session with fake credentials of their own (`session`), so
nothing of the operator's AWS set-up is read or sent anywhere.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tfcluster.cloudinit.cloud.aws_errors import translate_errors
from tfcluster.cloudinit.cloud.ec2 import Ec2Provider
from tfcluster.cloudinit.cloud.ec2_network import s3_service
from tfcluster.cloudinit.cloud.provider import TAG_CLUSTER, ProviderError
from tfcluster.cloudinit.localcloud import daemons
from tfcluster.cloudinit.localcloud.localstack import free_port

HOST = "127.0.0.1"
REGION = "us-east-1"
NAME = "moto"
READY_TIMEOUT = 30.0
"""Seconds for a new moto server to answer (importing moto takes a few)."""


class MotoServerError(RuntimeError):
    """The moto server could not be started or does not answer."""


class MotoProvider(Ec2Provider):
    """The EC2 provider pointed at a cluster's moto server, with what only the local
    cloud needs: a network of its own to launch into, and an image to launch."""

    def ensure_subnet(self, cluster: str, cidr: str) -> str:
        """The cluster's VPC and subnet on ``cidr``, tagged; created once.

        The VPC gets an S3 gateway endpoint, which is what the local instances
        have: they reach moto's S3 over the bridge, with no route to anywhere
        else (and so `up`'s check of the route to S3 passes, as it must)."""
        tag = [{"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]}]
        tags = [{"Key": TAG_CLUSTER, "Value": cluster}]
        with translate_errors(f"creating the local subnet {cidr} in moto"):
            subnets = self.ec2.describe_subnets(Filters=tag)["Subnets"]
            if subnets:
                return str(subnets[0]["SubnetId"])
            vpc = self.ec2.create_vpc(
                CidrBlock=cidr, TagSpecifications=[{"ResourceType": "vpc", "Tags": tags}]
            )["Vpc"]["VpcId"]
            subnet = self.ec2.create_subnet(
                VpcId=vpc,
                CidrBlock=cidr,
                TagSpecifications=[{"ResourceType": "subnet", "Tags": tags}],
            )
            tables = self.ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc]}])[
                "RouteTables"
            ]
            self.ec2.create_vpc_endpoint(
                VpcId=vpc,
                ServiceName=s3_service(self.region),
                VpcEndpointType="Gateway",
                RouteTableIds=[t["RouteTableId"] for t in tables],
            )
        return str(subnet["Subnet"]["SubnetId"])

    def any_image(self) -> str:
        """An x86_64 image moto holds (it registers a fixed set in every region): the
        "AMI" of the default instance types, which are x86_64."""
        with translate_errors("listing moto's images"):
            images = self.ec2.describe_images(
                Owners=["amazon"], Filters=[{"Name": "architecture", "Values": ["x86_64"]}]
            )["Images"]
        if not images:
            raise ProviderError("the moto server holds no image to launch")
        return str(min(image["ImageId"] for image in images))


def url_file(state_dir: Path) -> Path:
    """Where the server's URL is kept (read by the instances' ``shutdown``, poweroff.py)."""
    return state_dir / "moto.url"


def endpoint(state_dir: Path) -> str | None:
    """The URL of the moto server running for ``state_dir``, or None."""
    if daemons.running(state_dir, NAME) is None:
        return None
    try:
        url = url_file(state_dir).read_text().strip()
    except OSError:
        return None
    return url or None


def ensure(state_dir: Path, host: str = HOST, timeout: float = READY_TIMEOUT) -> str:
    """Start the server on ``host`` unless it runs; return its endpoint once it answers.

    ``host`` must be an address of this machine. A server already running
    for ``state_dir`` is reused only if it listens there; one on another
    address is an error (its presigned URLs would not reach the instances).
    """
    url = endpoint(state_dir)
    if url is not None and urllib.parse.urlsplit(url).hostname != host:
        raise MotoServerError(
            f"the moto server of {state_dir} listens at {url}, not on {host}: "
            "run 'down --local' first"
        )
    if url is None:
        port = free_port(host)
        argv = [sys.executable, "-m", __name__, "--state-dir", str(state_dir),
                "--host", host, "--port", str(port)]  # fmt: skip
        daemons.start(state_dir, NAME, argv)
        url = f"http://{host}:{port}"
        url_file(state_dir).write_text(f"{url}\n")

    daemons.await_ready(
        state_dir, NAME, lambda: _answers(url),
        what=f"the moto server at {url} to answer", timeout=timeout, error=MotoServerError,
    )  # fmt: skip
    return url


def stop(state_dir: Path) -> bool:
    """Stop the server; True if one was running."""
    stopped = daemons.stop(state_dir, NAME)
    url_file(state_dir).unlink(missing_ok=True)
    return stopped


def session() -> Any:
    """A boto3 session with moto's fake credentials, for this process's clients only."""
    import boto3

    return boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    )


def _answers(url: str) -> bool:
    """moto's dashboard page answers once the server is up (data.json would dump every model)."""
    try:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=2.0) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve moto's EC2 and S3 APIs until SIGTERM.")
    parser.add_argument("--state-dir", type=Path, required=True, help="the local cloud's folder")
    parser.add_argument("--host", default=HOST, help="the address to listen on")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    from moto.server import ThreadedMotoServer

    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    server = ThreadedMotoServer(ip_address=args.host, port=args.port, verbose=False)
    server.start()
    print(f"moto server on {args.host}:{args.port} for {args.state_dir}", flush=True)
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
