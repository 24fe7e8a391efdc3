"""Per-role images, root volumes, arm64 staging and the subnet's route to S3, against moto.

moto serves DescribeInstanceTypes (architectures, GPUs), DescribeImages
(architecture, root device and snapshot size), and VPCs, subnets, route
tables, internet and NAT gateways and VPC endpoints. It lacks the public
image parameters under ``/aws/service/`` (Canonical's, the Deep Learning
AMIs') and refuses ``ssm put_parameter`` for them, as AWS does ("reserved
parameter name"): `publish_parameter` writes them into moto's SSM backend
directly, which the tests' moto (in-process, or the server thread of
`controlled_moto`) shares. Each parameter names one of the images moto holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from click.testing import CliRunner
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models.amis import AMIS
from moto.ssm.models import Parameter, ssm_backends

from controlled_moto import ControlledMoto, use_fake_aws
from tfcluster.cloudinit import cli, plan, provision
from tfcluster.cloudinit.cloud import ec2_images
from tfcluster.cloudinit.cloud.ec2 import Ec2Provider
from tfcluster.cloudinit.cloud.ec2_images import (
    DLAMI_PARAMETER,
    NEURON_PARAMETER,
    UBUNTU_PARAMETER,
    ImageChoiceError,
)
from tfcluster.cloudinit.cloud.ec2_network import s3_service
from tfcluster.cloudinit.cloud.provider import MachineType, ProviderError
from tfcluster.cloudinit.config import ClusterConfig, load_cluster_config
from tfcluster.cloudinit.stage.artifacts import BinaryNotFound, elf_info

REGION = "us-east-1"
REPO = Path(__file__).resolve().parents[1]


def moto_image(arch: str, root: str = "/dev/sda1") -> str:
    """An image moto registers in every region, of ``arch`` with root device ``root``."""
    return next(
        str(a["ami_id"])
        for a in AMIS
        if a.get("architecture") == arch and a.get("root_device_name", "/dev/sda1") == root
    )


X86 = moto_image("x86_64")
ARM = next(str(a["ami_id"]) for a in AMIS if a.get("architecture") == "arm64")
GPU_X86 = moto_image("x86_64", "/dev/xvda")
PUBLISHED = {
    UBUNTU_PARAMETER.format(arch="amd64"): X86,
    UBUNTU_PARAMETER.format(arch="arm64"): ARM,
    DLAMI_PARAMETER.format(arch="x86_64"): GPU_X86,
}


def publish_parameter(name: str, value: str, region: str = REGION) -> None:
    """Put a public ``/aws/service/...`` parameter into moto's SSM, which refuses
    PutParameter for those names (as AWS does)."""
    store = ssm_backends[DEFAULT_ACCOUNT_ID][region]._parameters
    store[name].append(
        Parameter(
            account_id=DEFAULT_ACCOUNT_ID, name=name, value=value, parameter_type="String",
            description=None, allowed_pattern=None, keyid=None,
            last_modified_date=0.0, version=1, data_type="aws:ec2:image",
        )
    )  # fmt: skip


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    use_fake_aws(monkeypatch, tmp_path, REGION)
    with mock_aws(config={"core": {"mock_credentials": False}}):
        for name, value in PUBLISHED.items():
            publish_parameter(name, value)
        yield


@pytest.fixture
def ec2(aws: None) -> Any:
    return boto3.client("ec2", region_name=REGION)


@pytest.fixture
def provider(aws: None) -> Ec2Provider:
    return Ec2Provider(REGION, poll_interval=0.01, max_poll_interval=0.05)


ARTIFACTS = {"coredns": {"sha256": "a" * 64}, "etcd": {"sha256": "b" * 64}}
"""Overrides: nothing to stage unless a test asks for it."""


def make_config(**overrides: Any) -> ClusterConfig:
    base = {"cluster": "demo", "region": REGION, "ps": 1, "workers": 2, "artifacts": ARTIFACTS}
    return load_cluster_config(None, {**base, **overrides})


# -- instance types -> architecture, accelerator, image parameter --------------------------


def test_machine_types_come_from_describe_instance_types(provider: Ec2Provider) -> None:
    names = ["m5.large", "m7g.large", "t4g.small", "g5.xlarge", "g5g.xlarge", "p4d.24xlarge",
             "trn1.2xlarge", "inf2.xlarge"]  # fmt: skip
    found = provider.machine_types(names)
    seen = {n: (m.arch, m.accelerator) for n, m in found.items()}
    assert seen == {
        "m5.large": ("x86_64", None),
        "m7g.large": ("arm64", None),
        "t4g.small": ("arm64", None),
        "g5.xlarge": ("x86_64", "nvidia"),
        "g5g.xlarge": ("arm64", "nvidia"),
        "p4d.24xlarge": ("x86_64", "nvidia"),
        "trn1.2xlarge": ("x86_64", "neuron"),
        "inf2.xlarge": ("x86_64", "neuron"),
    }
    with pytest.raises(ProviderError, match=r"instance types do not exist: \[zz9.large\]"):
        provider.machine_types(["m5.large", "zz9.large"])


def test_each_machine_gets_the_public_parameter_of_its_kind() -> None:
    parameter = ec2_images.default_image_parameter
    assert parameter(MachineType("m5.large", "x86_64")).endswith("/amd64/hvm/ebs-gp3/ami-id")
    assert "/current/arm64/" in parameter(MachineType("m7g.large", "arm64"))
    gpu = parameter(MachineType("g5.xlarge", "x86_64", "nvidia"))
    assert gpu.startswith("/aws/service/deeplearning/ami/x86_64/")
    assert "/deeplearning/ami/arm64/" in parameter(MachineType("g5g.xlarge", "arm64", "nvidia"))
    assert parameter(MachineType("trn1.2xlarge", "x86_64", "neuron")) == NEURON_PARAMETER
    # moto knows neither g4ad (AMD GPUs) nor dl1 (Gaudi): described here as EC2 does.
    amd = ec2_images.machine_of(
        {"InstanceType": "g4ad.xlarge", "ProcessorInfo": {"SupportedArchitectures": ["x86_64"]},
         "GpuInfo": {"Gpus": [{"Manufacturer": "AMD"}]}}
    )  # fmt: skip
    assert amd.accelerator == "other"
    with pytest.raises(ImageChoiceError, match="give its role an ami"):
        parameter(amd)


# -- the plan: per-role images and disks, shown by --dry-run ---------------------------------


def test_gpu_workers_and_cpu_ps_get_their_own_images(provider: Ec2Provider) -> None:
    config = make_config(instance_types={"worker": "g5.xlarge"})
    found = plan.plan_up(config, provider)
    images = {i.role: i for i in found.images}
    assert images["worker"].image.image_id == GPU_X86
    assert images["worker"].source == DLAMI_PARAMETER.format(arch="x86_64")
    assert images["worker"].disk_gb == ec2_images.ACCELERATED_DISK_GB
    for role in ("ps", "chief"):
        assert images[role].image.image_id == X86
        assert images[role].disk_gb == ec2_images.CPU_DISK_GB
    assert images["control"].disk_gb == ec2_images.CONTROL_DISK_GB
    lines = found.describe()
    assert f"image for worker: g5.xlarge (x86_64), image {GPU_X86} from " in "\n".join(lines)


def test_role_keys_override_the_global_ones(provider: Ec2Provider) -> None:
    config = make_config(
        ami=X86,
        roles={"worker": {"instance_type": "m7g.large", "ami": ARM, "disk_gb": 64}},
    )
    images = {i.role: i for i in plan.plan_up(config, provider).images}
    assert (images["worker"].machine.name, images["worker"].image.image_id) == ("m7g.large", ARM)
    assert images["worker"].source == "roles.worker.ami"
    assert images["worker"].disk_gb == 64
    assert (images["ps"].image.image_id, images["ps"].source) == (X86, "ami")


def test_launch_asks_for_each_roles_type_image_and_root_volume(provider: Ec2Provider) -> None:
    calls: list[dict[str, Any]] = []
    provider.ec2.meta.events.register(
        "provide-client-params.ec2.RunInstances", lambda params, **_: calls.append(params)
    )
    config = make_config(instance_types={"worker": "g5.xlarge"}, roles={"ps": {"disk_gb": 40}})
    provision.up(config, provider)
    by_role = {c["TagSpecifications"][0]["Tags"][1]["Value"]: c for c in calls}
    assert by_role["worker"]["InstanceType"] == "g5.xlarge"
    assert by_role["worker"]["ImageId"] == GPU_X86
    assert by_role["worker"]["BlockDeviceMappings"] == [
        {"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": ec2_images.ACCELERATED_DISK_GB,
                                            "VolumeType": "gp3", "DeleteOnTermination": True}}
    ]  # fmt: skip
    assert by_role["ps"]["BlockDeviceMappings"][0]["DeviceName"] == "/dev/sda1"
    assert by_role["ps"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == 40
    assert by_role["ps"]["ImageId"] == X86


def test_an_image_of_the_wrong_architecture_is_refused_before_launch(
    provider: Ec2Provider,
) -> None:
    config = make_config(ami=X86, instance_types={"ps": "m7g.large"})
    with pytest.raises(ProviderError, match=r"ps: image .* is x86_64, but m7g.large runs arm64"):
        plan.plan_up(config, provider)


def test_disk_smaller_than_the_image_is_refused(provider: Ec2Provider) -> None:
    config = make_config(ami=X86, roles={"worker": {"disk_gb": 8}})
    with pytest.raises(ProviderError, match=r"roles.worker.disk_gb: 8 GB is smaller"):
        plan.plan_up(config, provider)


def test_role_keys_are_checked_like_the_rest() -> None:
    from tfcluster.cloudinit.config import ConfigError

    with pytest.raises(ConfigError, match=r"roles.worker.disk_gb: must be an integer >= 8"):
        make_config(roles={"worker": {"disk_gb": 2}})
    with pytest.raises(ConfigError, match=r"roles.ps.instance_type: instance_types.ps sets"):
        make_config(instance_types={"ps": "m5.large"}, roles={"ps": {"instance_type": "c5.large"}})
    with pytest.raises(ConfigError, match=r"roles.wroker: unknown key"):
        make_config(roles={"wroker": {"disk_gb": 20}})


def test_dry_run_through_the_cli_shows_the_image_of_each_role(aws: None, tmp_path: Path) -> None:
    path = tmp_path / "tfcluster.yaml"
    path.write_text(
        "cluster: demo\nregion: us-east-1\nps: 1\nworkers: 2\n"
        "roles: {worker: {instance_type: g5.xlarge}}\n"
        f"artifacts: {{coredns: {{sha256: '{'a' * 64}'}}, etcd: {{sha256: '{'b' * 64}'}}}}\n"
    )
    result = CliRunner().invoke(cli.main, ["up", "--config", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    shown = [line for line in result.output.splitlines() if "image for" in line]
    assert len(shown) == 4, result.output  # control, chief, ps, worker
    assert any(f"worker: g5.xlarge (x86_64), image {GPU_X86}" in line for line in shown)


# -- arm64 roles: their own binaries ------------------------------------------------------


def test_graviton_roles_get_arm64_binaries(provider: Ec2Provider) -> None:
    """Staging for real: make setup's amd64 builds and the arm64 cross-builds."""
    arm_dir = REPO / ".tools" / "bin" / "linux-arm64"
    if not (arm_dir / "coredns").exists():
        pytest.skip(
            f"no arm64 builds in {arm_dir}: run TFCLUSTER_GOARCH=arm64 scripts/install-tools"
        )
    config = make_config(artifacts={}, instance_types={"ps": "m7g.large"})
    found = plan.plan_up(config, provider)
    names = sorted(o.name for o in found.staged)
    # etcd runs on the (amd64) control node only; the arm64 ps needs CoreDNS alone.
    # The wheel and its constraints serve every architecture (pure Python).
    assert names == [
        "constraints", "coredns-amd64", "coredns-arm64", "etcd-amd64", "etcdctl-amd64", "wheel"
    ]  # fmt: skip
    assert {o.name for o in found.staged_for("ps")} == {"constraints", "coredns-arm64", "wheel"}
    assert {o.name for o in found.staged_for("worker")} == {
        "constraints", "coredns-amd64", "etcd-amd64", "etcdctl-amd64", "wheel"
    }  # fmt: skip
    assert {o.name for o in found.staged_for("control")} == {
        "constraints", "coredns-amd64", "etcd-amd64", "etcdctl-amd64", "wheel"
    }  # fmt: skip
    arm = next(o for o in found.staged if o.name == "coredns-arm64")
    info = elf_info(arm.path)
    assert info is not None and (info.arch, info.static) == ("arm64", True)


