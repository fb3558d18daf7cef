"""The state DB's schema under Alembic: pytest tests/test_migrations.py

Every table is defined once (evertune.db) and created by migrations, on SQLite and on a real
PostgreSQL server (tests/postgres.py): a fresh database ends at head with exactly the schema
the code declares; processes racing to migrate one database leave it migrated once; a state DB
made before migrations is adopted with its rows; `evertune db upgrade|current` say where it is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, MetaData, Table, create_engine, inspect, select, text

from evertune import db, migrations
from tests.e2e.test_cli import evertune as _evertune


def evertune(*args: str, cwd: Path, expect: int = 0) -> str:
    proc = _evertune(*args, cwd=cwd, check=expect == 0)
    assert proc.returncode == expect, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("pg_url")


def test_head_is_the_newest_revision_under_versions() -> None:
    script = ScriptDirectory(str(Path(migrations.__file__).parent))
    assert script.get_current_head() == migrations.HEAD


def test_a_fresh_database_migrates_to_exactly_the_declared_schema(url: str) -> None:
    engine = db.connect(url)
    assert migrations.current(engine) == migrations.HEAD
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), db.metadata)
    assert diff == [], diff  # a table or column changed without a revision
    # Every table of Evertune is in the one module, and the migration made each of them.
    assert set(inspect(engine).get_table_names()) == set(db.metadata.tables) | {"alembic_version"}
    # Opening it again (every process does) migrates nothing and keeps the rows.
    with engine.begin() as conn:
        conn.execute(db.tokens.insert().values(name="a", role="admin", sha256="0" * 64,
                                               created_at=1.0, revoked=False))
    again = db.connect(url)
    with again.connect() as conn:
        assert conn.execute(select(db.tokens.c.name)).scalars().all() == ["a"]
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1


RACE = """
import sys
from evertune import db, migrations
engine = db.connect(sys.argv[1])
print(migrations.current(engine))
"""


def test_processes_racing_to_migrate_one_database_migrate_it_once(url: str) -> None:
    """Replicas starting together: each waits on the migration lock (a Postgres advisory lock,
    a file lock beside SQLite); all end at head and none fails on a half-made table."""
    procs = [subprocess.Popen([sys.executable, "-c", RACE, url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
        assert out.strip() == migrations.HEAD
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [
            migrations.HEAD]


def test_a_state_db_from_before_migrations_is_adopted_with_its_rows(tmp_path: Path) -> None:
    """A state.db whose tables an older Evertune created directly (no alembic_version, no
    `receiver` column on the serving tables, no drift table): migrating keeps every row, adds
    the nullable column (old rows: NULL) and the missing tables."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    engine = create_engine(url)
    old = MetaData()
    for table in db.metadata.tables.values():
        if table.name in ("drift_checks",):
            continue  # did not exist yet
        cols = [Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                for c in table.columns if c.name != "receiver"]  # fmt: skip
        Table(table.name, old, *cols)
    old.create_all(engine)
    row = {"id": "chatcmpl-old", "created_at": 1.0, "endpoint": "chat", "model": "assistant",
           "version": "v1", "prompt": None, "completion": json.dumps("hi"), "digest": "0" * 64}
    with engine.begin() as conn:
        conn.execute(old.tables["served_responses"].insert(), [row])

    migrated = db.connect(url)
    assert migrations.current(migrated) == migrations.HEAD
    for name in ("request_log", "served_responses"):
        assert "receiver" in {c["name"] for c in inspect(migrated).get_columns(name)}
    assert inspect(migrated).has_table("drift_checks")
    with migrated.connect() as conn:
        kept = conn.execute(select(db.served_responses)).mappings().one()
    assert kept["id"] == "chatcmpl-old" and kept["receiver"] is None


def test_db_commands_say_where_the_schema_is(tmp_path: Path, pg_url: str) -> None:
    ws = tmp_path / "ws"
    evertune("init", str(ws), cwd=tmp_path)
    out = evertune("-w", str(ws), "db", "current", cwd=tmp_path)
    assert f"revision {migrations.HEAD}; newest {migrations.HEAD} (up to date)" in out
    # A Postgres state DB: empty until upgraded, then at head; the password never printed.
    with_pg = ["--set", f"storage.state_db={pg_url}"]
    assert "revision none" in evertune("-w", str(ws), "db", "current", *with_pg, cwd=tmp_path)
    out = evertune("-w", str(ws), "db", "upgrade", *with_pg, cwd=tmp_path)
    assert f"migrated from empty to {migrations.HEAD}" in out
    assert "nothing to do" in evertune("-w", str(ws), "db", "upgrade", *with_pg, cwd=tmp_path)


def test_a_wrong_postgres_url_is_a_message_naming_the_setting(tmp_path: Path, postgres) -> None:
    ws = tmp_path / "ws"
    evertune("init", str(ws), cwd=tmp_path)
    wrong = f"postgresql+psycopg://postgres:hunter2@127.0.0.1:{postgres.port}/no_such_db"
    out = evertune("-w", str(ws), "db", "upgrade", "--set", f"storage.state_db={wrong}",
                   cwd=tmp_path, expect=1)
    assert "cannot connect to the state DB" in out and "(storage.state_db)" in out
    assert "no_such_db" in out and "hunter2" not in out and "Traceback" not in out
