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
    config_warnings,
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
    assert config.program_dir is None
    assert config.tf_port == 2222


def test_config_without_artifacts_stages_every_binary():
    """The section is optional: a binary without an override is staged by `up`."""
    config = load_cluster_config(
        None, {"cluster": "c1", "ps": 1, "workers": 2, "ami": "ami-0123456789abcdef0"}
    )
    assert dict(config.artifacts) == {}
    assert config.url_expiry == 6 * 3600 and config.download_binaries is False


def test_program_dir_is_made_absolute_and_needs_a_chief(tmp_path, monkeypatch):
    (tmp_path / "prog").mkdir()
    monkeypatch.chdir(tmp_path)
    config = load_cluster_config(None, {"cluster": "c1", "program_dir": "prog"})
    assert config.program_dir == str(tmp_path / "prog")
    with pytest.raises(ConfigError, match=r"^program_dir: is unpacked on the chief, but chief"):
        load_cluster_config(None, {"cluster": "c1", "program_dir": "prog", "chief": 0})


def test_one_override_leaves_the_other_binary_staged():
    config = load_cluster_config(None, {"cluster": "c1", "artifacts.etcd.sha256": SHA_B})
    assert set(config.artifacts) == {"etcd"}
    assert config.artifacts["etcd"].url == DEFAULT_ARTIFACT_URLS["etcd"]


@pytest.mark.parametrize(
    ("value", "seconds", "message"),
    [
        ("90m", 5400, None),
        ("7d", 7 * 86400, None),
        ("8d", None, "url_expiry: must be at most 7d"),
        ("5m", None, "url_expiry: must be between 10m and 30d"),
        ("soon", None, "url_expiry: must be a duration"),
    ],
)
def test_url_expiry_is_bounded_by_sigv4(value, seconds, message):
    if message is None:
        config = load_cluster_config(None, {"cluster": "c1", "url_expiry": value})
        assert config.url_expiry == seconds
        return
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_cluster_config(None, {"cluster": "c1", "url_expiry": value})


def test_external_etcd_needs_no_etcd_artifact():
    config = load_cluster_config(
        None,
        {
            "cluster": "c1",
            "etcd": ["http://10.0.0.5:2379", "http://etcd.example:2379/"],
            "artifacts.coredns.sha256": SHA_A,
        },
    )
    assert not config.control_node
    assert config.etcd_endpoints == ("http://10.0.0.5:2379", "http://etcd.example:2379")
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
        (
            {"artifacts": {"coredns": {"url": "https://mirror/c.tgz"}, "etcd": {"sha256": SHA_B}}},
            "artifacts.coredns.sha256 is required when the url is set",
        ),
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
            "artifacts.coredns.url: must be an https or http URL",
        ),
        (
            {"artifacts": {"coredns": {"sha256": SHA_A, "url": "file:///srv/coredns"}}},
            "artifacts.coredns.url: must be an https or http URL",
        ),
        ({"agent_package": "tfcluster[tf]"}, "agent_package: unknown key"),
        ({"program_dir": "/nonexistent/prog"}, "program_dir: /nonexistent/prog does not exist"),
        ({"program_dir": "/etc/hostname"}, "program_dir: /etc/hostname is not a folder"),
        ({"program_dir": ""}, "program_dir: must be the path of a folder"),
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
        "artifacts.coredns.url": "https://mirror.example/coredns",
        "artifacts.coredns.sha256": SHA_B,
        "region": None,  # not given on the command line: the file's value stays
    }
    config = load_cluster_config(write(tmp_path, GOOD), overrides)
    assert config.workers == 7
    assert config.instance_type("worker") == "c5.2xlarge"
    assert config.artifacts["coredns"].url == "https://mirror.example/coredns"
    assert config.artifacts["coredns"].sha256 == SHA_B
    assert config.region == "eu-west-1"


def test_overrides_are_validated_like_the_file(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(
        ConfigError, match=r"^workers: must be an integer >= 1 and <= 1000, got 'x'$"
    ):
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


# --- values checked for where they land (templates, unit files, the Corefile) -------------


def load(**overrides: Any) -> Any:
    base = {"cluster": "c1", "artifacts.coredns.sha256": SHA_A, "artifacts.etcd.sha256": SHA_B}
    return load_cluster_config(None, {**base, **overrides})


def one_line_error(**overrides: Any) -> str:
    with pytest.raises(ConfigError) as error:
        load(**overrides)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ps", 1001),
        ("workers", 10**22),  # once grew a dry run to 24 GB
        ("ps", "1e8"),  # YAML 1.1 reads 1e8 as a string
        ("ps", 1.0e8),
        ("workers", 2.0),
    ],
)
def test_counts_are_bounded_integers(key, value):
    assert one_line_error(**{key: value}).startswith(f"{key}: must be an integer >= 1 and <= 1000")


def test_count_from_the_command_line_is_one_line():
    message = one_line_error(**parse_overrides(["ps=1e8"]))
    assert message == "ps: must be an integer >= 1 and <= 1000, got '1e8'"


