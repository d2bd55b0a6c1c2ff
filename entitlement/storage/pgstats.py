"""PostgreSQL: the planner's statistics of the service's tables, kept current by the server itself.

PostgreSQL plans each statement from statistics (rows per table, values per column) that only
ANALYZE refreshes. autovacuum runs it when a table has changed by 50 rows + 10 % since the last
one, but autovacuum may be off (it is on this project's machine kind) or behind, and the
statistics then describe the tables as they were: nearly empty, on a new deployment. Plans made on
them were measured (docs/PERFORMANCE-LOG.md, twenty-fifth and twenty-sixth sessions): a funder's
ListActivations page 8 ms instead of 0.6 ms at 3,000 activations (a sort of every activation), a
funder's StreamEvents batch of 500 events 2 to 5 s at 20,000 events instead of 10 ms (the ledger
read once per event), and worse as the tables grow.

So each server process runs a `StatisticsKeeper`: every `every_s` seconds it asks PostgreSQL which
tables of the schema have changed by more than autovacuum's own threshold since their last analyze
(`pg_stat_user_tables.n_mod_since_analyze` against 50 + 10 % of the rows the statistics know) and
ANALYZEs those. With autovacuum on and keeping up it finds nothing to do (one catalog query); one
process at a time does the work (a session advisory lock, skipped when taken). It runs on a
connection of its own (no statement of it is counted among the calls'); a failure (the database
down, ANALYZE not permitted to the service's role) is logged and the next run tries again.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from entitlement.storage.periodic import PeriodicTask

THRESHOLD_ROWS = 50  # autovacuum_analyze_threshold's default
SCALE = 0.1  # autovacuum_analyze_scale_factor's default
LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout ran out

_STALE = text(
    "SELECT s.relname FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid "
    "WHERE s.schemaname = current_schema() "
    "AND s.n_mod_since_analyze > :threshold + :scale * GREATEST(c.reltuples, 0) ORDER BY s.relname")


class StatisticsKeeper(PeriodicTask):
    """ANALYZE of the tables that changed enough since their last one (module docstring), in a
    thread of its own, every `every_s` seconds; `run_once` for tests and tools."""

    FAILED_EVENT = "postgresql_analyze_failed"

    def __init__(self, url: str, connect_args: dict[str, Any], every_s: float, lock_key: int) -> None:
        super().__init__(every_s, "pg-statistics")
        self._engine: Engine = create_engine(url, pool_size=1, max_overflow=0, isolation_level="AUTOCOMMIT",
                                             hide_parameters=True, connect_args=connect_args,
                                             pool_pre_ping=True)
        self._lock_key = lock_key
        self.analyzed: list[str] = []  # the tables of the last run that ANALYZEd any
        self._start()

    def run_once(self) -> list[str] | None:
        """ANALYZE the tables that need it: their names; None when another process held the lock."""
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("the statistics thread was stopped")
            with self._engine.connect() as conn:
                if not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self._lock_key}).scalar():
                    return None
                try:
                    stale = list(conn.execute(_STALE, {"threshold": THRESHOLD_ROWS, "scale": SCALE}).scalars())
                    done = []
                    for name in stale:
                        try:  # (names from the catalog, quoted as identifiers)
                            conn.execute(text("ANALYZE " + conn.dialect.identifier_preparer.quote(name)))
                        except OperationalError as exc:
                            if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                                raise
                            continue  # another ANALYZE or a VACUUM has it: the next run's
                        done.append(name)
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._lock_key})
            self.runs += 1
            if done:
                self.analyzed = done
            return done

    def _close(self) -> None:
        self._engine.dispose()  # (a new connection at the next run)
