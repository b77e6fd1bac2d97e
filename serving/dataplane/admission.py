"""Admission: what the server lets in, counted over the whole server and per caller.

- `Slots`: at most N calls of a kind at once (RPCs with their request, SampleStreams); beyond, Overloaded.
- `ByteBudget`: the request bytes the admitted calls hold, at most N at once; a request beyond it is refused
  before it is parsed.
- `PendingRequests`: calls whose request message has not arrived yet. They take no slot that complete calls
  need; each waits at most a receive timeout, and when too many wait, the one that has waited longest goes.
- `Drain`: the calls accepted and not finished, over every transport; a drain refuses new ones and waits.
- `CALLER`: who the running call is for (the transport sets it per call), so that the batchers can share
  their queues fairly between callers.

The counts are shared by every engine the server runs, so a limit holds however many versions are loaded:
it bounds what the process does, not what one version does. All of it runs on the event loop, unlocked.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

from contract.settings import check_settings, setting
from serving.errors import DeadlineExceeded, NotReady, Overloaded

T = TypeVar("T")

# The caller of the running call: the transport sets it (a peer's connection, e.g. "ipv4:10.0.0.7:51234").
# "" where nobody set it (unit tests, the server's own work such as scoring Encode's inputs after the reply).
CALLER: ContextVar[str] = ContextVar("vae_caller", default="")


class Slots:
    """At most `limit` holders at once, and at most `per_caller` of them for one caller (`CALLER`);
    `hold()` beyond either raises Overloaded (RESOURCE_EXHAUSTED)."""

    def __init__(self, limit: int, what: str, per_caller: int | None = None) -> None:
        self.limit = limit
        self.what = what  # e.g. "SampleStream calls", for the caller's message
        self.per_caller = per_caller or limit
        self.in_use = 0
        self._held_by: collections.Counter[str] = collections.Counter()

    @property
    def full(self) -> bool:
        return self.in_use >= self.limit

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """One slot for the duration of the block; Overloaded at once when none is free."""
        if self.full:
            raise Overloaded(
                f"server busy: {self.in_use} {self.what} are running and this server runs at most {self.limit} at "
                "once; retry with backoff"
            )
        caller = CALLER.get()
        if self._held_by[caller] >= self.per_caller:
            raise Overloaded(
                f"server busy: this connection runs {self._held_by[caller]} {self.what} and one connection may run "
                f"at most {self.per_caller} of the server's {self.limit}; wait for one to end"
            )
        self.in_use += 1
        self._held_by[caller] += 1
        try:
            yield
        finally:
            self.in_use -= 1
            self._held_by[caller] -= 1
            if not self._held_by[caller]:
                del self._held_by[caller]


class ByteBudget:
    """Bytes held at once, at most `limit`: `hold(n)` beyond it raises Overloaded.

    One request is always admitted when nothing else is held, however large (the message size limit bounds
    it), so a budget smaller than the largest message cannot refuse everything.
    """

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what  # e.g. "request bytes"
        self.in_use = 0
        self.peak = 0  # the most held at once since `reset_peak` (a burst, for giving memory back after it)

    def reset_peak(self) -> int:
        """The peak since the last reset; the peak starts again from what is held now."""
        peak, self.peak = self.peak, self.in_use
        return peak

    @contextlib.contextmanager
    def hold(self, size: int) -> Iterator[None]:
        if self.in_use and self.in_use + size > self.limit:
            raise Overloaded(
                f"server busy: the calls running hold {self.in_use} {self.what} and this server holds at most "
                f"{self.limit} at once; this request has {size}: retry with backoff or send smaller requests"
            )
        self.in_use += size
        self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            self.in_use -= size


@dataclass(eq=False)
class _Waiting:
    """One call waiting for its message: the timeout that ends the wait, and whether it was pushed out."""

    timeout: asyncio.Timeout | None = None
    evicted: bool = False


class PendingRequests:
    """Calls waiting for their request message: each at most `timeout_s`, at most `limit` of them at once.

    A call that has not sent its message takes none of the slots complete calls need, but it holds an HTTP/2
    stream and a little memory, so the wait is bounded twice: in time, and in number. When `limit` calls wait,
    a newcomer pushes out the longest-waiting call of the caller that has the most of them waiting: a client's
    real message arrives within milliseconds, so the calls that sit are those of a caller that never sends,
    and one such caller cannot push out the others' calls. The wait is an `asyncio.timeout` around the read,
    in the call's own task (no task or future more per call: this is on every call's path).
    """

    def __init__(self, limit: int, timeout_s: float) -> None:
        self.limit = limit
        self.timeout_s = timeout_s
        self.waiting = 0
        self._by_caller: dict[str, dict[_Waiting, None]] = {}  # oldest first

    async def receive(self, read: Callable[[], Awaitable[T]], caller: str) -> T:
        """`await read()` (the call's request message) within the timeout, unless pushed out meanwhile.

        Raises DeadlineExceeded after the timeout and Overloaded when pushed out; either way the read is cancelled.
        """
        if self.waiting >= self.limit:
            self._evict()
        entry = _Waiting()
        self._by_caller.setdefault(caller, {})[entry] = None
        self.waiting += 1
        try:
            async with asyncio.timeout(self.timeout_s) as timeout:
                entry.timeout = timeout
                return await read()
        except TimeoutError:
            if entry.evicted:
                raise Overloaded(
                    f"the request message had not arrived while {self.limit} calls waited for theirs, the most "
                    "this server holds, and this connection had the most of them: send the message with the call"
                ) from None
            raise DeadlineExceeded(
                f"the request message did not arrive within {self.timeout_s:g} s of the call's start "
                "(--request-receive-timeout-seconds)"
            ) from None
        finally:
            self._forget(caller, entry)

    def _evict(self) -> None:
        """Push out the longest-waiting call of the caller with the most calls waiting (its timeout, now)."""
        caller = max(self._by_caller, key=lambda name: len(self._by_caller[name]))
        oldest = next(iter(self._by_caller[caller]))
        self._forget(caller, oldest)
        oldest.evicted = True
        if oldest.timeout is not None:
            oldest.timeout.reschedule(asyncio.get_running_loop().time())

    def _forget(self, caller: str, entry: _Waiting) -> None:
        """No longer waiting (its message came, its time ran out, or it was pushed out); once only."""
        waiting = self._by_caller.get(caller)
        if waiting is None or entry not in waiting:
            return
        del waiting[entry]
        self.waiting -= 1
        if not waiting:
            del self._by_caller[caller]


class Drain:
    """The calls the server accepted and has not finished, over every transport: a drain refuses new ones
    (`accepting` False: UNAVAILABLE) and waits for these."""

    def __init__(self) -> None:
        self.accepting = True
        self.running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def check_accepting(self) -> None:
        """NotReady once the drain has begun."""
        if not self.accepting:
            raise NotReady("the server is shutting down and accepts no new requests; retry on another replica")

    def started(self) -> None:
        self.running += 1
        self._idle.clear()

    def finished(self) -> None:
        self.running -= 1
        if self.running == 0:
            self._idle.set()

    async def close(self, timeout_s: float) -> bool:
        """Refuse new calls; wait until every accepted one has finished (True) or `timeout_s` passed (False)."""
        self.accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


@dataclass(frozen=True)
class AdmissionSettings:
    """What the server lets in at once, and how long a call may take to send its request."""

    max_concurrent_rpcs: int = setting(
        1000,
        "calls with their request running at once (VaeService's and the Open Inference Protocol's; each "
        "ModelStreamInfer request counts as one), at most; beyond it RESOURCE_EXHAUSTED (a call waiting for its "
        "message takes no slot)",
        minimum=1,
        metavar="N",
    )
    request_receive_timeout_seconds: float = setting(
        10.0,
        "how long a call may take to send its request message after it starts; then DEADLINE_EXCEEDED",
        above=0,
        metavar="S",
    )
    max_pending_requests: int = setting(
        1000,
        "calls waiting for their request message at once, at most; beyond it the connection holding the most of "
        "them loses its longest-waiting one (RESOURCE_EXHAUSTED)",
        minimum=1,
        metavar="N",
    )
    max_request_bytes_in_flight: int = setting(
        64 * 1024 * 1024,
        "request message bytes the running calls hold at once, at most; a request beyond it gets "
        "RESOURCE_EXHAUSTED before it is parsed (one request is always let in)",
        minimum=1,
        metavar="BYTES",
        shown_default="67108864 (64 MiB)",
    )

    max_stream_requests_in_flight: int = setting(
        16,
        "ModelStreamInfer requests one stream runs at once, at most; the stream reads no further message until "
        "one finishes",
        minimum=1,
        metavar="N",
    )

    def __post_init__(self) -> None:
        check_settings(self)

    def build(self) -> Admission:
        """The admission state these settings describe, for one server."""
        return Admission(
            PendingRequests(self.max_pending_requests, self.request_receive_timeout_seconds),
            Slots(self.max_concurrent_rpcs, "calls"),
            ByteBudget(self.max_request_bytes_in_flight, "request bytes"),
        )


@dataclass(frozen=True)
class Admission:
    """What a call passes on its way in: the drain, its message within the receive bound, a call slot, request
    bytes. One for the whole server: every transport's calls count against the same limits."""

    pending: PendingRequests
    calls: Slots  # calls with their request, running (--max-concurrent-rpcs)
    request_bytes: ByteBudget  # their request messages' bytes (--max-request-bytes-in-flight)
    drain: Drain = field(default_factory=lambda: Drain())

    @property
    def saturated(self) -> bool:
        """Whether a new call would be refused now for want of a slot (readiness reports it)."""
        return self.calls.full