@pytest.mark.parametrize(
    "url",
    [
        "http://etcd host:2379",
        "http://{etcd}:2379",
        "http://etcd}:2379",
        "http://[::1:2379",
        "http://10.0.0.5:2379\n",
        "http://10.0.0.5:23\n79",  # urlsplit alone drops the newline
        "http://10.0.0.5:99999",
        "http://10.0.0.5:+2379",
        "http://user@10.0.0.5:2379",
        "http://",
        "notaurl",
    ],
)
def test_etcd_endpoints_are_parsed(url):
    assert one_line_error(etcd=[url]).startswith("etcd: an etcd endpoint ")


def test_etcd_endpoints_are_normalised():
    config = load(etcd=["http://[::1]:2379/", "http://Etcd.Example.internal:2379"])
    assert config.etcd_endpoints == ("http://[::1]:2379", "http://etcd.example.internal:2379")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("install_dir", "/opt/x\nExecStartPre=/bin/evil", "must be an absolute path"),
        ("config_dir", "etc/tfcluster", "must be an absolute path"),
        ("unit_dir", "/etc/systemd/my units", "must be an absolute path"),
        ("state_dir", "/var/lib/%h", "must be an absolute path"),
        ("image_site_packages", "/opt/$HOME", "must be an absolute path"),
        ("systemctl", "sudo systemctl", "must be a program name or an absolute path"),
        ("shutdown_command", "shutdown;reboot", "must be a program name or an absolute path"),
        ("service_user", "tf cluster", "must be a Linux user name"),
        ("dns_bind", "127.0.0.1 }\nevil {", "must be an IPv4 address"),
        ("dns_bind", "localhost", "must be an IPv4 address"),
        ("etcd_listen_host", "::", "must be an IPv4 address"),
        ("ready_addr", "127.0.0.1:8181 extra", "must be HOST:PORT"),
        ("health_addr", "localhost:8080", "must be HOST:PORT"),
        ("health_addr", "127.0.0.1", "must be HOST:PORT"),
        ("health_addr", "127.0.0.1:8080?", "must be HOST:PORT"),
        ("ready_addr", "127.0.0.1:+8181", "must be HOST:PORT"),
        ("imds_endpoint", "http://169.254.169.254/latest", "the metadata service has no path"),
        ("imds_endpoint", "http://{imds}", "the metadata service must look like"),
        ("dns_port", 0, "must be an integer >= 1 and <= 65535"),
        ("etcd_peer_port", 65536, "must be an integer >= 1 and <= 65535"),
        ("dns_port", "53", "must be an integer"),
        ("distinct_ports", "yes", "must be true or false"),
        ("tf_config_addresses", "hosts", "must be one of names, ips"),
    ],
)
def test_layout_values_are_checked_for_where_they_land(field, value, message):
    assert one_line_error(**{f"layout.{field}": value}).startswith(f"layout.{field}: {message}")


def test_layout_keys_are_checked_like_the_others():
    assert one_line_error(**{"layout.dns_prot": 53}).startswith(
        "layout.dns_prot: unknown key (did you mean 'dns_port'?)"
    )
    assert one_line_error(layout="x").startswith("layout: must be a mapping")


def test_every_layout_default_and_the_local_clouds_layouts_pass():
    import dataclasses

    from tfcluster.cloudinit.localcloud import instance
    from tfcluster.cloudinit.render.layout import DEFAULT_LAYOUT

    defaults = dataclasses.asdict(DEFAULT_LAYOUT)
    assert dict(load(layout=defaults).layout) == defaults
    root = Path("/tmp/tfcluster-test/machine")
    systemctl = root / "bin/systemctl"
    for layout in (
        instance.machine_layout(root, systemctl),
        instance.loopback_layout(root, systemctl, "127.77.0.5", "http://127.77.0.5:4001", 4002),
    ):
        assert dict(load(layout=layout).layout) == layout


@pytest.mark.parametrize(
    ("zone", "message"),
    [
        ("10.in-addr.arpa", "zone: must not be localhost or a reverse zone"),
        ("8.b.d.0.1.0.0.2.ip6.arpa", "zone: must not be localhost or a reverse zone"),
        ("tf.localhost", "zone: must not be localhost or a reverse zone"),
        ("localhost", "zone: must be a DNS name of two labels"),
        ("*.local", "zone: must be a DNS name"),
        ("tf.local }", "zone: must be a DNS name"),
        ("tensorflow.example.com", "zone: 'tensorflow.example.com' is not under a private-use"),
        ("tensorflow.io", "zone: 'tensorflow.io' is not under a private-use"),
    ],
)
def test_zone_is_private_and_forward(zone, message):
    assert one_line_error(zone=zone).startswith(message)


@pytest.mark.parametrize("zone", ["tf.internal", "tf.home.arpa", "a.b.test", "TF.Local."])
def test_private_use_zones_are_accepted(zone):
    assert load(zone=zone).zone == zone.lower().rstrip(".")


