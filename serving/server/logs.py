"""The server's logs: one JSON object per line on stderr (time, level, logger, event, and the event's fields).

A line written while a request runs also names it: the caller's `request_id` (its x-request-id) when it sent
one, and the `trace_id` and `span_id` of its span when it has one (`serving.tracing.log_fields`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from serving.tracing import log_fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, and the record's `fields` extra."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        line.update(log_fields())
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
