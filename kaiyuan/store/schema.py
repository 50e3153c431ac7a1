"""The schema, as SQLAlchemy Core tables. Migrations under ``migrations/versions`` create them."""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Float, Index, Integer, MetaData, String, Table, Text

metadata = MetaData()

request_log = Table(
    "request_log",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("ts", Float, nullable=False, doc="unix time the request arrived"),
    Column("key_id", String(64), nullable=True),
    Column("team_id", String(64), nullable=True),
    Column("dialect", String(16), nullable=False),
    Column("endpoint", String(32), nullable=False),
    Column("model", String(200), nullable=True),
    Column("deployment", String(300), nullable=True),
    Column("stream", Boolean, nullable=False, default=False),
    Column("status", Integer, nullable=False),
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("cached_tokens", Integer, nullable=True),
    Column("reasoning_tokens", Integer, nullable=True),
    Column("cost_usd", Float, nullable=True, doc="NULL when the price is unknown, never 0 by default"),
    Column("latency_ms", Float, nullable=True),
    Column("ttft_ms", Float, nullable=True),
    Column("attempts", Integer, nullable=False, default=1),
    Column("attempt_log", Text, nullable=True, doc="JSON list of attempts: deployment, status, error, ms"),
    Column("policy", String(200), nullable=True),
    Column("trial", String(200), nullable=True),
    Column("cancelled", Boolean, nullable=False, default=False),
    Column("error", Text, nullable=True),
    Column("request_body", Text, nullable=True),
    Column("response_body", Text, nullable=True),
)
Index("ix_request_log_ts", request_log.c.ts)
Index("ix_request_log_key_ts", request_log.c.key_id, request_log.c.ts)
Index("ix_request_log_model_ts", request_log.c.model, request_log.c.ts)
