"""RegistryService.ImportExtract: the agency pushes an extract over a client stream."""

from __future__ import annotations

import hashlib
import tempfile
import threading
import tracemalloc
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import grpc
import pytest
from sqlalchemy import func, select

from own_server import default_people, own_server, write_registry
from support import (TODAY, Api, date_msg, expect_error, identity, log_records, make_registry_file, sqlite_writer_sees,
                     tmpfs, wait_until)

from entitlement import registry
from entitlement.storage.models import RegistryPerson, RegistrySnapshot
from entitlement.v1 import eligibility_pb2, registry_pb2, registry_pb2_grpc


def _stream(data: bytes, *, extracted_on: str = TODAY.isoformat(), sha256: str = "", chunk: int = 64 * 1024,
            min_ratio: float = 0.0, name: str = "extract.csv") -> Iterator[registry_pb2.ImportExtractRequest]:
    yield registry_pb2.ImportExtractRequest(header=registry_pb2.ExtractHeader(
        extracted_on=date_msg(extracted_on), source_name=name, sha256=sha256, min_ratio=min_ratio))
    for i in range(0, len(data), chunk):
        yield registry_pb2.ImportExtractRequest(chunk=data[i:i + chunk])


def _extract(tmp_path: Path, extra: str = "") -> bytes:
    """The harness's registry (so nobody disappears), plus `extra` rows."""
    path = make_registry_file(tmp_path / "push.csv")
    return path.read_bytes() + extra.encode()


def _check(api: Api, agency_id: str, birth: str) -> eligibility_pb2.EligibilityDecision:
    [d] = api.advisor.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
        job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers")).decisions
    return d


def test_push_imports_a_new_snapshot_and_reports_rejects(api: Api, tmp_path: Path) -> None:
    before = _check(api, "PUSHED01", "1991-01-01")
    assert not before.eligible
    data = _extract(tmp_path, "PUSHED01,,Feed,Test,1991-01-01,75011,2025-01-06,,1\n"
                              "BADROW01,,Feed,Test,1991-02-30,75011,2025-01-06,,1\n")
    resp = api.as_("agency-feed").ImportExtract(_stream(data, sha256=hashlib.sha256(data).hexdigest()))
    assert not resp.unchanged
    assert resp.rows_read == resp.rows_imported + resp.rows_rejected
    assert resp.rows_rejected == 1 and resp.rejected_rows[0].reason.startswith("dateNaissance")
    assert resp.rejected_rows[0].line == data.decode().count("\n")  # the last line
    after = _check(api, "PUSHED01", "1991-01-01")
    assert after.eligible and after.registry_snapshot == resp.snapshot
    assert after.registry_snapshot != before.registry_snapshot

    again = api.as_("agency-feed").ImportExtract(_stream(data))
    assert again.unchanged and again.snapshot == resp.snapshot


