"""A wheel of this tfcluster, and the pins its tests ran with, for instances to install.

From a checkout (an editable install, or the source tree on sys.path) the
wheel is built by pip with setuptools, from a copy of exactly the files that
go into it, with SOURCE_DATE_EPOCH fixed. Measured: two builds of the same
files give the same bytes (file times, build folders and paths do not leak
in), so the wheel's key in the bucket changes only when the code does.
Builds are cached under the digest of those source files, so an unchanged
tree is not built again.

From an installed (non-editable) wheel there is no source tree: the
installed distribution's own files, as its RECORD lists them, are packed
back into a wheel, after checking each against the digest RECORD holds.

The constraints staged beside the wheel are the checkout's constraints.txt
(the pins `make setup` and the tests use) or, without a checkout, the
versions installed in the running environment, so the instance's pip
installs what the operator ran.
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from tfcluster.cloudinit.stage.errors import StageError
from tfcluster.cloudinit.stage.manifest import StagedObject, stage_file

DIST_NAME = "tfcluster"
#: Every file time in the wheel: 1980-01-01, the earliest a zip can hold.
SOURCE_DATE_EPOCH = 315532800
BUILD_TIMEOUT = 300.0
#: setuptools carries bdist_wheel itself from this version on (no `wheel` package needed).
MIN_SETUPTOOLS = (70, 1)
CONSTRAINTS_FILENAME = "constraints.txt"

_TOP_FILES = ("setup.cfg", "pyproject.toml", "README.md", "setup.py", "MANIFEST.in")
_SKIP_DIRS = {"__pycache__", ".git", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
_SKIP_SUFFIXES = (".pyc", ".pyo")
# Installer bookkeeping that pip writes into dist-info and that no wheel carries.
_NOT_IN_WHEEL = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}


class WheelError(StageError):
    """The wheel could not be built or packed."""


def find_checkout(start: Path | None = None) -> Path | None:
    """The source tree this tfcluster runs from, or None for an installed wheel.

    The package folders sit at the top of the checkout (setup.cfg's
    package_dir), so the folder above `tfcluster.cloudinit` holds setup.cfg
    when the code runs from a checkout.
    """
    here = Path(start) if start is not None else Path(__file__).resolve().parent.parent
    root = here.parent
    setup_cfg = root / "setup.cfg"
    if not setup_cfg.is_file():
        return None
    parser = configparser.ConfigParser()
    try:
        parser.read(setup_cfg)
    except configparser.Error:
        return None
    return root if parser.get("metadata", "name", fallback="") == DIST_NAME else None


def _package_dirs(root: Path) -> list[str]:
    """The folders setup.cfg maps packages from (package_dir values), sorted."""
    parser = configparser.ConfigParser()
    parser.read(root / "setup.cfg")
    raw = parser.get("options", "package_dir", fallback="")
    dirs = {line.split("=", 1)[1].strip() for line in raw.splitlines() if "=" in line}
    return sorted(d for d in dirs if d and (root / d).is_dir())


def source_files(root: Path) -> list[str]:
    """Relative paths (with /) of every file a wheel build reads, sorted.

    The top-level build files plus the package folders, without caches and
    bytecode: nothing outside this list can change the wheel, and a change to
    anything in it starts a new build.
    """
    root = Path(root)
    files = [name for name in _TOP_FILES if (root / name).is_file()]
    for top in _package_dirs(root):
        for folder, dirs, names in os.walk(root / top):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info"))
            rel = Path(folder).relative_to(root).as_posix()
            files.extend(f"{rel}/{n}" for n in names if not n.endswith(_SKIP_SUFFIXES))
    return sorted(files)


def source_digest(root: Path) -> str:
    """One SHA-256 over the names and contents of `source_files`: the build cache key."""
    digest = hashlib.sha256()
    for rel in source_files(root):
        data = (Path(root) / rel).read_bytes()
        digest.update(f"{rel}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _check_setuptools() -> None:
    """Refuse early, in one line, when setuptools cannot build a wheel without downloading."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        version = "none"
    numbers = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if numbers < MIN_SETUPTOOLS:
        need = ".".join(map(str, MIN_SETUPTOOLS))
        raise WheelError(
            f"building the tfcluster wheel needs setuptools>={need} in {sys.prefix} "
            f"(found {version}): pip install 'setuptools>={need}'"
        )


