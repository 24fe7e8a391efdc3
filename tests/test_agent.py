"""The agent end to end, as real processes, against the real etcd and CoreDNS."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable

import pytest

from conftest import require_tool
from harness import AgentProcess, free_port_block, make_agent
from tfcluster.cloudinit.localcloud import daemons, localstack
from tfcluster.cloudinit.localcloud.localstack import free_port
from tfcluster.discovery import dns, etcdclient, records, tfserver
from tfcluster.discovery.registry import list_records
from tfcluster.discovery.waiting import wait_for

FIVE = {"chief": 1, "ps": 2, "worker": 2}
LAYOUT = [("chief", 0), ("ps", 0), ("ps", 1), ("worker", 0), ("worker", 1)]


@pytest.fixture
def agents():
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


def launch(agents, tmp_path, stack, role, index, ip, roles=FIVE, **kw) -> AgentProcess:
    agent = make_agent(tmp_path, stack, role=role, launch_index=index, ip=ip, roles=roles, **kw)
    agents.append(agent)
    return agent.start()


def gone_after(stack, name: str, timeout: float) -> float:
    """Seconds until ``name`` stops resolving (bounded by ``timeout``)."""
    start = time.monotonic()
    wait_for(
        lambda: True if not dns.resolve_a(stack.dns_server, name) else None,
        what=f"{name} to leave DNS",
        timeout=timeout,
        interval=0.02,
        max_interval=0.05,
    )
    return time.monotonic() - start


def test_five_agents_pass_the_barrier(stack, clean_cluster, agents, tmp_path):
    for n, (role, index) in enumerate(LAYOUT):
        launch(agents, tmp_path, stack, role, index, f"127.0.30.{n + 1}")
    tf_configs = [agent.wait_passed_barrier() for agent in agents]

    dig = require_tool("dig")
    for n, (role, index) in enumerate(LAYOUT):
        answer = subprocess.run(
            [dig, "+short", "+time=2", "+tries=1", f"@{stack.host}", "-p", str(stack.dns_port),
             f"{role}{index}.{stack.zone}"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.split()  # fmt: skip
        assert answer == [f"127.0.30.{n + 1}"]
    members = dns.members(stack.dns_server, stack.zone)
    assert {m.label: (e.host_ip, e.port) for m, e in members.items()} == {
        f"{role}{index}": (f"127.0.30.{n + 1}", 2222 + n) for n, (role, index) in enumerate(LAYOUT)
    }
    cluster = tf_configs[0]["cluster"]
    assert cluster["worker"] == ["worker0.tensorflow.local:2225", "worker1.tensorflow.local:2226"]
    assert [c["task"] for c in tf_configs] == [{"type": r, "index": i} for r, i in LAYOUT]
    assert all(c["cluster"] == cluster for c in tf_configs)

    for agent in agents:
        agent.signal(signal.SIGTERM)
    assert [agent.wait_exit(10) for agent in agents] == [0] * 5
    # CoreDNS follows etcd's deletes through its watch.
    wait_for(
        lambda: True if dns.members(stack.dns_server, stack.zone) == {} else None,
        what="the membership SRV set to empty",
        timeout=3,
    )


def test_second_claimant_exits_with_code_4_and_writes_nothing(
    stack, etcd, clean_cluster, agents, tmp_path
):
    first = launch(
        agents, tmp_path, stack, "worker", 0, "127.0.31.1", instance_id="i-0123456789abcdef1"
    )
    wait_for(
        lambda: dns.resolve_a(stack.dns_server, "worker0.tensorflow.local") or None,
        what="the first claim to resolve",
        timeout=30,
    )
    before = list_records(etcd, stack.cluster, stack.zone)
    second = launch(
        agents, tmp_path, stack, "worker", 0, "127.0.31.2", instance_id="i-0123456789abcdef2"
    )
    assert second.wait_exit(30) == 4
    assert (
        "worker0.tensorflow.local is held by instance i-0123456789abcdef1 at 127.0.31.1:2225"
        in second.log()
    )
    assert list_records(etcd, stack.cluster, stack.zone) == before
    assert first.proc is not None and first.proc.poll() is None


def test_record_leaves_dns_after_kill_and_after_sigterm(stack, clean_cluster, agents, tmp_path):
    killed = launch(agents, tmp_path, stack, "worker", 0, "127.0.32.1")
    stopped = launch(agents, tmp_path, stack, "worker", 1, "127.0.32.2")
    for name in ("worker0.tensorflow.local", "worker1.tensorflow.local"):
        wait_for(
            lambda name=name: dns.resolve_a(stack.dns_server, name) or None,
            what=f"{name} to resolve",
            timeout=30,
        )

    killed.signal(signal.SIGKILL)
    after_kill = gone_after(stack, "worker0.tensorflow.local", timeout=4 + 1 + 3)
    stopped.signal(signal.SIGTERM)
    after_term = gone_after(stack, "worker1.tensorflow.local", timeout=5)
    print(f"\nkill -9 -> gone from DNS: {after_kill:.2f} s (lease 4 s + record TTL 1 s)")
    print(f"SIGTERM -> gone from DNS: {after_term * 1000:.0f} ms")
    assert after_kill <= 4 + 1
    assert after_term < 1.0
    assert stopped.wait_exit(10) == 0


def test_agent_claims_again_when_its_lease_is_lost(stack, etcd, clean_cluster, agents, tmp_path):
    agent = launch(agents, tmp_path, stack, "worker", 1, "127.0.37.1")
    name = "worker1.tensorflow.local"
    wait_for(lambda: dns.resolve_a(stack.dns_server, name) or None, what=name, timeout=30)
    key = records.record_key(
        records.cluster_path(stack.cluster), stack.zone, records.Member("worker", 1)
    )
    _, meta = etcd.get(key)
    etcd.revoke_lease(meta.lease_id)  # as if it had expired while etcd was cut off
    assert dns.resolve_a(stack.dns_server, name) == []
    # Keepalive runs every lease_ttl/3 (4/3 s here); the next one claims again.
    wait_for(
        lambda: dns.resolve_a(stack.dns_server, name) or None, what="the claim again", timeout=5
    )
    _, again = etcd.get(key)
    assert again.lease_id != meta.lease_id
    assert agent.proc is not None and agent.proc.poll() is None
    assert "claimed worker1 again" in agent.log()


@pytest.fixture
def own_stack(tmp_path_factory):
    """A stack of this test's own, so that its etcd can be stopped."""
    settings = localstack.on_free_ports(tmp_path_factory.mktemp("own-stack"), cluster="restart")
    localstack.up(settings)
    yield settings
    localstack.down(settings.run_dir)


