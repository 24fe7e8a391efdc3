"""The tfcluster wheel: built from the checkout, cached, byte-reproducible; repacked when installed.

Builds run pip with --no-index and --no-build-isolation: nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tfcluster.cloudinit.stage import wheel

REPO = Path(__file__).resolve().parent.parent


def copy_sources(dest: Path) -> Path:
    """The files a wheel build reads, copied elsewhere with other file times."""
    for rel in wheel.source_files(REPO):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / rel, target)
        os.utime(target, (1_000_000_000, 1_000_000_000))
    return dest


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pip_install_target(whl: Path, target: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(whl)],
        check=True, timeout=120,
    )  # fmt: skip


def test_checkout_is_found_and_its_source_files_listed() -> None:
    assert wheel.find_checkout() == REPO
    files = wheel.source_files(REPO)
    assert {"setup.cfg", "pyproject.toml", "cloudinit/stage/wheel.py"} <= set(files)
    assert any(f.startswith("templates/") and f.endswith(".j2") for f in files)
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert not [f for f in files if f.startswith(("tests/", ".venv/", ".tools/"))]


def test_source_digest_follows_the_files_not_their_times(tmp_path: Path) -> None:
    copy = copy_sources(tmp_path / "copy")
    assert wheel.source_digest(copy) == wheel.source_digest(REPO)
    (copy / "discovery" / "__pycache__").mkdir(exist_ok=True)
    (copy / "discovery" / "__pycache__" / "x.pyc").write_bytes(b"bytecode")
    assert wheel.source_digest(copy) == wheel.source_digest(REPO)
    with open(copy / "discovery" / "__init__.py", "a") as f:
        f.write("# changed\n")
    assert wheel.source_digest(copy) != wheel.source_digest(REPO)


def test_build_is_cached_and_reproducible(tmp_path: Path) -> None:
    before = sorted(os.listdir(REPO))
    first, built = wheel.build_from_checkout(REPO, tmp_path / "cache-a")
    assert built and first.name == "tfcluster-0.1.0-py3-none-any.whl"
    again, built = wheel.build_from_checkout(REPO, tmp_path / "cache-a")
    assert (again, built) == (first, False)
    # Another copy of the same files, other times, another cache: the same bytes.
    other, built = wheel.build_from_checkout(copy_sources(tmp_path / "copy"), tmp_path / "cache-b")
    assert built and sha(other) == sha(first)
    with zipfile.ZipFile(first) as zf:
        names = zf.namelist()
        assert "tfcluster/cloudinit/stage/wheel.py" in names
        assert "tfcluster/templates/user-data.sh.j2" in names
        assert "tfcluster-0.1.0.dist-info/entry_points.txt" in names
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert sorted(os.listdir(REPO)) == before  # no build/ or egg-info left in the checkout


def test_installed_wheel_is_repacked_and_installs(tmp_path: Path) -> None:
    built, _ = wheel.build_from_checkout(REPO, tmp_path / "cache")
    site = tmp_path / "site"
    pip_install_target(built, site)
    out = wheel.repack_installed(tmp_path / "repacked", search_path=[str(site)])
    assert out.name == built.name
    with zipfile.ZipFile(built) as a, zipfile.ZipFile(out) as b:
        original = {n: a.read(n) for n in a.namelist() if not n.endswith("/RECORD")}
        repacked = {n: b.read(n) for n in b.namelist() if not n.endswith("/RECORD")}
        assert repacked == original
        record = b.read("tfcluster-0.1.0.dist-info/RECORD").decode()
        assert "tfcluster/cloudinit/stage/wheel.py,sha256=" in record
    again = wheel.repack_installed(tmp_path / "repacked-again", search_path=[str(site)])
    assert sha(again) == sha(out)
    # The repacked wheel installs, and its code imports from where it went.
    site2 = tmp_path / "site2"
    pip_install_target(out, site2)
    proc = subprocess.run(
        [sys.executable, "-S", "-c",
         "import tfcluster.cloudinit.stage.manifest as m; print(m.__file__)"],
        env={**os.environ, "PYTHONPATH": str(site2)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(site2 / "tfcluster/cloudinit/stage/manifest.py")
    # An installed file edited after installation is not packed.
    (site / "tfcluster/cloudinit/stage/manifest.py").write_text("# edited\n")
    with pytest.raises(wheel.WheelError, match=r"manifest.py differs from what was installed"):
        wheel.repack_installed(tmp_path / "x", search_path=[str(site)])


def test_repack_of_nothing_installed_or_an_editable_install_is_refused(tmp_path: Path) -> None:
    with pytest.raises(wheel.WheelError, match=r"^tfcluster is not installed in "):
        wheel.repack_installed(tmp_path, search_path=[str(tmp_path)])
    # This environment's own tfcluster is the editable install of the checkout.
    with pytest.raises(wheel.WheelError, match="is an editable install"):
        wheel.repack_installed(tmp_path)


def test_constraints_from_the_checkout_or_the_environment() -> None:
    checkout = (REPO / "constraints.txt").read_text().splitlines(keepends=True)
    tools = ("pip==", "setuptools==", "wheel==")
    assert any(line.startswith(tools) for line in checkout)
    # Every line of the checkout's pins but the installer's own, which the venv brings.
    expected = "".join(line for line in checkout if not line.startswith(tools))
    assert wheel.constraints(REPO).decode() == expected
    frozen = wheel.constraints(None).decode().splitlines()
    assert "pathspec==1.1.1" in frozen
    assert not [line for line in frozen if line.lower().startswith(("tfcluster==", *tools))]


def test_stage_wheel_gives_the_wheel_and_its_constraints(tmp_path: Path) -> None:
    objs = wheel.stage_wheel(tmp_path / "cache", REPO)
    assert [(o.name, o.filename) for o in objs] == [
        ("wheel", "tfcluster-0.1.0-py3-none-any.whl"),
        ("constraints", "constraints.txt"),
    ]
    assert objs[1].path.read_bytes() == wheel.constraints(REPO)
    assert objs[0].key == f"objects/{sha(objs[0].path)}/tfcluster-0.1.0-py3-none-any.whl"
