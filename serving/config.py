"""The server's configuration: one frozen dataclass, every field a flag with an environment-variable twin.

A flag wins over its variable, the variable over the default. Everything is validated at start-up: a bad
value stops the server with one line naming the flag or variable, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROVIDERS = ("auto", "cuda", "cpu")
GRAPH_OPTIMIZATIONS = ("all", "extended", "basic", "disable")
LOG_LEVELS = ("debug", "info", "warning", "error")
BATCH_WAITS = ("adaptive", "fixed")  # serving.batcher.WAIT_MODES (a test checks they agree)


class ConfigError(ValueError):
    """A configuration value is malformed or out of range; the message names the flag or variable."""


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true/false, 1/0, yes/no or on/off")


def _parse_optional_int(text: str) -> int | None:
    return None if text.strip().lower() in ("", "latest", "newest") else int(text)


def _parse_optional_path(text: str) -> Path | None:
    return None if not text.strip() else Path(text)


def _option(
    env: str,
    help: str,
    parse: Callable[[str], Any] = str,
    flag: str = "",
    metavar: str = "",
    choices: Sequence[str] = (),
    shown_default: str = "",
) -> dict[str, Any]:
    """A field's CLI and environment metadata: its variable, help line, parser, flag name and choices."""
    return {
        "env": env, "help": help, "parse": parse, "flag": flag, "metavar": metavar, "choices": tuple(choices),
        "shown_default": shown_default,
    }  # fmt: skip


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server reads at start-up (see `python -m serving.server --help`)."""

    model_dir: Path = field(
        default=Path("models/vae-mnist"),
        metadata=_option("VAE_MODEL_DIR", "model directory holding integer versions", Path, metavar="DIR"),
    )
    model_version: int | None = field(
        default=None,
        metadata=_option(
            "VAE_MODEL_VERSION", "version to serve (default: the newest)", _parse_optional_int, metavar="N"
        ),
    )
    host: str = field(
        default="0.0.0.0", metadata=_option("VAE_HOST", "address to listen on (gRPC and metrics)", metavar="ADDR")
    )
    port: int = field(
        default=50051,
        metadata=_option("VAE_GRPC_PORT", "gRPC port (0: any free port)", int, flag="--port", metavar="PORT"),
    )
    metrics_port: int = field(
        default=9090,
        metadata=_option("VAE_METRICS_PORT", "Prometheus /metrics HTTP port (0: any free port)", int, metavar="PORT"),
    )
    provider: str = field(
        default="auto",
        metadata=_option(
            "VAE_PROVIDER",
            "onnxruntime execution provider: auto (CUDA if usable, else CPU), cuda, cpu",
            choices=PROVIDERS,
        ),
    )
    intra_op_threads: int = field(
        default=0,
        metadata=_option(
            "VAE_INTRA_OP_THREADS",
            "onnxruntime threads per graph run (0: onnxruntime's default, one per core)",
            int,
            metavar="N",
        ),
    )
    graph_optimization: str = field(
        default="all",
        metadata=_option("VAE_GRAPH_OPTIMIZATION", "onnxruntime graph optimization level", choices=GRAPH_OPTIMIZATIONS),
    )
    max_batch_size: int = field(
        default=64,
        metadata=_option(
            "VAE_MAX_BATCH_SIZE",
            "rows per onnxruntime run, at most; larger requests run in chunks",
            int,
            metavar="ROWS",
        ),
    )
    max_delay_ms: float = field(
        default=2.0,
        metadata=_option(
            "VAE_MAX_DELAY_MS", "how long a request may wait for others to share its batch", float, metavar="MS"
        ),
    )
    batch_wait: str = field(
        default="adaptive",
        metadata=_option(
            "VAE_BATCH_WAIT",
            "when a batch waits up to --max-delay-ms for more rows: adaptive (only when recent traffic makes "
            "more likely; a lone request runs at once), fixed (always, unless the batch is full)",
            choices=BATCH_WAITS,
        ),
    )
    inline_max_ms: float = field(
        default=0.25,
        metadata=_option(
            "VAE_INLINE_MAX_MS",
            "batches whose recent runs took at most this long run on the event-loop thread instead of being "
            "handed to the onnxruntime thread and back (about 0.1 ms saved per small batch); 0: never",
            float,
            metavar="MS",
        ),
    )
    max_queue_rows: int = field(
        default=4096,
        metadata=_option(
            "VAE_MAX_QUEUE_ROWS", "rows waiting per graph, at most; beyond it RESOURCE_EXHAUSTED", int, metavar="ROWS"
        ),
    )
    max_items_per_request: int = field(
        default=1024,
        metadata=_option(
            "VAE_MAX_ITEMS_PER_REQUEST",
            "images or latents per request (Interpolate: pairs x steps), at most",
            int,
            metavar="N",
        ),
    )
    max_interpolation_steps: int = field(
        default=1024, metadata=_option("VAE_MAX_INTERPOLATION_STEPS", "Interpolate steps, at most", int, metavar="N")
    )
    max_stream_samples: int = field(
        default=1000000,
        metadata=_option("VAE_MAX_STREAM_SAMPLES", "SampleStream num_samples, at most", int, metavar="N"),
    )
    max_message_bytes: int = field(
        default=16 * 1024 * 1024,
        metadata=_option("VAE_MAX_MESSAGE_BYTES", "gRPC message size limit, each way", int, metavar="BYTES"),
    )
    max_concurrent_rpcs: int = field(
        default=1000,
        metadata=_option(
            "VAE_MAX_CONCURRENT_RPCS",
            "RPCs handled at once over all connections, at most; beyond it RESOURCE_EXHAUSTED",
            int,
            metavar="N",
        ),
    )
    max_concurrent_streams: int = field(
        default=100,
        metadata=_option(
            "VAE_MAX_CONCURRENT_STREAMS",
            "HTTP/2 streams (calls) open at once on one client connection, at most; more wait in the client",
            int,
            metavar="N",
        ),
    )
    max_sample_streams: int = field(
        default=64,
        metadata=_option(
            "VAE_MAX_SAMPLE_STREAMS",
            "SampleStream calls running at once, at most; beyond it RESOURCE_EXHAUSTED",
            int,
            metavar="N",
        ),
    )
    tls_cert: Path | None = field(
        default=None,
        metadata=_option(
            "VAE_TLS_CERT",
            "PEM certificate (chain) of the gRPC port; with --tls-key it turns TLS on (none: plaintext)",
            _parse_optional_path,
            metavar="FILE",
            shown_default="none (plaintext)",
        ),
    )
    tls_key: Path | None = field(
        default=None,
        metadata=_option(
            "VAE_TLS_KEY", "PEM private key of --tls-cert", _parse_optional_path, metavar="FILE", shown_default="none"
        ),
    )
    tls_client_ca: Path | None = field(
        default=None,
        metadata=_option(
            "VAE_TLS_CLIENT_CA",
            "PEM CA certificate(s): clients must present a certificate it signed (mutual TLS)",
            _parse_optional_path,
            metavar="FILE",
            shown_default="none (no client certificates)",
        ),
    )
    grace_seconds: float = field(
        default=10.0,
        metadata=_option(
            "VAE_GRACE_SECONDS", "on SIGTERM/SIGINT, how long requests in flight may take to finish", float, metavar="S"
        ),
    )
    max_connection_age_seconds: float = field(
        default=300.0,
        metadata=_option(
            "VAE_MAX_CONNECTION_AGE_SECONDS",
            "close client connections after this long (gracefully), so clients re-resolve and spread over new pods",
            float,
            metavar="S",
        ),
    )
    log_requests: bool = field(
        default=False, metadata=_option("VAE_LOG_REQUESTS", "log one JSON line per request", _parse_bool)
    )
    log_level: str = field(default="info", metadata=_option("VAE_LOG_LEVEL", "log level", choices=LOG_LEVELS))

    def __post_init__(self) -> None:
        at_least = {
            "port": 0, "metrics_port": 0, "intra_op_threads": 0, "max_batch_size": 1, "max_items_per_request": 1,
            "max_interpolation_steps": 2, "max_stream_samples": 1, "max_message_bytes": 64 * 1024,
            "max_concurrent_rpcs": 1, "max_concurrent_streams": 1, "max_sample_streams": 1,
        }  # fmt: skip
        for name, minimum in at_least.items():
            if getattr(self, name) < minimum:
                raise ConfigError(f"{_source(name)} must be >= {minimum}, got {getattr(self, name)}")
        for name in ("port", "metrics_port"):
            if getattr(self, name) > 65535:
                raise ConfigError(f"{_source(name)} must be a port number (0..65535), got {getattr(self, name)}")
        for name in ("max_delay_ms", "inline_max_ms", "grace_seconds", "max_connection_age_seconds"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ConfigError(f"{_source(name)} must be a finite number >= 0, got {getattr(self, name)}")
        if self.model_version is not None and self.model_version < 1:
            raise ConfigError(f"{_source('model_version')} must be a positive integer, got {self.model_version}")
        if self.max_queue_rows < max(self.max_batch_size, self.max_items_per_request):
            raise ConfigError(
                f"{_source('max_queue_rows')} ({self.max_queue_rows}) must be >= max_batch_size "
                f"({self.max_batch_size}) and >= max_items_per_request ({self.max_items_per_request}), "
                "or some requests could never be queued"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(f"{_source('tls_cert')} and {_source('tls_key')} go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError(f"{_source('tls_client_ca')} needs TLS: give {_flag('tls_cert')} and {_flag('tls_key')}")
        for name in ("provider", "graph_optimization", "batch_wait", "log_level"):
            allowed = _meta(name)["choices"]
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{_source(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    @property
    def transport(self) -> str:
        """How the gRPC port is secured: "plaintext", "tls" or "mutual-tls"."""
        if self.tls_cert is None:
            return "plaintext"
        return "tls" if self.tls_client_ca is None else "mutual-tls"

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def _meta(name: str) -> Mapping[str, Any]:
    return ServerConfig.__dataclass_fields__[name].metadata


def _flag(name: str) -> str:
    return _meta(name)["flag"] or "--" + name.replace("_", "-")


def _source(name: str) -> str:
    return f"{_flag(name)} ({_meta(name)['env']})"


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The CLI, generated from ServerConfig's fields (flags default to None: unset means env, then default)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for item in dataclasses.fields(ServerConfig):
        meta = item.metadata
        default = meta["shown_default"] or ("newest" if item.default is None else item.default)
        text = f"{meta['help']} [env {meta['env']}, default {default}]"
        if meta["parse"] is _parse_bool:
            parser.add_argument(
                _flag(item.name), dest=item.name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            metavar = meta["metavar"] or None
            choices = meta["choices"] or None
            parser.add_argument(
                _flag(item.name), dest=item.name, default=None, metavar=metavar, choices=choices, help=text
            )
    return parser


def load_config(args: argparse.Namespace, environ: Mapping[str, str]) -> ServerConfig:
    """ServerConfig from parsed flags, then environment variables, then defaults; raises ConfigError."""
    values: dict[str, Any] = {}
    for item in dataclasses.fields(ServerConfig):
        meta = item.metadata
        raw = getattr(args, item.name, None)
        where = _flag(item.name)
        if raw is None and meta["env"] in environ:
            raw, where = environ[meta["env"]], meta["env"]
        if raw is None:
            continue
        if isinstance(raw, bool):
            values[item.name] = raw
            continue
        try:
            values[item.name] = meta["parse"](raw)
        except ValueError:
            kind = {int: "an integer", float: "a number", _parse_bool: "true or false"}.get(meta["parse"], "valid")
            raise ConfigError(f"{where}={raw!r} is not {kind}") from None
    return ServerConfig(**values)
