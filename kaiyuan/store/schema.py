"""The schema, as SQLAlchemy Core tables. Migrations under ``migrations/versions`` create them."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    false,
    text,
)

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
    Column("writer_txid", BigInteger, nullable=True,
           doc="PostgreSQL: the writing transaction's id, a column default (the console rollup's cursor, migration 0007); "
               "NULL on SQLite, whose rowid is that cursor"),
)
Index("ix_request_log_ts", request_log.c.ts)
# Only PostgreSQL fills writer_txid; on SQLite the partial index stays empty and costs an insert nothing.
Index("ix_request_log_writer_txid", request_log.c.writer_txid, request_log.c.id,
      sqlite_where=request_log.c.writer_txid.is_not(None))
Index("ix_request_log_key_ts", request_log.c.key_id, request_log.c.ts)
Index("ix_request_log_model_ts", request_log.c.model, request_log.c.ts)
Index("ix_request_log_team_ts", request_log.c.team_id, request_log.c.ts)
Index("ix_request_log_status_ts", request_log.c.status, request_log.c.ts)

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
    Column("admin", Boolean, nullable=False, default=False, server_default=false(),
           doc="admin-scoped: may use the admin API and the console as an admin (revision 0005)"),
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

# -- trials (migration 0004) -----------------------------------------------------------------------
trial_def = Table(
    "trial_def",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("definition", Text, nullable=False, doc="the TrialConfig as JSON (admin API)"),
    Column("created", Float, nullable=False),
    Column("status", String(32), nullable=False, default="active", doc="active | stopped"),
)

trial_result = Table(
    "trial_result",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("trial", String(100), nullable=False),
    Column("ts", Float, nullable=False),
    Column("source", String(16), nullable=False, doc="shadow | canary | offline"),
    Column("item", String(200), nullable=True, doc="dataset item id or request id"),
    Column("candidate", String(200), nullable=False),
    Column("request", Text, nullable=True),
    Column("incumbent_answer", Text, nullable=True),
    Column("candidate_answer", Text, nullable=True),
    Column("incumbent_ms", Float, nullable=True),
    Column("candidate_ms", Float, nullable=True),
    Column("incumbent_cost", Float, nullable=True),
    Column("candidate_cost", Float, nullable=True),
    Column("incumbent_error", Text, nullable=True),
    Column("candidate_error", Text, nullable=True),
    Column("judge_score", Float, nullable=True, doc="1 candidate better, 0.5 tie, 0 worse; NULL not judged"),
    Column("judge_status", String(32), nullable=True, doc="ok | unparsable | error | skipped_policy | skipped_budget"),
    Column("judge_detail", Text, nullable=True),
    Column("scores", Text, nullable=True, doc="JSON {scorer: {incumbent: x, candidate: y}}"),
)
Index("ix_trial_result_trial_ts", trial_result.c.trial, trial_result.c.ts)

trial_spend = Table(
    "trial_spend",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("trial", String(100), nullable=False),
    Column("ts", Float, nullable=False),
    Column("kind", String(16), nullable=False, doc="candidate | judge | incumbent (offline replays)"),
    Column("model", String(200), nullable=False),
    Column("cost_usd", Float, nullable=False),
)
Index("ix_trial_spend_trial", trial_spend.c.trial)

trial_routing = Table(
    "trial_routing",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("trial", String(100), nullable=False),
    Column("ts", Float, nullable=False),
    Column("action", String(16), nullable=False, doc="promote | rollback"),
    Column("incumbent", String(200), nullable=False),
    Column("candidate", String(200), nullable=False),
    Column("steps", Text, nullable=False, doc="JSON list of shares in [0, 1]"),
    Column("step_s", Float, nullable=False, default=0.0, doc="seconds between steps"),
    Column("actor", String(200), nullable=True),
    Column("note", Text, nullable=True),
)
Index("ix_trial_routing_trial", trial_routing.c.trial, trial_routing.c.id)

# -- console rollups (migration 0005) --------------------------------------------------------------
# NULL dimensions are stored as "" so that they can be part of the primary key.
usage_hourly = Table(
    "usage_hourly",
    metadata,
    Column("hour", BigInteger, nullable=False, doc="unix hour: floor(ts / 3600)"),
    Column("model", String(200), nullable=False),
    Column("deployment", String(300), nullable=False),
    Column("team_id", String(64), nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("status", Integer, nullable=False),
    Column("requests", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("cached_tokens", BigInteger, nullable=False),
    Column("cost_usd", Float, nullable=False, doc="cost_nano / 1e9 (for reading)"),
    Column("cost_nano", BigInteger, nullable=False, server_default=text("0"),
           doc="sum over requests with a known cost, each rounded to integer nano-USD: exact in any number of passes"),
    Column("cost_unknown", BigInteger, nullable=False, doc="answered requests (status < 400) whose cost is unknown (no price)"),
    Column("priced_prompt_tokens", BigInteger, nullable=False, doc="tokens of the requests with a known cost (for savings)"),
    Column("priced_completion_tokens", BigInteger, nullable=False),
    Column("priced_cached_tokens", BigInteger, nullable=False),
    Column("latency_hist", Text, nullable=False, doc="JSON {bucket: count}, see kaiyuan.console.histogram"),
    Column("ttft_hist", Text, nullable=False),
    PrimaryKeyConstraint("hour", "model", "deployment", "team_id", "key_id", "status"),
)
Index("ix_usage_hourly_team_hour", usage_hourly.c.team_id, usage_hourly.c.hour)

# The last request-log row summed into usage_hourly, in write order (migration 0007;
# kaiyuan/console/rollup.py): SQLite's rowid or PostgreSQL's writer_txid, and the row's id.
rollup_cursor = Table(
    "rollup_cursor",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("after_seq", BigInteger, nullable=False),
    Column("after_id", String(64), nullable=False),
)

# -- stored Responses API responses (revision 0006) -----------------------------------------------
# One row per response made with store: true, scoped to the key that made it. ``history`` is the
# whole conversation up to and including this response's output (Responses items, JSON), so that
# ``previous_response_id`` costs one read, not a walk up the chain.
responses = Table(
    "responses",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("key_id", String(64), nullable=True, doc="the virtual key that made it; NULL: master key / no auth"),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True, doc="unix time after which it is gone (retention)"),
    Column("model", String(200), nullable=True),
    Column("response", Text, nullable=False, doc="the response object as returned (JSON)"),
    Column("input_items", Text, nullable=False, doc="this request's own input items (JSON list)"),
    Column("history", Text, nullable=False, doc="conversation items through this output (JSON list)"),
)
Index("ix_responses_expires", responses.c.expires_at)

# Secrets the gateway generates for itself when none is configured (the reasoning seal key).
gateway_secrets = Table(
    "gateway_secrets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", String(200), nullable=False),
    Column("created_at", Float, nullable=False),
)
