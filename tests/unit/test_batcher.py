"""The dynamic batcher on its own, with a fake model: merging, splitting, back-pressure, dropping."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from serving.dataplane.admission import CALLER
from serving.dataplane.batcher import (
    Batcher,
    BatchSettings,
    batch_wait_seconds,
    expected_rows,
    holds_growth,
    next_target_rows,
)
from serving.errors import DeadlineExceeded, NotReady, Overloaded
from serving.tracing import Traced


class FakeModel:
    """Doubles its input and records the rows of every run; `gate` can hold runs until a test releases them."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.threads: list[int] = []  # where each run ran (thread ident)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a run has started (and may be waiting on the gate)

    def run(self, rows: np.ndarray) -> Sequence[np.ndarray]:
        self.entered.set()
        self.gate.wait(timeout=10)
        self.batches.append(len(rows))
        self.threads.append(threading.get_ident())
        return [rows * 2.0, rows.sum(axis=1)]


class Recorder:
    def __init__(self) -> None:
        self.runs: list[tuple[int, int]] = []  # (rows, requests)
        self.waits: list[tuple[int, list[float]]] = []  # (rows, each request's seconds in the queue)
        self.depths: list[int] = []

    def queue_depth(self, graph: str, rows: int) -> None:
        self.depths.append(rows)

    def batch_ran(
        self,
        graph: str,
        rows: int,
        queue_wait_seconds: Sequence[float],
        inference_seconds: float,
        traced: Sequence[Traced | None] = (),
    ) -> None:
        self.runs.append((rows, len(queue_wait_seconds)))
        self.waits.append((rows, list(queue_wait_seconds)))


def rows(count: int, start: float = 0.0) -> np.ndarray:
    return (np.arange(count * 3, dtype=np.float32) + start).reshape(count, 3)


async def started(policy: BatchSettings, model: FakeModel, observer: Recorder | None = None) -> Batcher:
    batcher = Batcher("decoder", model.run, policy, observer=observer)
    batcher.start()
    return batcher


async def test_concurrent_requests_are_merged_into_one_run_and_split_back() -> None:
    model, recorder = FakeModel(), Recorder()
    batcher = await started(BatchSettings(max_batch_size=8, max_delay_ms=5000), model, recorder)
    inputs = [rows(1, start=10.0 * i) for i in range(5)] + [rows(3, start=100.0)]
    results = await asyncio.wait_for(asyncio.gather(*(batcher.run(x) for x in inputs)), timeout=5)
    assert model.batches == [8]  # filled to max_batch_size: ran at once, without waiting out the delay
    assert recorder.runs == [(8, 6)]
    for x, (doubled, sums) in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(doubled, x * 2.0)
        np.testing.assert_array_equal(sums, x.sum(axis=1))
    await batcher.close()


async def blocked_run(
    model: FakeModel, batcher: Batcher, request: np.ndarray
) -> asyncio.Future[tuple[np.ndarray, ...]]:
    """`request` sent while `model.gate` is closed, once its run has started in its thread: the worker is busy."""
    model.gate.clear()
    model.entered.clear()
    running = asyncio.ensure_future(batcher.run(request))
    await asyncio.wait_for(asyncio.to_thread(model.entered.wait, 10), timeout=10)  # a lone request runs at once
    assert batcher.queued_rows == 0 and not running.done()
    return running


async def hold_worker(batcher: Batcher, model: FakeModel) -> asyncio.Future[tuple[np.ndarray, ...]]:
    """A 1-row request whose run blocks in its thread until `model.gate` is set: the worker is busy."""
    return await blocked_run(model, batcher, rows(1, start=-1.0))


