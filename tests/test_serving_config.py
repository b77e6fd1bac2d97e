"""Server configuration: flags, their environment twins, and one-line errors for bad values."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from serving.config import ConfigError, ServerConfig, build_parser, load_config


def load(argv: list[str], environ: dict[str, str]) -> ServerConfig:
    return load_config(build_parser("test", "test").parse_args(argv), environ)


def test_defaults_without_flags_or_environment() -> None:
    assert load([], {}) == ServerConfig()


def test_every_field_has_an_env_twin_and_flags_win_over_it() -> None:
    environ = {"VAE_MODEL_DIR": "/m", "VAE_GRPC_PORT": "6000", "VAE_MAX_DELAY_MS": "0.5", "VAE_LOG_REQUESTS": "yes"}
    config = load(["--port", "7000"], environ)
    assert (config.model_dir, config.port, config.max_delay_ms, config.log_requests) == (Path("/m"), 7000, 0.5, True)
    envs = [field.metadata["env"] for field in dataclasses.fields(ServerConfig)]
    assert all(env.startswith("VAE_") for env in envs) and len(set(envs)) == len(envs)
    for required in ("VAE_MODEL_DIR", "VAE_GRPC_PORT", "VAE_METRICS_PORT", "VAE_MAX_BATCH_SIZE", "VAE_MAX_DELAY_MS"):
        assert required in envs
    for other in ("VAE_PROVIDER", "VAE_HOST", "VAE_MODEL_VERSION", "VAE_INTRA_OP_THREADS", "VAE_MAX_QUEUE_ROWS"):
        assert other in envs
    for other in ("VAE_MAX_ITEMS_PER_REQUEST", "VAE_GRACE_SECONDS", "VAE_LOG_REQUESTS"):
        assert other in envs


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        ([], {"VAE_MAX_BATCH_SIZE": "many"}, "VAE_MAX_BATCH_SIZE='many' is not an integer"),
        (["--max-delay-ms", "soon"], {}, "--max-delay-ms='soon' is not a number"),
        ([], {"VAE_INLINE_MAX_MS": "-1"}, "--inline-max-ms (VAE_INLINE_MAX_MS) must be a finite number >= 0, got -1"),
        ([], {"VAE_LOG_REQUESTS": "maybe"}, "VAE_LOG_REQUESTS='maybe' is not true or false"),
        ([], {"VAE_PROVIDER": "tpu"}, "--provider (VAE_PROVIDER) must be one of auto, cuda, cpu, got 'tpu'"),
        (["--max-batch-size", "0"], {}, "--max-batch-size (VAE_MAX_BATCH_SIZE) must be >= 1, got 0"),
        ([], {"VAE_GRPC_PORT": "70000"}, "--port (VAE_GRPC_PORT) must be a port number (0..65535), got 70000"),
        ([], {"VAE_MAX_QUEUE_ROWS": "10"}, "--max-queue-rows (VAE_MAX_QUEUE_ROWS) (10) must be >= max_batch_size"),
        ([], {"VAE_MODEL_VERSION": "0"}, "--model-version (VAE_MODEL_VERSION) must be a positive integer, got 0"),
    ],
)
def test_bad_values_are_refused_naming_the_flag_or_variable(
    argv: list[str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load(argv, environ)
    assert str(raised.value).startswith(message)


def test_help_documents_every_flag_with_its_variable_and_default() -> None:
    text = " ".join(build_parser("python -m serving.server", "").format_help().split())
    for field in dataclasses.fields(ServerConfig):
        assert field.metadata["env"] in text
    assert "--model-dir DIR" in text and "--port PORT" in text and "--metrics-port PORT" in text


def test_server_exits_2_with_one_line_for_a_bad_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "serving.server"],
        env={"VAE_MAX_BATCH_SIZE": "lots", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == "error: VAE_MAX_BATCH_SIZE='lots' is not an integer\n"


def test_connection_age_becomes_grpc_server_options() -> None:
    from serving.server import grpc_options

    options = dict(grpc_options(load(["--max-connection-age-seconds", "1.5"], {})))
    assert options["grpc.max_connection_age_ms"] == 1500 and options["grpc.max_connection_age_grace_ms"] == 1500
    assert "grpc.max_connection_age_ms" not in dict(grpc_options(load([], {"VAE_MAX_CONNECTION_AGE_SECONDS": "0"})))
    with pytest.raises(ConfigError, match="max-connection-age-seconds"):
        load(["--max-connection-age-seconds", "-1"], {})
