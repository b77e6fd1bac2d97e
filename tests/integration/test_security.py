"""Security on a running server: TLS and mutual TLS on the gRPC port, the plaintext health-only port the
kubelet's probes use under TLS, a metrics port that serves /metrics only, and the abuse limits
(tests/unit/test_unsafe_deserialization.py: what is never unpickled)."""

from __future__ import annotations

import asyncio
import logging
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from contract.settings import SettingError
from serving.client import VaeClient, VaeError
from serving.client import cli as client_cli
from serving.errors import StartupError
from serving.server.app import start_server
from serving.server.config import load_config
from tests.helpers import Pki, ServerThread, make_pki, publish_copy, running_server, server_config, wait_until


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(exported_repository: Path, pki: Pki) -> Iterator[ServerThread]:
    with running_server(exported_repository, tls_cert=pki.server.cert, tls_key=pki.server.key, health_port=0) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(exported_repository: Path, pki: Pki) -> Iterator[ServerThread]:
    with running_server(
        exported_repository, tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca, health_port=0
    ) as server:
        yield server


def refused_code(target: str, **tls: Path) -> grpc.StatusCode:
    with VaeClient(target, retries=0, timeout_s=5, **tls) as client, pytest.raises(VaeError) as refused:  # type: ignore[arg-type]
        client.sample(1, seed=0)
    return refused.value.code


def test_tls_serves_a_client_that_trusts_the_servers_ca(tls_server: ServerThread, pki: Pki) -> None:
    with VaeClient(tls_server.target, tls_ca=pki.ca) as client:
        assert client.sample(2, seed=1).images.shape == (2, 1, 28, 28) and client.health() == "SERVING"
    assert tls_server.config.tls.transport == "tls"


def test_a_plaintext_client_is_refused_on_a_tls_port(tls_server: ServerThread) -> None:
    assert refused_code(tls_server.target) == grpc.StatusCode.UNAVAILABLE


def test_a_client_trusting_another_ca_refuses_the_server(tls_server: ServerThread, pki: Pki) -> None:
    assert refused_code(tls_server.target, tls_ca=pki.other_ca) == grpc.StatusCode.UNAVAILABLE


def rest_ready(server: ServerThread, context: ssl.SSLContext | None, scheme: str = "https") -> int:
    """GET /v2/health/ready on the REST port: its status."""
    url = server.http_url.replace("http://", f"{scheme}://") + "/v2/health/ready"
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        return int(response.status)


def test_the_rest_port_speaks_the_same_tls_and_mutual_tls(
    tls_server: ServerThread, mtls_server: ServerThread, pki: Pki
) -> None:
    trusting = ssl.create_default_context(cafile=str(pki.ca))
    assert rest_ready(tls_server, trusting) == 200
    with pytest.raises(urllib.error.URLError):  # a client trusting another CA refuses the server
        rest_ready(tls_server, ssl.create_default_context(cafile=str(pki.other_ca)))
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext on the TLS port gets no answer
        rest_ready(tls_server, None, scheme="http")
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):  # mutual TLS: no certificate
        rest_ready(mtls_server, trusting)
    trusting.load_cert_chain(pki.client.cert, pki.client.key)
    assert rest_ready(mtls_server, trusting) == 200


def test_mutual_tls_serves_a_client_with_a_certificate_from_the_ca(mtls_server: ServerThread, pki: Pki) -> None:
    with VaeClient(mtls_server.target, tls_ca=pki.ca, tls_cert=pki.client.cert, tls_key=pki.client.key) as vae:
        assert vae.model_info().latent_dim == 20
    assert mtls_server.config.tls.transport == "mutual-tls"


def test_mutual_tls_refuses_a_client_without_a_certificate(mtls_server: ServerThread, pki: Pki) -> None:
    assert refused_code(mtls_server.target, tls_ca=pki.ca) == grpc.StatusCode.UNAVAILABLE
    assert mtls_server.metric("vae_requests_total", method="Sample", code="OK") == 0  # nothing reached the model


def test_mutual_tls_refuses_a_certificate_from_another_ca(mtls_server: ServerThread, pki: Pki) -> None:
    intruder = {"tls_ca": pki.ca, "tls_cert": pki.other_client.cert, "tls_key": pki.other_client.key}
    assert refused_code(mtls_server.target, **intruder) == grpc.StatusCode.UNAVAILABLE