async def test_a_lone_caller_waits_out_the_delay_once_then_runs_at_once() -> None:
    model, recorder = FakeModel(), Recorder()
    # A delay of 2 s: far beyond a run that does not wait, however loaded the machine.
    batcher = await started(BatchSettings(max_batch_size=64, max_delay_ms=2000), model, recorder)
    for i in range(5):  # a lone caller, one request after the other
        (doubled, _) = await asyncio.wait_for(batcher.run(rows(2, start=i)), timeout=60)
        np.testing.assert_array_equal(doubled, rows(2, start=i) * 2.0)
    assert model.batches == [2, 2, 2, 2, 2]
    # The second request waited for a second caller (the policy tries for one more row than came) and ran
    # alone when the delay was out; after that the policy holds off trying for 100 delays: the others ran at once.
    waited = [wait >= 2.0 for (_, waits) in recorder.waits for wait in waits]
    assert waited == [False, True, False, False, False]
    await batcher.close()


async def test_fixed_wait_holds_a_lone_request_for_the_delay() -> None:
    model = FakeModel()
    batcher = await started(BatchSettings(max_batch_size=64, max_delay_ms=50, batch_wait="fixed"), model)
    loop = asyncio.get_running_loop()
    sent = loop.time()
    await asyncio.wait_for(batcher.run(rows(2)), timeout=5)
    assert loop.time() - sent >= 0.05
    assert model.batches == [2]
    await batcher.close()


async def test_after_a_merged_batch_the_next_waits_for_one_more_row_then_holds() -> None:
    model = FakeModel()
    batcher = await started(BatchSettings(max_batch_size=64, max_delay_ms=2000), model)
    loop = asyncio.get_running_loop()
    first = [batcher.run(rows(1, start=i)) for i in range(3)]
    await asyncio.wait_for(asyncio.gather(*first), timeout=5)  # queued together: one run of 3
    # Their callers come back one by one: the batch waits for a fourth, which never comes, until the delay is out.
    sent = loop.time()
    back_first = asyncio.ensure_future(batcher.run(rows(1)))
    await asyncio.sleep(0.05)
    assert not back_first.done() and batcher.queued_rows == 1
    back_later = [asyncio.ensure_future(batcher.run(rows(1, start=i))) for i in range(2)]
    await asyncio.sleep(0.05)
    assert not back_first.done() and batcher.queued_rows == 3
    await asyncio.wait_for(asyncio.gather(back_first, *back_later), timeout=10)
    assert loop.time() - sent >= 2.0
    # That wait ran out with 3: the policy now waits for 3, and no more for a while.
    sent = loop.time()
    again = [asyncio.ensure_future(batcher.run(rows(1, start=i))) for i in range(3)]
    await asyncio.wait_for(asyncio.gather(*again), timeout=10)
    assert loop.time() - sent < 2.0
    assert model.batches == [3, 3, 3]
    await batcher.close()


async def test_the_wait_for_expected_rows_ends_at_max_delay() -> None:
    model = FakeModel()
    batcher = await started(BatchSettings(max_batch_size=64, max_delay_ms=50), model)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(asyncio.gather(*(batcher.run(rows(1)) for _ in range(4))), timeout=5)
    sent = loop.time()
    await asyncio.wait_for(batcher.run(rows(1)), timeout=5)  # 4 expected, 1 came: runs after the delay
    assert loop.time() - sent >= 0.05
    assert model.batches == [4, 1]
    await batcher.close()


def test_wait_policy_runs_at_once_unless_more_rows_are_expected_soon() -> None:
    adaptive, fixed = BatchSettings(max_batch_size=8, max_delay_ms=10), BatchSettings(8, 10, batch_wait="fixed")
    # queued rows, waited s, expected rows, gap since the last batch s
    assert batch_wait_seconds(adaptive, 1, 0.0, 0, float("inf")) == 0  # first request ever
    assert batch_wait_seconds(adaptive, 1, 0.0, 1, 0.001) == 0  # a lone caller: expected no more than queued
    assert batch_wait_seconds(adaptive, 1, 0.0, 4, 0.5) == 0  # the last batch is long gone: a quiet spell
    assert batch_wait_seconds(adaptive, 1, 0.002, 4, 0.001) == pytest.approx(0.008)  # callers coming back
    assert batch_wait_seconds(adaptive, 2, 0.002, 4, -0.001) == pytest.approx(0.008)  # came during the run
    assert batch_wait_seconds(adaptive, 4, 0.0, 4, 0.001) == 0  # as many as expected
    assert batch_wait_seconds(adaptive, 1, 0.010, 4, 0.001) == 0  # waited max_delay
    assert batch_wait_seconds(fixed, 1, 0.002, 0, float("inf")) == pytest.approx(0.008)  # fixed: always waits
    assert batch_wait_seconds(fixed, 8, 0.0, 0, float("inf")) == 0  # ... unless the batch is full


