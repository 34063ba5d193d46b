"""Offline checks of the Kubernetes manifests in ``k8s/``: no cluster, no kubectl, no network.

``kubectl --dry-run`` needs an API server, so the checks are done here, in the order a cluster would do them:

1. **Render** each kustomization with a small kustomize subset (:func:`render_kustomization`):
   ``resources`` (files and directories), ``namespace``, ``labels`` (``pairs`` only: no selectors or
   templates), ``images`` (``name`` -> ``newName``/``newTag``/``digest``, on every ``containers`` and
   ``initContainers`` list, as kustomize's legacy image filter does) and ``patches`` holding JSON6902 ops
   (``add``, ``remove``, ``replace``, ``test``) with a ``target``. Transformers run in kustomize's order:
   patches, namespace, labels, images. Any other kustomization field is an error, so nothing the renderer
   would ignore can slip through. Stricter than kustomize: a patch target that matches nothing is an error.
2. **Schema**: every ``ray.io`` object against the KubeRay CRD's ``openAPIV3Schema``, made strict the way
   kubeconform does it (``additionalProperties: false`` wherever ``properties`` are listed), so a misspelled
   field is an error. CEL rules (``x-kubernetes-validations``) are not evaluated.
3. **Serve config** embedded in ``serveConfigV2``: unknown keys (Ray's schema allows them silently), Ray's
   ``ServeDeploySchema``, the builder's typed args (``AppArgs``), the deployment names of a ``deployments:``
   list against the bound application, every effective ``autoscaling_config`` (Ray accepts e.g.
   ``max_replicas: 0`` or a target above ``max_ongoing_requests`` there), and no entry scaling the Denoiser or
   the Postprocessor beyond the ceiling in ``args`` that the app plans with.
4. **Cluster fit**: each Serve replica fits some worker pod (CPU, GPU, Ray memory), the GPUs of all replicas
   at their maxima fit the GPU groups' ``maxReplicas``, worker-group replica bounds are ordered, and
   ``rayVersion`` matches the installed Ray.
5. **The cluster's own faults** (``k8s_ray_ha``): GCS fault tolerance with an external Redis whose password comes
   from a Secret, nothing Serve-related on the head, and a PodDisruptionBudget over every worker group.
6. **Other kinds** (PVC, Job, StatefulSet, Deployment, Service, PodDisruptionBudget, PodMonitor, Secret,
   ConfigMap): apiVersion/kind/metadata, a few required fields, and the pod templates of Jobs, StatefulSets and
   Deployments against the PodTemplateSpec schema embedded in the RayCluster CRD; a workload's selector must match
   its pod template, a StatefulSet's claim templates must ask for storage, and its spec, like a Deployment's, a
   Service's spec and ports and a budget's spec, may hold only the fields Kubernetes knows. Finally every
   Secret/PVC/ConfigMap a pod refers to, every Service a StatefulSet or a GCS Redis address names must be defined
   somewhere under ``k8s/``, and every Service must select a pod template of its kustomization (a named
   ``targetPort`` must be a port of that template's containers).

Every problem is reported as ``<file>: <Kind>/<name>: <field path>: <message>`` and all of them are collected,
so one run shows everything that is wrong.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import os
import re
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = REPO_ROOT / "k8s"
KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
_KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                   "PersistentVolume", "StorageClass", "PriorityClass"}
_OBJECT_META = {"name", "namespace", "labels", "annotations", "generateName", "finalizers", "ownerReferences"}
# Basic checks of the non-Ray kinds: expected apiVersion and required dotted paths.
_BASIC_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "PersistentVolumeClaim": ("v1", ("spec.accessModes", "spec.resources.requests.storage")),
    "Job": ("batch/v1", ("spec.template.spec.containers", "spec.template.spec.restartPolicy")),
    "PodMonitor": ("monitoring.coreos.com/v1", ("spec.selector", "spec.podMetricsEndpoints")),
    "StatefulSet": ("apps/v1", ("spec.serviceName", "spec.selector.matchLabels", "spec.template.metadata.labels",
                                "spec.template.spec.containers")),
    "Deployment": ("apps/v1", ("spec.selector.matchLabels", "spec.template.metadata.labels",
                               "spec.template.spec.containers")),
    "PodDisruptionBudget": ("policy/v1", ("spec.selector",)),
    "Service": ("v1", ("spec.ports", "spec.selector")),
    "Secret": ("v1", ()),
    "ConfigMap": ("v1", ()),
    "Namespace": ("v1", ()),
}
# Fields of the specs checked field by field (Kubernetes' apps/v1 StatefulSetSpec, core/v1 ServiceSpec and
# ServicePort), so a misspelled one is an error, as in the CRD-checked kinds.
_STATEFULSET_SPEC = {"replicas", "selector", "serviceName", "template", "volumeClaimTemplates", "updateStrategy",
                     "podManagementPolicy", "revisionHistoryLimit", "minReadySeconds",
                     "persistentVolumeClaimRetentionPolicy", "ordinals"}
_DEPLOYMENT_SPEC = {"replicas", "selector", "template", "strategy", "minReadySeconds", "revisionHistoryLimit",
                    "progressDeadlineSeconds", "paused"}
_SERVICE_SPEC = {"selector", "ports", "type", "clusterIP", "clusterIPs", "externalName", "externalTrafficPolicy",
                 "internalTrafficPolicy", "ipFamilies", "ipFamilyPolicy", "loadBalancerIP", "loadBalancerClass",
                 "loadBalancerSourceRanges", "sessionAffinity", "sessionAffinityConfig", "publishNotReadyAddresses",
                 "allocateLoadBalancerNodePorts", "healthCheckNodePort", "externalIPs", "trafficDistribution"}
_SERVICE_PORT = {"name", "port", "targetPort", "protocol", "nodePort", "appProtocol"}
# Kinds whose spec.template is a pod template (what a Service can select).
_WORKLOAD_KINDS = {"StatefulSet", "Deployment", "DaemonSet", "ReplicaSet", "Job"}
_RAY_KINDS = {"RayService": "rayservices", "RayCluster": "rayclusters", "RayJob": "rayjobs"}


class KustomizeError(ValueError):
    """A kustomization cannot be rendered (missing file, unsupported field, a patch path that does not exist)."""


class ManifestError(ValueError):
    """Validation found problems; the message lists every one of them, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class Manifest:
    """One Kubernetes object and the file it came from (for messages)."""

    doc: dict[str, Any]
    source: Path

    @property
    def where(self) -> str:
        meta = self.doc.get("metadata") or {}
        name = meta.get("name", "?") if isinstance(meta, dict) else "?"
        return f"{_rel(self.source)}: {self.doc.get('kind', '?')}/{name}"


