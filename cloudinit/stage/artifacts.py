"""The static binaries an instance runs (etcd, etcdctl, CoreDNS), for one architecture.

Found locally first: an explicit folder, a checkout's `.tools/bin` (what
`make setup` builds), then `PATH`. A file counts only if it is a static ELF
executable for the wanted architecture, because an instance image has
neither the operator's libc nor, for arm64 instances, its architecture.

An operator without Go gets the same binaries from the pinned upstream
release archives instead, downloaded on the operator's machine, checked
against the checksum file each release publishes next to its assets, cached,
and unpacked. Instances never download from a release site: they fetch the
staged copies from the cluster bucket.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shutil
import struct
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tfcluster.cloudinit.stage import pins
from tfcluster.cloudinit.stage.errors import StageError
from tfcluster.cloudinit.stage.manifest import StagedObject, sha256_file, stage_file

#: What an instance needs, and which release archive carries each.
BINARIES = ("etcd", "etcdctl", "coredns")
_PROJECT = {"etcd": "etcd", "etcdctl": "etcd", "coredns": "coredns"}

#: Upper bounds on what a download may be; the real archives are ~25 MB.
MAX_ARCHIVE_BYTES = 256 << 20
MAX_CHECKSUM_BYTES = 1 << 20
DOWNLOAD_TIMEOUT = 60.0

_CHUNK = 1 << 20
_PT_INTERP = 3
_SUM_LINE = re.compile(r"([0-9a-fA-F]{64})(?:\s+\*?(\S.*))?")


class BinaryNotFound(StageError):
    """No usable binary for the architecture was found locally (and none was downloaded)."""


class DownloadFailed(StageError):
    """A release asset could not be fetched (HTTP error, time-out, too large)."""


class ChecksumMissing(StageError):
    """The release's checksum file has no entry for the archive: it is not used."""


class ChecksumMismatch(StageError):
    """The archive's SHA-256 differs from the release's checksum file: it is not used."""


class BadArchive(StageError):
    """The archive verified but does not hold the expected binaries."""


def check_arch(arch: str) -> str:
    """Return `arch` if instances can run it (Go's names: amd64, arm64), else raise."""
    if arch not in pins.ARCHES:
        raise StageError(f"unknown architecture {arch!r}: use one of {', '.join(pins.ARCHES)}")
    return arch


@dataclass(frozen=True)
class ElfInfo:
    """What the ELF header says about a file: enough to know if an instance can run it."""

    arch: str | None  # Go's name, None for a machine we do not launch
    static: bool  # no program interpreter: needs no libc on the image


