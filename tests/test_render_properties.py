"""Every string a config can carry either is refused by validation, or
reaches the templates without changing their structure.

Hypothesis feeds odd strings (newlines, braces, quotes, spaces, ``$``,
backslashes, ``#``, unicode...) to every string field of the config and of
``layout``. For each value the config accepts, the instance files are
rendered (the control node's and the chief's) and compared with the same
files rendered from a plain value, by the parsers that will read them:

- the script: mvdan.cc/sh's bash parser (statements and expansions),
  ``bash -n`` and shellcheck;
- the Corefile: CoreDNS's own caddyfile parser (blocks, directives, tokens,
  lines);
- the units: ``systemd-analyze verify`` and their sections and keys, line
  by line; resolved.conf and etcd.env likewise; agent.json as JSON;
- the cloud-config: cloud-init's own schema check.

The outside tools are slow per call, so the examples are collected first
and each tool then runs once over all of them (``scripts/render-check``
prints the parsers' view of many files as JSON lines).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, require_tool, stand_in_staged
from tfcluster.cloudinit.config import ConfigError, load_cluster_config
from tfcluster.cloudinit.render.layout import DEFAULT_LAYOUT
from tfcluster.cloudinit.render.userdata import render_parts

EXAMPLES = 1000
TOOL_TIMEOUT = 120
ETCD = ["http://10.0.0.5:2379"]
BASE = {"cluster": "demo", "artifacts.coredns.sha256": "a" * 64, "artifacts.etcd.sha256": "b" * 64}

#: Each string field with a plain value of its own. ``etcd`` is a list: the
#: odd value becomes its one item.
FIELDS: dict[str, str] = {
    "cluster": "demo",
    "region": "us-east-1",
    "zone": "tensorflow.local",
    **{f"instance_types.{role}": "m5.large" for role in ("control", "chief", "ps", "worker")},
    "ami": "ami-0123456789abcdef0",
    **{f"roles.{role}.instance_type": "g5.xlarge" for role in ("control", "chief", "ps", "worker")},
    **{
        f"roles.{role}.ami": "ami-0123456789abcdef0"
        for role in ("control", "chief", "ps", "worker")
    },
    "subnet_id": "subnet-0123456789abcdef0",
    "vpc_id": "vpc-0123456789abcdef0",
    "key_name": "ops",
    "ssh_cidr": "203.0.113.7/32",
    "etcd": "http://10.0.0.5:2379",
    "artifacts.coredns.url": "https://downloads.example/coredns.tgz",
    "artifacts.coredns.sha256": "c" * 64,
    "artifacts.etcd.url": "https://downloads.example/etcd.tar.gz",
    "artifacts.etcd.sha256": "d" * 64,
    "program": "python3 train.py --steps 10",
    "program_dir": str(REPO / "examples"),
    "max_lifetime": "12h",
    "url_expiry": "6h",
    "on_chief_exit": "keep",
    "output_interval": "20m",  # not the default, which agent.json leaves out
    **{
        f"layout.{f.name}": getattr(DEFAULT_LAYOUT, f.name) or "/opt/venv"
        for f in dataclasses.fields(DEFAULT_LAYOUT)
        if isinstance(getattr(DEFAULT_LAYOUT, f.name), str)
    },
}

SPECIAL = [
    "\n", "\r", "\t", " ", "\x00", "\x1b", "\u2028", "\u00a0", "é", "名",
    "{", "}", '"', "'", "`", "$", "\\", "#", ";", "%", "*", "?", "@", ":", "/", "=", "[", "]",
    "$(id)", "${HOME}", "{$HOME}", "%h", "\\\n", "\nExecStartPre=/bin/true\n",
    "\n}\nevil.local {\n", " import /etc/passwd", "\nTFCLUSTER_EOF\n", "'\"'\"'",
]  # fmt: skip
junk = st.lists(st.sampled_from(SPECIAL) | st.text(max_size=3), min_size=1, max_size=4).map("".join)
#: Characters that some checks let through, so that they reach the files.
MILD = [*"-._+@,=:~/0aZ", "é", "名", " ", "[x]", "==1.0", "'", '"', "$", "#"]
mild = st.lists(st.sampled_from(MILD), min_size=1, max_size=3).map("".join)


@st.composite
def odd_value(draw: st.DrawFn) -> tuple[str, str]:
    """A field and a value: its plain value with junk inserted, or any text."""
    field = draw(st.sampled_from(sorted(FIELDS)))
    plain = FIELDS[field]
    kind = draw(st.sampled_from(["insert", "insert", "mild", "mild", "append", "text"]))
    if kind == "text":
        return field, draw(st.text(max_size=40))
    at = len(plain) if kind == "append" else draw(st.integers(0, len(plain)))
    return field, plain[:at] + draw(mild if kind == "mild" else junk) + plain[at:]


#: What a field needs beside it to be accepted: a new url needs its checksum.
WITH = {
    "artifacts.coredns.url": {"artifacts.coredns.sha256": "c" * 64},
    "artifacts.etcd.url": {"artifacts.etcd.sha256": "d" * 64},
}


#: The fields whose empty value is accepted and means "none": no forwarder for
#: names outside the zone, no local image adapter (the EC2 install).
SWITCHED_OFF_BY_EMPTY = {"layout.dns_forward", "layout.image_site_packages"}


def baseline_key(example: Example) -> tuple[str, bool]:
    """Which plain example an example's files are compared with."""
    return example.field, example.field in SWITCHED_OFF_BY_EMPTY and example.value == ""


