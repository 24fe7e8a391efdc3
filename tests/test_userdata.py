"""User-data: the exact bytes decode to the parts `tfcluster render` shows, the
outside checkers accept them (cloud-init schema, shellcheck, systemd-analyze),
and the script itself runs: against downloads from a web server on 127.0.0.1,
the IMDS emulator and a recording stand-in for systemctl, all inside a
temporary folder."""

from __future__ import annotations

import dataclasses
import email
import functools
import gzip
import hashlib
import http.server
import json
import os
import pwd
import random
import re
import shutil
import stat
import subprocess
import tarfile
import threading
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from conftest import require_tool, stand_in_staged
from tfcluster.cloudinit import plan
from tfcluster.cloudinit.cli import main
from tfcluster.cloudinit.config import Artifact, ClusterConfig, load_cluster_config
from tfcluster.cloudinit.localcloud.imds_emulator import IMDSEmulator, InstanceMetadata
from tfcluster.cloudinit.render import userdata
from tfcluster.cloudinit.render.corefile import CorefileSettings, render_corefile
from tfcluster.cloudinit.render.layout import Layout, control_endpoint
from tfcluster.cloudinit.render.userdata import USER_DATA_LIMIT, RenderError, UserDataTooLarge
from tfcluster.cloudinit.stage import bundle

SHA_A = "a" * 64
SHA_B = "b" * 64
ETCD = ["http://10.0.0.5:2379"]
TASKS = [("chief", None), ("ps", 1), ("worker", None), ("worker", 2)]
SCRIPT_TIMEOUT = 60  # seconds for one run of the user-data script in the sandbox
TOOL_TIMEOUT = 60


def render_parts(*args: Any, **kwargs: Any) -> tuple[userdata.Part, ...]:
    """The renderer, given what `up` stages for a task (stand-in URLs) unless told otherwise."""
    kwargs.setdefault("staged", stand_in_staged())
    return userdata.render_parts(*args, **kwargs)


def render_user_data(*args: Any, **kwargs: Any) -> bytes:
    kwargs.setdefault("staged", stand_in_staged())
    return userdata.render_user_data(*args, **kwargs)


def make_config(**overrides: Any) -> ClusterConfig:
    base = {
        "cluster": "demo",
        "ps": 2,
        "workers": 3,
        "artifacts.coredns.sha256": SHA_A,
        "artifacts.etcd.sha256": SHA_B,
    }
    return load_cluster_config(None, {**base, **overrides})


def decode(data: bytes) -> Message:
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return email.message_from_bytes(data)


def leaves(message: Message) -> list[tuple[str, str, str]]:
    assert message.get_content_type() == "multipart/mixed"
    found = []
    for part in message.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        found.append((part.get_content_type(), part.get_filename() or "", payload.decode()))
    return found


def embedded_files(script: str) -> dict[str, str]:
    """The here-documents the script writes: path -> content."""
    pattern = re.compile(
        r"^write_file (\S+) \d+ <<'TFCLUSTER_EOF'\n(.*?)^TFCLUSTER_EOF$", re.S | re.M
    )
    return {path: content for path, content in pattern.findall(script)}


def script_of(config: ClusterConfig, role: str, **kwargs: Any) -> str:
    return render_parts(config, role, **kwargs)[1].content


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, **kwargs)


# --- the bytes ------------------------------------------------------------------------


@pytest.mark.parametrize(("role", "index"), [("control", None), *TASKS])
def test_user_data_decodes_to_the_rendered_parts(role, index):
    config = make_config()
    endpoints = None if role == "control" else ETCD
    data = render_user_data(config, role, index, endpoints)
    parts = render_parts(config, role, index, endpoints)
    assert len(data) <= USER_DATA_LIMIT
    assert leaves(decode(data)) == [(p.content_type, p.filename, p.content) for p in parts]
    assert [p.content_type for p in parts] == ["text/cloud-config", "text/x-shellscript"]
    assert parts[0].content.startswith("#cloud-config\n")
    assert parts[1].content.startswith("#!/bin/bash\n")
    assert render_user_data(config, role, index, endpoints) == data  # stable bytes