def plaintext_health(port: int, service: str = "") -> str:
    """What a kubelet gRPC probe asks: grpc.health.v1 Check over plaintext, no certificate."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def health_port(server: ServerThread) -> int:
    port = server.running.health_port
    assert port is not None and port not in (server.running.grpc_port, server.running.metrics_port)
    return port


def test_probes_get_serving_in_plaintext_on_the_health_port_of_a_tls_server(tls_server: ServerThread) -> None:
    for service in ("", "vae.v1.VaeService"):  # liveness asks for "", startup and readiness for the service
        assert plaintext_health(health_port(tls_server), service) == "SERVING"
    with pytest.raises(grpc.RpcError) as refused:  # the same plaintext probe on the gRPC port fails
        plaintext_health(tls_server.running.grpc_port)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_probes_need_no_client_certificate_on_the_health_port_under_mutual_tls(mtls_server: ServerThread) -> None:
    assert plaintext_health(health_port(mtls_server), "vae.v1.VaeService") == "SERVING"
    with pytest.raises(grpc.RpcError) as refused:
        plaintext_health(mtls_server.running.grpc_port)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_health_port_serves_no_vae_rpc_and_no_reflection(tls_server: ServerThread) -> None:
    target = f"127.0.0.1:{health_port(tls_server)}"
    samples_before = tls_server.metric("vae_requests_total", method="Sample")
    assert refused_code(target) == grpc.StatusCode.UNIMPLEMENTED  # Sample over plaintext: no such service here
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as no_reflection:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    assert no_reflection.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as unknown:
        plaintext_health(health_port(tls_server), "vae.v1.Unknown")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert tls_server.metric("vae_requests_total", method="Sample") == samples_before  # nothing reached the model


def test_the_health_port_follows_the_drain(exported_repository: Path) -> None:
    """Draining turns the health port NOT_SERVING as it does the gRPC port's health (readiness drops the pod)."""
    with running_server(exported_repository, health_port=0) as server:
        port = health_port(server)
        assert plaintext_health(port, "vae.v1.VaeService") == "SERVING"
        asyncio.run_coroutine_threadsafe(server.running.health.enter_graceful_shutdown(), server.loop).result(5)
        assert plaintext_health(port, "vae.v1.VaeService") == "NOT_SERVING"
        assert plaintext_health(port) == "NOT_SERVING"


