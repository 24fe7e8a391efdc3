"""What cloud-init does with an instance's user-data before running it.

Fetch it as the EC2 API holds it, undo gzip, split the MIME multipart, check
the cloud-config part (YAML, and ``cloud-init schema`` when installed) and
hand back the one shell script. The packages the cloud-config lists are
what this machine must already have (curl); nothing is installed.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tfcluster.cloudinit.config import Artifact

SCHEMA_TIMEOUT = 60.0
_VARIABLE = re.compile(r"([a-z][a-z0-9_]*)_(url|sha256)=(\S+)")


class UserDataError(RuntimeError):
    """The user-data is missing or is not what cloud-init would run."""


@dataclass(frozen=True)
class UserDataPart:
    content_type: str
    filename: str
    text: str


def split_user_data(raw: bytes) -> list[UserDataPart]:
    """gzip-decoded, MIME-split parts, as cloud-init sees them."""
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    message = email.message_from_bytes(data, policy=email.policy.default)
    if not message.is_multipart():
        raise UserDataError("user-data is not a MIME multipart")
    parts = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            raise UserDataError(f"user-data part {part.get_filename()} has no content")
        text = payload.decode()
        parts.append(UserDataPart(part.get_content_type(), part.get_filename() or "", text))
    return parts


def check_cloud_config(text: str, work: Path) -> None:
    """The cloud-config part parses, and passes ``cloud-init schema`` if it is installed."""
    import yaml

    if not text.startswith("#cloud-config"):
        raise UserDataError("the cloud-config part does not start with #cloud-config")
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserDataError(f"the cloud-config part is not YAML: {exc}") from None
    if not isinstance(document, dict):
        raise UserDataError("the cloud-config part is not a mapping")
    tool = shutil.which("cloud-init")
    if tool is None:
        return
    path = work / "cloud-config.yaml"
    path.write_text(text)
    done = subprocess.run(
        [tool, "schema", "--config-file", str(path)],
        capture_output=True,
        text=True,
        timeout=SCHEMA_TIMEOUT,
    )
    if done.returncode != 0:
        raise UserDataError(f"cloud-init schema rejects the cloud-config: {done.stderr.strip()}")


def shell_script(raw: bytes, work: Path) -> str:
    """The one shell script of the user-data, after checking every part."""
    parts = split_user_data(raw)
    scripts = [p for p in parts if p.content_type == "text/x-shellscript"]
    configs = [p for p in parts if p.content_type == "text/cloud-config"]
    if len(scripts) != 1 or len(configs) > 1 or len(parts) != len(scripts) + len(configs):
        kinds = ", ".join(p.content_type for p in parts)
        raise UserDataError(f"expected one shell script and one cloud-config, got: {kinds}")
    for config in configs:
        check_cloud_config(config.text, work)
    return scripts[0].text


def staged_downloads(script: str) -> dict[str, Artifact]:
    """What the script fetches, by name: each ``<name>_url`` / ``<name>_sha256`` pair
    at its top, unquoted; the ``staged`` a render needs to give the same bytes."""
    found: dict[str, dict[str, str]] = {}
    for line in script.splitlines():
        match = _VARIABLE.fullmatch(line)
        if match:
            name, kind, value = match.groups()
            found.setdefault(name, {})[kind] = shlex.split(value)[0]
    return {
        name: Artifact(values["url"], values["sha256"])
        for name, values in found.items()
        if set(values) == {"url", "sha256"}
    }


_AGENT_JSON = re.compile(r"^write_file \S+/agent\.json \d+ <<'(\w+)'\n(.*?)^\1$", re.S | re.M)
SIGNED_KEYS = ("report_post", "output_post")


def signed_posts(script: str) -> dict[str, Any]:
    """The presigned POSTs in the script's agent config (``report_post``, the
    chief's ``output_post``): signed at launch, like the URLs, so the same
    bytes need the same values (`render_user_data`'s ``posts``)."""
    found = _AGENT_JSON.search(script)
    if found is None:
        return {}
    try:
        agent = json.loads(found.group(2))
    except ValueError:
        return {}
    return {key: agent[key] for key in SIGNED_KEYS if key in agent}
