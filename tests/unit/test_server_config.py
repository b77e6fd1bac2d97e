"""Server configuration: flags, their environment twins, and one-line errors for bad values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from contract import settings
from contract.settings import SettingError
from serving.server.config import ENV_PREFIX, ServerConfig, build_parser, load_config


def test_defaults_without_flags_or_environment() -> None:
    assert load_config([], {}) == ServerConfig()


def test_every_setting_has_an_env_twin_and_flags_win_over_it() -> None:
    environ = {"VAE_MODEL_DIR": "/m", "VAE_GRPC_PORT": "6000", "VAE_MAX_DELAY_MS": "0.5", "VAE_LOG_REQUESTS": "yes"}
    config = load_config(["--port", "7000"], environ)
    assert config.repository.model_dir == Path("/m") and config.network.port == 7000
    assert config.batching.max_delay_ms == 0.5 and config.process.log_requests is True
    envs = [spec.env(ENV_PREFIX) for spec in settings.specs(ServerConfig)]
    assert all(env.startswith("VAE_") for env in envs) and len(set(envs)) == len(envs)
    # the names the ConfigMap and the docs use
    for required in ("VAE_MODEL_DIR", "VAE_GRPC_PORT", "VAE_METRICS_PORT", "VAE_MAX_BATCH_SIZE", "VAE_MAX_DELAY_MS"):
        assert required in envs


def test_each_component_gets_its_own_section_as_defined() -> None:
    config = load_config(["--max-batch-size", "8", "--provider", "cpu", "--max-sample-streams", "3"], {})
    assert config.batching.max_batch_size == 8 and config.runtime.provider == "cpu"
    assert config.limits.max_sample_streams == 3
    assert settings.replace(config, max_batch_size=16).batching.max_batch_size == 16


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        ([], {"VAE_MAX_BATCH_SIZE": "many"}, "VAE_MAX_BATCH_SIZE='many' is not an integer"),
        (["--max-delay-ms", "soon"], {}, "--max-delay-ms='soon' is not a number"),
        ([], {"VAE_INLINE_MAX_MS": "-1"}, "--inline-max-ms (VAE_INLINE_MAX_MS) must be >= 0, got -1.0"),
        ([], {"VAE_GRACE_SECONDS": "inf"}, "--grace-seconds (VAE_GRACE_SECONDS) must be a finite number, got inf"),
        ([], {"VAE_LOG_REQUESTS": "maybe"}, "VAE_LOG_REQUESTS='maybe' is not true or false"),
        ([], {"VAE_PROVIDER": "tpu"}, "--provider (VAE_PROVIDER) must be one of auto, cuda, cpu, got 'tpu'"),
        (["--max-batch-size", "0"], {}, "--max-batch-size (VAE_MAX_BATCH_SIZE) must be >= 1, got 0"),
        ([], {"VAE_GRPC_PORT": "70000"}, "--port (VAE_GRPC_PORT) must be <= 65535, got 70000"),
        ([], {"VAE_MAX_QUEUE_ROWS": "10"}, "--max-queue-rows (VAE_MAX_QUEUE_ROWS) (10) must be >= --max-batch-size"),
        (
            ["--max-queue-rows", "100"],
            {},
            "--max-queue-rows (VAE_MAX_QUEUE_ROWS) (100) must be >= --max-items-per-request",
        ),
        (
            [],
            {"VAE_VERSION_POLICY": "newest"},
            "--version-policy (VAE_VERSION_POLICY): 'newest' is not a version policy",
        ),
        (["--version-policy", "latest:0"], {}, "--version-policy (VAE_VERSION_POLICY): 'latest:0' is not a version"),
        (
            ["--default-version", "Stable!"],
            {},
            "--default-version (VAE_DEFAULT_VERSION): label 'Stable!' is not allowed",
        ),
        ([], {"VAE_POLL_SECONDS": "-1"}, "--poll-seconds (VAE_POLL_SECONDS) must be >= 0, got -1.0"),
        (
            ["--health-port", "9090"],
            {},
            "--health-port (VAE_HEALTH_PORT) (9090) must differ from --port (VAE_GRPC_PORT) and --metrics-port",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_flag_or_variable(
    argv: list[str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingError) as raised:
        load_config(argv, environ)
    assert str(raised.value).startswith(message)


def test_an_empty_variable_leaves_an_optional_setting_unset() -> None:
    assert load_config([], {"VAE_TLS_CERT": "", "VAE_TLS_KEY": ""}) == ServerConfig()
    assert load_config([], {"VAE_TLS_CERT": "a.crt", "VAE_TLS_KEY": "a.key"}).tls.transport == "tls"


def test_help_documents_every_flag_with_its_variable_and_default() -> None:
    text = " ".join(build_parser().format_help().split())
    for spec in settings.specs(ServerConfig):
        assert f"{spec.flag} " in text and spec.env(ENV_PREFIX) in text
    assert "--model-dir DIR" in text and "[env VAE_MODEL_DIR, default models/vae-" in text and "default 50051" in text


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


def test_connection_bounds_become_grpc_server_options() -> None:
    from serving.server.connections import grpc_options

    flags = ["--max-connection-age-seconds", "1.5", "--max-connection-age-grace-seconds", "0.5"]
    flags += ["--max-connections", "40", "--handshake-timeout-seconds", "2", "--max-connection-idle-seconds", "9"]
    options = dict(grpc_options(load_config(flags, {})))
    assert options["grpc.max_connection_age_ms"] == 1500 and options["grpc.max_connection_age_grace_ms"] == 500
    assert options["grpc.max_allowed_incoming_connections"] == 40
    assert options["grpc.server_handshake_timeout_ms"] == 2000 and options["grpc.max_connection_idle_ms"] == 9000
    never = dict(
        grpc_options(load_config([], {"VAE_MAX_CONNECTION_AGE_SECONDS": "0", "VAE_MAX_CONNECTION_IDLE_SECONDS": "0"}))
    )
    assert "grpc.max_connection_age_ms" not in never and "grpc.max_connection_idle_ms" not in never
    with pytest.raises(SettingError, match="max-connection-age-seconds"):
        load_config(["--max-connection-age-seconds", "-1"], {})
    with pytest.raises(SettingError, match="handshake-timeout-seconds"):
        load_config(["--handshake-timeout-seconds", "0"], {})


def test_limits_have_safe_defaults() -> None:
    from serving.server.connections import grpc_options

    config = ServerConfig()
    assert config.network.max_message_bytes == 16 * 1024 * 1024 and config.limits.max_items_per_request == 1024
    assert config.admission.max_concurrent_rpcs == 1000 and config.limits.max_sample_streams == 64
    assert config.admission.request_receive_timeout_seconds == 10 and config.admission.max_pending_requests == 1000
    assert config.admission.max_request_bytes_in_flight == 64 * 1024 * 1024
    options = dict(grpc_options(config))
    assert options["grpc.max_concurrent_streams"] == 100 and options["grpc.max_allowed_incoming_connections"] == 1000
    assert options["grpc.server_handshake_timeout_ms"] == 5000 and options["grpc.max_connection_idle_ms"] == 60_000
    assert options["grpc.max_connection_age_ms"] == 300_000 and options["grpc.max_connection_age_grace_ms"] == 30_000
    assert options["grpc.max_receive_message_length"] == options["grpc.max_send_message_length"] == 16 * 1024 * 1024


def test_start_up_raises_the_descriptor_limit_or_refuses_what_it_cannot_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    from serving.errors import StartupError
    from serving.server.connections import descriptors_needed, ensure_file_descriptors

    limits = {"soft": 1024, "hard": 4096}
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (limits["soft"], limits["hard"]))
    monkeypatch.setattr(resource, "setrlimit", lambda kind, value: limits.update(soft=value[0]))
    config = ServerConfig()  # the gRPC and the REST port, 1000 connections each
    ensure_file_descriptors(config)
    assert limits["soft"] == descriptors_needed(config) == 2 * 1000 + 16 + 256
    grpc_only = load_config(["--http-port", "none"], {})
    assert descriptors_needed(grpc_only) == 1000 + 16 + 256
    with pytest.raises(StartupError, match=r"--max-connections \(3000\) needs 6272 file descriptors .* at most 1912 "):
        ensure_file_descriptors(load_config(["--max-connections", "3000"], {}))
