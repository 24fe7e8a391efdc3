"""The instance binaries: found locally, or fetched from a stand-in release on loopback.

The release tests serve archives and checksum files that the test itself
makes, from an http.server on 127.0.0.1, laid out as the real releases are
(see artifacts.Release); nothing is fetched from anywhere else.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import shutil
import socket
import struct
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import pinned_version
from tfcluster.cloudinit.stage import artifacts, pins
from tfcluster.cloudinit.stage.manifest import object_key

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / ".tools" / "bin"
EV, CV = pins.ETCD_VERSION, pins.COREDNS_VERSION


def fake_elf(machine: int, interp: bool = False, payload: bytes = b"") -> bytes:
    """A minimal 64-bit little-endian ELF image: header, one program header, payload.

    Enough for the header checks (machine, PT_INTERP or not); it never runs.
    """
    phoff, phentsize = 64, 56
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<HH", header, 16, 2, machine)  # ET_EXEC, e_machine
    struct.pack_into("<Q", header, 32, phoff)
    struct.pack_into("<HH", header, 54, phentsize, 1)
    phdr = bytearray(phentsize)
    struct.pack_into("<I", phdr, 0, 3 if interp else 1)  # PT_INTERP or PT_LOAD
    return bytes(header + phdr) + payload


AMD64, ARM64 = 62, 183


def write_exe(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o755)
    return path


def test_versions_equal_the_go_mod_pins() -> None:
    assert (
        pinned_version("scripts/etcd/go.mod", "go.etcd.io/etcd/server/v3").removeprefix("v")
        == pins.ETCD_VERSION
    )
    assert (
        pinned_version("coredns/go.mod", "github.com/coredns/coredns").removeprefix("v")
        == pins.COREDNS_VERSION
    )


def test_release_names_follow_the_published_layout() -> None:
    etcd = artifacts.etcd_release("arm64", "http://h/base/")
    assert etcd.url(etcd.archive) == f"http://h/base/v{EV}/etcd-v{EV}-linux-arm64.tar.gz"
    assert etcd.url(etcd.checksums) == f"http://h/base/v{EV}/SHA256SUMS"
    assert etcd.members["etcdctl"] == f"etcd-v{EV}-linux-arm64/etcdctl"
    core = artifacts.coredns_release("amd64", "http://h/base")
    assert core.url(core.archive) == f"http://h/base/v{CV}/coredns_{CV}_linux_amd64.tgz"
    assert core.url(core.checksums) == f"http://h/base/v{CV}/coredns_{CV}_linux_amd64.tgz.sha256"
    assert core.members == {"coredns": "coredns"}
    with pytest.raises(artifacts.StageError, match="unknown architecture 'x86_64'"):
        artifacts.etcd_release("x86_64")


def test_elf_header_checks_on_the_real_builds_and_on_made_files(tmp_path: Path) -> None:
    for name in artifacts.BINARIES:
        if not (TOOLS / name).exists():
            pytest.fail(f"{TOOLS / name} missing: run make setup")
        assert artifacts.elf_info(TOOLS / name) == artifacts.ElfInfo("amd64", True)
    dynamic = write_exe(tmp_path / "dyn", fake_elf(AMD64, interp=True))
    assert artifacts.elf_info(dynamic) == artifacts.ElfInfo("amd64", False)
    assert artifacts.elf_info(write_exe(tmp_path / "arm", fake_elf(ARM64))) == artifacts.ElfInfo(
        "arm64", True
    )
    assert artifacts.elf_info(write_exe(tmp_path / "sh", b"#!/bin/sh\n")) is None


def test_local_binaries_from_the_checkout() -> None:
    found = artifacts.instance_binaries("amd64", checkout=REPO, path_env="")
    assert found == {name: REPO / ".tools" / "bin" / name for name in artifacts.BINARIES}
    staged = artifacts.stage_binaries("amd64", found)
    assert [o.name for o in staged] == ["coredns-amd64", "etcd-amd64", "etcdctl-amd64"]
    for obj in staged:
        assert obj.key == object_key(
            hashlib.sha256(obj.path.read_bytes()).hexdigest(), obj.filename
        )


def test_search_order_and_refusals_name_what_is_missing(tmp_path: Path) -> None:
    explicit, on_path = tmp_path / "explicit", tmp_path / "path"
    write_exe(explicit / "etcd", fake_elf(AMD64, interp=True))  # dynamic: passed over
    write_exe(on_path / "etcd", fake_elf(AMD64))
    write_exe(on_path / "etcdctl", fake_elf(ARM64))  # wrong architecture
    (on_path / "coredns").write_bytes(fake_elf(AMD64))  # not executable
    with pytest.raises(artifacts.BinaryNotFound) as err:
        artifacts.instance_binaries("amd64", binary_dir=explicit, path_env=str(on_path))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("no static linux/amd64 etcdctl, coredns found (")
    assert f"{on_path / 'etcdctl'} is for arm64, not amd64" in message
    assert f"{on_path / 'coredns'} is not executable" in message
    assert f"in {explicit}, {on_path}:" in message
    assert message.endswith(
        ": run 'make setup' (needs Go) or let tfcluster download the pinned releases"
    )
    with pytest.raises(
        artifacts.BinaryNotFound, match="run 'TFCLUSTER_GOARCH=arm64 scripts/install-tools'"
    ):
        artifacts.instance_binaries("arm64", binary_dir=explicit, path_env="")
    found, rejected = artifacts.find_local("amd64", [explicit, on_path], ["etcd"])
    assert found == {"etcd": on_path / "etcd"} and not rejected
    assert "dynamically linked" in artifacts.find_local("amd64", [explicit], ["etcd"])[1]["etcd"][0]


# --- a stand-in release site on loopback -------------------------------------------------------


class Site:
    """Files served over HTTP on 127.0.0.1 from a folder, counting each request path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        site = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

            def do_GET(self) -> None:
                site.requests.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/releases"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def release_dir(self, version: str) -> Path:
        d = self.root / "releases" / f"v{version}"
        d.mkdir(parents=True, exist_ok=True)
        return d


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path / "site")
    s.thread.start()
    try:
        yield s
    finally:
        s.server.shutdown()
        s.server.server_close()
        s.thread.join(timeout=5)


