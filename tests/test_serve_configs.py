"""Every Serve config the project ships loads through Ray's schema and ``AppArgs``, or fails naming file and field.

Configs: ``serve_config.yaml``, ``examples/serve_config.gpu.yaml``, ``examples/serve_config.one-gpu.yaml`` (its
shape runs a job in ``tests/test_one_gpu_service.py``) and the ``serveConfigV2`` of every RayService
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
ONE_GPU = "examples/serve_config.one-gpu.yaml"
SERVE_FILES = ["serve_config.yaml", "examples/serve_config.gpu.yaml", ONE_GPU]
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
        ONE_GPU,
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
    if where != "serve_config.yaml":  # the GPU set-ups run the real model, where download-weights put it
        folder = Path("checkpoints") if where == ONE_GPU else Path("/models/stableavatar")
        assert args.preset == "stableavatar-1.3b" and args.checkpoints == folder
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


def test_a_replica_loads_its_models_in_the_configured_memory_mode():
    """``pipeline.memory`` reaches ``load_models`` from the app args: the Preprocessor's models offloaded whole, T5
    kept on the CPU (``text_encoder_device: cpu``); the Denoiser's DiT under the same hooks."""
    from accelerate.hooks import CpuOffload

    from deployments.workers.models import load_replica_models

    args = AppArgs(preset="tiny", device="cpu",
                   pipeline={"memory": {"mode": "model_offload", "text_encoder_device": "cpu"}})
    bundle = load_replica_models(args, args.preprocessor, ["vae", "text_encoder", "image_encoder", "audio_encoder"])
    assert bundle.placement.describe()["components"] == {
        "audio_encoder": "model_offload", "vae": "model_offload", "image_encoder": "model_offload",
        "text_encoder": "cpu"}
    assert isinstance(bundle.vae._hf_hook, CpuOffload) and not hasattr(bundle.text_encoder, "_hf_hook")
    dit = load_replica_models(args, args.denoiser, ["transformer"])
    assert dit.placement.describe() == {"mode": "model_offload", "device": "cpu",
                                        "components": {"transformer": "model_offload"}, "fp8_weights": []}


# ------------------------------------------------------------------------ the Denoisers' queue and autoscaling


@pytest.mark.parametrize("where", sorted(CONFIGS))
def test_denoisers_accept_a_steps_units_and_autoscale_on_them(where):
    """Every shipped config lets a Denoiser replica take ``DENOISER_MAX_ONGOING`` units (they wait on its GPU
    queue, shortest job first, so Serve's router places each unit on its sticky replica at once and never holds one
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


def test_a_deployments_health_check_period_reaches_serve_and_defaults_to_serves():
    """``health_check_period_s`` sets how often Serve checks a replica (so how soon a wedged Denoiser is replaced);
    left out, Serve's own default stands; zero or less is refused naming the field."""
    from deployments.workers.denoiser import Denoiser

    args = AppArgs.model_validate({"denoiser": {"health_check_period_s": 2.5}})
    assert Denoiser.options(**args.denoiser.serve_options())._deployment_config.health_check_period_s == 2.5
    default = Denoiser.options(**AppArgs().denoiser.serve_options())._deployment_config.health_check_period_s
    assert "health_check_period_s" not in AppArgs().denoiser.serve_options() and default == 10
    with pytest.raises(ValidationError, match="health_check_period_s"):
        AppArgs.model_validate({"denoiser": {"health_check_period_s": 0}})


