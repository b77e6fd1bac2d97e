"""Admission: how many calls of a kind may run at once, counted over the whole server.

A `Slots` is shared by every engine the server runs, so a limit holds however many versions are loaded (two
during a swap, N with `latest:N`): it bounds what the process does, not what one version does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from serving.errors import Overloaded


class Slots:
    """At most `limit` holders at once; `hold()` beyond it raises Overloaded (RESOURCE_EXHAUSTED)."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what  # e.g. "SampleStream calls", for the caller's message
        self.in_use = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """One slot for the duration of the block; Overloaded at once when none is free."""
        if self.in_use >= self.limit:
            raise Overloaded(
                f"server busy: {self.in_use} {self.what} are running and this server runs at most {self.limit} at "
                "once; retry with backoff"
            )
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
