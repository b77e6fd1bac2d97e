"""Shadow scoring: the candidate version scores a share of the stable version's live inputs again, after their
reply, so that the two are compared on the same images before the candidate takes the traffic.

The candidate is the version the `canary` label names; stable is the `stable` label's (without one, the default
route's). A fraction (`--shadow-fraction`) of the Encode, Score and Reconstruct requests stable answered are
offered here by its engine once their answer is computed (`offer`: a random draw, and an append to a queue). One
worker task scores them on the candidate, a job at a time, through the candidate's batchers as a caller of its
own (`SHADOW_CALLER`, one line of their fair queue): Score's inputs with the request's importance samples and
seed, Reconstruct's and Encode's with none (one seeded posterior draw, Score's K = 0). Stable's numbers are the
reply's where it has them (Score, Reconstruct: the same draws), computed again the same way for Encode. The queue
holds at most `--shadow-queue-rows` images: a request that finds it full is dropped and counted, never waited
for, and a job whose versions are no longer the pair, or whose run fails (a full batcher queue, its deadline), is
abandoned and counted. No caller waits on any of it.

Every image scored by both gives one pair: the candidate's negative ELBO minus stable's (nats; positive: the
candidate explains the image worse). The newest `--shadow-window` pairs are kept, and `comparison` reads them
for `CompareVersions` and `vae-models promote`: their count, median and its distribution-free confidence
interval, and the share the candidate scores worse. The metrics observer sees each job's scores per version.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from contract.scores import ImageScores
from contract.settings import check_settings, setting
from serving.dataplane.admission import CALLER
from serving.dataplane.engine import VaeEngine
from serving.errors import ServingError

log = logging.getLogger(__name__)

SHADOW_CALLER = "shadow"  # the shadow worker's line in the batchers' fair queue
CONFIDENCE = 0.95  # of the median's interval
_Z = 1.959963984540054  # the standard normal's 97.5 % quantile
_RUN_SECONDS = 30.0  # a shadow run's deadline: it gives way, it never holds a batcher's queue for long


@dataclass(frozen=True)
class ShadowSettings:
    """Shadow scoring: how much of stable's live traffic the canary scores again, and what it keeps."""

    shadow_fraction: float = setting(
        0.1,
        "fraction of the Encode, Score and Reconstruct requests the stable version answers whose images the "
        "canary version scores again after the reply, to compare the two (CompareVersions, vae-models promote); "
        "only while a canary label names another version; 0 turns it off",
        minimum=0.0,
        maximum=1.0,
    )
    shadow_queue_rows: int = setting(
        4096,
        "images waiting to be shadow-scored, at most (float32: 3 KiB each); a request's images that do not fit "
        'are dropped and counted (vae_shadow_jobs_total{result="dropped"})',
        minimum=1,
        metavar="N",
    )
    shadow_window: int = setting(
        10_000, "paired inputs the comparison keeps (the newest), at most", minimum=1, metavar="N"
    )

    def __post_init__(self) -> None:
        check_settings(self)


class ShadowObserver(Protocol):
    """What shadow scoring reports (the metrics module implements it)."""

    def shadow_compared(self, candidate: int, stable: int) -> None: ...  # a pair begins: its series, at zero

    def shadow_job(self, result: str) -> None: ...  # "scored", "dropped" or "abandoned"

    def shadow_scored(self, version: int, role: str, scores: ImageScores, seconds: float | None) -> None: ...

    def shadow_paired(self, candidate: int, stable: int, differences: np.ndarray) -> None: ...


@dataclass(frozen=True)
class Pair:
    """The two versions compared."""

    stable: int
    candidate: int


@dataclass(frozen=True)
class _Scored:
    """One version's scores of a job's images, and how long its run took (None: the reply's own)."""

    scores: ImageScores
    seconds: float | None


