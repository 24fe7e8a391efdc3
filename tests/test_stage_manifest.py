"""Content addressing: keys from digests, the manifest, and what a second `up` uploads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tfcluster.cloudinit.stage import manifest as m


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_keys_are_digest_and_filename() -> None:
    digest = hashlib.sha256(b"etcd").hexdigest()
    assert m.sha256_bytes(b"etcd") == digest
    assert m.object_key(digest, "etcd") == f"objects/{digest}/etcd"
    assert m.parse_key(f"objects/{digest}/etcd") == (digest, "etcd")
    for bad in ["etcd/../x", ".hidden", "a b", "", "x" * 129, "a;rm"]:
        with pytest.raises(m.ManifestError, match="not allowed"):
            m.object_key(digest, bad)
    for key in ["objects/abc/etcd", f"reports/{digest}/etcd", f"objects/{digest}/a/b"]:
        with pytest.raises(m.ManifestError):
            m.parse_key(key)
    with pytest.raises(m.ManifestError, match="not a lower-case hex SHA-256"):
        m.object_key(digest.upper(), "etcd")


def test_file_digest_matches_hashlib_on_a_multi_chunk_file(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # > 2 MiB: several read chunks
    path = write(tmp_path / "blob", data)
    assert m.sha256_file(path) == (hashlib.sha256(data).hexdigest(), len(data))
    obj = m.stage_file("blob", path, "blob.bin")
    assert (obj.sha256, obj.size, obj.filename) == (
        hashlib.sha256(data).hexdigest(),
        len(data),
        "blob.bin",
    )
    with pytest.raises(m.ManifestError, match="is not a file"):
        m.stage_file("gone", tmp_path / "gone")


def test_manifest_json_is_canonical_and_reads_back(tmp_path: Path) -> None:
    a = m.stage_file("wheel", write(tmp_path / "w.whl", b"wheel"))
    b = m.stage_file("etcd-amd64", write(tmp_path / "etcd", b"etcd"))
    one, two = m.Manifest((a, b)), m.Manifest((b, a))
    assert one.to_json() == two.to_json() and one.digest() == two.digest()
    data = json.loads(one.to_json())
    assert list(data) == ["etcd-amd64", "wheel"]
    assert data["wheel"] == {"key": a.key, "filename": "w.whl", "sha256": a.sha256, "size": 5}
    assert m.manifest_from_dict(data) == {
        "etcd-amd64": (b.key, b.sha256, 4),
        "wheel": (a.key, a.sha256, 5),
    }
    data["wheel"]["sha256"] = b.sha256
    with pytest.raises(m.ManifestError, match=r"wheel: key .* does not match"):
        m.manifest_from_dict(data)
    assert one["wheel"] is a
    with pytest.raises(KeyError):
        one["bundle"]
    with pytest.raises(m.ManifestError, match="two staged objects named wheel"):
        m.Manifest((a, a))


def test_second_up_with_nothing_changed_uploads_nothing(tmp_path: Path) -> None:
    files = {"etcd": b"etcd-binary", "coredns": b"coredns-binary", "wheel": b"wheel"}
    objs = [m.stage_file(n, write(tmp_path / n, d)) for n, d in files.items()]
    bucket: set[str] = {"reports/worker0/state.json"}  # other prefixes are ignored
    first = m.missing(objs, bucket)
    assert first == objs
    bucket |= {o.key for o in first}
    again = [m.stage_file(n, tmp_path / n) for n in files]
    assert m.missing(again, bucket) == []
    write(tmp_path / "wheel", b"wheel v2")
    changed = [m.stage_file(n, tmp_path / n) for n in files]
    assert [o.name for o in m.missing(changed, bucket)] == ["wheel"]


def test_same_bytes_under_two_names_upload_once(tmp_path: Path) -> None:
    a = m.stage_file("etcd-amd64", write(tmp_path / "a" / "etcd", b"same"))
    b = m.stage_file("etcd-copy", write(tmp_path / "b" / "etcd", b"same"))
    assert m.missing([a, b], []) == [a]
    assert m.Manifest((a, b)).total_bytes() == 4