def targz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def publish_etcd(site: Site, arch: str, machine: int, sums: str | None = None) -> bytes:
    """A stand-in etcd release: the archive with its folder, and SHA256SUMS (or `sums`)."""
    top = f"etcd-v{EV}-linux-{arch}"
    archive = targz(
        {
            f"{top}/etcd": fake_elf(machine, payload=b"etcd"),
            f"{top}/etcdctl": fake_elf(machine, payload=b"etcdctl"),
            f"{top}/etcdutl": fake_elf(machine, payload=b"etcdutl"),
            f"{top}/README.md": b"readme\n",
        }
    )
    d = site.release_dir(EV)
    (d / f"{top}.tar.gz").write_bytes(archive)
    digest = hashlib.sha256(archive).hexdigest()
    other = hashlib.sha256(b"other").hexdigest()
    (d / "SHA256SUMS").write_text(
        sums
        if sums is not None
        else f"{other}  etcd-v{EV}-darwin-amd64.zip\n{digest}  {top}.tar.gz\n"
    )
    return archive


def publish_coredns(site: Site, arch: str, machine: int) -> bytes:
    name = f"coredns_{CV}_linux_{arch}.tgz"
    archive = targz({"coredns": fake_elf(machine, payload=b"coredns")})
    d = site.release_dir(CV)
    (d / name).write_bytes(archive)
    (d / f"{name}.sha256").write_text(f"{hashlib.sha256(archive).hexdigest()}  {name}\n")
    return archive


def test_download_checks_unpacks_and_caches(site: Site, tmp_path: Path) -> None:
    publish_etcd(site, "arm64", ARM64)
    publish_coredns(site, "arm64", ARM64)
    cache = tmp_path / "cache"

    def fetch() -> dict[str, Path]:
        return artifacts.instance_binaries(
            "arm64", path_env="", download=True, cache_dir=cache,
            etcd_url=site.url, coredns_url=site.url, timeout=10,
        )  # fmt: skip

    got = fetch()
    assert got == {
        "etcd": cache / "releases" / f"etcd-{EV}-linux-arm64" / "etcd",
        "etcdctl": cache / "releases" / f"etcd-{EV}-linux-arm64" / "etcdctl",
        "coredns": cache / "releases" / f"coredns-{CV}-linux-arm64" / "coredns",
    }
    assert got["etcdctl"].read_bytes().endswith(b"etcdctl")
    assert not (got["etcd"].parent / "etcdutl").exists()  # only what instances need
    assert sorted(site.requests) == sorted(
        f"/releases/v{v}/{f}"
        for v, f in [
            (EV, "SHA256SUMS"), (EV, f"etcd-v{EV}-linux-arm64.tar.gz"),
            (CV, f"coredns_{CV}_linux_arm64.tgz.sha256"), (CV, f"coredns_{CV}_linux_arm64.tgz"),
        ]
    )  # fmt: skip
    site.requests.clear()
    assert fetch() == got
    assert site.requests == []  # warm: from the cache, no request

    # A cached binary changed behind our back is fetched again, not trusted.
    got["coredns"].write_bytes(fake_elf(ARM64, payload=b"tampered"))
    assert fetch()["coredns"].read_bytes().endswith(b"coredns")
    assert site.requests == [
        f"/releases/v{CV}/coredns_{CV}_linux_arm64.tgz.sha256",
        f"/releases/v{CV}/coredns_{CV}_linux_arm64.tgz",
    ]


def test_checksum_mismatch_is_refused_and_nothing_cached(site: Site, tmp_path: Path) -> None:
    top = f"etcd-v{EV}-linux-amd64"
    wrong = hashlib.sha256(b"not the archive").hexdigest()
    publish_etcd(site, "amd64", AMD64, sums=f"{wrong}  {top}.tar.gz\n")
    cache = tmp_path / "cache"
    with pytest.raises(artifacts.ChecksumMismatch) as err:
        artifacts.fetch_release(artifacts.etcd_release("amd64", site.url), cache, timeout=10)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{top}.tar.gz: sha256 ")
    assert f"does not match {wrong} from SHA256SUMS; not used, nothing cached" in message
    assert list((cache / "releases").iterdir()) == []


