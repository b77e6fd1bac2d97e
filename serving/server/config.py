"""The server's configuration: `ServerConfig`, composed of each component's own settings.

    python -m serving.server --help        every setting: flag, VAE_* variable, default
    make docs                              regenerates docs/configuration.md from these definitions

Each setting is defined once, in the dataclass of the component that uses it (`RepositorySettings` in the model
manager, `AdmissionSettings` in the admission, `BatchSettings` in the batcher, `RuntimeSettings` in the runtime,
`LimitSettings` and `TelemetrySettings` in the engine, `ShadowSettings` in shadow scoring, the process's own
below), and the server hands each component its section as it is. A flag wins over its variable, the variable
over the default; a bad value stops the server with one line naming the flag or variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from contract import settings
from contract.settings import SettingError, check_settings, section, setting
from serving.dataplane.admission import AdmissionSettings
from serving.dataplane.batcher import BatchSettings
from serving.dataplane.engine import LimitSettings, TelemetrySettings
from serving.dataplane.runtime import RuntimeSettings
from serving.lifecycle.manager import RepositorySettings
from serving.lifecycle.shadow import ShadowSettings
from serving.server.metrics_port import DEFAULT_MAX_METRICS_CONNECTIONS, METRICS_TIMEOUT_SECONDS

ENV_PREFIX = "VAE_"


@dataclass(frozen=True)
class NetworkSettings:
    """Where the server listens, and what one connection or message may hold."""

    host: str = setting("0.0.0.0", "address to listen on (gRPC, REST and metrics)", metavar="ADDR")
    port: int = setting(
        50051, "gRPC port (0: any free port)", minimum=0, maximum=65535, env="VAE_GRPC_PORT", metavar="PORT"
    )
    metrics_port: int = setting(
        9090, "Prometheus /metrics HTTP port (0: any free port)", minimum=0, maximum=65535, metavar="PORT"
    )
    max_metrics_connections: int = setting(
        DEFAULT_MAX_METRICS_CONNECTIONS,
        f"connections the metrics port holds at once, at most: each has {METRICS_TIMEOUT_SECONDS:g} s to send its "
        "request and again to take its reply, and takes a thread only once its request is in; beyond it a new "
        "connection closes the one waiting longest for its request (or itself, when all are being answered)",
        minimum=1,
        metavar="N",
    )
    http_port: int | None = setting(
        8080,
        "the Open Inference Protocol's REST port (/v2), on --host, with the gRPC port's TLS; none: off (0: any free "
        "port)",
        minimum=0,
        maximum=65535,
        metavar="PORT",
    )
    health_port: int | None = setting(
        None,
        "plaintext port serving grpc.health.v1 only (no VaeService, no reflection), on --host: for probes that "
        "cannot speak the gRPC port's TLS, and not counted against --max-concurrent-rpcs (0: any free port)",
        minimum=0,
        maximum=65535,
        metavar="PORT",
        shown_default="none (health on the gRPC port only)",
    )
    max_message_bytes: int = setting(
        16 * 1024 * 1024,
        "message size limit, each way: gRPC messages (larger: RESOURCE_EXHAUSTED) and REST request bodies "
        "(larger: 413)",
        minimum=64 * 1024,
        metavar="BYTES",
        shown_default="16777216 (16 MiB)",
    )
    max_concurrent_streams: int = setting(
        100, "HTTP/2 streams (calls) open at once on one client connection, at most; more wait in the client", minimum=1
    )
    max_connections: int = setting(
        1000,
        "client connections the gRPC port holds at once, at most, and as many the REST port; beyond it new ones "
        "are closed at once. Keep it below the process's file descriptor limit (ulimit -n): start-up checks that "
        "it leaves room",
        minimum=1,
        metavar="N",
    )
    handshake_timeout_seconds: float = setting(
        5.0,
        "a new connection that has not completed its TLS and HTTP/2 handshake (the client's preface; REST: a whole "
        "request head) by then is closed",
        above=0,
        metavar="S",
    )
    max_connection_idle_seconds: float = setting(
        60.0,
        "close a client connection that has had no call for this long (gracefully); 0: never",
        minimum=0,
        metavar="S",
    )
    max_connection_age_seconds: float = setting(
        300.0,
        "close client connections after this long (gracefully), so clients re-resolve and spread over new pods; "
        "0: never",
        minimum=0,
        metavar="S",
    )
    max_connection_age_grace_seconds: float = setting(
        30.0,
        "after --max-connection-age-seconds, how long the calls already on the connection may take to finish "
        "before it is closed (a SampleStream cut then resumes at its offset)",
        minimum=0,
        metavar="S",
    )

    def __post_init__(self) -> None:
        check_settings(self)
        if self.health_port and self.health_port in (self.port, self.metrics_port):
            raise SettingError(
                "{health_port} ({health}) must differ from {port} and {metrics_port}", health=self.health_port
            )
        if self.http_port and self.http_port in (self.port, self.metrics_port, self.health_port):
            raise SettingError(
                "{http_port} ({http}) must differ from {port}, {metrics_port} and {health_port}", http=self.http_port
            )


@dataclass(frozen=True)
class TlsSettings:
    """TLS on the gRPC port (plaintext unless a certificate is given)."""

    tls_cert: Path | None = setting(
        None,
        "PEM certificate (chain) of the gRPC port; with --tls-key it turns TLS on",
        metavar="FILE",
        shown_default="none (plaintext)",
    )
    tls_key: Path | None = setting(None, "PEM private key of --tls-cert", metavar="FILE")
    tls_client_ca: Path | None = setting(
        None,
        "PEM CA certificate(s): clients must present a certificate it signed (mutual TLS)",
        metavar="FILE",
        shown_default="none (no client certificates)",
    )

    def __post_init__(self) -> None:
        check_settings(self)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingError("{tls_cert} and {tls_key} go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SettingError("{tls_client_ca} needs TLS: give {tls_cert} and {tls_key}")

    @property
    def transport(self) -> str:
        """How the gRPC port is secured: "plaintext", "tls" or "mutual-tls"."""
        if self.tls_cert is None:
            return "plaintext"
        return "tls" if self.tls_client_ca is None else "mutual-tls"


@dataclass(frozen=True)
class ProcessSettings:
    """Shutdown and logs."""

    grace_seconds: float = setting(
        10.0, "on SIGTERM/SIGINT, how long requests in flight may take to finish", minimum=0, metavar="S"
    )
    log_requests: bool = setting(False, "log one JSON line per request")
    log_level: Literal["debug", "info", "warning", "error"] = setting("info", "log level")

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server reads at start-up, one section per component."""

    repository: RepositorySettings = section(RepositorySettings, "model repository")
    network: NetworkSettings = section(NetworkSettings, "network")
    admission: AdmissionSettings = section(AdmissionSettings, "admission")
    tls: TlsSettings = section(TlsSettings, "TLS")
    runtime: RuntimeSettings = section(RuntimeSettings, "onnxruntime")
    batching: BatchSettings = section(BatchSettings, "batching")
    limits: LimitSettings = section(LimitSettings, "request limits")
    telemetry: TelemetrySettings = section(TelemetrySettings, "input telemetry")
    shadow: ShadowSettings = section(ShadowSettings, "shadow scoring")
    process: ProcessSettings = section(ProcessSettings, "shutdown and logs")

    def __post_init__(self) -> None:
        if self.batching.max_queue_rows < self.limits.max_items_per_request:
            raise SettingError(
                "{max_queue_rows} ({rows}) must be >= {max_items_per_request} ({items}), or the largest requests "
                "could never be queued",
                rows=self.batching.max_queue_rows,
                items=self.limits.max_items_per_request,
            )


def server_config(**values: object) -> ServerConfig:
    """A ServerConfig from flat setting names: `server_config(port=0, max_batch_size=8)`."""
    return settings.build(ServerConfig, values)


def build_parser(prog: str = "python -m serving.server", description: str = "") -> settings.argparse.ArgumentParser:
    """The server's command line, generated from ServerConfig."""
    return settings.build_parser(ServerConfig, ENV_PREFIX, prog=prog, description=description)


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None, description: str = ""
) -> ServerConfig:
    """ServerConfig from flags, then VAE_* variables, then defaults; raises SettingError naming the source."""
    flags = vars(build_parser(description=description).parse_args(argv))
    return settings.from_sources(ServerConfig, flags, os.environ if environ is None else environ, ENV_PREFIX)


def reference() -> str:
    """The configuration reference (docs/configuration.md), generated from the definitions."""
    return settings.reference_table(ServerConfig, ENV_PREFIX)
