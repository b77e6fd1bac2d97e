"""What the process does in the background while it serves: readiness that follows saturation, and freed heap
handed back to the operating system after a burst."""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from serving.api import SERVICE_NAME
from serving.dataplane.admission import Admission
from serving.dataplane.runtime import release_freed_memory

log = logging.getLogger(__name__)

READINESS_LOOK_SECONDS = 0.5  # how often readiness looks at whether a call could be admitted
MEMORY_LOOK_SECONDS = 2.0  # how often the memory release looks for a burst that has ended
BURST_REQUEST_BYTES = 8 * 1024 * 1024  # request bytes held at once that make a burst worth a release after it


async def follow_saturation(health: health_aio.HealthServicer, admission: Admission) -> None:
    """Readiness (VaeService's health status) says whether the server can take a call: NOT_SERVING once every
    call slot has been taken at two looks in a row, SERVING again at the first look with room. The process's
    own status ("", what liveness asks) stays SERVING: a saturated server is busy, not broken. A drain's
    NOT_SERVING wins: the health servicer ignores changes once it is shutting down."""
    serving, full_looks = True, 0
    while True:
        await asyncio.sleep(READINESS_LOOK_SECONDS)
        full_looks = full_looks + 1 if admission.saturated else 0
        if (full_looks < 2) != serving:
            serving = not serving
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            await health.set(SERVICE_NAME, status)
            fields = {"serving": serving, "calls_running": admission.calls.in_use, "limit": admission.calls.limit}
            log.warning("readiness_changed", extra={"fields": fields})


async def release_memory_after_bursts(admission: Admission) -> None:
    """Once a burst of large requests is over (no call running; at its peak the calls held at least
    BURST_REQUEST_BYTES of requests), give the freed heap back (`release_freed_memory`, in a thread).

    The C library keeps what the burst's arrays freed for later allocations, so the process would stay at its
    peak resident size after every burst: the pod's memory limit would have to fit the peak for ever.
    """
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(MEMORY_LOOK_SECONDS)
        if admission.calls.in_use == 0 and admission.request_bytes.reset_peak() >= BURST_REQUEST_BYTES:
            await loop.run_in_executor(None, release_freed_memory)
