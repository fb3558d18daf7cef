"""The schema as of the first migration: jobs, events, metrics, checkpoints, tokens, locks, the
request log and served responses, drift checks, the audit log, pipeline runs and steps.

Revision 0001. On an empty database it creates every table. On a state DB made before
migrations existed (tables created directly by older Evertune versions) it adopts what is
there: missing tables and indexes are created, missing nullable columns added (older rows get
NULL), and nothing is dropped or rewritten.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _table(op: Operations, name: str, *elements: sa.schema.SchemaItem) -> None:
    """Create table `name`, or add the nullable columns an older copy of it lacks."""
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table(name):
        op.create_table(name, *elements)
        return
    have = {c["name"] for c in inspector.get_columns(name)}
    missing = [e for e in elements if isinstance(e, sa.Column) and e.name not in have]
    for column in missing:
        if not column.nullable:
            raise RuntimeError(
                f"state DB table {name} lacks the required column {column.name}: it was made "
                "by an unknown version; back it up and start from an empty state DB"
            )
        with op.batch_alter_table(name) as batch:
            batch.add_column(column)


def _index(
    op: Operations, name: str, table: str, columns: list[str], unique: bool = False
) -> None:
    inspector = sa.inspect(op.get_bind())
    if name not in {ix["name"] for ix in inspector.get_indexes(table)}:
        op.create_index(name, table, columns, unique=unique)


def upgrade(op: Operations) -> None:
    _table(op, 'audit',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('model', sa.String(length=128), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('action', sa.String(length=32), nullable=False),
        sa.Column('from_stage', sa.String(length=16), nullable=True),
        sa.Column('to_stage', sa.String(length=16), nullable=True),
        sa.Column('actor', sa.String(length=128), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('data', sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint('id')
    )
    _index(op, 'ix_audit_model_version', 'audit', ['model', 'version'], unique=False)
    _table(op, 'drift_checks',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('model', sa.String(length=128), nullable=False),
        sa.Column('version', sa.String(length=32), nullable=True),
        sa.Column('dataset', sa.String(length=64), nullable=True),
        sa.Column('prompts', sa.Integer(), nullable=False),
        sa.Column('reference', sa.Integer(), nullable=False),
        sa.Column('statistic', sa.Float(), nullable=True),
        sa.Column('p_value', sa.Float(), nullable=True),
        sa.Column('threshold', sa.Float(), nullable=False),
        sa.Column('drifted', sa.Boolean(), nullable=True),
        sa.Column('event', sa.String(length=32), nullable=True),
        sa.Column('round', sa.String(length=128), nullable=True),
        sa.Column('note', sa.Text(), nullable=True),
        sa.Column('signals', sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint('id')
    )
    _index(op, 'ix_drift_checks_model_created_at', 'drift_checks', ['model', 'created_at'])
    _table(op, 'jobs',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('started_at', sa.Float(), nullable=True),
        sa.Column('finished_at', sa.Float(), nullable=True),
        sa.Column('status', sa.String(length=32), nullable=False),
        sa.Column('method', sa.String(length=32), nullable=False),
        sa.Column('model', sa.String(length=512), nullable=False),
        sa.Column('dataset', sa.String(length=128), nullable=False),
        sa.Column('parent', sa.String(length=64), nullable=True),
        sa.Column('hyperparameters', sa.JSON(), nullable=False),
        sa.Column('config', sa.JSON(), nullable=False),
        sa.Column('result', sa.JSON(), nullable=True),
        sa.Column('error', sa.JSON(), nullable=True),
        sa.Column('pid', sa.Integer(), nullable=True),
        sa.Column('host', sa.String(length=255), nullable=True),
        sa.Column('cancel_requested', sa.Boolean(), nullable=False),
        sa.Column('trained_tokens', sa.Integer(), nullable=False),
        sa.Column('run_id', sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint('id')
    )
    _index(op, 'ix_jobs_run_id', 'jobs', ['run_id'], unique=False)
    _table(op, 'locks',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('token', sa.String(length=64), nullable=False),
        sa.Column('host', sa.String(length=255), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('purpose', sa.String(length=128), nullable=False),
        sa.Column('started_at', sa.Float(), nullable=False),
        sa.Column('heartbeat_at', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('name')
    )
    _table(op, 'request_log',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('model', sa.String(length=160), nullable=False),
        sa.Column('version', sa.String(length=32), nullable=False),
        sa.Column('stage', sa.String(length=16), nullable=False),
        sa.Column('endpoint', sa.String(length=32), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('prompt', sa.JSON(), nullable=True),
        sa.Column('completion', sa.JSON(), nullable=True),
        sa.Column('finish_reason', sa.String(length=16), nullable=True),
        sa.Column('prompt_tokens', sa.Integer(), nullable=False),
        sa.Column('completion_tokens', sa.Integer(), nullable=False),
        sa.Column('ttft_s', sa.Float(), nullable=True),
        sa.Column('duration_s', sa.Float(), nullable=True),
        sa.Column('params', sa.JSON(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('receiver', sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint('id')
    )
    _index(op, 'ix_request_log_created_at', 'request_log', ['created_at'], unique=False)
    _table(op, 'served_responses',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('endpoint', sa.String(length=32), nullable=False),
        sa.Column('model', sa.String(length=160), nullable=False),
        sa.Column('version', sa.String(length=32), nullable=False),
        sa.Column('prompt', sa.JSON(), nullable=True),
        sa.Column('completion', sa.JSON(), nullable=True),
        sa.Column('digest', sa.String(length=64), nullable=False),
        sa.Column('receiver', sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint('id')
    )
    _index(op, 'ix_served_responses_created_at', 'served_responses', ['created_at'], unique=False)
    _table(op, 'tokens',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('name', sa.String(length=128), nullable=False),
        sa.Column('role', sa.String(length=16), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('revoked', sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('sha256')
    )
    _table(op, 'job_checkpoints',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('job_id', sa.String(length=64), nullable=False),
        sa.Column('step', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('metrics', sa.JSON(), nullable=False),
        sa.Column('path', sa.String(length=1024), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
        sa.PrimaryKeyConstraint('id')
    )
    _index(op, op.f('ix_job_checkpoints_job_id'), 'job_checkpoints', ['job_id'], unique=False)
    _table(op, 'job_events',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('job_id', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('level', sa.String(length=8), nullable=False),
        sa.Column('message', sa.Text(), nullable=False),
        sa.Column('data', sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
        sa.PrimaryKeyConstraint('id')
    )
    _index(op, op.f('ix_job_events_job_id'), 'job_events', ['job_id'], unique=False)
    _table(op, 'job_metrics',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('job_id', sa.String(length=64), nullable=False),
        sa.Column('step', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('values', sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
        sa.PrimaryKeyConstraint('id')
    )
    _index(op, op.f('ix_job_metrics_job_id'), 'job_metrics', ['job_id'], unique=False)
    _table(op, 'pipeline_runs',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('model', sa.String(length=128), nullable=False),
        sa.Column('trigger', sa.JSON(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('started_at', sa.Float(), nullable=True),
        sa.Column('finished_at', sa.Float(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('version', sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint('id')
    )
    _index(op, op.f('ix_pipeline_runs_model'), 'pipeline_runs', ['model'], unique=False)
    _table(op, 'pipeline_steps',
        sa.Column('run_id', sa.String(length=64), nullable=False),
        sa.Column('name', sa.String(length=32), nullable=False),
        sa.Column('position', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('started_at', sa.Float(), nullable=True),
        sa.Column('finished_at', sa.Float(), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('outputs', sa.JSON(), nullable=True),
        sa.Column('logs', sa.JSON(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('run_id', 'name')
    )


def downgrade(op: Operations) -> None:
    # The first revision: going below it means an empty database. Refused rather than
    # dropping every job, token and audit row.
    raise NotImplementedError("0001 is the first revision; back up and delete the state DB")