def test_agents_survive_an_etcd_restart(own_stack, agents, tmp_path):
    roles = {"ps": 1, "worker": 1}
    pair = [
        launch(agents, tmp_path, own_stack, "ps", 0, "127.0.33.1", roles=roles),
        launch(agents, tmp_path, own_stack, "worker", 0, "127.0.33.2", roles=roles),
    ]
    for agent in pair:
        agent.wait_passed_barrier()
    path = records.cluster_path(own_stack.cluster)
    keys = [records.record_key(path, own_stack.zone, records.Member(r, 0)) for r in roles]

    daemons.stop(own_stack.run_dir, "etcd")
    for agent in pair:
        wait_for(
            lambda agent=agent: "will retry" in agent.log() or None,
            what=f"{agent.name} to notice that etcd is gone",
            timeout=30,
        )
    localstack.up(own_stack)

    def both_resolve() -> bool | None:
        try:
            found = dns.members(own_stack.dns_server, own_stack.zone)
        except dns.DNSQueryError:  # CoreDNS's own etcd client may still be reconnecting
            return None
        return True if {m.label for m in found} == {"ps0", "worker0"} else None

    wait_for(both_resolve, what="both records back in DNS", timeout=30)
    # Each agent keeps its name under one lease that it refreshes: the lease's
    # remaining TTL only falls unless a keepalive resets it, so a rise in it is
    # an agent's keepalive. The lease may be the one from before the restart,
    # or a new one if it expired while the agent's client reconnected.
    etcd = etcdclient.connect(own_stack.etcd_endpoint)
    try:
        for key in keys:
            lease = wait_for(
                _keepalive_seen(etcd, key),
                what=f"a keepalive of the lease that holds {key}",
                timeout=30,
                interval=0.1,
                max_interval=0.1,
            )
            # A second keepalive of the same lease: no expiry, no new claim.
            wait_for(
                _keepalive_seen(etcd, key, lease),
                what=f"another keepalive of lease {lease:x}",
                timeout=3 * 4,  # lease_ttl 4 s, keepalive every 4/3 s
                interval=0.1,
                max_interval=0.1,
            )
    finally:
        etcd.close()
    assert both_resolve()
    assert all(agent.proc is not None and agent.proc.poll() is None for agent in pair)