def test_a_deployments_entry_there_from_the_first_deploy_rescales_in_place_and_args_restart_every_replica():
    """What k8s/README.md (Scale) tells operators, against the installed Ray: a config deploy replaces every
    replica when the application's code version changes, and that version hashes the ``args`` and the list of the
    ``deployments:`` entries' autoscaling policies, not their bounds. So moving the bounds of an entry that was
    already there keeps every replica (Serve scales in place); adding the first such entry, or changing any
    ``args``, restarts them all."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeApplicationSchema

    def version(app: dict) -> str:
        return get_app_code_version(ServeApplicationSchema.model_validate(app))

    shipped = CONFIGS["serve_config.yaml"]["applications"][0]
    entry = {"name": "Denoiser", "autoscaling_config": {"min_replicas": 1, "max_replicas": 2,
                                                        "target_ongoing_requests": 1}}
    with_entry = copy.deepcopy(shipped) | {"deployments": [entry]}
    rescaled = copy.deepcopy(with_entry)
    rescaled["deployments"][0]["autoscaling_config"].update(min_replicas=2, max_replicas=2)
    other_args = copy.deepcopy(with_entry)
    other_args["args"]["retention"]["sweep_interval_s"] += 1

    assert version(rescaled) == version(with_entry)
    assert version(with_entry) != version(shipped)
    assert version(other_args) != version(with_entry)


@pytest.mark.parametrize("where", sorted(CONFIGS))
def test_postprocessors_take_one_segment_each_and_autoscale_on_them(where):
    """Every shipped config routes Postprocessor calls through the segment router (one segment per replica at a
    time), leaves each replica room to answer readiness probes while it decodes, and, where it scales, scales on
    one in-flight segment per replica; segments are at least the plan's minimum long."""
    from deployments.workers.postprocessor import Postprocessor
    from deployments.workers.segment_router import SegmentRouter

    args = AppArgs.model_validate(CONFIGS[where]["applications"][0]["args"])
    built = Postprocessor.options(**args.postprocessor.serve_options())._deployment_config
    assert built.request_router_config.request_router_class.endswith(SegmentRouter.__name__)
    assert built.max_ongoing_requests >= 2
    if args.postprocessor.autoscaling is not None:
        assert args.postprocessor.autoscaling.target_ongoing_requests == 1
        assert args.postprocessor.autoscaling.min_replicas >= 1  # short videos need one at once
    assert args.min_segment_latents >= 40


def test_segment_settings_are_checked_at_start():
    """A minimum below the plan's (x264 needs segments of 5 frames or more) and a Postprocessor that could not
    answer a readiness probe while it decodes are refused when the config is read, naming the field."""
    from pydantic import ValidationError

    from deployments.config import MIN_SEGMENT_LATENTS
    from pipeline.segment_plan import MIN_SEGMENT_LATENTS as PLAN_MINIMUM

    assert MIN_SEGMENT_LATENTS == PLAN_MINIMUM
    with pytest.raises(ValidationError, match="min_segment_latents"):
        AppArgs.model_validate({"min_segment_latents": 1})
    with pytest.raises(ValidationError, match="postprocessor.max_ongoing_requests must be at least 2"):
        AppArgs.model_validate({"postprocessor": {"max_ongoing_requests": 1}})
    assert AppArgs.model_validate({"min_segment_latents": 2}).min_segment_latents == 2


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


# ------------------------------------------------------------------------------------------------ one GPU


def test_the_one_gpu_config_places_every_model_on_one_card_and_fits_24_gb():
    """Fractional shares Ray can place on one GPU (the CPU deployments take none), one Denoiser, local storage and
    SQLite (nothing else to set up), and the memory mode whose estimated peak with two jobs at once, plus a CUDA
    context per model process and the step cache's bound, fits a 24 GB card (``bench/service_memory.py``)."""
    import json

    from deployments.config import MODEL_DEPLOYMENTS
    from deployments.jobstore import SqliteJobsConfig
    from deployments.storage import LocalStorageConfig

    args = AppArgs.model_validate(CONFIGS[ONE_GPU]["applications"][0]["args"])
    shares = {name: getattr(args, name).num_gpus for name in MODEL_DEPLOYMENTS}
    assert all(0 < share < 1 for share in shares.values()) and sum(shares.values()) == 1, shares
    assert args.gateway.num_gpus == args.orchestrator.num_gpus == 0
    assert (args.denoiser.autoscaling.min_replicas, args.denoiser.autoscaling.max_replicas) == (1, 1)
    assert isinstance(args.storage, LocalStorageConfig) and isinstance(args.jobs_config(), SqliteJobsConfig)
    assert args.pipeline.memory.mode == "block_offload" and args.pipeline.memory.text_encoder_device == "auto"

    estimate = json.loads((REPO_ROOT / "bench/results/service_memory.json").read_text())
    cuda_context_gb, card_gb = 1.0, 24 * 2**30 / 1e9
    need = (estimate["modes"][args.pipeline.memory.mode]["two_jobs_gb"] + len(MODEL_DEPLOYMENTS) * cuda_context_gb
            + args.pipeline.step_cache.max_bytes / 1e9)
    assert need <= card_gb, f"{need:.1f} GB > {card_gb:.1f} GB"
    assert estimate["modes"]["full"]["two_jobs_gb"] > card_gb  # why the default is not 'full'


