"""Prometheus metrics on their own registry (the process serves them on their own port).

The names and label sets are a public contract: the dashboard (deploy/grafana/vae-service.json) and the
alerts (deploy/prometheus/prometheusrule.yaml) use them; a change changes both, with the real-Prometheus
test (tests/system/test_monitoring.py) passing. Labels take bounded values only: method (the service's
RPCs), code (gRPC status names), graph (encoder, decoder), and the model version that served (one per loaded
version; "" for requests refused before a version took them). A version's series appear when it is loaded
and are removed when it is unloaded, so swapping versions does not grow the registry. The process and
platform collectors of the client library are registered too (CPU, memory, file descriptors, GC).

The port that serves them is the process's: `serving/server/metrics_port.py`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import prometheus_client as prom
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from contract.scores import BASELINE_QUANTILES, ImageScores, quantile_key
from serving.tracing import Traced, exemplar

log = logging.getLogger(__name__)

GRAPHS = ("encoder", "decoder")
LOAD_RESULTS = ("loaded", "failed")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
# Scores of MNIST-like inputs are ~60-150 nats, of unlike ones hundreds more: 25 .. 3200 in steps of √2.
_SCORE_BUCKETS = tuple(round(25 * 2 ** (i / 2), 1) for i in range(15))
# Posterior-mean norms: ~sqrt(latent_dim) for inputs like the training data. 0.5 .. 16 in steps of √2.
_NORM_BUCKETS = tuple(round(0.5 * 2 ** (i / 2), 2) for i in range(11))
_BASELINE_KEYS = tuple(map(quantile_key, BASELINE_QUANTILES))  # as the manifest's score_quantiles name them
# Paired differences (candidate − stable, nats) on both sides of 0; 1 nat is the promote margin and the alert's.
_DIFFERENCE_BUCKETS = (-50.0, -20.0, -10.0, -5.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
SHADOW_RESULTS = ("scored", "dropped", "abandoned")
ROLES = ("stable", "candidate")


class Metrics:
    """The server's metrics; also the model manager's observer (`model_loaded`, `for_version`, ...)."""

    def __init__(self, methods: Sequence[str]) -> None:
        """`methods`: the RPCs whose series exist from the start (zeros, not gaps, before the first request)."""
        self.methods = tuple(methods)
        self.registry = prom.CollectorRegistry()
        r = self.registry
        prom.ProcessCollector(registry=r)
        prom.PlatformCollector(registry=r)
        prom.GCCollector(registry=r)
        by_method = ["method", "version", "protocol"]  # protocol: "grpc" (both services) or "http" (REST)
        by_graph = ["graph", "version"]
        self.requests = prom.Counter(
            "vae_requests",
            "requests finished, by method, gRPC status code (REST's too), version and protocol",
            [*by_method, "code"],
            registry=r,
        )
        self.request_duration = prom.Histogram(
            "vae_request_duration_seconds", "RPC latency on the server", by_method, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.request_items = prom.Histogram(
            "vae_request_items", "images or latents per successful request", by_method, buckets=_ROW_BUCKETS, registry=r
        )
        self.batch_rows = prom.Histogram(
            "vae_batch_rows", "rows per onnxruntime run", by_graph, buckets=_ROW_BUCKETS, registry=r
        )
        self.queue_wait = prom.Histogram(
            "vae_queue_wait_seconds",
            "time a request waited for its batch to start",
            by_graph,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = prom.Histogram(
            "vae_inference_seconds",
            "onnxruntime run time per batch (the run alone, not the hand-off to its thread)",
            by_graph,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth_rows = prom.Gauge("vae_queue_depth", "rows waiting to run", by_graph, registry=r)
        self.inflight = prom.Gauge("vae_inflight_requests", "RPCs being handled", registry=r)
        self.model_info = prom.Gauge(
            "vae_model_info",
            "one series per loaded version (value 1), with the labels that name it (comma-separated)",
            ["name", "version", "provider", "labels"],
            registry=r,
        )
        self.model_loads = prom.Counter(
            "vae_model_loads", "versions loaded, or refused by verification or warm-up", ["result"], registry=r
        )
        self.input_score = prom.Histogram(
            "vae_input_score_nats",
            "plug-in negative ELBO (nats: -log p(x|z=mu) + KL, deterministic) of each input scored: Score and "
            "Reconstruct inputs, and the sampled fraction of Encode's",
            ["version"],
            buckets=_SCORE_BUCKETS,
            registry=r,
        )
        self.latent_norm = prom.Histogram(
            "vae_latent_norm",
            "L2 norm of the posterior mean of each input encoded (Encode, Score, Reconstruct)",
            ["version"],
            buckets=_NORM_BUCKETS,
            registry=r,
        )
        self.score_baseline = prom.Gauge(
            "vae_model_score_baseline_nats",
            "quantiles of the plug-in negative ELBO over the version's validation images, from its manifest (the "
            "training baseline the input score histogram is compared with)",
            ["version", "quantile"],
            registry=r,
        )
        self.default_version = prom.Gauge(
            "vae_model_default_version", "the version requests naming none are served by", registry=r
        )
        self.canary_weight = prom.Gauge(
            "vae_canary_weight",
            "share of the requests naming no version routed to the canary label's version (0 while there is none)",
            registry=r,
        )
        self.canary_version = prom.Gauge(
            "vae_canary_version", "the version the canary share goes to (0: none)", registry=r
        )
        by_role = ["version", "role"]  # role: stable or candidate, in the pair shadow scoring compares
        self.shadow_jobs = prom.Counter(
            "vae_shadow_jobs",
            "requests of the stable version offered for shadow scoring on the candidate, by result: scored, dropped "
            "(the shadow queue was full) or abandoned (a version went, or the run gave way)",
            ["result"],
            registry=r,
        )
        self.shadow_negative_elbo = prom.Histogram(
            "vae_shadow_negative_elbo_nats",
            "negative ELBO of each shadow-scored input on each version of the pair (the same inputs on both)",
            by_role,
            buckets=_SCORE_BUCKETS,
            registry=r,
        )
        self.shadow_reconstruction = prom.Histogram(
            "vae_shadow_reconstruction_nats",
            "reconstruction error (-log p(x|z), nats, the negative ELBO's first term) of each shadow-scored input on "
            "each version of the pair",
            by_role,
            buckets=_SCORE_BUCKETS,
            registry=r,
        )
        self.shadow_latent_norm = prom.Histogram(
            "vae_shadow_latent_norm",
            "posterior-mean norm of each shadow-scored input on each version of the pair",
            by_role,
            buckets=_NORM_BUCKETS,
            registry=r,
        )
        self.shadow_difference = prom.Histogram(
            "vae_shadow_difference_nats",
            "candidate minus stable negative ELBO of each shadow-scored input (positive: the candidate is worse)",
            ["candidate", "stable"],
            buckets=_DIFFERENCE_BUCKETS,
            registry=r,
        )
        self.shadow_seconds = prom.Histogram(
            "vae_shadow_seconds",
            "time of each shadow scoring run, per version of the pair (stable's only where the reply had no scores)",
            by_role,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        for result in LOAD_RESULTS:
            self.model_loads.labels(result)
        for result in SHADOW_RESULTS:
            self.shadow_jobs.labels(result)
        self._shadow_pairs: set[tuple[str, str]] = set()  # (candidate, stable) of vae_shadow_difference_nats
        # The labelled children, looked up once: `labels()` costs microseconds, on every request and batch.
        self._requests: dict[tuple[str, str, str, str], Any] = {}  # (method, version, protocol, code)
        self._durations: dict[tuple[str, str, str], Any] = {}  # (method, version, protocol)
        self._items: dict[tuple[str, str, str], Any] = {}
        self._info: dict[str, tuple[str, str, str, str]] = {}  # version → model_info's label values

    def count_dropped_spans(self, dropped: Callable[[], int]) -> None:
        """Expose `dropped()`, the spans tracing dropped because its export queue was full, as a counter."""
        self.registry.register(_DroppedSpans(dropped))

    def request_finished(
        self,
        method: str,
        code: str,
        version: str,
        duration_seconds: float,
        items: int | None,
        protocol: str = "grpc",
        exemplar: dict[str, str] | None = None,
    ) -> None:
        """One request done; `version` is the one that served it ("" when refused before a version took it);
        `exemplar`: its sampled trace's ids, kept with the duration (`serving.tracing.exemplar`)."""
        key = (method, version, protocol)
        counter = self._requests.get((*key, code))
        if counter is None:
            counter = self._requests[(*key, code)] = self.requests.labels(*key, code)
        counter.inc()
        duration = self._durations.get(key)
        if duration is None:
            duration = self._durations[key] = self.request_duration.labels(*key)
        duration.observe(duration_seconds, exemplar)
        if items is not None:
            histogram = self._items.get(key)
            if histogram is None:
                histogram = self._items[key] = self.request_items.labels(*key)
            histogram.observe(items)

    # ModelObserver
    def model_loaded(self, name: str, version: int, provider: str, score_quantiles: Mapping[str, float]) -> None:
        """A version takes traffic: its info series, its score baseline, and zeros for its request series."""
        v = str(version)
        self._info[v] = (name, v, provider, "")
        self.model_info.labels(*self._info[v]).set(1)
        self.model_loads.labels("loaded").inc()
        for quantile in _BASELINE_KEYS:
            if quantile in score_quantiles:
                self.score_baseline.labels(v, quantile).set(score_quantiles[quantile])
        for method in self.methods:
            self._zero_series(method, v)

    def _zero_series(self, method: str, version: str) -> None:
        key = (method, version, "grpc")
        self._requests[(*key, "OK")] = self.requests.labels(*key, "OK")
        self._durations[key] = self.request_duration.labels(*key)
        self._items[key] = self.request_items.labels(*key)

    def model_load_failed(self) -> None:
        self.model_loads.labels("failed").inc()

    def model_unloaded(self, version: int) -> None:
        """Remove every series of `version`, so that the registry does not grow with each swap."""
        v = str(version)
        info = self._info.pop(v, None)
        if info is not None:
            self.model_info.remove(*info)
        for request_key in [key for key in self._requests if key[1] == v]:
            self.requests.remove(*request_key)
            del self._requests[request_key]
        for histogram, children in ((self.request_duration, self._durations), (self.request_items, self._items)):
            for method_key in [key for key in children if key[1] == v]:
                histogram.remove(*method_key)
                del children[method_key]
        for graph in GRAPHS:
            for family in (self.batch_rows, self.queue_wait, self.inference, self.queue_depth_rows):
                family.remove(graph, v)
        for histogram in (self.input_score, self.latent_norm):
            histogram.remove(v)
        for quantile in _BASELINE_KEYS:
            with contextlib.suppress(KeyError):  # a manifest without a baseline has none of these
                self.score_baseline.remove(v, quantile)
        for family in (self.shadow_negative_elbo, self.shadow_reconstruction, self.shadow_latent_norm):
            for role in ROLES:
                with contextlib.suppress(KeyError):  # only the versions shadow scoring compared have these
                    family.remove(v, role)
        for role in ROLES:
            with contextlib.suppress(KeyError):
                self.shadow_seconds.remove(v, role)
        for pair in [pair for pair in self._shadow_pairs if v in pair]:
            self.shadow_difference.remove(*pair)
            self._shadow_pairs.discard(pair)

    def labels_changed(self, labels_by_version: dict[int, list[str]], default_version: int | None) -> None:
        for v, (name, _, provider, old) in list(self._info.items()):
            new = ",".join(labels_by_version.get(int(v), []))
            if new != old:
                self.model_info.remove(name, v, provider, old)
                self._info[v] = (name, v, provider, new)
                self.model_info.labels(name, v, provider, new).set(1)
        self.default_version.set(default_version or 0)

    def canary_changed(self, version: int | None, weight: float) -> None:
        self.canary_version.set(version or 0)
        self.canary_weight.set(weight if version is not None else 0.0)

    # ShadowObserver
    def shadow_compared(self, candidate: int, stable: int) -> None:
        """A pair's series from the moment it is compared (zeros, not gaps: a rate or increase counts from 0)."""
        key = (str(candidate), str(stable))
        self._shadow_pairs.add(key)
        self.shadow_difference.labels(*key)
        for family in (self.shadow_negative_elbo, self.shadow_reconstruction, self.shadow_latent_norm):
            family.labels(str(stable), "stable")
            family.labels(str(candidate), "candidate")

    def shadow_job(self, result: str) -> None:
        self.shadow_jobs.labels(result).inc()

    def shadow_scored(self, version: int, role: str, scores: ImageScores, seconds: float | None) -> None:
        """One version's scores of a job's inputs, as `role` of the pair; `seconds`: its run (None: the reply's)."""
        v = str(version)
        for family, values in (
            (self.shadow_negative_elbo, scores.negative_elbo),
            (self.shadow_reconstruction, scores.reconstruction),
            (self.shadow_latent_norm, scores.latent_norm),
        ):
            observe_each(family.labels(v, role), values)
        if seconds is not None:
            self.shadow_seconds.labels(v, role).observe(seconds)

    def shadow_paired(self, candidate: int, stable: int, differences: np.ndarray) -> None:
        """The paired differences of one job's inputs: candidate − stable negative ELBO."""
        key = (str(candidate), str(stable))
        self._shadow_pairs.add(key)
        observe_each(self.shadow_difference.labels(*key), differences)

    def for_version(self, version: int) -> _VersionObserver:
        """The batchers' observer for one version (its series created now: zeros, not gaps)."""
        return _VersionObserver(self, str(version))


