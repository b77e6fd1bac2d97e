"""The server process: the model versions, VaeService and the Open Inference Protocol on the gRPC port, the
protocol's REST port, health, reflection, /metrics, signals.

    python -m serving.server --model-dir models/vae-mnist --port 50051 --http-port 8080 --metrics-port 9090

Every flag has an environment twin (`--help` lists them). Health reports SERVING for "" and
"vae.v1.VaeService" once a version is loaded and warmed up, and stays SERVING while versions come and go
(`serving.lifecycle.manager`: polled every `--poll-seconds`, and at once on SIGHUP). On SIGTERM or SIGINT
the server drains: health goes NOT_SERVING, new requests get UNAVAILABLE (REST: 503), requests in flight have
`--grace-seconds` to finish, then the process exits 0. With `--health-port`, a second, plaintext listener
serves the same health status and nothing else, for probes that cannot speak the gRPC port's TLS. Log lines
are JSON, one per event, on stderr.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from contract import settings
from contract.repository import ModelRepositoryError, ModelVersion
from contract.settings import SettingError
from serving.api import OIP_SERVICE_NAME, SERVICE_METHODS, SERVICE_NAME, oip_grpc, pb_grpc
from serving.dataplane.admission import Admission
from serving.dataplane.runtime import ProviderUnavailable
from serving.errors import StartupError
from serving.grpc.interceptors import RequestInterceptor
from serving.grpc.oip_servicer import InferenceServicer, reply_items
from serving.grpc.servicer import REPLY_ITEMS, VaeServicer
from serving.http.listener import HttpLimits, HttpListener, start_http
from serving.http.rest import RestApi
from serving.lifecycle.manager import ModelManager, VersionState
from serving.metrics import Metrics
from serving.oip.models import EXTENSIONS, SERVER_NAME, Catalogue
from serving.request_record import RequestRecord
from serving.server.config import ServerConfig, load_config
from serving.server.connections import ensure_file_descriptors, grpc_options, health_options
from serving.server.housekeeping import follow_saturation, release_memory_after_bursts
from serving.server.logs import setup_logging
from serving.server.metrics_port import serve_metrics_port
from serving.server.tls import server_credentials, ssl_context
from serving.tracing import OFF, Tracing

log = logging.getLogger("serving")

DRAIN_LINGER_SECONDS = 0.25  # after the last accepted call, before connections close
NEVER_SECONDS = 365 * 24 * 3600.0  # an idle REST connection's timeout when --max-connection-idle-seconds is 0
HEALTH_SERVICES = ("", SERVICE_NAME)
OIP_INFER_METHODS = ("ModelInfer", "ModelStreamInfer")  # the protocol's methods that do the model's work


def package_version() -> str:
    """This server's version (the package's), as ServerMetadata reports it."""
    try:
        return importlib.metadata.version("vae-service")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a tree never installed
        return "unknown"


async def is_serving(health: health_aio.HealthServicer) -> bool:
    """Whether readiness (VaeService's health status) is SERVING: what the protocol's ServerReady answers."""
    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    reply = await health.Check(request, None)  # a registered service: the context is not used
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class RunningServer:
    """A started server: its ports and parts, and `stop` for a graceful drain."""

    config: ServerConfig
    grpc_port: int
    metrics_port: int
    models: ModelManager
    interceptor: RequestInterceptor
    metrics: Metrics
    health: health_aio.HealthServicer
    server: grpc.aio.Server
    metrics_http: WSGIServer
    executor: ThreadPoolExecutor
    health_server: grpc.aio.Server | None = None  # the plaintext health-only listener (--health-port)
    health_port: int | None = None
    housekeeping: list[asyncio.Task[None]] = field(default_factory=list)  # serving.server.housekeeping's tasks
    http: HttpListener | None = None  # the REST port (--http-port)
    tracing: Tracing = OFF  # flushed when the server stops

    @property
    def http_port(self) -> int | None:
        return None if self.http is None else self.http.port

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new RPCs, let those in flight finish within the grace period, stop."""
        grace = self.config.process.grace_seconds if grace_seconds is None else grace_seconds
        started = time.perf_counter()
        log.info("server_draining", extra={"fields": {"grace_seconds": grace}})
        await self.health.enter_graceful_shutdown()
        for task in self.housekeeping:
            task.cancel()
        # Finish the accepted calls while their connections stay open, and give clients a moment to read the
        # last replies before gRPC closes the connections: a reply still unread by the client when its
        # connection is reset is lost (seen under load), although the server answered it.
        if await self.interceptor.admission.drain.close(grace):
            await asyncio.sleep(min(DRAIN_LINGER_SECONDS, grace))
        await self.server.stop(max(0.0, grace - (time.perf_counter() - started)))
        if self.http is not None:
            await self.http.close()
        if self.health_server is not None:  # answered NOT_SERVING throughout the drain; now it goes too
            await self.health_server.stop(None)
        await self.models.close()
        self.executor.shutdown(wait=True)
        self.metrics_http.shutdown()
        self.metrics_http.server_close()
        await asyncio.get_running_loop().run_in_executor(None, self.tracing.shutdown)  # the spans still queued
        log.info("server_stopped", extra={"fields": {"drain_seconds": round(time.perf_counter() - started, 3)}})


def largest_reply_bytes(latent_dim: int, image_shape: Sequence[int], items: int) -> int:
    """Bytes of the largest reply `items` images and latents make (float32), with room for the envelope."""
    return items * 4 * (math.prod(image_shape) + latent_dim) + 1024


def reply_fits(config: ServerConfig) -> Callable[[ModelVersion], None]:
    """A check every version must pass to be served: the largest reply `max_items_per_request` allows fits in
    `max_message_bytes` (at start-up a failure stops the server; later it keeps the version from serving)."""
    items, limit = config.limits.max_items_per_request, config.network.max_message_bytes

    def check(version: ModelVersion) -> None:
        largest = largest_reply_bytes(version.latent_dim, version.image_shape, items)
        if largest > limit:
            raise ModelRepositoryError(
                f"{version.path}: --max-message-bytes ({limit}) is smaller than the largest reply "
                f"--max-items-per-request ({items}) allows for latent_dim {version.latent_dim} ({largest} bytes)"
            )

    return check


async def build_grpc_server(
    config: ServerConfig, models: ModelManager, record: RequestRecord, catalogue: Catalogue, admission: Admission
) -> tuple[grpc.aio.Server, RequestInterceptor, health_aio.HealthServicer]:
    """VaeService and the protocol's GRPCInferenceService behind the request interceptor, health (NOT_SERVING
    until started) and reflection; `record`, `catalogue` and `admission` are the process's, shared with the REST
    port."""
    reply_counts = {**REPLY_ITEMS, "ModelInfer": reply_items}
    services = (SERVICE_NAME, OIP_SERVICE_NAME)
    interceptor = RequestInterceptor(
        services,
        record,
        reply_counts,
        admission,
        counted_by_message={"ModelStreamInfer"},
        routes_by_request_id=lambda: models.routes_by_request_id,
    )
    # No maximum_concurrent_rpcs: gRPC would count a call from its first byte, so calls that never send their
    # message could take every slot; the interceptor counts calls with their message (--max-concurrent-rpcs).
    server = grpc.aio.server(interceptors=[interceptor], options=grpc_options(config))
    pb_grpc.add_VaeServiceServicer_to_server(VaeServicer(models), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    inference = InferenceServicer(
        catalogue,
        admission,
        models.stream_slots,
        lambda: is_serving(health),
        package_version(),
        config.admission.max_stream_requests_in_flight,
        record,
    )
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)
    for service in HEALTH_SERVICES:
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection([SERVICE_NAME, OIP_SERVICE_NAME, health_name, reflection.SERVICE_NAME], server)
    return server, interceptor, health


async def start_health_listener(
    health: health_aio.HealthServicer, config: ServerConfig
) -> tuple[grpc.aio.Server, int] | tuple[None, None]:
    """The --health-port listener: plaintext, grpc.health.v1 only, sharing the main port's health status.

    The kubelet's gRPC probes speak neither TLS nor mutual TLS; this port lets them ask whatever the gRPC port
    requires, and reveals nothing but the serving status. It is a server of its own, with connections of its
    own (`serving.server.connections.health_options`), so a flood of connections to the gRPC port leaves it
    answering.
    """
    if config.network.health_port is None:
        return None, None
    server = grpc.aio.server(options=health_options(config))
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"{config.network.host}:{config.network.health_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen for health checks on {address}: {exc}") from None
    await server.start()
    return server, port