def test_the_service_memory_estimate_is_the_scripts(tmp_path):
    """``bench/results/service_memory.*`` is what ``bench/service_memory.py`` computes from the committed
    single-process estimate (so the config test above reads current numbers)."""
    import subprocess
    import sys

    out = tmp_path / "service_memory.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "bench/service_memory.py"), "--json", str(out)], check=True,
                   capture_output=True, cwd=REPO_ROOT)
    assert out.read_text() == (REPO_ROOT / "bench/results/service_memory.json").read_text()
    assert out.with_suffix(".txt").read_text() == (REPO_ROOT / "bench/results/service_memory.txt").read_text()


def _one_gpu_args() -> dict[str, Any]:
    return copy.deepcopy(CONFIGS[ONE_GPU]["applications"][0]["args"])


@pytest.mark.parametrize("change,named", [
    (lambda a: a.update(preset="tiny"), r"checkpoints: preset 'tiny' has random weights .*'preset: stableavatar-1\.3b'"),
    (lambda a: a.update(preset="stableavatar-1.3b-random"), "checkpoints: preset 'stableavatar-1.3b-random' has random"),
    (lambda a: (a.update(device="cpu"), a["pipeline"]["memory"].update(use_stream=True)),
     r"pipeline\.memory\.use_stream: true .* device is 'cpu'"),
    (lambda a: (a["postprocessor"].update(num_gpus=0), a["pipeline"]["memory"].update(use_stream=True)),
     r"pipeline\.memory\.use_stream: true .* postprocessor\.num_gpus is 0"),
    (lambda a: a["pipeline"]["memory"].update(mode="block_offload+model_offload"), "exclude each other"),
    (lambda a: a["pipeline"]["memory"].update(mode="half"), "unknown memory mode"),
    (lambda a: a["pipeline"].update(memory_mode="full"), "pipeline.memory_mode: Extra inputs"),
    (lambda a: a["pipeline"]["step_cache"].update(max_byte=1), "pipeline.step_cache.max_byte: Extra inputs"),
])
def test_the_app_args_refuse_a_memory_setting_that_cannot_work(change, named):
    """Refused when the config is read (Serve's deploy, ``stable-avatar serve``), naming the field, before any
    replica starts and without importing a model library (``tests/test_layering.py``)."""
    import re

    args = _one_gpu_args()
    change(args)
    with pytest.raises(ValidationError) as refused:
        AppArgs.model_validate(args)
    text = "\n".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in refused.value.errors())
    assert re.search(named, text), text


def test_use_stream_is_accepted_where_every_model_replica_has_a_gpu():
    args = _one_gpu_args()
    args["pipeline"]["memory"]["use_stream"] = True
    assert AppArgs.model_validate(args).pipeline.memory.use_stream is True
    args["device"] = "cuda"
    args["preprocessor"]["num_gpus"] = 0  # device cuda: every replica on CUDA whatever its share
    assert AppArgs.model_validate(args).device == "cuda"


