"""The serving page (`/serving`) and the serving health the overview shows.

    GET /serving?window=1h     per version over time: requests/s, error rate, time to first
                               token (p50), time per output token (p50); prompt drift of PROD
                               and its answers' output signals; the 50 newest logged
                               requests (redacted as stored); the newest feedback records

    health = summary(ws, window_s=900)     # the overview's card: requests, errors, TTFT p50
    health.requests, health.error_rate, health.ttft_p50_s, health.rps, health.by_version["v3"]

Everything comes from the request log table (`evertune.monitoring.request_log`), aggregated
in SQL over one time window (indexed on `created_at`): counts per version and time bucket
with GROUP BY, medians with window functions that return only the middle rows, so a page
reads a few hundred rows however busy serving is, and works without a running gateway.

The request log holds a sample of requests (`serve.request_log_sample`). Counts and rates
are divided by the sample share to estimate what was served; error rates and latency
percentiles are taken from the sample as is (a uniform sample estimates them unbiased). The
share is today's setting: a window that spans a change of it is estimated with the new one.

Drift comes from the `drift_checks` rows the drift monitor writes (`evertune.monitoring.drift`,
in `evertune up`): a chart of -log10 p per PROD version with the threshold dashed (above the
line = drift; -log10 p rather than p because the interesting values sit between 0.001 and
0.05, flat on a 0-1 axis), a chart of PROD's empty / refusal / rated-down shares, and the
latest check with its output signals per version.

Feedback comes from the landing bucket's `feedback/<UTC date>/<response id>.<sender>.jsonl` objects
(`evertune.monitoring.feedback`), day folders newest first, stopping after FEEDBACK_LIMIT
records or FEEDBACK_DAYS days, so an S3 bucket costs a few LIST calls, not a full listing.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import Integer, and_, case, cast, func, literal, select

from evertune.auth import Principal
from evertune.db import request_log
from evertune.monitoring.feedback import FEEDBACK_PREFIX
from evertune.monitoring.request_log import list_requests
from evertune.web.charts import Series, line_chart
from evertune.web.render import error_page, page

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement

    from evertune.bucket import Bucket
    from evertune.web.deps import Console
    from evertune.workspace import Workspace

# ?window= choices: (seconds, bucket seconds, x-axis unit seconds, unit name). About 30–72
# points per line: enough to see a trend, few enough to keep the SVG small.
WINDOWS: dict[str, tuple[int, int, int, str]] = {
    "15m": (900, 30, 60, "minutes"),
    "1h": (3600, 60, 60, "minutes"),
    "6h": (21600, 300, 3600, "hours"),
    "24h": (86400, 1200, 3600, "hours"),
}
DEFAULT_WINDOW = "1h"
MAX_SERIES = 6  # lines per chart (the stylesheet has six series colours); the table has all
LOG_ROWS = 50
TEXT_LIMIT = 160  # characters of a prompt or completion shown in the request log table
FEEDBACK_LIMIT = 20
FEEDBACK_DAYS = 14  # day folders looked at, newest first, before giving up
DRIFT_POINTS = 360  # checks drawn per chart at most (every k-th beyond; the newest always)


@dataclass(frozen=True)
class Health:
    """Serving over the last `window_s` seconds, estimated from the sampled request log.

    `requests` and `rps` are scaled by 1 / `sample` (estimates of what was served); `logged`
    is what the log holds. `by_version` maps "v3" / "base" to the same fields for that version.
    """

    window_s: float
    sample: float
    logged: int
    requests: int
    errors: int
    error_rate: float | None
    ttft_p50_s: float | None
    rps: float | None
    by_version: dict[str, dict[str, Any]] = field(default_factory=dict)


def summary(ws: Workspace, window_s: float = 900) -> Health:
    """Requests, error rate, TTFT p50 and requests/s over the last `window_s` seconds, overall
    and per version (two aggregate queries; no gateway needed)."""
    since = time.time() - window_s
    t = request_log
    in_window = t.c.created_at >= since
    counts = (
        select(
            t.c.version,
            func.count().label("n"),
            func.sum(case((t.c.status == "error", 1), else_=0)).label("errors"),
        )
        .where(in_window)
        .group_by(t.c.version)
    )
    ttft_ok = t.c.ttft_s.is_not(None)
    overall = _medians(t.c.ttft_s, [], in_window, ttft_ok)
    per_version = _medians(t.c.ttft_s, [t.c.version], in_window, ttft_ok)
    with ws.engine.connect() as conn:
        rows = conn.execute(counts).all()
        mid_all = _middle(conn.execute(overall).all(), 0)
        mid_version = _middle(conn.execute(per_version).all(), 1)
    sample = ws.config.serve.request_log_sample
    by_version: dict[str, dict[str, Any]] = {}
    for version, n, errors in sorted(rows, key=lambda r: -r[1]):
        by_version[version] = _rates(n, int(errors or 0), sample, window_s) | {
            "ttft_p50_s": mid_version.get((version,)),
        }
    logged = sum(r[1] for r in rows)
    errors = sum(int(r[2] or 0) for r in rows)
    totals = _rates(logged, errors, sample, window_s)
    return Health(
        window_s=window_s,
        sample=sample,
        logged=logged,
        requests=totals["requests"],
        errors=errors,
        error_rate=totals["error_rate"],
        ttft_p50_s=mid_all.get(()),
        rps=totals["rps"],
        by_version=by_version,
    )


def _rates(logged: int, errors: int, sample: float, window_s: float) -> dict[str, Any]:
    """Estimated requests and requests/s (scaled by the sample share) and the error rate."""
    # sample 0 logs nothing, so nothing can be estimated: report what the log holds.
    scale = 1 / sample if sample > 0 else 1.0
    return {
        "logged": logged,
        "requests": round(logged * scale),
        "errors": errors,
        "error_rate": errors / logged if logged else None,
        "rps": logged * scale / window_s if window_s > 0 else None,
    }


def _medians(
    value: ColumnElement[Any],
    groups: list[ColumnElement[Any]],
    *where: ColumnElement[bool],
) -> Any:
    """A query returning, per group, only the one or two middle rows of `value`.

    Rows come out as (*groups, value, rank, count); `_middle` averages them into the median.
    Window functions (SQLite ≥ 3.25, PostgreSQL) keep the sorting inside the database.
    """
    ranked = (
        select(
            *groups,
            value.label("value"),
            func.row_number().over(partition_by=groups or None, order_by=value).label("rank"),
            func.count().over(partition_by=groups or None).label("n"),
        )
        .where(*where)
        .subquery()
    )
    rank, n = ranked.c.rank, ranked.c.n
    # The middle of 1..n: rank (n+1)/2 when n is odd, ranks n/2 and n/2+1 when it is even,
    # i.e. n <= 2*rank <= n+2 (written without division, which rounds differently per DB).
    return select(*[ranked.c[g.name] for g in groups], ranked.c.value, rank, n).where(
        and_(2 * rank >= n, 2 * rank <= n + 2)
    )


def _middle(rows: list[Any], n_groups: int) -> dict[tuple[Any, ...], float]:
    """{group key: median} from the rows of a `_medians` query."""
    values: dict[tuple[Any, ...], list[float]] = {}
    for row in rows:
        values.setdefault(tuple(row[:n_groups]), []).append(float(row[n_groups]))
    return {key: sum(v) / len(v) for key, v in values.items()}


# -- time series -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A `?window=` choice: its name, span, bucket width and x-axis unit."""

    name: str
    seconds: int
    bucket_s: int
    unit_s: int
    unit: str


