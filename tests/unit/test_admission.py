"""Admission: call slots (over the server and per caller), request bytes, and calls waiting for their message."""

from __future__ import annotations

import asyncio

import pytest

from serving.dataplane.admission import CALLER, ByteBudget, PendingRequests, Slots
from serving.errors import DeadlineExceeded, Overloaded


def test_slots_bound_the_server_and_each_caller() -> None:
    slots = Slots(3, "streams", per_caller=2)
    one_caller = "this connection runs 2 streams and one connection may run at most 2"
    with slots.hold(), slots.hold():
        with pytest.raises(Overloaded, match=one_caller), slots.hold():
            pass
        token = CALLER.set("another")
        try:
            with slots.hold():
                assert slots.full
                with (
                    pytest.raises(Overloaded, match="3 streams are running and this server runs at most 3"),
                    slots.hold(),
                ):
                    pass
        finally:
            CALLER.reset(token)
    assert slots.in_use == 0


def test_a_byte_budget_always_lets_one_request_in_and_keeps_its_peak() -> None:
    budget = ByteBudget(100, "request bytes")
    too_many = "hold 150 request bytes and this server holds at most 100"
    with budget.hold(150), pytest.raises(Overloaded, match=too_many), budget.hold(1):  # alone, 150 was let in
        pass
    with budget.hold(60), budget.hold(40):
        pass
    assert budget.in_use == 0 and budget.reset_peak() == 150 and budget.reset_peak() == 0


async def test_a_message_that_never_comes_ends_the_wait_after_the_timeout() -> None:
    pending = PendingRequests(limit=10, timeout_s=0.05)
    with pytest.raises(DeadlineExceeded, match=r"did not arrive within 0\.05 s"):
        await pending.receive(lambda: asyncio.Event().wait(), "a")
    assert pending.waiting == 0


async def test_a_message_that_comes_is_returned() -> None:
    pending = PendingRequests(limit=10, timeout_s=60)

    async def message() -> bytes:
        await asyncio.sleep(0)
        return b"request"

    assert await pending.receive(message, "a") == b"request" and pending.waiting == 0


async def test_when_full_the_caller_with_the_most_waiting_loses_its_oldest() -> None:
    pending = PendingRequests(limit=4, timeout_s=60)
    never = asyncio.Event()
    hog = [asyncio.ensure_future(pending.receive(never.wait, "hog")) for _ in range(3)]
    other = asyncio.ensure_future(pending.receive(never.wait, "other"))
    await asyncio.sleep(0)
    assert pending.waiting == 4
    newcomer = asyncio.ensure_future(pending.receive(never.wait, "newcomer"))  # the hog's first call goes
    await asyncio.sleep(0.01)
    assert hog[0].done() and not any(call.done() for call in (*hog[1:], other, newcomer))
    with pytest.raises(Overloaded, match="this connection had the most of them"):
        hog[0].result()
    for call in (*hog[1:], other, newcomer):
        call.cancel()
    await asyncio.gather(*hog[1:], other, newcomer, return_exceptions=True)
    assert pending.waiting == 0