def listen(server: grpc.aio.Server, config: ServerConfig, credentials: grpc.ServerCredentials | None) -> int:
    """Bind the gRPC port (TLS with `credentials`, else plaintext); returns the port bound."""
    address = f"{config.network.host}:{config.network.port}"
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen for gRPC on {address}: {exc}") from None
    if credentials is None:
        reason = "no --tls-cert given: gRPC traffic is unencrypted and clients are not authenticated"
        log.warning("grpc_plaintext", extra={"fields": {"grpc_address": f"{address}", "reason": reason}})
    return port


async def start_rest(
    config: ServerConfig,
    catalogue: Catalogue,
    admission: Admission,
    record: RequestRecord,
    health: health_aio.HealthServicer,
) -> HttpListener | None:
    """The Open Inference Protocol's REST port (--http-port), on the same catalogue and admission as gRPC."""
    network = config.network
    if network.http_port is None:
        return None
    metadata = {"name": SERVER_NAME, "version": package_version(), "extensions": list(EXTENSIONS)}
    api = RestApi(
        catalogue,
        admission,
        record,
        lambda: is_serving(health),
        metadata,
        network.max_message_bytes,
    )
    limits = HttpLimits(
        max_connections=network.max_connections,
        handshake_timeout_s=network.handshake_timeout_seconds,
        idle_timeout_s=network.max_connection_idle_seconds or NEVER_SECONDS,
    )
    try:
        return await start_http(api, network.host, network.http_port, limits, ssl_context(config.tls))
    except OSError as exc:
        raise StartupError(f"cannot serve REST on {network.host}:{network.http_port}: {exc.strerror or exc}") from None