def parse_window(name: str) -> Window:
    """The Window called `name` (15m | 1h | 6h | 24h); ValueError with the choices otherwise."""
    if name not in WINDOWS:
        choices = ", ".join(WINDOWS)
        raise ValueError(
            f"unknown window {name!r}: choose one of {choices} "
            f"(for example /serving?window=6h for the last six hours)"
        )
    return Window(name, *WINDOWS[name])


def series(ws: Workspace, window: Window, now: float | None = None) -> dict[str, Any]:
    """Per version and time bucket: requests/s, error rate, TTFT p50 and TPOT p50.

    Returns {"versions": [...by logged requests...], "points": {version: {bucket: {...}}},
    "start": unix s of bucket 0, "buckets": count}. Three aggregate queries over the window.
    """
    now = time.time() if now is None else now
    buckets = window.seconds // window.bucket_s
    start = now - buckets * window.bucket_s
    t = request_log
    in_window = t.c.created_at >= start
    bucket = _bucket_index(ws, t.c.created_at, start, window.bucket_s).label("bucket")
    counts = (
        select(
            t.c.version,
            bucket,
            func.count().label("n"),
            func.sum(case((t.c.status == "error", 1), else_=0)).label("errors"),
        )
        .where(in_window)
        .group_by(t.c.version, bucket)
    )
    # Time per output token: the decode time after the first token over the tokens after it;
    # undefined for answers of fewer than two tokens.
    tpot = (t.c.duration_s - t.c.ttft_s) / (t.c.completion_tokens - 1)
    groups = [t.c.version, bucket]
    ttft_q = _medians(t.c.ttft_s, groups, in_window, t.c.ttft_s.is_not(None))
    tpot_q = _medians(
        tpot, groups, in_window, t.c.ttft_s.is_not(None), t.c.duration_s.is_not(None),
        t.c.completion_tokens > 1,
    )
    with ws.engine.connect() as conn:
        count_rows = conn.execute(counts).all()
        ttft = _middle(conn.execute(ttft_q).all(), 2)
        tpot_mid = _middle(conn.execute(tpot_q).all(), 2)
    sample = ws.config.serve.request_log_sample
    scale = 1 / sample if sample > 0 else 1.0
    points: dict[str, dict[int, dict[str, float | None]]] = {}
    totals: dict[str, int] = {}
    for version, b, n, errors in count_rows:
        b = min(int(b), buckets - 1)  # a row logged this very instant lands in the last bucket
        totals[version] = totals.get(version, 0) + n
        points.setdefault(version, {})[b] = {
            "rps": n * scale / window.bucket_s,
            "error_rate": int(errors or 0) / n,
            "ttft_p50_s": ttft.get((version, b)),
            "tpot_p50_s": tpot_mid.get((version, b)),
        }
    versions = sorted(totals, key=lambda v: -totals[v])
    return {"versions": versions, "points": points, "start": start, "buckets": buckets}


