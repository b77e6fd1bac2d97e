"""A real Prometheus scrapes a real server under traffic, with the alert and recording rules loaded; every
dashboard query and every rule is evaluated.

Prometheus (Debian package `prometheus`, installed by `make install`) runs on a free loopback port with a
generated config that scrapes the test server every second, labelled the way the ServiceMonitor labels it in
a cluster (job, namespace, pod), and evaluates deploy/prometheus's rules every second. Bounded: a few
hundred requests over a few seconds, all to 127.0.0.1.

The server traces every request to an OTLP receiver on a loopback port (`bench.otlp_receiver`), and Prometheus
stores exemplars (`--enable-feature=exemplar-storage`; it asks for the OpenMetrics exposition, which carries
them): the exemplars it returns must name traces the receiver got.

The server serves the tests' model as stable and, as the canary, a version trained for two steps, and shadow-scores
every stable input on it: the canary panels have series, and the alert that the canary scores live inputs worse
fires on what Prometheus scraped.

Series from other exporters (the DCGM exporter's GPU metrics, kube-state-metrics) cannot exist here: queries
on them must evaluate, not return data. So must queries on metrics the server under test does not export. The
dashboard's traces panel asks the tracing data source, not Prometheus, and is not evaluated here.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from bench.otlp_receiver import OtlpReceiver
from contract.labels import write_labels
from serving.client import VaeClient, VaeError
from tests.helpers import ROOT, ServerThread, running_server, scrape, train_tiny_checkpoint, wait_until

DEPLOY = ROOT / "deploy"
RATE_WINDOW = "20s"  # stands in for Grafana's $__rate_interval at a 1 s scrape interval
OTHER_EXPORTERS = ("DCGM_FI_", "kube_")  # the DCGM exporter's and kube-state-metrics' series


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            return json.loads(response.read())

    def total(self, expr: str) -> float:
        """The sum of the values of an instant query's series."""
        return sum(float(sample["value"][1]) for sample in self.query(expr))

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; fails the test on a PromQL error (the expression must parse and evaluate)."""
        try:
            reply = self.get("/api/v1/query", query=expr)
        except urllib.error.HTTPError as exc:  # 400 carries Prometheus' own message
            raise AssertionError(f"{expr!r}: {exc.read().decode()}") from None
        assert reply["status"] == "success", (expr, reply)
        return reply["data"]["result"]


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def with_bad_canary(exported_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' model as stable (version 1) and, as the canary, a version trained for two steps (2)."""
    from training.export import export

    folder = tmp_path_factory.mktemp("monitored")
    model_dir = Path(shutil.copytree(exported_repository, folder / "models" / "vae-mnist"))
    export(train_tiny_checkpoint(folder / "bad.pt", latent_dim=20, steps=2, seed=1), model_dir.parent, model_dir.name)
    write_labels(model_dir, {"stable": 1, "canary": 2})
    return model_dir


