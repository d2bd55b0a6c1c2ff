"""Schema versions: Alembic owns the schema. The server refuses to start unless the database is
at the head revision, and says which command fixes it."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from entitlement.storage.db import Database, normalize_url

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


class SchemaNotCurrent(RuntimeError):
    pass


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def current_revision(db: Database) -> str | None:
    with db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def ensure_current(db: Database) -> None:
    """Raise SchemaNotCurrent with the fix when the database is not at the code's revision."""
    current, head = current_revision(db), head_revision()
    if current == head:
        return
    if current is None:
        raise SchemaNotCurrent(
            "the database has no schema (not migrated); run `entitlement db upgrade` "
            "(or `make migrate`) with the same ENTITLEMENT_DATABASE_URL")
    known = {r.revision for r in ScriptDirectory.from_config(alembic_config("sqlite://")).walk_revisions()}
    if current not in known:
        raise SchemaNotCurrent(
            f"the database schema is at revision {current}, which this version does not know (it needs "
            f"{head}): the database was migrated by a newer version; run that version instead")
    raise SchemaNotCurrent(
        f"the database schema is at revision {current} but this version needs {head}; "
        "run `entitlement db upgrade` (or `make migrate`) with the same ENTITLEMENT_DATABASE_URL")
