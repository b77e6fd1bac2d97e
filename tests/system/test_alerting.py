"""Alert rules, runbooks and the dashboard, checked without a cluster: promtool on the rules and their unit
tests, the SLO settings, every runbook link landing on a section of docs/operations.md, and what the
dashboard shows. `make deploy-check` runs this module; test_monitoring.py evaluates the same rules and
queries in a real Prometheus scraping a real server.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from serving.admin import DEFAULT_MARGIN_NATS, DEFAULT_MIN_PAIRS
from serving.metrics import Metrics
from tests.helpers import ROOT

DEPLOY = ROOT / "deploy"
RUNBOOKS = ROOT / "docs" / "operations.md"


def rule_groups() -> list[dict]:
    return yaml.safe_load((DEPLOY / "prometheus" / "prometheusrule.yaml").read_text())["spec"]["groups"]


def rules() -> list[dict]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def alerts() -> list[dict]:
    return [rule for rule in rules() if "alert" in rule]


def recorded(name: str) -> str:
    (rule,) = [rule for rule in rules() if rule.get("record") == name]
    return str(rule["expr"])


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
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests_fire_each_alert_and_keep_each_one_silent_somewhere(rules_dir: Path) -> None:
    result = subprocess.run(
        ["promtool", "test", "rules", str(rules_dir / "alerts.test.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    cases = [case for test in yaml.safe_load((rules_dir / "alerts.test.yaml").read_text())["tests"]
             for case in test["alert_rule_test"]]  # fmt: skip
    names = {rule["alert"] for rule in alerts()}
    assert {case["alertname"] for case in cases if case["exp_alerts"]} == names  # each one fires in a test
    assert {case["alertname"] for case in cases if not case["exp_alerts"]} == names  # and stays silent in one


def test_the_slo_settings_are_recorded_once_and_every_burn_rate_alert_reads_them() -> None:
    assert float(recorded("vae:slo_availability_objective").removeprefix("vector(").rstrip(")")) == 0.999
    assert float(recorded("vae:slo_latency_objective").removeprefix("vector(").rstrip(")")) == 0.99
    assert float(recorded("vae:slo_min_request_rate").removeprefix("vector(").rstrip(")")) > 0
    burn_alerts = [rule for rule in alerts() if "Budget" in rule["alert"]]
    assert len(burn_alerts) == 4  # availability and latency, each fast (page) and slow (ticket)
    for rule in burn_alerts:
        objective = "availability" if "Availability" in rule["alert"] else "latency"
        assert f"vae:slo_{objective}_objective" in rule["expr"] and "vae:slo_min_request_rate" in rule["expr"]
        assert rule["labels"]["severity"] == ("critical" if "Fast" in rule["alert"] else "warning")
    for rule in rules():  # the objectives are written nowhere else
        if not rule.get("record", "").startswith("vae:slo_"):
            assert not re.search(r'(?<!")\b0\.99', rule["expr"]), rule.get("alert") or rule.get("record")


def test_the_latency_objectives_threshold_is_a_bucket_the_server_has() -> None:
    metrics = Metrics(["Decode"])
    metrics.request_finished("Decode", "OK", "1", 0.1, 1)
    bounds = {
        sample.labels["le"]
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == "vae_request_duration_seconds_bucket"
    }
    thresholds = {le for rule in rules() for le in re.findall(r'\ble="([^"]+)"', rule["expr"])}
    assert thresholds == {"0.25"} and thresholds <= bounds


def test_availability_alerts_are_per_namespace_never_absent() -> None:
    # absent() is one series for all namespaces: a namespace whose pods are gone hides behind another's.
    assert not any("absent(" in rule["expr"] for rule in rules())
    (no_pods,) = [rule for rule in alerts() if rule["alert"] == "VaeNoHealthyPods"]
    assert "by (namespace)" in no_pods["expr"] and "kube_deployment_spec_replicas" in no_pods["expr"]


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_every_alert_links_its_runbook_in_this_repositorys_docs() -> None:
    repository = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    anchors = github_anchors(RUNBOOKS.read_text())
    for rule in alerts():
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        url = annotations["runbook_url"]
        assert url == f"{repository}/blob/main/docs/operations.md#{rule['alert'].lower()}", url
        assert rule["alert"].lower() in anchors, f"docs/operations.md has no section {rule['alert']}"


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "vae-service.json").read_text())


def panels() -> dict[str, dict]:
    return {panel["title"]: panel for panel in dashboard()["panels"] if panel["type"] != "row"}


def steps(panel: dict) -> list[tuple[float | None, str]]:
    return [(step["value"], step["color"]) for step in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]]


def test_dashboard_is_templated_on_datasource_namespace_and_pod() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["traces"]["type"] == "datasource" and variables["traces"]["query"] == "tempo"
    assert {"namespace", "pod"} <= variables.keys()
    # Each panel asks the data source its variable picks, and follows the namespace selection: PromQL by the
    # `namespace` label, TraceQL by the resource attribute the tracing component sets.
    sources = {"prometheus": ("${datasource}", 'namespace=~"$namespace"'),
               "tempo": ("${traces}", 'resource.k8s.namespace.name =~ "${namespace:regex}"')}  # fmt: skip
    for panel in panels().values():
        uid, namespace_filter = sources[panel["datasource"]["type"]]
        assert panel["datasource"]["uid"] == uid, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], panel["title"]
            query = target["expr"] if "expr" in target else target["query"]
            assert namespace_filter in query, (panel["title"], query)


def test_every_panel_has_a_unit_and_thresholds() -> None:
    for title, panel in panels().items():
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults["unit"], title
        assert steps(panel) and steps(panel)[0][0] is None, title  # a base colour, then the steps that matter


def test_thresholds_mean_what_the_slos_and_limits_say() -> None:
    board = panels()
    budget = 1 - 0.999
    assert steps(board["Error ratio (server-side)"])[1:] == [
        (pytest.approx(budget), "orange"),
        (pytest.approx(14.4 * budget), "red"),
    ]
    assert [step for step in steps(board["Requests/s"])] == [(None, "blue")]  # traffic is not good or bad
    for title in ("Latency p50 / p95 / p99 by method", "Latency p99 by version", "Queue wait p50 / p99 by graph"):
        assert (0.25, "red") in steps(board[title]), title  # the latency objective's threshold
    assert steps(board["Availability: error budget burn rate"])[-2:] == [(6, "orange"), (14.4, "red")]
    assert (1, "red") in steps(board["Input drift: traffic median / baseline 0.99 quantile"])


def test_healthy_pods_shows_zero_not_no_data_when_every_pod_is_gone() -> None:
    for title in ("Healthy pods", "Pods up"):
        panel = panels()[title]
        assert panel["targets"][0]["expr"].endswith(" or vector(0)"), title
        assert steps(panel) == [(None, "red"), (1, "orange"), (2, "green")], title


def test_dashboard_covers_what_operators_watch() -> None:
    exprs = " ".join(t["expr"] for p in panels().values() for t in p["targets"] if "expr" in t)
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
        "vae:request_errors:ratio_rate1h",  # the SLOs' burn rates, from the recording rules
        "vae:request_slow:ratio_rate1h",
        "vae_input_score_nats_bucket",  # input drift: the traffic's scores beside the training baseline
        "vae_model_score_baseline_nats",
        "vae_latent_norm_bucket",
        "DCGM_FI_DEV_GPU_UTIL",  # the GPU overlay's device, from the DCGM exporter
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_GPU_TEMP",
        "vae_trace_spans_dropped_total",  # traces lost to a full export queue
        "vae_shadow_difference_nats_bucket",  # candidate vs stable on identical inputs
        "vae_shadow_negative_elbo_nats_bucket",
        "vae_shadow_reconstruction_nats_bucket",
        "vae_shadow_latent_norm_bucket",
        "vae_shadow_jobs_total",
        "vae_shadow_seconds_bucket",
        "vae_canary_weight",
    ):
        assert metric in exprs, metric
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (method, le) (rate(vae_request_duration_seconds" in exprs
    # traffic, latency and errors by model version, side by side during a swap or a canary
    assert "sum by (version) (rate(vae_requests_total" in exprs
    assert "histogram_quantile(0.99, sum by (version, le) (rate(vae_request_duration_seconds_bucket" in exprs
    # each pod's share of traffic (connection pinning shows there) and rejections by status code
    assert (
        "sum by (pod) (rate(vae_requests_total"
        in panels()["Traffic share by pod (1 = even split)"]["targets"][0]["expr"]
    )
    assert "sum by (code)" in panels()["Rejected share by reason (status code)"]["targets"][0]["expr"]


def row_panels(title: str) -> dict[str, dict]:
    """The panels under the dashboard's row of that title, by title."""
    board = dashboard()["panels"]
    (start,) = [index for index, panel in enumerate(board) if panel["type"] == "row" and panel["title"] == title]
    row = {}
    for panel in board[start + 1 :]:
        if panel["type"] == "row":
            break
        row[panel["title"]] = panel
    return row