@pytest.fixture(scope="module")
def server(with_bad_canary: Path, receiver: OtlpReceiver) -> Iterator[ServerThread]:
    """Stable answers every request (no canary weight); each of its Encode, Score and Reconstruct inputs is
    scored again on the bad canary, so the shadow panels and the canary alert have series."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in receiver.env().items():  # read once, as the server starts
            patch.setenv(name, value)
        config = {"max_delay_ms": 2.0, "default_version": "stable", "shadow_fraction": 1.0}
        with running_server(with_bad_canary, **config) as running:
            yield running


@pytest.fixture(scope="module")
def prometheus(server: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: `make install` installs the Debian package"
    directory = tmp_path_factory.mktemp("prometheus")
    (directory / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": [str(directory / "rules.yaml")],
        "scrape_configs": [
            {
                "job_name": "vae-server",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{server.running.metrics_port}"],
                        "labels": {"namespace": "vae", "pod": "vae-server-0"},
                    }
                ],
            }
        ],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--enable-feature=exemplar-storage",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(directory / "prometheus.log").open("w"),
    )
    client = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                targets = client.get("/api/v1/targets")["data"]["activeTargets"]
                if targets and targets[0]["health"] == "up":
                    break
            except OSError:
                pass
            assert process.poll() is None, (directory / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Prometheus did not scrape the server within 30 s"
            time.sleep(0.2)
        yield client
    finally:
        process.terminate()
        process.wait(timeout=15)


@pytest.fixture(scope="module")
def traffic(server: ServerThread, prometheus: Prometheus) -> dict[str, int]:
    """Every RPC, some bad requests, spread over ~6 s so that rates over a 20 s window have several points."""
    sent = {"Sample": 0, "Decode": 0, "Encode": 0, "Interpolate": 0, "GetModelInfo": 0, "Score": 0, "Reconstruct": 0}
    sent["invalid"] = 0
    with VaeClient(server.target, retries=0) as client:
        latent_dim = client.model_info().latent_dim
        for round_ in range(12):
            drawn = client.sample(8, seed=round_)
            images, latents = drawn.images, drawn.latents
            client.decode(latents)
            client.encode(images)
            client.interpolate(latents[:2], latents[2:4], steps=5)
            client.model_info()
            client.score(images)  # the input score and latent norm histograms (the drift panels and alert)
            client.reconstruct(images)  # with Encode and Score: 24 images shadow-scored on the canary per round
            for name in ("Sample", "Decode", "Encode", "Interpolate", "GetModelInfo", "Score", "Reconstruct"):
                sent[name] += 1
            with pytest.raises(VaeError):
                client.decode(np.zeros((1, latent_dim + 1), np.float32))
            sent["invalid"] += 1
            time.sleep(0.5)
    # Until a scrape has the last requests too (every second, or later on a loaded machine); the one GetModelInfo
    # asked up front counts as well. test_scraped_counts_match_the_traffic_sent checks each count exactly.
    wait_until(
        lambda: prometheus.total('vae_requests_total{job="vae-server"}') >= sum(sent.values()) + 1,
        timeout_s=60,
        what="Prometheus to scrape every request sent",
    )
    wait_until(
        lambda: prometheus.total('vae_shadow_difference_nats_count{job="vae-server"}') >= 24 * 12,
        timeout_s=60,
        what="Prometheus to scrape every shadow-scored input",
    )
    return sent


@pytest.fixture(scope="module")
def exported(server: ServerThread) -> set[str]:
    """The names of the series the server under test exports."""
    return set(scrape(server.metrics_url))


def read_series(expr: str) -> set[str]:
    """The metric names an expression reads (recorded series, vae:..., included)."""
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))
    return {name for name in names if name not in ("by", "on", "ignoring", "group_left", "without")}


def reads_only(expr: str, exported: set[str]) -> bool:
    """True when every series `expr` reads is the server's own, its scrape's `up`, or recorded from them (so data
    must come back)."""
    return all(name in exported or name == "up" or name.startswith("vae:") for name in read_series(expr))


def dashboard_targets() -> list[tuple[str, str]]:
    board = json.loads((DEPLOY / "grafana" / "vae-service.json").read_text())
    return [
        (panel["title"], target["expr"])
        for panel in board["panels"]
        for target in panel.get("targets", [])
        if "expr" in target  # PromQL; the traces panel's TraceQL goes to the tracing data source
    ]


def as_query(expr: str) -> str:
    """Grafana's variables as an 'All' selection, and $__rate_interval as a window fit for this scrape rate."""
    return expr.replace("$namespace", ".*").replace("$pod", ".*").replace("$__rate_interval", RATE_WINDOW)


def unknown_series(expr: str, exported: set[str]) -> set[str]:
    """Series `expr` reads that neither the server exports, nor a rule records, nor another exporter owns."""
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    known = exported | recorded | {"up"}
    return {name for name in read_series(expr) if name not in known and not name.startswith(OTHER_EXPORTERS)}


@pytest.mark.parametrize(("title", "expr"), dashboard_targets(), ids=lambda value: str(value)[:60])
def test_every_dashboard_query_evaluates_and_returns_series_from_the_servers_metrics(
    prometheus: Prometheus, traffic: dict, exported: set[str], title: str, expr: str
) -> None:
    result = prometheus.query(as_query(expr))  # parses and evaluates, whatever it reads
    assert not unknown_series(expr, exported), f"panel {title!r} reads series nothing exports"
    if reads_only(expr, exported):
        assert result, f"panel {title!r}: {expr} returned no series"


def rule_groups() -> list[dict[str, Any]]:
    return list(yaml.safe_load((DEPLOY / "prometheus" / "prometheusrule.yaml").read_text())["spec"]["groups"])


def rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"]]


@pytest.mark.parametrize("rule", [r for r in rules() if "record" in r], ids=lambda rule: rule["record"])
def test_every_recording_rule_records_series_from_the_servers_metrics(
    prometheus: Prometheus, traffic: dict, exported: set[str], rule: dict
) -> None:
    assert unknown_series(rule["expr"], exported) == set(), rule["record"]
    assert prometheus.query(rule["record"]), f"{rule['record']} recorded nothing from the server's metrics"


