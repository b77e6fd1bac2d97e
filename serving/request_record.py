"""What every finished request leaves behind, whichever transport took it: its metrics and its log line.

The gRPC interceptor (each call, and each ModelStreamInfer message) and the REST routes (each request) end
every request here, so both protocols count and log the same way: `vae_requests_total`, the duration (with the
request's trace as exemplar when it is sampled) and items histograms, and with `--log-requests` one JSON line
(`event: request`) whose `trace_id`, `span_id` and `request_id` the log formatter adds from the request's
context (`serving.tracing.log_fields`).
"""

from __future__ import annotations

import logging

from serving.metrics import Metrics
from serving.tracing import OFF, Tracing, current_exemplar

log = logging.getLogger(__name__)


class RequestRecord:
    """Ends requests: their metrics, and their log line when `log_requests`."""

    def __init__(self, metrics: Metrics, log_requests: bool = False, tracing: Tracing = OFF) -> None:
        self.metrics = metrics
        self.log_requests = log_requests
        self.tracing = tracing

    def finished(
        self, method: str, protocol: str, code: str, version: str, duration_s: float, items: int | None
    ) -> None:
        """One request done: `code` its status name (gRPC's, for both protocols), `version` the one that served
        it ("" when none did), `items` the images or latents its reply carried (None: not counted)."""
        exemplar = current_exemplar() if self.tracing.enabled else None
        self.metrics.request_finished(method, code, version, duration_s, items, protocol, exemplar)
        if self.log_requests:
            fields = {
                "method": method, "protocol": protocol, "code": code, "version": int(version) if version else None,
                "duration_ms": round(duration_s * 1000, 3), "items": items,
            }  # fmt: skip
            log.info("request", extra={"fields": fields})
