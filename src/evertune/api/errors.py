"""Errors of the control API, all in the OpenAI shape so the official clients understand them.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "training_file",
               "code": "file_not_found"}}

Routes raise Evertune's own errors (or `ApiError` for HTTP-only cases); `ErrorRoute`, the route
class of every router here, turns them into responses. It works per route rather than as an
app-wide exception handler because `create_router` hands back a router, and the server that
includes it may host other routers (serving) with their own conventions.

    InvalidToken          401  invalid_api_key         (no, unknown or revoked token)
    PermissionDenied      403  insufficient_permissions
    NotFoundError         404  not_found
    LifecycleError        409  illegal_transition      (message lists the allowed moves)
    JobError              409  job_conflict
    DataError             400  invalid_file
    ConfigError           400  invalid_config
    request validation    400  invalid_request         (param = the field)
    unparsable body       400  invalid_request         (bad JSON or multipart, lone surrogates)
    StorageError, a raw storage failure  503  storage_unavailable (read-only file, disk full)
    ModelError, RegistryError, other EvertuneError   500  server_error

The OpenAPI document says the same: every route documents 400 (not FastAPI's 422, which this
API never answers: the OpenAI API answers 400) and its other 4xx with the `ErrorResponse` schema.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Coroutine
from email.message import Message
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel

# Starlette's own HTTPException (FastAPI's subclasses it): request.form() raises it for a
# multipart body without a boundary or over the part-size limit.
from starlette.exceptions import HTTPException

from evertune.auth import InvalidToken
from evertune.errors import (
    ConfigError,
    DataError,
    EvertuneError,
    JobError,
    LifecycleError,
    NotFoundError,
    PermissionDenied,
    StorageError,
    as_storage_error,
)

log = logging.getLogger("evertune.api")

# (status, type, code) per Evertune error class; the first matching class wins (subclasses first).
_MAPPING: list[tuple[type[Exception], int, str, str]] = [
    (InvalidToken, 401, "invalid_request_error", "invalid_api_key"),
    (PermissionDenied, 403, "permission_error", "insufficient_permissions"),
    (NotFoundError, 404, "invalid_request_error", "not_found"),
    (LifecycleError, 409, "invalid_request_error", "illegal_transition"),
    (JobError, 409, "invalid_request_error", "job_conflict"),
    (DataError, 400, "invalid_request_error", "invalid_file"),
    (ConfigError, 400, "invalid_request_error", "invalid_config"),
    # The request was fine; the workspace's storage is not (read-only, disk full): retry later.
    (StorageError, 503, "server_error", "storage_unavailable"),
]


class ErrorDetail(BaseModel):
    """The body of an error: what went wrong, which input (`param`) and a stable `code`."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error of the control API: `{"error": {...}}`, the OpenAI shape."""

    error: ErrorDetail


# Documented on every route (ErrorRoute): request problems are 400 as in the OpenAI API, every
# route needs a token (401) with a role (403), and "4XX" stands for the route-specific ones
# (404 unknown id, 409 illegal transition, 413 file too large, 429 too many queued runs).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request (the message names the input)"},
    401: {"model": ErrorResponse, "description": "No, unknown or revoked API token"},
    403: {"model": ErrorResponse, "description": "The token's role lacks the permission"},
    "4XX": {"model": ErrorResponse, "description": "Other client errors (404, 409, 413, 429)"},
}


