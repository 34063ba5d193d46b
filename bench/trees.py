"""Other commits of this repository, unpacked and run beside the working tree in one benchmark run.

A benchmark that compares against an older commit unpacks it with ``git archive`` and runs a script in a process
(and Ray cluster) of its own, with the unpacked tree first on ``PYTHONPATH`` (its ``deployments``, ``pipeline``)
and this repository after it (the ``testing`` package, which older trees lack, and which imports the service
only through ``deployments.app``/``deployments.config``, as every tree has them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKING_TREE = "working-tree"


def unpack(commit: str, dest: Path) -> Path:
    """``commit``'s files under ``dest`` (created); ``WORKING_TREE`` is this checkout itself, uncommitted changes
    included."""
    if commit == WORKING_TREE:
        return ROOT
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def describe(commit: str) -> str:
    """``commit`` as ``<short hash> <subject>`` (the working tree: the commit it sits on, plus its changes)."""
    ref = "HEAD" if commit == WORKING_TREE else commit
    line = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s", ref], check=True,
                          capture_output=True, text=True).stdout.strip()
    return f"{line[:90]}{' (+ uncommitted changes)' if commit == WORKING_TREE and _dirty() else ''}"


def _dirty() -> bool:
    return bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               check=True, capture_output=True, text=True).stdout.strip())


def run_in_tree(tree: Path, argv: list[str], marker: str, timeout_s: float) -> dict[str, Any]:
    """Run ``python argv...`` in ``tree`` with it first on the path; returns the JSON of the last stdout line that
    starts with ``marker`` + a space. Raises RuntimeError with the end of stderr when there is none."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys([str(tree), str(ROOT)]))}
    proc = subprocess.run([sys.executable, *argv], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(marker + " ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{argv[0]} in {tree} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(marker + " "))
