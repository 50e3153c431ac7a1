"""Keys, teams, users, budgets and the spend ledger.

Revision ID: 0003 (was 0002 before the chain was put in order; ``kaiyuan.store.db`` renames it)
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("allowed_models", sa.Text, nullable=True),
        sa.Column("policy", sa.String(200), nullable=True),
        sa.Column("rpm", sa.Integer, nullable=True),
        sa.Column("tpm", sa.Integer, nullable=True),
        sa.Column("max_parallel", sa.Integer, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("email", sa.String(320), nullable=True, unique=True),
        sa.Column("team_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("key_hint", sa.String(32), nullable=False),
        sa.Column("team_id", sa.String(64), nullable=True),
        sa.Column("user_id", sa.String(64), nullable=True),
        sa.Column("allowed_models", sa.Text, nullable=True),
        sa.Column("policy", sa.String(200), nullable=True),
        sa.Column("rpm", sa.Integer, nullable=True),
        sa.Column("tpm", sa.Integer, nullable=True),
        sa.Column("max_parallel", sa.Integer, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.Column("rotated_at", sa.Float, nullable=True),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    )
    op.create_index("ix_api_keys_team", "api_keys", ["team_id"])
    op.create_table(
        "budgets",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("scope", sa.String(8), nullable=False),
        sa.Column("scope_id", sa.String(64), nullable=False),
        sa.Column("period", sa.String(8), nullable=False),
        sa.Column("limit_usd", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ux_budgets_scope_period", "budgets", ["scope", "scope_id", "period"], unique=True)
    op.create_table(
        "spend_ledger",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("key_id", sa.String(64), nullable=True),
        sa.Column("team_id", sa.String(64), nullable=True),
        sa.Column("user_id", sa.String(64), nullable=True),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("deployment", sa.String(300), nullable=True),
        sa.Column("upstream_model", sa.String(200), nullable=True),
        sa.Column("vendor", sa.String(100), nullable=True),
        sa.Column("prompt_tokens", sa.Integer, nullable=True),
        sa.Column("completion_tokens", sa.Integer, nullable=True),
        sa.Column("cached_tokens", sa.Integer, nullable=True),
        sa.Column("cost_usd", sa.Float, nullable=True),
    )
    op.create_index("ix_spend_key_ts", "spend_ledger", ["key_id", "ts"])
    op.create_index("ix_spend_team_ts", "spend_ledger", ["team_id", "ts"])
    op.create_index("ix_spend_ts", "spend_ledger", ["ts"])


def downgrade() -> None:
    for t in ("spend_ledger", "budgets", "api_keys", "users", "teams"):
        op.drop_table(t)
