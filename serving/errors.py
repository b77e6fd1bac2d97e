"""The failures a caller can act on, as plain exceptions: the data plane raises them and knows no gRPC.

Each message is meant for the caller: it says what was wrong and what is allowed. `serving.grpc.status`
is the one place that turns them into gRPC status codes.
"""

from __future__ import annotations

# What a caller is told of a failure that is none of these (a bug): the detail stays in the server's log.
INTERNAL_MESSAGE = "internal error while running the model (logged on the server)"


class ServingError(Exception):
    """Base class of the failures below."""


class InvalidRequest(ServingError):
    """The request is malformed or out of range (INVALID_ARGUMENT)."""


class NotFound(ServingError):
    """The request names a model version or label that is not served (NOT_FOUND); the message lists what is."""


class Overloaded(ServingError):
    """A queue or a concurrency limit is full; retry later or send smaller requests (RESOURCE_EXHAUSTED)."""


class NotReady(ServingError):
    """The server is starting or draining and takes no new requests (UNAVAILABLE)."""


class DeadlineExceeded(ServingError):
    """The request's deadline passed before it ran (DEADLINE_EXCEEDED)."""


class StartupError(RuntimeError):
    """The server process cannot start (a port is taken, a TLS file is unusable, ...); says which and why."""
