"""Offline validation of ``k8s/``: kustomize rendering, KubeRay CRD schemas, the embedded Serve config and
``AppArgs``, the cluster's own fault tolerance (GCS FT with Redis, nothing Serve-related on the head,
PodDisruptionBudgets), and the issue's production requirements. Broken copies must fail with a message naming the
field.

The logic lives in ``tools/k8s_validate.py`` and ``tools/k8s_ray_ha.py``; this file only feeds them manifests and
corrupted copies.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tools.k8s_ray_ha import disruption_budget_problems, pdb_spec_problems
from tools.k8s_validate import (
    K8S_DIR,
    REPO_ROOT,
    CrdSchemas,
    KustomizeError,
    Manifest,
    TreeReport,
    app_deployments,
    check_manifest,
    default_crd_dir,
    deployment_names_in_source,
    json6902,
    render_kustomization,
    serve_config_drift,
    validate_tree,
)

CORE_DEPLOYMENTS = {"Gateway", "Orchestrator", "Preprocessor", "Denoiser", "Postprocessor"}


@pytest.fixture(scope="module")
def schemas() -> CrdSchemas:
    """The CRD files are ~1 MB each: parse them once for the whole module."""
    crd_dir = default_crd_dir()
    if not crd_dir.is_dir():
        pytest.fail(f"KubeRay CRDs not found at {crd_dir} (set KUBERAY_CRDS)")
    return CrdSchemas(crd_dir)


@pytest.fixture(scope="module")
def report(schemas: CrdSchemas) -> TreeReport:
    return validate_tree(K8S_DIR, schemas)


def rayservice(report: TreeReport, kustomization: str) -> dict[str, Any]:
    (doc,) = report.rendered[kustomization].of_kind("RayService")
    return copy.deepcopy(doc)


def groups(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def serve_args(doc: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"]


# ------------------------------------------------------------------------------------------ the real tree


def test_every_manifest_is_valid(report: TreeReport) -> None:
    assert not report.problems, "\n".join(report.problems)


def test_renders_the_expected_objects(report: TreeReport) -> None:
    kinds = {name: sorted(m.doc["kind"] for m in r.manifests) for name, r in report.rendered.items()}
    budgets = ["PodDisruptionBudget"] * 2  # one per worker group
    assert kinds == {
        "k8s/base": [*budgets, "PodMonitor", "RayService"],
        # + its own PostgreSQL (StatefulSet, Service) and Redis (Deployment, claim, Service)
        "k8s/overlays/dev": ["Deployment", "PersistentVolumeClaim", *budgets, "PodMonitor", "RayService", "Service",
                             "Service", "StatefulSet"],
        "k8s/weights": ["Job", "PersistentVolumeClaim"],
    }
    # the examples, applied by hand: S3 credentials; the jobs database DSN, URL signing secret and API keys; the dev
    # PostgreSQL's own credentials; the GCS Redis password
    assert sorted(m.doc["metadata"]["name"] for m in report.loose if m.doc["kind"] == "Secret") == [
        "stable-avatar-postgres", "stable-avatar-redis", "stable-avatar-s3", "stable-avatar-service"]
    assert len(report.loose) == 4
    for r in report.rendered.values():
        for m in r.manifests:
            assert m.doc["metadata"]["namespace"] == "stable-avatar"
            assert m.doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "stable-avatar"


@pytest.mark.parametrize("kustomization", ["k8s/base", "k8s/overlays/dev"])
def test_production_requirements(report: TreeReport, kustomization: str) -> None:
    doc = rayservice(report, kustomization)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["metadata"]["annotations"]["ray.io/initializing-timeout"]
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert doc["spec"]["excludeHeadPodFromServeSvc"] is True
    assert cluster["gcsFaultToleranceOptions"] == {  # the Redis password only from the Secret
        "redisAddress": "stable-avatar-redis:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "stable-avatar-redis", "key": "REDIS_PASSWORD"}}}}
    budgets = report.rendered[kustomization].of_kind("PodDisruptionBudget")
    assert {b["spec"]["selector"]["matchLabels"]["ray.io/group"] for b in budgets} == set(groups(doc))
    gpu = groups(doc)["gpu"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    gpu_spec = gpu["template"]["spec"]
    assert gpu_spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {t["key"] for t in gpu_spec["tolerations"]} >= {"nvidia.com/gpu"}
    models = [v for v in gpu_spec["volumes"] if "persistentVolumeClaim" in v]
    assert models and models[0]["persistentVolumeClaim"]["claimName"] == "stable-avatar-models"
    mounts = {m["mountPath"]: m for m in gpu_spec["containers"][0]["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    templates = [cluster["headGroupSpec"]["template"], *(g["template"] for g in groups(doc).values())]
    for template in templates:  # /dev/shm as a memory emptyDir on every pod (Ray's object store)
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        shm = [m["name"] for m in template["spec"]["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm and volumes[shm[0]]["emptyDir"]["medium"] == "Memory"
    for group in groups(doc).values():  # S3 credentials from the Secret on every worker
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "stable-avatar-s3", "key": key}
    # the service's secrets on the CPU pods (Gateway, Orchestrator): jobs database, URL signing secret, API keys
    cpu_env = {e["name"]: e for e in groups(doc)["cpu"]["template"]["spec"]["containers"][0]["env"]}
    for key in ("STABLE_AVATAR_JOBS_DSN", "STABLE_AVATAR_URL_SECRET", "STABLE_AVATAR_API_KEYS"):
        assert cpu_env[key]["valueFrom"]["secretKeyRef"] == {"name": "stable-avatar-service", "key": key}
    # the webhook signing key: optional (without it the service makes one in its jobs database)
    assert cpu_env["STABLE_AVATAR_WEBHOOK_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "stable-avatar-service", "key": "STABLE_AVATAR_WEBHOOK_KEY", "optional": True}
    args = serve_args(doc)
    assert args["preset"] == "stableavatar-1.3b" and args["checkpoints"] == "/models/stableavatar"
    assert args["storage"]["kind"] == "s3"
    assert args["jobs"] == {"kind": "postgres", "dsn_env": "STABLE_AVATAR_JOBS_DSN"}  # the DSN never in the YAML
    assert set(args["retention"]) == {"results_s", "uploads_s", "inputs_s", "jobs_s", "checkpoints_s",
                                      "sweep_interval_s"}
    assert args["storage"]["url_expiry_s"] <= args["retention"]["results_s"]  # no link outlives its file
    assert "api_key" not in doc["spec"]["serveConfigV2"].lower()  # keys come from the Secret, never the config


def test_dev_overlay_is_a_small_cluster(report: TreeReport) -> None:
    base, dev = rayservice(report, "k8s/base"), rayservice(report, "k8s/overlays/dev")
    assert groups(dev)["gpu"]["maxReplicas"] == 1 < groups(base)["gpu"]["maxReplicas"]
    assert groups(dev)["cpu"]["maxReplicas"] == 1 < groups(base)["cpu"]["minReplicas"] == 2
    assert serve_args(dev)["denoiser"]["autoscaling"]["max_replicas"] == 1
    assert set(serve_args(dev)) == set(serve_args(base))  # the overlay changes values, not the shape


def test_one_image_everywhere(report: TreeReport) -> None:
    """The weights Job and the service run the same image, mapped from the placeholder name in both places (the
    dev overlay's PostgreSQL and Redis are the only other images)."""
    images = {c["image"] for r in report.rendered.values() for m in r.manifests
              if m.doc["kind"] not in ("StatefulSet", "Deployment") for c in _all_containers(m.doc)}
    assert len(images) == 1 and images.pop().endswith("/stable-avatar-serve:0.1.0")


def test_dev_overlay_runs_its_own_postgres_where_the_dsn_points(report: TreeReport) -> None:
    from urllib.parse import urlsplit

    dev = report.rendered["k8s/overlays/dev"]
    (db,) = dev.of_kind("StatefulSet")
    (svc,) = [s for s in dev.of_kind("Service") if s["metadata"]["name"] == db["spec"]["serviceName"]]
    pod = db["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "postgres:15" and db["spec"]["replicas"] == 1
    env = {e["name"]: e for e in container["env"]}
    for key in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "stable-avatar-postgres", "key": key}
    (claim,) = db["spec"]["volumeClaimTemplates"]
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}[claim["metadata"]["name"]]
    assert env["PGDATA"]["value"].startswith(mount + "/")  # the data lives on the claim
    assert db["spec"]["serviceName"] == svc["metadata"]["name"] and svc["spec"]["ports"][0]["port"] == 5432
    # the example DSN (and the README's command) reach this Service by its in-cluster name
    (service_secret,) = [m.doc for m in report.loose if m.doc["metadata"]["name"] == "stable-avatar-service"]
    dsn = urlsplit(service_secret["stringData"]["STABLE_AVATAR_JOBS_DSN"])
    assert (dsn.hostname, dsn.port) == (f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local",
                                        5432)
    (credentials,) = [m.doc for m in report.loose if m.doc["metadata"]["name"] == "stable-avatar-postgres"]
    assert (dsn.username, dsn.path.lstrip("/")) == (credentials["stringData"]["POSTGRES_USER"],
                                                   credentials["stringData"]["POSTGRES_DB"])
    assert "app.kubernetes.io/name" not in db["spec"]["template"]["metadata"]["labels"]  # not scraped as a Ray pod