async def test_requests_that_arrived_during_a_run_wait_for_one_more() -> None:
    model = FakeModel()
    batcher = await started(BatchSettings(max_batch_size=64, max_delay_ms=60_000), model)
    running = await hold_worker(batcher, model)
    during = [asyncio.ensure_future(batcher.run(rows(1, start=i))) for i in range(2)]
    await asyncio.sleep(0.01)
    model.gate.set()
    await asyncio.wait_for(running, timeout=5)
    await asyncio.sleep(0.05)
    assert not any(future.done() for future in during)  # concurrent callers: another is likely on its way
    await asyncio.wait_for(asyncio.gather(*during, batcher.run(rows(1))), timeout=5)
    assert model.batches == [1, 3]
    await batcher.close()


def test_expected_rows_is_the_target_or_one_more_than_arrived_during_a_run() -> None:
    policy = BatchSettings(max_batch_size=8, max_delay_ms=10)
    assert expected_rows(policy, target_rows=4, rows_during_run=0) == 4
    assert expected_rows(policy, target_rows=1, rows_during_run=2) == 3  # two came during the run
    assert expected_rows(policy, target_rows=1, rows_during_run=0) == 1
    assert expected_rows(policy, target_rows=20, rows_during_run=9) == 8  # at most a full batch


def test_the_target_grows_while_rows_come_and_falls_to_what_came_when_a_wait_runs_out() -> None:
    policy = BatchSettings(max_batch_size=8, max_delay_ms=10)
    # target, rows of the batch, how its wait ended, whether the target may grow now
    assert next_target_rows(policy, 4, 4, "filled", may_grow=True) == 5  # they came in time: try for one more
    assert next_target_rows(policy, 4, 6, "none", may_grow=True) == 7  # more than expected were there already
    assert next_target_rows(policy, 5, 3, "ran_out", may_grow=True) == 3  # only 3 came within the delay
    assert next_target_rows(policy, 3, 3, "filled", may_grow=False) == 3  # holding: no more than came
    assert next_target_rows(policy, 3, 5, "none", may_grow=False) == 5  # ... but never fewer
    assert next_target_rows(policy, 8, 8, "filled", may_grow=True) == 8  # at most a full batch
    assert next_target_rows(policy, 2, 0, "ran_out", may_grow=True) == 1  # all of it expired: still 1


def test_growth_holds_after_a_wait_one_row_short_not_after_a_stall() -> None:
    assert holds_growth(target_rows=5, rows=4, outcome="ran_out")  # tried for one caller more than there are
    assert holds_growth(target_rows=2, rows=1, outcome="ran_out")  # a lone caller
    assert not holds_growth(target_rows=9, rows=2, outcome="ran_out")  # the server stalled: grow back at once
    assert not holds_growth(target_rows=5, rows=5, outcome="filled")
    assert not holds_growth(target_rows=5, rows=7, outcome="none")


async def test_requests_arriving_during_a_run_form_the_next_batch() -> None:
    model = FakeModel()
    batcher = await started(BatchSettings(max_batch_size=64, max_delay_ms=0), model)
    first = await blocked_run(model, batcher, rows(1))
    later = [asyncio.ensure_future(batcher.run(rows(1, start=i))) for i in range(10)]
    await asyncio.sleep(0.05)
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *later), timeout=5)
    assert model.batches == [1, 10]
    await batcher.close()