def test_refused_pushes_leave_the_snapshot_in_force(api: Api, tmp_path: Path) -> None:
    current = _check(api, "IDF0001", "2000-01-01").registry_snapshot
    feed = api.as_("agency-feed").ImportExtract
    data = _extract(tmp_path)

    f = expect_error(feed, _stream(data, sha256="0" * 64), grpc.StatusCode.INVALID_ARGUMENT)
    assert "header.sha256" in f.fields
    f = expect_error(feed, _stream(b"nom,prenom\nA,B\n"), grpc.StatusCode.FAILED_PRECONDITION)
    assert f.reason == "EXTRACT_REFUSED" and "header lacks" in f.message and "/tmp" not in f.message
    f = expect_error(feed, _stream("identifiant\n\udcff".encode("utf-8", "surrogateescape")),
                     grpc.StatusCode.FAILED_PRECONDITION)
    assert f.reason == "EXTRACT_REFUSED"
    cut = b"\n".join(data.splitlines()[:50]) + b"\n"  # a cut-off file: far fewer rows than in force
    f = expect_error(feed, _stream(cut, min_ratio=0.5), grpc.StatusCode.FAILED_PRECONDITION)
    assert "fewer than 50%" in f.message

    only_chunks = iter([registry_pb2.ImportExtractRequest(chunk=data[:100])])
    f = expect_error(feed, only_chunks, grpc.StatusCode.INVALID_ARGUMENT)
    assert "header" in f.fields
    bad_date = iter([registry_pb2.ImportExtractRequest(header=registry_pb2.ExtractHeader())])
    f = expect_error(feed, bad_date, grpc.StatusCode.INVALID_ARGUMENT)
    assert "header.extracted_on" in f.fields
    two_headers = iter([*list(_stream(data[:10])), registry_pb2.ImportExtractRequest(
        header=registry_pb2.ExtractHeader(extracted_on=date_msg(TODAY)))])
    f = expect_error(feed, two_headers, grpc.StatusCode.INVALID_ARGUMENT)
    big = iter([*list(_stream(b""))[:1], registry_pb2.ImportExtractRequest(chunk=b"x" * ((1 << 20) + 1))])
    f = expect_error(feed, big, grpc.StatusCode.INVALID_ARGUMENT)
    assert "chunk" in f.fields
    # The header's own fields, as registry.proto lists them.
    for kw, field in (({"sha256": "abc"}, "header.sha256"), ({"min_ratio": 1.5}, "header.min_ratio"),
                      ({"min_ratio": -0.1}, "header.min_ratio"), ({"name": "x" * 256}, "header.source_name"),
                      ({"name": "two\nlines"}, "header.source_name")):
        f = expect_error(feed, _stream(data, **kw), grpc.StatusCode.INVALID_ARGUMENT)
        assert set(f.fields) == {field}, (kw, f.fields)

    assert _check(api, "IDF0001", "2000-01-01").registry_snapshot == current