def test_missing_checksum_entry_is_refused(site: Site, tmp_path: Path) -> None:
    # As happened upstream (etcd v3.5.18's SHA256SUMS listed only one asset).
    other = hashlib.sha256(b"x").hexdigest()
    publish_etcd(site, "amd64", AMD64, sums=f"{other}  etcd-v{EV}-darwin-amd64.zip\n")
    with pytest.raises(artifacts.ChecksumMissing, match=f"has no entry for etcd-v{EV}-linux-amd64"):
        artifacts.fetch_release(
            artifacts.etcd_release("amd64", site.url), tmp_path / "cache", timeout=10
        )
    assert site.requests == [f"/releases/v{EV}/SHA256SUMS"]  # the archive was never fetched
    assert list((tmp_path / "cache" / "releases").iterdir()) == []


def test_archive_for_another_architecture_is_refused(site: Site, tmp_path: Path) -> None:
    publish_coredns(site, "arm64", AMD64)  # checksum right, contents wrong
    with pytest.raises(artifacts.BadArchive, match="coredns is for amd64, not arm64"):
        artifacts.fetch_release(
            artifacts.coredns_release("arm64", site.url), tmp_path / "cache", timeout=10
        )
    assert list((tmp_path / "cache" / "releases").iterdir()) == []


def test_missing_asset_is_one_line(site: Site, tmp_path: Path) -> None:
    with pytest.raises(artifacts.DownloadFailed, match=r"SHA256SUMS: HTTP 404"):
        artifacts.fetch_release(
            artifacts.etcd_release("amd64", site.url), tmp_path / "cache", timeout=10
        )


def test_checksum_file_formats() -> None:
    h = "ab" * 32
    assert artifacts.parse_checksums(f"{h}  a.tgz\n", "a.tgz") == h
    assert artifacts.parse_checksums(f"{h.upper()} *a.tgz\n", "a.tgz") == h
    assert artifacts.parse_checksums(f"{h}  ./a.tgz\n", "a.tgz") == h
    assert artifacts.parse_checksums(f"{h}\n", "a.tgz") == h  # a bare per-asset hash
    assert artifacts.parse_checksums(f"{h}  b.tgz\n", "a.tgz") is None
    assert artifacts.parse_checksums("", "a.tgz") is None


def test_cache_root_follows_xdg() -> None:
    assert artifacts.cache_root({"XDG_CACHE_HOME": "/x"}) == Path("/x/tfcluster")
    assert artifacts.cache_root({"HOME": "/home/u"}) == Path("/home/u/.cache/tfcluster")


def test_oversized_archive_is_refused(site: Site, tmp_path: Path) -> None:
    publish_coredns(site, "amd64", AMD64)
    with pytest.raises(artifacts.DownloadFailed, match=r"larger than 100 bytes; not used$"):
        artifacts.fetch_release(
            artifacts.coredns_release("amd64", site.url), tmp_path / "cache", 10, max_bytes=100
        )
    assert list((tmp_path / "cache" / "releases").iterdir()) == []


def test_a_silent_server_is_given_up_on_after_the_timeout(tmp_path: Path) -> None:
    # The kernel accepts the connection into the backlog; nobody ever answers.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(artifacts.DownloadFailed, match="timed out"):
            artifacts.fetch_release(
                artifacts.etcd_release("amd64", url), tmp_path / "cache", timeout=0.5
            )
        assert time.monotonic() - start < 5


def test_checksum_files_as_the_upstream_commands_write_them(site: Site, tmp_path: Path) -> None:
    """SHA256SUMS as etcd's release.sh writes it, .sha256 as CoreDNS's release workflow does."""
    for tool in ("shasum", "sha256sum"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    publish_etcd(site, "amd64", AMD64)
    publish_coredns(site, "amd64", AMD64)
    etcd_dir, core_dir = site.release_dir(EV), site.release_dir(CV)
    etcd_archive = f"etcd-v{EV}-linux-amd64.tar.gz"
    core_archive = f"coredns_{CV}_linux_amd64.tgz"
    # etcd: ls . | grep -E '\.tar.gz$|\.zip$' | xargs shasum -a 256 > ./SHA256SUMS
    (etcd_dir / "SHA256SUMS").write_bytes(
        subprocess.run(["shasum", "-a", "256", etcd_archive], cwd=etcd_dir,
                       check=True, capture_output=True, timeout=30).stdout
    )  # fmt: skip
    # CoreDNS: sha256sum $asset > $asset.sha256
    (core_dir / f"{core_archive}.sha256").write_bytes(
        subprocess.run(["sha256sum", core_archive], cwd=core_dir,
                       check=True, capture_output=True, timeout=30).stdout
    )  # fmt: skip
    got = artifacts.instance_binaries(
        "amd64", path_env="", download=True, cache_dir=tmp_path / "cache",
        etcd_url=site.url, coredns_url=site.url, timeout=10,
    )  # fmt: skip
    assert sorted(got) == ["coredns", "etcd", "etcdctl"]