async def test_row_counts_measured_fast_run_on_the_event_loop_thread() -> None:
    model = FakeModel()  # runs in microseconds: far below the minute allowed inline, however loaded the machine
    batcher = await started(BatchSettings(max_batch_size=8, max_delay_ms=0, inline_max_ms=60_000), model)
    for count in (2, 2, 2, 3, 3):
        await asyncio.wait_for(batcher.run(rows(count)), timeout=5)
    loop_thread = threading.get_ident()
    # Each row count's first run goes to the thread (nothing known about it yet); later ones stay inline.
    assert [thread == loop_thread for thread in model.threads] == [False, True, True, False, True]
    await batcher.close()


@pytest.mark.parametrize(("inline_max_ms", "run_ms"), [(0, 0), (5, 30)])
async def test_inline_off_or_slow_runs_stay_in_the_thread(inline_max_ms: float, run_ms: float) -> None:
    model = FakeModel()

    def run(x: np.ndarray) -> Sequence[np.ndarray]:
        time.sleep(run_ms / 1000)
        return model.run(x)

    batcher = Batcher("decoder", run, BatchSettings(max_batch_size=8, max_delay_ms=0, inline_max_ms=inline_max_ms))
    batcher.start()
    for _ in range(3):
        await asyncio.wait_for(batcher.run(rows(1)), timeout=5)
    assert len(model.threads) == 3 and threading.get_ident() not in model.threads
    await batcher.close()


async def test_a_large_request_is_split_into_chunks_of_max_batch_size() -> None:
    model = FakeModel()
    batcher = await started(BatchSettings(max_batch_size=4, max_delay_ms=0), model)
    x = rows(10)
    doubled, sums = await asyncio.wait_for(batcher.run(x), timeout=5)
    assert sorted(model.batches) == [2, 4, 4]
    np.testing.assert_array_equal(doubled, x * 2.0)
    np.testing.assert_array_equal(sums, x.sum(axis=1))
    await batcher.close()


async def test_full_queue_refuses_with_overloaded() -> None:
    model = FakeModel()
    policy = BatchSettings(max_batch_size=8, max_delay_ms=5000, max_queue_rows=8, max_queue_share=1.0)
    batcher = await started(policy, model)
    running = await hold_worker(batcher, model)
    waiting = asyncio.ensure_future(batcher.run(rows(6)))
    await asyncio.sleep(0)
    assert batcher.queued_rows == 6
    with pytest.raises(Overloaded, match="queue holds 6 rows and takes at most 8"):
        await batcher.run(rows(3))
    fits = asyncio.ensure_future(batcher.run(rows(2)))  # fits exactly: fills the next batch
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(running, waiting, fits), timeout=5)
    assert model.batches == [1, 8]
    await batcher.close()


async def test_cancelled_requests_are_dropped_before_running() -> None:
    model = FakeModel()
    batcher = await started(BatchSettings(max_batch_size=8, max_delay_ms=50), model)
    running = await hold_worker(batcher, model)
    gone = asyncio.ensure_future(batcher.run(rows(3)))
    await asyncio.sleep(0)
    gone.cancel()
    stays = asyncio.ensure_future(batcher.run(rows(1)))
    await asyncio.sleep(0)
    model.gate.set()
    await asyncio.wait_for(running, timeout=5)
    (doubled, _) = await asyncio.wait_for(stays, timeout=5)
    assert model.batches == [1, 1]
    np.testing.assert_array_equal(doubled, rows(1) * 2.0)
    await batcher.close()


