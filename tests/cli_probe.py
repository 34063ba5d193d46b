"""Run ``stable-avatar`` in a fresh interpreter and report which heavy libraries the command loaded.

The import-cost twin of ``bench.bench_imports.measure`` (which imports a module): here the whole command runs, so
an import made late, inside a handler or on the way out, is seen too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.bench_imports import MODEL_LIBRARIES

WATCHED = (*MODEL_LIBRARIES, "ray")
MARKER = "cli-probe: "
PROBE = f"""
import json, sys
from stable_avatar.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
loaded = sorted(set({WATCHED!r}) & {{name.split(".")[0] for name in sys.modules}})
sys.stdout.flush()
print({MARKER!r} + json.dumps({{"exit_code": code, "loaded": loaded}}), file=sys.stderr)
"""


@dataclass
class CliRun:
    exit_code: int
    stdout: str
    stderr: str  # without the probe's own line
    loaded: list[str]  # which of WATCHED the command imported

    @property
    def model_libraries(self) -> list[str]:
        return [name for name in self.loaded if name in MODEL_LIBRARIES]


def run_cli(args: list[str], root: Path, env: dict[str, str] | None = None, timeout: float = 120) -> CliRun:
    """``stable-avatar *args`` from ``root`` (``env`` replaces the environment; default: this one's)."""
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = done.stderr.splitlines()
    assert lines and lines[-1].startswith(MARKER), f"the command did not finish normally:\n{done.stderr[-3000:]}"
    report = json.loads(lines[-1][len(MARKER):])
    return CliRun(report["exit_code"] or 0, done.stdout, "\n".join(lines[:-1]), report["loaded"])
