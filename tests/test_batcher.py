"""The dynamic batcher on its own, with a fake model: merging, splitting, back-pressure, dropping."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from serving.batcher import Batcher, BatchPolicy
from serving.errors import DeadlineExceeded, NotReady, Overloaded


class FakeModel:
    """Doubles its input and records the rows of every run; `gate` can hold runs until a test releases them."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def run(self, rows: np.ndarray) -> Sequence[np.ndarray]:
        self.gate.wait(timeout=10)
        self.batches.append(len(rows))
        return [rows * 2.0, rows.sum(axis=1)]


class Recorder:
    def __init__(self) -> None:
        self.runs: list[tuple[int, int]] = []  # (rows, requests)
        self.depths: list[int] = []

    def queue_depth(self, graph: str, rows: int) -> None:
        self.depths.append(rows)

    def batch_ran(self, graph: str, rows: int, queue_wait_seconds: Sequence[float], inference_seconds: float) -> None:
        self.runs.append((rows, len(queue_wait_seconds)))


def rows(count: int, start: float = 0.0) -> np.ndarray:
    return (np.arange(count * 3, dtype=np.float32) + start).reshape(count, 3)


async def started(policy: BatchPolicy, model: FakeModel, observer: Recorder | None = None) -> Batcher:
    batcher = Batcher("decoder", model.run, policy, observer=observer)
    batcher.start()
    return batcher


async def test_concurrent_requests_are_merged_into_one_run_and_split_back() -> None:
    model, recorder = FakeModel(), Recorder()
    batcher = await started(BatchPolicy(max_batch_size=8, max_delay_ms=5000), model, recorder)
    inputs = [rows(1, start=10.0 * i) for i in range(5)] + [rows(3, start=100.0)]
    results = await asyncio.wait_for(asyncio.gather(*(batcher.run(x) for x in inputs)), timeout=5)
    assert model.batches == [8]  # filled to max_batch_size: ran at once, without waiting out the delay
    assert recorder.runs == [(8, 6)]
    for x, (doubled, sums) in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(doubled, x * 2.0)
        np.testing.assert_array_equal(sums, x.sum(axis=1))
    await batcher.close()


async def test_a_lone_request_runs_after_max_delay() -> None:
    model = FakeModel()
    batcher = await started(BatchPolicy(max_batch_size=64, max_delay_ms=20), model)
    (doubled, _) = await asyncio.wait_for(batcher.run(rows(2)), timeout=5)
    np.testing.assert_array_equal(doubled, rows(2) * 2.0)
    assert model.batches == [2]
    await batcher.close()


async def test_requests_arriving_during_a_run_form_the_next_batch() -> None:
    model = FakeModel()
    batcher = await started(BatchPolicy(max_batch_size=64, max_delay_ms=0), model)
    model.gate.clear()
    first = asyncio.ensure_future(batcher.run(rows(1)))
    await asyncio.sleep(0.05)  # the first run is now blocked in its thread
    later = [asyncio.ensure_future(batcher.run(rows(1, start=i))) for i in range(10)]
    await asyncio.sleep(0.05)
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *later), timeout=5)
    assert model.batches == [1, 10]
    await batcher.close()


async def test_a_large_request_is_split_into_chunks_of_max_batch_size() -> None:
    model = FakeModel()
    batcher = await started(BatchPolicy(max_batch_size=4, max_delay_ms=0), model)
    x = rows(10)
    doubled, sums = await asyncio.wait_for(batcher.run(x), timeout=5)
    assert sorted(model.batches) == [2, 4, 4]
    np.testing.assert_array_equal(doubled, x * 2.0)
    np.testing.assert_array_equal(sums, x.sum(axis=1))
    await batcher.close()


async def test_full_queue_refuses_with_overloaded() -> None:
    model = FakeModel()
    batcher = await started(BatchPolicy(max_batch_size=8, max_delay_ms=5000, max_queue_rows=8), model)
    waiting = asyncio.ensure_future(batcher.run(rows(6)))
    await asyncio.sleep(0)
    assert batcher.queued_rows == 6
    with pytest.raises(Overloaded, match="queue holds 6 rows and takes at most 8"):
        await batcher.run(rows(3))
    await batcher.run(rows(2))  # fits exactly: fills the batch, and both run
    assert waiting.done() and model.batches == [8]
    await batcher.close()


async def test_cancelled_requests_are_dropped_before_running() -> None:
    model = FakeModel()
    batcher = await started(BatchPolicy(max_batch_size=8, max_delay_ms=50), model)
    gone = asyncio.ensure_future(batcher.run(rows(3)))
    await asyncio.sleep(0)
    gone.cancel()
    (doubled, _) = await asyncio.wait_for(batcher.run(rows(1)), timeout=5)
    assert model.batches == [1]
    np.testing.assert_array_equal(doubled, rows(1) * 2.0)
    await batcher.close()


async def test_requests_past_their_deadline_are_dropped_before_running() -> None:
    model = FakeModel()
    batcher = await started(BatchPolicy(max_batch_size=8, max_delay_ms=50), model)
    loop = asyncio.get_running_loop()
    with pytest.raises(DeadlineExceeded, match="deadline passed"):
        await asyncio.wait_for(batcher.run(rows(2), deadline=loop.time() + 0.01), timeout=5)
    assert model.batches == []
    await batcher.close()


async def test_a_failing_run_fails_every_request_of_its_batch_only() -> None:
    calls = []

    def flaky(x: np.ndarray) -> Sequence[np.ndarray]:
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return [x]

    batcher = Batcher("decoder", flaky, BatchPolicy(max_batch_size=2, max_delay_ms=1000))
    batcher.start()
    results = await asyncio.gather(batcher.run(rows(1)), batcher.run(rows(1)), return_exceptions=True)
    assert [type(r) for r in results] == [RuntimeError, RuntimeError]
    (again,) = await asyncio.wait_for(asyncio.gather(batcher.run(rows(2))), timeout=5)
    np.testing.assert_array_equal(again[0], rows(2))
    await batcher.close()


async def test_close_fails_queued_requests_with_not_ready() -> None:
    model = FakeModel()
    batcher = await started(BatchPolicy(max_batch_size=8, max_delay_ms=5000), model)
    waiting = asyncio.ensure_future(batcher.run(rows(1)))
    await asyncio.sleep(0)
    await batcher.close()
    with pytest.raises(NotReady):
        await waiting
    with pytest.raises(NotReady):
        await batcher.run(rows(1))


def test_policy_rejects_a_queue_smaller_than_a_batch() -> None:
    with pytest.raises(ValueError, match="max_queue_rows"):
        BatchPolicy(max_batch_size=64, max_queue_rows=8)
