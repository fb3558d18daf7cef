"""Who is calling, and what their role lets them do: bearer tokens and roles.

    from evertune import auth
    me = auth.authenticate(ws, "evt_…")           # Principal(name="ana", role="approver")
    auth.require(me, "approve")                   # PermissionDenied unless the role allows it
    me = auth.local_principal(ws)                 # the CLI: $EVERTUNE_TOKEN or .evertune/token
    secret, info = auth.create_token(ws, "ci", "operator", actor=me)   # admin only

Roles, each with an explicit set of permissions (no implied hierarchy beyond what is listed):

    viewer    read
    operator  read, data, runs, jobs                  (upload data, start/cancel fine-tuning)
    approver  read, approve, reject, promote, rollback
    admin     everything above, plus tokens and override (approve a version the gate rejected)
    serving   none here: a serving key only calls the serving endpoints (/v1/chat/completions …)

Tokens live in the state DB's `tokens` table; only their sha256 is stored, so a token is shown
once, when it is minted. A revoked token is refused like an unknown one (401), with a message
that says it was revoked. `evertune init` mints the first admin token into `.evertune/token`
for the local CLI.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from sqlalchemy import select, update

from evertune import db
from evertune.errors import ConfigError, NotFoundError, PermissionDenied

if TYPE_CHECKING:
    from evertune.workspace import Workspace

Role = Literal["viewer", "operator", "approver", "admin", "serving"]
Permission = Literal[
    "read", "data", "runs", "jobs", "approve", "reject", "promote", "rollback", "tokens", "override"
]

ROLES: tuple[Role, ...] = get_args(Role)
TOKEN_ENV = "EVERTUNE_TOKEN"
TOKEN_FILE = "token"  # under ws.state_dir, written by `evertune init` (mode 0600)
# Minted tokens are "evt_" + 43 URL-safe characters; anything far longer is not a token, and
# refusing it before hashing keeps a megabyte "token" from reaching the DB lookup.
MAX_TOKEN_CHARS = 256

_APPROVER: frozenset[Permission] = frozenset({"read", "approve", "reject", "promote", "rollback"})
PERMISSIONS: dict[Role, frozenset[Permission]] = {
    "viewer": frozenset({"read"}),
    "operator": frozenset({"read", "data", "runs", "jobs"}),
    "approver": _APPROVER,
    "admin": frozenset(get_args(Permission)),
    # Serving keys authenticate OpenAI-style clients of the gateway; the gateway checks the
    # role itself. They may not read or change anything through the control API.
    "serving": frozenset(),
}

# How each permission reads in "… which cannot <verb>" messages.
_VERBS: dict[Permission, str] = {
    "read": "read the control API",
    "data": "upload data",
    "runs": "start pipeline runs",
    "jobs": "start or cancel fine-tuning jobs",
    "approve": "approve",
    "reject": "reject",
    "promote": "promote",
    "rollback": "roll back",
    "tokens": "manage tokens",
    "override": "override a quality gate or system-test rejection",
}


class InvalidToken(PermissionDenied):  # noqa: N818 - reads as a sentence at the raise site
    """No token, an unknown one, or a revoked one: the API answers 401, not 403."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the token's name and role (`token_id` None for built-ins)."""

    name: str
    role: Role
    token_id: int | None = None

    def can(self, permission: Permission) -> bool:
        """Whether this caller's role grants `permission`."""
        return permission in PERMISSIONS.get(self.role, frozenset())


@dataclass(frozen=True)
class TokenInfo:
    """A token as listed (never the secret itself)."""

    id: int
    name: str
    role: str
    created_at: float
    revoked: bool


def hash_token(token: str) -> str:
    """The stored form of a token: hex sha256 of its text."""
    return hashlib.sha256(token.encode()).hexdigest()


def authenticate(ws: Workspace, token: str | None) -> Principal:
    """The caller behind a bearer token; InvalidToken when it is missing, unknown or revoked."""
    token = (token or "").strip()
    if not token:
        raise InvalidToken(
            "no API token given; send `Authorization: Bearer <token>` (the admin token of this "
            f"workspace is in {ws.state_dir / TOKEN_FILE}; `evertune tokens create` mints more)"
        )
    if len(token) > MAX_TOKEN_CHARS or not token.isascii():
        raise InvalidToken(
            f"the API token is not an Evertune token (those are at most {MAX_TOKEN_CHARS} ASCII "
            f"characters, like evt_…; this one has {len(token)} characters"
            f"{'' if token.isascii() else ', not all ASCII'}); paste the token itself"
        )
    t = db.tokens
    with ws.engine.connect() as conn:
        row = conn.execute(select(t).where(t.c.sha256 == hash_token(token))).first()
    if row is None:
        raise InvalidToken(
            "the API token is not recognised (mistyped, or from another workspace); ask an "
            "admin for a token (`evertune tokens create NAME --role ROLE`)"
        )
    if row.revoked:
        raise InvalidToken(
            f"token {row.name!r} was revoked; ask an admin for a new one "
            "(`evertune tokens create NAME --role ROLE`)"
        )
    if row.role not in ROLES:
        # Written by hand or by a newer version; refusing beats guessing its rights.
        raise InvalidToken(
            f"token {row.name!r} has unknown role {row.role!r}; known roles: {', '.join(ROLES)}"
        )
    return Principal(name=row.name, role=row.role, token_id=row.id)