def config_with(field: str, value: str) -> Any:
    own = {field: [value] if field == "etcd" else value, **WITH.get(field, {})}
    return load_cluster_config(None, {**BASE, **own})


# --- the files of one instance, and their structure as Python sees it -----------------------

_HEREDOC = re.compile(r"^write_file (\S+) \d+ <<'TFCLUSTER_EOF'\n(.*?)^TFCLUSTER_EOF$", re.S | re.M)


def instance_files(config: Any) -> dict[str, str]:
    """``role/part -> content`` for the control node (if any) and the chief; the
    files the script embeds are ``role/0``, ``role/1``... in the script's order."""
    files: dict[str, str] = {}
    roles = [("control", None)] if config.control_node else []
    roles.append(("chief", ETCD if config.control_node else None))
    for role, endpoints in roles:
        cloud_config, script = render_parts(
            config, role, etcd_endpoints=endpoints, staged=stand_in_staged()
        )
        files[f"{role}/cloud-config"] = cloud_config.content
        files[f"{role}/script"] = script.content
        for n, (_, content) in enumerate(_HEREDOC.findall(script.content)):
            files[f"{role}/{n}"] = content
    return files


def _embedded_names() -> dict[str, str]:
    """``role/n -> file name`` as the plain config writes them (the order is fixed)."""
    names = {}
    config = load_cluster_config(None, BASE)
    for role, endpoints in (("control", None), ("chief", ETCD)):
        script = render_parts(config, role, etcd_endpoints=endpoints, staged=stand_in_staged())[
            1
        ].content
        for n, (path, _) in enumerate(_HEREDOC.findall(script)):
            names[f"{role}/{n}"] = Path(shlex.split(path)[0]).name
    return names


EMBEDDED = _embedded_names()


def name_of(kind: str) -> str:
    """``Corefile``, ``tfcluster-agent.service``, ``script``... for ``role/part``."""
    return EMBEDDED.get(kind, kind.split("/", 1)[1])


