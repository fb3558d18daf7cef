"""Alembic's environment for Evertune: runs with the connection `evertune.migrations` passes.

Not run by the `alembic` command line: `evertune db upgrade` (or any process opening the state
DB) runs it with its own connection and lock."""

from __future__ import annotations

from alembic import context

from evertune.db import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise SystemExit("run migrations with `evertune db upgrade`, not the alembic command")
# render_as_batch: SQLite cannot ALTER most things; batch mode copies the table instead.
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
