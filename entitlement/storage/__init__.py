"""Storage: SQLAlchemy 2 models, the Database (sessions with the right transaction mode per backend)
and the Alembic migrations that own the schema. SQLite (embedded default) and PostgreSQL."""