def _keepalive_seen(etcd, key: str, lease: int | None = None) -> Callable[[], int | None]:
    """A check: the id of the lease holding ``key`` once its remaining TTL has
    risen above its lowest reading. With ``lease``, the key must stay on that
    lease and the lease alive throughout; without, a new lease starts afresh."""
    seen: dict[str, int] = {}

    def check() -> int | None:
        _, meta = etcd.get(key)
        held = meta.lease_id if meta is not None else None
        if lease is not None:
            assert held == lease, f"{key} left lease {lease:x} (now {held})"
        if held is None or held != seen.get("lease"):
            seen.clear()
            if held is not None:
                seen["lease"] = held
            return None
        ttl = etcd.get_lease_info(held).TTL
        if lease is not None:
            assert ttl > 0, f"lease {lease:x} expired"
        if "lowest" in seen and ttl > seen["lowest"]:
            return held
        seen["lowest"] = min(ttl, seen.get("lowest", ttl))
        return None

    return check


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("imds-unreachable", 3, "instance metadata"),
        ("token-refused", 3, "instance metadata"),
        ("index-out-of-range", 2, "ami-launch-index 5 is out of range"),
    ],
)
def test_bad_identity_exits_nonzero_and_writes_nothing(
    stack, etcd, clean_cluster, agents, tmp_path, case, code, message
):
    index = 5 if case == "index-out-of-range" else 0
    overrides = {}
    if case == "imds-unreachable":
        overrides["imds_endpoint"] = f"http://127.0.0.1:{free_port()}"
    agent = make_agent(
        tmp_path, stack, role="worker", launch_index=index, ip="127.0.34.1", roles=FIVE,
        **overrides,
    )  # fmt: skip
    agents.append(agent)
    if case == "token-refused":
        agent.emulator.set_fault(fail="token-refused")
    agent.start()
    assert agent.wait_exit(60) == code
    last_line = agent.log().strip().splitlines()[-1]
    assert last_line.startswith("Error: ") and message in last_line
    assert "Traceback" not in agent.log()
    assert list(etcd.get_prefix(clean_cluster)) == []
    assert not agent.tf_config_path.exists()


@pytest.mark.tf
def test_agents_start_tensorflow_and_the_chief_trains(stack, clean_cluster, agents, tmp_path):
    """1 chief, 1 ps, 2 workers, each agent on its own loopback address, servers
    started by the agents themselves; the chief trains from the TF_CONFIG its agent
    wrote (addresses: the host's own resolver does not know the zone)."""
    roles = {"chief": 1, "ps": 1, "worker": 2}
    base = free_port_block(4)
    chief = None
    for n, (role, index) in enumerate([("chief", 0), ("ps", 0), ("worker", 0), ("worker", 1)]):
        agent = make_agent(
            tmp_path, stack, role=role, launch_index=index, ip=f"127.0.35.{n + 1}",
            roles=roles, tf_port=base, tf_config_addresses="ips", barrier_timeout=120,
        )  # fmt: skip
        agents.append(agent)
        agent.start(no_server=False)
        chief = chief or agent
    assert chief is not None
    assert chief.wait_exit(240) == 0, chief.log()
    losses = [float(line.split()[-1]) for line in chief.log().splitlines() if " loss " in line]
    print(f"\nchief losses: first {losses[0]:.4f}, last {losses[-1]:.4f} ({len(losses)} reports)")
    assert len(losses) >= 2 and losses[-1] < losses[0] / 2
    for agent in agents[1:]:
        agent.signal(signal.SIGTERM)
        assert agent.wait_exit(30) == 0, agent.log()


@pytest.mark.tf
@pytest.mark.parametrize("preload", [True, False], ids=["preload", "after-barrier"])
def test_a_ps_imports_tensorflow_while_its_barrier_waits(
    stack, clean_cluster, agents, tmp_path, preload
):
    """preload_tensorflow (the default): ps0's TF process has imported TensorFlow
    before its barrier can pass (worker0 is not started yet), and its server
    starts when the barrier passes. False: no TF process until the barrier."""
    roles = {"ps": 1, "worker": 1}
    base = free_port_block(2)
    options = dict(roles=roles, tf_port=base, tf_config_addresses="ips", barrier_timeout=180,
                   preload_tensorflow=preload)  # fmt: skip
    ps = make_agent(tmp_path, stack, role="ps", launch_index=0, ip="127.0.36.1", **options)
    agents.append(ps)
    ps.start(no_server=False)
    if preload:
        wait_for(lambda: tfserver.IMPORTED in ps.log() or None,
                 what="ps0 to import TensorFlow", timeout=180)  # fmt: skip
    else:
        wait_for(lambda: "preload_tensorflow is false" in ps.log() or None,
                 what="ps0 to put TensorFlow off until the barrier", timeout=60)  # fmt: skip
    assert not ps.tf_config_path.exists()  # the barrier has not passed: worker0 is not up
    worker = make_agent(tmp_path, stack, role="worker", launch_index=0, ip="127.0.36.2", **options)
    agents.append(worker)
    worker.start(no_server=False)
    for agent in (ps, worker):
        wait_for(lambda agent=agent: "s after the barrier passed" in agent.log() or None,
                 what=f"{agent.name}'s TF server to listen", timeout=180)  # fmt: skip
    log = ps.log()
    assert (tfserver.IMPORTED in log) is preload
    if preload:
        assert log.index(tfserver.IMPORTED) < log.index("barrier passed")
    for agent in (ps, worker):
        agent.signal(signal.SIGTERM)
        assert agent.wait_exit(30) == 0, agent.log()
