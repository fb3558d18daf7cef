"""Webhook notifications: a JSON POST when a version is registered and when a run fails.

    # evertune.yaml
    notify:
      webhook_url: https://hooks.example.com/evertune     # Slack-style incoming webhooks work too

    from evertune import notify
    notify.send(ws, {"event": "model.registered", "model": "assistant", "version": 3})

The body is the event as JSON plus a one-line `text` summary (the field Slack, Mattermost and
Teams incoming webhooks display). Sending never raises and never blocks a run for long: a
short timeout, one attempt, a warning in the log on failure. The pipeline sends from inside a
durable step, so an event may be delivered twice after a crash (at least once); receivers can
de-duplicate on `run_id` + `event`.

Webhook URLs often embed a secret token, so logs name only the scheme and host.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from evertune.workspace import Workspace

log = logging.getLogger("evertune.notify")

TIMEOUT_S = 5.0  # per POST; a slow receiver must not hold a pipeline step
USER_AGENT = "evertune-notify/1"


def send(ws: Workspace, event: dict[str, Any]) -> bool:
    """POST `event` to `notify.webhook_url` if set; True when the receiver answered 2xx."""
    url = ws.config.notify.webhook_url
    if not url:
        return False
    return post(url, event)


def post(url: str, event: dict[str, Any], timeout: float = TIMEOUT_S) -> bool:
    """POST `event` (plus `text` and `sent_at`) as JSON to `url`; never raises."""
    where = _safe(url)
    if urlsplit(url).scheme not in ("http", "https"):
        log.warning("notify.webhook_url %s is not an http(s) URL; no notification sent", where)
        return False
    body = {**event, "text": event.get("text") or summary(event), "sent_at": time.time()}
    request = urllib.request.Request(
        url,
        data=json.dumps(body, default=str).encode("utf-8"),
        headers={"Content-Type": "application/json", "User-Agent": USER_AGENT},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            ok = 200 <= response.status < 300
    except urllib.error.HTTPError as exc:
        log.warning("webhook %s answered HTTP %s to %s", where, exc.code, event.get("event"))
        return False
    except Exception as exc:  # network errors, timeouts, bad TLS: log, never fail the run
        log.warning("webhook %s unreachable for %s: %s", where, event.get("event"), exc)
        return False
    if not ok:
        log.warning("webhook %s answered HTTP %s to %s", where, response.status, event.get("event"))
    return ok


def summary(event: dict[str, Any]) -> str:
    """A one-line human summary of a pipeline event."""
    kind = event.get("event", "event")
    model = event.get("model", "?")
    if kind == "model.registered":
        gate = event.get("gate", "?")
        text = (
            f"Evertune: {model} v{event.get('version')} registered "
            f"({event.get('approval_status')}, gate {gate}) by run {event.get('run_id')}"
        )
        if gate in ("fail", "inconclusive") and event.get("gate_reasons"):
            text += f": {'; '.join(event['gate_reasons'][:3])}"
        return text
    if kind == "run.failed":
        return (
            f"Evertune: run {event.get('run_id')} for {model} failed at {event.get('step')}: "
            f"{event.get('error')}"
        )
    return f"Evertune: {kind} for {model}"


def _safe(url: str) -> str:
    """scheme://host[:port] only: paths and queries of webhook URLs often carry secrets."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")
