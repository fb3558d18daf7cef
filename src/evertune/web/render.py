"""Rendering console pages: the Jinja2 environment, its filters, and the error → page route.

    @router.get("/runs")
    def runs(request: Request, me: Principal = Depends(signed_in)) -> HTMLResponse:
        return page(request, me, "runs.html", title="Runs", runs=...)

Templates live in `web/templates/`, extend `base.html`, and are autoescaped. `page()` adds
what every page needs: the caller (`me`, `can(permission)`), the CSRF token for forms
(`csrf`), the pending flash message and the navigation. `ConsoleRoute` turns errors into
pages: not signed in → redirect to /login, PermissionDenied → 403, NotFoundError → 404,
other Evertune errors on a POST → back to the page with the message as a flash, a body that
cannot be parsed (multipart without a boundary, a form field over Starlette's limit) → 400.

Every console response carries `SECURITY_HEADERS`: no framing (X-Frame-Options DENY and CSP
frame-ancestors 'none', against clickjacking an approve button) and a Content-Security-Policy
that allows only the console's own static script and stylesheet: the templates have no inline
script, style element or style attribute, so no nonce is needed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections.abc import Callable, Coroutine
from functools import cache
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from evertune.errors import (
    ConfigError,
    DataError,
    EvertuneError,
    JobError,
    LifecycleError,
    NotFoundError,
    PermissionDenied,
)
from evertune.web import session

if TYPE_CHECKING:
    import jinja2

    from evertune.auth import Principal

log = logging.getLogger("evertune.web")

CSP = "; ".join([
    "default-src 'none'",
    "script-src 'self'",            # /static/console.js only: no inline script
    "style-src 'self'",             # /static/console.css only: no inline style
    "img-src 'self' data:",
    "connect-src 'self'",           # console.js refreshes live parts from the same page
    "form-action 'self'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",  # for browsers without CSP frame-ancestors
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # `back()` reads our own Referer; others get none
}
# Evertune errors a GET can meet besides NotFound (a bad query, a job in the wrong state): their
# status, as the API answers them; anything else is a server error.
_GET_STATUS: list[tuple[type[EvertuneError], int, str]] = [
    (LifecycleError, 409, "Conflict"),
    (JobError, 409, "Conflict"),
    (DataError, 400, "Bad request"),
    (ConfigError, 400, "Bad request"),
]

NAV = [("/", "Overview"), ("/runs", "Runs"), ("/datasets", "Datasets"), ("/models", "Models"),
       ("/deployments", "Deployments"), ("/serving", "Serving")]


@cache
def environment() -> jinja2.Environment:
    """The console's Jinja2 environment (built once: compiling templates costs milliseconds)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("evertune.web", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,  # a typo in a template fails loudly in the tests
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        when=when, ago=ago, duration=duration, num=num, pct=pct, tojson_pretty=tojson_pretty
    )
    return env


def page(
    request: Request, me: Principal | None, template: str, *, status: int = 200, **ctx: Any
) -> HTMLResponse:
    """Render `template` with the common context; clears a shown flash message."""
    from evertune.auth import Permission  # noqa: F401 - documents what `can` takes

    flash = session.take_flash(request)
    html = environment().get_template(template).render(
        request=request,
        path=request.url.path,
        me=me,
        can=(lambda permission: me is not None and me.can(permission)),
        csrf=session.csrf_token(request),
        flash=flash,
        nav=NAV,
        **ctx,
    )
    response = HTMLResponse(html, status_code=status)
    if flash is not None:
        response.delete_cookie(session.FLASH_COOKIE, path="/")
    return response


def back(request: Request, kind: str, message: str, to: str | None = None) -> RedirectResponse:
    """Post/Redirect/Get: go to `to` (default: the page the form was on) with a flash message."""
    target = to or _same_site_referer(request) or "/"
    response = RedirectResponse(target, status_code=303)
    session.flash(response, kind, message)
    return response


def _same_site_referer(request: Request) -> str | None:
    ref = request.headers.get("referer", "")
    base = str(request.base_url)
    if ref.startswith(base):
        return "/" + ref[len(base):]
    return None


class ConsoleRoute(APIRoute):
    """An APIRoute that answers errors with console pages instead of JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            response = await self._answer(handler, request)
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        return route

    @staticmethod
    async def _answer(
        handler: Callable[[Request], Coroutine[Any, Any, Response]], request: Request
    ) -> Response:
        """The handler's response, or the page for the error it raised."""
        try:
            return await handler(request)
        except session.NotSignedIn:
            if request.method != "GET":
                return error_page(
                    request, 401, "Not signed in", "Sign in with an API token, then try again."
                )
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
        except PermissionDenied as exc:
            return error_page(request, 403, "Not allowed", str(exc))
        except NotFoundError as exc:
            return error_page(request, 404, "Not found", str(exc))
        except RequestValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg')}"
                for e in exc.errors()
            )
            if request.method == "POST":
                return back(request, "error", f"invalid form: {problems}")
            return error_page(request, 400, "Bad request", problems)
        except HTTPException as exc:
            # Starlette's body parsing: a multipart form without a boundary, a field over
            # its size limit. The request never reached the route: nothing happened.
            return error_page(request, exc.status_code, "Bad request", str(exc.detail))
        except EvertuneError as exc:
            if request.method == "POST":
                return back(request, "error", str(exc))
            status, title = next(((s, t) for cls, s, t in _GET_STATUS if isinstance(exc, cls)),
                                 (500, "Something went wrong"))
            return error_page(request, status, title, str(exc))
        except Exception:  # noqa: BLE001 - a bug: keep the traceback in the log, show a page
            log.exception(
                "unhandled error in the console (%s %s)", request.method, request.url.path
            )
            return error_page(
                request, 500, "Internal error",
                "An unexpected error happened; the server log has the details.",
            )


def error_page(request: Request, status: int, title: str, message: str) -> HTMLResponse:
    me = None
    try:
        ws = request.app.state.workspace
        me = session.principal(request, ws)
    except Exception:  # noqa: BLE001 - an error page must render even when signed out
        me = None
    return page(
        request, me, "error.html", status=status, title=title, status_code=status, message=message
    )


# -- filters -----------------------------------------------------------------------------------
def when(ts: float | None) -> str:
    """A unix time as local `YYYY-MM-DD HH:MM:SS`."""
    if ts is None:
        return "—"
    return dt.datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M:%S")


def ago(ts: float | None, now: float | None = None) -> str:
    """A unix time as `5 min ago`."""
    import time

    if ts is None:
        return "—"
    s = max(0.0, (now or time.time()) - float(ts))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{int(s // size)} {unit} ago"
    return f"{int(s)} s ago"


def duration(seconds: float | None) -> str:
    """Seconds as `850 ms`, `12.3 s`, `4 min 05 s`, `2 h 03 min`."""
    if seconds is None:
        return "—"
    s = float(seconds)
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def num(value: Any, digits: int = 3) -> str:
    """A number with `digits` significant decimals; `—` for None/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:.{digits}f}"


def pct(value: Any, digits: int = 1) -> str:
    if value is None or not isinstance(value, (int, float)):
        return "—"
    return f"{value * 100:.{digits}f}%"


def tojson_pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)