def test_missing_arm64_binaries_are_one_line_naming_the_build(
    provider: Ec2Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No checkout and nothing on PATH: the line says how to get arm64 builds."""
    monkeypatch.setattr(plan.wheel, "find_checkout", lambda: None)
    monkeypatch.setenv("PATH", "/nonexistent")
    roles = {role: {"instance_type": "t4g.small"} for role in ("control", "chief", "ps", "worker")}
    config = make_config(artifacts={"etcd": {"sha256": "b" * 64}}, roles=roles)
    with pytest.raises(BinaryNotFound) as caught:
        plan.plan_up(config, provider)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("no static linux/arm64 ")
    assert "TFCLUSTER_GOARCH=arm64 scripts/install-tools" in message


# -- the subnet's route to S3 -------------------------------------------------------------


def _vpc(ec2: Any, public_ip: bool = False) -> tuple[str, str, str]:
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.20.1.0/24")["Subnet"]["SubnetId"]
    if public_ip:
        ec2.modify_subnet_attribute(SubnetId=subnet, MapPublicIpOnLaunch={"Value": True})
    table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    ec2.associate_route_table(RouteTableId=table, SubnetId=subnet)
    return vpc, subnet, table


def _igw(ec2: Any, vpc: str, table: str) -> None:
    igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
    ec2.create_route(RouteTableId=table, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)


def test_a_private_subnet_without_nat_or_endpoint_is_named(ec2: Any, provider: Ec2Provider) -> None:
    _, subnet, table = _vpc(ec2)
    problem = provider.s3_route_problem(subnet)
    assert problem is not None and f"subnet {subnet} cannot reach S3" in problem
    assert f"route table {table} has no default route" in problem


def test_a_public_subnet_reaches_s3_and_one_without_public_ips_does_not(
    ec2: Any, provider: Ec2Provider
) -> None:
    vpc, subnet, table = _vpc(ec2, public_ip=True)
    _igw(ec2, vpc, table)
    assert provider.s3_route_problem(subnet) is None
    ec2.modify_subnet_attribute(SubnetId=subnet, MapPublicIpOnLaunch={"Value": False})
    problem = provider.s3_route_problem(subnet)
    assert problem is not None and "no public IP" in problem


def test_a_nat_gateway_or_an_s3_endpoint_is_a_way_out(ec2: Any, provider: Ec2Provider) -> None:
    vpc, subnet, table = _vpc(ec2)
    endpoint = ec2.create_vpc_endpoint(
        VpcId=vpc, ServiceName=s3_service(REGION), VpcEndpointType="Gateway",
        RouteTableIds=[table],
    )  # fmt: skip
    assert provider.s3_route_problem(subnet) is None
    ec2.delete_vpc_endpoints(VpcEndpointIds=[endpoint["VpcEndpoint"]["VpcEndpointId"]])
    assert provider.s3_route_problem(subnet) is not None
    _, public, _ = _vpc(ec2, public_ip=True)
    allocation = ec2.allocate_address(Domain="vpc")["AllocationId"]
    nat = ec2.create_nat_gateway(SubnetId=public, AllocationId=allocation)
    ec2.create_route(
        RouteTableId=table, DestinationCidrBlock="0.0.0.0/0",
        NatGatewayId=nat["NatGateway"]["NatGatewayId"],
    )  # fmt: skip
    assert provider.s3_route_problem(subnet) is None


def test_up_says_so_in_one_line_before_launching(ec2: Any, provider: Ec2Provider) -> None:
    """Against a moto server (the local cloud's path): the warning comes with the plan,
    before any RunInstances."""
    _, subnet, _ = _vpc(ec2)
    events: list[str] = []
    found = provision.up(make_config(ami=X86, subnet_id=subnet), provider, dry_run=True,
                         on_event=events.append)  # fmt: skip
    warnings = [e for e in events if e.startswith("warning:")]
    assert len(warnings) == 1 and f"subnet {subnet} cannot reach S3" in warnings[0]
    assert found.plan.network_problem is not None


def test_route_check_through_a_moto_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same check over HTTP, against tests/controlled_moto's server on loopback:
    the calls it makes are read-only, and counted."""
    use_fake_aws(monkeypatch, tmp_path, REGION)
    server = ControlledMoto()
    server.start()
    try:
        client = boto3.client("ec2", region_name=REGION, endpoint_url=server.url)
        _, subnet, _ = _vpc(client)
        remote = Ec2Provider(REGION, endpoint_url=server.url)
        server.calls.clear()
        assert "cannot reach S3" in (remote.s3_route_problem(subnet) or "")
        assert set(server.calls) == {
            "DescribeSubnets", "DescribeRouteTables", "DescribeVpcEndpoints"
        }  # fmt: skip
    finally:
        server.stop()


def test_a_check_the_credentials_do_not_allow_is_a_warning(ec2: Any, provider: Ec2Provider) -> None:
    """Without ec2:DescribeVpcEndpoints (injected: moto does not check IAM) up goes on."""
    from test_provision import inject_error

    _, subnet, _ = _vpc(ec2)
    inject_error(provider.ec2, "DescribeVpcEndpoints", "UnauthorizedOperation")
    problem = provider.s3_route_problem(subnet)
    assert problem is not None and problem.startswith("cannot check the route to S3:")
    assert "\n" not in problem