@pytest.mark.parametrize(("role", "index"), TASKS)
def test_agent_config_has_role_index_and_endpoints(role, index):
    config = make_config(program="python3 train.py --epochs 3")
    files = embedded_files(script_of(config, role, index=index, etcd_endpoints=ETCD))
    agent = json.loads(files["/etc/tfcluster/agent.json"])
    assert agent["cluster"] == "demo" and agent["zone"] == "tensorflow.local"
    assert agent["roles"] == {"chief": 1, "ps": 2, "worker": 3}
    assert agent["role"] == role
    assert agent.get("index") == index and (("index" in agent) == (index is not None))
    assert agent["etcd_endpoints"] == ETCD
    assert agent["dns_server"] == "127.0.0.1:5353"
    assert (agent["tf_port"], agent["lease_ttl"], agent["record_ttl"]) == (2222, 10, 5)
    if role == "chief":
        assert agent["program"] == ["python3", "train.py", "--epochs", "3"]
    else:
        assert "program" not in agent


def test_each_role_gets_its_files_and_services():
    config = make_config()
    control = script_of(config, "control")
    worker = script_of(config, "worker", etcd_endpoints=ETCD)
    assert set(embedded_files(control)) == {
        "/etc/tfcluster/Corefile",
        "/etc/systemd/resolved.conf.d/tfcluster.conf",
        "/etc/systemd/system/tfcluster-coredns.service",
        "/etc/tfcluster/etcd.env",
        "/etc/systemd/system/tfcluster-etcd.service",
    }
    assert set(embedded_files(worker)) == {
        "/etc/tfcluster/Corefile",
        "/etc/systemd/resolved.conf.d/tfcluster.conf",
        "/etc/systemd/system/tfcluster-coredns.service",
        "/etc/tfcluster/agent.json",
        "/etc/systemd/system/tfcluster-agent.service",
    }
    assert "enable --now tfcluster-etcd.service tfcluster-coredns.service\n" in control
    assert "enable --now tfcluster-coredns.service tfcluster-agent.service\n" in worker
    assert 'pip" install' in worker and 'pip" install' not in control
    assert "etcd_sha256=" in control and "etcd_sha256=" not in worker


def test_corefile_and_resolver_point_at_each_other():
    config = make_config(zone="ml.example.local")
    files = embedded_files(script_of(config, "ps", etcd_endpoints=ETCD))
    expected = CorefileSettings(
        cluster="demo", zone="ml.example.local", etcd_endpoints=tuple(ETCD), dns_port=5353,
        upstreams=("169.254.169.253",),
    )  # fmt: skip
    assert files["/etc/tfcluster/Corefile"] == render_corefile(expected)
    # resolved asks its global server for every other name too: CoreDNS forwards those.
    assert "\n.:5353 {\n" in files["/etc/tfcluster/Corefile"]
    assert "forward . 169.254.169.253\n" in files["/etc/tfcluster/Corefile"]
    resolved = files["/etc/systemd/resolved.conf.d/tfcluster.conf"]
    assert "\nDNS=127.0.0.1:5353\n" in resolved
    assert "\nDomains=~ml.example.local\n" in resolved
    control = embedded_files(script_of(config, "control"))
    assert "endpoint http://127.0.0.1:2379\n" in control["/etc/tfcluster/Corefile"]


def test_agent_unit_runs_the_agent_and_stops_it_with_sigterm():
    unit = embedded_files(script_of(make_config(), "worker", etcd_endpoints=ETCD))[
        "/etc/systemd/system/tfcluster-agent.service"
    ]
    assert (
        "ExecStart=/opt/tfcluster/venv/bin/tfcluster agent --config /etc/tfcluster/agent.json\n"
        in unit
    )
    for line in ("KillSignal=SIGTERM", "Restart=on-failure", "After=network-online.target"):
        assert f"\n{line}" in unit