def test_an_extract_over_the_size_limit_is_resource_exhausted_and_imports_nothing(
        api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """registry.proto: EXTRACT_TOO_LARGE past 4 GiB, refused as the byte past it arrives. The limit
    is lowered here (the harness's server runs in this process) to the registry file less a byte."""
    from entitlement import registry_feed
    assert registry_feed.MAX_EXTRACT_BYTES == 4 << 30  # what the proto says
    current = _check(api, "IDF0001", "2000-01-01").registry_snapshot
    data = _extract(tmp_path, "TOOBIG01,,Feed,Test,1991-01-01,75011,2025-01-06,,1\n")
    monkeypatch.setattr(registry_feed, "MAX_EXTRACT_BYTES", len(data) - 1)
    f = expect_error(api.as_("agency-feed").ImportExtract, _stream(data), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert f.reason == "EXTRACT_TOO_LARGE"
    assert _check(api, "IDF0001", "2000-01-01").registry_snapshot == current
    assert not _check(api, "TOOBIG01", "1991-01-01").eligible


@pytest.mark.parametrize("caller", ["advisor-paris", "platform-oc", "funder-ministry"])
def test_only_the_agency_feed_and_admins_push(api: Api, caller: str, tmp_path: Path) -> None:
    f = expect_error(api.as_(caller).ImportExtract, _stream(b"x"), grpc.StatusCode.PERMISSION_DENIED)
    assert f.reason == "ROLE_NOT_ALLOWED"


def test_a_duplicate_differing_only_by_its_end_date_is_rejected_and_the_rest_imported(api: Api, tmp_path: Path) -> None:
    """Two rows of one identifiant alike up to dateCessationInscription, given in one and empty in
    the other (a person re-sent after a correction): SQLite's first batches were sorted as whole
    rows, comparing the date with the empty one (None) raised TypeError and the whole import failed
    (INTERNAL), where PostgreSQL rejected the second row as the duplicate it is."""
    data = _extract(tmp_path, "DUPEND01,,Feed,Test,1991-01-01,75011,2025-01-06,2025-06-30,1\n"
                              "DUPEND01,,Feed,Test,1991-01-01,75011,2025-01-06,,1\n")
    resp = api.as_("agency-feed").ImportExtract(_stream(data))
    assert resp.rows_read == resp.rows_imported + resp.rows_rejected and resp.rows_rejected == 1
    [rejected] = resp.rejected_rows
    assert rejected.line == data.decode().count("\n") and "duplicate" in rejected.reason  # the second row
    after = _check(api, "DUPEND01", "1991-01-01")  # the first row stands: registration ended
    assert after.registry_snapshot == resp.snapshot and not after.eligible


def test_rejected_rows_never_echo_a_value_of_the_row(api: Api, tmp_path: Path) -> None:
    """`rejected_rows`: "no row content is echoed". A bad date's reason quoted the value: a birth
    date written another way (17/05/1990) went back in the answer, and into the rejects file."""
    data = _extract(tmp_path, "ECHO0001,,Feed,Test,17/05/1990,75011,2025-01-06,,1\n"
                              "ECHO0002,,Feed,Test,1990-05-17,75011,06/01/2025,,1\n"
                              "ECHO0003,,Feed,Test,1990-05-17,75011,2025-01-06,2025-13-40,1\n")
    resp = api.as_("agency-feed").ImportExtract(_stream(data))
    reasons = [r.reason for r in resp.rejected_rows]
    assert [r.split(":")[0] for r in reasons] == ["dateNaissance", "dateInscription", "dateCessationInscription"]
    for value in ("17/05/1990", "06/01/2025", "2025-13-40", "1990", "2025"):
        assert not any(value in r for r in reasons), (value, reasons)


def test_a_cut_off_push_is_told_the_header_field_that_accepts_it(api: Api, tmp_path: Path) -> None:
    """The refusal of a cut-off extract told the agency `--min-ratio 0 accepts it`: a flag of the
    command line, and over gRPC a min_ratio of 0 is the default (0.5), refused again. It names the
    request's field and a value that does accept it."""
    data = _extract(tmp_path)
    cut = b"\n".join(data.splitlines()[:50]) + b"\n"
    feed = api.as_("agency-feed").ImportExtract
    f = expect_error(feed, _stream(cut), grpc.StatusCode.FAILED_PRECONDITION)
    assert f.reason == "EXTRACT_REFUSED" and "fewer than 50%" in f.message
    assert "--min-ratio" not in f.message and "header.min_ratio" in f.message, f.message
    expect_error(feed, _stream(cut, min_ratio=0.0), grpc.StatusCode.FAILED_PRECONDITION)  # 0: the default
    try:
        assert feed(_stream(cut, min_ratio=1e-9)).rows_imported == 49  # what the message says accepts it
    finally:
        feed(_stream(data))  # the whole registry again, for the other tests


def test_a_line_without_end_is_refused_without_being_held_whole(api: Api, tmp_path: Path) -> None:
    """The csv module reads a whole line, and makes a string of every field it holds, before a row
    can be judged: a pushed file that is not one row per line (a JSON dump of the status API, a
    file whose line ends were lost) made the server hold the line and a list as long as its fields
    (8 bytes each: 16 MiB of commas took some 150 MB; the 4 GiB an extract may weigh, tens of GB).
    A line over 1 MiB now refuses the extract as soon as it is seen."""
    header = _extract(tmp_path).split(b"\n", 1)[0] + b"\n"
    feed = api.as_("agency-feed").ImportExtract
    for data, line in ((header + b"," * (16 << 20) + b"\n", 2), (b"x," * (8 << 20), 1)):
        tracemalloc.start()
        try:
            f = expect_error(feed, _stream(data, chunk=1 << 20), grpc.StatusCode.FAILED_PRECONDITION)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert f.reason == "EXTRACT_REFUSED" and f"line {line} is longer than 1 MiB" in f.message, f.message
        assert peak < 24 << 20, f"the server held {peak >> 20} MiB for one line"


def test_a_repeated_ignored_column_is_ignored_and_a_repeated_needed_one_is_named(api: Api, tmp_path: Path) -> None:
    """Any column named twice refused the whole extract ("header repeats a column", naming none):
    a spreadsheet's export with two unnamed columns at the end (`...,codeCategorieInscription,,`)
    kept every job seeker on the old data. Ignored columns are ignored, repeated or not; a column
    the rules read, named twice, is ambiguous: refused, and named."""
    lines = _extract(tmp_path, "REPCOL01,,Feed,Test,1991-01-01,75011,2025-01-06,,1\n").decode().splitlines()
    trailing = "".join(f"{line},,\n" for line in lines).encode()
    resp = api.as_("agency-feed").ImportExtract(_stream(trailing))
    assert resp.rows_rejected == 0 and resp.rows_imported == len(lines) - 1
    assert _check(api, "REPCOL01", "1991-01-01").registry_snapshot == resp.snapshot

    twice = "".join(f"{line},{line.split(',')[4]}\n" for line in lines).encode()  # dateNaissance again
    f = expect_error(api.as_("agency-feed").ImportExtract, _stream(twice), grpc.StatusCode.FAILED_PRECONDITION)
    assert f.reason == "EXTRACT_REFUSED" and "repeats column(s) dateNaissance" in f.message, f.message


def test_an_extract_in_lower_case_holds_no_more_memory_than_in_upper_case(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """An identifiant written with lower-case letters may key activations of an earlier version,
    re-keyed at the switch: the import kept a pair of keys for EVERY such row until then (about 200
    bytes a row: 1.2 GB for a 6 M-row extract written in lower case), and the switch's transaction
    looked every one up. Only the pairs of keys that have activations are kept now, the others
    dropped after each batch (small batches here: what one batch holds meanwhile stays small)."""
    monkeypatch.setattr(registry, "BATCH", 2_000)
    peaks = {}
    with own_server(backend[0], tmp_path / "own", request) as server:
        feed = registry_pb2_grpc.RegistryServiceStub(server.channel).ImportExtract
        md = (("authorization", f"Bearer {server.tokens['agency-feed']}"),)
        for case in (str.upper, str.lower):
            people = default_people()
            people.update({case(f"case{i:06d}x"): ("1990-01-01", "75011", "2024-01-15", "", "1")
                           for i in range(40_000)})
            data = write_registry(tmp_path / f"{case.__name__}.csv", people).read_bytes()
            tracemalloc.start()
            try:
                resp = feed(_stream(data, chunk=1 << 20, min_ratio=1e-9), metadata=md, timeout=120)
                _, peaks[case.__name__] = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert resp.rows_imported == len(people)
    assert peaks["lower"] < peaks["upper"] + (3 << 20), {k: v >> 20 for k, v in peaks.items()}


def test_an_import_whose_deadline_passes_stops_and_leaves_no_rows_behind(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The deadline passing during the import (after the upload): the server went on loading the
    whole file for nobody, then failed at the switch, and the discard of its rows ran under the
    same expired deadline and failed too: the snapshot stayed `importing` with every row (personal
    data, up to millions of rows) until the next import. It now stops at the next batch and its
    rows go."""
    with own_server(backend[0], tmp_path / "own", request) as server:
        feed = registry_pb2_grpc.RegistryServiceStub(server.channel).ImportExtract
        md = (("authorization", f"Bearer {server.tokens['agency-feed']}"),)
        people = default_people()
        people.update({f"DL{i:07d}": ("1990-01-01", "75011", "2024-01-15", "", "1") for i in range(150_000)})
        data = write_registry(tmp_path / "big.csv", people).read_bytes()
        with pytest.raises(grpc.RpcError) as err:  # (the upload takes a fraction of it, the import seconds)
            feed(_stream(data, chunk=1 << 20, min_ratio=1e-9), metadata=md, timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        def left_behind() -> list[tuple[int, str, int]]:
            with server.ctx.db.read() as s:
                rows = dict(s.execute(select(RegistryPerson.snapshot_id, func.count())
                                      .group_by(RegistryPerson.snapshot_id)).all())
                return [(sid, status, rows.get(sid, 0)) for sid, status in
                        s.execute(select(RegistrySnapshot.id, RegistrySnapshot.status)).all() if status != "complete"]
        wait_until(lambda: not any(status == "importing" for _, status, _ in left_behind()),
                   "the import given up ended", limit_s=30)
        # (one failed snapshot; none if, on a slow machine, the deadline passed during the upload)
        assert all((status, rows) == ("failed", 0) for _, status, rows in left_behind()), left_behind()


def test_a_push_that_stops_sending_is_given_up_and_frees_the_import_slot(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A pusher stalled with its stream open (its connection alive) held the process's one import
    slot until its own deadline, if any: every other push was IMPORT_IN_PROGRESS meanwhile. With no
    chunk for ENTITLEMENT_IMPORT_IDLE_SECONDS the push is ABORTED PUSH_IDLE and the next one imports."""
    with own_server(backend[0], tmp_path / "own", request, import_idle_seconds=1) as server:
        feed = registry_pb2_grpc.RegistryServiceStub(server.channel).ImportExtract
        md = (("authorization", f"Bearer {server.tokens['agency-feed']}"),)
        data = write_registry(tmp_path / "again.csv", default_people()).read_bytes()
        release = threading.Event()

        def stalled() -> Iterator[registry_pb2.ImportExtractRequest]:
            parts = _stream(data, chunk=len(data) // 2 + 1, min_ratio=1e-9)
            yield next(parts)  # the header
            yield next(parts)  # half the file, then nothing: the stream stays open
            release.wait(30)

        try:
            f = expect_error(lambda r: feed(r, metadata=md, timeout=30), stalled(), grpc.StatusCode.ABORTED)
        finally:
            release.set()
        assert f.reason == "PUSH_IDLE" and f.metadata["idle_seconds"] == "1", f
        wait_until(lambda: not any(t.name == "import-chunks" for t in threading.enumerate()),
                   "the thread reading the given-up push's chunks ended with it", limit_s=10)
        done = feed(_stream(data, min_ratio=1e-9), metadata=md, timeout=30)  # the slot is free
        assert done.rows_imported == len(default_people()) and done.snapshot.startswith("registrySnapshots/")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real filesystem of 32 KiB (tmpfs), unmounted afterwards."""
    with tmpfs(tmp_path / "small", "32k") as where:
        yield where


def test_a_full_temporary_directory_is_told_as_such_and_imports_nothing(
        api: Api, tmp_path: Path, small_tmpfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spool's filesystem full (ENOSPC on a 32 KiB tmpfs made the server's temporary directory)
    was an INTERNAL "internal error": the agency retried a file that could not fit, and nothing
    said the server's disk was the cause. It is RESOURCE_EXHAUSTED `SPOOL_FULL`, the previous
    snapshot stays in force, no spool is left, the import slot is free, and the log says it."""
    extra = "".join(f"FULL{i:05d},,Feed,Test,1991-01-01,75011,2025-01-06,,1\n" for i in range(2000))
    data = _extract(tmp_path, extra)
    assert len(data) > 64 * 1024
    feed = api.as_("agency-feed").ImportExtract
    monkeypatch.setattr(tempfile, "tempdir", str(small_tmpfs))  # where the server (in this process) spools
    # (In chunks of 4 KiB: more than the reading thread's queue holds when the write fails.)
    f = expect_error(feed, _stream(data, chunk=4096), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert f.reason == "SPOOL_FULL" and "temporary directory is full" in f.message, f
    assert "FULL0" not in f.message and str(small_tmpfs) not in f.message
    assert list(small_tmpfs.iterdir()) == []  # the spool went with the failed push
    # The thread reading the refused push's chunks ended with it (it ran on until the collector
    # freed the reading generator, which the refusal's traceback kept: a later test's wait for no
    # such thread failed in CI).
    wait_until(lambda: not any(t.name == "import-chunks" for t in threading.enumerate()),
               "the refused push's chunk reader ended with it", limit_s=5)
    assert not _check(api, "FULL00001", "1991-01-01").eligible  # nothing imported
    records = [r for r in log_records(api.h.log_path) if r.get("event") == "extract_spool_full"]
    assert records and records[-1]["error"] == "ENOSPC" and records[-1]["level"] == "error", records[-1:]
    monkeypatch.undo()
    done = feed(_stream(data))  # the slot is free; with room, the same file imports
    assert done.rows_imported >= 2000 and _check(api, "FULL00001", "1991-01-01").eligible


def test_empty_lines_are_no_rows_and_no_rejects(api: Api, tmp_path: Path) -> None:
    """An export ending with an empty line (or holding one) had it counted as a read row and listed
    as rejected ("expected 9 fields, got 0"): the agency chased a bad row that was not there. Empty
    lines are skipped; a line of blanks is still a malformed row."""
    data = _extract(tmp_path, "EMPTYLN1,,Feed,Test,1991-01-01,75011,2025-01-06,,1\n\n"
                              "EMPTYLN2,,Feed,Test,1991-01-02,75011,2025-01-06,,1\n\n\n")
    rows = data.decode().count("\n") - 1 - 3  # less the header and the three empty lines
    resp = api.as_("agency-feed").ImportExtract(_stream(data))
    assert (resp.rows_read, resp.rows_imported, resp.rows_rejected) == (rows, rows, 0), resp
    assert _check(api, "EMPTYLN2", "1991-01-02").eligible
    blanks = _extract(tmp_path, "   \n")
    resp = api.as_("agency-feed").ImportExtract(_stream(blanks))
    assert resp.rows_rejected == 1 and resp.rejected_rows[0].reason.startswith("expected 9 fields"), resp


def test_a_large_push_merges_in_slices_that_let_other_writers_in(api: Api, harness: Any, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Past its first DIRECT_ROWS rows an extract is staged, then merged into registry_people in key
    order. On SQLite one INSERT ... SELECT held the write lock for the whole merge (about 4 s a
    million rows): every activation and redemption of the server waited, or failed UNAVAILABLE past
    its lock timeout. It is merged MERGE_ROWS at a time, each slice a transaction of its own: a
    writer polling the file meanwhile gets the lock between slices and sees the snapshot part-merged
    (it never did). On both backends, with small sizes: duplicates of a row stored directly and of a
    row staged (across slices) are each rejected with their line, and the first line's values kept."""
    monkeypatch.setattr(registry, "BATCH", 500)
    monkeypatch.setattr(registry._BulkWriter, "DIRECT_ROWS", 500)
    monkeypatch.setattr(registry._BulkWriter, "MERGE_ROWS", 400)
    monkeypatch.setattr(registry._BulkWriter, "MERGE_PAUSE_S", 0.05)
    base = _extract(tmp_path).decode()
    header, *rows = base.splitlines()
    first_direct = rows[0].split(",")[0]
    extra = ["SLICEDUP1,,Feed,Test,1991-01-01,75011,2025-01-06,,1",   # staged: its first line
             *[f"SLICEX{i:04d},,Feed,Test,1991-01-01,75011,2025-01-06,,1" for i in range(900)],
             "SLICEDUP1,,Feed,Test,1991-01-01,93100,2025-01-06,,1",   # a staged row's duplicate, slices later
             rows[0].replace(rows[0].split(",")[5], "13001", 1)]      # a direct row's duplicate
    data = "\n".join([header, *rows, *extra]) + "\n"
    dup_lines = {len(rows) + 1 + 1 + 900 + 1, len(rows) + 1 + 1 + 900 + 2}  # (header = line 1)

    importing = "SELECT count(*) FROM registry_people WHERE snapshot_id = " \
                "(SELECT max(id) FROM registry_snapshots WHERE status = 'importing')"
    with sqlite_writer_sees(harness.url, importing) as seen:
        resp = api.as_("agency-feed").ImportExtract(_stream(data.encode(), chunk=8 * 1024))
    assert {r.line for r in resp.rejected_rows} == dup_lines
    assert all("duplicate" in r.reason for r in resp.rejected_rows)
    assert resp.rows_imported == len(rows) + 901 and resp.rows_read == resp.rows_imported + 2
    snapshot_id = int(resp.snapshot.rsplit("/", 1)[1])
    with harness.ctx.db.read() as s:
        postal = {ident: s.execute(select(RegistryPerson.postal_code).where(
            RegistryPerson.snapshot_id == snapshot_id,
            RegistryPerson.person_key == harness.ctx.pseudo.person_key(ident))).scalar_one()
            for ident in ("SLICEDUP1", first_direct)}
        stored = s.execute(select(func.count()).select_from(RegistryPerson).where(
            RegistryPerson.snapshot_id == snapshot_id)).scalar_one()
    assert postal["SLICEDUP1"] == "75011" and postal[first_direct] != "13001"
    assert stored == resp.rows_imported
    if harness.backend == "sqlite":
        part_merged = sorted(n for n in seen if 500 < n < resp.rows_imported)
        assert part_merged, f"no writer got the lock during the merge (row counts seen: {sorted(seen)})"


def test_old_and_failed_snapshots_lose_their_rows_in_slices(backend: tuple[str, str], tmp_path: Path,
                                                            request: pytest.FixtureRequest,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows of a snapshot pruned after a newer one switched (`keep_snapshots`), and of an import
    refused once its rows were stored (cut off: fewer rows than in force), are deleted. On SQLite one
    DELETE of a whole snapshot held the write lock as long as the merge did (1.4 s per 500,000
    rows), so they go MERGE_ROWS at a time, each slice its own transaction: a writer polling the
    file meanwhile sees the snapshot part-emptied (never before: all of its rows, then none). On
    both backends: the statuses (superseded, failed), no row left, and the invariants hold."""
    from support import As

    from entitlement import doctor
    monkeypatch.setattr(registry._BulkWriter, "MERGE_ROWS", 300)
    monkeypatch.setattr(registry._BulkWriter, "MERGE_PAUSE_S", 0.05)
    people = {f"SLICE{i:05d}": ("1990-01-01", "75011", "2025-01-06", "", "1") for i in range(1500)}
    with own_server(backend[0], tmp_path / "srv", request, people=people) as h:
        feed = As(h.channel, h.tokens["agency-feed"]).ImportExtract
        base = write_registry(tmp_path / "base.csv", people).read_bytes()
        with h.ctx.db.read() as s:
            [first] = s.execute(select(RegistrySnapshot.id)).scalars().all()

        def counts_while(push: Any, snapshot: str) -> list[int]:
            """The row counts of `snapshot` (SQL) a writer of the file saw between its lock's holders."""
            with sqlite_writer_sees(h.url, f"SELECT count(*) FROM registry_people WHERE snapshot_id = ({snapshot})") as seen:
                push()
            return seen

        second = feed(_stream(base + b"SLICEXTRA1,,Feed,Test,1991-01-01,75011,2025-01-06,,1\n"))
        seen = counts_while(lambda: feed(_stream(base + b"SLICEXTRA2,,Feed,Test,1991-01-01,75011,2025-01-06,,1\n")),
                            str(first))  # the third switches: the first is pruned (two kept)
        cut = b"\n".join(base.splitlines()[:1401]) + b"\n"  # 1,400 rows against 1,501 in force
        seen_cut = counts_while(lambda: expect_error(feed, _stream(cut, min_ratio=1.0), grpc.StatusCode.FAILED_PRECONDITION),
                                "SELECT max(id) FROM registry_snapshots")
        with h.ctx.db.read() as s:
            status = dict(s.execute(select(RegistrySnapshot.id, RegistrySnapshot.status)).all())
            rows = dict(s.execute(select(RegistryPerson.snapshot_id, func.count()).group_by(RegistryPerson.snapshot_id)).all())
            cut_id = max(status)
        assert status[first] == "superseded" and status[cut_id] == "failed"
        assert first not in rows and cut_id not in rows
        assert rows == {int(second.snapshot.rsplit("/", 1)[1]): 1501, cut_id - 1: 1501}
        assert doctor.check(h.ctx.db) == []
        if h.backend == "sqlite":
            assert any(0 < n < 1500 for n in seen), f"the prune was one transaction (counts seen: {sorted(set(seen))})"
            peak = seen_cut.index(max(seen_cut))
            assert any(0 < n < 1400 for n in seen_cut[peak:]), \
                f"the discard was one transaction (counts seen after the peak: {sorted(set(seen_cut[peak:]))})"
