"""The local cloud end to end: `up --local` against moto, instances booted from their
own user-data, real etcd, CoreDNS, agents and TensorFlow.

The netns tests need root (network namespaces); CI runs as root. One cluster
of 1 chief, 2 ps and 2 workers serves the first tests: names resolve through
getaddrinfo inside every instance, every agent runs from the wheel installed
in its own venv, the chief runs examples/train.py from its staged bundle and
its loss falls, a worker is replaced through the EC2 API, and `down --local`
leaves nothing behind. A second, smaller cluster is crashed (its moto server
killed, its state left) and removed. Small clusters of their own then check
that a tampered staged object stops an instance before its agent starts, and
that a namespace fetches a presigned URL from moto on the bridge (netns
clusters share one subnet, so they run one after another). Another runs in
loopback mode, which needs no root.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tfcluster.cloudinit import cli, provision
from tfcluster.cloudinit.localcloud import daemons, motoserver, network, servicectl
from tfcluster.cloudinit.localcloud.cloud import LocalCloud, LocalCloudError
from tfcluster.discovery.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent

needs_netns = pytest.mark.skipif(
    not network.available(), reason="netns mode needs root and network namespaces"
)

CLUSTER = "lctest"
CRASH_CLUSTER = "lccrash"
LOOPBACK_CLUSTER = "lcloop"
S3_CLUSTER = "lcs3"
TAMPER_CLUSTER = "lctamper"
STEPS = 200_000
"""Far more than the tests wait for: the chief is still training when the worker is replaced."""
STEP = re.compile(r"^step (\d+) loss ([0-9.]+)$", re.MULTILINE)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SETTINGS = {
    "ps": 2,
    "workers": 2,
    "program_dir": str(EXAMPLES),
    "program": f"python3 train.py --steps {STEPS} --log-every 100",
}
"""The chief runs examples/train.py from its staged bundle."""
SITE = f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
"""Inside a venv made on this interpreter's base."""


def steps_logged(cloud: LocalCloud) -> list[tuple[int, float]]:
    chief = cloud.find("chief0")
    assert chief is not None
    text = cloud.agent_log(chief).read_text(errors="replace")
    return [(int(n), float(loss)) for n, loss in STEP.findall(text)]


def wait_for_steps(cloud: LocalCloud, count: int, after: int = 0) -> list[tuple[int, float]]:
    """At least ``count`` loss lines past step ``after`` (training runs ~100+ steps/s)."""

    def enough() -> list[tuple[int, float]] | None:
        lines = [line for line in steps_logged(cloud) if line[0] > after]
        return lines if len(lines) >= count else None

    return wait_for(enough, what=f"{count} loss lines after step {after}", timeout=120)


