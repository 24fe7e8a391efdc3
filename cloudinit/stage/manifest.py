"""Content addressing for the cluster bucket: keys, digests, and what to upload.

Every staged object lives at `objects/<sha256>/<filename>`. The key is a
function of the bytes alone, so an object already in the bucket never needs
uploading again and a second `up` with nothing changed uploads nothing. The
filename stays in the key so that a presigned URL, a log line or a listing
still says what the object is. Pure functions: no S3 here (the provider owns
the bucket); the bucket code lists the keys it has and asks `missing`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tfcluster.cloudinit.stage.errors import StageError

#: Every staged object's key starts here; instance reports go under other prefixes.
OBJECTS_PREFIX = "objects/"

_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A filename that is safe in an S3 key, a URL path, a shell word and a file
# system: no separators, no leading dot, nothing a shell would expand.
_FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


class ManifestError(StageError):
    """A key, digest or name that the manifest cannot hold."""


def sha256_bytes(data: bytes) -> str:
    """The hex SHA-256 of `data`: the one digest every staged object is named by."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> tuple[str, int]:
    """The hex SHA-256 and size of a file, read in chunks.

    Staged binaries are tens of megabytes; reading them whole would double the
    operator's memory for no gain.
    """
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def check_filename(filename: str) -> str:
    """Return `filename` if it can stand as the last part of a key, else raise.

    The instance writes the object under this name, so a slash or a leading dot
    would let a manifest place files where the user-data did not mean to.
    """
    if not _FILENAME.fullmatch(filename):
        raise ManifestError(
            f"staged file name {filename!r} is not allowed: use letters, digits and ._+- "
            "(at most 128 characters, not starting with a dot)"
        )
    return filename


def object_key(sha256: str, filename: str) -> str:
    """The bucket key of an object with this digest and file name."""
    if not _SHA256.fullmatch(sha256):
        raise ManifestError(f"not a lower-case hex SHA-256: {sha256!r}")
    return f"{OBJECTS_PREFIX}{sha256}/{check_filename(filename)}"


def parse_key(key: str) -> tuple[str, str]:
    """Split an object key into (sha256, filename); the inverse of `object_key`."""
    rest = key[len(OBJECTS_PREFIX) :] if key.startswith(OBJECTS_PREFIX) else None
    parts = rest.split("/") if rest is not None else []
    if len(parts) != 2:
        raise ManifestError(f"not a staged object key: {key!r}")
    sha256, filename = parts
    object_key(sha256, filename)  # validates both parts
    return sha256, filename


@dataclass(frozen=True)
class StagedObject:
    """One file to stage: its role in the cluster, its bytes' digest and where it is now.

    `name` is what the user-data asks for ("etcd", "wheel", "bundle", ...);
    `filename` is what the instance saves it as; `path` is the local file the
    bucket code uploads, and is not part of the manifest.
    """

    name: str
    filename: str
    sha256: str
    size: int
    path: Path

    @property
    def key(self) -> str:
        """The object's bucket key, derived from its digest and file name."""
        return object_key(self.sha256, self.filename)

    def entry(self) -> dict[str, Any]:
        """The manifest entry: what an instance needs to fetch and check it."""
        return {
            "key": self.key,
            "filename": self.filename,
            "sha256": self.sha256,
            "size": self.size,
        }


def stage_file(name: str, path: Path, filename: str | None = None) -> StagedObject:
    """Describe the file at `path` as a staged object named `name`.

    The file name defaults to the file's own; give one when the local name is
    not what the instance should see (a cache path, a temporary file).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{name}: {path} is not a file")
    sha256, size = sha256_file(path)
    return StagedObject(name, check_filename(filename or path.name), sha256, size, path)


@dataclass(frozen=True)
class Manifest:
    """Every object one `up` stages, by name; what the user-data is rendered from."""

    objects: tuple[StagedObject, ...]

    def __post_init__(self) -> None:
        """Refuse two objects under one name: the user-data could not tell them apart."""
        names = [o.name for o in self.objects]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ManifestError(f"two staged objects named {', '.join(duplicates)}")

    def __getitem__(self, name: str) -> StagedObject:
        """The object staged under `name` (KeyError names it when absent)."""
        for obj in self.objects:
            if obj.name == name:
                return obj
        raise KeyError(name)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """name -> {key, filename, sha256, size}, sorted by name."""
        return {o.name: o.entry() for o in sorted(self.objects, key=lambda o: o.name)}

    def to_json(self) -> bytes:
        """The manifest as canonical JSON: same objects, same bytes, same digest."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        """One SHA-256 for the whole set: equal when and only when every object is."""
        return sha256_bytes(self.to_json())

    def total_bytes(self) -> int:
        """Bytes the bucket holds for this manifest (each distinct key counted once)."""
        return sum({o.key: o.size for o in self.objects}.values())


def manifest_from_dict(data: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[str, str, int]]:
    """Read a manifest written by `Manifest.to_dict` back as name -> (key, sha256, size).

    Checks that each key agrees with its digest and file name, so a manifest
    edited by hand cannot point an instance at another object than it checks.
    """
    out: dict[str, tuple[str, str, int]] = {}
    for name, entry in data.items():
        key, sha256, size = str(entry["key"]), str(entry["sha256"]), int(entry["size"])
        if key != object_key(sha256, str(entry["filename"])):
            raise ManifestError(f"{name}: key {key!r} does not match its sha256 and filename")
        out[name] = (key, sha256, size)
    return out


def missing(objects: Iterable[StagedObject], existing_keys: Iterable[str]) -> list[StagedObject]:
    """The objects to upload: those whose key is not among `existing_keys`.

    Each key appears once in the answer even when two names share the same
    bytes. The order is the input's, so uploads run in a predictable order.
    An object whose key is present is not compared further: the key is its
    digest, and an S3 PUT is all or nothing, so a present key holds those bytes.
    """
    have = set(existing_keys)
    out: list[StagedObject] = []
    for obj in objects:
        if obj.key not in have:
            have.add(obj.key)
            out.append(obj)
    return out
