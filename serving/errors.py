"""Failures a caller can act on, and the one place that maps them to gRPC status codes.

The model layer raises these plain exceptions (it knows nothing of gRPC); `status_for` turns any exception
into a (code, message) pair for the servicer. Unexpected exceptions become INTERNAL with a generic message:
no stack trace leaves the server (it is logged instead).
"""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """Base class: the message is meant for the caller and says what was wrong and what is allowed."""


class InvalidRequest(ServingError):
    """The request is malformed or out of range (INVALID_ARGUMENT)."""


class Overloaded(ServingError):
    """The batching queue is full; retry later or send smaller requests (RESOURCE_EXHAUSTED)."""


class NotReady(ServingError):
    """The server is starting or draining and takes no new requests (UNAVAILABLE)."""


class DeadlineExceeded(ServingError):
    """The request's deadline passed before it ran (DEADLINE_EXCEEDED)."""


_CODES: dict[type[ServingError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

INTERNAL_MESSAGE = "internal error while running the model (logged on the server)"


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and caller-facing message for an exception raised while handling a request."""
    for kind, code in _CODES.items():
        if isinstance(error, kind):
            return code, str(error)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
