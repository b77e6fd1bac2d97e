"""The one map from what went wrong while handling an RPC to the gRPC status code and message the caller gets.

Unexpected exceptions become INTERNAL with a generic message: no stack trace leaves the server (the
interceptor logs it instead).
"""

from __future__ import annotations

import grpc

from serving.api.tensors import WireFormatError
from serving.errors import INTERNAL_MESSAGE, DeadlineExceeded, InvalidRequest, NotFound, NotReady, Overloaded

_CODES: dict[type[Exception], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    WireFormatError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# A call cancelled this close to its deadline (or past it) counts as DEADLINE_EXCEEDED, not CANCELLED. The
# server's deadline is the client's timeout counted from when the request arrived, so it lags the client's
# own deadline by the request's transit: a client whose deadline passed cancels the call a little before
# the server's clock reaches it. One network transit on a loaded machine is well under this.
DEADLINE_TRANSIT_SECONDS = 0.005


# The generated servicer's default for a method of the contract this server does not implement.
UNIMPLEMENTED_MESSAGE = "this server does not implement the method: it is older than the contract the client uses"


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and caller-facing message for an exception raised while handling a request."""
    if isinstance(error, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, UNIMPLEMENTED_MESSAGE
    for kind, code in _CODES.items():
        if isinstance(error, kind):
            return code, str(error)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def is_unexpected(error: BaseException) -> bool:
    """Whether `error` is none of the failures above: a bug, logged with its stack trace on the server."""
    return not isinstance(error, (NotImplementedError, *_CODES))


def cancelled_status(time_remaining_s: float | None) -> grpc.StatusCode:
    """Why gRPC cancelled a handler: its deadline passed (DEADLINE_EXCEEDED) or the caller left (CANCELLED).

    `time_remaining_s` is the call's `context.time_remaining()` when the cancellation arrived.
    """
    expired = time_remaining_s is not None and time_remaining_s < DEADLINE_TRANSIT_SECONDS
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
