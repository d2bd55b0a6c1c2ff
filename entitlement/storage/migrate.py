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
    """Migrate to `revision`. SchemaNotCurrent, with the server's message, when the database is at
    a revision this version does not know (Alembic would only say it cannot locate it)."""
    db = Database(url, pool_size=1)
    try:
        current = current_revision(db)
    finally:
        db.dispose()
    if current is not None and current not in known_revisions():
        raise SchemaNotCurrent(newer_version(current))
    command.upgrade(alembic_config(url), revision)


def raised_by_migration(exc: BaseException) -> bool:
    """Whether `exc` was raised by a migration script itself (a RuntimeError saying why the data
    cannot be migrated as it is), not by a fault of the code running it."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(MIGRATIONS)


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def known_revisions() -> set[str]:
    return {r.revision for r in ScriptDirectory.from_config(alembic_config("sqlite://")).walk_revisions()}


def newer_version(current: str) -> str:
    """What to say of a database at a revision this version does not know."""
    return (f"the database schema is at revision {current}, which this version does not know (it needs "
            f"{head_revision()}): the database was migrated by a newer version; run that version instead")


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
    if current not in known_revisions():
        raise SchemaNotCurrent(newer_version(current))
    raise SchemaNotCurrent(
        f"the database schema is at revision {current} but this version needs {head}; "
        "run `entitlement db upgrade` (or `make migrate`) with the same ENTITLEMENT_DATABASE_URL")