def test_cli_takes_tls_flags(mtls_server: ServerThread, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
    assert client_cli.main(["--target", mtls_server.target, *tls, "info"]) == 0
    assert '"health": "SERVING"' in capsys.readouterr().out
    assert client_cli.main(["--target", mtls_server.target, "--tls-ca", str(pki.ca), "--timeout", "5", "info"]) == 1
    assert capsys.readouterr().err.startswith(f"error: {mtls_server.target}: UNAVAILABLE")


def test_tls_mistakes_stop_start_up_with_one_line(exported_repository: Path, pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(SettingError, match=r"--tls-cert \(VAE_TLS_CERT\) and --tls-key \(VAE_TLS_KEY\) go together"):
        load_config([], {"VAE_TLS_CERT": str(pki.server.cert)})
    with pytest.raises(SettingError, match=r"--tls-client-ca \(VAE_TLS_CLIENT_CA\) needs TLS"):
        load_config(["--tls-client-ca", str(pki.ca)], {})
    wrong_key = server_config(exported_repository, tls_cert=pki.server.cert, tls_key=pki.client.key)
    with pytest.raises(StartupError, match=f"cannot use --tls-cert {pki.server.cert} with --tls-key"):
        asyncio.run(start_server(wrong_key))
    missing = server_config(exported_repository, tls_cert=tmp_path / "none.crt", tls_key=pki.server.key)
    with pytest.raises(StartupError, match="No such file or directory"):
        asyncio.run(start_server(missing))
    not_a_ca = tmp_path / "ca.pem"
    not_a_ca.write_text("not a certificate")
    bad_ca = server_config(
        exported_repository, tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=not_a_ca
    )
    with pytest.raises(StartupError, match=f"cannot use --tls-client-ca {not_a_ca}"):
        asyncio.run(start_server(bad_ca))


def test_start_up_log_says_when_grpc_is_plaintext(exported_repository: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="serving"), running_server(exported_repository):
        pass
    events = {record.getMessage(): getattr(record, "fields", {}) for record in caplog.records}
    assert "unencrypted" in events["grpc_plaintext"]["reason"]
    assert events["server_started"]["transport"] == "plaintext"


def test_the_metrics_port_serves_metrics_and_nothing_else(vae_server: ServerThread) -> None:
    with urllib.request.urlopen(vae_server.metrics_url, timeout=5) as response:
        assert response.status == 200 and b"vae_requests_total" in response.read()
    base = vae_server.metrics_url.removesuffix("/metrics")
    for path in ("/", "/metrics/", "/debug", "/favicon.ico", "/../metrics", "/metrics/../x"):
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(base + path, timeout=5)
        assert missing.value.code == 404, path
    with pytest.raises(urllib.error.HTTPError) as post:
        urllib.request.urlopen(urllib.request.Request(vae_server.metrics_url, data=b"x", method="POST"), timeout=5)
    assert post.value.code == 405


def test_sample_streams_beyond_the_cap_get_resource_exhausted(exported_repository: Path) -> None:
    with running_server(exported_repository, max_sample_streams=1) as server, VaeClient(server.target) as client:
        first = client.sample_stream(10_000, seed=1)
        next(first)
        with pytest.raises(VaeError) as refused:
            next(client.sample_stream(10, seed=2))
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "runs at most 1 at once" in refused.value.details
        first.close()
        wait_until(lambda: server.running.models.stream_slots.in_use == 0, what="the first stream to end")
        assert sum(len(chunk.images) for chunk in client.sample_stream(100, seed=2)) == 100  # the slot is free again


def test_the_stream_cap_counts_every_version_served(model_dir: Path) -> None:
    """With two versions loaded (latest:2, or any swap), the cap is still the server's, not each version's."""
    publish_copy(model_dir, 2)
    with (
        # one connection may hold every slot here: the cap over versions is what is tested, not the share
        running_server(model_dir, max_sample_streams=2, version_policy="latest:2", max_queue_share=1.0) as server,
        VaeClient(server.target) as client,
    ):
        on_one, on_two = client.using(model_version=1), client.using(model_version=2)
        streams = [on_one.sample_stream(10_000, seed=1), on_two.sample_stream(10_000, seed=1)]
        for stream in streams:
            next(stream)
        assert server.running.models.stream_slots.in_use == 2
        for version in (on_one, on_two):
            with pytest.raises(VaeError) as refused:
                next(version.sample_stream(10, seed=2))
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2 streaming calls are running and this server runs at most 2 at once" in refused.value.details
        for stream in streams:
            stream.close()
        wait_until(lambda: server.running.models.stream_slots.in_use == 0, what="the streams to end")


def test_one_connection_runs_only_its_share_of_the_sample_streams(exported_repository: Path) -> None:
    """64 streams at once from one client used to take every slot; one connection gets --max-queue-share of them."""
    with (
        running_server(exported_repository, max_sample_streams=4, max_queue_share=0.5) as server,
        VaeClient(server.target) as client,
    ):
        streams = [client.sample_stream(10_000, seed=1) for _ in range(2)]
        for stream in streams:
            next(stream)
        with pytest.raises(VaeError) as refused:
            next(client.sample_stream(10, seed=2))
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "this connection runs 2 streaming calls and one connection may run at most 2" in refused.value.details
        for stream in streams:
            stream.close()
        wait_until(lambda: server.running.models.stream_slots.in_use == 0, what="the streams to end")


def test_rpcs_beyond_the_concurrency_cap_get_resource_exhausted(exported_repository: Path) -> None:
    latents = np.zeros((1, 20), np.float32)
    with (
        running_server(exported_repository, max_concurrent_rpcs=2, max_delay_ms=1000, batch_wait="fixed") as server,
        VaeClient(server.target, retries=0) as client,
    ):
        stub_calls = [client._stub.Decode.future(_decode_request(latents), timeout=20) for _ in range(2)]
        wait_until(lambda: server.metric("vae_queue_depth", graph="decoder") == 2, what="two requests queued")
        with pytest.raises(VaeError) as refused:
            client.decode(latents)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert all(call.result().images.shape == [1, 1, 28, 28] for call in stub_calls)  # the two admitted finish
        assert client.decode(latents).images.shape == (1, 1, 28, 28)


def test_readiness_leaves_serving_while_every_call_slot_is_taken_and_comes_back(exported_repository: Path) -> None:
    """At the concurrency cap the port refuses every new call: readiness (VaeService's status) says so on both
    ports, liveness ("") stays SERVING (busy, not broken), and readiness returns once a slot is free."""
    latents = np.zeros((1, 20), np.float32)
    with (
        running_server(
            exported_repository, max_concurrent_rpcs=2, max_delay_ms=3000, batch_wait="fixed", health_port=0
        ) as server,
        VaeClient(server.target, retries=0) as client,
    ):
        readiness = "vae.v1.VaeService"
        stub_calls = [client._stub.Decode.future(_decode_request(latents), timeout=20) for _ in range(2)]
        wait_until(lambda: server.metric("vae_queue_depth", graph="decoder") == 2, what="two requests queued")
        wait_until(lambda: plaintext_health(health_port(server), readiness) == "NOT_SERVING", what="not ready")
        assert plaintext_health(server.running.grpc_port, readiness) == "NOT_SERVING"  # the probe is not refused
        assert plaintext_health(health_port(server)) == plaintext_health(server.running.grpc_port) == "SERVING"
        assert all(call.result().images.shape == [1, 1, 28, 28] for call in stub_calls)
        wait_until(lambda: plaintext_health(health_port(server), readiness) == "SERVING", what="ready again")


def _decode_request(latents: np.ndarray) -> object:
    from serving.api import pb
    from serving.api.tensors import tensor_to_proto

    return pb.DecodeRequest(latents=tensor_to_proto(latents))