def elf_info(path: Path) -> ElfInfo | None:
    """Read the ELF header of `path`; None if it is not a 64-bit little-endian ELF file.

    A static Go build has no PT_INTERP program header; a cgo or distribution
    build names the dynamic loader there, which a FROM-scratch image or a
    different distribution may not have.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return None
            (machine,) = struct.unpack_from("<H", head, 18)
            (phoff,) = struct.unpack_from("<Q", head, 32)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            static = True
            if phnum and phentsize >= 4:
                f.seek(phoff)
                table = f.read(phentsize * phnum)
                for i in range(min(phnum, len(table) // phentsize)):
                    (ptype,) = struct.unpack_from("<I", table, i * phentsize)
                    if ptype == _PT_INTERP:
                        static = False
                        break
    except OSError:
        return None
    return ElfInfo(pins.ELF_MACHINES.get(machine), static)


def search_dirs(
    binary_dir: Path | None = None,
    checkout: Path | None = None,
    path_env: str | None = None,
) -> list[Path]:
    """The folders searched, in order: `binary_dir`, `<checkout>/.tools/bin`, then PATH.

    `path_env` defaults to the process's PATH; pass "" to leave PATH out.
    """
    dirs: list[Path] = []
    if binary_dir is not None:
        dirs.append(Path(binary_dir))
    if checkout is not None:
        dirs.append(Path(checkout) / ".tools" / "bin")
    env = os.environ.get("PATH", "") if path_env is None else path_env
    dirs.extend(Path(p) for p in env.split(os.pathsep) if p)
    return list(dict.fromkeys(dirs))  # first occurrence wins


def _why_unusable(path: Path, arch: str) -> str | None:
    """None if `path` is a static ELF executable for `arch`, else the reason it is not."""
    if not os.access(path, os.X_OK):
        return f"{path} is not executable"
    info = elf_info(path)
    if info is None:
        return f"{path} is not a 64-bit ELF executable"
    if info.arch != arch:
        return f"{path} is for {info.arch or 'another machine'}, not {arch}"
    if not info.static:
        return f"{path} is dynamically linked (build with CGO_ENABLED=0)"
    return None


def find_local(
    arch: str, dirs: Iterable[Path], names: Iterable[str] = BINARIES
) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """Look for each binary in `dirs`; return (found, rejected).

    `found` maps a name to the first usable file; `rejected` maps each name
    not found to the reasons files of that name were passed over, so the
    error can say "found /usr/bin/etcd, but it is dynamically linked".
    """
    check_arch(arch)
    dirs = list(dirs)
    found: dict[str, Path] = {}
    rejected: dict[str, list[str]] = {}
    for name in names:
        reasons: list[str] = []
        for d in dirs:
            candidate = d / name
            if not candidate.is_file():
                continue
            why = _why_unusable(candidate, arch)
            if why is None:
                found[name] = candidate
                break
            reasons.append(why)
        else:
            rejected[name] = reasons
    return found, rejected


def require_local(
    arch: str, dirs: Iterable[Path], names: Iterable[str] = BINARIES
) -> dict[str, Path]:
    """Every binary in `names` for `arch` from `dirs`, or one line naming what is missing."""
    dirs = list(dirs)
    found, rejected = find_local(arch, dirs, names)
    if rejected:
        raise BinaryNotFound(_not_found_message(arch, dirs, rejected))
    return found


def _not_found_message(arch: str, dirs: list[Path], rejected: Mapping[str, list[str]]) -> str:
    """One line: the missing names, why near-misses were refused, where we looked, the fixes."""
    reasons = [r for rs in rejected.values() for r in rs]
    shown = ", ".join(str(d) for d in dirs[:4]) + (", ..." if len(dirs) > 4 else "")
    build = "make setup" if arch == "amd64" else f"TFCLUSTER_GOARCH={arch} scripts/install-tools"
    return (
        f"no static linux/{arch} {', '.join(rejected)} found"
        + (f" ({'; '.join(reasons)})" if reasons else "")
        + f" in {shown or 'no folder'}: run '{build}' (needs Go)"
        " or let tfcluster download the pinned releases"
    )


# --- the pinned upstream releases -------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """One upstream release archive and the checksum file published beside it.

    Published names (checked against each project's release scripts):
    etcd:    v<V>/etcd-v<V>-linux-<arch>.tar.gz, one `SHA256SUMS` for all assets,
             binaries under the folder etcd-v<V>-linux-<arch>/;
    CoreDNS: v<V>/coredns_<V>_linux_<arch>.tgz with coredns_<V>_linux_<arch>.tgz.sha256,
             the binary `coredns` at the archive's top.
    Both checksum files are `sha256sum` output: "<hex>  <file name>".
    """

    project: str
    version: str
    arch: str
    base_url: str
    archive: str
    checksums: str
    members: Mapping[str, str] = field(default_factory=dict)  # binary name -> path in archive

    def url(self, filename: str) -> str:
        """The URL of one asset of this release."""
        return f"{self.base_url.rstrip('/')}/v{self.version}/{filename}"

    @property
    def folder(self) -> str:
        """The cache folder for this release's unpacked binaries."""
        return f"{self.project}-{self.version}-linux-{self.arch}"


def etcd_release(arch: str, base_url: str = pins.ETCD_RELEASE_URL) -> Release:
    """The pinned etcd release for `arch` (etcd and etcdctl)."""
    v = pins.ETCD_VERSION
    top = f"etcd-v{v}-linux-{check_arch(arch)}"
    return Release(
        "etcd", v, arch, base_url, f"{top}.tar.gz", "SHA256SUMS",
        {"etcd": f"{top}/etcd", "etcdctl": f"{top}/etcdctl"},
    )  # fmt: skip


def coredns_release(arch: str, base_url: str = pins.COREDNS_RELEASE_URL) -> Release:
    """The pinned CoreDNS release for `arch`."""
    v = pins.COREDNS_VERSION
    archive = f"coredns_{v}_linux_{check_arch(arch)}.tgz"
    return Release(
        "coredns", v, arch, base_url, archive, f"{archive}.sha256", {"coredns": "coredns"}
    )


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """tfcluster's cache: $XDG_CACHE_HOME/tfcluster, else ~/.cache/tfcluster."""
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(base) / "tfcluster"


def _opener(url: str) -> urllib.request.OpenerDirector:
    """An opener that honours proxy settings, except for loopback addresses.

    A proxy cannot reach the operator's own loopback, and the tests serve
    stand-in releases there.
    """
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


def _download(url: str, dest: Path, limit: int, timeout: float) -> str:
    """Stream `url` into `dest` (at most `limit` bytes) and return its SHA-256.

    Every read has the time-out; a body over the limit stops the download,
    so a wrong URL cannot fill the disk.
    """
    digest = hashlib.sha256()
    size = 0
    try:
        with _opener(url).open(url, timeout=timeout) as resp, open(dest, "wb") as out:
            while chunk := resp.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise DownloadFailed(f"{url}: larger than {limit} bytes; not used")
                digest.update(chunk)
                out.write(chunk)
    except urllib.error.HTTPError as e:
        raise DownloadFailed(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadFailed(f"{url}: {reason}") from None
    return digest.hexdigest()


def parse_checksums(text: str, filename: str) -> str | None:
    """The hex SHA-256 that a `sha256sum`-style file gives for `filename`, or None.

    Accepts "<hex>  name", "<hex> *name" (binary mode) and "./name"; a line
    holding only a hash counts when it is the file's only entry, as a per-asset
    `.sha256` file may be written that way.
    """
    bare: list[str] = []
    named = 0
    for line in text.splitlines():
        m = _SUM_LINE.fullmatch(line.strip())
        if not m:
            continue
        digest, name = m.group(1).lower(), m.group(2)
        if name is None:
            bare.append(digest)
            continue
        named += 1
        if name.strip().removeprefix("./") == filename:
            return digest
    return bare[0] if len(bare) == 1 and named == 0 else None


def _stamp(folder: Path) -> Path:
    """The file recording what a cache folder was verified to hold."""
    return folder / "verified.json"


def _cached(folder: Path, release: Release) -> dict[str, Path] | None:
    """The cached binaries of `release` if present and still equal to what was verified."""
    try:
        stamp = json.loads(_stamp(folder).read_text())
    except (OSError, ValueError):
        return None
    out: dict[str, Path] = {}
    for name in release.members:
        path = folder / name
        want = stamp.get("binaries", {}).get(name)
        if not path.is_file() or want is None or sha256_file(path)[0] != want:
            return None
        out[name] = path
    return out


def fetch_release(
    release: Release,
    cache_dir: Path | None = None,
    timeout: float = DOWNLOAD_TIMEOUT,
    max_bytes: int = MAX_ARCHIVE_BYTES,
) -> dict[str, Path]:
    """The binaries of `release`, from the cache or downloaded, checked and unpacked.

    The archive is used only if its SHA-256 equals the entry for it in the
    release's checksum file; otherwise nothing is cached and the error says
    which check failed. The checksum file comes from the same site as the
    archive: it guards against a corrupt or truncated download and a wrong
    asset, not against a compromised release.
    """
    root = (cache_dir or cache_root()) / "releases"
    folder = root / release.folder
    hit = _cached(folder, release)
    if hit is not None:
        return hit
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        work = Path(tmp)
        sums_path = work / "checksums"
        _download(release.url(release.checksums), sums_path, MAX_CHECKSUM_BYTES, timeout)
        want = parse_checksums(sums_path.read_text(errors="replace"), release.archive)
        if want is None:
            raise ChecksumMissing(
                f"{release.url(release.checksums)} has no entry for {release.archive}; not used"
            )
        archive = work / release.archive
        got = _download(release.url(release.archive), archive, max_bytes, timeout)
        if got != want:
            raise ChecksumMismatch(
                f"{release.archive}: sha256 {got} does not match {want} from "
                f"{release.checksums}; not used, nothing cached"
            )
        unpacked = work / "unpacked"
        unpacked.mkdir()
        binaries = _unpack(archive, release, unpacked)
        _stamp(unpacked).write_text(
            json.dumps({"archive": release.archive, "sha256": got, "binaries": binaries}, indent=1)
        )
        shutil.rmtree(folder, ignore_errors=True)
        # Another `up` may have unpacked the same release meanwhile: then keep
        # theirs, which is used below only if it verifies.
        with contextlib.suppress(OSError):
            os.replace(unpacked, folder)
    hit = _cached(folder, release)
    if hit is None:
        raise BadArchive(f"{folder}: cache folder changed while unpacking {release.archive}")
    return hit


def _unpack(archive: Path, release: Release, dest: Path) -> dict[str, str]:
    """Extract only the wanted members, as regular files, and check they fit the arch.

    Nothing else in the archive is written, so a member path like ../x cannot
    escape the cache.
    """
    digests: dict[str, str] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for name, member_path in release.members.items():
                try:
                    member = tar.getmember(member_path)
                except KeyError:
                    raise BadArchive(f"{release.archive} has no {member_path}") from None
                src = tar.extractfile(member) if member.isreg() else None
                if src is None:
                    raise BadArchive(f"{release.archive}: {member_path} is not a regular file")
                target = dest / name
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
                target.chmod(0o755)
                why = _why_unusable(target, release.arch)
                if why is not None:
                    raise BadArchive(f"{release.archive}: {why.replace(str(target), member_path)}")
                digests[name] = sha256_file(target)[0]
    except (tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, StageError):
            raise
        raise BadArchive(f"{release.archive}: cannot unpack ({e})") from None
    return digests


# --- what the provisioning code calls -----------------------------------------------------------


def instance_binaries(
    arch: str,
    *,
    binary_dir: Path | None = None,
    checkout: Path | None = None,
    path_env: str | None = None,
    download: bool = False,
    cache_dir: Path | None = None,
    etcd_url: str = pins.ETCD_RELEASE_URL,
    coredns_url: str = pins.COREDNS_RELEASE_URL,
    timeout: float = DOWNLOAD_TIMEOUT,
) -> dict[str, Path]:
    """etcd, etcdctl and coredns for `arch`: local files first, then (if allowed) releases.

    With `download` false a missing binary is a one-line BinaryNotFound; with
    it true, only the releases that carry a missing binary are fetched.
    """
    dirs = search_dirs(binary_dir, checkout, path_env)
    found, rejected = find_local(arch, dirs)
    if not rejected:
        return found
    if not download:
        raise BinaryNotFound(_not_found_message(arch, dirs, rejected))
    projects = sorted({_PROJECT[name] for name in rejected})
    for project in projects:
        release = (
            etcd_release(arch, etcd_url)
            if project == "etcd"
            else coredns_release(arch, coredns_url)
        )
        fetched = fetch_release(release, cache_dir, timeout)
        found.update({n: p for n, p in fetched.items() if n in rejected})
    return {name: found[name] for name in BINARIES}


def stage_binaries(arch: str, binaries: Mapping[str, Path]) -> list[StagedObject]:
    """The binaries as staged objects named `<binary>-<arch>`, saved as `<binary>`.

    The architecture is in the name so one manifest can carry amd64 and arm64
    builds for a cluster with both kinds of instance.
    """
    check_arch(arch)
    return [stage_file(f"{name}-{arch}", Path(binaries[name]), name) for name in sorted(binaries)]