def _bucket_index(ws: Workspace, ts: Any, start: float, width: int) -> ColumnElement[Any]:
    """floor((ts - start) / width) in SQL. SQLite's CAST truncates (= floor here, ts >= start)
    and has no floor() in every build; PostgreSQL's CAST rounds, so it gets floor()."""
    offset = (ts - literal(start)) / width
    if ws.engine.dialect.name == "sqlite":
        return cast(offset, Integer)
    return cast(func.floor(offset), Integer)


def charts(data: dict[str, Any], window: Window) -> dict[str, Any]:
    """The four line charts of `series()` output, one line per version (the busiest six)."""
    versions = data["versions"][:MAX_SERIES]
    buckets, width, unit = data["buckets"], window.bucket_s, window.unit_s

    def x(b: int) -> float:
        # The bucket's end, relative to now, in the window's unit: -60 … 0 minutes.
        return round(((b + 1) - buckets) * width / unit, 3)

    def lines(metric: str, scale: float = 1.0, zero: bool = False) -> list[Series]:
        out = []
        for v in versions:
            pts = data["points"].get(v, {})
            values: list[tuple[float, float | None]] = []
            for b in range(buckets):
                got = pts.get(b, {}).get(metric)
                if got is None and zero:
                    got = 0.0  # no logged request in the bucket: a rate of 0, not a gap
                values.append((x(b), None if got is None else got * scale))
            out.append(Series(v, values))
        return out

    x_label = f"{window.unit} ago"
    span = (x(-1), 0.0)  # the whole window, however little of it has requests
    return {
        "rps": line_chart(lines("rps", zero=True), title="Requests per second", x_range=span,
                          caption=True, x_label=x_label, y_label="requests/s", y_min=0),
        "errors": line_chart(lines("error_rate", 100), title="Error rate", x_range=span,
                             caption=True, x_label=x_label, y_label="errors %", y_min=0),
        "ttft": line_chart(lines("ttft_p50_s", 1000), title="Time to first token (p50)",
                           x_range=span, caption=True, x_label=x_label, y_label="ms", y_min=0),
        "tpot": line_chart(lines("tpot_p50_s", 1000), title="Time per output token (p50)",
                           x_range=span, caption=True, x_label=x_label, y_label="ms", y_min=0),
    }


