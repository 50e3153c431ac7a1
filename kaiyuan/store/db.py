"""Engine creation and schema upgrade (Alembic, run programmatically at start)."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect

log = logging.getLogger("kaiyuan.store")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_NOTHING: dict[Any, None] = {}  # never written: its .get answers None for anything


def normalise_url(url: str) -> str:
    """Accept ``postgresql://`` and use the psycopg 3 driver for it."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def sqlite_path(url: str) -> str | None:
    """The file behind a ``sqlite:///path`` URL (None for other databases and for :memory:)."""
    url = normalise_url(url)
    if not url.startswith("sqlite") or ":///" not in url:
        return None
    path = url.split(":///", 1)[1].split("?", 1)[0]
    return None if path in ("", ":memory:") else str(Path(path).expanduser())


def register_sqlite_adapters() -> None:
    """Bind ``None`` and booleans without the sqlite3 module's failed adapter search.

    sqlite3 binds only exact ints, floats, strings and byte arrays directly; any other value (None,
    True) goes through its adapter registry, then asks the PrepareProtocol type for ``__adapt__``,
    whose failure formats an AttributeError message before it is cleared: ~3,500 instructions per
    parameter. A request-log row has about ten NULLs and two booleans, a ledger row a few NULLs:
    the adapt step took ~42,000 instructions per request, ~15,000 with these (callgrind,
    bench/instructions.py, bench/RESULTS.md "keys round 4"). Registered adapters are found first.
    They are C callables giving the value sqlite3 bound anyway (NULL; 1 or 0), so what is stored
    does not change. Process-wide, idempotent."""
    sqlite3.register_adapter(type(None), _NOTHING.get)  # {}.get(None) is None, a C call: bound as NULL, as before
    sqlite3.register_adapter(bool, int)  # bound as the integer it is, as before


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        register_sqlite_adapters()
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema forward to ``revision``; safe to run on every start and from many replicas."""
    from alembic import command

    cfg = alembic_config(str(engine.url.render_as_string(hide_password=False)))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # One replica migrates at a time; the others wait, then find nothing to do.
            from sqlalchemy import text

            conn.execute(text("SELECT pg_advisory_xact_lock(727274)"))
        rename_pre_reorder_revision(conn)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def rename_pre_reorder_revision(conn: Connection) -> None:
    """Databases made before the migration chain was put in order (it ran 0001 -> 0004 -> 0002)
    carry the old revision ids; give them the ids of the same schema in the ordered chain
    (0001 -> 0002 trials -> 0003 keys). Old "0004" (request log + trials) is now "0002"; old
    "0002" (everything) is now "0003", told apart from the new "0002" by its keys table."""
    insp = inspect(conn)
    if not insp.has_table("alembic_version"):
        return
    from sqlalchemy import text

    row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
    old = row[0] if row else None
    new = {"0004": "0002"}.get(old or "")
    if old == "0002" and insp.has_table("api_keys"):
        new = "0003"
    if new is not None:
        log.info("store: renaming migration revision %s to %s (the chain was put in order)", old, new)
        conn.execute(text("UPDATE alembic_version SET version_num = :new"), {"new": new})


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        from sqlalchemy import text

        row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
        return row[0] if row else None


def open_store(url: str) -> Engine:
    engine = make_engine(url)
    if os.environ.get("KAIYUAN_SKIP_MIGRATIONS") != "1":
        upgrade(engine)
    return engine
