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

# -- keys, teams, budgets, spend (revision 0002) ---------------------------------------------------
# Lists (allowed_models) are stored as JSON text; NULL means "no restriction / no limit".

teams = Table(
    "teams",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("allowed_models", Text, nullable=True),
    Column("policy", String(200), nullable=True),
    Column("rpm", Integer, nullable=True),
    Column("tpm", Integer, nullable=True),
    Column("max_parallel", Integer, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

users = Table(
    "users",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("email", String(320), nullable=True, unique=True),
    Column("team_id", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True, doc="sha256 hex of the secret; the secret is never stored"),
    Column("key_hint", String(32), nullable=False, doc="sk-ky-ab…yz, to recognise a key in lists"),
    Column("team_id", String(64), nullable=True),
    Column("user_id", String(64), nullable=True),
    Column("allowed_models", Text, nullable=True),
    Column("policy", String(200), nullable=True),
    Column("rpm", Integer, nullable=True),
    Column("tpm", Integer, nullable=True),
    Column("max_parallel", Integer, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True),
    Column("revoked_at", Float, nullable=True),
    Column("rotated_at", Float, nullable=True),
    Column("version", Integer, nullable=False, default=1, doc="bumped on every change (rotation compare-and-set)"),
)
Index("ix_api_keys_team", api_keys.c.team_id)

budgets = Table(
    "budgets",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("scope", String(8), nullable=False, doc="key | team"),
    Column("scope_id", String(64), nullable=False),
    Column("period", String(8), nullable=False, doc="day | week | month | total (UTC calendar)"),
    Column("limit_usd", Float, nullable=False),
    Column("created_at", Float, nullable=False),
)
Index("ux_budgets_scope_period", budgets.c.scope, budgets.c.scope_id, budgets.c.period, unique=True)

spend_ledger = Table(
    "spend_ledger",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("ts", Float, nullable=False),
    Column("key_id", String(64), nullable=True),
    Column("team_id", String(64), nullable=True),
    Column("user_id", String(64), nullable=True),
    Column("model", String(200), nullable=True),
    Column("deployment", String(300), nullable=True),
    Column("upstream_model", String(200), nullable=True),
    Column("vendor", String(100), nullable=True),
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("cached_tokens", Integer, nullable=True),
    Column("cost_usd", Float, nullable=True, doc="NULL: price unknown"),
)
Index("ix_spend_key_ts", spend_ledger.c.key_id, spend_ledger.c.ts)
Index("ix_spend_team_ts", spend_ledger.c.team_id, spend_ledger.c.ts)
Index("ix_spend_ts", spend_ledger.c.ts)