@pytest.mark.parametrize("rule", [r for r in rules() if "alert" in r], ids=lambda rule: rule["alert"])
def test_every_alert_expression_evaluates_on_the_servers_metrics(
    prometheus: Prometheus, traffic: dict, exported: set[str], rule: dict
) -> None:
    expr = rule["expr"]
    firing = prometheus.query(expr)  # parses and evaluates
    # A healthy server fires nothing; whether the test's inputs (decoded samples, not digits) look like the
    # training data is not what this test is about, so VaeInputDrift's condition is evaluated only. Its canary is
    # bad on purpose: test_the_canary_alert_fires_for_a_canary_worse_than_stable.
    judged = ("VaeInputDrift", "VaeCanaryScoresWorse")
    assert not firing or rule["alert"] in judged, f"{rule['alert']} fires on a healthy server"
    assert not unknown_series(expr, exported), f"{rule['alert']} reads series nothing exports"
    # Every series the alert reads that the server exports exists under that name and those labels: no alert
    # watches a typo.
    for selector in re.findall(r"\b(?:vae_[a-z_]+|up)\{[^}]*\}", expr):
        name, labels = selector.split("{", 1)
        if name not in exported:
            continue
        labels = ",".join(part for part in labels.rstrip("}").split(",") if "code" not in part)
        assert prometheus.query(f"{name}{{{labels}}}"), f"{rule['alert']}: {selector} matches no series"


def test_scraped_counts_match_the_traffic_sent(prometheus: Prometheus, traffic: dict) -> None:
    total = prometheus.total
    for method in ("Sample", "Encode", "Interpolate", "GetModelInfo", "Score", "Reconstruct"):
        ok = total(f'vae_requests_total{{job="vae-server", method="{method}", code="OK"}}')
        # GetModelInfo is also asked once up front for the latent size.
        assert ok == traffic[method] + (method == "GetModelInfo"), method
    assert total('vae_requests_total{method="Decode", code="OK"}') == traffic["Decode"]
    assert total('vae_requests_total{method="Decode", code="INVALID_ARGUMENT"}') == traffic["invalid"]
    assert total('vae_model_info{namespace="vae", pod="vae-server-0"}') == 2  # stable and the canary
    assert total('vae_requests_total{job="vae-server", version="2"}') == 0  # no weight: the canary answers nobody
    assert total('vae_shadow_jobs_total{result="scored"}') == 3 * traffic["Score"]  # Encode, Score, Reconstruct
    assert total("up{job='vae-server'}") == 1


@pytest.mark.parametrize("histogram", ["vae_request_duration_seconds", "vae_queue_wait_seconds"])
def test_prometheus_keeps_exemplars_that_name_the_traces_of_the_requests(
    prometheus: Prometheus, traffic: dict, receiver: OtlpReceiver, histogram: str
) -> None:
    now = time.time()
    reply = prometheus.get(
        "/api/v1/query_exemplars", query=f'{histogram}_bucket{{job="vae-server"}}', start=str(now - 600), end=str(now)
    )
    assert reply["status"] == "success", reply
    exemplars = [exemplar for series in reply["data"] for exemplar in series["exemplars"]]
    assert exemplars, f"Prometheus stored no exemplar of {histogram}"
    traces = {exemplar["labels"]["trace_id"] for exemplar in exemplars}
    received = receiver.wait_for(lambda spans: traces <= {span.trace_id for span in spans})
    named = {span.span_id: span for span in received}
    for exemplar in exemplars:  # each names a span the receiver got, of that trace: the request's (or, for a
        span = named[exemplar["labels"]["span_id"]]  # Score's wait, the step that queued its rows)
        assert span.trace_id == exemplar["labels"]["trace_id"]
        assert span.kind == "SPAN_KIND_SERVER" or span.name in ("vae.encode", "vae.decode")


def test_the_canary_alert_fires_for_a_canary_worse_than_stable(prometheus: Prometheus, traffic: dict) -> None:
    """VaeCanaryScoresWorse's condition, as written, on the paired differences Prometheus scraped: the canary
    trained for two steps explains every shadowed image worse than stable by far more than the margin."""
    (rule,) = [rule for rule in rules() if rule.get("alert") == "VaeCanaryScoresWorse"]
    (firing,) = prometheus.query(rule["expr"])
    labels = firing["metric"]
    assert (labels["candidate"], labels["stable"], labels["namespace"], labels["job"]) == (
        "2",
        "1",
        "vae",
        "vae-server",
    )
    assert float(firing["value"][1]) > 1  # the median paired difference, nats