@dataclass(frozen=True)
class Comparison:
    """The candidate against stable on the same live inputs: `CompareVersions`' reply, field for field."""

    candidate: int
    stable: int
    paired_inputs: int
    median_difference: float  # candidate − stable negative ELBO, nats (positive: the candidate is worse); nan: none
    median_difference_low: float  # the median's CONFIDENCE interval (distribution-free: order statistics)
    median_difference_high: float
    confidence: float
    share_worse: float  # of the paired inputs, those the candidate scores worse; nan: none
    stable_median_negative_elbo: float  # median negative ELBO of the paired inputs on each version
    candidate_median_negative_elbo: float
    dropped: int  # requests offered while the queue was full, since the pair began
    abandoned: int  # jobs whose run failed or whose pair changed
    shadow_fraction: float
    note: str  # why there are no pairs, when there are none


@dataclass(frozen=True)
class _Job:
    pair: Pair
    images: np.ndarray
    importance_samples: int
    seed: int | None
    stable: ImageScores | None  # the reply's scores, when it has them (the same draws the candidate runs)


def median_interval(differences: np.ndarray) -> tuple[float, float, float]:
    """(median, low, high) of `differences`: the CONFIDENCE interval of the median between the order statistics
    a binomial(n, 1/2) count puts it between (normal approximation), so it holds whatever the distribution."""
    n = len(differences)
    if n == 0:
        return math.nan, math.nan, math.nan
    ordered = np.sort(differences)
    half_width = _Z * math.sqrt(n) / 2
    low = max(0, math.floor(n / 2 - half_width) - 1)  # 0-based: the ranks floor(n/2 - w) and ceil(1 + n/2 + w)
    high = min(n - 1, math.ceil(n / 2 + half_width))
    return float(np.median(ordered)), float(ordered[low]), float(ordered[high])