def serve_metrics(metrics: Metrics, config: ServerConfig) -> tuple[WSGIServer, int]:
    host, port = config.network.host, config.network.metrics_port
    try:
        return serve_metrics_port(metrics.registry, host, port, config.network.max_metrics_connections)
    except OSError as exc:
        raise StartupError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None


async def start_server(config: ServerConfig) -> RunningServer:
    """Load, verify and warm up the model, then serve it.

    Raises ModelRepositoryError, ProviderUnavailable or StartupError, each with a one-line message.
    """
    started = time.perf_counter()
    ensure_file_descriptors(config)
    credentials = server_credentials(config.tls)  # a bad TLS file fails before the model is loaded
    metrics = Metrics((*SERVICE_METHODS, *OIP_INFER_METHODS))
    tracing = Tracing.from_environment(package_version())
    if tracing.enabled:
        metrics.count_dropped_spans(lambda: tracing.dropped_spans)
    record = RequestRecord(metrics, config.process.log_requests, tracing)  # every request ends there
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="onnxruntime")  # one per graph
    models = ModelManager(
        config.repository,
        config.runtime,
        config.batching,
        config.limits,
        executor,
        metrics,
        reply_fits(config),
        config.telemetry,
        tracing,
        config.shadow,
    )
    await models.start()
    catalogue, admission = Catalogue(models), config.admission.build()  # both transports share them
    server, interceptor, health = await build_grpc_server(config, models, record, catalogue, admission)
    grpc_port = listen(server, config, credentials)
    http = await start_rest(config, catalogue, admission, record, health)
    metrics_http, metrics_port = serve_metrics(metrics, config)
    health_server, health_port = await start_health_listener(health, config)
    await server.start()
    for service in HEALTH_SERVICES:
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    loop = asyncio.get_running_loop()
    housekeeping = [
        loop.create_task(follow_saturation(health, interceptor.admission), name="readiness"),
        loop.create_task(release_memory_after_bursts(interceptor.admission), name="memory-release"),
    ]
    log.info(
        "server_started",
        extra={
            "fields": {
                "grpc_address": f"{config.network.host}:{grpc_port}",
                "metrics_address": f"{config.network.host}:{metrics_port}",
                "http_address": None if http is None else f"{config.network.host}:{http.port}",
                "health_address": None if health_port is None else f"{config.network.host}:{health_port}",
                "transport": config.tls.transport,
                "versions": [row.version for row in models.status() if row.state is VersionState.AVAILABLE],
                "startup_seconds": round(time.perf_counter() - started, 3),
                "config": settings.to_json(config),
            }
        },
    )
    return RunningServer(
        config,
        grpc_port,
        metrics_port,
        models,
        interceptor,
        metrics,
        health,
        server,
        metrics_http,
        executor,
        health_server,
        health_port,
        housekeeping,
        http,
        tracing,
    )


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop; SIGHUP looks at the model directory at once.

    The handlers are in place before start-up logs `server_started`, so a signal sent as soon as that line
    appears is never lost (or, for SIGHUP's default action, fatal); SIGTERM during start-up stops the server
    once it has started.
    """
    loop = asyncio.get_running_loop()
    stop, rescan = asyncio.Event(), asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, rescan.set)
    running = await start_server(config)
    refreshing = loop.create_task(_refresh_on_signal(rescan, running.models))
    await stop.wait()
    refreshing.cancel()
    await running.stop()


async def _refresh_on_signal(rescan: asyncio.Event, models: ModelManager) -> None:
    """One refresh per SIGHUP; signals arriving during a refresh are answered by one more."""
    while True:
        await rescan.wait()
        rescan.clear()
        try:
            await models.refresh("signal")
        except Exception:  # as for polling: the versions served stay as they are, the next signal tries again
            log.exception("model_refresh_failed")


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv, description=__doc__.split("\n\n")[0])
    except SettingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.process.log_level)
    try:
        asyncio.run(serve(config))
    except (ModelRepositoryError, ProviderUnavailable, StartupError) as exc:
        log.error("startup_failed", extra={"fields": {"error": str(exc)}})
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
