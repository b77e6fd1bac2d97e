"""The rows waiting for one graph, kept per caller and taken round-robin, so no caller starves the others.

A batcher's queue used to be one line: a client with eight requests of 1,024 rows put 128 batches ahead of a
one-row request that came after them. Here each caller (the connection a call came on,
`serving.dataplane.admission.CALLER`) has a line of its own, and a batch takes the head of each line in turn:
a one-row request waits for at most the batch running and one more, whatever the others have queued.

Each caller may hold at most `share` of the queue's rows (a request that alone is larger is still let in
when the caller holds nothing else), so one caller filling the queue cannot make the others' requests
RESOURCE_EXHAUSTED. Both refusals come at once, before anything runs.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field

import numpy as np

from serving.errors import DeadlineExceeded, Overloaded
from serving.tracing import Traced

Outputs = tuple[np.ndarray, ...]


@dataclass(eq=False)
class QueuedRows:
    """One request's rows (or one chunk of them) waiting to run."""

    rows: np.ndarray
    future: asyncio.Future[Outputs]
    enqueued_at: float  # loop.time()
    deadline: float | None  # loop.time() after which the result is useless
    caller: str = ""
    traced: Traced | None = None  # the request's span and when its rows queued (tracing on)
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(self.rows)


class FairQueue:
    """Rows waiting per caller: at most `max_rows` in all, at most `share` of them per caller."""

    def __init__(self, graph: str, max_rows: int, share: float) -> None:
        self.graph = graph
        self.max_rows = max_rows
        self.caller_rows = max(1, int(share * max_rows))
        self.rows = 0
        self._lines: dict[str, collections.deque[QueuedRows]] = {}  # insertion order: whose turn is next
        self._rows_of: collections.Counter[str] = collections.Counter()

    def __bool__(self) -> bool:
        return self.rows > 0

    def admit(self, caller: str, rows: int) -> None:
        """Raise Overloaded when `rows` more rows from `caller` would exceed the queue or the caller's share."""
        if self.rows + rows > self.max_rows:
            raise Overloaded(
                f"server busy: the {self.graph} queue holds {self.rows} rows and takes at most {self.max_rows}; "
                "retry with backoff or send smaller requests"
            )
        held = self._rows_of[caller]
        if held and held + rows > self.caller_rows:
            raise Overloaded(
                f"server busy: this connection has {held} rows queued for the {self.graph} and one connection may "
                f"hold at most {self.caller_rows} of the {self.max_rows}; wait for its requests before sending more"
            )

    def push(self, item: QueuedRows) -> None:
        self._lines.setdefault(item.caller, collections.deque()).append(item)
        self._rows_of[item.caller] += item.size
        self.rows += item.size

    def oldest(self) -> float:
        """When the longest-waiting request at the head of a line was queued (loop time); the queue is not empty."""
        return min(line[0].enqueued_at for line in self._lines.values())

    def take(self, max_rows: int, now: float) -> list[QueuedRows]:
        """A batch of whole items, at most `max_rows` rows, one line's head after another; cancelled items are
        dropped and expired ones failed with DeadlineExceeded on the way."""
        batch: list[QueuedRows] = []
        rows = 0
        progress = True
        while progress and rows < max_rows:
            progress = False
            for caller in list(self._lines):
                item = self._next(caller, now)
                if item is None or rows + item.size > max_rows:
                    continue
                self._pop(caller)
                batch.append(item)
                rows += item.size
                progress = True
                if caller in self._lines:  # its turn is over: to the back of the round
                    self._lines[caller] = self._lines.pop(caller)
        return batch

    def drain(self) -> list[QueuedRows]:
        """Everything queued, oldest line first; the queue is empty after."""
        items = [item for line in self._lines.values() for item in line]
        self._lines.clear()
        self._rows_of.clear()
        self.rows = 0
        return items

    def _next(self, caller: str, now: float) -> QueuedRows | None:
        """The head of `caller`'s line that still wants to run, after dropping those that do not."""
        line = self._lines.get(caller)
        while line:
            item = line[0]
            if item.future.done():  # cancelled: the caller went away
                self._pop(caller)
            elif item.deadline is not None and now >= item.deadline:
                self._pop(caller)
                item.future.set_exception(DeadlineExceeded("the deadline passed while the request waited in the queue"))
            else:
                return item
            line = self._lines.get(caller)
        return None

    def _pop(self, caller: str) -> None:
        line = self._lines[caller]
        item = line.popleft()
        self.rows -= item.size
        self._rows_of[caller] -= item.size
        if not line:
            del self._lines[caller]
            del self._rows_of[caller]
