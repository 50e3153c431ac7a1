"""The console: admin-scoped keys, request-log indexes for its filters, hourly usage rollups.

Revision ID: 0005
Revises: 0002

``usage_hourly`` holds one row per (hour, model, deployment, team, key, status) with sums and
latency histograms, so the console's pages read a month of a million-request log from a few
thousand rows. ``rollup_hours`` marks each hour already rolled up (one replica wins it).
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("admin", sa.Boolean, nullable=False, server_default=sa.false()))
    op.create_index("ix_request_log_team_ts", "request_log", ["team_id", "ts"])
    op.create_index("ix_request_log_status_ts", "request_log", ["status", "ts"])
    op.create_table(
        "usage_hourly",
        sa.Column("hour", sa.BigInteger, nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("deployment", sa.String(300), nullable=False),
        sa.Column("team_id", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
        sa.Column("cached_tokens", sa.BigInteger, nullable=False),
        sa.Column("cost_usd", sa.Float, nullable=False),
        sa.Column("cost_unknown", sa.BigInteger, nullable=False),
        sa.Column("priced_prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("priced_completion_tokens", sa.BigInteger, nullable=False),
        sa.Column("priced_cached_tokens", sa.BigInteger, nullable=False),
        sa.Column("latency_hist", sa.Text, nullable=False),
        sa.Column("ttft_hist", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("hour", "model", "deployment", "team_id", "key_id", "status"),
    )
    op.create_index("ix_usage_hourly_team_hour", "usage_hourly", ["team_id", "hour"])
    op.create_table("rollup_hours", sa.Column("hour", sa.BigInteger, primary_key=True), sa.Column("rows", sa.BigInteger, nullable=False))


def downgrade() -> None:
    op.drop_table("rollup_hours")
    op.drop_index("ix_usage_hourly_team_hour", "usage_hourly")
    op.drop_table("usage_hourly")
    op.drop_index("ix_request_log_status_ts", "request_log")
    op.drop_index("ix_request_log_team_ts", "request_log")
    op.drop_column("api_keys", "admin")