def ini_shape(text: str) -> list[str]:
    """Unit files, resolved.conf, etcd.env: what each line is, without values."""
    shape = []
    for line in text.split("\n"):
        if line.endswith("\\"):
            shape.append("continued")  # systemd joins it with the next line
        elif not line.strip():
            shape.append("blank")
        elif line.lstrip()[0] in "#;":
            shape.append("comment")
        elif line.startswith("["):
            shape.append(line)
        else:
            shape.append(line.partition("=")[0] if "=" in line else f"bare:{line}")
    return shape


def local_shape(kind: str, content: str) -> Any:
    """The structure of a file that Python can read as its reader does."""
    name = name_of(kind)
    if name.endswith((".service", ".conf", ".env")):
        return ini_shape(content)
    if name.endswith(".json"):
        return sorted(json.loads(content))
    if name == "cloud-config":
        return {key: type(value).__name__ for key, value in yaml.safe_load(content).items()}
    return None  # the script and the Corefile: the outside parsers


# --- the outside tools, once over many files ----------------------------------------------------


@pytest.fixture(scope="module")
def render_check(tmp_path_factory: pytest.TempPathFactory) -> str:
    """scripts/render-check: built by make setup, or here from the module cache alone."""
    built = REPO / ".tools" / "bin" / "render-check"
    if built.exists():
        return str(built)
    go = require_tool("go")
    out = tmp_path_factory.mktemp("render-check") / "render-check"
    env = {**os.environ, "GOFLAGS": "-mod=readonly", "GOPROXY": "off"}
    result = subprocess.run(
        [go, "build", "-o", str(out), "."], cwd=REPO / "scripts" / "render-check",
        capture_output=True, text=True, timeout=TOOL_TIMEOUT, env=env,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.skip(
            f"render-check cannot be built offline (run make setup): {result.stderr[-300:]}"
        )
    return str(out)


def coredns_directives() -> str:
    """The plugin list of our CoreDNS build (coredns/main.go), as its parser is given it."""
    source = (REPO / "coredns" / "main.go").read_text()
    block = re.search(r"var directives = \[\]string\{(.*?)\}", source, re.S)
    assert block is not None
    return ",".join(re.findall(r'"([^"]+)"', block.group(1)))


def json_lines(argv: list[str]) -> dict[str, dict[str, Any]]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    return {row["file"]: row for row in rows}


def parser_view(tool: str, kind: str, paths: list[Path], *flags: str) -> dict[str, Any]:
    """path -> the structure the real parser sees, or ``("error", message)``."""
    view = {}
    for chunk in range(0, len(paths), 500):
        batch = [str(p) for p in paths[chunk : chunk + 500]]
        for path, row in json_lines([tool, kind, *flags, *batch]).items():
            view[path] = ("error", row["error"]) if row.get("error") else row["shape"]
    return view


Check = Callable[[list[Path]], dict[str, str]]


def distinct(check: Check) -> Check:
    """``check`` run once per distinct content: most values do not reach most files."""

    def run(paths: list[Path]) -> dict[str, str]:
        first: dict[bytes, Path] = {}
        for path in paths:
            first.setdefault(hashlib.sha256(path.read_bytes()).digest(), path)
        problems = check(list(first.values()))
        found = {}
        for path in paths:
            same = first[hashlib.sha256(path.read_bytes()).digest()]
            problem = problems.get(str(same)) or problems.get(same.name)
            if problem:
                found[str(path)] = problem
        return found

    return run


@distinct
def systemd_errors(paths: list[Path]) -> dict[str, str]:
    """``systemd-analyze verify`` over many units: problems by file name.

    A missing ExecStart binary is expected (nothing is installed here)."""
    analyze = require_tool("systemd-analyze")
    result = subprocess.run(
        [analyze, "verify", *map(str, paths)], capture_output=True, text=True, timeout=TOOL_TIMEOUT
    )
    problems: dict[str, str] = {}
    for line in (result.stdout + result.stderr).splitlines():
        if "is not executable: No such file or directory" in line or not line.strip():
            continue
        name = Path(line.split(":", 1)[0]).name
        problems[name] = problems.get(name, "") + line + "\n"
    return problems


_CLOUD_INIT_BATCH = """
import json, sys
from cloudinit.config.schema import SchemaValidationError, get_schema, validate_cloudconfig_file
schema = get_schema()
for path in sys.argv[1:]:
    try:
        validate_cloudconfig_file(path, schema)
        print(json.dumps({"file": path}))
    except SchemaValidationError as exc:
        print(json.dumps({"file": path, "error": str(exc)}))
"""


@distinct
def cloud_init_errors(paths: list[Path]) -> dict[str, str]:
    """cloud-init's own schema check (what ``cloud-init schema --config-file`` calls),
    in one process of cloud-init's Python for every file."""
    tool = Path(require_tool("cloud-init"))
    python = tool.read_text().splitlines()[0].removeprefix("#!").split()[0]
    rows = json_lines([python, "-I", "-c", _CLOUD_INIT_BATCH, *map(str, paths)])
    return {path: row["error"] for path, row in rows.items() if row.get("error")}


@distinct
def shell_errors(paths: list[Path]) -> dict[str, str]:
    problems = {}
    for path in paths:
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        if result.returncode != 0:
            problems[str(path)] = result.stderr
    shellcheck = require_tool("shellcheck")
    result = subprocess.run(
        [shellcheck, "--shell=bash", "--severity=warning", "--format=json1", *map(str, paths)],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT,
    )  # fmt: skip
    for comment in json.loads(result.stdout or '{"comments": []}')["comments"]:
        problems[comment["file"]] = problems.get(comment["file"], "") + comment["message"] + "\n"
    return problems


# --- the property ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Example:
    field: str
    value: str
    files: dict[str, str]


def collect() -> tuple[list[Example], list[tuple[str, str, str]]]:
    """Run hypothesis: the accepted examples, and every refusal (field, value, message)."""
    accepted: list[Example] = []
    refused: list[tuple[str, str, str]] = []

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(odd_value())
    def one(example: tuple[str, str]) -> None:
        field, value = example
        try:
            config = config_with(field, value)
        except ConfigError as exc:
            message = str(exc)
            assert "\n" not in message and message.startswith(field), (field, value, message)
            refused.append((field, value, message))
            return
        accepted.append(Example(field, value, instance_files(config)))

    one()
    return accepted, refused


def write_all(
    folder: Path, examples: list[Example], pick: Callable[[str], bool]
) -> dict[Path, tuple[int, str]]:
    """Each picked file of each example (and of the baselines) to its own path."""
    written = {}
    for n, example in enumerate(examples):
        for kind, content in example.files.items():
            if not pick(kind):
                continue
            stem, dot, suffix = name_of(kind).partition(".")
            path = folder / f"{stem}-{n}-{kind.split('/')[0]}{dot}{suffix}"
            path.write_text(content)
            written[path] = (n, kind)
    return written


def test_odd_values_are_refused_or_keep_every_files_structure(tmp_path, render_check):
    for tool in ("bash", "shellcheck", "systemd-analyze", "cloud-init"):
        require_tool(tool)
    started = time.monotonic()
    accepted, refused = collect()
    plain = [
        Example(field, value, instance_files(config_with(field, value)))
        for field, value in FIELDS.items()
    ]
    # An empty value that is accepted switches its feature off, and so its files'
    # structure: it is compared with the field's own empty baseline.
    plain += [
        Example(field, "", instance_files(config_with(field, "")))
        for field in sorted(SWITCHED_OFF_BY_EMPTY)
    ]
    baseline = {baseline_key(example): example for example in plain}
    examples = plain + accepted
    failures = []

    def check(n: int, kind: str, problem: str) -> None:
        example = examples[n]
        where = f"{kind.split('/')[0]}/{name_of(kind)}"
        failures.append(f"{example.field}={example.value!r}: {where}: {problem.strip()[:300]}")

    # Python's own readers: units, resolved.conf, etcd.env, agent.json, cloud-config.
    for n, example in enumerate(examples):
        expected = baseline[baseline_key(example)].files
        if sorted(example.files) != sorted(expected):
            check(n, "files", f"{sorted(example.files)} != {sorted(expected)}")
            continue
        for kind, content in example.files.items():
            if local_shape(kind, content) != local_shape(kind, expected[kind]):
                check(n, kind, f"structure changed:\n{content}")

    # The outside parsers, one call (or a few) per tool over every file.
    folder = tmp_path / "files"
    folder.mkdir()
    scripts = write_all(folder, examples, lambda kind: name_of(kind) == "script")
    corefiles = write_all(folder, examples, lambda kind: name_of(kind) == "Corefile")
    units = write_all(folder, examples, lambda kind: name_of(kind).endswith(".service"))
    configs = write_all(folder, examples, lambda kind: name_of(kind) == "cloud-config")
    views = {
        **parser_view(render_check, "shell", list(scripts)),
        **parser_view(
            render_check, "corefile", list(corefiles), "-directives", coredns_directives()
        ),
    }
    parsed = {**scripts, **corefiles}
    path_of = {where: path for path, where in parsed.items()}
    plain_index = {baseline_key(example): n for n, example in enumerate(plain)}
    for path, (n, kind) in parsed.items():
        base = path_of[(plain_index[baseline_key(examples[n])], kind)]
        if isinstance(views[str(base)], tuple):
            check(n, kind, f"the plain value does not parse: {views[str(base)]}")
        elif views[str(path)] != views[str(base)]:
            check(n, kind, f"parsed structure changed: {views[str(path)]!r:.300}")
    for problems, written in (
        (shell_errors(list(scripts)), scripts),
        (systemd_errors(list(units)), units),
        (cloud_init_errors(list(configs)), configs),
    ):
        for path, (n, kind) in written.items():
            if str(path) in problems:
                check(n, kind, problems[str(path)])

    elapsed = time.monotonic() - started
    print(f"{len(accepted)} accepted, {len(refused)} refused in {elapsed:.1f} s")
    by_field: dict[str, int] = {}
    for example in accepted:
        by_field[example.field] = by_field.get(example.field, 0) + 1
    print("accepted by field:", by_field)
    assert not failures, "\n".join(failures[:10])
    # The property means something only if odd values got through to the files: at
    # least 1 in 20 (about 95 of 1000 get through, over some 70 fuzzed keys).
    assert len(accepted) >= EXAMPLES // 20 and len(refused) >= EXAMPLES // 4


def test_only_the_switches_accept_an_empty_value():
    """An empty value is refused unless it names "none" (and so has a baseline of its own)."""
    accepted = set()
    for field in FIELDS:
        try:
            config_with(field, "")
        except ConfigError:
            continue
        accepted.add(field)
    assert accepted == SWITCHED_OFF_BY_EMPTY


def test_every_string_key_is_fuzzed():
    """A new string key or layout field must join FIELDS (and so the property)."""
    from tfcluster.cloudinit.schema import ConfigFile

    not_strings = {
        "allow_public_zone", "chief", "ps", "workers", "spot_workers", "tf_port", "lease_ttl",
        "record_ttl", "max_instances", "instance_types", "artifacts", "layout",
        "download_binaries", "preload_tensorflow",
    }  # fmt: skip
    assert set(ConfigFile.model_fields) - not_strings == {f.split(".")[0] for f in FIELDS} - {
        "instance_types", "artifacts", "layout"
    }  # fmt: skip
    layout_strings = {
        f"layout.{f.name}"
        for f in dataclasses.fields(DEFAULT_LAYOUT)
        if not isinstance(getattr(DEFAULT_LAYOUT, f.name), int)  # bool is an int
    }
    assert layout_strings <= set(FIELDS)
