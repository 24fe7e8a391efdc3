"""Every command of the README's AWS section runs as written, against moto.

They run through the ``tfcluster`` entry point (console_scripts). The config
is the README's own ``tfcluster.yaml`` block, unchanged: it gives no
``ami``, so the image comes from Canonical's public SSM parameter, which
moto lacks and refuses to take through PutParameter (a reserved name): it is
written into moto's SSM backend (`publish_parameter`). The commands are the
README's ``sh`` block, each run in order; ``down`` asks first and is
answered "y", as an operator would. No agent runs in moto, so ``up`` gets
``--no-wait`` (its wait is tests/test_operator.py's), and the commands that
act on a running job (``logs``, ``fetch``, ``ssh``) are only parsed, options
and arguments checked by click as the command line would be.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner

# The fixture: fake AWS, with the images' public SSM parameters written into moto.
from test_images_network import aws  # noqa: F401

from tfcluster.discovery.cli import main

REPO = Path(__file__).resolve().parents[1]
REGION = "us-east-1"
JOB_COMMANDS = ("logs", "fetch", "ssh")


def aws_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Using tfcluster on AWS")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def readme_config() -> str:
    """The first yaml block of the section: the smallest useful config."""
    found = re.search(r"```yaml\n(.*?)```", aws_section(), re.S)
    assert found is not None
    return found.group(1)


def readme_commands() -> list[list[str]]:
    """The commands of the section's sh block of tfcluster commands (the other one
    installs tfcluster), continuation lines joined, comments dropped."""
    blocks = re.findall(r"```sh\n(.*?)```", aws_section(), re.S)
    found = [b for b in blocks if b.startswith("tfcluster ")]
    assert len(found) == 1, blocks
    joined = re.sub(r"\\\n\s*", " ", found[0])
    commands = [shlex.split(line, comments=True) for line in joined.splitlines()]
    return [argv for argv in commands if argv]


@pytest.mark.usefixtures("aws")
def test_every_aws_command_of_the_readme_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tfcluster.yaml").write_text(readme_config())
    monkeypatch.chdir(tmp_path)
    commands = readme_commands()
    assert [argv[:2] for argv in commands] == [
        ["tfcluster", "up"], ["tfcluster", "up"], ["tfcluster", "status"],
        ["tfcluster", "logs"], ["tfcluster", "fetch"], ["tfcluster", "ssh"],
        ["tfcluster", "render"], ["tfcluster", "down"], ["tfcluster", "ls"],
        ["tfcluster", "unlock"],
    ]  # fmt: skip
    for argv in commands:
        name, args = argv[1], argv[2:]
        if name in JOB_COMMANDS:
            with main.make_context("tfcluster", [name]) as group:
                command = main.get_command(group, name)
                assert command is not None, name
                command.make_context(name, args, parent=group)  # raises on a bad option
            continue
        if name == "up" and "--dry-run" not in args:
            args = [*args, "--no-wait"]
        result = CliRunner().invoke(main, [name, *args], input="y\n")
        assert result.exit_code == 0, f"{shlex.join(argv)}: {result.output}"
    ec2 = boto3.client("ec2", region_name=REGION)
    left = ec2.describe_instances(
        Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}]
    )["Reservations"]
    assert left == []
