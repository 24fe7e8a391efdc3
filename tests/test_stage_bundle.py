"""The program bundle: deterministic bytes, exclusions, .tfclusterignore, the size limit."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tfcluster.cloudinit.stage import bundle


def make_program(root: Path) -> Path:
    files = {
        "train.py": "print('train')\n",
        "lib/model.py": "x = 1\n",
        "lib/__pycache__/model.cpython-311.pyc": "junk",
        ".git/HEAD": "ref: refs/heads/main\n",
        "sub/.git/config": "nested repo\n",
        "data/big.bin": "data" * 100,
        "data/keep.csv": "a,b\n",
        "logs/run.log": "log\n",
        "notes.tmp": "tmp\n",
        "deep/a/b/c.tmp": "tmp\n",
        "build/out.txt": "x\n",
        "src/build/kept.txt": "only the top build/ is anchored\n",
        ".tfclusterignore": "\n".join(
            [
                "# comments and blank lines are ignored",
                "",
                "data/*",
                "!data/keep.csv",
                "logs/",
                "*.tmp",
                "/build/",
            ]
        ),
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o750)
    (root / "empty").mkdir()
    os.symlink("lib/model.py", root / "model_link.py")
    return root


def test_bundle_contents_and_exclusions(tmp_path: Path) -> None:
    program = make_program(tmp_path / "prog")
    built = bundle.build_bundle(program, tmp_path / "out" / "b.tar.gz")
    assert built.entries == (
        ".tfclusterignore",
        "data",
        "data/keep.csv",
        "deep",
        "deep/a",
        "deep/a/b",
        "empty",
        "lib",
        "lib/model.py",
        "model_link.py",
        "run.sh",
        "src",
        "src/build",
        "src/build/kept.txt",
        "sub",
        "train.py",
    )
    assert built.sha256 == hashlib.sha256(built.path.read_bytes()).hexdigest()
    assert built.size == built.path.stat().st_size
    with tarfile.open(built.path, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert list(members) == list(built.entries)
        for m in members.values():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (bundle.FIXED_MTIME, 0, 0, "", "")
        assert members["run.sh"].mode == 0o755
        assert members["train.py"].mode == 0o644
        assert members["lib"].isdir() and members["lib"].mode == 0o755
        assert members["model_link.py"].issym()
        assert members["model_link.py"].linkname == "lib/model.py"
        extracted = tar.extractfile("train.py")
        assert extracted is not None and extracted.read() == b"print('train')\n"
    staged = built.staged()
    assert (staged.name, staged.filename, staged.sha256) == (
        "bundle",
        "program.tar.gz",
        built.sha256,
    )


def test_same_tree_same_bytes(tmp_path: Path) -> None:
    first = bundle.build_bundle(make_program(tmp_path / "a"), tmp_path / "a.tar.gz")
    second_dir = make_program(tmp_path / "b")  # another path, other inodes and times
    os.utime(second_dir / "train.py", (1, 1))
    (second_dir / "train.py").chmod(0o664)  # group write is not carried over
    second = bundle.build_bundle(second_dir, tmp_path / "b.tar.gz")
    assert second.path.read_bytes() == first.path.read_bytes()
    (second_dir / "train.py").write_text("print('changed')\n")
    assert bundle.build_bundle(second_dir, tmp_path / "c.tar.gz").sha256 != first.sha256


def test_missing_or_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(bundle.BundleError, match=r"^program_dir .*/nope does not exist$"):
        bundle.build_bundle(tmp_path / "nope", tmp_path / "out.tar.gz")
    (tmp_path / "file").write_text("x")
    with pytest.raises(bundle.BundleError, match="is not a folder"):
        bundle.build_bundle(tmp_path / "file", tmp_path / "out.tar.gz")
    assert not (tmp_path / "out.tar.gz").exists()


def test_over_the_limit_leaves_nothing(tmp_path: Path) -> None:
    program = tmp_path / "prog"
    program.mkdir()
    (program / "noise.bin").write_bytes(os.urandom(300_000))  # does not compress
    out = tmp_path / "out" / "b.tar.gz"
    with pytest.raises(bundle.BundleTooLarge) as err:
        bundle.build_bundle(program, out, limit=256 << 10)
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        f"{program}: the compressed bundle is over the limit of 0.25 MiB "
        "(list what to leave out in .tfclusterignore)"
    )
    assert list(out.parent.iterdir()) == []
    (program / ".tfclusterignore").write_text("*.bin\n")
    assert bundle.build_bundle(program, out, limit=256 << 10).entries == (".tfclusterignore",)


def test_link_out_of_the_program_is_refused(tmp_path: Path) -> None:
    program = tmp_path / "prog"
    program.mkdir()
    (tmp_path / "secret").write_text("x")
    os.symlink("../secret", program / "leak")
    with pytest.raises(bundle.BundleError, match=r"leak links to \.\./secret, which is not in "):
        bundle.build_bundle(program, tmp_path / "b.tar.gz")
    assert not (tmp_path / "b.tar.gz").exists()


def test_bundle_cannot_be_written_into_the_program(tmp_path: Path) -> None:
    program = make_program(tmp_path / "prog")
    with pytest.raises(bundle.BundleError, match="cannot be written inside program_dir"):
        bundle.build_bundle(program, program / "out" / "b.tar.gz")
    assert not (program / "out").exists()


def test_gnu_tar_unpacks_it_as_an_instance_would(tmp_path: Path) -> None:
    if shutil.which("tar") is None:
        pytest.skip("tar is not installed")
    program = make_program(tmp_path / "prog")
    built = bundle.build_bundle(program, tmp_path / "b.tar.gz")
    work = tmp_path / "work"
    work.mkdir()
    subprocess.run(
        ["tar", "--no-same-owner", "-xzf", str(built.path), "-C", str(work)],
        check=True, timeout=60,
    )  # fmt: skip
    unpacked = sorted(p.relative_to(work).as_posix() for p in work.rglob("*"))
    assert unpacked == sorted(built.entries)
    assert (work / "train.py").read_text() == "print('train')\n"
    assert os.access(work / "run.sh", os.X_OK)
    assert (work / "model_link.py").read_text() == "x = 1\n"