def test_budgets_let_drains_through_one_pod_at_a_time(report: TreeReport) -> None:
    """Base: of 2 CPU pods one may go; the GPU group (0..9 pods) keeps its last one. Dev (one pod per group): a
    drain is never blocked. Integer minAvailable in both (see tools/k8s_ray_ha.py for why not maxUnavailable)."""
    for kustomization, want in (("k8s/base", {"cpu": 1, "gpu": 1}), ("k8s/overlays/dev", {"cpu": 0, "gpu": 0})):
        budgets = {b["spec"]["selector"]["matchLabels"]["ray.io/group"]: b["spec"]
                   for b in report.rendered[kustomization].of_kind("PodDisruptionBudget")}
        assert {g: b["minAvailable"] for g, b in budgets.items()} == want
        assert all("maxUnavailable" not in b and b["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
                   for b in budgets.values())
        for group, spec in budgets.items():
            assert spec["selector"]["matchLabels"] == {"ray.io/originated-from-cr-name": "stable-avatar",
                                                       "ray.io/node-type": "worker", "ray.io/group": group}
    # the label the budgets select on is on every pod template, head included (KubeRay sets it on the RayCluster)
    cluster = rayservice(report, "k8s/base")["spec"]["rayClusterConfig"]
    for template in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
        assert template["metadata"]["labels"]["ray.io/originated-from-cr-name"] == "stable-avatar"


def test_dev_overlay_runs_the_redis_the_head_points_at(report: TreeReport) -> None:
    dev = report.rendered["k8s/overlays/dev"]
    (redis,) = dev.of_kind("Deployment")
    (svc,) = [s for s in dev.of_kind("Service") if s["metadata"]["name"] == "stable-avatar-redis"]
    options = rayservice(report, "k8s/overlays/dev")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options["redisAddress"] == f"{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    container = redis["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    head_secret = options["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert env == {"REDIS_PASSWORD": head_secret, "REDISCLI_AUTH": head_secret}  # one password, from the Secret
    script = " ".join(container["args"])
    assert "requirepass" in script and "--appendonly yes" in script and "$REDIS_PASSWORD" not in script.split(
        "exec", 1)[1]  # the password goes into a file, not onto redis-server's command line
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in redis["spec"]["template"]["spec"]["volumes"]}
    assert "--dir " + mounts["data"] in script and claims["data"] in {
        c["metadata"]["name"] for c in dev.of_kind("PersistentVolumeClaim")}  # the append-only file survives restarts
    assert redis["spec"]["strategy"]["type"] == "Recreate"  # a ReadWriteOnce claim: one pod at a time
    (example,) = [m.doc for m in report.loose if m.doc["metadata"]["name"] == head_secret["name"]]
    assert set(example["stringData"]) == {head_secret["key"]}


def _all_containers(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        found = [c for k in ("containers", "initContainers") for c in node.get(k) or []]
        return found + [c for k, v in node.items() if k not in ("containers", "initContainers")
                        for c in _all_containers(v)]
    if isinstance(node, list):
        return [c for item in node for c in _all_containers(item)]
    return []


def test_weights_job_fills_what_the_service_waits_for(report: TreeReport) -> None:
    (job,) = report.rendered["k8s/weights"].of_kind("Job")
    (pvc,) = report.rendered["k8s/weights"].of_kind("PersistentVolumeClaim")
    script = " ".join(job["spec"]["template"]["spec"]["containers"][0]["command"])
    assert "stable-avatar download-weights --dir /models/stableavatar" in script
    gpu_spec = groups(rayservice(report, "k8s/base"))["gpu"]["template"]["spec"]
    wait = " ".join(gpu_spec["initContainers"][0]["command"])
    assert "/models/stableavatar/.download-complete" in script and "/models/stableavatar/.download-complete" in wait
    claims = {v["persistentVolumeClaim"]["claimName"] for v in gpu_spec["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {pvc["metadata"]["name"]}


def test_podmonitor_selects_the_ray_pods(report: TreeReport) -> None:
    (monitor,) = report.rendered["k8s/base"].of_kind("PodMonitor")
    doc = rayservice(report, "k8s/base")
    cluster = doc["spec"]["rayClusterConfig"]
    for template in [cluster["headGroupSpec"]["template"], *(g["template"] for g in groups(doc).values())]:
        labels = {**template["metadata"]["labels"], "ray.io/is-ray-node": "yes"}  # the latter set by KubeRay
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert "metrics" in {p["name"] for p in template["spec"]["containers"][0]["ports"]}


@pytest.mark.parametrize("kustomization", ["k8s/base", "k8s/overlays/dev"])
def test_consistent_with_serve_config_yaml(report: TreeReport, kustomization: str) -> None:
    local = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    cluster = yaml.safe_load(rayservice(report, kustomization)["spec"]["serveConfigV2"])
    assert serve_config_drift(local, cluster) == []


def test_serve_config_drift_is_detected() -> None:
    local = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    cluster = copy.deepcopy(local)
    cluster["applications"][0]["import_path"] = "deployments.other:build_app"
    del cluster["applications"][0]["args"]["pipeline"]
    cluster["applications"][0]["args"]["conditioning_cache_size"] = 8
    drift = "\n".join(serve_config_drift(local, cluster))
    assert "import_path: serve_config.yaml 'deployments.app:build_app'" in drift
    assert "args.pipeline: set in serve_config.yaml but not in the RayService" in drift
    assert "args.conditioning_cache_size: set in the RayService but not in serve_config.yaml" in drift


def test_deployment_names_come_from_the_bound_application() -> None:
    from deployments.app import build_app
    from deployments.config import AppArgs

    names = set(app_deployments(build_app(AppArgs())))
    assert names >= CORE_DEPLOYMENTS
    assert names == deployment_names_in_source()  # the fallback agrees with the DAG walk


# ------------------------------------------------------------------------ corrupted copies, file by file


@pytest.mark.parametrize(("file", "old", "new", "expected"), [
    ("base/rayservice.yaml", "  rayClusterConfig:\n", "  rayClusterConfg:\n",
     "spec.rayClusterConfg: unknown field (did you mean 'rayClusterConfig'?)"),
    ("base/rayservice.yaml", "preset: stableavatar-1.3b", "preset: nope",
     "spec.serveConfigV2.applications[0].args: Value error, unknown preset 'nope'"),
    ("base/rayservice.yaml", "claimName: stable-avatar-models", "claimName: stable-avatar-model",
     "claimName 'stable-avatar-model': no PersistentVolumeClaim of that name"),
    ("overlays/dev/rayservice-patch.yaml", "workerGroupSpecs/1/groupName, value: gpu}",
     "workerGroupSpecs/1/groupName, value: gpus}", "expected 'gpus', found 'gpu'"),
    ("overlays/dev/rayservice-patch.yaml", "workerGroupSpecs/0/maxReplicas", "workerGroupSpecs/0/maxReplica",
     "replace /spec/rayClusterConfig/workerGroupSpecs/0/maxReplica: the path does not exist"),
    ("weights/download-weights-job.yaml", "          volumeMounts:", "          volumeMount:",
     "spec.template.spec.containers[0].volumeMount: unknown field (did you mean 'volumeMounts'?)"),
    ("base/kustomization.yaml", "images:", "imagez:", "imagez: not in the supported kustomize subset"),
    ("s3-credentials.example.yaml", "  name: stable-avatar-s3\n", "  nme: stable-avatar-s3\n",
     "metadata.name: required field is missing"),
    ("overlays/dev/postgres.yaml", "  selector: {app.kubernetes.io/component: jobs-database}",
     "  selector: {app.kubernetes.io/component: jobs-db}",
     "Service/postgres: spec.selector: {'app.kubernetes.io/component': 'jobs-db'} matches the labels of no pod"),
    ("overlays/dev/postgres.yaml", "targetPort: postgres}", "targetPort: pg}",
     "spec.ports[0].targetPort: no selected container has a port named 'pg'"),
    ("overlays/dev/postgres.yaml", "port: 5432, targetPort", "port: 543200, targetPort",
     "spec.ports[0].port: must be a port number (1-65535), not 543200"),
    ("overlays/dev/postgres.yaml", "  serviceName: postgres", "  serviceName: postgress",
     "serviceName 'postgress': no Service of that name is defined"),
    ("overlays/dev/postgres.yaml", "  volumeClaimTemplates:", "  volumeClaimTemplate:",
     "spec.volumeClaimTemplate: unknown field (did you mean 'volumeClaimTemplates'?)"),
    ("overlays/dev/postgres.yaml", "            storage: 5Gi", "            storage: five",
     "spec.volumeClaimTemplates[0].spec.resources.requests.storage: not a quantity: 'five'"),
    ("overlays/dev/postgres.yaml", "    matchLabels: {app.kubernetes.io/component: jobs-database}",
     "    matchLabels: {app.kubernetes.io/component: database}",
     "spec.selector.matchLabels.app.kubernetes.io/component: 'database' is not a label of the pod template"),
    ("overlays/dev/postgres.yaml", "          readinessProbe:", "          readinesProbe:",
     "spec.template.spec.containers[0].readinesProbe: unknown field (did you mean 'readinessProbe'?)"),
    ("overlays/dev/postgres.yaml", "name: stable-avatar-postgres, key: POSTGRES_PASSWORD",
     "name: stable-avatar-pg, key: POSTGRES_PASSWORD", "secretKeyRef 'stable-avatar-pg': no Secret of that name"),
    ("overlays/dev/postgres.yaml", "mountPath: /var/lib/postgresql/data}", "mountPath: /var/lib/postgresql/data}\n"
     "            - {name: scratch, mountPath: /scratch}", "volume 'scratch' is not declared in spec.volumes"),
    # GCS fault tolerance: the Redis password only from a Secret, the new form alone, a Redis that exists
    ("base/rayservice.yaml", "        valueFrom:\n          secretKeyRef: {name: stable-avatar-redis, key: REDIS_PASSWORD}",
     "        value: hunter2", "gcsFaultToleranceOptions.redisPassword: must be valueFrom.secretKeyRef"),
    ("base/rayservice.yaml", '    ray.io/initializing-timeout: "45m"',
     '    ray.io/initializing-timeout: "45m"\n    ray.io/ft-enabled: "true"',
     "metadata.annotations.ray.io/ft-enabled: the older GCS FT form"),
    ("base/rayservice.yaml", "redisAddress: stable-avatar-redis:6379", "redisAddress: stable-avatar-rediss:6379",
     "redisAddress 'stable-avatar-rediss': no Service of that name is defined"),
    ("overlays/dev/redis.yaml", "    matchLabels: {app.kubernetes.io/component: gcs-store}",
     "    matchLabels: {app.kubernetes.io/component: redis}",
     "Deployment/stable-avatar-redis: spec.selector.matchLabels.app.kubernetes.io/component: 'redis' is not a label "
     "of the pod template (the Deployment would own no pod)"),
    ("overlays/dev/redis.yaml", "  strategy:\n", "  strategie:\n",
     "Deployment/stable-avatar-redis: spec.strategie: unknown field (did you mean 'strategy'?)"),
    # nothing Serve-related on the head
    ("base/rayservice.yaml", 'num-cpus: "0"                    # no Serve', 'num-cpus: "2"                    # no Serve',
     'headGroupSpec.rayStartParams.num-cpus: must be "0"'),
    ("base/rayservice.yaml", "excludeHeadPodFromServeSvc: true", "excludeHeadPodFromServeSvc: false",
     "spec.excludeHeadPodFromServeSvc: must be true"),
    # PodDisruptionBudgets: every worker group, through the RayService's label, with an integer minAvailable
    ("base/pdb.yaml", "      ray.io/group: gpu", "      ray.io/group: gpus",
     "workerGroupSpecs[1] (gpu): no PodDisruptionBudget selects this group's pods"),
    ("base/pdb.yaml", "  minAvailable: 1                        # of 2 CPU pods: a drain takes one at a time, a "
     "Gateway stays up", "  maxUnavailable: 1",
     "PodDisruptionBudget/stable-avatar-cpu: spec.maxUnavailable: use an integer minAvailable"),
    ("base/pdb.yaml", "      ray.io/originated-from-cr-name: stable-avatar\n      ray.io/node-type: worker\n"
     "      ray.io/group: cpu", "      ray.io/cluster: stable-avatar-x7k2p\n      ray.io/node-type: worker\n"
     "      ray.io/group: cpu", "spec.selector.matchLabels.ray.io/cluster: names one RayCluster"),
    ("base/rayservice.yaml", "              ray.io/originated-from-cr-name: stable-avatar\n          spec:\n"
     "            tolerations:", "          spec:\n            tolerations:",
     "workerGroupSpecs[1] (gpu): the pod template's label ray.io/originated-from-cr-name must be 'stable-avatar'"),
    ("overlays/dev/pdb-patch.yaml", "minAvailable, value: 0}", "minAvailable, value: 1}",
     "spec.minAvailable: 1 with at most 1 pod(s) in group 'cpu': no eviction is ever allowed"),
], ids=["misspelled-spec-field", "bad-appargs-preset", "dangling-claim", "patch-test-guard", "patch-bad-path",
        "job-pod-typo", "unsupported-kustomize-field", "secret-without-name", "service-selects-nothing",
        "service-unknown-target-port", "service-port-range", "statefulset-dangling-service",
        "statefulset-misspelled-spec", "claim-template-bad-storage", "statefulset-selector-mismatch",
        "statefulset-pod-typo", "dangling-secret", "undeclared-volume", "redis-password-inline",
        "gcs-ft-mixed-with-annotation", "redis-address-dangling-service", "deployment-selector-mismatch",
        "deployment-misspelled-spec", "head-offers-cpus", "head-proxy-in-serve-service", "worker-group-without-budget",
        "budget-max-unavailable", "budget-selects-one-cluster", "pod-template-without-cr-name-label",
        "budget-blocks-every-drain"])
def test_corrupted_file_fails_with_the_field_named(schemas: CrdSchemas, tmp_path: Path, file: str, old: str,
                                                   new: str, expected: str) -> None:
    root = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, root)
    text = (root / file).read_text()
    assert old in text, f"the corruption no longer applies to {file}: update the test"
    (root / file).write_text(text.replace(old, new, 1))
    problems = "\n".join(validate_tree(root, schemas).problems)
    assert expected in problems, problems


# ---------------------------------------------------------------- corrupted copies of the rendered object


def _group(i: int, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][i][key] = value
    return mutate


def _rename_in_group(i: int, old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        group = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][i]
        group[new] = group.pop(old)
    return mutate


def _serve(edit: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        config = yaml.safe_load(doc["spec"]["serveConfigV2"])
        edit(config)
        doc["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    return mutate


def _override(**entry: Any) -> Callable[[dict[str, Any]], None]:
    """Add a ``deployments:`` entry to the application."""
    return _serve(lambda c: c["applications"][0].__setitem__("deployments", [entry]))


def _args(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        node = config["applications"][0]["args"]
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return _serve(edit)


def _cluster(edit: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    return lambda doc: edit(doc["spec"]["rayClusterConfig"])


def _head(edit: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    return _cluster(lambda c: edit(c["headGroupSpec"]))


def _ft(**options: Any) -> Callable[[dict[str, Any]], None]:
    """Set (a value) or drop (None) fields of gcsFaultToleranceOptions."""
    def edit(cluster: dict[str, Any]) -> None:
        for key, value in options.items():
            if value is None:
                cluster["gcsFaultToleranceOptions"].pop(key, None)
            else:
                cluster["gcsFaultToleranceOptions"][key] = value
    return _cluster(edit)


_GROUPS = "spec.rayClusterConfig.workerGroupSpecs[1]"
_APP = "spec.serveConfigV2.applications[0]"
_FIRST_OVERRIDE = f"{_APP}.deployments[0]"


@pytest.mark.parametrize(("mutate", "expected"), [
    (_rename_in_group(1, "minReplicas", "minReplica"),
     [f"{_GROUPS}.minReplica: unknown field (did you mean 'minReplicas'?)", f"{_GROUPS}.minReplicas: required"]),
    (_group(1, "replicas", "two"), [f"{_GROUPS}.replicas: 'two' is not of type 'integer'"]),
    (_group(1, "minReplicas", 12), [f"{_GROUPS}.minReplicas: 12 is above maxReplicas (11)"]),
    (_group(1, "maxReplicas", 4), ["need 10.5 GPUs at their maximum scale but the pods offer at most 4"]),
    (_override(name="Denoizer", max_ongoing_requests=1),
     [f"{_FIRST_OVERRIDE}.name: 'Denoizer' is not a deployment of application 'stable-avatar'"]),
    (_override(name="Denoiser", max_ongoing_request=1),
     [f"{_FIRST_OVERRIDE}.max_ongoing_request: unknown field (did you mean 'max_ongoing_requests'?)"]),
    (_args("preset", "nope"), [f"{_APP}.args: Value error, unknown preset 'nope'"]),
    (_args("denoiser.num_gpu", 1), [f"{_APP}.args.denoiser.num_gpu: Extra inputs are not permitted"]),
    (_args("denoiser.autoscaling.min_replicas", 9),
     [f"{_APP}.args.denoiser.autoscaling: Value error, min_replicas must not exceed max_replicas"]),
    (_args("denoiser.autoscaling.target_ongoing_requests", 100),
     ["<Denoiser as built from args>.autoscaling_config.target_ongoing_requests: 100.0 is above "
      "max_ongoing_requests (64)"]),
    (_override(name="Denoiser", autoscaling_config={"min_replicas": 3, "max_replicas": 2}),
     [f"{_FIRST_OVERRIDE}.autoscaling_config: Value error, max_replicas (2) must be greater than or equal "
      "to min_replicas (3)"]),
    (_override(name="Denoiser", autoscaling_config={"min_replicas": 0, "max_replicas": 0}),
     [f"{_FIRST_OVERRIDE}.autoscaling_config.max_replicas: Input should be greater than 0"]),
    (_override(name="Denoiser", autoscaling_config={"min_replicas": 0, "max_replicas": 2, "initial_replicas": 5}),
     ["must be greater than or equal to initial_replicas (5)"]),
    (_override(name="Denoiser", max_ongoing_requests=1,
               autoscaling_config={"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 3}),
     [f"{_FIRST_OVERRIDE}.autoscaling_config.target_ongoing_requests: 3.0 is above max_ongoing_requests"]),
    (_override(name="Denoiser", autoscaling_config={"min_replicas": 0, "max_replicas": 2, "max_replica": 3}),
     [f"{_FIRST_OVERRIDE}.autoscaling_config.max_replica: unknown field (did you mean 'max_replicas'?)"]),
    (_override(name="Denoiser", autoscaling_config={"min_replicas": 0, "max_replicas": 12,
                                                    "target_ongoing_requests": 1}),
     [f"{_FIRST_OVERRIDE}.autoscaling_config.max_replicas: 12 is above the 8 replicas that args.denoiser "
      "allows, which the app plans with; raise it there"]),
    (_override(name="Postprocessor", autoscaling_config={"min_replicas": 1, "max_replicas": 5}),
     [f"{_FIRST_OVERRIDE}.autoscaling_config.max_replicas: 5 is above the 4 replicas that args.postprocessor "
      "allows"]),
    (_serve(lambda c: c.__setitem__("http_option", {})),
     ["spec.serveConfigV2.http_option: unknown field (did you mean 'http_options'?)"]),
    (_serve(lambda c: c["http_options"].__setitem__("host", "127.0.0.1")),
     ["spec.serveConfigV2.http_options.host: must be 0.0.0.0 on Kubernetes"]),
    (_args("gateway.num_cpus", 0), ["deployment Gateway asks for no CPU and no GPU"]),
    (_args("preprocessor.memory_gb", 200), ["no pod fits one Preprocessor replica"]),
    (lambda d: d["spec"]["rayClusterConfig"].__setitem__("rayVersion", "2.9.0"),
     ["spec.rayClusterConfig.rayVersion: '2.9.0' but the project pins ray"]),
    (lambda d: d["spec"]["rayClusterConfig"].__setitem__("enableInTreeAutoscaling", False),
     ["spec.rayClusterConfig.enableInTreeAutoscaling: Serve autoscaling is configured"]),
    (lambda d: d["metadata"]["annotations"].__setitem__("ray.io/initializing-timeout", 30),
     ["metadata.annotations.ray.io/initializing-timeout: must be a string"]),
    # GCS fault tolerance
    (_cluster(lambda c: c.pop("gcsFaultToleranceOptions")),
     ["spec.rayClusterConfig.gcsFaultToleranceOptions: required: without GCS fault tolerance"]),
    (_ft(redisAdress="x:1"), ["gcsFaultToleranceOptions.redisAdress: unknown field (did you mean 'redisAddress'?)"]),
    (_ft(redisAddress="stable-avatar-redis"), ["gcsFaultToleranceOptions.redisAddress: 'stable-avatar-redis': must be "
                                              "host:port"]),
    (_ft(redisPassword={"valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}),
     ["gcsFaultToleranceOptions.redisPassword: must be valueFrom.secretKeyRef"]),
    (_ft(externalStorageNamespace="stable-avatar"),
     ["gcsFaultToleranceOptions.externalStorageNamespace: leave unset"]),
    (_ft(backend="rocksdb"), ["gcsFaultToleranceOptions.backend: 'rocksdb': the external Redis"]),
    (lambda d: d["metadata"]["annotations"].__setitem__("ray.io/external-storage-namespace", "x"),
     ["metadata.annotations.ray.io/external-storage-namespace: the older GCS FT form"]),
    (_head(lambda h: h["rayStartParams"].__setitem__("redis-password", "hunter2")),
     ["headGroupSpec.rayStartParams.redis-password: set by KubeRay from gcsFaultToleranceOptions"]),
    (_head(lambda h: h["template"]["spec"]["containers"][0].__setitem__(
        "env", [{"name": "RAY_REDIS_ADDRESS", "value": "redis:6379"}])),
     ["headGroupSpec.template.spec.containers[0].env[0]: RAY_REDIS_ADDRESS is set by KubeRay"]),
    # nothing Serve-related on the head
    (_head(lambda h: h["rayStartParams"].__setitem__("num-gpus", "1")),
     ['headGroupSpec.rayStartParams.num-gpus: must be "0" or unset']),
    (_head(lambda h: h["rayStartParams"].__setitem__("resources", '"{\\"serve\\": 1}"')),
     ["headGroupSpec.rayStartParams.resources: the head must offer no custom resource"]),
    (_head(lambda h: h["template"]["spec"]["containers"][0]["resources"]["limits"].__setitem__("nvidia.com/gpu", 1)),
     ["headGroupSpec.template.spec.containers[0].resources.nvidia.com/gpu: the head must not hold a GPU"]),
    (lambda d: d["spec"].pop("excludeHeadPodFromServeSvc"), ["spec.excludeHeadPodFromServeSvc: must be true"]),
    (_serve(lambda c: c.__setitem__("proxy_location", "HeadOnly")),
     ["spec.serveConfigV2.proxy_location: HeadOnly puts the only proxy on the head"]),
])
def test_corrupted_rayservice_fails_with_the_field_named(report: TreeReport, schemas: CrdSchemas,
                                                         mutate: Callable[[dict[str, Any]], None],
                                                         expected: list[str]) -> None:
    doc = rayservice(report, "k8s/base")
    mutate(doc)
    problems = "\n".join(check_manifest(doc, schemas))
    for text in expected:
        assert text in problems, problems


def test_a_deployments_entry_that_scales_within_the_ceilings_in_args_passes(report: TreeReport,
                                                                            schemas: CrdSchemas) -> None:
    """The in-place rescale k8s/README.md shows (Scale): Denoiser bounds moved below ``args``' ceiling."""
    doc = rayservice(report, "k8s/base")
    _override(name="Denoiser", max_ongoing_requests=64,
              autoscaling_config={"min_replicas": 2, "max_replicas": 8, "target_ongoing_requests": 1})(doc)
    assert check_manifest(doc, schemas) == []


# ---------------------------------------------------------------------------------- PodDisruptionBudgets


@pytest.mark.parametrize(("spec", "expected"), [
    ({"minAvailable": 1, "maxUnavailable": 1, "selector": {"matchLabels": {"a": "b"}}},
     "spec: set exactly one of minAvailable and maxUnavailable"),
    ({"minAvailable": "half", "selector": {"matchLabels": {"a": "b"}}},
     "spec.minAvailable: must be a non-negative integer or a percentage, not 'half'"),
    ({"minAvailable": 1, "selector": {}}, "spec.selector: must be matchLabels only"),
    ({"minAvailable": 1, "selector": {"matchLabels": {"a": "b"},
                                      "matchExpressions": [{"key": "a", "operator": "Exists"}]}},
     "spec.selector: must be matchLabels only"),
    ({"minAvailable": 1, "selector": {"matchLabels": {"a": "b"}}, "unhealthyPodEvictionPolicy": "Always"},
     "spec.unhealthyPodEvictionPolicy: 'Always': one of AlwaysAllow, IfHealthyBudget"),
    ({"minAvailable": 1, "selector": {"matchLabels": {"a": "b"}}, "maxUnavailble": 1},
     "spec.maxUnavailble: unknown field"),
])
def test_budget_fields_are_checked(spec: dict[str, Any], expected: str) -> None:
    assert any(problem.startswith(expected) for problem in pdb_spec_problems(spec)), pdb_spec_problems(spec)


def test_a_group_under_two_budgets_is_refused(report: TreeReport) -> None:
    """The eviction API refuses to evict a pod that several budgets cover, so a drain would stop at it."""
    docs = copy.deepcopy([m.doc for m in report.rendered["k8s/base"].manifests])
    (cpu,) = [d for d in docs if d["metadata"]["name"] == "stable-avatar-cpu"]
    docs.append(copy.deepcopy(cpu) | {"metadata": {"name": "stable-avatar-cpu-2"}})
    problems = [p for _, p in disruption_budget_problems(docs)]
    assert problems == ["spec.rayClusterConfig.workerGroupSpecs[0] (cpu): selected by several PodDisruptionBudgets "
                        "(stable-avatar-cpu, stable-avatar-cpu-2): the eviction API refuses to evict a pod that more "
                        "than one budget covers"]


def test_a_budget_that_selects_nothing_is_refused(report: TreeReport) -> None:
    docs = copy.deepcopy([m.doc for m in report.rendered["k8s/base"].manifests])
    docs.append({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "stray"},
                 "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "nothing-here"}}}})
    (problem,) = disruption_budget_problems(docs)
    assert problem[0]["metadata"]["name"] == "stray" and "matches no pod template here" in problem[1]


# -------------------------------------------------------------------------------------- kustomize subset


def _write(root: Path, files: dict[str, Any]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))


def test_kustomize_subset_renders_like_kustomize(tmp_path: Path) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"initContainers": [{"name": "i", "image": "app"}],
                    "containers": [{"name": "c", "image": "app:old"}, {"name": "d", "image": "other:1"}]}}
    _write(tmp_path, {
        "base/pod.yaml": pod,
        "base/ns.yaml": {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "keep"}},
        "base/kustomization.yaml": {"resources": ["pod.yaml", "ns.yaml"], "namespace": "n1"},
        "overlay/patch.yaml": [{"op": "add", "path": "/spec/containers/-", "value": {"name": "e", "image": "x"}},
                               {"op": "remove", "path": "/spec/containers/1"},
                               {"op": "test", "path": "/spec/containers/0/name", "value": "c"}],
        "overlay/kustomization.yaml": {
            "resources": ["../base"], "namespace": "n2", "labels": [{"pairs": {"team": "avatar"}}],
            "images": [{"name": "app", "newName": "reg/app", "newTag": "2"}],
            "patches": [{"path": "patch.yaml", "target": {"kind": "Pod", "name": "p"}}]},
    })
    out = render_kustomization(tmp_path / "overlay")
    rendered_pod, ns = (m.doc for m in out.manifests)
    assert [c["image"] for c in rendered_pod["spec"]["containers"]] == ["reg/app:2", "x"]
    assert rendered_pod["spec"]["initContainers"][0]["image"] == "reg/app:2"
    assert rendered_pod["metadata"] == {"name": "p", "namespace": "n2", "labels": {"team": "avatar"}}
    assert "namespace" not in ns["metadata"]  # cluster-scoped
    assert out.files == {(tmp_path / f).resolve() for f in ("base/kustomization.yaml", "base/pod.yaml",
                                                             "base/ns.yaml", "overlay/kustomization.yaml",
                                                             "overlay/patch.yaml")}


@pytest.mark.parametrize(("kustomization", "expected"), [
    ({"resources": ["pod.yaml"], "commonLabels": {"a": "b"}}, "commonLabels: not in the supported kustomize subset"),
    ({"resources": ["missing.yaml"]}, "resources: 'missing.yaml' does not exist"),
    ({"resources": ["https://github.com/x/y"]}, "only local files and directories are supported"),
    ({"resources": ["pod.yaml"], "patches": [{"patch": "metadata: {name: p}", "target": {"kind": "Pod"}}]},
     "only JSON6902 patches (a list of ops) are supported, not strategic merge"),
    ({"resources": ["pod.yaml"], "patches": [{"patch": "[]", "target": {"kind": "Deployment"}}]},
     "matches no resource"),
    ({"resources": ["pod.yaml"], "labels": [{"pairs": {"a": "b"}, "includeSelectors": True}]},
     "only pairs (with includeSelectors/includeTemplates false) is supported"),
])
def test_kustomize_subset_rejects_what_it_does_not_implement(tmp_path: Path, kustomization: dict[str, Any],
                                                             expected: str) -> None:
    _write(tmp_path, {"pod.yaml": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}},
                      "kustomization.yaml": kustomization})
    with pytest.raises(KustomizeError) as info:
        render_kustomization(tmp_path)
    assert expected in str(info.value)


def test_json6902_ops() -> None:
    doc: dict[str, Any] = {"a": {"b/c": [1, 2]}}
    json6902(doc, {"op": "add", "path": "/a/b~1c/1", "value": 9}, "t")
    json6902(doc, {"op": "replace", "path": "/a/b~1c/0", "value": 0}, "t")
    assert doc == {"a": {"b/c": [0, 9, 2]}}
    with pytest.raises(KustomizeError, match="replace /a/x: the path does not exist"):
        json6902(doc, {"op": "replace", "path": "/a/x", "value": 1}, "t")
    with pytest.raises(KustomizeError, match="op must be one of"):
        json6902(doc, {"op": "move", "from": "/a", "path": "/b"}, "t")


def test_unknown_kinds_are_not_waved_through(schemas: CrdSchemas) -> None:
    doc = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "x"}}
    assert check_manifest(doc, schemas) == ["kind: no offline check for 'DaemonSet'; add one to "
                                            "tools/k8s_validate.py"]
    assert Manifest(doc, K8S_DIR / "x.yaml").where == "k8s/x.yaml: DaemonSet/x"


def test_the_dashboard_and_the_metrics_table_name_the_metrics_the_service_defines() -> None:
    """Every ``stable_avatar_*`` series the Grafana dashboard queries is defined in ``deployments/runtime/metrics.py``
    (a renamed metric would leave an empty panel), and docs/operations.md's table lists exactly the defined ones."""
    import re

    source = (REPO_ROOT / "deployments" / "runtime" / "metrics.py").read_text()
    defined = set(re.findall(r'(?:Counter|Gauge|Histogram)\("(stable_avatar_\w+)"', source))
    defined |= set(re.findall(r'"(stable_avatar_\w+_cache_\w+)"', source))  # the caches' series, in one table
    dashboard = (K8S_DIR / "grafana" / "stable-avatar-dashboard.json").read_text()
    queried = {re.sub(r"_(bucket|count|sum)$", "", name) for name in re.findall(r"ray_(stable_avatar_\w+)", dashboard)}
    documented = set(re.findall(r"`ray_(stable_avatar_\w+)", (REPO_ROOT / "docs" / "operations.md").read_text()))
    assert queried <= defined, queried - defined
    assert documented == defined, documented ^ defined
    assert {"stable_avatar_prompt_cache_hits_total", "stable_avatar_prompt_cache_misses_total",
            "stable_avatar_prompt_cache_bytes"} <= queried