def test_dashboard_shows_the_candidate_against_stable_on_the_same_inputs() -> None:
    row = row_panels("Candidate vs stable on identical inputs")

    def queries(title: str) -> list[str]:
        return [target["expr"] for target in row[title]["targets"]]

    # the paired difference's median and spread, per pair of versions
    difference = queries("Paired difference: candidate − stable (median, p10, p90)")
    for quantile in ("0.5", "0.1", "0.9"):
        expected = (
            f"histogram_quantile({quantile}, sum by (candidate, stable, le) (rate(vae_shadow_difference_nats_bucket"
        )
        assert any(query.startswith(expected) for query in difference), quantile
    # worse = above the bucket at 0; prometheus_client writes that bucket's bound as "0.0"
    (worse,) = queries("Share of inputs the candidate scores worse")
    assert 'vae_shadow_difference_nats_bucket{namespace=~"$namespace", pod=~"$pod", le="0.0"}' in worse
    assert row["Share of inputs the candidate scores worse"]["fieldConfig"]["defaults"]["unit"] == "percentunit"
    # both versions' distributions on the same images, by role
    for metric in ("vae_shadow_negative_elbo_nats", "vae_shadow_reconstruction_nats", "vae_shadow_latent_norm"):
        assert any(
            f"sum by (version, role, le) (rate({metric}_bucket" in query for title in row for query in queries(title)
        )
    # the weight and each version's share of requests, on one scale
    weight = row["Canary weight and share of requests by version"]
    assert weight["fieldConfig"]["defaults"]["unit"] == "percentunit"
    weighted = queries("Canary weight and share of requests by version")
    assert any("vae_canary_weight" in query for query in weighted)
    assert any(query.startswith("sum by (version) (rate(vae_requests_total") and " / " in query for query in weighted)
    # whether the evidence grows: shadow jobs by result, their runs' time, the pairs the alert and promote need
    assert queries("Shadow jobs by result") == [
        'sum by (result) (rate(vae_shadow_jobs_total{namespace=~"$namespace", pod=~"$pod"}[$__rate_interval]))'
    ]
    assert any("vae_shadow_seconds_bucket" in query for query in queries("Shadow run time p99 by role"))
    assert steps(row["Paired inputs per 30 minutes"])[1:] == [(DEFAULT_MIN_PAIRS, "green")]


