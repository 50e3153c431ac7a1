"""Trials: definitions, results, spend ledger, routing overrides (promote / rollback).

Revision ID: 0002 (was 0004 before the chain was put in order; ``kaiyuan.store.db`` renames it)
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trial_def",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("definition", sa.Text, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
    )
    op.create_table(
        "trial_result",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("trial", sa.String(100), nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("item", sa.String(200), nullable=True),
        sa.Column("candidate", sa.String(200), nullable=False),
        sa.Column("request", sa.Text, nullable=True),
        sa.Column("incumbent_answer", sa.Text, nullable=True),
        sa.Column("candidate_answer", sa.Text, nullable=True),
        sa.Column("incumbent_ms", sa.Float, nullable=True),
        sa.Column("candidate_ms", sa.Float, nullable=True),
        sa.Column("incumbent_cost", sa.Float, nullable=True),
        sa.Column("candidate_cost", sa.Float, nullable=True),
        sa.Column("incumbent_error", sa.Text, nullable=True),
        sa.Column("candidate_error", sa.Text, nullable=True),
        sa.Column("judge_score", sa.Float, nullable=True),
        sa.Column("judge_status", sa.String(32), nullable=True),
        sa.Column("judge_detail", sa.Text, nullable=True),
        sa.Column("scores", sa.Text, nullable=True),
    )
    op.create_index("ix_trial_result_trial_ts", "trial_result", ["trial", "ts"])
    op.create_table(
        "trial_spend",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("trial", sa.String(100), nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("cost_usd", sa.Float, nullable=False),
    )
    op.create_index("ix_trial_spend_trial", "trial_spend", ["trial"])
    op.create_table(
        "trial_routing",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("trial", sa.String(100), nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("incumbent", sa.String(200), nullable=False),
        sa.Column("candidate", sa.String(200), nullable=False),
        sa.Column("steps", sa.Text, nullable=False),
        sa.Column("step_s", sa.Float, nullable=False),
        sa.Column("actor", sa.String(200), nullable=True),
        sa.Column("note", sa.Text, nullable=True),
    )
    op.create_index("ix_trial_routing_trial", "trial_routing", ["trial", "id"])


def downgrade() -> None:
    for t in ("trial_routing", "trial_spend", "trial_result", "trial_def"):
        op.drop_table(t)
