"""Monitoring of the serving gateway: Prometheus metrics, the request log, feedback capture.

    from evertune.monitoring import metrics_router, list_requests
    app.include_router(metrics_router())     # GET /metrics
    list_requests(ws, limit=20)              # newest logged requests (what `evertune logs` shows)

- `metrics.py`: `ServingMetrics` (own CollectorRegistry), `METRICS`, `metrics_router()`.
- `request_log.py`: the `request_log` table, `RequestLog` (sampled, redacted, async writes),
  `list_requests`, `get_request`.
- `redact.py`: `redact`, `DEFAULT_REDACTORS` (e-mail addresses, phone numbers).
- `feedback.py`: `build_record`, `write_feedback` (bucket prefix `feedback/`).
"""

from evertune.monitoring.feedback import build_record, write_feedback
from evertune.monitoring.metrics import METRICS, ServingMetrics, metrics_router
from evertune.monitoring.redact import DEFAULT_REDACTORS, Redactor, redact
from evertune.monitoring.request_log import (
    LoggedRequest,
    RequestLog,
    get_request,
    list_requests,
    request_log,
)

__all__ = [
    "DEFAULT_REDACTORS",
    "METRICS",
    "LoggedRequest",
    "Redactor",
    "RequestLog",
    "ServingMetrics",
    "build_record",
    "get_request",
    "list_requests",
    "metrics_router",
    "redact",
    "request_log",
    "write_feedback",
]
