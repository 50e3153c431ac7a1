"""The console rollup becomes incremental: a write-order cursor over the request log.

Revision ID: 0007
Revises: 0006

Each rollup pass now sums only the request-log rows written since the last pass
(kaiyuan/console/rollup.py). Its cursor is SQLite's rowid, and on PostgreSQL a new column,
``request_log.writer_txid``, filled by a column default with the writing transaction's id (adding it
rewrites the table once; every existing row gets this migration's id). ``rollup_cursor`` holds the
last summed row; ``usage_hourly.cost_nano`` sums money in integer nano-USD. ``rollup_hours`` (the
closed hours of the old, per-hour pass) goes. The rollup's rows are derived data: they are dropped
here and the gateway's first passes sum the whole log again.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TXID_DEFAULT = "(pg_current_xact_id()::text)::bigint"  # PostgreSQL 13 and later


def upgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    op.add_column("request_log", sa.Column("writer_txid", sa.BigInteger, nullable=True,
                                           server_default=sa.text(TXID_DEFAULT) if pg else None))
    op.create_index("ix_request_log_writer_txid", "request_log", ["writer_txid", "id"],
                    sqlite_where=sa.text("writer_txid IS NOT NULL"))
    op.execute("DELETE FROM usage_hourly")
    op.add_column("usage_hourly", sa.Column("cost_nano", sa.BigInteger, nullable=False, server_default=sa.text("0")))
    op.drop_table("rollup_hours")
    op.create_table(
        "rollup_cursor",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("after_seq", sa.BigInteger, nullable=False),
        sa.Column("after_id", sa.String(64), nullable=False),
    )
    op.execute("INSERT INTO rollup_cursor (name, after_seq, after_id) VALUES ('request_log', -1, '')")


def downgrade() -> None:
    op.drop_table("rollup_cursor")
    op.create_table("rollup_hours", sa.Column("hour", sa.BigInteger, primary_key=True), sa.Column("rows", sa.BigInteger, nullable=False))
    op.execute("DELETE FROM usage_hourly")  # the old pass sums every hour again
    op.drop_column("usage_hourly", "cost_nano")
    op.drop_index("ix_request_log_writer_txid", "request_log")
    op.drop_column("request_log", "writer_txid")
