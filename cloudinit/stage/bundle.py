"""The user's program bundle: `program_dir` as a deterministic .tar.gz.

The chief unpacks it as its working directory before it runs `program`. The
same tree gives the same bytes (entries sorted, fixed times, owners and
modes, no name or time in the gzip header), hence the same SHA-256 and key,
so an unchanged program is not uploaded again.

Left out: `.git` and `__pycache__` folders anywhere, and whatever the
`.tfclusterignore` file at the top of `program_dir` names. That file has
gitignore's syntax and meaning (read by the `pathspec` library): one pattern
a line, `#` comments, `!` re-includes, a trailing `/` matches folders only, a
leading `/` anchors to `program_dir`, `**` spans folders. As in git, a file
inside an excluded folder cannot be re-included, because the folder is not
entered. Folders are kept even when everything in them is left out, so
the program finds the layout it expects.

The compressed size is limited (64 MiB by default): the bundle travels in
the cluster bucket and is unpacked before training starts, so large data
belongs elsewhere. Going over the limit stops the build as soon as the
output passes it, and leaves no file behind.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pathspec

from tfcluster.cloudinit.stage.errors import StageError
from tfcluster.cloudinit.stage.manifest import StagedObject, stage_file

DEFAULT_LIMIT = 64 << 20
IGNORE_FILE = ".tfclusterignore"
ALWAYS_EXCLUDED = (".git", "__pycache__")
#: The file name the chief saves the bundle as.
BUNDLE_FILENAME = "program.tar.gz"
#: Every entry's mtime: 1980-01-01, the earliest time a zip (and so a wheel) can hold.
FIXED_MTIME = 315532800


class BundleError(StageError):
    """program_dir cannot be bundled (missing, unreadable, a link out of it)."""


class BundleTooLarge(BundleError):
    """The compressed bundle is over the limit."""


@dataclass(frozen=True)
class Bundle:
    """A built bundle: the file, its digest and size, and the paths it holds."""

    path: Path
    sha256: str
    size: int
    entries: tuple[str, ...]

    def staged(self, name: str = "bundle") -> StagedObject:
        """The bundle as a staged object, saved on the chief as program.tar.gz."""
        return stage_file(name, self.path, BUNDLE_FILENAME)


def load_ignore(program_dir: Path) -> pathspec.PathSpec:
    """The patterns of `program_dir/.tfclusterignore` (none if the file is absent)."""
    path = Path(program_dir) / IGNORE_FILE
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"cannot read {path}: {e}") from None
    return pathspec.GitIgnoreSpec.from_lines(lines)


def walk(program_dir: Path, spec: pathspec.PathSpec | None = None) -> Iterator[tuple[str, Path]]:
    """(archive name, path) of every entry to bundle, folders before their contents, sorted.

    Names are relative, with "/" separators. Symbolic links are kept as links
    when they point inside `program_dir`; one that leads out of it is an error,
    since the chief would not have what it points at.
    """
    root = Path(program_dir)
    spec = load_ignore(root) if spec is None else spec
    resolved_root = root.resolve()

    def visit(folder: Path, prefix: str) -> Iterator[tuple[str, Path]]:
        try:
            names = sorted(os.listdir(folder))
        except OSError as e:
            raise BundleError(f"cannot list {folder}: {e.strerror}") from None
        for name in names:
            path = folder / name
            rel = f"{prefix}{name}"
            is_dir = path.is_dir() and not path.is_symlink()
            if is_dir and name in ALWAYS_EXCLUDED:
                continue
            if spec.match_file(rel + "/" if is_dir else rel):
                continue
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(resolved_root) or not target.exists():
                    raise BundleError(
                        f"{path} links to {os.readlink(path)}, which is not in {root}"
                    )
            yield rel, path
            if is_dir:
                yield from visit(path, rel + "/")

    yield from visit(root, "")


class _Limited(io.RawIOBase):
    """A writable file that refuses to grow past `limit` bytes."""

    def __init__(self, out: IO[bytes], limit: int, what: str) -> None:
        self.out, self.limit, self.what, self.written = out, limit, what, 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        """Pass `b` on, or raise BundleTooLarge once the total would pass the limit."""
        self.written += len(b)
        if self.written > self.limit:
            raise BundleTooLarge(
                f"{self.what}: the compressed bundle is over the limit of "
                f"{_mib(self.limit)} (list what to leave out in {IGNORE_FILE})"
            )
        return self.out.write(b)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def _tarinfo(name: str, path: Path) -> tarfile.TarInfo:
    """A TarInfo with nothing of this machine in it: fixed time, root owner, normal modes."""
    st = path.lstat()
    info = tarfile.TarInfo(name)
    info.mtime = FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if stat.S_ISLNK(st.st_mode):
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, os.readlink(path), 0o777
    elif stat.S_ISDIR(st.st_mode):
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    elif stat.S_ISREG(st.st_mode):
        info.size = st.st_size
        info.mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
    else:
        raise BundleError(f"{path} is not a file, folder or link; it cannot be bundled")
    return info


def build_bundle(program_dir: Path, out: Path, limit: int = DEFAULT_LIMIT) -> Bundle:
    """Tar and gzip `program_dir` into `out`; one-line BundleError on any problem.

    `out` is written through a temporary name and renamed at the end, so it
    exists only if the whole bundle was made and is within `limit` bytes.
    """
    root = Path(program_dir)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise BundleError(f"program_dir {root} {what}")
    out = Path(out)
    if out.resolve().is_relative_to(root.resolve()):
        raise BundleError(f"the bundle {out} cannot be written inside program_dir {root}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    entries: list[str] = []
    try:
        with open(tmp, "wb") as raw:
            limited = _Limited(raw, limit, str(root))
            # mtime=0 and an empty file name keep the gzip header free of this run.
            with (
                gzip.GzipFile(filename="", mode="wb", fileobj=limited, mtime=0) as gz,
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
            ):
                for name, path in walk(root):
                    info = _tarinfo(name, path)
                    entries.append(name)
                    if info.isreg():
                        with open(path, "rb") as f:
                            tar.addfile(info, f)
                    else:
                        tar.addfile(info)
        os.replace(tmp, out)
    except OSError as e:
        raise BundleError(f"cannot bundle {root}: {e}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    staged = stage_file("bundle", out, BUNDLE_FILENAME)
    return Bundle(out, staged.sha256, staged.size, tuple(entries))