def getaddrinfo_in(namespace: str, name: str) -> str:
    """The IPv4 address getaddrinfo gives for ``name`` inside the namespace."""
    code = f"import socket; print(socket.getaddrinfo({name!r}, 2222, socket.AF_INET)[0][4][0])"
    done = subprocess.run(
        network.exec_argv(namespace, [sys.executable, "-c", code]),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def leftovers(cloud: LocalCloud) -> dict[str, list[str]]:
    """Everything of the cluster still on this machine, by kind."""
    links = json.loads(network.ip("-j", "link", "show"))
    marker = str(cloud.folder)
    processes = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    processes.append(entry.name)
            except OSError:
                continue
    return {
        "namespaces": network.namespaces(cloud.cluster),
        "interfaces": [
            str(link["ifname"])
            for link in links
            if link.get("ifalias") == network.label(cloud.cluster)
            or link["ifname"] == network.bridge_name(cloud.cluster)
        ],
        "netns entries": [p.name for p in network.NETNS_ETC.glob(f"tfc-{cloud.cluster}-*")],
        "processes": processes,
        "files": [str(cloud.folder)] if cloud.folder.exists() else [],
    }


NOTHING: dict[str, list[str]] = {
    "namespaces": [],
    "interfaces": [],
    "netns entries": [],
    "processes": [],
    "files": [],
}


def down_cli(cluster: str) -> str:
    result = CliRunner().invoke(cli.main, ["down", "--local", "--cluster", cluster, "--yes"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    """1 chief (training STEPS steps), 2 ps, 2 workers, every agent past its barrier."""
    local = LocalCloud(CLUSTER)
    local.down()  # a previous run's leftovers
    try:
        config = local.prepare(SETTINGS)
        local.up(config)
        yield local
    finally:
        local.down()


@needs_netns
def test_every_agent_passes_and_each_namespace_resolves_its_peers(cloud: LocalCloud) -> None:
    rows = {r.node.label: r for r in cloud.status() if r.node is not None}
    assert sorted(rows) == ["chief0", "control0", "ps0", "ps1", "worker0", "worker1"]
    assert all(rows[label].barrier_passed for label in rows if label != "control0")
    worker1 = rows["worker1"].node
    assert worker1 is not None and worker1.private_ip is not None
    assert worker1.private_ip.startswith("198.18.0.")
    for label, row in rows.items():
        if label != "control0":  # the control node's resolver has no CoreDNS of the zone
            assert getaddrinfo_in(row.namespace, "worker1.tensorflow.local") == worker1.private_ip
    table = {e.name: e.address for e in cloud.dns_table()}
    assert table == {
        f"{label}.tensorflow.local": row.node.private_ip
        for label, row in rows.items()
        if label != "control0" and row.node is not None
    }


@needs_netns
def test_the_chief_trains_and_the_loss_falls(cloud: LocalCloud) -> None:
    lines = wait_for_steps(cloud, 3)
    assert lines[0][0] == 1
    assert lines[-1][1] < lines[0][1] / 10, lines


@needs_netns
def test_each_agent_runs_from_its_own_venv_and_the_chief_from_its_bundle(cloud: LocalCloud) -> None:
    """Installed from the staged wheel inside each instance, not the checkout; the chief's
    program is the staged examples/ folder, run there with the venv's python3."""
    venv = f"{cloud.machine_root}/opt/tfcluster/venv"
    rows = [r for r in cloud.status() if r.barrier_passed is not None and r.node is not None]
    assert len(rows) == 5
    for row in rows:
        log = cloud.agent_log(row.instance_id).read_text(errors="replace")
        (where,) = re.findall(r"tfcluster agent from (\S+)", log)
        # The path as the instance sees it: its own disk is mounted over the machine root.
        assert where == f"{venv}/{SITE}/tfcluster", row.node.label
        own = cloud.instances_dir / row.instance_id / "fs/opt/tfcluster/venv" / SITE / "tfcluster"
        installed = own / "discovery" / "agent.py"
        assert not installed.is_symlink()
        assert installed.read_bytes() == (REPO / "discovery" / "agent.py").read_bytes()
        assert not (own.parent / "__editable___tfcluster_0_1_0_finder.py").exists()
    image = cloud.folder / "image" / "site-packages"
    assert (image / "tensorflow").exists() and not list(image.glob("tfcluster*"))
    chief = cloud.find("chief0")
    assert chief is not None
    log = cloud.agent_log(chief).read_text(errors="replace")
    assert f"train.py: working directory {cloud.machine_root}/opt/tfcluster/program\n" in log
    assert f"train.py: python {venv}/bin/python3, tfcluster from {venv}/{SITE}/tfcluster\n" in log
    unpacked = cloud.instances_dir / chief / "fs/opt/tfcluster/program"
    assert (unpacked / "train.py").read_bytes() == (EXAMPLES / "train.py").read_bytes()


@needs_netns
def test_a_replaced_worker_gets_a_new_address_and_training_goes_on(cloud: LocalCloud) -> None:
    old = cloud.find("worker1")
    before = {e.name: e.address for e in cloud.dns_table()}
    url = motoserver.endpoint(cloud.moto_dir)
    ec2 = motoserver.session().client("ec2", endpoint_url=url)
    ec2.terminate_instances(InstanceIds=[old])

    config = cloud.prepare(SETTINGS)
    cloud.up(config)
    new = cloud.find("worker1")
    assert new is not None and new != old
    after = {e.name: e.address for e in cloud.dns_table()}
    name = "worker1.tensorflow.local"
    assert after[name] != before[name]
    assert {k: v for k, v in after.items() if k != name} == {
        k: v for k, v in before.items() if k != name
    }
    # The old instance is gone from this machine: its agent revoked its lease on SIGTERM.
    assert network.namespace(CLUSTER, str(old)) not in network.namespaces(CLUSTER)
    assert not (cloud.instances_dir / str(old)).exists()
    # The chief keeps training once the new worker serves under the same name.
    last = steps_logged(cloud)[-1][0]
    more = wait_for_steps(cloud, 2, after=last)
    assert more[-1][0] > last


@needs_netns
def test_down_removes_everything_and_twice_is_a_no_op(cloud: LocalCloud) -> None:
    assert leftovers(cloud) != NOTHING
    first = down_cli(CLUSTER)
    assert "terminating 6 instance(s)" in first
    assert leftovers(cloud) == NOTHING
    assert "nothing to remove" in down_cli(CLUSTER)
    assert leftovers(cloud) == NOTHING


@needs_netns
def test_down_cleans_up_after_a_crash() -> None:
    crashed = LocalCloud(CRASH_CLUSTER)
    crashed.down()
    config = crashed.prepare({"chief": 0, "ps": 1, "workers": 1})
    crashed.up(config)
    # The CLI died without a word: its moto server is killed, every file and
    # namespace is left, and a booted marker is lost mid-boot.
    moto_pid = daemons.running(crashed.moto_dir, motoserver.NAME)
    assert moto_pid is not None
    subprocess.run(["kill", "-KILL", str(moto_pid)], check=True, timeout=10)
    wait_for(
        lambda: daemons.running(crashed.moto_dir, motoserver.NAME) is None or None,
        what="the moto server to die",
        timeout=10,
    )
    ps0 = crashed.find("ps0")
    assert ps0 is not None
    (crashed.instances_dir / ps0 / "booted").unlink()
    assert leftovers(crashed)["namespaces"]

    down_cli(CRASH_CLUSTER)
    assert leftovers(crashed) == NOTHING
    assert "nothing to remove" in down_cli(CRASH_CLUSTER)


@needs_netns
def test_a_tampered_staged_object_stops_the_instance_before_its_agent_starts() -> None:
    """The wheel is changed in the bucket between launch and boot: the instance's
    user-data refuses it in one log line, and no agent ever starts."""
    tampered = LocalCloud(TAMPER_CLUSTER)
    tampered.down()
    try:
        config = tampered.prepare({"chief": 0, "ps": 1, "workers": 1})
        provider = tampered.provider()
        launched = provision.up(config, provider)  # in moto only: nothing booted yet
        wheel = next(o for o in launched.plan.staged if o.name == "wheel")
        bad = b"not the wheel"
        provider.s3.put_object(Bucket=launched.bucket, Key=wheel.key, Body=bad)
        with pytest.raises(LocalCloudError, match=r"^ps0 \(i-[0-9a-f]+\): user-data exited with 1"):
            tampered.sync()
        ps0 = next(n for n in launched.nodes if n.label == "ps0")
        folder = tampered.instances_dir / ps0.instance_id
        output = (folder / "cloud-init-output.log").read_text()
        line = (
            f"tfcluster user-data: wheel: SHA-256 mismatch (expected {wheel.sha256}, "
            f"got {hashlib.sha256(bad).hexdigest()}): refused"
        )
        assert line in output.splitlines()
        assert not daemons.pid_file(folder / "fs", "tfcluster-agent.service").exists()
        assert not (folder / "fs/opt/tfcluster/venv").exists()
    finally:
        tampered.down()
    assert leftovers(tampered) == NOTHING


@needs_netns
def test_an_instance_namespace_fetches_a_presigned_url_of_moto_on_the_bridge() -> None:
    """moto listens on the bridge's own address and signs URLs for it: a namespace on the
    subnet, which cannot reach the host's 127.0.0.1, fetches a staged object by its URL."""
    s3cloud = LocalCloud(S3_CLUSTER)
    s3cloud.down()
    try:
        s3cloud.prepare({"chief": 0, "ps": 1, "workers": 1})
        url = motoserver.endpoint(s3cloud.moto_dir)
        assert url is not None and url.startswith(f"http://{network.gateway()}:")
        provider = s3cloud.provider()
        bucket, _ = provider.ensure_bucket(S3_CLUSTER)
        provider.s3.put_object(Bucket=bucket, Key="objects/probe", Body=b"staged bytes\n")
        signed = provider.presign(bucket, "objects/probe", 600)
        assert signed.startswith(f"{url}/{bucket}/objects/probe?")
        assert "X-Amz-Signature=" in signed
        ns = network.attach(S3_CLUSTER, "i-0000000000000abc", "198.18.0.200")
        curl = ["curl", "--fail", "--silent", "--show-error", "--max-time", "10", signed]
        fetched = subprocess.run(
            network.exec_argv(ns, curl), capture_output=True, text=True, timeout=30
        )
        assert fetched.returncode == 0, fetched.stderr
        assert fetched.stdout == "staged bytes\n"
        # The host's loopback is another machine's from inside: not how instances get there.
        port = url.rsplit(":", 1)[1]
        loop = [*curl[:-1], f"http://127.0.0.1:{port}/moto-api/"]
        refused = subprocess.run(network.exec_argv(ns, loop), capture_output=True, timeout=30)
        assert refused.returncode != 0
    finally:
        s3cloud.down()
    assert leftovers(s3cloud) == NOTHING


USE_CLUSTER = "lcuse"
TFCLUSTER = str(Path(sys.executable).parent / "tfcluster")


def tfcluster(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The operator's command, as its own process."""
    return subprocess.run(
        [TFCLUSTER, *argv], capture_output=True, text=True, timeout=timeout, check=False
    )


@needs_netns
def test_an_operator_sees_the_job_through_the_bucket_and_gets_its_outputs(tmp_path: Path) -> None:
    """The operator side end to end, through moto's S3 as on EC2: `up` returns once
    every agent reports that it serves; `status --json` lists every member with its
    agent's state; `logs chief 0 -f` follows the training's loss lines until the
    program ends; with on_chief_exit down every instance then powers itself off
    (the local shutdown terminates it through the EC2 API); `fetch` brings back a
    checkpoint TensorFlow restores; `down` leaves nothing, the bucket included."""
    cloud = LocalCloud(USE_CLUSTER)
    cloud.down()
    where = ["--local", "--cluster", USE_CLUSTER]
    try:
        up = tfcluster("up", *where, "--ps", "1", "--workers", "1", "--program-dir",
                       str(EXAMPLES), "--set", "program=python3 train.py --steps 3000",
                       "--set", "on_chief_exit=down", "--timeout", "300")  # fmt: skip
        assert up.returncode == 0, up.stdout + up.stderr
        assert "TF serving 3/3" in up.stderr, up.stderr
        # A short job may have ended by the wait's last reading: the table then says so.
        assert re.search(r"chief0 .* (SERVE|UPLOAD|STOP) ", up.stdout), up.stdout

        status = tfcluster("status", *where, "--json")
        assert status.returncode == 0, status.stderr
        members = {m["name"]: m for m in json.loads(status.stdout)["members"]}
        assert {"chief0", "ps0", "worker0"} <= set(members)
        for name in ("chief0", "ps0", "worker0"):
            assert members[name]["agent"]["state"] in ("SERVE", "UPLOAD", "STOP"), members[name]

        logs = tfcluster("logs", "chief", "0", *where, "-f", "--timeout", "240")
        assert logs.returncode == 0, logs.stderr
        steps = [int(n) for n, _loss in STEP.findall(logs.stdout)]
        assert steps and steps[-1] >= 2900, logs.stdout
        assert '"last_loss"' in logs.stdout

        ec2 = motoserver.session().client("ec2", endpoint_url=motoserver.endpoint(cloud.moto_dir))

        def powered_off() -> bool | None:
            found = ec2.describe_instances(
                Filters=[{"Name": "tag:tfcluster:cluster", "Values": [USE_CLUSTER]}]
            )
            states = {
                i["InstanceId"]: i["State"]["Name"]
                for r in found["Reservations"]
                for i in r["Instances"]
                if any(t["Value"] in ("chief", "ps", "worker") for t in i.get("Tags", []))
            }
            return True if len(states) == 3 and set(states.values()) == {"terminated"} else None

        wait_for(powered_off, what="every task instance to power itself off", timeout=120)

        out = tmp_path / "out"
        fetched = tfcluster("fetch", *where, "--to", str(out))
        assert fetched.returncode == 0, fetched.stderr
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["last_loss"] < metrics["first_loss"]
        restore = (
            "import sys, tensorflow as tf; w, b = tf.Variable(0.0), tf.Variable(0.0); "
            "tf.train.Checkpoint(weight=w, bias=b).restore("
            "tf.train.latest_checkpoint(sys.argv[1])).assert_existing_objects_matched(); "
            "print(float(w.numpy()), float(b.numpy()))"
        )
        argv = [sys.executable, "-c", restore, str(out / "checkpoint")]
        loaded = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
        assert loaded.returncode == 0, loaded.stderr
        weight, bias = (float(v) for v in loaded.stdout.split())
        assert abs(weight - 3) < 0.5 and abs(bias - 2) < 0.5, loaded.stdout
    finally:
        down = tfcluster("down", *where, "--yes")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "deleted bucket" in down.stdout + down.stderr
    assert leftovers(cloud) == NOTHING


def test_loopback_mode_boots_a_cluster_on_loopback_addresses() -> None:
    looped = LocalCloud(LOOPBACK_CLUSTER, loopback=True)
    looped.down()
    try:
        # Through the command, as a user types it: it returns once every barrier passed.
        args = ["up", "--local", "--loopback", "--cluster", LOOPBACK_CLUSTER]
        args += ["--set", "chief=0", "--ps", "1", "--workers", "1"]
        result = CliRunner().invoke(cli.main, args)
        assert result.exit_code == 0, result.output
        assert "DNS, as the cluster's CoreDNS answers on the chief:" in result.output
        config = looped.saved_config()
        rows = {r.node.label: r.node for r in looped.status() if r.node is not None}
        assert sorted(rows) == ["control0", "ps0", "worker0"]
        assert all(str(node.private_ip).startswith("127.77.0.") for node in rows.values())
        table = {e.name: (e.address, e.port) for e in looped.dns_table()}
        # One host: each task's TF server has a port of its own.
        assert table == {
            "ps0.tensorflow.local": (rows["ps0"].private_ip, 2222),
            "worker0.tensorflow.local": (rows["worker0"].private_ip, 2223),
        }
        assert network.namespaces(LOOPBACK_CLUSTER) == []
        # A replacement launched under this config, booted under another one: the
        # user-data is checked against what the config renders before it runs.
        url = motoserver.endpoint(looped.moto_dir)
        motoserver.session().client("ec2", endpoint_url=url).terminate_instances(
            InstanceIds=[looped.find("worker0")]
        )
        provision.up(config, looped.provider())
        looped.prepare({"chief": 0, "ps": 1, "workers": 1, "tf_port": 3333})
        with pytest.raises(LocalCloudError, match="not what this cluster's config renders"):
            looped.sync()
    finally:
        looped.down()
    assert leftovers(looped) == NOTHING


def test_servicectl_refuses_what_it_does_not_do(tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    (units / "odd.service").write_text("[Service]\nExecStart=/bin/true\nExecStartPre=/bin/false\n")
    with pytest.raises(servicectl.UnitError, match="ExecStartPre"):
        servicectl.run(tmp_path, ["enable", "--now", "odd.service"])
    with pytest.raises(servicectl.UnitError, match="not supported"):
        servicectl.run(tmp_path, ["stop", "odd.service"])
    assert servicectl.run(tmp_path, ["daemon-reload"])


def test_servicectl_starts_a_unit_with_its_environment(tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    env = tmp_path / "env"
    env.write_text("# settings\nFROM_FILE=file\n")
    out = tmp_path / "out"
    (units / "probe.service").write_text(
        "[Unit]\nDescription=probe\n\n[Service]\n"
        f"EnvironmentFile={env}\nEnvironment=FROM_UNIT=unit\n"
        f"ExecStart=/bin/sh -c 'echo \"$FROM_FILE $FROM_UNIT\" > {out}; sleep 30'\n"
        "RuntimeDirectory=probe\n\n[Install]\nWantedBy=multi-user.target\n"
    )
    servicectl.run(tmp_path, ["enable", "--now", "probe.service"])
    try:
        wait_for(lambda: out.exists() or None, what="the unit to write its output", timeout=10)
        wait_for(lambda: out.read_text() or None, what="the output to be flushed", timeout=10)
        assert out.read_text() == "file unit\n"
        assert (tmp_path / "run" / "probe").is_dir()
        assert daemons.running(tmp_path, "probe.service") is not None
    finally:
        assert daemons.stop(tmp_path, "probe.service")


def test_bad_options_fail_before_anything_starts() -> None:
    cluster = "badopts"
    cloud = LocalCloud(cluster, loopback=True)
    result = CliRunner().invoke(
        cli.main, ["up", "--local", "--loopback", "--cluster", cluster, "--workers", "0"]
    )
    assert result.exit_code == 2
    assert (
        result.output.strip().splitlines()[-1]
        == "Error: workers: must be an integer >= 1 and <= 1000, got 0"
    )
    assert motoserver.endpoint(cloud.moto_dir) is None
    assert not cloud.folder.exists()
