"""The console script: an instance's commands load no operator code; the
operator's commands are still all there, loaded when used."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TFCLUSTER = str(Path(sys.executable).parent / "tfcluster")
OPERATOR = ("boto3", "botocore", "jinja2", "yaml", "tfcluster.cloudinit")
COMMANDS = [
    "agent", "down", "fetch", "logs", "ls", "records", "render", "ssh", "status", "unlock", "up",
    "wait",
]  # fmt: skip


PROBE = """
import atexit, json, runpy, sys
out, script, *args = sys.argv[1:]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
"""


def imported(tmp_path: Path, script: str, *args: str) -> set[str]:
    """Every module in sys.modules when ``script ARGS`` exits (0) in a fresh Python."""
    out = tmp_path / "modules.json"
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(out), script, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return set(json.loads(out.read_text()))


def operator_modules(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == o or m.startswith(o + ".") for o in OPERATOR))


@pytest.mark.parametrize("command", ["agent", "wait", "records"])
def test_instance_commands_load_no_operator_code(tmp_path, command):
    modules = imported(tmp_path, TFCLUSTER, command, "--help")
    assert "tfcluster.discovery.cli" in modules  # the probe sees what the script loads
    assert operator_modules(modules) == []


def test_the_agent_itself_loads_no_operator_code(tmp_path):
    """What `tfcluster agent` imports once it runs: the agent and its stages."""
    script = tmp_path / "agent.py"
    script.write_text("import tfcluster.discovery.agent\n")
    modules = imported(tmp_path, str(script))
    assert {"tfcluster.discovery.agent", "etcd3"} <= modules
    assert operator_modules(modules) == []


def test_operator_commands_load_when_used(tmp_path):
    modules = imported(tmp_path, TFCLUSTER, "up", "--help")
    assert {"tfcluster.cloudinit.cli", "boto3", "jinja2", "yaml"} <= modules


def test_help_lists_every_command():
    result = subprocess.run([TFCLUSTER, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("Commands:", 1)[1].strip().splitlines()
    assert [line.split()[0] for line in lines] == COMMANDS
    unknown = subprocess.run([TFCLUSTER, "nope"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2
    assert unknown.stderr == "Error: No such command 'nope'. (see 'tfcluster --help')\n"


def test_a_usage_error_is_one_line_and_exit_2():
    result = subprocess.run(
        [TFCLUSTER, "up", "--ps", "1e8"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "Error: Invalid value for '--ps': '1e8' is not a valid integer. (see 'tfcluster up --help')"
    ]
