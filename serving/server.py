"""The gRPC server process: model load and warm-up, VaeService, health, reflection, /metrics, signals.

    python -m serving.server --model-dir models/vae-mnist --port 50051 --metrics-port 9090

Every flag has an environment twin (`--help` lists them). Health reports SERVING for "" and
"vae.v1.VaeService" only once the graphs are loaded and warmed up. On SIGTERM or SIGINT the server drains:
health goes NOT_SERVING, new requests get UNAVAILABLE, requests in flight have `--grace-seconds` to finish,
then the process exits 0. Log lines are JSON, one per event, on stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from serving.api import SERVICE_NAME, pb_grpc
from serving.batcher import BatchPolicy
from serving.config import ConfigError, ServerConfig, build_parser, load_config
from serving.metrics import METHODS, Metrics
from serving.model import RequestLimits, VaeModel
from serving.repository import ModelRepositoryError, load_version
from serving.runtime import ProviderUnavailable, RuntimeOptions, load_runtime
from serving.service import VaeServicer
from serving.wire import add_servicer

log = logging.getLogger("serving")


class StartupError(RuntimeError):
    """The server cannot start (a port is taken, ...); the message says which and why."""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, and the record's `fields` extra."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


DRAIN_LINGER_SECONDS = 0.25  # after the last accepted call, before connections close


@dataclass
class RunningServer:
    """A started server: its ports and parts, and `stop` for a graceful drain."""

    config: ServerConfig
    grpc_port: int
    metrics_port: int
    model: VaeModel
    servicer: VaeServicer
    metrics: Metrics
    health: health_aio.HealthServicer
    server: grpc.aio.Server
    metrics_http: WSGIServer
    executor: ThreadPoolExecutor

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new RPCs, let those in flight finish within the grace period, stop."""
        grace = self.config.grace_seconds if grace_seconds is None else grace_seconds
        started = time.perf_counter()
        log.info("server_draining", extra={"fields": {"grace_seconds": grace}})
        self.servicer.accepting = False
        await self.health.enter_graceful_shutdown()
        # Finish the accepted calls while their connections stay open, and give clients a moment to read the
        # last replies before gRPC closes the connections: a reply still unread by the client when its
        # connection is reset is lost (seen under load), although the server answered it.
        if await self.servicer.wait_idle(grace):
            await asyncio.sleep(min(DRAIN_LINGER_SECONDS, grace))
        await self.server.stop(max(0.0, grace - (time.perf_counter() - started)))
        await self.model.close()
        self.executor.shutdown(wait=True)
        self.metrics_http.shutdown()
        self.metrics_http.server_close()
        log.info("server_stopped", extra={"fields": {"drain_seconds": round(time.perf_counter() - started, 3)}})


def grpc_options(config: ServerConfig) -> list[tuple[str, Any]]:
    """Channel options of the server: explicit message size limits (gRPC answers RESOURCE_EXHAUSTED beyond),
    and a maximum connection age, after which clients reconnect (and client-side balancers see new pods)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),  # per connection: one client's share
    ]
    if config.max_connection_age_seconds > 0:  # 0: connections live as long as the client keeps them
        age_ms = int(config.max_connection_age_seconds * 1000)
        options += [("grpc.max_connection_age_ms", age_ms), ("grpc.max_connection_age_grace_ms", age_ms)]
    return options


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port from --tls-cert/--tls-key (+ --tls-client-ca: mutual TLS), or None.

    The files are checked with Python's `ssl` first (readable PEM, the key matching the certificate), so a
    bad file stops start-up with a message naming it instead of failing every handshake later.
    """
    if config.tls_cert is None or config.tls_key is None:
        return None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(
            f"cannot use --tls-cert {config.tls_cert} with --tls-key {config.tls_key}: {exc.strerror or exc}"
        ) from None
    client_ca: bytes | None = None
    if config.tls_client_ca is not None:
        try:
            ssl.create_default_context(cafile=str(config.tls_client_ca))
            client_ca = config.tls_client_ca.read_bytes()
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"cannot use --tls-client-ca {config.tls_client_ca}: {exc.strerror or exc}") from None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