def build_from_checkout(
    root: Path, cache_dir: Path, timeout: float = BUILD_TIMEOUT
) -> tuple[Path, bool]:
    """(wheel path, built now?) for the checkout at `root`, from the cache when unchanged.

    The build runs on a copy of `source_files` (modes normalised), never in
    the checkout: an in-tree build would leave build/ and egg-info behind and
    could pack stale files from an earlier build/.
    """
    root = Path(root)
    key = source_digest(root)
    target = Path(cache_dir) / "wheels" / key
    wheels = sorted(target.glob("*.whl"))
    if len(wheels) == 1:
        return wheels[0], False
    _check_setuptools()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        for rel in source_files(root):
            dest = src / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, dest)
            dest.chmod(0o644)
        env = {
            **os.environ,
            "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH),
            "PIP_NO_INPUT": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        }
        cmd = [
            sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
            "--no-build-isolation", "--no-index", "--wheel-dir", str(out), str(src),
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise WheelError(f"building the tfcluster wheel took over {timeout:g} s") from None
        built = sorted(out.glob("*.whl"))
        if proc.returncode != 0 or len(built) != 1:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            last = lines[-1].strip() if lines else f"exit {proc.returncode}"
            raise WheelError(f"building the tfcluster wheel from {root} failed: {last}")
        staging = Path(tmp) / "done"
        staging.mkdir()
        os.replace(built[0], staging / built[0].name)
        with contextlib.suppress(OSError):  # a concurrent build of the same tree won
            os.replace(staging, target)
    wheels = sorted(target.glob("*.whl"))
    if len(wheels) != 1:
        raise WheelError(f"{target}: expected one wheel in the cache folder")
    return wheels[0], True


def _record_hash(data: bytes) -> str:
    """A RECORD digest: "sha256=" and the urlsafe base64 of the digest, unpadded."""
    raw = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _wheel_tag(dist: importlib.metadata.Distribution) -> str:
    """The first Tag of the installed dist-info/WHEEL file (py3-none-any for tfcluster)."""
    for line in (dist.read_text("WHEEL") or "").splitlines():
        if line.startswith("Tag:"):
            return line.split(":", 1)[1].strip()
    return "py3-none-any"


def _installed_files(dist: importlib.metadata.Distribution) -> Iterator[tuple[str, bytes]]:
    """(archive name, bytes) of each installed file a wheel carries, checked against RECORD."""
    files = dist.files
    if files is None:
        raise WheelError(
            f"installed {DIST_NAME} has no RECORD to repack from: install it from a checkout "
            "(pip install -e DIR) so the wheel can be built"
        )
    for f in sorted(files, key=lambda f: f.as_posix()):
        name = f.as_posix()
        parts = name.split("/")
        if parts[0] == ".." or "__pycache__" in parts or name.endswith(_SKIP_SUFFIXES):
            continue  # console scripts (pip makes them again) and bytecode
        if parts[0].endswith(".dist-info") and parts[-1] in _NOT_IN_WHEEL:
            continue
        data = Path(str(f.locate())).read_bytes()
        if f.hash is not None and f"{f.hash.mode}={f.hash.value}" != _record_hash(data):
            raise WheelError(f"{f.locate()} differs from what was installed; reinstall {DIST_NAME}")
        yield name, data


def _is_editable(dist: importlib.metadata.Distribution) -> bool:
    """Whether pip installed `dist` in editable mode (PEP 610 direct_url.json)."""
    try:
        info = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        return False
    return bool(isinstance(info, dict) and info.get("dir_info", {}).get("editable"))


def repack_installed(
    out_dir: Path, dist_name: str = DIST_NAME, search_path: list[str] | None = None
) -> Path:
    """Pack an installed distribution's files back into a wheel in `out_dir`.

    Entries are sorted with fixed times and modes, so the same installation
    packs to the same bytes. The RECORD is written anew; console scripts are
    left out, since pip writes them from entry_points.txt when installing.
    `search_path` looks in those folders instead of sys.path.
    """
    found = list(importlib.metadata.distributions(name=dist_name, path=search_path or sys.path))
    if not found:
        raise WheelError(f"{dist_name} is not installed in {sys.prefix}")
    # A checkout on sys.path shows its egg-info as a distribution too; only an
    # install from a wheel has the RECORD that says which files are its own.
    dist = next((d for d in found if d.read_text("RECORD") is not None), None)
    if dist is None:
        raise WheelError(
            f"installed {dist_name} has no RECORD to repack from: install it from a checkout "
            "(pip install -e DIR) so the wheel can be built"
        )
    if _is_editable(dist):
        raise WheelError(
            f"{dist_name} is an editable install: build the wheel from its checkout instead"
        )
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    dist_info = f"{name}-{dist.version}.dist-info"
    wheel_name = f"{name}-{dist.version}-{_wheel_tag(dist)}.whl"
    entries = list(_installed_files(dist))
    record_lines = [f"{n},{_record_hash(d)},{len(d)}" for n, d in entries]
    record_lines.append(f"{dist_info}/RECORD,,")
    entries.append((f"{dist_info}/RECORD", ("\n".join(record_lines) + "\n").encode()))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / wheel_name
    tmp = path.with_name(f".{wheel_name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for n, data in entries:
                info = zipfile.ZipInfo(n, date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = (0o100644 & 0xFFFF) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


#: Not pinned on instances: the venv the user-data creates brings its own
#: installer (pip, and setuptools before Python 3.12), and a pin that differs
#: would make pip replace it, which means a download (none is possible
#: where pip runs with --no-index, as in the local cloud).
INSTALLER_TOOLS = frozenset({"pip", "setuptools", "wheel", DIST_NAME})
_PIN_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints(checkout: Path | None) -> bytes:
    """The pins to install the wheel with on an instance.

    The checkout's constraints.txt when there is one (what the tests ran
    with); otherwise every distribution installed here, as name==version.
    Either way without tfcluster itself, which the wheel provides, and
    without the `INSTALLER_TOOLS`, which the instance's venv provides.
    """
    if checkout is not None and (Path(checkout) / CONSTRAINTS_FILENAME).is_file():
        lines = (Path(checkout) / CONSTRAINTS_FILENAME).read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            match = _PIN_NAME.match(line)
            if match and _canonical(match.group(1)) in INSTALLER_TOOLS:
                continue
            kept.append(line)
        return "".join(kept).encode()
    pins: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and _canonical(name) not in INSTALLER_TOOLS:
            pins.setdefault(_canonical(name), f"{name}=={dist.version}")
    header = f"# Versions installed with {DIST_NAME} on the operator's machine.\n"
    return (header + "".join(f"{pins[k]}\n" for k in sorted(pins))).encode()


def stage_wheel(
    cache_dir: Path, checkout: Path | None = None, timeout: float = BUILD_TIMEOUT
) -> list[StagedObject]:
    """The wheel and its constraints as staged objects ("wheel", "constraints").

    `checkout` defaults to the source tree this code runs from; without one
    the installed distribution is repacked. The constraints are written into
    the cache under their own digest, so the manifest points at a real file.
    """
    checkout = find_checkout() if checkout is None else Path(checkout)
    if checkout is not None:
        wheel, _ = build_from_checkout(checkout, cache_dir, timeout)
    else:
        wheel = repack_installed(Path(cache_dir) / "wheels" / "installed")
    pins = constraints(checkout)
    pins_path = Path(cache_dir) / "constraints" / hashlib.sha256(pins).hexdigest()
    if not pins_path.is_file():
        pins_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = pins_path.with_name(f".{pins_path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(pins)
        os.replace(tmp, pins_path)
    return [stage_file("wheel", wheel), stage_file("constraints", pins_path, CONSTRAINTS_FILENAME)]