def test_relative_checkpoints_and_offload_folder_resolve_where_the_config_is_read(tmp_path, monkeypatch):
    """Replicas may start in another working directory: ``checkpoints: checkpoints`` (the one-GPU example's) and a
    relative ``offload_dir`` are pinned where ``stable-avatar serve`` runs."""
    from deployments.app import pin_paths

    args = _one_gpu_args()
    args["pipeline"]["memory"]["offload_dir"] = "offload"
    monkeypatch.chdir(tmp_path)
    pinned = pin_paths(AppArgs.model_validate(args))
    assert pinned.checkpoints == tmp_path / "checkpoints"
    assert pinned.pipeline.memory.offload_dir == tmp_path / "offload"
    assert pinned.pipeline.memory.mode == "block_offload" and pinned.pipeline.step_cache.max_bytes == 2**31


# ------------------------------------------------------------------------------ parallel units (sp_degree)


@pytest.mark.parametrize("where", sorted(CONFIGS))
def test_every_config_keeps_one_gpu_per_denoiser_replica_and_takes_a_parallel_unit(where):
    """The shipped configs run ``sp_degree: 1`` (no placement group: today's replicas); the same config with
    ``denoiser.sp_degree: 2`` loads through Ray's schema and ``AppArgs`` and gives each replica one bundle per rank
    (its per-rank CPUs, GPUs and memory), all on one node (STRICT_PACK)."""
    from deployments.workers.denoiser import Denoiser

    args = AppArgs.model_validate(CONFIGS[where]["applications"][0]["args"])
    assert args.denoiser.sp_degree == 1 and "placement_group_bundles" not in args.denoiser.serve_options()
    config = copy.deepcopy(CONFIGS[where])
    denoiser = config["applications"][0]["args"]["denoiser"]
    denoiser.update(sp_degree=2, num_gpus=max(1, denoiser.get("num_gpus", 0)))
    assert not config_problems(config)
    options = AppArgs.model_validate(config["applications"][0]["args"]).denoiser
    rank = {"GPU": options.num_gpus} | ({"CPU": options.num_cpus} if options.num_cpus else {}) | (
        {"memory": int(options.memory_gb * 2**30)} if options.memory_gb else {})
    built = Denoiser.options(**options.serve_options())._replica_config
    assert built.placement_group_bundles == [rank, rank]
    assert built.placement_group_strategy == "STRICT_PACK"
    assert built.ray_actor_options["num_gpus"] == options.num_gpus  # rank 0, the replica, fits bundle 0


@pytest.mark.parametrize("denoiser,named", [
    ({"sp_degree": 0, "num_gpus": 1}, "denoiser.sp_degree\n  Input should be greater than or equal to 1"),
    ({"sp_degree": 22, "num_gpus": 1}, "denoiser.sp_degree: sp_degree must be between 2 and 21"),
    ({"sp_degree": 2}, "denoiser.sp_degree 2 needs whole GPUs per rank"),
    ({"sp_degree": 2, "num_gpus": 0.5}, "denoiser.sp_degree 2 needs whole GPUs per rank"),
])
def test_a_bad_sp_degree_is_refused_at_start_naming_the_field(denoiser, named):
    with pytest.raises(ValidationError) as raised:
        AppArgs.model_validate({"denoiser": denoiser})
    assert named in str(raised.value)


def test_sp_degree_names_the_attention_the_heads_allow_and_what_it_does_not_support():
    from pipeline.sequence_parallel import ulysses_degrees

    with pytest.raises(ValidationError, match=r"Ulysses attention at \[2\] \(the preset's 2 heads\)"):
        AppArgs.model_validate({"denoiser": {"sp_degree": 22, "num_gpus": 1}})
    assert ulysses_degrees(2) == [2]
    AppArgs.model_validate({"denoiser": {"sp_degree": 3, "num_gpus": 1}})  # 2 heads: ring attention
    with pytest.raises(ValidationError, match="denoiser.sp_degree > 1 does not support pipeline.compile"):
        AppArgs.model_validate({"denoiser": {"sp_degree": 2, "num_gpus": 1}, "pipeline": {"compile": True}})
    with pytest.raises(ValidationError, match="postprocessor.sp_degree: only the denoiser"):
        AppArgs.model_validate({"postprocessor": {"sp_degree": 2}})
