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
    ModelError, RegistryError, other EvertuneError   500  server_error
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from evertune.auth import InvalidToken
from evertune.errors import (
    ConfigError,
    DataError,
    EvertuneError,
    JobError,
    LifecycleError,
    NotFoundError,
    PermissionDenied,
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
]


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
        status = exc.status_code
        body = error_body(str(exc.detail), "invalid_request_error", None, None)
        headers.update(exc.headers or {})
    elif isinstance(exc, EvertuneError):
        status, kind, code = next(
            ((s, k, c) for cls, s, k, c in _MAPPING if isinstance(exc, cls)),
            (500, "server_error", type(exc).__name__),
        )
        body = error_body(str(exc), kind, getattr(exc, "param", None), code)
    else:
        # A bug, not a user error: keep the traceback in the server log, not in the response.
        log.exception("unhandled error in the control API")
        status = 500
        body = error_body(f"internal error ({type(exc).__name__}); see the server log",
                          "server_error", None, "internal_error")
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=headers or None)


def _validation_body(exc: RequestValidationError) -> dict[str, Any]:
    problems = []
    param = None
    for err in exc.errors():
        # loc is ("body", "hyperparameters", "n_epochs") or ("query", "limit"): drop the origin.
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "form")]
        where = ".".join(loc) or "request body"
        param = param or (where if loc else None)
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    message = "invalid request: " + "; ".join(problems)
    return error_body(message, "invalid_request_error", param, "invalid_request")


class ErrorRoute(APIRoute):
    """An APIRoute that renders every error its handler raises as an OpenAI-shaped response.

    Request validation and dependencies (authentication) run inside the handler FastAPI
    builds, so their errors pass through here too.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - every error becomes a response
                return error_response(exc)

        return route
