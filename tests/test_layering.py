"""Each package imports only from the packages below it: guarded_fetch <- pipeline <- deployments <- stable_avatar
(the CLI); inside ``deployments/`` no deployment's room (gateway, orchestrator, workers) imports another's: what
they share is in ``contracts``, ``storage``, ``jobstore`` and ``runtime``.

Development code (tools/, bench/, testing/, tests/, examples/) is never imported by runtime code, so the image and the
package leave it out; of it, only the tests import ``tests``.
"""

from __future__ import annotations

import ast
import fnmatch
import tomllib
from pathlib import Path

import pytest

from bench.bench_imports import measure
from testing.media import REPO_ROOT

RUNTIME_PACKAGES = ("guarded_fetch", "pipeline", "deployments", "stable_avatar")
DEV_PACKAGES = ("tools", "bench", "testing", "tests", "examples")
# What each runtime package may import from this repository.
ALLOWED = {
    "guarded_fetch": {"guarded_fetch"},
    "pipeline": {"guarded_fetch", "pipeline"},
    "deployments": {"guarded_fetch", "pipeline", "deployments"},
    "stable_avatar": {"guarded_fetch", "pipeline", "deployments", "stable_avatar"},
}
ROOMS = ("gateway", "orchestrator", "workers")  # one deployment (or three, the model workers) each


def imported_modules(path: Path) -> set[str]:
    """Dotted names of every import in ``path`` (lazy imports inside functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every import in ``path``."""
    return {name.split(".")[0] for name in imported_modules(path)}


def rooms_imported(path: Path) -> set[str]:
    """The deployment rooms (``deployments.<room>``) that ``path`` imports from."""
    return {parts[1] for name in imported_modules(path)
            if (parts := name.split("."))[0] == "deployments" and len(parts) > 1 and parts[1] in ROOMS}


@pytest.mark.parametrize("package", RUNTIME_PACKAGES)
def test_package_imports_only_what_is_below_it(package):
    ours = set(RUNTIME_PACKAGES) | set(DEV_PACKAGES)
    offenders = {}
    for path in sorted((REPO_ROOT / package).rglob("*.py")):
        wrong = (imported_packages(path) & ours) - ALLOWED[package]
        if wrong:
            offenders[str(path.relative_to(REPO_ROOT))] = sorted(wrong)
    assert offenders == {}, f"{package} imports from above itself or from dev tools: {offenders}"


@pytest.mark.parametrize("package", ["testing", "bench", "tools", "examples"])
def test_development_code_outside_the_tests_never_imports_them(package):
    """``testing`` holds what benchmarks and examples share with the tests, so nothing but the tests imports
    ``tests``; and ``testing``, the bottom of the development code, imports neither ``bench`` nor ``tools``."""
    forbidden = {"tests"} | ({"bench", "tools"} if package == "testing" else set())
    offenders = {str(path.relative_to(REPO_ROOT)): sorted(wrong)
                 for path in sorted((REPO_ROOT / package).rglob("*.py"))
                 if (wrong := imported_packages(path) & forbidden)}
    assert offenders == {}, f"{package} imports {sorted(forbidden)}: {offenders}"


def test_the_package_build_ships_only_the_runtime_packages():
    """What ``pip install`` / the wheel takes: the top-level packages that pyproject.toml's setuptools
    ``packages.find`` patterns match are the runtime packages, none of the development ones."""
    include = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"]
    packages = {path.name for path in REPO_ROOT.iterdir() if (path / "__init__.py").is_file()}
    assert set(DEV_PACKAGES) & packages  # the patterns are checked against real candidates
    shipped = {name for name in packages if any(fnmatch.fnmatchcase(name, pattern) for pattern in include)}
    assert shipped == set(RUNTIME_PACKAGES)


@pytest.mark.parametrize("room", ROOMS)
def test_no_deployment_room_imports_another(room):
    offenders = {str(path.relative_to(REPO_ROOT)): sorted(other)
                 for path in sorted((REPO_ROOT / "deployments" / room).rglob("*.py"))
                 if (other := rooms_imported(path) - {room})}
    assert offenders == {}, f"deployments/{room} imports another deployment's room: {offenders}"


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from deployments.app import build_app\n    import stable_avatar.cli\n")
    assert imported_packages(bad) == {"deployments", "stable_avatar"}
    assert rooms_imported(bad) == set()
    bad.write_text("from deployments.workers.placement import place\nimport deployments.gateway.auth\n")
    assert rooms_imported(bad) == {"workers", "gateway"}


@pytest.mark.parametrize("module", ["deployments.gateway.deployment", "deployments.config", "pipeline.settings"])
def test_the_gateway_and_the_configuration_load_no_model_library(module):
    """The Gateway runs no model: importing torch, diffusers and transformers would cost each of its replicas
    seconds of CPU and some 300 MiB more at every start (``bench/results/imports.txt``)."""
    assert measure(module, REPO_ROOT)["model_libraries"] == []


MODEL_CODE = ("transformers", "diffusers.models.transformers", "diffusers.models.autoencoders",
              "pipeline.models.transformer", "pipeline.models.vae", "pipeline.generator")


def loaded_model_code(module: str) -> list[str]:
    """Which of :data:`MODEL_CODE` a fresh interpreter has loaded after importing ``module``."""
    return measure(module, REPO_ROOT, watched=MODEL_CODE)["loaded"]


def test_the_orchestrator_loads_no_model_code():
    """The Orchestrator runs the step loop (torch) but no model: the transformer, the VAE, the encoders and the
    pipeline that holds them stay out of its replicas, and so does diffusers itself, whose scheduler computes a
    sigma table only when a job first needs it (seconds of CPU at every start, ``bench/results/imports.txt``);
    a segmented finish imports the VAE's module when it is configured."""
    assert loaded_model_code("deployments.orchestrator.deployment") == []
    assert measure("deployments.orchestrator.deployment", REPO_ROOT)["model_libraries"] == ["torch"]
    seen = set(loaded_model_code("deployments.workers.postprocessor"))  # the probe sees a model worker's
    assert {"diffusers.models.autoencoders", "pipeline.models.vae", "pipeline.generator"} <= seen


def test_the_model_library_probe_sees_torch():
    assert "torch" in measure("pipeline.windows", REPO_ROOT)["model_libraries"]
