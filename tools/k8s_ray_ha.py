"""Offline checks of what keeps a KubeRay RayService serving through its own faults (used by ``k8s_validate``).

- **GCS fault tolerance** with an external Redis: ``rayClusterConfig.gcsFaultToleranceOptions`` with a
  ``redisAddress`` and a ``redisPassword`` taken from a Secret (never inline), and none of the older form that
  KubeRay's validation refuses to mix with it (the ``ray.io/ft-enabled`` and ``ray.io/external-storage-namespace``
  annotations, ``RAY_REDIS_ADDRESS``/``REDIS_PASSWORD`` on the head, ``redis-password``/``redis-username`` in its
  ``rayStartParams``). ``externalStorageNamespace`` stays unset: KubeRay then uses each RayCluster's UID, so the
  two clusters of an upgrade never write the same keys.
- **Nothing Serve-related on the head**: it offers no CPU, GPU or custom resource to Ray (so no replica can be
  placed there), its proxy is left out of the serve Service (``excludeHeadPodFromServeSvc``), and the Serve config
  does not put the only proxy on it (``proxy_location: HeadOnly``).
- **PodDisruptionBudgets**: every worker group is selected by exactly one budget of its kustomization, through
  ``ray.io/originated-from-cr-name`` (the RayService), ``ray.io/node-type: worker`` and ``ray.io/group``, never
  ``ray.io/cluster`` (it changes with every upgrade); budgets over RayCluster pods use an integer ``minAvailable``
  below the group's ``maxReplicas``: ``maxUnavailable`` or a percentage makes Kubernetes ask the pods' owner for
  its scale, which a RayCluster does not have, and the budget then allows no eviction at all.
"""

from __future__ import annotations

import re
from typing import Any

from tools.k8s_validate import _path_str

# Labels KubeRay sets on every pod of a group (ray.io/cluster too, but its value is generated per cluster).
CR_NAME_LABEL = "ray.io/originated-from-cr-name"
NODE_TYPE_LABEL = "ray.io/node-type"
GROUP_LABEL = "ray.io/group"
CLUSTER_LABEL = "ray.io/cluster"
_PDB_SPEC = {"minAvailable", "maxUnavailable", "selector", "unhealthyPodEvictionPolicy"}
_EVICTION_POLICIES = {"IfHealthyBudget", "AlwaysAllow"}
# The older GCS FT form: KubeRay refuses these next to gcsFaultToleranceOptions.
_FT_ANNOTATIONS = ("ray.io/ft-enabled", "ray.io/external-storage-namespace")
_FT_HEAD_ENV = ("RAY_REDIS_ADDRESS", "REDIS_PASSWORD", "REDIS_USERNAME")
_FT_HEAD_PARAMS = ("redis-password", "redis-username")
_REDIS_ADDRESS = re.compile(r"^(?:(?P<scheme>rediss?)://)?(?P<host>[A-Za-z0-9.-]+):(?P<port>\d{1,5})$")


def rayservice_problems(doc: dict[str, Any], serve_config: Any) -> list[str]:
    """GCS fault tolerance and head placement of one RayService (``serve_config``: its parsed serveConfigV2)."""
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    cluster = spec.get("rayClusterConfig") if isinstance(spec.get("rayClusterConfig"), dict) else {}
    annotations = (doc.get("metadata") or {}).get("annotations") or {}
    problems = gcs_fault_tolerance_problems(cluster, annotations, ("spec", "rayClusterConfig"))
    problems += head_problems(cluster, ("spec", "rayClusterConfig"))
    if spec.get("excludeHeadPodFromServeSvc") is not True:
        problems.append("spec.excludeHeadPodFromServeSvc: must be true: otherwise the serve Service also sends "
                        "requests to the head's proxy, which goes down with the head")
    if isinstance(serve_config, dict) and serve_config.get("proxy_location") == "HeadOnly":
        problems.append("spec.serveConfigV2.proxy_location: HeadOnly puts the only proxy on the head, which is left "
                        "out of the serve Service and goes down with it (use EveryNode)")
    return problems