class ApiError(Exception):
    """An HTTP error raised by a route with an explicit status, param and code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",  # noqa: A002 - the OpenAI field name
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None  # noqa: A002
) -> dict[str, Any]:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: Exception) -> JSONResponse:
    """The JSON response for any exception a route let through."""
    headers: dict[str, str] = {}
    if isinstance(exc, ApiError):
        status, body = exc.status, error_body(exc.message, exc.type, exc.param, exc.code)
    elif isinstance(exc, RequestValidationError):
        status, body = 400, _validation_body(exc)
    elif isinstance(exc, HTTPException):
        # FastAPI's "error parsing the body" (not UTF-8, say) and Starlette's multipart errors.
        status = exc.status_code
        message = str(exc.detail)
        if status == 400:
            cause = f": {str(exc.__cause__)[:200]}" if exc.__cause__ is not None else ""
            message = (f"{message}{cause}; send JSON in UTF-8 (content-type application/json), "
                       "or multipart/form-data with a boundary for file uploads")
        body = error_body(message, "invalid_request_error", None,
                          "invalid_request" if status == 400 else None)
        headers.update(exc.headers or {})
    elif isinstance(exc, EvertuneError):
        status, kind, code = next(
            ((s, k, c) for cls, s, k, c in _MAPPING if isinstance(exc, cls)),
            (500, "server_error", type(exc).__name__),
        )
        body = error_body(str(exc), kind, getattr(exc, "param", None), code)
    elif (storage := as_storage_error(exc)) is not None:
        # A raw driver error from a store that cannot be written: 503 with the reason.
        log.error("control API: %s", storage)
        status, body = 503, error_body(str(storage), "server_error", None, "storage_unavailable")
    else:
        # A bug, not a user error: keep the traceback in the server log, not in the response.
        log.exception("unhandled error in the control API")
        status = 500
        body = error_body(f"internal error ({type(exc).__name__}); see the server log",
                          "server_error", None, "internal_error")
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=headers or None)


# Pydantic names the member of a union each error comes from ("constrained-int",
# "literal['auto']"); the person knows the field, not our type's members.
_UNION_MEMBER = re.compile(r"(constrained-)?(int|float|str|bool|none)|literal\[.*\]|function-.*")


def _validation_body(exc: RequestValidationError) -> dict[str, Any]:
    problems: dict[str, list[str]] = {}  # where → what is wrong there (a union: each option)
    param = None
    for err in exc.errors():
        # loc is ("body", "hyperparameters", "n_epochs") or ("query", "limit"): drop the origin.
        loc = [str(p) for p in err.get("loc", ())
               if p not in ("body", "query", "path", "form", "header")
               and not (isinstance(p, str) and _UNION_MEMBER.fullmatch(p))]
        where = ".".join(loc) or "request body"
        param = param or (where if loc else None)
        problems.setdefault(where, []).append(str(err.get("msg", "invalid")))
    message = "invalid request: " + "; ".join(
        f"{where}: {', or '.join(dict.fromkeys(msgs))}" for where, msgs in problems.items())
    return error_body(message, "invalid_request_error", param, "invalid_request")


def _is_json(request: Request) -> bool:
    """Whether FastAPI will parse this request's body as JSON (its own rule, routing.py)."""
    value = request.headers.get("content-type")
    if not value:
        return True
    message = Message()
    message["content-type"] = value
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


async def check_json_text(request: Request) -> None:
    """Refuse a JSON body whose strings hold a lone UTF-16 surrogate ("\\ud800").

    `json.loads` accepts such escapes, but the string cannot be encoded as UTF-8, so it would
    fail later, deep in a database write or a log line, as a server error. Starlette caches the
    body, so FastAPI's own parsing afterwards reads it again for free.
    """
    if request.method not in ("POST", "PUT", "PATCH") or not _is_json(request):
        return
    body = await request.body()
    if b"\\u" not in body:
        return  # no \u escape, so no surrogate escape: skip the second parse
    try:
        parsed = json.loads(body)
    except ValueError:
        return  # FastAPI answers 400 for a body that is not JSON
    try:
        json.dumps(parsed, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start:exc.end]
        raise ApiError(
            400,
            f"request body: a string holds the lone UTF-16 surrogate {bad!r}, which is not text; "
            "send surrogate pairs whole (or the character itself) in valid UTF-8",
            code="invalid_unicode",
        ) from None


class ErrorRoute(APIRoute):
    """An APIRoute that renders every error its handler raises as an OpenAI-shaped response.

    Request validation and dependencies (authentication) run inside the handler FastAPI
    builds, so their errors pass through here too. It also adds `ERROR_RESPONSES` to each
    route's documented responses, which keeps FastAPI from documenting a 422 we never send.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        responses = dict(kwargs.pop("responses", None) or {})
        for status, spec in ERROR_RESPONSES.items():
            responses.setdefault(status, spec)
        super().__init__(path, endpoint, responses=responses, **kwargs)

    def max_body_bytes(self) -> int | None:
        """The largest request body this route reads (None: no limit); see `capped_route`."""
        return None

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                check_body_size(request, self.max_body_bytes())
                await check_json_text(request)
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - every error becomes a response
                return error_response(exc)

        return route


def check_body_size(request: Request, limit: int | None) -> None:
    """ApiError 413 when the declared body (Content-Length) is over `limit`.

    FastAPI parses a multipart upload, spooling the whole file to a temporary file, before the
    handler runs, so a handler's own cap only stops the copy after that; a declared size over
    the limit is refused here first. (A body without Content-Length is still spooled; the
    handler's streaming cap, `files.copy_capped`, then refuses it.)
    """
    if limit is None:
        return
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared):,} bytes, over this route's limit "
                       f"of {limit:,} bytes (data.max_file_mb and a little for the form around "
                       "it); split the file into several", param="file", code="file_too_large")


def capped_route(limit: Callable[[], int]) -> type[ErrorRoute]:
    """An ErrorRoute class whose routes refuse bodies over `limit()` bytes before reading them
    (`limit` is called per request, so it follows the workspace config)."""

    class CappedRoute(ErrorRoute):
        def max_body_bytes(self) -> int | None:
            return limit()

    return CappedRoute
