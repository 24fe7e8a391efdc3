"""The Corefile: one template (templates/Corefile.j2) for instances, the local
stack, the test fixtures and docker-compose alike."""

from __future__ import annotations

from dataclasses import dataclass

from tfcluster.cloudinit.render.templating import render
from tfcluster.discovery import records


@dataclass(frozen=True)
class CorefileSettings:
    """What differs between the places CoreDNS runs.

    ``upstreams`` empty means CoreDNS answers only the cluster zone (REFUSED
    for anything else): the right default wherever nothing should leave the
    machine, such as tests and the local stack. Instances forward to the VPC
    resolver (``Layout.dns_forward``): systemd-resolved asks their CoreDNS for
    names outside the zone too.
    """

    cluster: str
    zone: str
    etcd_endpoints: tuple[str, ...]
    dns_bind: str = "127.0.0.1"
    dns_port: int = 53
    ready_addr: str = "127.0.0.1:8181"
    health_addr: str = "127.0.0.1:8080"
    record_ttl: int = 5
    upstreams: tuple[str, ...] = ()
    query_log: bool = False


def render_corefile(settings: CorefileSettings) -> str:
    return render(
        "Corefile.j2",
        cluster=settings.cluster,
        zone=settings.zone,
        srv_name=records.srv_name(settings.zone),
        etcd_path=records.cluster_path(settings.cluster),
        etcd_endpoints=settings.etcd_endpoints,
        dns_bind=settings.dns_bind,
        dns_port=settings.dns_port,
        ready_addr=settings.ready_addr,
        health_addr=settings.health_addr,
        record_ttl=settings.record_ttl,
        upstreams=settings.upstreams,
        query_log=settings.query_log,
    )


# coredns/Corefile, the file docker-compose mounts. The containers use the
# host's network, so this is the local stack's Corefile (StackSettings()):
# loopback only, the zone only, etcd on 127.0.0.1:23790.
DOCKER_COMPOSE = CorefileSettings(
    cluster="local",
    zone="tensorflow.local",
    etcd_endpoints=("http://127.0.0.1:23790",),
    dns_bind="127.0.0.1",
    dns_port=15353,
    ready_addr="127.0.0.1:18181",
    health_addr="127.0.0.1:18080",
)


if __name__ == "__main__":
    # Regenerates coredns/Corefile: python -m tfcluster.cloudinit.render.corefile > coredns/Corefile
    print(render_corefile(DOCKER_COMPOSE), end="")
