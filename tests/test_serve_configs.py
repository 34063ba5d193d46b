"""Every Serve config the project ships loads through Ray's schema and ``AppArgs``, or fails naming file and field.

Configs: ``serve_config.yaml``, ``examples/serve_config.gpu.yaml`` and the ``serveConfigV2`` of every RayService
that the kustomizations under ``k8s/`` render (the base, and the dev overlay with its JSON6902 patches applied as
kustomize would). Ray's pydantic schemas ignore unknown keys, so a misspelt field would silently fall back to a
default; unknown keys are therefore reported too, at every level Ray's schema models.
Plain YAML parsing here on purpose: the KubeRay validator (``test_k8s_manifests.py``) is a separate tool.
"""

from __future__ import annotations

import copy
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError
from ray.serve.schema import ServeDeploySchema

from deployments.config import AppArgs

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S = REPO_ROOT / "k8s"
SERVE_FILES = ["serve_config.yaml", "examples/serve_config.gpu.yaml"]
BUILDER = "deployments.app:build_app"


# ------------------------------------------------------------------------------ a small kustomize subset


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def apply_json6902(doc: Any, op: dict[str, Any], where: str) -> None:
    """RFC 6902 add/remove/replace/test, which is all the overlays use."""
    *parents, last = _pointer(op["path"])
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(last) if isinstance(node, list) and last != "-" else last
    kind = op["op"]
    if kind == "test":
        assert node[key] == op["value"], f"{where}: test {op['path']} failed: {node[key]!r} != {op['value']!r}"
    elif kind == "remove":
        del node[key]
    elif kind == "replace":
        if isinstance(node, dict):
            assert key in node, f"{where}: replace {op['path']}: the path does not exist"
        node[key] = copy.deepcopy(op["value"])
    elif kind == "add":
        if isinstance(node, list):
            node.insert(len(node) if key == "-" else key, copy.deepcopy(op["value"]))
        else:
            node[key] = copy.deepcopy(op["value"])
    else:
        raise AssertionError(f"{where}: unsupported op {kind!r}")


