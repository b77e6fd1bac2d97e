"""What the process's gRPC listeners accept: connections, handshakes, idle and old connections, message sizes,
and the file descriptors all that needs (the REST port's own bounds are `serving.http.listener`'s).

Every connection is a file descriptor. Connections beyond `--max-connections` are closed as soon as they are
accepted, those that do not finish their handshake (for plaintext, the client's HTTP/2 preface) within
`--handshake-timeout-seconds` are closed, and idle ones go after `--max-connection-idle-seconds`: so a client
that opens thousands of connections and sends nothing cannot take the descriptors the model poller, the health
port and the metrics port need. The REST port holds at most as many connections again. Start-up checks that the
descriptor limit leaves room for all of it.
"""

from __future__ import annotations

import logging
import resource
from typing import Any

from serving.errors import StartupError
from serving.server.config import ServerConfig

log = logging.getLogger(__name__)

# The health-only listener answers probes: a few connections are plenty, and it must not be the way in.
HEALTH_MAX_CONNECTIONS = 16
# Descriptors the process needs besides the gRPC port's connections: the health listener's, the metrics
# port's (each connection and its thread), the model files and the poller, onnxruntime, logs, the listeners.
RESERVED_DESCRIPTORS = 256


def _milliseconds(seconds: float) -> int:
    return int(seconds * 1000)


def grpc_options(config: ServerConfig) -> list[tuple[str, Any]]:
    """Channel options of the gRPC port: message size limits (gRPC answers RESOURCE_EXHAUSTED beyond), the
    connection bounds of the module docstring, and a maximum connection age after which clients reconnect
    (and client-side balancers see new pods)."""
    network = config.network
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", network.max_message_bytes),
        ("grpc.max_send_message_length", network.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
        ("grpc.max_concurrent_streams", network.max_concurrent_streams),  # per connection: one client's share
        ("grpc.max_allowed_incoming_connections", network.max_connections),
        ("grpc.server_handshake_timeout_ms", _milliseconds(network.handshake_timeout_seconds)),
    ]
    if network.max_connection_idle_seconds > 0:
        options.append(("grpc.max_connection_idle_ms", _milliseconds(network.max_connection_idle_seconds)))
    if network.max_connection_age_seconds > 0:  # 0: connections live as long as the client keeps them
        options += [
            ("grpc.max_connection_age_ms", _milliseconds(network.max_connection_age_seconds)),
            ("grpc.max_connection_age_grace_ms", _milliseconds(network.max_connection_age_grace_seconds)),
        ]
    return options


def health_options(config: ServerConfig) -> list[tuple[str, Any]]:
    """Channel options of the --health-port listener: a handful of probe connections, quick handshakes."""
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_allowed_incoming_connections", HEALTH_MAX_CONNECTIONS),
        ("grpc.server_handshake_timeout_ms", _milliseconds(config.network.handshake_timeout_seconds)),
        ("grpc.max_receive_message_length", 4096),  # a HealthCheckRequest names a service
    ]


def _client_ports(config: ServerConfig) -> int:
    """The ports that each hold --max-connections client connections: gRPC, and REST when it is on."""
    return 1 if config.network.http_port is None else 2


def descriptors_needed(config: ServerConfig) -> int:
    """File descriptors the process may need at once with these settings."""
    return _client_ports(config) * config.network.max_connections + HEALTH_MAX_CONNECTIONS + RESERVED_DESCRIPTORS


def ensure_file_descriptors(config: ServerConfig) -> None:
    """Raise the soft descriptor limit to what the settings need (up to the hard limit), or refuse to start.

    Without it, --max-connections above the limit would let connections take every descriptor (the model
    poller then fails with EMFILE, and the health and metrics ports stop answering).
    """
    needed = descriptors_needed(config)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        fits = max(1, (hard - HEALTH_MAX_CONNECTIONS - RESERVED_DESCRIPTORS) // _client_ports(config))
        raise StartupError(
            f"--max-connections ({config.network.max_connections}) needs {needed} file descriptors with what the "
            f"process opens besides, and its limit is {hard} (ulimit -Hn): lower --max-connections to at most "
            f"{fits} or raise the limit"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    log.info("file_descriptor_limit_raised", extra={"fields": {"from": soft, "to": needed, "hard": hard}})
