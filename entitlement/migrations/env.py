"""Alembic environment: runs migrations through entitlement.storage.db.Database so SQLite gets
the same connection setup (WAL, foreign keys, explicit BEGIN) as the server."""

from __future__ import annotations

from alembic import context

from entitlement.storage.db import Database
from entitlement.storage.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url, "sqlalchemy.url is not set"
db = Database(url, pool_size=1)
try:
    with db.engine.connect() as connection:
        connection.execution_options(entitlement_write=True)
        context.configure(connection=connection, target_metadata=Base.metadata,
                          render_as_batch=db.is_sqlite, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
finally:
    db.dispose()
