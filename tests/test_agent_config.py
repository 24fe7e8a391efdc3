"""The agent config contract: what the operator's renderer writes into the
user-data is what the agent parses, and the schema's errors name the key."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from conftest import stand_in_staged
from tfcluster.cloudinit.config import ClusterConfig, load_cluster_config
from tfcluster.cloudinit.config import ConfigError as ClusterConfigError
from tfcluster.cloudinit.render.userdata import agent_config, layout_of, render_parts
from tfcluster.discovery.agent_config import (
    AgentConfig,
    ConfigError,
    dump_agent_config,
    load_agent_config,
    parse_agent_config,
    role_counts,
)

CONTROL = ["http://10.0.1.23:2379"]
SHA_A, SHA_B = "a" * 64, "b" * 64
CLUSTER_YAML = f"""\
cluster: roundtrip
zone: ml.example.local
ps: 2
workers: 3
tf_port: 2300
lease_ttl: 12
record_ttl: 3
artifacts:
  coredns: {{sha256: "{SHA_A}"}}
  etcd: {{sha256: "{SHA_B}"}}
"""
VARIANTS = {
    "control-node": "",
    "external-etcd": "etcd: [http://10.9.0.1:2379, http://10.9.0.2:2379]\n",
    "program": "program: python3 train.py --steps 10\n",
    # The local cloud's loopback mode: every task on one host.
    "loopback": (
        "layout:\n  dns_bind: 127.77.0.5\n  dns_port: 15353\n"
        "  imds_endpoint: http://127.77.0.5:1338\n  tf_config_path: /tmp/x/tf_config.json\n"
        "  distinct_ports: true\n  check_system_resolver: false\n  tf_config_addresses: ips\n"
    ),
}
TASKS = [("chief", None), ("ps", 1), ("worker", None), ("worker", 2)]


def cluster_config(tmp_path: Path, variant: str) -> ClusterConfig:
    path = tmp_path / "tfcluster.yaml"
    path.write_text(CLUSTER_YAML + VARIANTS[variant])
    return load_cluster_config(path, {})


def rendered_agent_json(config: ClusterConfig, role: str, index: int | None) -> dict[str, Any]:
    """The agent.json here-document of the user-data script, as the instance gets it."""
    endpoints = None if config.etcd_endpoints else CONTROL
    script = render_parts(config, role, index, endpoints, staged=stand_in_staged())[1].content
    found = re.search(
        r"^write_file \S+/agent\.json \d+ <<'TFCLUSTER_EOF'\n(.*?)^TFCLUSTER_EOF$",
        script,
        re.S | re.M,
    )
    assert found, "the user-data script writes no agent.json"
    return dict(json.loads(found.group(1)))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize(("role", "index"), TASKS)
def test_the_agent_parses_what_the_renderer_writes(tmp_path, variant, role, index):
    config = cluster_config(tmp_path, variant)
    layout = layout_of(config)
    written = rendered_agent_json(config, role, index)
    parsed = parse_agent_config(written)

    endpoints = config.etcd_endpoints or tuple(CONTROL)
    assert parsed == AgentConfig(
        cluster="roundtrip",
        zone="ml.example.local",
        roles=(("chief", 1), ("ps", 2), ("worker", 3)),
        role=role,
        index=index,
        tf_port=2300,
        etcd_endpoints=endpoints,
        dns_server=(layout.dns_bind, layout.dns_port),
        imds_endpoint=layout.imds_endpoint,
        lease_ttl=12,
        record_ttl=3,
        tf_config_path=Path(layout.tf_config_path),
        distinct_ports=layout.distinct_ports,
        check_system_resolver=layout.check_system_resolver,
        tf_config_addresses=layout.tf_config_addresses,
        program=config.program if role == "chief" else None,
        output_interval=config.output_interval,  # the operator's 15m, passed through
        on_chief_exit=config.on_chief_exit,
    )
    assert parsed.output_interval == 900
    assert dump_agent_config(parsed) == written
    assert written == agent_config(config, role, index, endpoints, layout)
    if variant == "program":
        assert (parsed.program is not None) == (role == "chief")


def test_the_loopback_layout_reaches_the_agent(tmp_path):
    """The variant above is not vacuous: every loopback setting differs from EC2's."""
    parsed = parse_agent_config(rendered_agent_json(cluster_config(tmp_path, "loopback"), "ps", 1))
    assert parsed.dns_server == ("127.77.0.5", 15353)
    assert parsed.imds_endpoint == "http://127.77.0.5:1338"
    assert parsed.tf_config_path == Path("/tmp/x/tf_config.json")
    assert parsed.distinct_ports and not parsed.check_system_resolver
    assert parsed.tf_config_addresses == "ips"
    assert parsed.port_of(parsed.members()[-1]) == 2300 + 5


