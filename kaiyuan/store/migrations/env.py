"""Alembic environment: always run with a connection handed in by ``kaiyuan.store.db.upgrade``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from kaiyuan.store.schema import metadata  # so `alembic check` / compare_metadata catch drift

config = context.config
connection = config.attributes.get("connection")

if connection is None:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "sqlite:///kaiyuan.db")
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
