"""Plans that do not depend on fresh statistics, and statistics kept fresh (entitlement/storage/pgstats.py).

PostgreSQL plans from statistics only ANALYZE refreshes; autovacuum may be off (it is on this
project's machine kind) or behind. The server ANALYZEs the tables that changed enough since their
last analyze, every ENTITLEMENT_DB_ANALYZE_EVERY_S; StreamEvents reads the log by ranges of
sequence numbers, whatever the plan. Through the real server, over gRPC."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from own_server import next_ledger_person, own_server
from support import Api, wait_until

from entitlement import transparency
from entitlement.v1 import audit_pb2

HOT = ("activations", "events", "ledger_entries", "log_nodes", "registry_people")


def _analyzed(url: str) -> dict[str, tuple[bool, int]]:
    """Per table: (ANALYZEd by a client since the database was made, rows changed since the last analyze)."""
    with psycopg.connect(url, autocommit=True) as conn:
        # (this backend's own counters are flushed to the shared ones before it reads them)
        conn.execute("SELECT pg_stat_force_next_flush()")
        rows = conn.execute("SELECT relname, last_analyze IS NOT NULL, n_mod_since_analyze "
                            "FROM pg_stat_user_tables WHERE schemaname = current_schema()").fetchall()
    return {name: (bool(done), int(mods)) for name, done, mods in rows}


def test_the_server_keeps_postgresql_statistics_current(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """autovacuum's analyzes show as last_autoanalyze: last_analyze is the server's own doing."""
    with own_server("postgres", tmp_path / "pg", request, db_analyze_every_s=1) as h:
        api = Api(h)
        for _ in range(60):  # more than 50 rows changed in each (autovacuum's threshold, ours)
            api.activate(*next_ledger_person())
        keeper = h.ctx.db.statistics
        assert keeper is not None and keeper.alive

        seen: dict[str, tuple[bool, int]] = {}

        def current() -> bool:
            seen.update(_analyzed(h.url))
            return all(seen[t][0] and seen[t][1] <= 50 for t in HOT)
        wait_until(current, "every hot table ANALYZEd by the server", limit_s=30)
        assert keeper.failures == 0
        # Nothing changed since: a run finds nothing to do.
        wait_until(lambda: keeper.run_once() == [], "a run with nothing changed analyzes nothing", limit_s=10)


def test_no_statistics_thread_when_turned_off_or_on_sqlite(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with own_server("postgres", tmp_path / "pg", request, db_analyze_every_s=0) as h:
        assert h.ctx.db.statistics is None
        Api(h).activate(*next_ledger_person())
        assert not any(done for done, _mods in _analyzed(h.url).values())
    with own_server("sqlite", tmp_path / "lite", request, db_analyze_every_s=1) as h:
        assert h.ctx.db.statistics is None


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_stream_read_in_small_ranges_is_the_stream_read_at_once(backend: str, tmp_path: Path,
                                                                   request: pytest.FixtureRequest,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """StreamEvents reads STREAM_BATCH sequence numbers at a time: ranges of 7 give what one range
    gives, for an admin and for a funder, from any start to any tree size."""
    with own_server(backend, tmp_path / backend, request, db_analyze_every_s=0) as h:
        api = Api(h)
        for _ in range(12):
            api.activate(*next_ledger_person())

        def stream(caller: str, start: int, size: int) -> list[audit_pb2.LogEntry]:
            return list(api.as_(caller).StreamEvents(audit_pb2.StreamEventsRequest(start_sequence=start,
                                                                                   tree_size=size)))
        whole = stream("admin", 0, 0)
        size = len(whole)
        assert size >= 13 and [e.sequence for e in whole] == list(range(1, size + 1))
        cases = [("admin", 0, 0), ("admin", 3, size - 2), ("funder-ministry", 0, 0), ("funder-ministry", 5, size - 1),
                 ("funder-idf", 2, 0)]
        at_once = {case: stream(*case) for case in cases}
        monkeypatch.setattr(transparency, "STREAM_BATCH", 7)
        for case in cases:
            assert stream(*case) == at_once[case], case
        ministry = at_once[("funder-ministry", 0, 0)]
        assert [e.sequence for e in ministry] == list(range(1, size + 1))  # every leaf...
        assert sum(e.HasField("event") for e in ministry) >= 12  # ... the activations' events in full
        assert not any(e.HasField("event") for e in at_once[("funder-idf", 2, 0)])  # funds none of these
