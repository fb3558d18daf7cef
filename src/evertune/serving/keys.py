"""Serving API keys: tokens with role `serving` in the state DB's `tokens` table.

    evertune token create --role serving my-app    # (the lead's CLI) prints the key once
    curl -H "Authorization: Bearer evt_…" localhost:8000/v1/models

Serving keys are separate from control tokens: an admin token does not open `/v1/chat/…`,
and a serving key opens nothing else. While no (unrevoked) serving key exists, serving is
open, like a fresh local install. Keys are checked against their sha256, as
`Workspace.create_token` stores them; the set of hashes is cached for `ttl_s` seconds so a
request costs no DB query, and a revoked key stops working within that time.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import TYPE_CHECKING

from sqlalchemy import select

from evertune import db
from evertune.serving.protocol import OpenAIError

if TYPE_CHECKING:
    from evertune.workspace import Workspace

SERVING_ROLE = "serving"


class ServingKeys:
    """Checks `Authorization: Bearer <key>` headers against the serving keys.

    keys = ServingKeys(ws)
    keys.check(request.headers.get("authorization"))   # OpenAIError 401 when refused
    """

    def __init__(self, ws: Workspace, ttl_s: float = 2.0) -> None:
        self.ws = ws
        self.ttl_s = ttl_s
        self._hashes: frozenset[str] = frozenset()
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def hashes(self) -> frozenset[str]:
        """sha256 hex digests of the unrevoked serving keys (cached for `ttl_s`)."""
        with self._lock:
            if time.monotonic() - self._read_at > self.ttl_s:
                query = select(db.tokens.c.sha256).where(
                    db.tokens.c.role == SERVING_ROLE, db.tokens.c.revoked.is_(False)
                )
                with self.ws.engine.connect() as conn:
                    self._hashes = frozenset(conn.execute(query).scalars())
                self._read_at = time.monotonic()
            return self._hashes

    def check(self, authorization: str | None) -> None:
        """Return when the request may be served; raise a 401 OpenAIError otherwise."""
        known = self.hashes()
        if not known:
            return  # no serving key exists: serving is open
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise OpenAIError(
                401,
                "You didn't provide an API key. Send a serving key as 'Authorization: Bearer "
                "KEY' (create one with a token of role 'serving').",
                code="missing_api_key",
            )
        if hashlib.sha256(key.strip().encode()).hexdigest() not in known:
            raise OpenAIError(
                401,
                "Incorrect API key provided. Serving endpoints take serving keys (role "
                "'serving'); control-API tokens are not accepted here.",
                code="invalid_api_key",
            )
