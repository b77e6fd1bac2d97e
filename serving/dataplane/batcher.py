"""Dynamic batching: concurrent requests' rows merged into one model run, then split back.

One `Batcher` per graph. Requests queue their rows in a `FairQueue` (bounded: beyond `max_queue_rows` in
all, or a connection's share of it, a request is refused with `Overloaded`); a worker task takes whole
requests, each caller's in turn, up to `max_batch_size` rows, runs them as one batch in a thread (onnxruntime
releases the GIL, so the event loop keeps accepting requests) and hands each request its slice. While one
batch runs the next one fills, so batches grow with load.

`batch_wait_seconds` decides whether queued rows run now or wait for more: under `adaptive` only when
recent batches say more rows are coming, so the first request after a quiet spell never waits out the delay.
How many rows it waits for (`next_target_rows`) is one more than the last batch held; when a wait runs out,
it falls to what came, and stays there a while when that was one row short (`holds_growth`). Batches whose
recent runs were faster than `inline_max_ms` run on the event-loop thread: for them the hand-off to a thread
and back costs as much as the run. Requests larger than `max_batch_size` run in chunks; cancelled and expired
requests are dropped before they run. docs/serving.md describes the policy, docs/performance.md what each
part gained.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from contract.settings import SettingError, check_settings, setting
from serving.dataplane.admission import CALLER
from serving.dataplane.fair_queue import FairQueue, Outputs, QueuedRows
from serving.errors import NotReady
from serving.tracing import BatchSpans, Traced

log = logging.getLogger(__name__)

RunFn = Callable[[np.ndarray], Sequence[np.ndarray]]  # rows [N, ...] → outputs, each [N, ...]


class BatchObserver(Protocol):
    """What the batcher reports (the metrics module implements it; tests can record it)."""

    def queue_depth(self, graph: str, rows: int) -> None: ...

    def batch_ran(
        self,
        graph: str,
        rows: int,
        queue_wait_seconds: Sequence[float],
        inference_seconds: float,
        traced: Sequence[Traced | None] = (),
    ) -> None:
        """One run: its rows, each request's wait in the queue, the run's seconds; with tracing on, each request's
        span (`traced`, in the order of the waits)."""


class _NoObserver:
    def queue_depth(self, graph: str, rows: int) -> None:
        pass

    def batch_ran(
        self,
        graph: str,
        rows: int,
        queue_wait_seconds: Sequence[float],
        inference_seconds: float,
        traced: Sequence[Traced | None] = (),
    ) -> None:
        pass


# After a wait ran out, how long the adaptive policy's target does not grow, in multiples of max_delay_ms: a wait
# that runs out costs its callers the whole delay. The hold doubles with each wait that runs out (up to the most)
# and starts again from the least once a wait fills: a lone caller pays one delay in 2 s at --max-delay-ms 2.
_PROBE_HOLD_DELAYS = (100, 1000)
# Weight of the newest run in the moving average of run times that decides which batches run inline.
_RUN_SECONDS_WEIGHT = 0.2


@dataclass(frozen=True)
class BatchSettings:
    """How requests are merged into onnxruntime runs (one policy for both graphs)."""

    max_batch_size: int = setting(
        64, "rows per onnxruntime run, at most; larger requests run in chunks", minimum=1, metavar="ROWS"
    )
    max_delay_ms: float = setting(
        2.0, "how long a request may wait for others to share its batch", minimum=0, metavar="MS"
    )
    batch_wait: Literal["adaptive", "fixed"] = setting(
        "adaptive",
        "when a batch waits up to --max-delay-ms for more rows: adaptive (only when recent traffic makes more "
        "likely, for one row more than recent batches held; the first request after a quiet spell runs at once), "
        "fixed (always, unless the batch is full)",
    )
    inline_max_ms: float = setting(
        0.25,
        "batches whose recent runs took at most this long run on the event-loop thread instead of being handed "
        "to the onnxruntime thread and back; 0: never",
        minimum=0,
        metavar="MS",
    )
    max_queue_rows: int = setting(
        4096, "rows waiting per graph, at most; beyond it RESOURCE_EXHAUSTED", minimum=1, metavar="ROWS"
    )
    max_queue_share: float = setting(
        0.5,
        "the share of --max-queue-rows (and of --max-sample-streams) one connection may hold (a single larger "
        "request is still let in when it holds nothing else); beyond it RESOURCE_EXHAUSTED",
        above=0,
        maximum=1,
        metavar="X",
    )

    def __post_init__(self) -> None:
        check_settings(self)
        if self.max_queue_rows < self.max_batch_size:
            raise SettingError(
                "{max_queue_rows} ({rows}) must be >= {max_batch_size} ({batch}), or a full batch could never queue",
                rows=self.max_queue_rows,
                batch=self.max_batch_size,
            )


def batch_wait_seconds(
    policy: BatchSettings, queued_rows: int, oldest_waited_s: float, expected_rows: int, previous_gap_s: float
) -> float:
    """How much longer the free worker should wait before running the queued rows (0: run them now).

    `oldest_waited_s`: how long the oldest queued request has waited. `expected_rows`: what recent traffic
    predicts (`expected_rows()`; 0: nothing). `previous_gap_s`: time from the end of the last batch to the
    oldest request's arrival (negative when it arrived while that batch ran). Under `adaptive`, while fewer
    rows than expected are queued and the last batch is recent, wait for them (the callers of recent
    batches are coming back); otherwise nobody else is expected and waiting would be pure latency. The wait
    never goes past `max_delay_ms` after the oldest request arrived.
    """
    max_delay_s = policy.max_delay_ms / 1000.0
    if queued_rows >= policy.max_batch_size or oldest_waited_s >= max_delay_s:
        return 0.0
    if policy.batch_wait == "adaptive" and (queued_rows >= expected_rows or previous_gap_s > max_delay_s):
        return 0.0
    return max_delay_s - oldest_waited_s


def expected_rows(policy: BatchSettings, target_rows: int, rows_during_run: int) -> int:
    """The rows the adaptive policy waits for: its target (`next_target_rows`, what recent batches held).

    And at least one more than arrived while the last batch ran (`rows_during_run`, 0 when the queued rows
    came after it ended): such callers are concurrent, and running their rows at once would keep batches as
    small as what trickles in during one run (on one core, the slowest way to serve many callers).
    """
    expected = max(target_rows, rows_during_run + 1) if rows_during_run else target_rows
    return min(expected, policy.max_batch_size)


WaitOutcome = Literal["none", "filled", "ran_out"]


def next_target_rows(policy: BatchSettings, target_rows: int, rows: int, outcome: WaitOutcome, may_grow: bool) -> int:
    """The adaptive policy's target after a batch of `rows`, by how the wait before it ended.

    - `filled` (the rows it waited for came before the delay was out) or `none` (they were there when it
      looked): one more than it got, when `may_grow`. Where callers' rows reach the batcher one by one
      (gRPC's server takes one new call per event-loop turn), a target that only followed past batches would
      stay at whatever size they happened to reach, however many callers there are: measured at 1 to 9 rows
      per run for the same 32 callers.
    - `ran_out` (the delay passed first): what it got; fewer callers are coming than the target said. When it
      got one row short, the batcher then holds off growing for a while (`holds_growth`, `_PROBE_HOLD_DELAYS`),
      so that trying for one more caller than there are costs one delay per period, not every other batch.
    - otherwise (growth on hold): at least what it got.
    """
    if outcome == "ran_out":
        target = rows
    elif may_grow:
        target = rows + 1
    else:
        target = max(target_rows, rows)
    return max(1, min(target, policy.max_batch_size))


def holds_growth(target_rows: int, rows: int, outcome: WaitOutcome) -> bool:
    """Whether the target stops growing for a while after this batch: when its wait ran out one row short of
    the target (it tried for one more caller than there are). A wait that got far fewer rows than the target
    saw the server stall (another process, a collection), not callers leave: the target falls to what came
    and grows back at once."""
    return outcome == "ran_out" and rows >= target_rows - 1


class Batcher:
    """Merges concurrent `run(rows)` calls for one graph into batched calls of `run_fn`."""

    def __init__(
        self,
        graph: str,
        run_fn: RunFn,
        policy: BatchSettings,
        executor: Executor | None = None,
        observer: BatchObserver | None = None,
        spans: BatchSpans | None = None,
    ) -> None:
        """`spans`: where its runs are traced (`serving.tracing.Tracing.batches`; None: tracing is off)."""
        self.graph = graph
        self.policy = policy
        self._run_fn = run_fn
        self._executor = executor
        self._observer = observer or _NoObserver()
        self._spans = spans
        self._queue = FairQueue(graph, policy.max_queue_rows, policy.max_queue_share)
        self._wakeup: asyncio.Future[None] | None = None
        self._wake_at_rows = 1  # queued rows at which `_enqueue` wakes a sleeping worker
        self._worker: asyncio.Task[None] | None = None
        self._previous_ended_at = float("-inf")  # when the last batch ended (loop time)
        self._rows_queued_at_end = 0  # rows that were queued when it ended
        # How many rows the adaptive policy waits for (`next_target_rows`), and until when it may not grow.
        self._target_rows = 0
        self._hold_until = float("-inf")
        self._hold_delays = _PROBE_HOLD_DELAYS[0]
        # Seconds a run of N rows takes (moving average of recent runs): which batches run inline.
        self._run_seconds: dict[int, float] = {}
        self._inline_max_s = policy.inline_max_ms / 1000.0

    @property
    def queued_rows(self) -> int:
        return self._queue.rows

    def start(self) -> None:
        """Start the worker task on the running event loop."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.graph}")

    async def close(self) -> None:
        """Stop the worker; requests still queued fail with NotReady (the server drains RPCs before this)."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        for item in self._queue.drain():
            if not item.future.done():
                item.future.set_exception(NotReady("the server is shutting down; retry on another replica"))

    async def run(self, rows: np.ndarray, deadline: float | None = None) -> Outputs:
        """The outputs of `run_fn(rows)`, computed in batches shared with other callers.

        `deadline` is an event-loop time (`loop.time()`); raises Overloaded when the queue is full and
        DeadlineExceeded when the deadline passed before the rows ran.
        """
        count = len(rows)
        if count == 0:
            raise ValueError("run() needs at least one row")
        if self._worker is None:
            raise NotReady(f"the {self.graph} batcher is not running")
        caller = CALLER.get()
        self._queue.admit(caller, count)
        step = self.policy.max_batch_size
        futures = [self._enqueue(rows[start : start + step], deadline, caller) for start in range(0, count, step)]
        if len(futures) == 1:
            return await futures[0]
        try:
            parts = await asyncio.gather(*futures)
        except BaseException:
            for future in futures:  # one chunk failed or the caller left: the others need not run
                future.cancel()
            raise
        return tuple(np.concatenate(chunks) for chunks in zip(*parts, strict=True))

    def _enqueue(self, rows: np.ndarray, deadline: float | None, caller: str) -> asyncio.Future[Outputs]:
        loop = asyncio.get_running_loop()
        traced = None if self._spans is None else self._spans.capture()  # the request's span, when traced
        item = QueuedRows(rows, loop.create_future(), loop.time(), deadline, caller, traced)
        self._queue.push(item)
        self._observer.queue_depth(self.graph, self._queue.rows)
        # Wake the worker when it waits on an empty queue, or waits for rows and enough are here now.
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done() and self._queue.rows >= self._wake_at_rows:
            wakeup.set_result(None)
        return item.future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        waited = False  # whether the rows queued now waited for more
        while True:
            if not self._queue:
                self._wake_at_rows = 1
                waited = False
                await self._sleep(None)
                continue
            now = loop.time()
            oldest = self._queue.oldest()
            gap_s = oldest - self._previous_ended_at
            during = self._rows_queued_at_end if gap_s < 0 else 0
            expected = expected_rows(self.policy, self._target_rows, during)
            wait_s = batch_wait_seconds(self.policy, self._queue.rows, now - oldest, expected, gap_s)
            if wait_s > 0:  # wake early once the expected (adaptive) or a full batch is queued
                self._wake_at_rows = expected if self.policy.batch_wait == "adaptive" else self.policy.max_batch_size
                waited = True
                await self._sleep(wait_s)
                continue
            outcome: WaitOutcome = "none" if not waited else "filled" if self._queue.rows >= expected else "ran_out"
            waited = False
            batch = self._take(now)
            if batch:
                try:
                    await self._run_batch(batch, loop)
                except Exception as exc:  # a bug here must not stop the worker: later requests would wait forever
                    log.exception("batch_failed", extra={"fields": {"graph": self.graph}})
                    for item in batch:
                        if not item.future.done():
                            item.future.set_exception(exc)
                self._batch_ended(sum(item.size for item in batch), outcome, loop.time())

    def _batch_ended(self, rows: int, outcome: WaitOutcome, now: float) -> None:
        """Remember the batch for the adaptive policy: when it ended, what came during it, what to wait for."""
        self._previous_ended_at = now
        self._rows_queued_at_end = self._queue.rows  # they arrived while it ran
        may_grow, target = now >= self._hold_until, self._target_rows
        self._target_rows = next_target_rows(self.policy, target, rows, outcome, may_grow)
        if holds_growth(target, rows, outcome):
            self._hold_until = now + self._hold_delays * self.policy.max_delay_ms / 1000.0
            self._hold_delays = min(2 * self._hold_delays, _PROBE_HOLD_DELAYS[1])
        elif outcome == "filled":
            self._hold_delays = _PROBE_HOLD_DELAYS[0]

    async def _sleep(self, timeout_s: float | None) -> None:
        """Wait until `_enqueue` wakes the worker, or `timeout_s` passes."""
        loop = asyncio.get_running_loop()
        self._wakeup = wakeup = loop.create_future()
        timer = None if timeout_s is None else loop.call_later(timeout_s, _resolve, wakeup)
        try:
            await wakeup
        finally:
            if timer is not None:
                timer.cancel()
            self._wakeup = None

    def _take(self, now: float) -> list[QueuedRows]:
        """Whole requests up to max_batch_size rows, each caller's in turn (`FairQueue.take`)."""
        batch = self._queue.take(self.policy.max_batch_size, now)
        self._observer.queue_depth(self.graph, self._queue.rows)
        return batch

    async def _run_batch(self, batch: list[QueuedRows], loop: asyncio.AbstractEventLoop) -> None:
        inputs = batch[0].rows if len(batch) == 1 else np.concatenate([item.rows for item in batch])
        started_at = loop.time()
        started_ns = 0 if self._spans is None else time.time_ns()
        estimate = self._run_seconds.get(len(inputs))
        try:
            if estimate is not None and estimate <= self._inline_max_s:
                outputs, inference_seconds = self._timed_run(inputs)
            else:
                outputs, inference_seconds = await loop.run_in_executor(self._executor, self._timed_run, inputs)
        except asyncio.CancelledError:  # close() while running: the requests cannot be answered
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(NotReady("the server is shutting down; retry on another replica"))
            raise
        except Exception as exc:  # the model failed: every request of the batch gets the error
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        self._run_seconds[len(inputs)] = (
            inference_seconds if estimate is None else estimate + _RUN_SECONDS_WEIGHT * (inference_seconds - estimate)
        )
        waits = [started_at - item.enqueued_at for item in batch]
        spans = self._spans
        traced = [item.traced for item in batch] if spans is not None else []
        if spans is not None and any(traced):  # rows of a sampled request: the run's span, the waits' exemplars
            self._observer.batch_ran(self.graph, len(inputs), waits, inference_seconds, traced)
            spans.ran(traced, len(inputs), started_ns, time.time_ns())
        else:
            self._observer.batch_ran(self.graph, len(inputs), waits, inference_seconds)
        offset = 0
        for item in batch:
            if not item.future.done():
                item.future.set_result(tuple(output[offset : offset + item.size] for output in outputs))
            offset += item.size

    def _timed_run(self, inputs: np.ndarray) -> tuple[Sequence[np.ndarray], float]:
        """`run_fn(inputs)` and the seconds it took (the run alone, wherever it ran)."""
        started = time.perf_counter()
        outputs = self._run_fn(inputs)
        return outputs, time.perf_counter() - started


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