def test_large_user_data_is_gzip_compressed():
    program = "python3 train.py " + " ".join(f"--flag{i % 10} value" for i in range(2000))
    config = make_config(program=program)
    data = render_user_data(config, "chief", etcd_endpoints=ETCD)
    assert data[:2] == b"\x1f\x8b"
    assert len(gzip.decompress(data)) > USER_DATA_LIMIT >= len(data)
    parts = render_parts(config, "chief", etcd_endpoints=ETCD)
    assert leaves(decode(data)) == [(p.content_type, p.filename, p.content) for p in parts]


def test_user_data_beyond_the_limit_is_an_error():
    noise = random.Random(0)
    program = "train " + " ".join(f"{noise.getrandbits(64):016x}" for _ in range(4000))
    with pytest.raises(UserDataTooLarge, match=r"even gzip-compressed .* at most 16384"):
        render_user_data(make_config(program=program), "chief", etcd_endpoints=ETCD)


@pytest.mark.parametrize(
    ("config_overrides", "role", "kwargs", "message"),
    [
        ({}, "gpu", {}, "role: must be one of control, chief, ps, worker"),
        ({}, "worker", {"index": 3, "etcd_endpoints": ETCD}, "index: must be 0..2 for worker"),
        ({}, "control", {"index": 0}, "index: the control node has no task index"),
        ({}, "control", {"etcd_endpoints": ETCD}, "etcd_endpoints: the control node runs etcd"),
        ({}, "ps", {}, "etcd_endpoints: required for ps with etcd: control-node"),
        ({}, "ps", {"etcd_endpoints": ["10.0.0.5"]}, "etcd_endpoints: an etcd endpoint must"),
        ({"chief": 0}, "chief", {"etcd_endpoints": ETCD}, "role: this cluster has no chief"),
        ({"etcd": ETCD}, "control", {}, "role: control exists only with etcd: control-node"),
    ],
)
def test_impossible_requests_are_render_errors(config_overrides, role, kwargs, message):
    with pytest.raises(RenderError) as error:
        render_user_data(make_config(**config_overrides), role, **kwargs)
    assert str(error.value).startswith(message)


def test_external_etcd_endpoints_come_from_the_config():
    config = make_config(etcd=["http://etcd.internal:2379"])
    agent = json.loads(embedded_files(script_of(config, "worker"))["/etc/tfcluster/agent.json"])
    assert agent["etcd_endpoints"] == ["http://etcd.internal:2379"]


def test_control_endpoint_formats_the_private_address():
    assert control_endpoint("10.0.1.23") == "http://10.0.1.23:2379"
    assert control_endpoint("fd00::5") == "http://[fd00::5]:2379"
    with pytest.raises(ValueError):
        control_endpoint("ip-10-0-1-23")


# --- outside checkers -------------------------------------------------------------------


@pytest.mark.parametrize("role", ["control", "worker"])
def test_cloud_config_passes_cloud_init_schema(tmp_path, role):
    cloud_init = require_tool("cloud-init")
    endpoints = None if role == "control" else ETCD
    part = render_parts(make_config(), role, etcd_endpoints=endpoints)[0]
    good = tmp_path / "cloud-config.yaml"
    good.write_text(part.content)
    result = run([cloud_init, "schema", "--config-file", str(good)])
    assert result.returncode == 0, result.stdout + result.stderr
    # The checker really checks: the same document with a wrong type fails.
    bad = tmp_path / "bad.yaml"
    bad.write_text(part.content.split("packages:")[0] + "packages: 5\n")
    assert run([cloud_init, "schema", "--config-file", str(bad)]).returncode != 0


@pytest.mark.parametrize(("role", "index"), [("control", None), *TASKS])
@pytest.mark.parametrize("lifetime", [None, "12h"])
def test_script_passes_shellcheck(tmp_path, role, index, lifetime):
    shellcheck = require_tool("shellcheck")
    endpoints = None if role == "control" else ETCD
    script = tmp_path / "user-data.sh"
    config = make_config(max_lifetime=lifetime)
    script.write_text(script_of(config, role, index=index, etcd_endpoints=endpoints))
    result = run([shellcheck, "--shell=bash", "--severity=style", str(script)])
    assert result.returncode == 0, result.stdout + result.stderr