async def start_server(config: ServerConfig) -> RunningServer:
    """Load, verify and warm up the model, then serve it.

    Raises ModelRepositoryError, ProviderUnavailable or StartupError, each with a one-line message.
    """
    started = time.perf_counter()
    credentials = server_credentials(config)
    version = load_version(config.model_dir, config.model_version)
    runtime = load_runtime(version, RuntimeOptions(config.provider, config.intra_op_threads, config.graph_optimization))
    runtime.warm_up(sorted({1, config.max_batch_size}))
    log.info(
        "model_loaded",
        extra={
            "fields": {
                "name": version.name,
                "version": version.version,
                "path": str(version.path),
                "latent_dim": version.latent_dim,
                "provider": runtime.provider,
                "encoder_sha256": version.encoder.sha256,
                "decoder_sha256": version.decoder.sha256,
                "load_seconds": round(time.perf_counter() - started, 3),
            }
        },
    )
    image_bytes = 4 * math.prod(version.image_shape)
    largest_reply = config.max_items_per_request * (image_bytes + 4 * version.latent_dim) + 1024
    if largest_reply > config.max_message_bytes:
        raise StartupError(
            f"--max-message-bytes ({config.max_message_bytes}) is smaller than the largest reply "
            f"--max-items-per-request ({config.max_items_per_request}) allows ({largest_reply} bytes)"
        )

    metrics = Metrics()
    metrics.set_model(version.name, version.version, runtime.provider)
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="onnxruntime")  # one per graph
    policy = BatchPolicy(
        config.max_batch_size, config.max_delay_ms, config.max_queue_rows, config.batch_wait, config.inline_max_ms
    )
    limits = RequestLimits(config.max_items_per_request, config.max_interpolation_steps, config.max_stream_samples)
    model = VaeModel(runtime, policy, limits, executor, metrics)

    server = grpc.aio.server(options=grpc_options(config), maximum_concurrent_rpcs=config.max_concurrent_rpcs)
    servicer = VaeServicer(model, metrics, config.log_requests, config.max_sample_streams)

    def malformed(method: str) -> None:
        if method in METHODS:
            metrics.request_finished(method, grpc.StatusCode.INVALID_ARGUMENT.name, 0.0, None)

    add_servicer(pb_grpc.add_VaeServiceServicer_to_server, servicer, server, malformed)
    health = health_aio.HealthServicer()
    add_servicer(health_pb2_grpc.add_HealthServicer_to_server, health, server, malformed)
    for service in ("", SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    address = f"{config.host}:{config.port}"
    try:
        if credentials is None:
            grpc_port = server.add_insecure_port(address)
        else:
            grpc_port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen for gRPC on {address}: {exc}") from None
    try:
        metrics_http, metrics_port = metrics.serve(config.host, config.metrics_port)
    except OSError as exc:
        raise StartupError(
            f"cannot serve metrics on {config.host}:{config.metrics_port}: {exc.strerror or exc}"
        ) from None
    model.start()
    await server.start()
    for service in ("", SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    if credentials is None:
        reason = "no --tls-cert given: gRPC traffic is unencrypted and clients are not authenticated"
        fields = {"grpc_address": f"{config.host}:{grpc_port}", "reason": reason}
        log.warning("grpc_plaintext", extra={"fields": fields})
    log.info(
        "server_started",
        extra={
            "fields": {
                "grpc_address": f"{config.host}:{grpc_port}",
                "metrics_address": f"{config.host}:{metrics_port}",
                "transport": config.transport,
                "provider": runtime.provider,
                "startup_seconds": round(time.perf_counter() - started, 3),
                "config": config.to_json(),
            }
        },
    )
    return RunningServer(
        config, grpc_port, metrics_port, model, servicer, metrics, health, server, metrics_http, executor
    )


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop."""
    running = await start_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await running.stop()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("python -m serving.server", __doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    try:
        config = load_config(args, os.environ)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    try:
        asyncio.run(serve(config))
    except (ModelRepositoryError, ProviderUnavailable, StartupError) as exc:
        log.error("startup_failed", extra={"fields": {"error": str(exc)}})
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