@dataclass
class Rendered:
    """The output of one kustomization and every file it read."""

    directory: Path
    manifests: list[Manifest]
    files: set[Path] = field(default_factory=set)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [m.doc for m in self.manifests if m.doc.get("kind") == kind]


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _path_str(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


# ---------------------------------------------------------------------------------------------------- YAML


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    """All non-empty documents of a YAML file; each must be a mapping (a Kubernetes object)."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        raise KustomizeError(f"{_rel(path)}: YAML does not parse: {e}") from None
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise KustomizeError(f"{_rel(path)}: document {i} is a {type(d).__name__}, not a Kubernetes object")
    return docs


# ----------------------------------------------------------------------------------------- kustomize subset


def find_kustomization(directory: Path) -> Path | None:
    for name in KUSTOMIZATION_NAMES:
        if (directory / name).is_file():
            return directory / name
    return None


def render_kustomization(directory: Path) -> Rendered:
    """Render ``directory`` like ``kustomize build`` would, for the subset described in the module docstring."""
    directory = directory.resolve()
    kfile = find_kustomization(directory)
    if kfile is None:
        raise KustomizeError(f"{_rel(directory)}: no kustomization.yaml")
    spec = yaml.safe_load(kfile.read_text()) or {}
    where = _rel(kfile)
    if not isinstance(spec, dict):
        raise KustomizeError(f"{where}: not a mapping")
    unknown = sorted(set(spec) - _KUSTOMIZE_FIELDS)
    if unknown:
        raise KustomizeError(f"{where}: {', '.join(unknown)}: not in the supported kustomize subset "
                             f"({', '.join(sorted(_KUSTOMIZE_FIELDS))})")
    out = Rendered(directory, [], {kfile})
    for entry in spec.get("resources") or []:
        if not isinstance(entry, str) or "://" in entry or entry.startswith(("github.com/", "git@")):
            raise KustomizeError(f"{where}: resources: {entry!r}: only local files and directories are supported")
        path = (directory / entry).resolve()
        if path.is_dir():
            sub = render_kustomization(path)
            out.manifests += sub.manifests
            out.files |= sub.files
        elif path.is_file():
            out.manifests += [Manifest(d, path) for d in load_yaml_documents(path)]
            out.files.add(path)
        else:
            raise KustomizeError(f"{where}: resources: {entry!r} does not exist")
    for i, patch in enumerate(spec.get("patches") or []):
        out.files |= _apply_patch(directory, f"{where}: patches[{i}]", patch, out.manifests)
    if "namespace" in spec:
        for m in out.manifests:
            if m.doc.get("kind") not in _CLUSTER_SCOPED:
                m.doc.setdefault("metadata", {})["namespace"] = spec["namespace"]
    for i, entry in enumerate(spec.get("labels") or []):
        _apply_labels(f"{where}: labels[{i}]", entry, out.manifests)
    for i, entry in enumerate(spec.get("images") or []):
        _apply_image(f"{where}: images[{i}]", entry, out.manifests)
    return out


def _apply_patch(directory: Path, where: str, patch: Any, manifests: list[Manifest]) -> set[Path]:
    if not isinstance(patch, dict) or set(patch) - {"path", "patch", "target"}:
        raise KustomizeError(f"{where}: supported keys are path or patch, and target")
    files: set[Path] = set()
    if "path" in patch:
        path = (directory / patch["path"]).resolve()
        if not path.is_file():
            raise KustomizeError(f"{where}: {patch['path']!r} does not exist")
        files.add(path)
        where = f"{where} ({_rel(path)})"
        try:
            ops = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise KustomizeError(f"{where}: YAML does not parse: {e}") from None
    else:
        ops = yaml.safe_load(patch.get("patch") or "")
    if not isinstance(ops, list):
        raise KustomizeError(f"{where}: only JSON6902 patches (a list of ops) are supported, not strategic merge")
    target = patch.get("target")
    if not isinstance(target, dict) or not target.get("kind"):
        raise KustomizeError(f"{where}: a JSON6902 patch needs a target with at least a kind")
    matched = [m for m in manifests if _matches(target, m.doc)]
    if not matched:
        raise KustomizeError(f"{where}: target {target} matches no resource")
    for m in matched:
        for j, op in enumerate(ops):
            json6902(m.doc, op, f"{where}: op {j}")
    return files


def _matches(target: dict[str, Any], doc: dict[str, Any]) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise KustomizeError(f"target: {', '.join(sorted(unknown))}: not supported (exact group/version/kind/name)")
    api = str(doc.get("apiVersion", ""))
    group, _, version = api.rpartition("/")
    meta = doc.get("metadata") or {}
    want = {"group": group, "version": version, "kind": doc.get("kind"), "name": meta.get("name"),
            "namespace": meta.get("namespace")}
    return all(want[k] == v for k, v in target.items())


def _pointer(path: str, where: str) -> list[str]:
    if not isinstance(path, str) or not path.startswith("/"):
        raise KustomizeError(f"{where}: path {path!r} must be a JSON pointer starting with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json6902(doc: Any, op: Any, where: str) -> None:
    """Apply one RFC 6902 op (add, remove, replace, test) to ``doc`` in place."""
    if not isinstance(op, dict) or op.get("op") not in {"add", "remove", "replace", "test"}:
        raise KustomizeError(f"{where}: op must be one of add, remove, replace, test: {op!r}")
    kind = op["op"]
    if kind != "remove" and "value" not in op:
        raise KustomizeError(f"{where}: {kind} needs a value")
    parts = _pointer(op.get("path"), where)
    parent: Any = doc
    for depth, key in enumerate(parts[:-1]):
        parent = _child(parent, key, f"{where}: {op['path']}: /{'/'.join(parts[:depth + 1])}")
    last = parts[-1]
    missing = KustomizeError(f"{where}: {kind} {op['path']}: the path does not exist")
    if isinstance(parent, list):
        if kind == "add" and last == "-":
            parent.append(copy.deepcopy(op["value"]))
            return
        if not last.isdigit():
            raise missing
        index = int(last)
        if kind == "add":
            if index > len(parent):
                raise missing
            parent.insert(index, copy.deepcopy(op["value"]))
            return
        if index >= len(parent):
            raise missing
    elif isinstance(parent, dict):
        if kind != "add" and last not in parent:
            raise missing
        index = last  # type: ignore[assignment]
    else:
        raise missing
    if kind == "test":
        if parent[index] != op["value"]:
            raise KustomizeError(f"{where}: test {op['path']}: expected {op['value']!r}, found {parent[index]!r}")
    elif kind == "remove":
        del parent[index]
    else:
        parent[index] = copy.deepcopy(op["value"])


def _child(node: Any, key: str, where: str) -> Any:
    if isinstance(node, dict) and key in node:
        return node[key]
    if isinstance(node, list) and key.isdigit() and int(key) < len(node):
        return node[int(key)]
    raise KustomizeError(f"{where}: does not exist")


def _apply_labels(where: str, entry: Any, manifests: list[Manifest]) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("pairs"), dict):
        raise KustomizeError(f"{where}: needs pairs")
    if set(entry) - {"pairs", "includeSelectors", "includeTemplates"} or entry.get("includeSelectors") \
            or entry.get("includeTemplates"):
        raise KustomizeError(f"{where}: only pairs (with includeSelectors/includeTemplates false) is supported")
    for m in manifests:
        m.doc.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])


_IMAGE = re.compile(r"^(?P<name>[^@]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>\S+))?$")


def _apply_image(where: str, entry: Any, manifests: list[Manifest]) -> None:
    if not isinstance(entry, dict) or "name" not in entry or set(entry) - {"name", "newName", "newTag", "digest"}:
        raise KustomizeError(f"{where}: needs name and any of newName, newTag, digest")
    for m in manifests:
        for container in _containers(m.doc):
            image = container.get("image")
            match = _IMAGE.match(image) if isinstance(image, str) else None
            if not match or match["name"] != entry["name"]:
                continue
            new = str(entry.get("newName", match["name"]))
            if "digest" in entry:
                new += f"@{entry['digest']}"
            elif "newTag" in entry or match["tag"]:
                new += f":{entry.get('newTag', match['tag'])}"
            container["image"] = new


def _containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container/initContainer dict anywhere in ``node`` (kustomize's legacy image filter walks these)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


# -------------------------------------------------------------------------------------------- CRD schemas


def strict_schema(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema where objects with ``properties`` reject unknown fields.

    Skips objects marked ``x-kubernetes-preserve-unknown-fields`` and maps ``nullable: true`` to a JSON-schema
    null type, which ``jsonschema`` does not know about.
    """
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


class CrdSchemas:
    """The strict v1 schemas of the KubeRay CRDs, loaded lazily per kind (the files are about 1 MB each)."""

    def __init__(self, crd_dir: Path):
        self.crd_dir = Path(crd_dir)
        if not self.crd_dir.is_dir():
            raise FileNotFoundError(f"KubeRay CRDs not found at {self.crd_dir} (set KUBERAY_CRDS)")
        self._validators: dict[str, Any] = {}

    def schema(self, kind: str) -> dict[str, Any]:
        return self.validator(kind).schema

    def validator(self, kind: str) -> Any:
        if kind not in self._validators:
            import jsonschema

            path = self.crd_dir / f"ray.io_{_RAY_KINDS[kind]}.yaml"
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            crd = yaml.load(path.read_text(), Loader=loader)  # noqa: S506 - a safe loader
            version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
            schema = strict_schema(version["schema"]["openAPIV3Schema"])
            self._validators[kind] = jsonschema.Draft7Validator(schema)
        return self._validators[kind]

    def pod_template_validator(self) -> Any:
        """PodTemplateSpec, as embedded in the RayCluster CRD: used for the pod templates of Jobs."""
        import jsonschema

        if "PodTemplate" not in self._validators:
            spec = self.schema("RayCluster")["properties"]["spec"]["properties"]
            self._validators["PodTemplate"] = jsonschema.Draft7Validator(
                spec["headGroupSpec"]["properties"]["template"])
        return self._validators["PodTemplate"]


def schema_errors(validator: Any, doc: Any, prefix: tuple[Any, ...] = ()) -> list[str]:
    """Readable ``field.path: message`` lines, with a "did you mean" for misspelled fields."""
    problems = []
    for err in sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        path = (*prefix, *err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            known = list(err.schema.get("properties") or {})
            for extra in sorted(set(err.instance) - set(known)):
                close = difflib.get_close_matches(extra, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{_path_str((*path, extra))}: unknown field{hint}")
        elif err.validator == "required":
            missing = re.match(r"'([^']+)'", err.message)
            name = missing.group(1) if missing else "?"
            problems.append(f"{_path_str((*path, name))}: required field is missing")
        else:
            problems.append(f"{_path_str(path)}: {err.message}")
    return problems


# ------------------------------------------------------------------------------------------ serve config


@dataclass
class ReplicaDemand:
    """What one deployment asks of the cluster at its maximum scale."""

    name: str
    num_cpus: float
    num_gpus: float
    memory: float  # bytes
    max_replicas: int


@dataclass
class ServeConfigResult:
    """Problems found in a Serve config, and what its deployments ask of the cluster (for the fit checks)."""

    problems: list[str]
    demands: list[ReplicaDemand]
    autoscaled: bool


def _unknown_keys(data: Any, model: Any, path: tuple[Any, ...]) -> list[str]:
    if not isinstance(data, dict):
        return []
    known = list(model.model_fields)
    out = []
    for key in sorted(set(data) - set(known)):
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        out.append(f"{_path_str((*path, key))}: unknown field{hint}")
    return out


def _pydantic_problems(err: Any, path: tuple[Any, ...]) -> list[str]:
    return [f"{_path_str((*path, *e['loc']))}: {e['msg']}" for e in err.errors()]


def check_serve_config(text: Any, path: tuple[Any, ...] = ("serveConfigV2",)) -> ServeConfigResult:
    """Validate a Serve config (the ``serveConfigV2`` string, or a parsed dict) as strictly as a deploy would."""
    from pydantic import ValidationError
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    result = ServeConfigResult([], [], False)
    if isinstance(text, str):
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as e:
            result.problems.append(f"{_path_str(path)}: YAML does not parse: {e}")
            return result
    else:
        config = text
    if not isinstance(config, dict):
        result.problems.append(f"{_path_str(path)}: must be a mapping")
        return result
    problems = result.problems
    problems += _unknown_keys(config, ServeDeploySchema, path)
    problems += _unknown_keys(config.get("http_options"), HTTPOptionsSchema, (*path, "http_options"))
    apps = config.get("applications") if isinstance(config.get("applications"), list) else []
    for i, app in enumerate(apps):
        problems += _unknown_keys(app, ServeApplicationSchema, (*path, "applications", i))
        overrides = app.get("deployments") if isinstance(app, dict) else None
        for j, dep in enumerate(overrides or []):
            problems += _unknown_keys(dep, DeploymentSchema, (*path, "applications", i, "deployments", j))
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        problems += _pydantic_problems(e, path)
        return result
    for i, app in enumerate(apps):
        _check_application(app, (*path, "applications", i), result)
    return result


def _builder(import_path: str) -> Any:
    module, _, attr = import_path.partition(":") if ":" in import_path else import_path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _check_application(app: dict[str, Any], path: tuple[Any, ...], result: ServeConfigResult) -> None:
    from pydantic import BaseModel, ValidationError

    problems = result.problems
    try:
        builder = _builder(app["import_path"])
    except (ImportError, AttributeError, ValueError) as e:
        problems.append(f"{_path_str((*path, 'import_path'))}: cannot import {app['import_path']!r}: {e}")
        return
    params = list(inspect.signature(builder).parameters.values())
    hints = typing.get_type_hints(builder)
    model = hints.get(params[0].name) if len(params) == 1 else None
    args: Any = app.get("args") or {}
    if isinstance(model, type) and issubclass(model, BaseModel):
        try:
            args = model.model_validate(args)
        except ValidationError as e:
            problems += _pydantic_problems(e, (*path, "args"))
            return
    try:
        application = builder(args)
    except Exception as e:  # the builder is user code: report whatever it raises
        problems.append(f"{_path_str((*path, 'args'))}: the builder failed: {type(e).__name__}: {e}")
        return
    try:
        deployments = app_deployments(application)
    except AttributeError:  # Ray changed its private Application layout: check names only
        deployments = dict.fromkeys(deployment_names_in_source())
    overrides = {d.get("name"): (j, d) for j, d in enumerate(app.get("deployments") or [])}
    for name, (j, _) in overrides.items():
        if name not in deployments:
            problems.append(f"{_path_str((*path, 'deployments', j, 'name'))}: {name!r} is not a deployment of "
                            f"application {app.get('name')!r} (it has: {', '.join(sorted(deployments))})")
    for name, dep in deployments.items():
        if dep is None:
            continue
        j, override = overrides.get(name, (None, {}))
        where = (*path, "deployments", j) if j is not None else (*path, f"<{name} as built from args>")
        _check_deployment(name, dep, override, where, result, _ceiling_in_args(args, name))


def app_deployments(application: Any) -> dict[str, Any]:
    """The deployments of a bound Serve ``Application``, by name, found by walking its bind arguments.

    This needs no cluster: ``.bind()`` only records the constructor arguments, and the other applications
    among them are the child deployments (``serve.run`` turns them into handles later).
    """
    from ray.serve import Application

    found: dict[str, Any] = {}

    def walk(node: Any) -> None:
        if isinstance(node, Application):
            dep = node._bound_deployment
            if dep.name not in found:
                found[dep.name] = dep
                walk(list(dep.init_args))
                walk(dep.init_kwargs)
        elif isinstance(node, list | tuple):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for item in node.values():
                walk(item)

    walk(application)
    return found


def deployment_names_in_source(package_dir: Path = REPO_ROOT / "deployments") -> set[str]:
    """Fallback for a Ray without ``Application._bound_deployment``: ``@serve.deployment(name=...)`` names."""
    pattern = re.compile(r"@serve\.deployment\([^)]*name=\"([^\"]+)\"")
    return {m for f in package_dir.rglob("*.py") for m in pattern.findall(f.read_text())}


# Deployments whose replica ceiling the app plans with from its args: the Orchestrator frees a job's state on
# ``denoiser.max_replicas`` rank slots and cuts a long video into at most ``postprocessor.max_replicas`` segments
# (deployments/orchestrator/deployment.py). A ``deployments:`` entry that scales beyond it leaves the extra
# Denoisers holding finished jobs' conditioning until their LRU drops it, and the extra Postprocessors idle.
CEILINGS_PLANNED_FROM_ARGS = {"Denoiser": "denoiser", "Postprocessor": "postprocessor"}


def _ceiling_in_args(args: Any, name: str) -> int | None:
    field = CEILINGS_PLANNED_FROM_ARGS.get(name)
    options = getattr(args, field, None) if field else None
    return getattr(options, "max_replicas", None)


def _check_deployment(name: str, dep: Any, override: dict[str, Any], path: tuple[Any, ...],
                      result: ServeConfigResult, ceiling: int | None = None) -> None:
    """Checks of the effective options: the builder's, with the config's ``deployments:`` entry on top;
    ``ceiling``: the most replicas the app plans for (:data:`CEILINGS_PLANNED_FROM_ARGS`)."""
    config = dep._deployment_config
    max_ongoing = override.get("max_ongoing_requests", dep.max_ongoing_requests)
    autoscaling: Any = override.get("autoscaling_config", config.autoscaling_config)
    if autoscaling is not None and not isinstance(autoscaling, dict):
        autoscaling = autoscaling.model_dump(exclude_unset=True)
    num_replicas = override.get("num_replicas", dep.num_replicas)
    actor = override.get("ray_actor_options", dep.ray_actor_options) or {}
    max_replicas = num_replicas if isinstance(num_replicas, int) else 1
    if autoscaling is not None:
        result.autoscaled = True
        where = (*path, "autoscaling_config")
        if isinstance(override.get("num_replicas"), int) and "autoscaling_config" in override:
            result.problems.append(f"{_path_str((*path, 'num_replicas'))}: a number cannot be combined with "
                                   "autoscaling_config (use \"auto\" or leave it out)")
        max_replicas = _check_autoscaling(autoscaling, max_ongoing, where, result.problems)
    if ceiling is not None and max_replicas > ceiling and override:
        field = "autoscaling_config.max_replicas" if autoscaling is not None else "num_replicas"
        result.problems.append(
            f"{_path_str((*path, *field.split('.')))}: {max_replicas} is above the {ceiling} replicas that "
            f"args.{CEILINGS_PLANNED_FROM_ARGS[name]} allows, which the app plans with; raise it there")
    result.demands.append(ReplicaDemand(name, float(actor.get("num_cpus", 1) or 0),
                                        float(actor.get("num_gpus", 0) or 0),
                                        float(actor.get("memory", 0) or 0), max_replicas))


def _check_autoscaling(autoscaling: dict[str, Any], max_ongoing: Any, path: tuple[Any, ...],
                       problems: list[str]) -> int:
    """Ray's own ``AutoscalingConfig`` checks plus the ones it skips; returns max_replicas for capacity."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig

    problems += _unknown_keys(autoscaling, AutoscalingConfig, path)
    try:
        parsed = AutoscalingConfig(**autoscaling)
    except ValidationError as e:
        problems += _pydantic_problems(e, path)
        value = autoscaling.get("max_replicas")
        return value if isinstance(value, int) else 0
    if isinstance(max_ongoing, int) and parsed.target_ongoing_requests > max_ongoing:
        problems.append(f"{_path_str((*path, 'target_ongoing_requests'))}: {parsed.target_ongoing_requests} is "
                        f"above max_ongoing_requests ({max_ongoing}): the deployment would never scale up")
    return parsed.max_replicas


def serve_config_drift(local: dict[str, Any], cluster: dict[str, Any],
                       model_only_keys: frozenset[str] = frozenset({"checkpoints", "variant"})) -> list[str]:
    """Differences between ``serve_config.yaml`` and a RayService's ``serveConfigV2`` that are not allowed.

    Same applications (name, import path, route prefix); the cluster sets every ``args`` key the local file
    sets; its only extra keys are the real model's (``model_only_keys``) and per-deployment options; and it sets
    the options of every deployment explicitly, since resources decide where replicas land on a cluster.
    """
    from deployments.config import AppArgs, DeploymentOptions

    option_keys = {n for n, f in AppArgs.model_fields.items() if f.annotation is DeploymentOptions}
    problems = []
    local_apps = {a.get("name"): a for a in local.get("applications") or []}
    cluster_apps = {a.get("name"): a for a in cluster.get("applications") or []}
    if set(local_apps) != set(cluster_apps):
        problems.append(f"applications: serve_config.yaml has {sorted(local_apps)}, the RayService "
                        f"{sorted(cluster_apps)}")
    for name in sorted(set(local_apps) & set(cluster_apps)):
        mine, theirs = local_apps[name], cluster_apps[name]
        for key, default in (("import_path", None), ("route_prefix", "/")):
            if mine.get(key, default) != theirs.get(key, default):
                problems.append(f"applications[{name}].{key}: serve_config.yaml {mine.get(key, default)!r}, "
                                f"RayService {theirs.get(key, default)!r}")
        local_keys, cluster_keys = set(mine.get("args") or {}), set(theirs.get("args") or {})
        for key in sorted(local_keys - cluster_keys):
            problems.append(f"applications[{name}].args.{key}: set in serve_config.yaml but not in the RayService")
        for key in sorted(cluster_keys - local_keys - model_only_keys - option_keys):
            problems.append(f"applications[{name}].args.{key}: set in the RayService but not in serve_config.yaml")
        for key in sorted(option_keys - cluster_keys):
            problems.append(f"applications[{name}].args.{key}: the RayService must set this deployment's "
                            "resources explicitly")
    return problems


# ---------------------------------------------------------------------------------------- Ray cluster fit

_QUANTITY = re.compile(r"^(?P<num>[0-9.]+(?:[eE][-+]?[0-9]+)?)(?P<unit>[a-zA-Z]*)$")
_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(value: Any) -> float:
    """A Kubernetes resource quantity (``500m``, ``8Gi``, ``4``) as a number."""
    match = _QUANTITY.match(str(value).strip())
    if not match or match["unit"] not in _UNITS:
        raise ValueError(f"not a resource quantity: {value!r}")
    return float(match["num"]) * _UNITS[match["unit"]]


@dataclass
class PodCapacity:
    """What Ray sees on one pod of a group (from rayStartParams, else the container's limits/requests)."""

    group: str
    cpus: float
    gpus: float
    memory: float  # Ray memory resource, conservatively: memory limit minus the object store
    max_pods: int


def group_capacity(group: str, spec: dict[str, Any], max_pods: int) -> PodCapacity:
    params = spec.get("rayStartParams") or {}
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    res = containers[0].get("resources") or {}
    amounts = {**(res.get("requests") or {}), **(res.get("limits") or {})}
    cpus = quantity(params.get("num-cpus", amounts.get("cpu", 0)))
    gpus = quantity(params.get("num-gpus", amounts.get("nvidia.com/gpu", 0)))
    total = quantity(params.get("memory", amounts.get("memory", 0)))
    store = quantity(params["object-store-memory"]) if "object-store-memory" in params else 0.3 * total
    return PodCapacity(group, cpus, gpus, max(total - store, 0.0), max_pods)


def check_cluster(cluster: dict[str, Any], demands: list[ReplicaDemand], autoscaled: bool,
                  path: tuple[Any, ...]) -> list[str]:
    """Semantic checks of a RayClusterSpec that the CRD schema cannot express."""
    import ray

    problems = []
    version = cluster.get("rayVersion")
    if version is not None and version != ray.__version__:
        problems.append(f"{_path_str((*path, 'rayVersion'))}: {version!r} but the project pins ray "
                        f"{ray.__version__}: the image and the operator must agree")
    pods: list[PodCapacity] = []
    head = cluster.get("headGroupSpec") or {}
    try:
        pods.append(group_capacity("head", head, 1))
        for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
            gpath = (*path, "workerGroupSpecs", i)
            lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 0)
            replicas = group.get("replicas", lo)
            if all(isinstance(v, int) for v in (lo, hi, replicas)):
                if lo > hi:
                    problems.append(f"{_path_str((*gpath, 'minReplicas'))}: {lo} is above maxReplicas ({hi})")
                if not lo <= replicas <= hi:
                    problems.append(f"{_path_str((*gpath, 'replicas'))}: {replicas} is outside "
                                    f"minReplicas..maxReplicas ({lo}..{hi})")
                hosts = group.get("numOfHosts", 1) if isinstance(group.get("numOfHosts", 1), int) else 1
                pods.append(group_capacity(str(group.get("groupName")), group, hi * hosts))
    except ValueError as e:
        problems.append(f"{_path_str(path)}: {e}")
        return problems
    if autoscaled and not cluster.get("enableInTreeAutoscaling"):
        problems.append(f"{_path_str((*path, 'enableInTreeAutoscaling'))}: Serve autoscaling is configured but "
                        "the Ray autoscaler is off: new replicas would wait for pods that never come")
    for d in demands:
        if d.num_cpus == 0 and d.num_gpus == 0 and pods[0].cpus == 0:
            problems.append(f"{_path_str(path)}: deployment {d.name} asks for no CPU and no GPU, so it may be "
                            "placed on the head pod, which is meant to hold no replica")
        if not any(d.num_cpus <= p.cpus and d.num_gpus <= p.gpus and d.memory <= p.memory and p.max_pods
                   for p in pods):
            problems.append(f"{_path_str(path)}: no pod fits one {d.name} replica (num_cpus {d.num_cpus}, "
                            f"num_gpus {d.num_gpus}, memory {d.memory / 1e9:.1f} GB); pods: "
                            + ", ".join(f"{p.group} {p.cpus:g} CPU / {p.gpus:g} GPU / {p.memory / 1e9:.1f} GB"
                                        for p in pods))
    for what, unit in (("gpus", "GPUs"), ("cpus", "CPUs")):
        needed = sum(getattr(d, f"num_{what}") * d.max_replicas for d in demands)
        there = sum(getattr(p, what) * p.max_pods for p in pods)
        if needed > there + 1e-9:
            problems.append(f"{_path_str(path)}: the deployments need {needed:g} {unit} at their maximum scale "
                            f"but the pods offer at most {there:g} (raise maxReplicas or pod resources, or "
                            "lower max_replicas)")
    problems += _volume_problems(head.get("template"), (*path, "headGroupSpec", "template"))
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        problems += _volume_problems(group.get("template"), (*path, "workerGroupSpecs", i, "template"))
    return problems


def _volume_problems(template: Any, path: tuple[Any, ...], claims: Iterable[str] = ()) -> list[str]:
    spec = (template or {}).get("spec") or {}
    declared = {v.get("name") for v in spec.get("volumes") or []} | set(claims)
    problems = []
    for key in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(key) or []):
            for j, mount in enumerate(c.get("volumeMounts") or []):
                if mount.get("name") not in declared:
                    problems.append(f"{_path_str((*path, 'spec', key, i, 'volumeMounts', j, 'name'))}: volume "
                                    f"{mount.get('name')!r} is not declared in spec.volumes")
    return problems


def _serve_port_problems(config: dict[str, Any], path: tuple[Any, ...]) -> list[str]:
    http = config.get("http_options") or {}
    problems = []
    if http.get("host", "0.0.0.0") != "0.0.0.0":
        problems.append(f"{_path_str((*path, 'http_options', 'host'))}: must be 0.0.0.0 on Kubernetes: KubeRay "
                        "probes the proxy and the Service routes to it from outside the container")
    if http.get("port", 8000) != 8000:
        problems.append(f"{_path_str((*path, 'http_options', 'port'))}: KubeRay's serve Service and probes use 8000")
    if config.get("proxy_location") == "Disabled":
        problems.append(f"{_path_str((*path, 'proxy_location'))}: Disabled leaves the serve Service with no backend")
    return problems


# --------------------------------------------------------------------------------------------- per object


def check_manifest(doc: dict[str, Any], schemas: CrdSchemas) -> list[str]:
    """All problems of one object, as ``field.path: message`` lines (without the file/object prefix)."""
    problems = _basic_problems(doc)
    kind = doc.get("kind")
    if kind in _RAY_KINDS:
        if doc.get("apiVersion") != "ray.io/v1":
            problems.append(f"apiVersion: {doc.get('apiVersion')!r}: use ray.io/v1")
        shape = schema_errors(schemas.validator(kind), doc)
        problems += shape
        spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
        serve = ServeConfigResult([], [], False)
        if kind == "RayService" and isinstance(spec.get("serveConfigV2"), str):
            serve = check_serve_config(spec["serveConfigV2"], ("spec", "serveConfigV2"))
            problems += serve.problems
            parsed = yaml.safe_load(spec["serveConfigV2"])
            if isinstance(parsed, dict):
                problems += _serve_port_problems(parsed, ("spec", "serveConfigV2"))
        if kind == "RayService" and not shape:
            from tools.k8s_ray_ha import rayservice_problems  # imports this module's helpers

            problems += rayservice_problems(doc, yaml.safe_load(spec["serveConfigV2"])
                                            if isinstance(spec.get("serveConfigV2"), str) else None)
        cluster, cpath = (spec.get("rayClusterConfig"), ("spec", "rayClusterConfig")) if kind == "RayService" \
            else (spec, ("spec",))
        if kind != "RayJob" and isinstance(cluster, dict) and not shape:  # the fit checks assume a valid shape
            demands = [] if serve.problems else serve.demands  # no fit noise on top of a broken Serve config
            problems += check_cluster(cluster, demands, serve.autoscaled, cpath)
    elif kind in _BASIC_KINDS:
        api, required = _BASIC_KINDS[kind]
        if doc.get("apiVersion") != api:
            problems.append(f"apiVersion: {doc.get('apiVersion')!r}: {kind} is {api}")
        for dotted in required:
            node: Any = doc
            for part in dotted.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node in (None, [], {}, ""):
                problems.append(f"{dotted}: required field is missing")
        if kind == "Job":
            template = (doc.get("spec") or {}).get("template")
            problems += schema_errors(schemas.pod_template_validator(), template, ("spec", "template"))
            problems += _volume_problems(template, ("spec", "template"))
        if kind == "StatefulSet" and isinstance(doc.get("spec"), dict):
            problems += _statefulset_problems(doc["spec"], schemas)
        if kind == "Deployment" and isinstance(doc.get("spec"), dict):
            problems += _unknown_fields(doc["spec"], _DEPLOYMENT_SPEC, ("spec",))
            problems += _pod_template_problems(doc["spec"], schemas, kind)
        if kind == "PodDisruptionBudget" and isinstance(doc.get("spec"), dict):
            from tools.k8s_ray_ha import pdb_spec_problems

            problems += pdb_spec_problems(doc["spec"])
        if kind == "Service" and isinstance(doc.get("spec"), dict):
            problems += _service_problems(doc["spec"])
        if kind in ("Secret", "ConfigMap"):
            for key in ("data", "stringData"):
                for k, v in (doc.get(key) or {}).items():
                    if not isinstance(v, str):
                        problems.append(f"{key}.{k}: must be a string, not {type(v).__name__}")
    elif kind:
        problems.append(f"kind: no offline check for {kind!r}; add one to tools/k8s_validate.py")
    return problems


def _unknown_fields(data: Any, known: set[str], path: tuple[Any, ...]) -> list[str]:
    out = []
    for key in sorted(set(data) - known) if isinstance(data, dict) else []:
        close = difflib.get_close_matches(str(key), sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        out.append(f"{_path_str((*path, key))}: unknown field{hint}")
    return out


def _pod_template_problems(spec: dict[str, Any], schemas: CrdSchemas, kind: str,
                           claims: Iterable[str] = ()) -> list[str]:
    """A workload's pod template against the schema, its replica count, its selector and its mounts."""
    template = spec.get("template")
    problems = schema_errors(schemas.pod_template_validator(), template, ("spec", "template"))
    replicas = spec.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        problems.append(f"spec.replicas: must be a non-negative integer, not {replicas!r}")
    labels = ((template or {}).get("metadata") or {}).get("labels") or {}
    for key, value in ((spec.get("selector") or {}).get("matchLabels") or {}).items():
        if labels.get(key) != value:
            problems.append(f"spec.selector.matchLabels.{key}: {value!r} is not a label of the pod template "
                            f"(the {kind} would own no pod)")
    return problems + _volume_problems(template, ("spec", "template"), claims)


def _statefulset_problems(spec: dict[str, Any], schemas: CrdSchemas) -> list[str]:
    problems = _unknown_fields(spec, _STATEFULSET_SPEC, ("spec",))
    claims = []
    for i, claim in enumerate(spec.get("volumeClaimTemplates") or []):
        where = ("spec", "volumeClaimTemplates", i)
        name = (claim.get("metadata") or {}).get("name") if isinstance(claim, dict) else None
        if not name:
            problems.append(f"{_path_str((*where, 'metadata', 'name'))}: required field is missing")
        claims.append(name)
        claim_spec = claim.get("spec") if isinstance(claim, dict) else None
        if not (claim_spec or {}).get("accessModes"):
            problems.append(f"{_path_str((*where, 'spec', 'accessModes'))}: required field is missing")
        storage = (((claim_spec or {}).get("resources") or {}).get("requests") or {}).get("storage")
        try:
            quantity(storage)
        except ValueError:
            problems.append(f"{_path_str((*where, 'spec', 'resources', 'requests', 'storage'))}: "
                            f"{'required field is missing' if storage is None else f'not a quantity: {storage!r}'}")
    return problems + _pod_template_problems(spec, schemas, "StatefulSet", claims)


def _service_problems(spec: dict[str, Any]) -> list[str]:
    problems = _unknown_fields(spec, _SERVICE_SPEC, ("spec",))
    ports = spec.get("ports") if isinstance(spec.get("ports"), list) else []
    names = [p.get("name") for p in ports if isinstance(p, dict)]
    for i, port in enumerate(ports):
        where = ("spec", "ports", i)
        if not isinstance(port, dict):
            problems.append(f"{_path_str(where)}: must be a mapping")
            continue
        problems += _unknown_fields(port, _SERVICE_PORT, where)
        number = port.get("port")
        if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= 65535:
            problems.append(f"{_path_str((*where, 'port'))}: must be a port number (1-65535), not {number!r}")
        target = port.get("targetPort", number)
        if not (isinstance(target, int) and 1 <= target <= 65535
                or isinstance(target, str) and re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?", target)):
            problems.append(f"{_path_str((*where, 'targetPort'))}: must be a port number or a port name, "
                            f"not {target!r}")
        if port.get("protocol", "TCP") not in ("TCP", "UDP", "SCTP"):
            problems.append(f"{_path_str((*where, 'protocol'))}: must be TCP, UDP or SCTP")
        if len(ports) > 1 and not port.get("name"):
            problems.append(f"{_path_str((*where, 'name'))}: required when a Service has several ports")
    for name in sorted({n for n in names if n and names.count(n) > 1}):
        problems.append(f"spec.ports: the name {name!r} is used twice")
    return problems


def _pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod templates a workload (or a RayService/RayCluster) runs."""
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    if doc.get("kind") in _WORKLOAD_KINDS:
        return [spec["template"]] if isinstance(spec.get("template"), dict) else []
    cluster = spec.get("rayClusterConfig") if doc.get("kind") == "RayService" else spec
    if doc.get("kind") in _RAY_KINDS and isinstance(cluster, dict):
        groups = [cluster.get("headGroupSpec") or {}, *(cluster.get("workerGroupSpecs") or [])]
        return [g["template"] for g in groups if isinstance(g, dict) and isinstance(g.get("template"), dict)]
    return []


def service_selection_problems(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """(Service, problem) for each Service of ``docs`` (one kustomization's output) that selects no pod template
    of ``docs``, or whose named ``targetPort`` no selected container declares."""
    templates = [t for d in docs for t in _pod_templates(d)]
    out = []
    for doc in docs:
        spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
        if doc.get("kind") != "Service" or not isinstance(spec.get("selector"), dict):
            continue
        selector = spec["selector"]
        chosen = [t for t in templates if selector.items() <= (((t.get("metadata") or {}).get("labels")) or {}).items()]
        if not chosen:
            out.append((doc, f"spec.selector: {selector} matches the labels of no pod template here (the Service "
                             "would have no endpoints)"))
            continue
        named = {p.get("name") for t in chosen for c in ((t.get("spec") or {}).get("containers") or [])
                 for p in c.get("ports") or []}
        for i, port in enumerate(spec.get("ports") or []):
            target = port.get("targetPort") if isinstance(port, dict) else None
            if isinstance(target, str) and target not in named:
                out.append((doc, f"spec.ports[{i}].targetPort: no selected container has a port named {target!r}"))
    return out


def _redis_service(doc: dict[str, Any]) -> str | None:
    """The in-cluster Service a RayService's/RayCluster's GCS FT Redis address names (``svc``, ``svc.ns``,
    ``svc.ns.svc[.cluster.local]``), if it names one; an outside host gives None."""
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    cluster = spec.get("rayClusterConfig") if doc.get("kind") == "RayService" else spec
    options = (cluster or {}).get("gcsFaultToleranceOptions") if isinstance(cluster, dict) else None
    address = (options or {}).get("redisAddress") if isinstance(options, dict) else None
    if doc.get("kind") not in _RAY_KINDS or not isinstance(address, str):
        return None
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].split(".")
    return host[0] if len(host) <= 2 or host[2] == "svc" else None


def _basic_problems(doc: dict[str, Any]) -> list[str]:
    problems = [f"{k}: required field is missing" for k in ("apiVersion", "kind") if not doc.get(k)]
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        return [*problems, "metadata.name: required field is missing"]
    for key in sorted(set(meta) - _OBJECT_META):
        problems.append(f"metadata.{key}: unknown field")
    for key in ("labels", "annotations"):
        for k, v in (meta.get(key) or {}).items():
            if not isinstance(v, str):
                problems.append(f"metadata.{key}.{k}: must be a string, not {type(v).__name__} {v!r}")
    return problems


def _references(doc: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(kind, name, field) of every Secret/ConfigMap/PVC a pod template in ``doc`` refers to."""
    if doc.get("kind") == "StatefulSet" and isinstance(doc.get("spec"), dict) and doc["spec"].get("serviceName"):
        yield "Service", doc["spec"]["serviceName"], "serviceName"
    service = _redis_service(doc)
    if service:
        yield "Service", service, "redisAddress"

    def walk(node: Any) -> Iterator[tuple[str, str, str]]:
        if isinstance(node, dict):
            for ref_key, kind in (("secretKeyRef", "Secret"), ("secretRef", "Secret"),
                                  ("configMapKeyRef", "ConfigMap"), ("configMapRef", "ConfigMap")):
                if isinstance(node.get(ref_key), dict) and not node[ref_key].get("optional"):
                    yield kind, node[ref_key].get("name"), ref_key
            if isinstance(node.get("persistentVolumeClaim"), dict):
                yield "PersistentVolumeClaim", node["persistentVolumeClaim"].get("claimName"), "claimName"
            if isinstance(node.get("secret"), dict) and "secretName" in node["secret"]:
                yield "Secret", node["secret"]["secretName"], "secretName"
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    yield from walk(doc.get("spec"))


# -------------------------------------------------------------------------------------------- whole tree


@dataclass
class TreeReport:
    """What :func:`validate_tree` rendered and found."""

    rendered: dict[str, Rendered]
    loose: list[Manifest]
    problems: list[str]


def kustomization_dirs(root: Path) -> list[Path]:
    return sorted({p.parent for name in KUSTOMIZATION_NAMES for p in root.rglob(name)})


def validate_tree(root: Path, schemas: CrdSchemas) -> TreeReport:
    """Render every kustomization under ``root``, check every object, and check the YAML files no
    kustomization uses (examples such as the Secret) on their own."""
    rendered: dict[str, Rendered] = {}
    problems: list[str] = []
    used: set[Path] = set()
    for directory in kustomization_dirs(root):
        try:
            out = render_kustomization(directory)
        except KustomizeError as e:
            problems.append(str(e))
            continue
        rendered[_rel(directory)] = out
        used |= out.files
    loose: list[Manifest] = []
    for path in sorted({*root.rglob("*.yaml"), *root.rglob("*.yml")}):
        if path.resolve() in used or path.name in KUSTOMIZATION_NAMES:
            continue
        try:
            loose += [Manifest(d, path.resolve()) for d in load_yaml_documents(path)]
        except KustomizeError as e:
            problems.append(str(e))
    # (label for messages, manifest): a base file rendered by an overlay is named with the overlay too.
    everything = [(f"[{name}] {m.where}" if m.source.parent != r.directory else m.where, m)
                  for name, r in rendered.items() for m in r.manifests] + [(m.where, m) for m in loose]
    defined = {(m.doc.get("kind"), (m.doc.get("metadata") or {}).get("name")) for _, m in everything}
    labels = {id(m.doc): where for where, m in everything}
    from tools.k8s_ray_ha import disruption_budget_problems  # imports this module's helpers

    for docs in [[m.doc for m in r.manifests] for r in rendered.values()] + [[m.doc for m in loose]]:
        problems += [f"{labels[id(doc)]}: {problem}" for doc, problem in service_selection_problems(docs)]
        problems += [f"{labels[id(doc)]}: {problem}" for doc, problem in disruption_budget_problems(docs)]
    for where, m in everything:
        problems += [f"{where}: {p}" for p in check_manifest(m.doc, schemas)]
        for kind, name, ref in _references(m.doc):
            if (kind, name) not in defined:
                problems.append(f"{where}: {ref} {name!r}: no {kind} of that name is defined under {_rel(root)} "
                                "(add one, or an example of it)")
    return TreeReport(rendered, loose, list(dict.fromkeys(problems)))


def default_crd_dir() -> Path:
    """``$KUBERAY_CRDS``, else the copy in this repository (``tools/kuberay-crds``)."""
    return Path(os.environ.get("KUBERAY_CRDS", Path(__file__).resolve().parent / "kuberay-crds"))
