"""Sign-in, sign-out, static files and the overview page (`/`).

    GET  /login              the sign-in form          POST /login   token → session cookie
    POST /logout             ends the session
    GET  /                   PROD and QA, pending approvals, recent runs, serving health
    GET  /static/{name}      the stylesheet and script
"""

from __future__ import annotations

from importlib.resources import files
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from evertune.auth import Principal, authenticate, require
from evertune.errors import NotFoundError, PermissionDenied
from evertune.web import session
from evertune.web.render import page

if TYPE_CHECKING:
    from evertune.web.deps import Console

MAX_NEXT = 2048  # characters of the path to return to after sign-in
_STATIC = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}


def add_routes(router: APIRouter, c: Console) -> None:
    ws = c.ws

    @router.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in _STATIC:  # a fixed list: no path from the URL reaches the file system
            raise NotFoundError(f"no static file {name!r}")
        body = files("evertune.web").joinpath("static", name).read_bytes()
        return Response(
            body, media_type=_STATIC[name], headers={"cache-control": "public, max-age=300"}
        )

    @router.get("/login")
    def login_form(request: Request, next: str = "/") -> HTMLResponse:  # noqa: A002 - the query name
        return page(request, None, "login.html", title="Sign in", next=_local(next), error=None)

    @router.post("/login")
    def login(request: Request, token: str = Form(""), next: str = Form("/")) -> Response:  # noqa: A002, B008
        try:
            require(authenticate(ws, token), "read")
        except PermissionDenied as exc:  # InvalidToken too; a serving key cannot read
            return page(
                request, None, "login.html", status=401, title="Sign in", next=_local(next),
                error=str(exc),
            )
        response = RedirectResponse(_local(next), status_code=303)
        session.sign_in(response, token.strip(), secure=request.url.scheme == "https")
        return response

    @router.post("/logout")
    def logout() -> Response:
        # No CSRF check: the worst a forged sign-out does is sign someone out.
        response = RedirectResponse("/login", status_code=303)
        session.sign_out(response)
        return response

    @router.get("/")
    def overview(request: Request, me: Principal = Depends(c.signed_in)) -> HTMLResponse:  # noqa: B008
        from evertune import pipeline
        from evertune.web.serving import summary

        versions = c.versions()
        by_alias = {a: v for v in versions for a in v.aliases}
        pending = [v for v in versions if v.stage == "pending"]
        runs = pipeline.list_runs(ws, limit=10)
        return page(
            request, me, "overview.html", title="Overview",
            # The qa alias stays on a version after it moves on to prod (or is retired); the
            # QA card shows only a version that is in QA now.
            model=ws.config.model.name, prod=by_alias.get("prod"),
            qa=next((v for v in versions if v.stage == "qa"), None),
            pending=pending, runs=runs, health=summary(ws, window_s=900),
            live=any(not r.finished for r in runs),
        )


def _local(target: str) -> str:
    """Only same-site paths after sign-in (an open redirect would help phishing), of a sane
    length (it becomes a Location header)."""
    if (not target.startswith("/") or target.startswith("//") or "\\" in target
            or len(target) > MAX_NEXT):
        return "/"
    return target