def roles_with(permission: Permission) -> list[Role]:
    """The roles that grant `permission`, in ROLES order."""
    return [r for r in ROLES if permission in PERMISSIONS[r]]


def require(principal: Principal, permission: Permission) -> None:
    """Raise PermissionDenied unless `principal`'s role grants `permission`.

    The message names the token, its role, what it cannot do, and which roles can:
    "token 'ci' has role viewer, which cannot approve; ask for an approver or admin token".
    """
    if principal.can(permission):
        return
    verb = _VERBS[permission]
    if principal.role == "serving":
        raise PermissionDenied(
            f"token {principal.name!r} is a serving key, valid only for the serving endpoints "
            f"(/v1/chat/completions, /v1/completions, /v1/models); it cannot {verb}"
        )
    allowed = roles_with(permission)
    listed = " or ".join(allowed)
    article = "an" if listed[:1] in "aeiou" else "a"
    raise PermissionDenied(
        f"token {principal.name!r} has role {principal.role}, which cannot {verb}; "
        f"ask for {article} {listed} token"
    )


def local_principal(ws: Workspace) -> Principal:
    """The CLI's caller: the token in $EVERTUNE_TOKEN, else the workspace's `.evertune/token`."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        path = ws.state_dir / TOKEN_FILE
        try:
            token = path.read_text("utf-8").strip()
        except FileNotFoundError:
            raise InvalidToken(
                f"no token for the CLI: {path} does not exist and ${TOKEN_ENV} is not set; set "
                f"{TOKEN_ENV} to a token from an admin, or re-create the local admin token with "
                "`evertune init --force`"
            ) from None
    return authenticate(ws, token)


# -- token management (admin) ----------------------------------------------------------------
def _check_role(role: str) -> Role:
    if role not in ROLES:
        raise ConfigError([f"unknown role {role!r}; use one of: {', '.join(ROLES)}"], "--role")
    return role  # type: ignore[return-value]  # narrowed by the membership test


def create_token(ws: Workspace, name: str, role: str, actor: Principal) -> tuple[str, TokenInfo]:
    """Mint a token (admin only); returns the secret (show it once) and its listing."""
    require(actor, "tokens")
    name = name.strip()
    if not name:
        raise ConfigError(["a token needs a name: who or what uses it, e.g. 'ci' or 'ana'"], "NAME")
    secret = ws.create_token(name, _check_role(role))
    t = db.tokens
    with ws.engine.connect() as conn:
        row = conn.execute(select(t).where(t.c.sha256 == hash_token(secret))).one()
    return secret, _info(row)


def list_tokens(ws: Workspace, actor: Principal) -> list[TokenInfo]:
    """Every token (revoked ones included), oldest first; admin only."""
    require(actor, "tokens")
    with ws.engine.connect() as conn:
        rows = conn.execute(select(db.tokens).order_by(db.tokens.c.id)).all()
    return [_info(r) for r in rows]


def revoke_token(ws: Workspace, ref: int | str, actor: Principal) -> TokenInfo:
    """Revoke a token by id or by name (admin only); a name must match one active token."""
    require(actor, "tokens")
    t = db.tokens
    with ws.engine.begin() as conn:
        if isinstance(ref, int) or str(ref).isdigit():
            rows = conn.execute(select(t).where(t.c.id == int(ref))).all()
        else:
            rows = conn.execute(select(t).where(t.c.name == ref, t.c.revoked.is_(False))).all()
        if not rows:
            known = conn.execute(select(t.c.id, t.c.name).where(t.c.revoked.is_(False))).all()
            shown = ", ".join(f"{r.id} ({r.name})" for r in known) or "none"
            raise NotFoundError(f"no active token {ref!r}; active tokens: {shown}")
        if len(rows) > 1:
            ids = ", ".join(str(r.id) for r in rows)
            raise NotFoundError(f"{len(rows)} active tokens are named {ref!r} (ids {ids}); "
                                "revoke one by id")
        conn.execute(update(t).where(t.c.id == rows[0].id).values(revoked=True))
        row = conn.execute(select(t).where(t.c.id == rows[0].id)).one()
    return _info(row)


def _info(row: object) -> TokenInfo:
    m = row._mapping  # type: ignore[attr-defined]  # a SQLAlchemy Row
    return TokenInfo(id=m["id"], name=m["name"], role=m["role"], created_at=m["created_at"],
                     revoked=bool(m["revoked"]))
