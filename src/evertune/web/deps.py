"""What console routes share: the workspace, the signed-in caller, one lazy Registry.

    def add_routes(router: APIRouter, c: Console) -> None:
        @router.get("/things")
        def things(request: Request, me: Principal = Depends(c.signed_in)) -> HTMLResponse:
            return page(request, me, "things.html", title="Things",
                        versions=c.registry().list_versions())
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from fastapi import Request

from evertune.auth import require
from evertune.web import session

if TYPE_CHECKING:
    from evertune.auth import Principal
    from evertune.registry import Registry
    from evertune.workspace import Workspace


class Console:
    """Per-workspace state of the console router (nothing durable: that is all in the DB)."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self._registry: Registry | None = None
        self._lock = threading.Lock()

        def signed_in(request: Request) -> Principal:
            """FastAPI dependency: the signed-in caller (else the route redirects to /login).

            Every page reads: a serving key (no `read` permission) gets the 403 page."""
            me = session.principal(request, ws)
            require(me, "read")
            return me

        self.signed_in = signed_in

    def registry(self) -> Registry:
        """The workspace's Registry, made on first use (importing MLflow takes seconds)."""
        with self._lock:
            if self._registry is None:
                from evertune.registry import Registry

                self._registry = Registry(self.ws)
            return self._registry

    def versions(self) -> list[Any]:
        """Every registered version, newest first."""
        return sorted(self.registry().list_versions(), key=lambda v: v.version, reverse=True)