def test_a_public_zone_needs_allow_public_zone():
    assert load(zone="tf.example.com", allow_public_zone=True).zone == "tf.example.com"
    assert one_line_error(zone="10.in-addr.arpa", allow_public_zone=True).startswith(
        "zone: must not be localhost or a reverse zone"
    )


def test_unreadable_values_are_one_line():
    with pytest.raises(ConfigError) as error:
        parse_overrides(["zone=*.local"])  # a YAML alias to nothing
    assert str(error.value).startswith("zone: cannot read '*.local' as YAML")
    assert "\n" not in str(error.value)


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "tfcluster.yaml"
    path.write_bytes(b"cluster: demo\nzone: caf\xe9.local\n")
    with pytest.raises(ConfigError, match=r"^config: .* is not UTF-8 text \(byte 23\)$"):
        load_cluster_config(path, {})


def test_null_means_the_default(tmp_path):
    config = load_cluster_config(write(tmp_path, {**GOOD, "zone": None, "layout": None}), {})
    assert config.zone == "tensorflow.local" and dict(config.layout) == {}


def test_non_string_keys_are_unknown_keys(tmp_path):
    path = tmp_path / "tfcluster.yaml"
    path.write_text("cluster: demo\n1: 2\n")
    with pytest.raises(ConfigError, match=r"^1: unknown key \(known: cluster, "):
        load_cluster_config(path, {})


# --- cost guards ---------------------------------------------------------------------------


def test_max_instances_defaults_to_16_and_is_bounded():
    assert load().max_instances == 16
    assert load(max_instances=40).max_instances == 40
    assert one_line_error(max_instances=0).startswith("max_instances: must be an integer >= 1")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10m", 600),
        ("90m", 5400),
        ("12h", 43200),
        ("2d", 172800),
        ("1d12h", 129600),
        ("30d", 2592000),
        ("3600s", 3600),
        ("1h0m30s", 3630),
    ],
)
def test_max_lifetime_is_a_duration_in_seconds(text, seconds):
    assert load(max_lifetime=text).max_lifetime == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("9m", "must be between 10m and 30d"),
        ("31d", "must be between 10m and 30d"),
        ("12", "must be a duration such as 90m, 12h or 2d"),
        (43200, "must be a duration such as 90m, 12h or 2d"),
        ("12 h", "must be a duration"),
        ("1h\n", "must be a duration"),
        ("h", "must be a duration"),
    ],
)
def test_bad_max_lifetime_is_one_line(value, message):
    assert one_line_error(max_lifetime=value).startswith(f"max_lifetime: {message}")


def test_no_max_lifetime_by_default():
    assert load().max_lifetime is None


# --- warnings ------------------------------------------------------------------------------


def test_a_sensible_config_has_no_warnings(tmp_path):
    assert config_warnings(load_cluster_config(write(tmp_path, GOOD), {})) == []


@pytest.mark.parametrize(
    ("overrides", "warning"),
    [
        ({"ssh_cidr": "0.0.0.0/0"}, "ssh_cidr: 0.0.0.0/0 lets every address"),
        ({"ssh_cidr": "::/0"}, "ssh_cidr: ::/0 lets every address"),
        ({"record_ttl": 30, "lease_ttl": 10}, "record_ttl: 30 s is longer than lease_ttl (10 s)"),
        ({"tf_port": 22}, "tf_port: 22 is already used by ssh"),
        ({"tf_port": 53}, "tf_port: 53 is already used by DNS"),
        ({"tf_port": 80}, "tf_port: 80 is already used by the metadata service"),
        ({"tf_port": 5353}, "tf_port: 5353 is already used by CoreDNS (layout.dns_port)"),
        ({"tf_port": 8080}, "tf_port: 8080 is already used by CoreDNS health"),
        ({"tf_port": 8181}, "tf_port: 8181 is already used by CoreDNS ready"),
        ({"tf_port": 2379}, "tf_port: 2379 is already used by etcd clients"),
        ({"tf_port": 2380}, "tf_port: 2380 is already used by etcd peers"),
        ({"tf_port": 2222, "layout.dns_port": 2222}, "tf_port: 2222 is already used by CoreDNS"),
    ],
)
def test_warnings_name_the_key(overrides, warning):
    warnings = config_warnings(load(**overrides))
    assert len(warnings) == 1 and warnings[0].startswith(warning), warnings


def test_warnings_are_not_errors():
    config = load(ssh_cidr="0.0.0.0/0", tf_port=53, record_ttl=60)
    assert len(config_warnings(config)) == 3


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("cluster", "demo\n"),
        ("region", "us-east-1\n"),
        ("ami", "ami-0123456789abcdef0\n"),
        ("instance_types.worker", "m5.large\n"),
        ("artifacts.coredns.sha256", SHA_A + "\n"),
        ("layout.install_dir", "/opt/tfcluster\n"),
        ("layout.python", "python3\n"),
    ],
)
def test_a_trailing_newline_is_refused(key, value):
    # A regex's "$" matches before a final newline: the checks match the whole value.
    assert one_line_error(**{key: value}).startswith(f"{key}: must")
