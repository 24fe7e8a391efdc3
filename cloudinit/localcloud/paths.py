"""Where the local machinery finds its tools and keeps its state, checkout or not.

From a checkout (``make setup``) the tools are in ``.tools/bin`` and state
goes to ``.run``; from an installed wheel there is no checkout, so both are
looked up instead of derived from this file's location:

* tools (etcd, etcdctl, coredns): ``$TFCLUSTER_BIN_DIR``, then the checkout's
  ``.tools/bin``, then ``./.tools/bin``, then the folder on ``PATH`` that
  holds ``coredns``; the first folder holding all three wins;
* state: ``$TFCLUSTER_RUN_DIR``, else the checkout's ``.run``, else ``./.run``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

TOOLS = ("etcd", "etcdctl", "coredns")


def checkout() -> Path | None:
    """The source tree this code runs from (an editable install), or None."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "setup.cfg").is_file() and (root / "coredns").is_dir() else None


def _tool_folders() -> list[Path]:
    folders = []
    if os.environ.get("TFCLUSTER_BIN_DIR"):
        folders.append(Path(os.environ["TFCLUSTER_BIN_DIR"]))
    tree = checkout()
    if tree is not None:
        folders.append(tree / ".tools" / "bin")
    folders.append(Path.cwd() / ".tools" / "bin")
    on_path = shutil.which("coredns")
    if on_path is not None:
        folders.append(Path(on_path).resolve().parent)
    return folders


def missing_tools(folder: Path) -> list[str]:
    return [tool for tool in TOOLS if not (folder / tool).is_file()]


def bin_dir() -> Path:
    """The first folder of the search that holds every tool; else the first searched
    (where ``make setup`` puts them), so that the error names a useful place."""
    folders = _tool_folders()
    return next((f for f in folders if not missing_tools(f)), folders[0])


def tools_missing_message(folder: Path) -> str:
    """One line: what is missing where, and how to get it."""
    searched = ", ".join(str(f) for f in _tool_folders())
    return (
        f"{', '.join(missing_tools(folder))} not found (looked in {searched}): run 'make setup' "
        "in a checkout, or set TFCLUSTER_BIN_DIR to a folder holding etcd, etcdctl and coredns"
    )


def run_root() -> Path:
    """The folder for pid files, logs and data of local stacks and clouds."""
    if os.environ.get("TFCLUSTER_RUN_DIR"):
        return Path(os.environ["TFCLUSTER_RUN_DIR"])
    tree = checkout()
    return (tree if tree is not None else Path.cwd()) / ".run"
