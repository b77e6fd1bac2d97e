"""The weighted canary route and shadow scoring on a real server: who gets the canary, and the paired evidence.

Versions 1 (stable) and 2 (canary) are the same graphs here, so every paired difference is exactly 0 when the
pairing is right (the same images, the same draws on both), and the routing can be counted on its own.
"""

from __future__ import annotations

import json
import math
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from contract.labels import read_labels, write_labels
from serving import admin
from serving.client import VaeClient, VaeError
from tests.helpers import ServerThread, mnist_5k_images, publish_copy, running_server, wait_until

IMAGES = mnist_5k_images(64).numpy()


@pytest.fixture(params=[1.0])
def canary_server(model_dir: Path, request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    """Versions 1 (stable) and 2 (canary, a copy); no canary weight yet; every stable request shadowed (or the
    `shadow_fraction` a test's indirect parameter gives)."""
    publish_copy(model_dir, 2)
    write_labels(model_dir, {"stable": 1, "canary": 2})
    config = {"default_version": "stable", "shadow_fraction": request.param, "poll_seconds": 0}
    with running_server(model_dir, encode_score_fraction=0.0, **config) as server:  # input histograms: exact counts
        yield server


def versions_by_key(client: VaeClient, keys: range) -> dict[int, int]:
    """The version that answered a one-image Encode for each caller key (sent as x-request-id)."""
    image = IMAGES[:1]
    return {key: client.with_request_id(f"caller-{key}").encode(image).model_version for key in keys}


@pytest.mark.parametrize("canary_server", [0.0], indirect=True)  # routing alone
def test_the_canary_weight_sends_a_sticky_share_of_the_default_route(canary_server: ServerThread) -> None:
    model_dir = canary_server.config.repository.model_dir
    with VaeClient(canary_server.target) as client:
        assert set(versions_by_key(client, range(40)).values()) == {1}  # weight 0: the canary takes nothing
        write_labels(model_dir, {"stable": 1, "canary": 2}, canary_weight=0.3)
        canary_server.refresh()  # as SIGHUP or the next poll: no restart
        first = versions_by_key(client, range(400))
        assert versions_by_key(client, range(400)) == first  # each caller keeps its version
        share = sum(version == 2 for version in first.values()) / len(first)
        assert 0.2 < share < 0.4  # 0.3 ± 4.4 standard deviations of a binomial(400, 0.3)
        assert canary_server.metric("vae_canary_weight") == 0.3
        assert canary_server.metric("vae_canary_version") == 2
        seeded = {client.score(IMAGES[:1], seed=seed).model_version for seed in range(400)}
        assert seeded == {1, 2}  # without an x-request-id, the seed is the key
        for view, version in ((client.using(model_version=1), 1), (client.using(label="stable"), 1)):
            assert {view.with_request_id(f"caller-{key}").encode(IMAGES[:1]).model_version for key in first} == {
                version
            }  # a request naming a version or label is never re-routed
        assert client.model_info().model_version == 1  # the default route's version, not a draw
        write_labels(model_dir, {"stable": 1, "canary": 2}, canary_weight=0.6)
        canary_server.refresh()
        raised = versions_by_key(client, range(400))
        assert all(raised[key] == 2 for key, version in first.items() if version == 2)  # more weight only adds
        write_labels(model_dir, {"stable": 1}, canary_weight=0.6)  # no canary label: nothing to route to
        canary_server.refresh()
        assert set(versions_by_key(client, range(100)).values()) == {1}
        assert canary_server.metric("vae_canary_weight") == 0


def test_the_canary_scores_stable_inputs_again_on_the_same_draws(canary_server: ServerThread) -> None:
    with VaeClient(canary_server.target) as client:
        client.encode(IMAGES[:8])
        client.score(IMAGES[8:16], importance_samples=4, seed=7)
        client.reconstruct(IMAGES[16:20], seed=3)
        client.using(label="canary").score(IMAGES[:8])  # answered by the canary: nothing to compare
        client.sample(4, seed=1)  # no inputs to score
        wait_until(lambda: client.compare_versions().paired_inputs == 20, what="20 pairs")
        compared = client.compare_versions()
    assert (compared.candidate, compared.stable, compared.paired_inputs) == (2, 1, 20)
    # The same graphs on the same images and draws: every paired difference is 0, none worse.
    assert compared.median_difference == compared.median_difference_low == compared.median_difference_high == 0
    assert compared.share_worse == 0 and compared.confidence == 0.95
    assert compared.stable_median_negative_elbo == compared.candidate_median_negative_elbo > 50
    assert (compared.dropped, compared.abandoned, compared.shadow_fraction, compared.note) == (0, 0, 1.0, "")
    metric = canary_server.metric
    assert metric("vae_shadow_jobs_total", result="scored") == 3
    assert metric("vae_shadow_difference_nats_count", candidate="2", stable="1") == 20
    assert metric("vae_shadow_difference_nats_bucket", candidate="2", stable="1", le="0.0") == 20
    for role, version in (("stable", "1"), ("candidate", "2")):
        for name in ("vae_shadow_negative_elbo_nats", "vae_shadow_reconstruction_nats", "vae_shadow_latent_norm"):
            assert metric(f"{name}_count", role=role, version=version) == 20
    assert metric("vae_shadow_seconds_count", role="candidate", version="2") == 3
    assert metric("vae_shadow_seconds_count", role="stable", version="1") == 1  # Encode's: no scores in its reply
    # The input-score histograms count what callers sent, once: shadow runs are not in them.
    assert metric("vae_input_score_nats_count", version="2") == 8  # the request the canary answered
    assert metric("vae_input_score_nats_count", version="1") == 12  # Score's and Reconstruct's (Encode's: off here)


def test_a_full_shadow_queue_drops_and_counts_and_callers_never_wait(model_dir: Path) -> None:
    publish_copy(model_dir, 2)
    write_labels(model_dir, {"stable": 1, "canary": 2})
    config = {"default_version": "stable", "shadow_fraction": 1.0, "shadow_queue_rows": 4, "poll_seconds": 0}
    with running_server(model_dir, **config) as server, VaeClient(server.target) as client:
        for _ in range(3):
            client.score(IMAGES[:8])  # 8 images never fit a queue of 4: dropped at once
        wait_until(lambda: server.metric("vae_shadow_jobs_total", result="dropped") == 3, what="3 dropped")
        compared = client.compare_versions()
        assert (compared.paired_inputs, compared.dropped) == (0, 3)
        assert compared.note == "no pairs yet" and math.isnan(compared.median_difference)
        client.score(IMAGES[:4])
        wait_until(lambda: client.compare_versions().paired_inputs == 4, what="4 pairs")


def test_compare_versions_says_what_it_cannot_compare(canary_server: ServerThread, model_dir: Path) -> None:
    with VaeClient(canary_server.target) as client:
        other = client.compare_versions(1)
        assert other.paired_inputs == 0 and other.note == "version 1 is not being compared: the canary is version 2"
        assert client.compare_versions(label="canary").candidate == 2
        write_labels(model_dir, {"stable": 1})
        canary_server.refresh()
        with pytest.raises(VaeError) as refused:
            client.compare_versions()
        assert refused.value.code == grpc.StatusCode.NOT_FOUND
        assert "no candidate to compare: label 'canary' names no version; served versions: 1 (stable)" in str(
            refused.value
        )
        assert client.compare_versions(2).note.startswith("no candidate is being compared")


def test_shadow_scoring_off_leaves_the_comparison_empty_and_says_why(model_dir: Path) -> None:
    publish_copy(model_dir, 2)
    write_labels(model_dir, {"stable": 1, "canary": 2})
    with (
        running_server(model_dir, default_version="stable", shadow_fraction=0.0) as server,
        VaeClient(server.target) as client,
    ):
        client.score(IMAGES[:4])
        compared = client.compare_versions()
    assert compared.paired_inputs == 0 and compared.note == "shadow scoring is off (--shadow-fraction 0)"
    assert np.isnan(compared.share_worse)


def promote(server: ServerThread, version: int, *flags: str) -> int:
    """`vae-models promote` on the server's model directory, asking the server (in this process)."""
    model_dir = server.config.repository.model_dir
    return admin.main(["promote", str(model_dir), str(version), "--target", server.target, *flags])


def test_promote_moves_stable_only_on_enough_evidence_within_the_margin(
    canary_server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = canary_server.config.repository.model_dir
    assert promote(canary_server, 2) == 1
    refused = capsys.readouterr()
    assert refused.err.startswith("error: not promoted: version 2 has 0 paired inputs, fewer than the 200 needed (")
    assert "evidence: version 2 against stable 1: no paired inputs (no pairs yet)" in refused.err
    assert read_labels(model_dir) == {"stable": 1, "canary": 2}
    with VaeClient(canary_server.target) as client:
        client.score(IMAGES[:24], seed=5)
        wait_until(lambda: client.compare_versions().paired_inputs == 24, what="24 pairs")
    assert promote(canary_server, 2, "--min-pairs", "24", "--margin", "0") == 0  # the same graphs: 0 difference
    promoted = capsys.readouterr().out
    assert promoted.startswith("vae-mnist: stable -> version 2 (was 1)\nevidence: version 2 against stable 1 on 24")
    assert read_labels(model_dir) == {"stable": 2, "canary": 2}


def test_promote_with_force_moves_the_label_and_says_against_what(
    canary_server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    assert promote(canary_server, 2, "--force") == 0
    captured = capsys.readouterr()
    assert captured.out == "vae-mnist: stable -> version 2 (was 1)\n"
    assert captured.err.startswith("warning: promoted with --force, against the evidence: version 2 has 0 paired")
    model_dir = canary_server.config.repository.model_dir
    unreachable = ["--target", "127.0.0.1:1", "--timeout", "2"]
    assert admin.main(["promote", str(model_dir), "1", *unreachable]) == 1
    assert "error: not promoted: cannot read the evidence from 127.0.0.1:1: UNAVAILABLE" in capsys.readouterr().err
    assert read_labels(model_dir)["stable"] == 2


@pytest.mark.parametrize("canary_server", [0.0], indirect=True)
def test_a_caller_key_routes_alike_over_the_typed_api_and_rest(canary_server: ServerThread) -> None:
    write_labels(canary_server.config.repository.model_dir, {"stable": 1, "canary": 2}, canary_weight=0.5)
    canary_server.refresh()
    body = {"inputs": [{"name": "z", "shape": [1, 20], "datatype": "FP32", "data": [0.0] * 20}]}
    seen = set()
    with VaeClient(canary_server.target) as client:
        for key in range(40):
            typed = client.with_request_id(f"caller-{key}").decode(np.zeros((1, 20), np.float32)).model_version
            request = urllib.request.Request(
                f"{canary_server.http_url}/v2/models/vae-mnist-decoder/infer",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "x-request-id": f"caller-{key}"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                assert json.loads(response.read())["model_version"] == str(typed), key
            seen.add(typed)
    assert seen == {1, 2}


def test_the_comparison_keeps_the_newest_pairs_of_its_window(model_dir: Path) -> None:
    publish_copy(model_dir, 2)
    write_labels(model_dir, {"stable": 1, "canary": 2})
    config = {"default_version": "stable", "shadow_fraction": 1.0, "shadow_window": 10, "poll_seconds": 0}
    with running_server(model_dir, **config) as server, VaeClient(server.target) as client:
        for start in (0, 8, 16):
            client.score(IMAGES[start : start + 8])
        wait_until(lambda: server.metric("vae_shadow_jobs_total", result="scored") == 3, what="3 jobs scored")
        assert client.compare_versions().paired_inputs == 10  # of 24 scored
