"""Each package imports only from the packages below it: pipeline <- deployments <- stable_avatar (the CLI).

Development tools (tools/, bench/, tests/) are never imported by runtime code, so the image can leave them out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bench.bench_imports import measure
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


@pytest.mark.parametrize("module", ["deployments.gateway", "deployments.config", "pipeline.settings"])
def test_the_gateway_and_the_configuration_load_no_model_library(module):
    """The Gateway runs no model: importing torch, diffusers and transformers cost each of its replicas 5.6 s and
    449 MiB at start, against 2.0 s and 133 MiB without them (``bench/results/imports.txt``)."""
    assert measure(module, REPO_ROOT)["model_libraries"] == []


def test_the_model_library_probe_sees_torch():
    assert "torch" in measure("pipeline.windows", REPO_ROOT)["model_libraries"]