def render(directory: Path) -> list[dict[str, Any]]:
    """The documents of a kustomization: its resources (files or kustomization folders), then its patches."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        where = str((directory / patch["path"]).relative_to(REPO_ROOT))
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        matched = [d for d in docs if d["kind"] == target["kind"]
                   and d["metadata"]["name"] == target.get("name", d["metadata"]["name"])]
        assert matched, f"{where}: the patch target {target} matches nothing"
        for doc in matched:
            for op in ops:
                apply_json6902(doc, op, where)
    return docs


def shipped_configs() -> dict[str, dict[str, Any]]:
    """``{where: parsed Serve config}`` for every config the repository ships."""
    configs = {name: yaml.safe_load((REPO_ROOT / name).read_text()) for name in SERVE_FILES}
    for kustomization in sorted(K8S.rglob("kustomization.yaml")):
        directory = kustomization.parent
        for doc in render(directory):
            if doc["kind"] == "RayService":
                where = f"{directory.relative_to(REPO_ROOT)} RayService/{doc['metadata']['name']} serveConfigV2"
                configs[where] = yaml.safe_load(doc["spec"]["serveConfigV2"])
    return configs


# ------------------------------------------------------------------------------ the checks


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation admits (``X``, ``X | None``, ``list[X]``, ``dict[str, X]``...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, tuple, dict, typing.Literal):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def unknown_fields(data: Any, model: type[BaseModel], path: str) -> list[str]:
    """Keys that ``model`` (and the models nested in it) does not declare, with their dotted paths."""
    if isinstance(data, list):
        return [p for i, item in enumerate(data) for p in unknown_fields(item, model, f"{path}[{i}]")]
    if not isinstance(data, dict):
        return []
    problems = []
    fields = model.model_fields
    aliases = {f.alias: name for name, f in fields.items() if f.alias}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name not in fields:
            problems.append(f"{path}.{key}: unknown field (not in {model.__name__})".lstrip("."))
            continue
        for nested in _models_in(fields[name].annotation)[:1]:
            problems += unknown_fields(value, nested, f"{path}.{key}".lstrip("."))
    return problems


def _errors(err: ValidationError, prefix: str) -> list[str]:
    return [f"{prefix}{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]


def config_problems(config: Any) -> list[str]:
    """Everything a deploy of ``config`` would reject (or silently ignore), as ``field path: message``."""
    problems = unknown_fields(config, ServeDeploySchema, "")
    try:
        schema = ServeDeploySchema.model_validate(config)
    except ValidationError as err:
        return problems + _errors(err, "")
    for i, app in enumerate(schema.applications):
        where = f"applications[{i}]"
        if app.import_path != BUILDER:
            problems.append(f"{where}.import_path: {app.import_path!r}, expected {BUILDER!r}")
            continue
        try:
            AppArgs.model_validate(app.args)  # extra="forbid": a misspelt argument is an error here
        except ValidationError as err:
            problems += _errors(err, f"{where}.args.")
    return problems


CONFIGS = shipped_configs()


def test_every_shipped_config_is_found():
    assert sorted(CONFIGS) == [
        "examples/serve_config.gpu.yaml",
        "k8s/base RayService/stable-avatar serveConfigV2",
        "k8s/overlays/dev RayService/stable-avatar serveConfigV2",
        "serve_config.yaml",
    ]
    base, dev = (CONFIGS[f"k8s/{k} RayService/stable-avatar serveConfigV2"] for k in ("base", "overlays/dev"))
    assert base != dev  # the overlay's patch was applied
    assert dev["applications"][0]["args"]["storage"]["bucket"] == "stable-avatar-dev"


@pytest.mark.parametrize("where", sorted(CONFIGS))
def test_config_loads_through_ray_schema_and_app_args(where):
    problems = config_problems(CONFIGS[where])
    assert not problems, f"{where}:\n  " + "\n  ".join(problems)
    args = AppArgs.model_validate(CONFIGS[where]["applications"][0]["args"])
    if where != "serve_config.yaml":  # the GPU set-ups run the real model
        assert args.preset == "stableavatar-1.3b" and args.checkpoints == Path("/models/stableavatar")
        assert args.denoiser.num_gpus > 0


@pytest.mark.parametrize("corrupt,named", [
    (lambda c: c.update(http_optons={"port": 1}), "http_optons: unknown field"),
    (lambda c: c["applications"][0].update(route_prefx="/"), "applications[0].route_prefx: unknown field"),
    (lambda c: c["http_options"].update(port="eighty"), "http_options.port:"),
    (lambda c: c["applications"][0]["args"].update(presett="tiny"), "applications[0].args.presett: Extra inputs"),
    (lambda c: c["applications"][0]["args"]["denoiser"]["autoscaling"].update(max_replicas=0),
     "applications[0].args.denoiser.autoscaling.max_replicas:"),
    (lambda c: c["applications"][0]["args"].pop("checkpoints"), "needs 'checkpoints'"),
    (lambda c: c["applications"][0].update(import_path="deployments.app:app"), "applications[0].import_path:"),
])
def test_a_broken_config_is_named_by_field(corrupt, named):
    config = copy.deepcopy(CONFIGS["examples/serve_config.gpu.yaml"])
    corrupt(config)
    problems = config_problems(config)
    assert any(named in p for p in problems), problems


def test_a_broken_overlay_patch_is_named(tmp_path):
    """A dev patch whose guard no longer matches the base fails naming the patch file."""
    base = render(K8S / "base")
    patch_file = K8S / "overlays" / "dev" / "rayservice-patch.yaml"
    ops = yaml.safe_load(patch_file.read_text())
    (rayservice,) = [d for d in base if d["kind"] == "RayService"]
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"].reverse()
    with pytest.raises(AssertionError, match=r"rayservice-patch\.yaml: test /spec/rayClusterConfig"):
        for op in ops:
            apply_json6902(rayservice, op, "k8s/overlays/dev/rayservice-patch.yaml")


# ------------------------------------------------------------------------------ dtypes decided by the config


@pytest.mark.parametrize("where", sorted(CONFIGS))
def test_orchestrator_and_denoisers_agree_on_the_state_dtype(where):
    """The Orchestrator draws the noise in ``args.state_dtype()``; on KubeRay it runs on a CPU pod, where CUDA is
    absent (as on this machine). It must still pick the Denoisers' bf16 when they are given GPUs."""
    import torch

    assert not torch.cuda.is_available()  # the point of the test: the asker's hardware must not matter
    args = AppArgs.model_validate(CONFIGS[where]["applications"][0]["args"])
    gpu_setup = args.denoiser.num_gpus > 0 and args.device != "cpu"
    assert args.replica_dtype_policy(args.denoiser) == ("gpu" if gpu_setup else "fp32")
    assert args.state_dtype() == (torch.bfloat16 if gpu_setup else torch.float32)
    assert gpu_setup == (where != "serve_config.yaml")


