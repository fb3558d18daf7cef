"""Schema migrations of the state DB (Alembic), on SQLite and Postgres alike.

    evertune db upgrade            # bring the state DB to the newest schema (`up` does it too)
    evertune db current            # the revision it is at

    from evertune import migrations
    migrations.upgrade(engine)     # what db.connect does for every process that opens the DB

Every table lives in `evertune.db`; each change to them is a revision under `versions/` whose
`upgrade(op)` takes Alembic's `Operations` (write it by hand, or let Alembic draft the ops:
`alembic.autogenerate.compare_metadata` against a database at head lists what changed).
Revision 0001 also adopts a state DB made before migrations existed: it creates the tables
that are missing and adds missing nullable columns, never touching rows.

Several processes may open one database at once (replicas of `evertune up`, a training child,
the CLI), so the upgrade runs under a lock: a Postgres advisory lock (across hosts), or a file
lock beside a SQLite file. A database already at head costs one SELECT and no Alembic import.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Connection, Engine, inspect, text

_THREADS = threading.Lock()  # one Alembic run at a time in this process (see upgrade)
HEAD = "0001"  # the newest revision under versions/ (tests/test_migrations.py checks it)
VERSION_TABLE = "alembic_version"
# Postgres advisory lock key of the upgrade: any 64-bit number unique among the database's
# users; this is the crc32 of "evertune-migrations".
ADVISORY_KEY = 0x1B5E2D7F


def current(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    with engine.connect() as conn:
        return _current(conn)


def _current(conn: Connection) -> str | None:
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    row = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).first()
    return str(row[0]) if row else None


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Migrate the database to `revision` (default: head); returns the revision it was at."""
    try:
        was = current(engine)
    except Exception:  # noqa: BLE001 (unreadable: let the locked path report it properly)
        was = "?"
    if was == HEAD and revision == "head":
        return was
    # Alembic's `context` is one module-level proxy per process: two threads migrating at once
    # (two workspaces opened by a server's threads) would clobber each other's.
    with _THREADS, _migration_lock(engine) as conn:
        was = _current(conn)  # another process may have migrated while we waited
        if was != HEAD or revision != "head":
            _run(conn, revision)
        return was


def _run(conn: Connection, revision: str) -> None:
    """Apply the revisions after the database's, oldest first, each stamped when done.

    Alembic's usual runner (`command.upgrade` + env.py) works through module-level proxies
    (`alembic.context`, `alembic.op`) shared by the whole process, and MLflow migrates its own
    database with Alembic in the same processes (sometimes in a background thread): the two
    would clobber each other's proxies. So each revision gets its `Operations` passed in."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(Path(__file__).parent))
    ctx = MigrationContext.configure(conn)
    ops = Operations(ctx)
    target = "heads" if revision == "head" else revision
    todo = list(script.iterate_revisions(target, ctx.get_current_revision()))
    for rev in reversed(todo):  # iterate_revisions goes newest first
        rev.module.upgrade(ops)
        ctx.stamp(script, rev.revision)


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """A connection holding the database's migration lock, committed on exit."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": ADVISORY_KEY})
            conn.commit()
            try:
                yield conn
                conn.commit()
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_KEY})
                conn.commit()
        return
    from evertune.db import sqlite_path

    path = sqlite_path(str(engine.url))
    with _file_lock(path) if path else contextlib.nullcontext(), engine.connect() as conn:
        yield conn
        conn.commit()


@contextlib.contextmanager
def _file_lock(db_file: Path) -> Iterator[None]:
    from evertune.models import file_lock

    with file_lock(db_file.with_name(db_file.name + ".migrate.lock")):
        yield
