"""The pinned etcd and CoreDNS releases, in one place.

`scripts/etcd/go.mod` and `coredns/go.mod` pin the same versions for the local
builds, but an installed wheel carries neither file, so the versions live here
as constants and a test (tests/test_stage_artifacts.py) keeps them equal to
the go.mod pins.
"""

ETCD_VERSION = "3.7.3"
COREDNS_VERSION = "1.14.7"

#: Where each project publishes its release assets (GitHub releases).
ETCD_RELEASE_URL = "https://github.com/etcd-io/etcd/releases/download"
COREDNS_RELEASE_URL = "https://github.com/coredns/coredns/releases/download"

#: Instance architectures (Go's names), and the ELF machine numbers that mark them.
ARCHES = ("amd64", "arm64")
ELF_MACHINES = {62: "amd64", 183: "arm64"}  # EM_X86_64, EM_AARCH64