def latency_histograms_read(panel: dict) -> bool:
    """Whether a panel plots quantiles of a histogram whose observations carry a sampled request's trace."""
    return any(
        "histogram_quantile(" in target.get("expr", "")
        and re.search(r"\b(vae_request_duration_seconds|vae_queue_wait_seconds)_bucket\b", target["expr"])
        for target in panel["targets"]
    )


def test_latency_panels_show_exemplars_once_each() -> None:
    """The dots that lead to a slow request's trace: one query per latency panel asks for them (every query of a
    panel reads the same buckets, so each would draw the same dots again), the p99, where slow requests are."""
    latency = {title: panel for title, panel in panels().items() if latency_histograms_read(panel)}
    assert latency.keys() == {
        "Latency p50 / p95 / p99 by method",
        "Latency p99 by version",
        "Queue wait p50 / p99 by graph",
    }
    for title, panel in latency.items():
        asking = [target for target in panel["targets"] if target.get("exemplar") is True]
        assert len(asking) == 1 and asking[0]["expr"].startswith("histogram_quantile(0.99, "), title
    elsewhere = [title for title, panel in panels().items() if title not in latency
                 for target in panel["targets"] if target.get("exemplar")]  # fmt: skip
    assert elsewhere == []  # no other series carries exemplars


def test_slow_requests_traces_come_from_the_traces_variables_data_source() -> None:
    """The traces panel searches `${traces}` (the Tempo data source picked) for the server spans the latency
    objective counts as slow, under the service name the tracing component gives; each trace ID it lists opens the
    trace in that data source (a Tempo search table links its IDs)."""
    component = yaml.safe_load((DEPLOY / "k8s" / "components" / "tracing" / "kustomization.yaml").read_text())
    (patch,) = [yaml.safe_load(p["patch"]) for p in component["patches"] if p["target"]["kind"] == "Deployment"]
    env = {v["name"]: v.get("value") for v in patch["spec"]["template"]["spec"]["containers"][0]["env"]}
    (panel,) = [panel for panel in panels().values() if panel["datasource"]["type"] == "tempo"]
    assert panel["datasource"] == {"type": "tempo", "uid": "${traces}"}
    (target,) = panel["targets"]
    assert target["queryType"] == "traceql" and target["tableType"] == "traces" and target["limit"] > 0
    query = target["query"]
    assert f'resource.service.name = "{env["OTEL_SERVICE_NAME"]}"' in query and "kind = server" in query
    threshold_ms = {float(le) * 1000 for rule in rules() for le in re.findall(r'\ble="([^"]+)"', rule["expr"])}
    assert threshold_ms == {250} and "duration > 250ms" in query  # the latency objective's "slow"
    assert 'name !~ ".*SampleStream"' in query  # streams are not unary requests: the objective leaves them out
    assert 'resource.k8s.pod.name =~ "${pod:regex}"' in query
    assert (250, "red") in steps(panel)


def test_the_canary_alert_judges_with_promotes_margin_and_minimum_pairs() -> None:
    (rule,) = [rule for rule in alerts() if rule["alert"] == "VaeCanaryScoresWorse"]
    margin = re.search(r"\)\s*>\s*([0-9.]+)\s*\)", rule["expr"])
    pairs = re.search(r">=\s*([0-9]+)\s*$", rule["expr"].strip())
    assert margin and pairs, rule["expr"]
    assert float(margin.group(1)) == DEFAULT_MARGIN_NATS and int(pairs.group(1)) == DEFAULT_MIN_PAIRS
    (difference,) = [p for p in panels().values() if p["title"].startswith("Paired difference")]
    assert [value for value, color in steps(difference) if color == "red"] == [DEFAULT_MARGIN_NATS]