def test_an_https_etcd_endpoint_is_refused_before_it_reaches_an_agent(tmp_path):
    """The agent's etcd client speaks plain HTTP, so the config refuses what it would."""
    path = tmp_path / "tfcluster.yaml"
    path.write_text(CLUSTER_YAML + "etcd: [https://etcd.internal:2379]\n")
    with pytest.raises(ClusterConfigError, match=r"^etcd: .*must be http:// \(no TLS yet\)"):
        load_cluster_config(path, {})


# --- the schema alone ------------------------------------------------------------------


def minimal(**fields: Any) -> AgentConfig:
    settings: dict[str, Any] = {
        "cluster": "demo",
        "zone": "tensorflow.local",
        "roles": role_counts({"ps": 1, "worker": 2}),
        "role": "worker",
        "etcd_endpoints": ("http://10.0.0.5:2379",),
    }
    return AgentConfig(**{**settings, **fields})


def test_defaults_stay_out_of_the_file_and_come_back_when_read():
    written = dump_agent_config(minimal())
    assert written == {
        "cluster": "demo",
        "zone": "tensorflow.local",
        "roles": {"chief": 0, "ps": 1, "worker": 2},
        "role": "worker",
        "tf_port": 2222,
        "etcd_endpoints": ["http://10.0.0.5:2379"],
        "dns_server": "127.0.0.1:5353",
        "imds_endpoint": "http://169.254.169.254",
        "lease_ttl": 10,
        "record_ttl": 5,
        "tf_config_path": "/run/tfcluster/tf_config.json",
        "output_dir": "/var/lib/tfcluster/output",
    }
    assert parse_agent_config(written) == minimal()
    unusual = minimal(index=1, distinct_ports=True, barrier_timeout=90.0, program=("a", "b"))
    assert parse_agent_config(json.loads(json.dumps(dump_agent_config(unusual)))) == unusual


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "blue"}, "unknown agent config key(s): colour"),
        ({"zone": None}, "zone: must be a DNS name, got None"),
        ({"roles": {"ps": 1, "boss": 1}}, "roles: unknown role(s) boss"),
        ({"roles": {"ps": 1, "worker": -1}}, "roles.worker: must be an integer from 0 to 10000"),
        ({"role": "chief"}, "role: the cluster has no chief tasks (roles.chief is 0)"),
        ({"index": 2}, "index: must be an integer from 0 to 1, got 2"),
        ({"index": True}, "index: must be an integer from 0 to 1, got True"),
        ({"etcd_endpoints": []}, "etcd_endpoints: must be a non-empty list of http://HOST:PORT"),
        ({"dns_server": "localhost:53"}, "dns_server: must be IP:PORT, got 'localhost:53'"),
        ({"tf_config_path": 5}, "tf_config_path: must be a non-empty string, got 5"),
        ({"tf_config_addresses": "dns"}, "tf_config_addresses: must be 'names' or 'ips'"),
        ({"program": "train.py"}, "program: must be a non-empty list of strings"),
        ({"tf_port": 65535, "distinct_ports": True}, "tf_port: 65535 + one port per task"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(change, message):
    with pytest.raises(ConfigError) as error:
        parse_agent_config({**dump_agent_config(minimal()), **change})
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_a_missing_key_is_named():
    written = dump_agent_config(minimal())
    del written["etcd_endpoints"]
    with pytest.raises(ConfigError, match=r"^etcd_endpoints: required$"):
        parse_agent_config(written)


def test_the_file_must_be_a_json_object(tmp_path):
    path = tmp_path / "agent.json"
    path.write_text("[1]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_agent_config(path)
    path.write_text("{")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_agent_config(path)


def test_preload_tensorflow_reaches_the_agent_and_is_left_out_while_default(tmp_path):
    """The config key turns the overlap off on every ps and worker; its default
    (true) is not written, so the rendered agent.json of every other cluster is
    unchanged."""
    path = tmp_path / "tfcluster.yaml"
    path.write_text(CLUSTER_YAML)
    plain = parse_agent_config(rendered_agent_json(load_cluster_config(path, {}), "ps", 0))
    assert plain.preload_tensorflow is True
    assert "preload_tensorflow" not in dump_agent_config(plain)
    off = load_cluster_config(path, {"preload_tensorflow": False})
    assert parse_agent_config(rendered_agent_json(off, "worker", 1)).preload_tensorflow is False
    with pytest.raises(ClusterConfigError, match=r"^preload_tensorflow: "):
        load_cluster_config(path, {"preload_tensorflow": "sometimes"})