def test_denoiser_replica_loads_with_the_orchestrator_state_dtype():
    """A Denoiser given a GPU share loads the GPU dtypes (here on the CPU) and the state dtype the Orchestrator
    uses; a CPU deployment of the same app stays fp32."""
    import torch

    from deployments.config import DeploymentOptions
    from deployments.workers.models import load_replica_models

    args = AppArgs(preset="tiny", device="auto", denoiser=DeploymentOptions(num_gpus=1))
    bundle = load_replica_models(args, args.denoiser, ["transformer"])
    assert bundle.state_dtype == args.state_dtype() == torch.bfloat16
    assert bundle.transformer.patch_embedding.weight.dtype == torch.bfloat16
    cpu_args = AppArgs(preset="tiny", device="auto")
    assert load_replica_models(cpu_args, cpu_args.denoiser, ["vae"]).state_dtype == cpu_args.state_dtype() \
        == torch.float32


# ------------------------------------------------------------------------ the Denoisers' queue and autoscaling


@pytest.mark.parametrize("where", sorted(CONFIGS))
def test_denoisers_accept_a_steps_units_and_autoscale_on_them(where):
    """Every shipped config lets a Denoiser replica take ``DENOISER_MAX_ONGOING`` units (they wait on its
    round-robin GPU queue, so Serve's router places each unit on its sticky replica at once and never holds one
    back), routes through the sticky router, and autoscales on one in-flight unit per replica."""
    from deployments.config import DENOISER_MAX_ONGOING
    from deployments.workers.denoiser import Denoiser
    from deployments.workers.placement import StickyBalancedRouter

    args = AppArgs.model_validate(CONFIGS[where]["applications"][0]["args"])
    assert args.denoiser.max_ongoing_requests == DENOISER_MAX_ONGOING == AppArgs().denoiser.max_ongoing_requests
    assert args.denoiser.autoscaling.target_ongoing_requests == 1 == AppArgs().denoiser.autoscaling.target_ongoing_requests
    built = Denoiser.options(**args.denoiser.serve_options())._deployment_config
    assert built.max_ongoing_requests == DENOISER_MAX_ONGOING
    assert built.request_router_config.request_router_class.endswith(StickyBalancedRouter.__name__)
    assert "deployments" not in CONFIGS[where]["applications"][0]  # no override replaces what args built


# ------------------------------------------------------------------------------------------- the jobs database


def test_s3_storage_needs_a_shared_jobs_database(tmp_path, monkeypatch):
    """With S3 storage a cluster's replicas would each find their own SQLite file: refused at config time, naming
    the fix; an explicit SQLite path (one machine) or PostgreSQL is accepted. Local storage keeps the default."""
    from pydantic import ValidationError

    from deployments.app import pin_paths
    from deployments.jobstore import PostgresJobsConfig, SqliteJobsConfig

    s3 = {"kind": "s3", "bucket": "media", "endpoint_url": "http://127.0.0.1:9"}
    for jobs in (None, {"kind": "sqlite"}):
        with pytest.raises(ValidationError, match=r"jobs: S3 storage .* \{kind: postgres\}"):
            AppArgs.model_validate({"storage": s3} | ({"jobs": jobs} if jobs else {}))
    assert isinstance(AppArgs(storage=s3, jobs={"kind": "postgres"}).jobs_config(), PostgresJobsConfig)
    single = AppArgs(storage=s3, jobs={"kind": "sqlite", "path": "state/jobs.sqlite3"})
    monkeypatch.chdir(tmp_path)
    assert pin_paths(single).jobs.path == tmp_path / "state" / "jobs.sqlite3"  # replicas run elsewhere
    local = AppArgs(storage={"kind": "local", "root": str(tmp_path / "data")})
    assert local.jobs_config() == SqliteJobsConfig() and local.default_jobs_path() == tmp_path / "data" / "jobs.sqlite3"
    with pytest.raises(ValidationError, match="dsn"):  # a DSN (a password) never comes from the YAML
        AppArgs.model_validate({"jobs": {"kind": "postgres", "dsn": "postgresql://u:p@h/db"}})
