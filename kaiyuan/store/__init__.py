"""Durable state: SQLAlchemy Core schema, Alembic migrations, SQLite by default, PostgreSQL for many replicas."""