def gcs_fault_tolerance_problems(cluster: dict[str, Any], annotations: dict[str, Any],
                                 path: tuple[Any, ...]) -> list[str]:
    """``gcsFaultToleranceOptions`` with Redis and a password from a Secret, and none of the older form."""
    where = (*path, "gcsFaultToleranceOptions")
    options = cluster.get("gcsFaultToleranceOptions")
    problems = [f"metadata.annotations.{key}: the older GCS FT form; KubeRay refuses it next to "
                "gcsFaultToleranceOptions (remove it)" for key in _FT_ANNOTATIONS if key in annotations]
    head = cluster.get("headGroupSpec") if isinstance(cluster.get("headGroupSpec"), dict) else {}
    params = head.get("rayStartParams") or {}
    problems += [f"{_path_str((*path, 'headGroupSpec', 'rayStartParams', key))}: set by KubeRay from "
                 "gcsFaultToleranceOptions; KubeRay refuses it here" for key in _FT_HEAD_PARAMS if key in params]
    containers = ((head.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    for i, env in enumerate(containers[0].get("env") or []):
        if isinstance(env, dict) and env.get("name") in _FT_HEAD_ENV:
            problems.append(f"{_path_str((*path, 'headGroupSpec', 'template', 'spec', 'containers', 0, 'env', i))}: "
                            f"{env['name']} is set by KubeRay from gcsFaultToleranceOptions; KubeRay refuses it here")
    if not isinstance(options, dict):
        return [*problems, f"{_path_str(where)}: required: without GCS fault tolerance a restart of the head "
                           "loses the cluster's state and KubeRay replaces every worker pod"]
    if options.get("backend", "redis") != "redis":
        problems.append(f"{_path_str((*where, 'backend'))}: {options['backend']!r}: the external Redis is the "
                        "supported store (remove backend or set redis)")
    address = options.get("redisAddress")
    if not isinstance(address, str) or not _REDIS_ADDRESS.match(address) \
            or not 0 < int(_REDIS_ADDRESS.match(address)["port"]) < 65536:
        problems.append(f"{_path_str((*where, 'redisAddress'))}: {address!r}: must be host:port, redis://host:port "
                        "or rediss://host:port (TLS)")
    password = options.get("redisPassword")
    secret = ((password or {}).get("valueFrom") or {}).get("secretKeyRef") if isinstance(password, dict) else None
    if not isinstance(secret, dict) or not secret.get("name") or not secret.get("key") or "value" in password:
        problems.append(f"{_path_str((*where, 'redisPassword'))}: must be valueFrom.secretKeyRef (a Secret's name "
                        "and key), never an inline value: the password would sit in the manifest and in git")
    if "externalStorageNamespace" in options:
        problems.append(f"{_path_str((*where, 'externalStorageNamespace'))}: leave unset: KubeRay then uses the "
                        "RayCluster's UID, so the old and the new cluster of an upgrade never share Redis keys")
    return problems


def head_problems(cluster: dict[str, Any], path: tuple[Any, ...]) -> list[str]:
    """The head offers Ray nothing a Serve replica could be placed on: no CPU, no GPU, no custom resource."""
    head = cluster.get("headGroupSpec") if isinstance(cluster.get("headGroupSpec"), dict) else {}
    where = (*path, "headGroupSpec")
    params = head.get("rayStartParams") or {}
    problems = []
    if str(params.get("num-cpus")) != "0":
        problems.append(f"{_path_str((*where, 'rayStartParams', 'num-cpus'))}: must be \"0\": a head with CPUs "
                        "takes Serve replicas, which then go down with it")
    if str(params.get("num-gpus", "0")) != "0":
        problems.append(f"{_path_str((*where, 'rayStartParams', 'num-gpus'))}: must be \"0\" or unset: GPU "
                        "replicas would be placed on the head")
    if "resources" in params or head.get("resources"):
        key = ("rayStartParams", "resources") if "resources" in params else ("resources",)
        problems.append(f"{_path_str((*where, *key))}: the head must offer no custom resource a replica could ask "
                        "for")
    containers = ((head.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    limits = {**((containers[0].get("resources") or {}).get("requests") or {}),
              **((containers[0].get("resources") or {}).get("limits") or {})}
    for name in sorted(k for k in limits if k.endswith("gpu")):
        problems.append(f"{_path_str((*where, 'template', 'spec', 'containers', 0, 'resources', name))}: the head "
                        "must not hold a GPU (KubeRay would offer it to Ray, and a GPU replica would land there)")
    return problems


def pdb_spec_problems(spec: dict[str, Any]) -> list[str]:
    """The fields of one PodDisruptionBudget's spec (policy/v1), on their own."""
    problems = [f"spec.{key}: unknown field" for key in sorted(set(spec) - _PDB_SPEC)]
    given = [key for key in ("minAvailable", "maxUnavailable") if key in spec]
    if len(given) != 1:
        problems.append("spec: set exactly one of minAvailable and maxUnavailable")
    for key in given:
        value = spec[key]
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0
                or isinstance(value, str) and re.fullmatch(r"\d{1,3}%", value)):
            problems.append(f"spec.{key}: must be a non-negative integer or a percentage, not {value!r}")
    policy = spec.get("unhealthyPodEvictionPolicy")
    if policy is not None and policy not in _EVICTION_POLICIES:
        problems.append(f"spec.unhealthyPodEvictionPolicy: {policy!r}: one of {', '.join(sorted(_EVICTION_POLICIES))}")
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not isinstance(selector.get("matchLabels"), dict) \
            or not selector["matchLabels"] or set(selector) - {"matchLabels"}:
        problems.append("spec.selector: must be matchLabels only (a null or empty selector takes no pod or every "
                        "pod of the namespace; matchExpressions are not checked offline)")
    elif CLUSTER_LABEL in selector["matchLabels"]:
        problems.append(f"spec.selector.matchLabels.{CLUSTER_LABEL}: names one RayCluster, and every upgrade "
                        f"creates another: select on {CR_NAME_LABEL} (the RayService) instead")
    return problems


def ray_worker_groups(doc: dict[str, Any]) -> list[tuple[str, dict[str, str], int]]:
    """(group name, the labels its pods carry, maxReplicas) of every worker group of a RayService/RayCluster."""
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    cluster = spec.get("rayClusterConfig") if doc.get("kind") == "RayService" else spec
    out = []
    for group in (cluster or {}).get("workerGroupSpecs") or [] if isinstance(cluster, dict) else []:
        if not isinstance(group, dict):
            continue
        template_labels = ((group.get("template") or {}).get("metadata") or {}).get("labels") or {}
        # KubeRay's own labels win over the template's for these keys.
        labels = {**template_labels, NODE_TYPE_LABEL: "worker", GROUP_LABEL: str(group.get("groupName")),
                  "ray.io/is-ray-node": "yes"}
        hosts = group.get("numOfHosts", 1) if isinstance(group.get("numOfHosts", 1), int) else 1
        max_pods = group.get("maxReplicas", 0) * hosts if isinstance(group.get("maxReplicas", 0), int) else 0
        out.append((str(group.get("groupName")), labels, max_pods))
    return out


def disruption_budget_problems(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """(object, problem) for the budgets and Ray worker groups of one kustomization's output (``docs``)."""
    budgets = [d for d in docs if d.get("kind") == "PodDisruptionBudget" and isinstance(d.get("spec"), dict)]
    selectors = {id(b): ((b["spec"].get("selector") or {}).get("matchLabels") or {}) for b in budgets
                 if isinstance(b["spec"].get("selector"), dict)}
    out: list[tuple[dict[str, Any], str]] = []
    matched: set[int] = set()
    for doc in docs:
        if doc.get("kind") not in ("RayService", "RayCluster"):
            continue
        owner = (doc.get("metadata") or {}).get("name")
        groups_path = "spec.rayClusterConfig.workerGroupSpecs" if doc["kind"] == "RayService" \
            else "spec.workerGroupSpecs"
        for i, (name, labels, max_pods) in enumerate(ray_worker_groups(doc)):
            covering = [b for b in budgets if selectors.get(id(b)) and selectors[id(b)].items() <= labels.items()]
            matched |= {id(b) for b in covering}
            where = f"{groups_path}[{i}] ({name})"
            if not covering:
                out.append((doc, f"{where}: no PodDisruptionBudget selects this group's pods (labels {labels}): a "
                                 "node drain may evict all of them at once"))
            elif len(covering) > 1:
                out.append((doc, f"{where}: selected by several PodDisruptionBudgets "
                                 f"({', '.join(b['metadata']['name'] for b in covering)}): the eviction API refuses "
                                 "to evict a pod that more than one budget covers"))
            if labels.get(CR_NAME_LABEL) != owner:
                out.append((doc, f"{where}: the pod template's label {CR_NAME_LABEL} must be {owner!r} (KubeRay puts "
                                 "it only on the RayCluster; the budgets select on it)"))
            for budget in covering:
                out += _budget_over_ray_pods(budget, selectors[id(budget)], owner, name, max_pods)
    for budget in budgets:
        if id(budget) not in matched and selectors.get(id(budget)):
            out.append((budget, f"spec.selector: {selectors[id(budget)]} matches no pod template here (the budget "
                                "would protect nothing)"))
    return out


def _budget_over_ray_pods(budget: dict[str, Any], selector: dict[str, str], owner: str, group: str,
                          max_pods: int) -> list[tuple[dict[str, Any], str]]:
    spec = budget["spec"]
    out = []
    for key, want in ((CR_NAME_LABEL, owner), (NODE_TYPE_LABEL, "worker"), (GROUP_LABEL, group)):
        if selector.get(key) != want:
            out.append((budget, f"spec.selector.matchLabels.{key}: must be {want!r}: a budget over Ray pods selects "
                                f"the RayService ({CR_NAME_LABEL}), the worker node type and one group"))
    if "maxUnavailable" in spec or isinstance(spec.get("minAvailable"), str):
        key = "maxUnavailable" if "maxUnavailable" in spec else "minAvailable"
        out.append((budget, f"spec.{key}: use an integer minAvailable: for maxUnavailable or a percentage Kubernetes "
                            "asks the pods' owner for its scale, a RayCluster has no scale subresource, and the "
                            "budget then allows no eviction at all (every drain of a Ray node hangs)"))
    elif isinstance(spec.get("minAvailable"), int) and spec["minAvailable"] >= max(max_pods, 1):
        out.append((budget, f"spec.minAvailable: {spec['minAvailable']} with at most {max_pods} pod(s) in group "
                            f"{group!r}: no eviction is ever allowed, so every drain of their nodes hangs"))
    return out