async def test_requests_past_their_deadline_are_dropped_before_running() -> None:
    model = FakeModel()
    batcher = await started(BatchSettings(max_batch_size=8, max_delay_ms=50), model)
    loop = asyncio.get_running_loop()
    running = await hold_worker(batcher, model)
    late = asyncio.ensure_future(batcher.run(rows(2), deadline=loop.time() + 0.01))
    await asyncio.sleep(0.05)  # the deadline passes while the worker is busy
    model.gate.set()
    with pytest.raises(DeadlineExceeded, match="deadline passed"):
        await asyncio.wait_for(late, timeout=5)
    await running
    assert model.batches == [1]
    await batcher.close()


async def test_a_failing_run_fails_every_request_of_its_batch_only() -> None:
    calls = []

    def flaky(x: np.ndarray) -> Sequence[np.ndarray]:
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return [x]

    batcher = Batcher("decoder", flaky, BatchSettings(max_batch_size=2, max_delay_ms=1000))
    batcher.start()
    results = await asyncio.gather(batcher.run(rows(1)), batcher.run(rows(1)), return_exceptions=True)
    assert [type(r) for r in results] == [RuntimeError, RuntimeError]
    (again,) = await asyncio.wait_for(asyncio.gather(batcher.run(rows(2))), timeout=5)
    np.testing.assert_array_equal(again[0], rows(2))
    await batcher.close()


async def test_close_fails_queued_requests_with_not_ready() -> None:
    model = FakeModel()
    batcher = await started(BatchSettings(max_batch_size=8, max_delay_ms=5000), model)
    waiting = asyncio.ensure_future(batcher.run(rows(1)))
    await asyncio.sleep(0)
    await batcher.close()
    with pytest.raises(NotReady):
        await waiting
    with pytest.raises(NotReady):
        await batcher.run(rows(1))


def test_policy_rejects_a_queue_smaller_than_a_batch_and_negative_times() -> None:
    with pytest.raises(ValueError, match="max_queue_rows"):
        BatchSettings(max_batch_size=64, max_queue_rows=8)
    with pytest.raises(ValueError, match="inline_max_ms"):
        BatchSettings(inline_max_ms=-1)


def run_as(caller: str, batcher: Batcher, x: np.ndarray) -> asyncio.Future[tuple[np.ndarray, ...]]:
    """`batcher.run(x)` in a task of its own, for `caller` (as the transport names a call's connection)."""
    token = CALLER.set(caller)
    try:
        return asyncio.ensure_future(batcher.run(x))  # the task copies the context, caller included
    finally:
        CALLER.reset(token)


async def test_a_small_request_does_not_wait_behind_another_caller_s_bulk() -> None:
    model = FakeModel()
    batcher = await started(BatchSettings(max_batch_size=8, max_delay_ms=0, max_queue_rows=64), model)
    running = await hold_worker(batcher, model)
    bulk = run_as("bulk", batcher, rows(32))  # four full batches
    await asyncio.sleep(0)
    cheap = run_as("cheap", batcher, rows(1, start=500.0))
    await asyncio.sleep(0)
    model.gate.set()
    (doubled, _) = await asyncio.wait_for(cheap, timeout=5)
    np.testing.assert_array_equal(doubled, rows(1, start=500.0) * 2.0)
    await asyncio.wait_for(asyncio.gather(running, bulk), timeout=5)
    # the held run, one of the bulk's batches, then the cheap row: its turn came before the rest of the bulk
    assert model.batches[:3] == [1, 8, 1] and model.batches[3:] == [8, 8, 8]
    await batcher.close()


async def test_one_connection_may_hold_only_its_share_of_the_queue() -> None:
    model = FakeModel()
    policy = BatchSettings(max_batch_size=8, max_delay_ms=5000, max_queue_rows=16, max_queue_share=0.5)
    batcher = await started(policy, model)
    running = await hold_worker(batcher, model)
    first = run_as("greedy", batcher, rows(12))  # more than its share, but it held nothing: let in
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match=r"this connection has 12 rows queued .* at most 8 of the 16"):
        await run_as("greedy", batcher, rows(1))
    other = run_as("other", batcher, rows(4))  # another connection's rows still fit
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(running, first, other), timeout=5)
    await batcher.close()
