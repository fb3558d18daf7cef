"""Bearer-token authentication for the control API, as FastAPI dependencies.

    needs = Auth(ws)
    @router.post("/api/models/{v}/approve")
    def approve(v: str, me: Principal = Depends(needs("approve"))): ...

Every route of `create_router` depends on `needs(permission)`; `tests/api/test_auth_routes.py`
checks that none is left open. The dependency answers 401 for a missing, unknown or revoked
token and 403 (with the role message of `auth.require`) for a role that lacks the permission.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from evertune.auth import InvalidToken, Permission, Principal, authenticate, require

if TYPE_CHECKING:
    from evertune.workspace import Workspace

# auto_error=False: a missing header reaches our code, which answers in the OpenAI error shape
# (FastAPI's own 403 "Not authenticated" would be neither 401 nor that shape).
_bearer = HTTPBearer(auto_error=False, description="An Evertune API token: evt_…")

Dependency = Callable[..., Principal]


class Auth:
    """Builds the per-permission dependencies for one workspace."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws

    def __call__(self, permission: Permission) -> Dependency:
        """A dependency that returns the caller if their role grants `permission`."""
        ws = self.ws

        def dependency(
            credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008
        ) -> Principal:
            if credentials is None:
                raise InvalidToken(
                    "no API token given; send `Authorization: Bearer <token>` (the workspace's "
                    "admin token is in .evertune/token; `evertune tokens create` mints more)"
                )
            principal = authenticate(ws, credentials.credentials)
            require(principal, permission)
            return principal

        dependency.permission = permission  # type: ignore[attr-defined]  # read by the tests
        return dependency
