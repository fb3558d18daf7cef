"""Serving API keys: tokens with role `serving` in the state DB's `tokens` table.

    evertune tokens create my-app --role serving   # prints the key once
    curl -H "Authorization: Bearer evt_…" localhost:8000/v1/models

Serving keys are separate from control tokens: an admin token does not open `/v1/chat/…`,
and a serving key opens nothing else. While no (unrevoked) serving key exists, serving is
open, like a fresh local install — and so only on a loopback address: `require_keys_off_loopback`
(called by `evertune.server.run`) refuses to serve anywhere else without a key. Keys are
checked against their sha256, as `Workspace.create_token` stores them; the hashes (and the
key names, which feedback records as its sender) are cached for `ttl_s` seconds so a request
costs no DB query, and a revoked key stops working within that time.
"""

from __future__ import annotations

import hashlib
import ipaddress
import threading
import time
from types import MappingProxyType
from typing import TYPE_CHECKING

from sqlalchemy import select

from evertune import db
from evertune.errors import EvertuneError
from evertune.serving.protocol import OpenAIError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from evertune.workspace import Workspace

SERVING_ROLE = "serving"
ANONYMOUS = "anonymous"  # the sender of a request while no serving key exists
CREATE_KEY_HINT = "evertune tokens create NAME --role serving"


class UnprotectedServingError(EvertuneError):
    """Serving would be open to a network without any serving key."""

    exit_code = 2


class ServingKeys:
    """Checks `Authorization: Bearer <key>` headers against the serving keys.

    keys = ServingKeys(ws)
    sender = keys.check(request.headers.get("authorization"))   # key name, or "anonymous"
    """

    def __init__(self, ws: Workspace, ttl_s: float = 2.0) -> None:
        self.ws = ws
        self.ttl_s = ttl_s
        self._names: Mapping[str, str] = MappingProxyType({})  # sha256 → key name
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def names(self) -> Mapping[str, str]:
        """sha256 hex digest → name of each unrevoked serving key (cached for `ttl_s`)."""
        with self._lock:
            if time.monotonic() - self._read_at > self.ttl_s:
                query = select(db.tokens.c.sha256, db.tokens.c.name).where(
                    db.tokens.c.role == SERVING_ROLE, db.tokens.c.revoked.is_(False)
                )
                with self.ws.engine.connect() as conn:
                    self._names = MappingProxyType(
                        {sha: name for sha, name in conn.execute(query).all()}
                    )
                self._read_at = time.monotonic()
            return self._names

    def hashes(self) -> frozenset[str]:
        """sha256 hex digests of the unrevoked serving keys (cached for `ttl_s`)."""
        return frozenset(self.names())

    def check(self, authorization: str | None) -> str:
        """Who is calling: the serving key's name, or "anonymous" while serving is open.

        Raises a 401 OpenAIError when keys exist and the header carries none of them."""
        known = self.names()
        if not known:
            return ANONYMOUS  # no serving key exists: serving is open
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise OpenAIError(
                401,
                "You didn't provide an API key. Send a serving key as 'Authorization: Bearer "
                f"KEY' (create one with `{CREATE_KEY_HINT}`).",
                code="missing_api_key",
            )
        name = known.get(hashlib.sha256(key.strip().encode()).hexdigest())
        if name is None:
            raise OpenAIError(
                401,
                "Incorrect API key provided. Serving endpoints take serving keys (role "
                "'serving'); control-API tokens are not accepted here.",
                code="invalid_api_key",
            )
        return name


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine: localhost, 127.0.0.0/8 or ::1."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # any other name may resolve to a public address


def require_keys_off_loopback(ws: Workspace, host: str) -> None:
    """Refuse to serve on a non-loopback `host` while no serving key exists.

    Without a key anyone who reaches the address could use the model and post feedback that
    becomes training data; on loopback only this machine can, as on a fresh local install.
    """
    if is_loopback(host):
        return
    if ServingKeys(ws, ttl_s=0).names():
        return
    raise UnprotectedServingError(
        f"refusing to serve on {host!r}: it is not a loopback address and this workspace has "
        "no serving key, so anyone who can reach it could call the model and post feedback "
        f"that the next round trains on. Create a key with `{CREATE_KEY_HINT}` (clients send "
        "it as 'Authorization: Bearer KEY'), or bind to 127.0.0.1 with --host 127.0.0.1."
    )
