"""Each package imports only from the packages below it: pipeline <- deployments <- stable_avatar (the CLI).

Development tools (tools/, bench/, tests/) are never imported by runtime code, so the image can leave them out.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

RUNTIME_PACKAGES = ("pipeline", "deployments", "stable_avatar")
DEV_PACKAGES = ("tools", "bench", "tests")
# What each runtime package may import from this repository.
ALLOWED = {
    "pipeline": {"pipeline"},
    "deployments": {"pipeline", "deployments"},
    "stable_avatar": {"pipeline", "deployments", "stable_avatar"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every import in ``path`` (lazy imports inside functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", RUNTIME_PACKAGES)
def test_package_imports_only_what_is_below_it(package):
    ours = set(RUNTIME_PACKAGES) | set(DEV_PACKAGES)
    offenders = {}
    for path in sorted((REPO_ROOT / package).rglob("*.py")):
        wrong = (imported_packages(path) & ours) - ALLOWED[package]
        if wrong:
            offenders[str(path.relative_to(REPO_ROOT))] = sorted(wrong)
    assert offenders == {}, f"{package} imports from above itself or from dev tools: {offenders}"


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from deployments.app import build_app\n    import stable_avatar.cli\n")
    assert imported_packages(bad) == {"deployments", "stable_avatar"}


MODEL_LIBRARIES = ("torch", "diffusers", "transformers")


def modules_loaded_by_importing(module: str) -> set[str]:
    """Top-level names in ``sys.modules`` after a fresh interpreter imports ``module``."""
    code = f"import sys, {module}; print(' '.join(sorted({{name.split('.')[0] for name in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


@pytest.mark.parametrize("module", ["deployments.gateway", "deployments.config", "pipeline.settings"])
def test_the_gateway_and_the_configuration_load_no_model_library(module):
    """The Gateway runs no model: importing torch, diffusers and transformers would cost each of its replicas ~5 s
    of CPU at start and ~320 MiB of memory (measured: 7.2 s and 463 MiB before, 2.6 s and 138 MiB after)."""
    loaded = modules_loaded_by_importing(module)
    assert "pydantic" in loaded  # the probe sees what was imported
    assert loaded.isdisjoint(MODEL_LIBRARIES), sorted(loaded & set(MODEL_LIBRARIES))


def test_the_model_library_probe_sees_torch():
    assert "torch" in modules_loaded_by_importing("pipeline.windows")
