"""The one map from what went wrong while handling a REST request to its HTTP status, the status-code name the
metrics count it under (the gRPC name, so that both protocols share the dashboards and alerts), and the
message the caller gets. Unexpected exceptions are 500 with a generic message: no stack trace leaves the
server."""

from __future__ import annotations

from serving.errors import INTERNAL_MESSAGE, DeadlineExceeded, InvalidRequest, NotFound, NotReady, Overloaded

_STATUSES: dict[type[Exception], tuple[int, str]] = {
    InvalidRequest: (400, "INVALID_ARGUMENT"),
    NotFound: (404, "NOT_FOUND"),
    Overloaded: (429, "RESOURCE_EXHAUSTED"),
    NotReady: (503, "UNAVAILABLE"),
    DeadlineExceeded: (504, "DEADLINE_EXCEEDED"),
}


def http_status(error: BaseException) -> tuple[int, str, str]:
    """(HTTP status, status-code name for the metrics, message) for an exception raised by a handler."""
    for kind, (status, code) in _STATUSES.items():
        if isinstance(error, kind):
            return status, code, str(error)
    return 500, "INTERNAL", INTERNAL_MESSAGE
