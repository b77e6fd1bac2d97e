"""Shadow scoring's pure parts: the median's interval, the caller's bucket, and the bounded queue's accounting."""

from __future__ import annotations

import math
from contextlib import AbstractAsyncContextManager
from typing import Any

import numpy as np

from serving.lifecycle.policy import canary_bucket
from serving.lifecycle.shadow import Pair, ShadowScoring, ShadowSettings, median_interval


def test_the_median_interval_is_between_the_order_statistics_of_a_binomial() -> None:
    median, low, high = median_interval(np.arange(100, dtype=np.float64)[::-1])
    assert (median, low, high) == (49.5, 39.0, 60.0)  # ranks 40 and 61 of 100, as the tables give
    assert median_interval(np.array([2.0])) == (2.0, 2.0, 2.0)
    assert all(math.isnan(value) for value in median_interval(np.array([])))


def test_the_median_interval_covers_the_median_of_a_skewed_distribution_95_times_in_100() -> None:
    rng = np.random.default_rng(0)
    true_median = math.log(2)  # of the exponential distribution
    covered = [
        low <= true_median <= high for _, low, high in (median_interval(rng.exponential(size=60)) for _ in range(2000))
    ]
    assert 0.94 <= np.mean(covered) <= 0.985  # at least the confidence (order statistics are conservative)


def test_a_callers_bucket_is_fixed_by_its_key_and_spread_evenly() -> None:
    assert canary_bucket("caller-7") == canary_bucket("caller-7") != canary_bucket("caller-8")
    buckets = np.array([canary_bucket(f"caller-{key}") for key in range(20_000)])
    assert ((buckets >= 0) & (buckets < 1)).all()
    assert abs(np.mean(buckets < 0.3) - 0.3) < 0.015  # 4.6 standard deviations of a binomial(20000, 0.3)


class Observer:
    def __init__(self) -> None:
        self.jobs: list[str] = []

    def shadow_compared(self, candidate: int, stable: int) -> None:
        self.jobs.append(f"compare {candidate} with {stable}")

    def shadow_job(self, result: str) -> None:
        self.jobs.append(result)

    def shadow_scored(self, *args: Any) -> None: ...

    def shadow_paired(self, *args: Any) -> None: ...


def no_lease(version: int) -> AbstractAsyncContextManager[Any]:
    raise AssertionError("the worker is not started in these tests")


def test_only_stable_requests_are_queued_within_the_row_bound_and_the_rest_counted() -> None:
    observer = Observer()
    shadow = ShadowScoring(ShadowSettings(shadow_fraction=1.0, shadow_queue_rows=10), no_lease, observer)
    images = np.zeros((4, 1, 28, 28), np.float32)
    shadow.offer(1, images, 0, None, None)  # no pair yet: nothing to compare
    shadow.compare(Pair(stable=1, candidate=2))
    shadow.offer(2, images, 0, None, None)  # the candidate's own answers are not compared with themselves
    assert shadow.queued_rows == 0
    for _ in range(3):
        shadow.offer(1, images, 0, None, None)
    assert shadow.queued_rows == 8 and observer.jobs == ["compare 2 with 1", "dropped"]  # the third: 12 rows of 10
    compared = shadow.comparison()
    assert (compared.candidate, compared.stable, compared.paired_inputs, compared.dropped) == (2, 1, 0, 1)
    shadow.compare(Pair(stable=1, candidate=3))  # a new pair starts afresh
    assert shadow.comparison().dropped == 0 and shadow.comparison(2).note == (
        "version 2 is not being compared: the canary is version 3"
    )


def test_a_fraction_of_the_requests_is_offered() -> None:
    observer = Observer()
    shadow = ShadowScoring(ShadowSettings(shadow_fraction=0.1, shadow_queue_rows=100_000), no_lease, observer)
    shadow.compare(Pair(stable=1, candidate=2))
    for _ in range(5000):
        shadow.offer(1, np.zeros((1, 1, 28, 28), np.float32), 0, None, None)
    assert 400 <= shadow.queued_rows <= 600  # 10 % of 5000 ± 5 standard deviations