class _VersionObserver:
    """EngineObserver for the engine and batchers of one version, with its labelled children looked up once."""

    def __init__(self, metrics: Metrics, version: str) -> None:
        self._scores = metrics.input_score.labels(version)
        self._norms = metrics.latent_norm.labels(version)
        self._depths = {graph: metrics.queue_depth_rows.labels(graph, version) for graph in GRAPHS}
        self._batches = {
            graph: (
                metrics.batch_rows.labels(graph, version),
                metrics.inference.labels(graph, version),
                metrics.queue_wait.labels(graph, version),
            )
            for graph in GRAPHS
        }

    def queue_depth(self, graph: str, rows: int) -> None:
        self._depths[graph].set(rows)

    def batch_ran(
        self,
        graph: str,
        rows: int,
        queue_wait_seconds: Sequence[float],
        inference_seconds: float,
        traced: Sequence[Traced | None] = (),
    ) -> None:
        batch_rows, inference, queue_wait = self._batches[graph]
        batch_rows.observe(rows)
        inference.observe(inference_seconds)
        if traced:  # tracing on: each request's wait, with its sampled trace as exemplar
            for seconds, request in zip(queue_wait_seconds, traced, strict=True):
                queue_wait.observe(seconds, None if request is None else exemplar(request.context))
            return
        for seconds in queue_wait_seconds:
            queue_wait.observe(seconds)

    def inputs_encoded(self, latent_norms: np.ndarray) -> None:
        observe_each(self._norms, latent_norms)

    def inputs_scored(self, plugin_negative_elbo: np.ndarray) -> None:
        observe_each(self._scores, plugin_negative_elbo)


def observe_each(histogram: Any, values: np.ndarray) -> None:
    """Every value of `values` into one labelled histogram (one observation per image)."""
    for value in values.tolist():
        histogram.observe(value)


class _DroppedSpans(Collector):
    """vae_trace_spans_dropped_total, read from tracing's count at each scrape."""

    def __init__(self, dropped: Callable[[], int]) -> None:
        self._dropped = dropped

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "vae_trace_spans_dropped", "spans dropped because the export queue was full", value=self._dropped()
        )