class ShadowScoring:
    """The shadow queue, its worker, and the window of paired scores of the pair being compared."""

    def __init__(
        self,
        settings: ShadowSettings,
        lease: Callable[[int], AbstractAsyncContextManager[VaeEngine]],
        observer: ShadowObserver,
    ) -> None:
        """`lease(version)`: a served version's engine, held until exit (`ModelManager.lease`)."""
        self.settings = settings
        self._lease = lease
        self._observer = observer
        self.pair: Pair | None = None
        self._jobs: collections.deque[_Job] = collections.deque()
        self._queued_rows = 0
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._rng = np.random.default_rng()
        window = settings.shadow_window
        # Per pair, newest last: the difference and stable's negative ELBO (the candidate's is their sum).
        self._differences: collections.deque[float] = collections.deque(maxlen=window)
        self._stable_scores: collections.deque[float] = collections.deque(maxlen=window)
        self._dropped = self._abandoned = 0

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="shadow-scoring")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        self._jobs.clear()
        self._queued_rows = 0

    def compare(self, pair: Pair | None) -> None:
        """From now on, compare this pair (None: none); a new pair starts an empty window."""
        if pair == self.pair:
            return
        self.pair = pair
        self._differences.clear()
        self._stable_scores.clear()
        self._dropped = self._abandoned = 0
        if pair is not None:
            self._observer.shadow_compared(pair.candidate, pair.stable)
            log.info("shadow_scoring", extra={"fields": {"stable": pair.stable, "candidate": pair.candidate}})

    def offer(
        self, version: int, images: np.ndarray, importance_samples: int, seed: int | None, result: ImageScores | None
    ) -> None:
        """A request `version` answered, its checked images and, where it computed them, their scores with these
        importance samples and seed: queued for the candidate when stable answered and the draw says so."""
        pair, fraction = self.pair, self.settings.shadow_fraction
        if pair is None or version != pair.stable or fraction == 0 or self._rng.random() >= fraction:
            return
        rows = len(images)
        if self._queued_rows + rows > self.settings.shadow_queue_rows:
            self._dropped += 1
            self._observer.shadow_job("dropped")
            return
        self._jobs.append(_Job(pair, images, importance_samples, seed, result))
        self._queued_rows += rows
        self._wake.set()

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def comparison(self, candidate: int | None = None) -> Comparison:
        """The evidence on `candidate` (None: the canary being compared) against stable; no pairs, with a note
        saying why, when it is not the candidate being compared."""
        pair = self.pair
        fraction = self.settings.shadow_fraction
        if pair is None:
            note = "no candidate is being compared: no canary label names a served version other than stable's"
            return _empty(candidate or 0, 0, fraction, note)
        if candidate is not None and candidate != pair.candidate:
            note = f"version {candidate} is not being compared: the canary is version {pair.candidate}"
            return _empty(candidate, pair.stable, fraction, note)
        count = len(self._differences)
        if not count:
            note = "shadow scoring is off (--shadow-fraction 0)" if fraction == 0 else "no pairs yet"
            return _empty(pair.candidate, pair.stable, fraction, note, self._dropped, self._abandoned)
        differences = np.fromiter(self._differences, np.float64, count)
        stable = np.fromiter(self._stable_scores, np.float64, count)
        median, low, high = median_interval(differences)
        return Comparison(
            candidate=pair.candidate,
            stable=pair.stable,
            paired_inputs=count,
            median_difference=median,
            median_difference_low=low,
            median_difference_high=high,
            confidence=CONFIDENCE,
            share_worse=float(np.mean(differences > 0)),
            stable_median_negative_elbo=float(np.median(stable)),
            candidate_median_negative_elbo=float(np.median(stable + differences)),
            dropped=self._dropped,
            abandoned=self._abandoned,
            shadow_fraction=fraction,
            note="",
        )

    async def _work(self) -> None:
        CALLER.set(SHADOW_CALLER)  # this task's context: its rows queue in a line of their own
        while True:
            await self._wake.wait()
            while self._jobs:
                job = self._jobs.popleft()
                try:
                    await self._run(job)
                except asyncio.CancelledError:
                    raise
                except ServingError as exc:  # a version went, a full queue, the deadline: shadow work gives way
                    self._abandon(job, str(exc))
                except Exception:  # a bug here must not stop shadow scoring, nor reach a caller
                    log.exception("shadow_job_failed")
                    self._abandon(job, "error")
                finally:
                    self._queued_rows -= len(job.images)
            self._wake.clear()

    async def _run(self, job: _Job) -> None:
        if job.pair != self.pair:
            self._abandon(job, "the versions compared changed")
            return
        async with self._lease(job.pair.candidate) as candidate_engine:
            if job.stable is not None:  # the reply's scores are stable's, from the same draws
                stable = _Scored(job.stable, None)
            else:
                async with self._lease(job.pair.stable) as stable_engine:
                    stable = await _score(stable_engine, job)
            candidate = await _score(candidate_engine, job)
        if job.pair != self.pair:  # changed while it ran: these pairs belong to no window
            self._abandon(job, "the versions compared changed")
            return
        differences = candidate.scores.negative_elbo - stable.scores.negative_elbo
        self._differences.extend(differences.tolist())
        self._stable_scores.extend(stable.scores.negative_elbo.tolist())
        self._observer.shadow_job("scored")
        self._observer.shadow_scored(job.pair.stable, "stable", stable.scores, stable.seconds)
        self._observer.shadow_scored(job.pair.candidate, "candidate", candidate.scores, candidate.seconds)
        self._observer.shadow_paired(job.pair.candidate, job.pair.stable, differences)

    def _abandon(self, job: _Job, reason: str) -> None:
        if job.pair == self.pair:
            self._abandoned += 1
        self._observer.shadow_job("abandoned")
        log.debug("shadow job abandoned: %s", reason)


async def _score(engine: VaeEngine, job: _Job) -> _Scored:
    started = time.perf_counter()
    deadline = asyncio.get_running_loop().time() + _RUN_SECONDS
    scores = await engine.score_again(job.images, job.importance_samples, job.seed, deadline)
    return _Scored(scores, time.perf_counter() - started)


def _empty(candidate: int, stable: int, fraction: float, note: str, dropped: int = 0, abandoned: int = 0) -> Comparison:
    """A comparison without pairs: NaN for every figure pairs would give."""
    nan = math.nan
    figures = (nan, nan, nan, CONFIDENCE, nan, nan, nan)  # the median, its interval, the share and the medians
    return Comparison(candidate, stable, 0, *figures, dropped, abandoned, fraction, note)