# --- the script, run ---------------------------------------------------------------------


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; logs nothing (the test's output stays readable)."""

    def log_message(self, format: str, *args: Any) -> None:
        return None


class Sandbox:
    """One simulated instance's file system under ``root``, with stand-ins for
    the two commands that would change this machine: systemctl (records its
    arguments) and python (makes a venv whose pip records its arguments); and
    a web server on 127.0.0.1 for what the script downloads (`serve`).
    `close` stops the server."""

    def __init__(self, root: Path, imds_url: str) -> None:
        self.root = root
        self.www = root / "www"
        self.www.mkdir(parents=True)
        handler = functools.partial(QuietHandler, directory=str(self.www))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.calls = root / "systemctl.log"
        systemctl = executable(root / "tools/systemctl", f'#!/bin/sh\necho "$*" >> {self.calls}\n')
        python = executable(
            root / "tools/python",
            "#!/bin/sh\n"
            '[ "$1 $2 $3" = "-m venv --system-site-packages" ] || exit 2\n'
            'mkdir -p "$4/bin"\n'
            'printf \'#!/bin/sh\\necho "$*" > %s/pip.log\\n\' "$4" > "$4/bin/pip"\n'
            "printf '#!/bin/sh\\n' > \"$4/bin/tfcluster\"\n"
            'chmod +x "$4/bin/pip" "$4/bin/tfcluster"\n',
        )
        self.shutdowns = root / "shutdown.log"
        shutdown = executable(
            root / "tools/shutdown", f'#!/bin/sh\necho "$*" >> {self.shutdowns}\n'
        )
        self.nsswitch = root / "etc/nsswitch.conf"
        self.nsswitch.parent.mkdir(parents=True)
        self.nsswitch.write_text(
            "passwd: files\nhosts: files mdns4_minimal [NOTFOUND=return] dns\nnetworks: files\n"
        )
        self.layout = Layout(
            install_dir=str(root / "opt"),
            config_dir=str(root / "etc/tfcluster"),
            state_dir=str(root / "var/lib/tfcluster"),
            unit_dir=str(root / "units"),
            resolved_dropin=str(root / "etc/resolved.conf.d/tfcluster.conf"),
            nsswitch=str(self.nsswitch),
            imds_endpoint=imds_url,
            tf_config_path=str(root / "run/tf_config.json"),
            service_user=pwd.getpwuid(os.getuid()).pw_name,
            python=str(python),
            systemctl=str(systemctl),
            shutdown_command=str(shutdown),
            sudoers_dir=str(root / "etc/sudoers.d"),
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def serve(self, path: Path) -> str:
        """The http URL the sandbox's server gives ``path`` under (a link to it: a
        change to the file is what the next download gets)."""
        link = self.www / sha256_text(str(path)) / path.name
        link.parent.mkdir(exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(path)
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/{link.relative_to(self.www)}"

    def artifacts(self) -> dict[str, Any]:
        """A bare coredns executable and an etcd release-style tarball, served over http."""
        coredns = executable(self.root / "dl/coredns", "#!/bin/sh\necho coredns\n")
        release = self.root / "dl/etcd-v3.7.3-linux-amd64"
        for name in ("etcd", "etcdctl", "etcdutl"):
            executable(release / name, f"#!/bin/sh\necho {name}\n")
        tarball = self.root / "dl/etcd.tar.gz"
        with tarfile.open(tarball, "w:gz") as tar:
            tar.add(release, arcname=release.name)
        return {
            "artifacts.coredns.url": self.serve(coredns),
            "artifacts.coredns.sha256": sha256(coredns),
            "artifacts.etcd.url": self.serve(tarball),
            "artifacts.etcd.sha256": sha256(tarball),
        }

    def staged(self) -> dict[str, Artifact]:
        """A stand-in wheel and constraints as a task fetches them (from the sandbox's
        server here; test_bucket.py fetches real ones from a bucket by presigned URL)."""
        found = {}
        for name, filename, text in (
            ("wheel", "tfcluster-0.1.0-py3-none-any.whl", "a wheel\n"),
            ("constraints", "constraints.txt", "tensorflow-cpu==2.21.0\n"),
        ):
            path = self.root / "bucket" / name / filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            found[name] = Artifact(self.serve(path), sha256(path))
        return found

    def run(
        self, config: ClusterConfig, role: str, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        if role != "control":
            kwargs.setdefault("staged", self.staged())
        script = self.root / f"{role}.sh"
        script.write_text(script_of(config, role, layout=self.layout, **kwargs))
        return subprocess.run(
            ["bash", str(script)], capture_output=True, text=True, timeout=SCRIPT_TIMEOUT
        )

    def path(self, relative: str) -> Path:
        return self.root / relative


@pytest.fixture
def imds():
    metadata = InstanceMetadata(
        launch_index=0, local_ipv4="127.0.0.9", instance_id="i-0123456789abcdef0"
    )
    with IMDSEmulator(metadata) as emulator:
        yield emulator


@pytest.fixture
def sandbox(tmp_path, imds) -> Sandbox:
    for tool in ("curl", "sha256sum", "tar", "bash"):
        require_tool(tool)
    box = Sandbox(tmp_path, imds.url)
    yield box
    box.close()


def test_control_script_installs_and_starts_etcd_and_coredns(sandbox):
    config = make_config(**sandbox.artifacts())
    result = sandbox.run(config, "control")
    assert result.returncode == 0, result.stderr
    for name in ("coredns", "etcd", "etcdctl"):
        binary = sandbox.path(f"opt/bin/{name}")
        assert os.access(binary, os.X_OK)
        assert run([str(binary)]).stdout == f"{name}\n"
    env = sandbox.path("etc/tfcluster/etcd.env").read_text()
    assert "\nETCD_ADVERTISE_CLIENT_URLS=http://127.0.0.9:2379\n" in env  # from IMDSv2
    assert f"\nETCD_DATA_DIR={sandbox.path('var/lib/tfcluster/etcd')}\n" in env
    assert sandbox.path("var/lib/tfcluster/etcd").is_dir()
    assert sandbox.calls.read_text().splitlines() == [
        "restart systemd-resolved.service",
        "daemon-reload",
        "enable --now tfcluster-etcd.service tfcluster-coredns.service",
    ]
    assert sandbox.nsswitch.read_text() == "passwd: files\nhosts: files dns\nnetworks: files\n"
    assert sandbox.path("etc/resolved.conf.d/tfcluster.conf").exists()


def test_worker_script_installs_the_agent_and_writes_its_config(sandbox):
    config = make_config(**sandbox.artifacts())
    result = sandbox.run(config, "worker", index=1, etcd_endpoints=ETCD)
    assert result.returncode == 0, result.stderr
    pip = sandbox.path("opt/venv/pip.log").read_text().split()
    # The staged wheel, with the staged pins: nothing by name from an index.
    dist = sandbox.path("opt/dist")
    assert pip[0] == "install" and pip[-1] == f"{dist}/tfcluster-0.1.0-py3-none-any.whl[tf]"
    assert pip[pip.index("--constraint") + 1] == f"{dist}/constraints.txt"
    assert "--no-index" not in pip  # EC2: TensorFlow from PyPI when the image lacks it
    assert (dist / "constraints.txt").read_text() == "tensorflow-cpu==2.21.0\n"
    agent = json.loads(sandbox.path("etc/tfcluster/agent.json").read_text())
    assert (agent["role"], agent["index"], agent["etcd_endpoints"]) == ("worker", 1, ETCD)
    assert agent["imds_endpoint"] == sandbox.layout.imds_endpoint
    assert not sandbox.path("opt/bin/etcd").exists()
    assert sandbox.calls.read_text().splitlines()[-1] == (
        "enable --now tfcluster-coredns.service tfcluster-agent.service"
    )


def test_chief_script_unpacks_the_program_bundle_where_its_program_runs(sandbox, tmp_path):
    program = tmp_path / "program-src"
    (program / "lib").mkdir(parents=True)
    (program / "train.py").write_text("print('hi')\n")
    (program / "lib" / "data.txt").write_text("1 2 3\n")
    built = bundle.build_bundle(program, tmp_path / "out" / "program.tar.gz")
    config = make_config(
        program_dir=str(program), program="python3 train.py", **sandbox.artifacts()
    )
    staged = {**sandbox.staged(), "bundle": Artifact(sandbox.serve(built.path), built.sha256)}
    result = sandbox.run(config, "chief", etcd_endpoints=ETCD, staged=staged)
    assert result.returncode == 0, result.stderr
    unpacked = sandbox.path("opt/program")
    assert (unpacked / "train.py").read_text() == "print('hi')\n"
    assert (unpacked / "lib" / "data.txt").read_text() == "1 2 3\n"
    agent = json.loads(sandbox.path("etc/tfcluster/agent.json").read_text())
    assert agent["program_dir"] == str(unpacked)
    assert agent["program"] == ["python3", "train.py"]
    # Only the chief fetches the bundle; a chief without it is a render error.
    worker = script_of(config, "worker", etcd_endpoints=ETCD, staged=staged)
    assert "bundle_url=" not in worker and "program_dir" not in worker
    with pytest.raises(RenderError, match=r"^bundle: not staged"):
        script_of(config, "chief", etcd_endpoints=ETCD, staged=sandbox.staged())


def test_with_on_chief_exit_down_the_agent_may_power_off_and_nothing_else(sandbox):
    """The agent's user gets exactly one command through sudo (visudo checks the file);
    the chief's output folder is made for that user."""
    config = make_config(program="python3 train.py", on_chief_exit="down", **sandbox.artifacts())
    result = sandbox.run(config, "chief", etcd_endpoints=ETCD)
    assert result.returncode == 0, result.stderr
    user = sandbox.layout.service_user
    rule = sandbox.path("etc/sudoers.d/tfcluster-poweroff")
    command = sandbox.layout.shutdown_command
    assert rule.read_text() == f"{user} ALL=(root) NOPASSWD: {command} -P now\n"
    assert rule.stat().st_mode & 0o777 == 0o440
    if shutil.which("visudo"):
        checked = run(["visudo", "-c", "-q", "-f", str(rule)])
        assert checked.returncode == 0, checked.stdout + checked.stderr
    agent = json.loads(sandbox.path("etc/tfcluster/agent.json").read_text())
    assert (agent["on_chief_exit"], agent["shutdown_sudo"]) == ("down", True)
    assert agent["shutdown_command"] == sandbox.layout.shutdown_command
    output = sandbox.path("var/lib/tfcluster/output")
    assert output.is_dir() and agent["output_dir"] == str(output)
    assert output.stat().st_uid == os.getuid()
    # keep (the default): no sudo rule, and the agent never asks for one.
    kept = script_of(make_config(**sandbox.artifacts()), "worker", etcd_endpoints=ETCD,
                     staged=sandbox.staged())  # fmt: skip
    assert "sudoers" not in kept and '"shutdown_sudo"' not in kept


def test_a_tampered_bundle_stops_the_chief_script(sandbox, tmp_path):
    program = tmp_path / "program-src"
    program.mkdir()
    (program / "train.py").write_text("print('hi')\n")
    built = bundle.build_bundle(program, tmp_path / "out" / "program.tar.gz")
    config = make_config(program_dir=str(program), **sandbox.artifacts())
    staged = {**sandbox.staged(), "bundle": Artifact(sandbox.serve(built.path), built.sha256)}
    built.path.write_bytes(b"not the bundle")
    result = sandbox.run(config, "chief", etcd_endpoints=ETCD, staged=staged)
    assert result.returncode != 0
    assert "tfcluster user-data: bundle: SHA-256 mismatch" in result.stderr
    assert not sandbox.path("opt/program").exists()
    assert not sandbox.calls.exists()  # no agent was started


def test_the_local_image_adapter_names_its_packages_and_keeps_pip_off_the_index(sandbox):
    """Only the local cloud sets image_site_packages: a .pth in the new venv names the
    folder that holds the image's TensorFlow, and pip runs with --no-index."""
    config = make_config(**sandbox.artifacts())
    assert "--no-index" not in script_of(config, "worker", etcd_endpoints=ETCD)
    layout = dataclasses.replace(sandbox.layout, image_site_packages="/srv/image/site-packages")
    script = script_of(config, "worker", etcd_endpoints=ETCD, layout=layout)
    assert "\nimage_site_packages='/srv/image/site-packages'\n" in script
    assert 'echo "$image_site_packages" > "$site/tfcluster-image.pth"' in script
    assert "--no-index --constraint" in script


def test_script_refuses_a_download_with_the_wrong_checksum(sandbox):
    artifacts = {**sandbox.artifacts(), "artifacts.coredns.sha256": SHA_A}
    result = sandbox.run(make_config(**artifacts), "control")
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr
    assert not sandbox.path("opt/bin/coredns").exists()
    assert not sandbox.calls.exists()  # nothing was started


@pytest.mark.parametrize("role", ["control", "worker"])
def test_max_lifetime_schedules_the_power_off_first(sandbox, role):
    # Even a script that fails later (here: a wrong checksum) has scheduled it.
    artifacts = {**sandbox.artifacts(), "artifacts.coredns.sha256": SHA_A}
    config = make_config(max_lifetime="1d12h", **artifacts)
    endpoints = None if role == "control" else ETCD
    result = sandbox.run(config, role, etcd_endpoints=endpoints)
    assert result.returncode != 0 and not sandbox.path("opt/bin/coredns").exists()
    assert sandbox.shutdowns.read_text() == "-P +2160\n"  # 36 h in minutes
    assert "scheduling power-off in 2160 minutes" in result.stderr


def test_without_max_lifetime_nothing_is_scheduled(sandbox):
    result = sandbox.run(make_config(**sandbox.artifacts()), "control")
    assert result.returncode == 0, result.stderr
    assert not sandbox.shutdowns.exists()
    assert "shutdown" not in script_of(make_config(), "control")


def test_max_lifetime_rounds_up_to_whole_minutes():
    script = script_of(make_config(max_lifetime="10m1s"), "control")
    assert "\nlifetime_minutes=11\n" in script and "# max_lifetime (11m)" in script


def test_max_lifetime_is_in_the_script_of_every_role():
    config = make_config(max_lifetime="90m")
    for role, endpoints in (("control", None), ("chief", ETCD), ("ps", ETCD), ("worker", ETCD)):
        script = script_of(config, role, etcd_endpoints=endpoints)
        assert "\nshutdown=shutdown\nlifetime_minutes=90\n" in script
        assert script.index('"$shutdown" -P "+$lifetime_minutes"') < script.index(
            'install_artifact "'
        )
        assert "# max_lifetime (1h30m): power off" in script


def test_units_pass_systemd_analyze_verify(sandbox):
    analyze = require_tool("systemd-analyze")
    probe = sandbox.path("probe/tfcluster-probe.service")
    probe.parent.mkdir()
    probe.write_text("[Unit]\nDescription=probe\n\n[Service]\nExecStart=/bin/true\n")
    tried = run([analyze, "verify", str(probe)])
    if tried.returncode != 0 or tried.stderr.strip():
        pytest.skip(f"systemd-analyze verify cannot run here: {tried.stderr.strip()}")
    config = make_config(**sandbox.artifacts())
    assert sandbox.run(config, "control").returncode == 0
    assert sandbox.run(config, "worker", etcd_endpoints=ETCD).returncode == 0
    units = sorted(sandbox.path("units").glob("*.service"))
    assert [u.name for u in units] == [
        "tfcluster-agent.service",
        "tfcluster-coredns.service",
        "tfcluster-etcd.service",
    ]
    result = run([analyze, "verify", *map(str, units)])
    assert result.returncode == 0 and result.stderr == "", result.stderr
    # The checker really checks: a misspelt key is reported.
    broken = sandbox.path("probe/tfcluster-agent.service")
    broken.write_text(units[0].read_text().replace("KillSignal=", "KilSignal="))
    assert "Unknown key" in run([analyze, "verify", str(broken)]).stderr


# --- the command line ----------------------------------------------------------------------


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "tfcluster.yaml"
    path.write_text(
        "cluster: demo\nps: 2\nworkers: 3\n"
        f"artifacts:\n  coredns: {{sha256: '{SHA_A}'}}\n  etcd: {{sha256: '{SHA_B}'}}\n" + extra
    )
    return path


def shown_staged(config: ClusterConfig) -> dict[str, Artifact]:
    """What `tfcluster render` shows for the staged objects: the real SHA-256 values
    (the wheel of this checkout, its constraints) with a stand-in URL each."""
    return {
        plan.fetch_name(o): Artifact(
            f"https://cluster-bucket.invalid/{o.key}?presigned-by-up", o.sha256
        )
        for o in plan.staged_objects(config)
    }


def test_render_prints_the_readable_parts(tmp_path):
    path = write_config(tmp_path)
    argv = ["render", "--config", str(path), "--role", "ps", "--index", "1"]
    result = CliRunner().invoke(main, [*argv, "--etcd-endpoint", ETCD[0]])
    assert result.exit_code == 0, result.output
    config = make_config()
    parts = render_parts(config, "ps", 1, ETCD, staged=shown_staged(config))
    for part in parts:
        assert part.content in result.stdout
    assert "# ---- part 1/2: text/cloud-config (cloud-config.yaml)" in result.stdout
    assert "# ---- part 2/2: text/x-shellscript (tfcluster-ps.sh)" in result.stdout


def test_render_raw_writes_the_exact_bytes(tmp_path):
    path = write_config(tmp_path, "program: python3 train.py " + "--x y " * 3000 + "\n")
    argv = ["render", "--config", str(path), "--role", "chief", "--raw"]
    result = CliRunner().invoke(main, [*argv, "--etcd-endpoint", ETCD[0]])
    assert result.exit_code == 0
    config = load_cluster_config(path, {})
    assert result.stdout_bytes == render_user_data(
        config, "chief", etcd_endpoints=ETCD, staged=shown_staged(config)
    )
    assert result.stdout_bytes[:2] == b"\x1f\x8b"


def test_render_set_overrides_the_file(tmp_path):
    argv = ["render", "--config", str(write_config(tmp_path)), "--role", "worker"]
    result = CliRunner().invoke(main, [*argv, "--set", "etcd=[http://10.9.9.9:2379]"])
    assert result.exit_code == 0, result.output
    assert '"http://10.9.9.9:2379"' in result.stdout


@pytest.mark.parametrize(
    ("extra_yaml", "argv", "message"),
    [
        ("wokers: 2\n", ["--role", "worker"], "Error: wokers: unknown key"),
        ("", ["--role", "worker"], "Error: etcd_endpoints: required for worker"),
        ("", ["--role", "worker", "--index", "5", "--etcd-endpoint", ETCD[0]], "Error: index:"),
    ],
)
def test_render_errors_are_one_line_with_exit_code_2(tmp_path, extra_yaml, argv, message):
    path = write_config(tmp_path, extra_yaml)
    result = CliRunner().invoke(main, ["render", "--config", str(path), *argv])
    assert result.exit_code == 2
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert result.stdout == ""


def test_render_too_large_is_one_line_with_exit_code_2(tmp_path):
    noise = random.Random(1)
    program = "train " + " ".join(f"{noise.getrandbits(64):016x}" for _ in range(4000))
    path = write_config(tmp_path, f"program: {program}\n")
    argv = ["render", "--config", str(path), "--role", "chief", "--etcd-endpoint", ETCD[0]]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2
    assert re.match(r"Error: user-data for chief is \d+ bytes even gzip-compressed", result.stderr)
