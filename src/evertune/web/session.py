"""Console sign-in: an API token kept in an HttpOnly cookie, CSRF tokens for forms, flashes.

    me = principal(request, ws)            # Principal, or NotSignedIn (→ redirect to /login)
    check_form(request, csrf, me, "approve")   # CSRF + role; PermissionDenied → 403 page

The console signs in with the same tokens as the API (`evertune tokens create NAME --role R`);
no second account system. The cookie holds the token itself, HttpOnly (page scripts cannot
read it) and SameSite=Strict (other sites cannot send it). Forms also carry a CSRF token
derived from the session token, so a POST forged from elsewhere fails even if a browser sends
the cookie; the role check after it is `auth.require`, the one the API and CLI use.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

from evertune.auth import InvalidToken, Permission, Principal, authenticate, require
from evertune.errors import PermissionDenied

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from evertune.workspace import Workspace

COOKIE = "evertune_session"
FLASH_COOKIE = "evertune_flash"
SESSION_SECONDS = 12 * 3600


class NotSignedIn(InvalidToken):  # noqa: N818 - reads as a sentence at the raise site
    """No valid session cookie: the console redirects to the sign-in page."""


def principal(request: Request, ws: Workspace) -> Principal:
    """The signed-in caller, from the session cookie (NotSignedIn without a valid one)."""
    token = request.cookies.get(COOKIE)
    if not token:
        raise NotSignedIn("sign in with an Evertune API token")
    try:
        return authenticate(ws, token)
    except InvalidToken as exc:
        raise NotSignedIn(str(exc)) from None


def csrf_token(request: Request) -> str:
    """The CSRF token for the current session (empty when signed out)."""
    token = request.cookies.get(COOKIE, "")
    if not token:
        return ""
    # An HMAC keyed by the session token: unguessable without it, stable for the session.
    return hmac.new(token.encode(), b"evertune-console-csrf", hashlib.sha256).hexdigest()


def check_form(request: Request, sent: str, me: Principal, permission: Permission) -> None:
    """Refuse a console POST without this session's CSRF token (`sent`, the form's `csrf`
    field) or without the role's permission."""
    if not sent or not hmac.compare_digest(sent, csrf_token(request)):
        raise PermissionDenied(
            "this form was not sent from an Evertune console page of your session (missing or "
            "wrong CSRF token); reload the page and try again"
        )
    require(me, permission)


def sign_in(response: Response, token: str, *, secure: bool) -> None:
    """Set the session cookie on `response`."""
    response.set_cookie(COOKIE, token, max_age=SESSION_SECONDS, httponly=True, samesite="strict",
                        secure=secure, path="/")


def sign_out(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/")


def flash(response: Response, kind: str, message: str) -> None:
    """A one-shot message shown on the next page (kind: ok | error)."""
    response.set_cookie(FLASH_COOKIE, quote(f"{kind}:{message[:1500]}"), max_age=60,
                        httponly=True, samesite="strict", path="/")


def take_flash(request: Request) -> tuple[str, str] | None:
    """The pending flash message, if any: (kind, message). The page clears the cookie."""
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return None
    kind, _, message = unquote(raw).partition(":")
    return (kind if kind in ("ok", "error") else "ok"), message