# -- drift -------------------------------------------------------------------------------------


def drift_view(ws: Workspace, window: Window, now: float | None = None) -> dict[str, Any]:
    """The drift section: {"enabled", "every_seconds", "threshold", "latest" (DriftReport |
    None: the newest check, however old), "checks" (drawn, in the window), "charts": {"drift",
    "signals"}}."""
    from evertune.monitoring.drift import list_checks

    now = time.time() if now is None else now
    cfg = ws.config.monitor.drift
    checks = list_checks(ws, since=now - window.seconds)
    newest = list_checks(ws, since=0, limit=1)
    if len(checks) > DRIFT_POINTS:
        step = -(-len(checks) // DRIFT_POINTS)
        checks = checks[::-1][::step][::-1]  # every step-th counted from the newest

    def x(t: float) -> float:
        return round((t - now) / window.unit_s, 3)

    span = (-window.seconds / window.unit_s, 0.0)
    x_label = f"{window.unit} ago"
    # One line per PROD version (a promotion starts a new one); a check without a figure is a gap.
    versions = list(dict.fromkeys(c.version for c in checks if c.version))[-(MAX_SERIES - 1):]
    score = []
    for v in versions:
        points: list[tuple[float, float | None]] = []
        for c in checks:
            p = c.p_value if c.version == v else None
            points.append((x(c.created_at), -math.log10(p) if p else None))
        score.append(Series(v, points))
    if score:
        level = -math.log10(cfg.threshold)
        score.append(Series(f"threshold (p = {cfg.threshold:g})",
                            [(span[0], level), (span[1], level)], dashed=True))
    signals: list[Series] = []
    for name, key in (("empty", "empty_ratio"), ("refusals", "refusal_ratio"),
                      ("rated down", "rated_down_ratio")):
        points = []
        for c in checks:
            got = next((getattr(s, key) for s in c.signals if s.version == c.version), None)
            points.append((x(c.created_at), None if got is None else got * 100))
        signals.append(Series(name, points))
    return {
        "enabled": cfg.enabled,
        "every_seconds": cfg.every_seconds,
        "threshold": cfg.threshold,
        "latest": newest[-1] if newest else None,
        "checks": len(checks),
        "charts": {
            "drift": line_chart(score, title="Prompt drift of PROD vs its training prompts",
                                x_range=span, caption=True, x_label=x_label,
                                y_label="-log10 p", y_min=0),
            "signals": line_chart(signals, title="PROD answers", x_range=span, caption=True,
                                  x_label=x_label, y_label="% of answers", y_min=0),
        },
    }


# -- request log and feedback ------------------------------------------------------------------


def short_text(value: Any, limit: int = TEXT_LIMIT) -> str:
    """A prompt or completion as one line of at most `limit` characters.

    Chat messages become `role: content` joined by ` · `; lists of prompts or completions
    (a request with several) are joined by ` | `.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and all(isinstance(m, dict) for m in value):
        text = " · ".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in value)
    elif isinstance(value, list):
        text = " | ".join(short_text(v, limit) for v in value)
    else:
        text = json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


_BUCKETS: dict[str, Bucket] = {}  # one per URL: a local Bucket caches file hashes between pages
_RECORDS: OrderedDict[tuple[str, str, str], dict[str, Any]] = OrderedDict()  # (url, key, version)
_CACHE_LOCK = threading.Lock()
_RECORDS_MAX = 512


def _bucket(ws: Workspace) -> Bucket:
    from evertune.bucket import Bucket

    with _CACHE_LOCK:
        bucket = _BUCKETS.get(ws.bucket_url)
        if bucket is None:
            bucket = _BUCKETS[ws.bucket_url] = Bucket.for_workspace(ws)
        return bucket


def recent_feedback(
    ws: Workspace, limit: int = FEEDBACK_LIMIT, days: int = FEEDBACK_DAYS, now: float | None = None
) -> list[dict[str, Any]]:
    """The newest `limit` feedback records, newest first, from the last `days` day folders.

    Each: {"key", "created_at", "label", "rating", "version", "response_id", "correction",
    "original", "comment", "prompt", "sender", "verified", "reason"}. An object changes version
    when it is rewritten (its sender rating the same answer again), so parsed records are
    cached by (key, version).
    """
    bucket = _bucket(ws)
    today = dt.datetime.fromtimestamp(time.time() if now is None else now, tz=dt.UTC).date()
    found = []
    for back in range(days):
        day = (today - dt.timedelta(days=back)).isoformat()
        found.extend(bucket.list(f"{FEEDBACK_PREFIX}{day}/"))
        if len(found) >= limit:
            break
    found.sort(key=lambda o: o.mtime, reverse=True)
    records = []
    for obj in found[:limit]:
        cache_key = (bucket.url, obj.key, obj.version)
        with _CACHE_LOCK:
            record = _RECORDS.get(cache_key)
        if record is None:
            record = _feedback_row(obj.key, bucket.read_bytes(obj.key))
            with _CACHE_LOCK:
                _RECORDS[cache_key] = record
                while len(_RECORDS) > _RECORDS_MAX:
                    _RECORDS.popitem(last=False)
        records.append(record)
    records.sort(key=lambda r: r["created_at"] or 0, reverse=True)
    return records


def _feedback_row(key: str, data: bytes) -> dict[str, Any]:
    """One feedback object (a JSON line in `data`) as a row of the feedback table."""
    try:
        record = json.loads(data.decode("utf-8").splitlines()[0])
        meta = record.get("feedback") or {}
    except (UnicodeDecodeError, IndexError, ValueError, AttributeError):
        # Written by hand or cut short: show that it is there rather than failing the page.
        return {"key": key, "created_at": None, "label": "unreadable", "rating": None,
                "version": None, "response_id": None, "correction": None, "original": None,
                "comment": None, "prompt": "", "sender": None, "verified": False,
                "reason": "unreadable"}
    if "messages" in record:
        messages = record["messages"]
        answer = messages[-1].get("content") if messages else None
        prompt = short_text(messages[:-1])
    else:
        answer, prompt = record.get("completion"), short_text(record.get("prompt"))
    corrected = meta.get("label") == "corrected"
    return {
        "key": key,
        "created_at": meta.get("created_at"),
        "label": meta.get("label") or "?",
        "rating": meta.get("rating"),
        "version": meta.get("version"),
        "response_id": meta.get("response_id"),
        # A correction replaced the answer; a rating alone keeps the served answer.
        "correction": short_text(answer) if corrected else None,
        "original": short_text(meta.get("original") if corrected else answer),
        "comment": meta.get("comment"),
        "prompt": prompt,
        # Who sent it, and whether it is trained on by default: only feedback from the caller
        # who received the response is verified (`evertune.monitoring.feedback`).
        "sender": meta.get("sender"),
        "verified": meta.get("verified") is True,
        "reason": meta.get("reason"),
    }


# -- the page ----------------------------------------------------------------------------------


def add_routes(router: APIRouter, c: Console) -> None:
    ws = c.ws

    @router.get("/serving")
    def serving_page(
        request: Request, window: str = DEFAULT_WINDOW, me: Principal = Depends(c.signed_in)  # noqa: B008
    ) -> HTMLResponse:
        try:
            span = parse_window(window)
        except ValueError as exc:
            return error_page(request, 400, "Bad request", str(exc))
        versions = c.versions()
        by_alias = {a: v for v in versions for a in v.aliases}
        stages = {v.ref: v.stage.value for v in versions}
        health = summary(ws, window_s=span.seconds)
        data = series(ws, span)
        requests = [
            {"r": r, "prompt": short_text(r.prompt), "completion": short_text(r.completion)}
            for r in list_requests(ws, limit=LOG_ROWS)
        ]
        return page(
            request, me, "serving.html", title="Serving",
            prod=by_alias.get("prod"), qa=by_alias.get("qa"), stages=stages,
            window=span, windows=list(WINDOWS), health=health, charts=charts(data, span),
            drift=drift_view(ws, span),
            hidden_versions=data["versions"][MAX_SERIES:], requests=requests,
            feedback=recent_feedback(ws), feedback_limit=FEEDBACK_LIMIT,
            feedback_days=FEEDBACK_DAYS,
        )
