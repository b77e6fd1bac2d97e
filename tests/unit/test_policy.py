"""The version policy and the default route, as plain functions."""

from __future__ import annotations

import pytest

from serving.lifecycle.policy import VersionPolicy, resolve_default


@pytest.mark.parametrize(
    ("policy", "present", "served"),
    [
        ("latest", [1, 2, 5], [5]),
        ("latest:2", [1, 2, 5], [2, 5]),
        ("latest:9", [1, 2], [1, 2]),
        ("specific:2,1", [1, 2, 5], [1, 2]),
        ("specific:3", [1, 2], []),
        ("all", [1, 2, 5], [1, 2, 5]),
        ("latest", [], []),
    ],
)
def test_the_policy_selects_among_the_versions_present(policy: str, present: list[int], served: list[int]) -> None:
    assert VersionPolicy.parse(policy).select(present) == served


@pytest.mark.parametrize("text", ["newest", "latest:0", "latest:x", "specific:", "specific:0", "all:2", ""])
def test_a_malformed_policy_says_what_is_allowed(text: str) -> None:
    with pytest.raises(ValueError, match="use latest, latest:N, specific:V1,V2 or all"):
        VersionPolicy.parse(text)


def test_the_default_route_is_latest_a_label_or_a_number_among_the_served() -> None:
    labels = {"stable": 2, "canary": 7}
    assert resolve_default("latest", [2, 3], labels) == 3
    assert resolve_default("stable", [2, 3], labels) == 2
    assert resolve_default("2", [2, 3], labels) == 2
    assert resolve_default("canary", [2, 3], labels) is None  # its version is not served
    assert resolve_default("latest", [], labels) is None
