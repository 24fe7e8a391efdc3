"""The local instances' ``shutdown`` stand-in (localcloud/poweroff.py) against a moto server:
``-P now`` terminates the instance through the EC2 API, as EC2 does for an instance
launched with terminate-on-shutdown; a scheduled power-off is recorded only. The real
``shutdown`` cannot be run here: it would power off the test machine."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from tests import controlled_moto
from tfcluster.cloudinit.localcloud import motoserver, poweroff


@pytest.fixture
def moto() -> Iterator[controlled_moto.ControlledMoto]:
    yield from controlled_moto.running()


def instance(url: str) -> str:
    ec2 = boto3.client("ec2", endpoint_url=url, region_name=motoserver.REGION,
                       aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    image = min(i["ImageId"] for i in ec2.describe_images()["Images"])
    found = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.micro")
    return str(found["Instances"][0]["InstanceId"])


def state(url: str, instance_id: str) -> str:
    ec2 = motoserver.session().client("ec2", endpoint_url=url)
    found = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    return str(found["State"]["Name"])


def test_power_off_now_terminates_the_instance_and_a_schedule_is_only_recorded(
    moto: controlled_moto.ControlledMoto, tmp_path: Path
) -> None:
    url_file = tmp_path / "moto.url"
    url_file.write_text(moto.url + "\n")
    root = tmp_path / "machine"
    instance_id = instance(moto.url)
    (root / poweroff.INSTANCE_ID).parent.mkdir(parents=True)
    (root / poweroff.INSTANCE_ID).write_text(instance_id + "\n")
    command = tmp_path / "bin" / "shutdown"
    poweroff.write_shutdown(command, root, url_file)

    later = subprocess.run([command, "-P", "+90"], capture_output=True, text=True, timeout=60)
    assert later.returncode == 0, later.stderr
    assert "not enforce" in later.stdout and state(moto.url, instance_id) == "running"

    now = subprocess.run([command, "-P", "now"], capture_output=True, text=True, timeout=60)
    assert now.returncode == 0, now.stderr
    assert state(moto.url, instance_id) in ("shutting-down", "terminated")
    requests = (root / poweroff.LOG).read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in requests] == ["-P +90", "-P now"]


def test_without_its_instance_id_it_fails_in_one_line(tmp_path: Path) -> None:
    command = tmp_path / "shutdown"
    poweroff.write_shutdown(command, tmp_path / "empty", tmp_path / "moto.url")
    done = subprocess.run([command, "-P", "now"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("shutdown: cannot read this instance's id:")
    assert len(done.stderr.strip().splitlines()) == 1
