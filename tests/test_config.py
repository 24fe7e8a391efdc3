"""The cluster config: a good file loads; every bad value, unknown key or
missing checksum is a one-line ConfigError naming the key; overrides win."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tfcluster.cloudinit.config import (
    DEFAULT_ARTIFACT_URLS,
    ConfigError,
    load_cluster_config,
    parse_overrides,
)

SHA_A = "a" * 64
SHA_B = "b" * 64
GOOD: dict[str, Any] = {
    "cluster": "demo",
    "region": "eu-west-1",
    "zone": "tensorflow.local",
    "chief": 1,
    "ps": 2,
    "workers": 3,
    "instance_types": {"worker": "c5.xlarge"},
    "ami": "ami-0123456789abcdef0",
    "subnet_id": "subnet-0123456789abcdef0",
    "key_name": "ops",
    "ssh_cidr": "203.0.113.7/32",
    "spot_workers": True,
    "etcd": "control-node",
    "artifacts": {"coredns": {"sha256": SHA_A}, "etcd": {"sha256": SHA_B.upper()}},
    "agent_package": "tfcluster[tf]==0.1.0",
    "tf_port": 2300,
    "lease_ttl": 12,
    "record_ttl": 4,
    "program": "python3 /opt/train.py --steps 'ten thousand'",
}


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "tfcluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_good_file_loads_every_field(tmp_path):
    config = load_cluster_config(write(tmp_path, GOOD), {})
    assert config.cluster == "demo"
    assert config.region == "eu-west-1"
    assert config.counts == {"chief": 1, "ps": 2, "worker": 3}
    assert config.instance_type("worker") == "c5.xlarge"
    assert config.instance_type("ps") == "m5.large"  # default kept next to an override
    assert config.instance_type("control") == "t3.small"
    assert config.ami == "ami-0123456789abcdef0"
    assert config.subnet_id == "subnet-0123456789abcdef0" and config.vpc_id is None
    assert config.ssh_cidr == "203.0.113.7/32"
    assert config.spot_workers is True
    assert config.control_node and config.etcd_endpoints == ()
    assert config.artifacts["coredns"].url == DEFAULT_ARTIFACT_URLS["coredns"]
    assert config.artifacts["etcd"].sha256 == SHA_B  # normalised to lower case
    assert config.program == ("python3", "/opt/train.py", "--steps", "ten thousand")
    assert (config.tf_port, config.lease_ttl, config.record_ttl) == (2300, 12, 4)


def test_minimal_config_takes_defaults():
    config = load_cluster_config(
        None,
        {"cluster": "c1", "artifacts": {"coredns": {"sha256": SHA_A}, "etcd": {"sha256": SHA_B}}},
    )
    assert config.zone == "tensorflow.local"
    assert config.counts == {"chief": 1, "ps": 1, "worker": 2}
    assert config.ami is None and config.ssh_cidr is None and config.key_name is None
    assert config.region is None and config.program is None
    assert config.agent_package == "tfcluster[tf]"
    assert config.tf_port == 2222


def test_external_etcd_needs_no_etcd_artifact():
    config = load_cluster_config(
        None,
        {
            "cluster": "c1",
            "etcd": ["http://10.0.0.5:2379", "https://etcd.example:2379/"],
            "artifacts.coredns.sha256": SHA_A,
        },
    )
    assert not config.control_node
    assert config.etcd_endpoints == ("http://10.0.0.5:2379", "https://etcd.example:2379")
    assert set(config.artifacts) == {"coredns"}


def test_config_is_frozen(tmp_path):
    config = load_cluster_config(write(tmp_path, GOOD), {})
    with pytest.raises(AttributeError):
        config.workers = 5
    with pytest.raises(TypeError):
        config.instance_types["worker"] = "t3.nano"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cluster": None}, "cluster: required"),
        ({"cluster": "Demo_1"}, "cluster: must be a DNS label"),
        ({"region": "Europe"}, "region: must look like us-east-1"),
        ({"zone": "local"}, "zone: must be a DNS name of two labels"),
        ({"zone": "bad..zone"}, "zone: must be a DNS name"),
        ({"chief": 2}, "chief: must be an integer >= 0 and <= 1, got 2"),
        ({"ps": 0}, "ps: must be an integer >= 1 and <= 1000, got 0"),
        ({"workers": "x"}, "workers: must be an integer >= 1 and <= 1000, got 'x'"),
        ({"workers": True}, "workers: must be an integer >= 1 and <= 1000, got True"),
        ({"instance_types": {"worker": "huge"}}, "instance_types.worker: must be an EC2"),
        ({"instance_types": "m5.large"}, "instance_types: must be a mapping"),
        ({"ami": "ubuntu"}, "ami: must look like ami-"),
        ({"subnet_id": "net-1"}, "subnet_id: must look like subnet-"),
        ({"vpc_id": "vpc-0123456789abcdef0"}, "vpc_id: give subnet_id or vpc_id, not both"),
        ({"key_name": ""}, "key_name: must be the name of an EC2 key pair"),
        ({"ssh_cidr": "0.0.0.0"}, None),  # a single address is a valid /32
        ({"ssh_cidr": "10.0.0.1/8"}, "ssh_cidr: must be a CIDR such as 203.0.113.7/32"),
        ({"ssh_cidr": "anywhere"}, "ssh_cidr: must be a CIDR"),
        ({"spot_workers": "yes please"}, "spot_workers: must be true or false"),
        ({"etcd": "somewhere"}, "etcd: must be 'control-node' or a list"),
        ({"etcd": ["10.0.0.5:2379"]}, "etcd: an etcd endpoint must look like http://HOST:PORT"),
        ({"etcd": ["http://10.0.0.5"]}, "etcd: an etcd endpoint must look like http://HOST:PORT"),
        ({"etcd": ["http://10.0.0.5:2379/v3"]}, "etcd: an etcd endpoint has no path"),
        ({"artifacts": {"etcd": {"sha256": SHA_B}}}, "artifacts.coredns.sha256 is required"),
        (
            {"artifacts": {"coredns": {"url": "https://mirror/c.tgz"}, "etcd": {"sha256": SHA_B}}},
            "artifacts.coredns.sha256 is required when the url is set",
        ),
        ({"artifacts": {"coredns": {"sha256": SHA_A}}}, "artifacts.etcd.sha256 is required"),
        (
            {"artifacts": {"coredns": {"sha256": "12ab"}, "etcd": {"sha256": SHA_B}}},
            "artifacts.coredns.sha256: must be 64 hex digits",
        ),
        (
            {"artifacts": {"coredns": {"sha256": 1234}, "etcd": {"sha256": SHA_B}}},
            "artifacts.coredns.sha256: must be a quoted string",
        ),
        (
            {"artifacts": {"coredns": {"sha256": SHA_A, "url": "ftp://x/c.tgz"}}},
            "artifacts.coredns.url: must be an https, http or file URL",
        ),
        ({"agent_package": "  "}, "agent_package: must be a pip requirement"),
        ({"agent_package": "tfcluster\nrm -rf /"}, "agent_package: must be a pip requirement"),
        ({"tf_port": 70000}, "tf_port: must be an integer >= 1 and <= 65535"),
        ({"lease_ttl": 1}, "lease_ttl: must be an integer >= 2 and <= 3600"),
        ({"record_ttl": 0}, "record_ttl: must be an integer >= 1 and <= 3600"),
        ({"program": "python3 'unclosed"}, "program: cannot split"),
        ({"program": ""}, "program: must be a non-empty command"),
        ({"program": 7}, "program: must be a command string or a list"),
        ({"chief": 0}, "program: runs on the chief, but chief is 0"),
    ],
)
def test_bad_field_names_the_field(tmp_path, changes, message):
    data = {**GOOD, **changes}
    path = write(tmp_path, {k: v for k, v in data.items() if v is not None})
    if message is None:
        load_cluster_config(path, {})
        return
    with pytest.raises(ConfigError) as error:
        load_cluster_config(path, {})
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**GOOD, "wokers": 3}, "wokers: unknown key (did you mean 'workers'?)"),
        ({**GOOD, "instance_types": {"wroker": "m5.large"}}, "instance_types.wroker: unknown key"),
        ({**GOOD, "artifacts": {"coredns": {"sha": SHA_A}}}, "artifacts.coredns.sha: unknown key"),
        ({**GOOD, "artifacts": {"tensorflow": {}}}, "artifacts.tensorflow: unknown key"),
        ({**GOOD, "zzz": 1}, "zzz: unknown key (known: cluster, region"),
    ],
)
def test_unknown_keys_are_errors(tmp_path, data, message):
    with pytest.raises(ConfigError) as error:
        load_cluster_config(write(tmp_path, data), {})
    assert str(error.value).startswith(message)


def test_file_problems_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^config: cannot read .*missing\.yaml"):
        load_cluster_config(tmp_path / "missing.yaml", {})
    broken = tmp_path / "broken.yaml"
    broken.write_text("cluster: [demo\n")
    with pytest.raises(ConfigError, match=r"^config: .* is not valid YAML"):
        load_cluster_config(broken, {})
    listed = write(tmp_path, ["cluster", "demo"])
    with pytest.raises(ConfigError, match=r"^config: .* must hold a mapping"):
        load_cluster_config(listed, {})


def test_overrides_win_over_the_file(tmp_path):
    overrides = {
        "workers": 7,
        "instance_types.worker": "c5.2xlarge",
        "artifacts.coredns.url": "file:///srv/coredns",
        "artifacts.coredns.sha256": SHA_B,
        "region": None,  # not given on the command line: the file's value stays
    }
    config = load_cluster_config(write(tmp_path, GOOD), overrides)
    assert config.workers == 7
    assert config.instance_type("worker") == "c5.2xlarge"
    assert config.artifacts["coredns"].url == "file:///srv/coredns"
    assert config.artifacts["coredns"].sha256 == SHA_B
    assert config.region == "eu-west-1"


def test_overrides_are_validated_like_the_file(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match=r"^workers: must be an integer >= 1 and <= 1000, got 'x'$"):
        load_cluster_config(path, {"workers": "x"})
    with pytest.raises(ConfigError, match=r"^instance_types\.gpu: unknown key"):
        load_cluster_config(path, {"instance_types.gpu": "p3.2xlarge"})
    with pytest.raises(ConfigError, match=r"^workers: has no sub-keys"):
        load_cluster_config(path, {"workers.count": 2})
    with pytest.raises(ConfigError, match=r"^artifacts\.etcd: must be a mapping"):
        load_cluster_config(path, {"artifacts.etcd": "https://mirror/etcd.tgz"})


def test_overridden_url_does_not_inherit_the_files_checksum(tmp_path):
    with pytest.raises(ConfigError, match=r"^artifacts\.coredns\.sha256 is required when the url"):
        load_cluster_config(
            write(tmp_path, GOOD), {"artifacts.coredns.url": "https://mirror/c.tgz"}
        )


def test_parse_overrides_reads_yaml_values():
    assert parse_overrides(["workers=4", "spot_workers=true", "etcd=[http://h:2379]"]) == {
        "workers": 4,
        "spot_workers": True,
        "etcd": ["http://h:2379"],
    }
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_overrides(["workers"])
