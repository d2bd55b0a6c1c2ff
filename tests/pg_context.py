"""An in-process service Context on a fresh PostgreSQL database of its own (migrated, the test
callers, the test registry imported, a FixedClock at TODAY 10:00 UTC), for tests that drive the
domain from many threads at once (no gRPC in between), and drop the database afterwards."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import create_pg_database, drop_pg_database
from support import CALLERS, TODAY, make_registry_file

from entitlement import app, registry
from entitlement.app import Context
from entitlement.callers import write_callers
from entitlement.clock import FixedClock
from entitlement.config import ROOT, Settings
from entitlement.storage.migrate import upgrade


@contextmanager
def pg_context(admin: str, tmp_path: Path, programs_dir: Path = ROOT / "programs",
               max_workers: int = 8) -> Iterator[tuple[Context, FixedClock]]:
    name, url = create_pg_database(admin)
    settings = Settings(listen="127.0.0.1:0", database_url=url, programs_dir=programs_dir,
                        callers_file=tmp_path / "callers.json", key_dir=tmp_path / "keys",
                        pseudonym_key_file=tmp_path / "pseudonym.key", issuer="urn:entitlement:test",
                        token_ttl_days=30, max_workers=max_workers, grace_seconds=2)
    ctx = None
    try:
        upgrade(url)
        write_callers(settings.callers_file, CALLERS)
        clock = FixedClock(dt.datetime.combine(TODAY, dt.time(10, 0), tzinfo=dt.timezone.utc))
        ctx = app.build(settings, clock=clock, create_secrets=True)
        registry.import_extract(ctx.db, ctx.pseudo, clock, make_registry_file(tmp_path / "registry.csv"),
                                extracted_on=TODAY - dt.timedelta(days=1))
        yield ctx, clock
    finally:
        if ctx is not None:
            ctx.db.dispose()
        drop_pg_database(admin, name)
