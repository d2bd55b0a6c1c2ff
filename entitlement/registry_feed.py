"""Use case: the agency pushes a full extract over gRPC (RegistryService.ImportExtract).

The bytes are spooled to a temporary file (constant memory), checked against the announced
checksum and size limit, then imported exactly as `entitlement registry import` does. One import
at a time per server process; a second concurrent push is told to retry (ABORTED).

The spool holds personal data (names, birth dates, identifiers) in clear. It goes when the import
ends, whatever the outcome; a process killed during an import (kill -9, a crash, a power cut)
cannot remove it, so every server sweeps such leftovers when it starts, and so does the daily
`entitlement privacy purge` on the machine it runs on (`sweep_stale_spools`):
each spool is locked (flock, on a local filesystem) by the process importing into it from its
making until it is gone, and the kernel lets the lock go when that process dies, so a spool nobody
holds is a dead one, removed; a spool another live process is importing into (several server
processes on one machine) is left alone. A leftover stays until a server starts on the machine or
the purge runs there.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import datetime as dt
import errno
import fcntl
import hashlib
import os
import queue
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from entitlement import registry
from entitlement.app import Context
from entitlement.callers import Caller
from entitlement.errors import Aborted, FailedPrecondition, InvalidArgument, ResourceExhausted

MAX_CHUNK_BYTES = 1 << 20
MAX_EXTRACT_BYTES = 4 << 30
MAX_REJECTS_RETURNED = 1000
DEFAULT_MIN_RATIO = 0.5

_one_import = threading.Lock()
log = structlog.get_logger("entitlement.registry")

SPOOL_PREFIX = "entitlement-extract-"  # in the temporary directory (TMPDIR, a local filesystem)
_SPOOL_LOCK = ".lock"
SPOOL_GRACE_S = 60.0  # a spool touched more recently than this is never swept
# A spool without a lock file was made by a version before the locks (a rolling upgrade: its import
# may still run, reading its file): swept only once nothing in it changed for this long. An EMPTY
# one holds no import's file (an import writes its extract at once): an import killed just after
# making its spool, or during its removal (`.lock` gone, the directory not yet): SPOOL_GRACE_S.
UNLOCKED_SPOOL_GRACE_S = 3600.0


@contextlib.contextmanager
def _spool() -> Iterator[Path]:
    """A directory (0700) for one import's bytes, locked by this process from its making until it
    is gone (the lock is let go only after the removal: a sweep never races the removal)."""
    tmp = Path(tempfile.mkdtemp(prefix=SPOOL_PREFIX))
    try:
        lock = open(tmp / _SPOOL_LOCK, "wb")  # noqa: SIM115 - closed below, after the removal
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # (its failure, ENOLCK say, leaves no directory either)
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _last_change(spool: Path, st: os.stat_result) -> float:
    """The latest mtime of the spool and of what it holds (bytes still arriving move extract.csv's)."""
    latest = st.st_mtime
    with os.scandir(spool) as entries:
        for entry in entries:
            latest = max(latest, entry.stat(follow_symlinks=False).st_mtime)
    return latest


def sweep_stale_spools(dry_run: bool = False) -> int:
    """Remove the spools that imports killed mid-way left in the temporary directory: ours, that no
    live process holds locked, unchanged for SPOOL_GRACE_S (an hour for a spool without a lock
    file). Returns how many (`dry_run`: how many would go, none removed); one that could not be
    removed is logged. Raises OSError when the temporary directory cannot be listed (what it holds
    is then unknown). Run by `server.py` at start and by `entitlement privacy purge`."""
    root = tempfile.gettempdir()
    now = time.time()
    removed = 0
    with os.scandir(root) as entries:
        candidates = [Path(e.path) for e in entries if e.name.startswith(SPOOL_PREFIX)]
    for spool in candidates:
        try:
            st = spool.lstat()  # the entry itself: a symlink is not a directory here
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            lock_path = spool / _SPOOL_LOCK
            has_lock_file = os.path.lexists(lock_path)
            with os.scandir(spool) as inside:
                empty = next(inside, None) is None
            grace = SPOOL_GRACE_S if has_lock_file or empty else UNLOCKED_SPOOL_GRACE_S
            if now - _last_change(spool, st) < grace:
                continue
            if dry_run and not has_lock_file:
                removed += 1
                continue
            # Never through a symlink (ELOOP: logged, left); made if missing (a spool of a version
            # before the locks), except in a dry run, which changes nothing. (flock needs no write.)
            create = 0 if dry_run else os.O_CREAT
            with open(os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | create, 0o600), "rb") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a live import: BlockingIOError
                if not dry_run:
                    shutil.rmtree(spool)  # (no symlink followed: rmtree works from directory descriptors)
            removed += 1
        except BlockingIOError:
            continue  # a live import's
        except FileNotFoundError:
            continue  # gone meanwhile (its import ended)
        except OSError as exc:
            log.warning("stale_extract_spool_not_removed", spool=spool.name, error=type(exc).__name__)
    return removed


def idle_bounded(chunks: Iterator[bytes], idle_s: float) -> Iterator[bytes]:
    """`chunks`, each of which must come within `idle_s` seconds of the one before (ABORTED
    `PUSH_IDLE` otherwise). A pusher that stopped sending without closing its stream (its connection
    alive: keepalive sees nothing wrong) held this process's one import slot until its own deadline,
    if it had set one, and every other push to the process was refused IMPORT_IN_PROGRESS meanwhile.
    The chunks are read by a thread of their own (a blocked read cannot be given a timeout), in the
    call's contextvars; it ends with the call."""
    box: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=4)
    stop = threading.Event()

    def put(item: tuple[str, object]) -> bool:
        while not stop.is_set():
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        try:
            for chunk in chunks:
                if not put(("chunk", chunk)):
                    return
            put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, raised there
            put(("error", exc))

    # In the call's context (its deadline, entitlement/deadline.py): the request stream's wrapper
    # reads it to tell a client that gave up (CANCELLED, DEADLINE_EXCEEDED) from a finished stream.
    call = contextvars.copy_context()
    threading.Thread(target=call.run, args=(pump,), name="import-chunks", daemon=True).start()
    try:
        while True:
            try:
                kind, value = box.get(timeout=idle_s)
            except queue.Empty:
                raise Aborted(f"no part of the extract came for {idle_s:g} s: the push is given up; send it again",
                              reason="PUSH_IDLE", metadata={"idle_seconds": f"{idle_s:g}"}) from None
            if kind == "end":
                return
            if kind == "error":
                assert isinstance(value, BaseException)
                raise value
            assert isinstance(value, bytes)
            yield value
    finally:
        stop.set()


@dataclass(frozen=True)
class PushHeader:
    extracted_on: dt.date
    source_name: str
    sha256: str
    min_ratio: float


@dataclass(frozen=True)
class PushResult:
    summary: registry.ImportSummary
    rejected: list[tuple[int, str]]


def receive(ctx: Context, caller: Caller, header: PushHeader, chunks: Iterable[bytes]) -> PushResult:
    if not _one_import.acquire(blocking=False):
        raise Aborted("another registry import is running in this server; retry later",
                      reason="IMPORT_IN_PROGRESS")
    try:
        _check_date(ctx, header)  # before a byte is received: the whole file would be refused anyway
        try:  # likewise, while another process imports (its end will not come before this file's)
            registry.check_no_import_running(ctx.db)
        except registry.ImportInProgress:
            raise _import_in_progress() from None
        try:
            return _spooled_import(ctx, caller, header, chunks)
        except OSError as exc:
            if exc.errno not in _NO_ROOM:
                raise
            # The temporary directory's filesystem is full (or this process's file size or quota
            # limit is reached): the operator's to fix, not the agency's file. Nothing was imported.
            log.error("extract_spool_full", error=errno.errorcode.get(exc.errno or 0, "?"),
                      spool_dir=tempfile.gettempdir())
            raise ResourceExhausted(
                "no room left on the server to spool the extract (its temporary directory is full); nothing "
                "was imported, the previous snapshot stays in force: send the file again once the operator "
                "has freed space", reason="SPOOL_FULL") from None
    finally:
        # A push refused mid-stream (full spool, too large, a bad checksum) left `chunks` unfinished:
        # closed here, its reading thread (idle_bounded) stops now, not when the collector frees the
        # generator, which the refusal's traceback kept alive.
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
        _one_import.release()


# What a full filesystem, a disk quota or RLIMIT_FSIZE answer a write with.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _spooled_import(ctx: Context, caller: Caller, header: PushHeader, chunks: Iterable[bytes]) -> PushResult:
    with _spool() as tmp:
        path = tmp / "extract.csv"
        digest = hashlib.sha256()
        size = 0
        with path.open("wb") as fh:
            for chunk in chunks:
                size += len(chunk)
                if size > MAX_EXTRACT_BYTES:
                    raise ResourceExhausted(f"extract larger than {MAX_EXTRACT_BYTES} bytes",
                                            reason="EXTRACT_TOO_LARGE")
                digest.update(chunk)
                fh.write(chunk)
        if header.sha256 and header.sha256.lower() != digest.hexdigest():
            raise InvalidArgument.single("header.sha256", "does not match the bytes received")
        rejects = tmp / "rejects.csv"
        try:
            summary = registry.import_extract(
                ctx.db, ctx.pseudo, ctx.clock, path, extracted_on=header.extracted_on, actor=caller.actor,
                rejects_path=rejects, min_ratio=header.min_ratio or DEFAULT_MIN_RATIO,
                source_name=header.source_name or "pushed-extract.csv")
        except (registry.ExtractDatedInFuture, registry.ExtractOlderThanCurrent) as exc:
            raise _date_error(ctx, exc) from None
        except registry.ImportInProgress:  # started meanwhile
            raise _import_in_progress() from None
        except registry.ExtractError as exc:
            # The temp path means nothing to the agency: name its file instead. (A min_ratio of 0
            # is the default here: the smallest that accepts a cut-off extract is above it.)
            text = exc.accept_with("header.min_ratio 1e-9") if isinstance(exc, registry.ExtractCutOff) else str(exc)
            message = text.replace(str(path), header.source_name or "the extract")
            raise FailedPrecondition(f"import refused, previous snapshot still in force: {message}",
                                     reason="EXTRACT_REFUSED") from None
        return PushResult(summary, _first_rejects(rejects))


def _import_in_progress() -> Aborted:
    return Aborted("another registry import is running (another server process, or the command line); retry later",
                   reason="IMPORT_IN_PROGRESS")


def _check_date(ctx: Context, header: PushHeader) -> None:
    try:
        registry.check_new_extract(ctx.db, ctx.clock, header.extracted_on)
    except (registry.ExtractDatedInFuture, registry.ExtractOlderThanCurrent) as exc:
        raise _date_error(ctx, exc) from None


def _date_error(ctx: Context, exc: registry.ExtractError) -> InvalidArgument | FailedPrecondition:
    """A date in the future is a bad argument (INVALID_ARGUMENT on header.extracted_on); an older
    extract than the current snapshot's is refused as the state stands (FAILED_PRECONDITION)."""
    if isinstance(exc, registry.ExtractDatedInFuture):
        return InvalidArgument.single("header.extracted_on", f"{exc} (in {ctx.settings.timezone})")
    assert isinstance(exc, registry.ExtractOlderThanCurrent)
    return FailedPrecondition(
        f"import refused, previous snapshot still in force: {exc}; an extract of the same day or later is accepted",
        reason="EXTRACT_OLDER_THAN_CURRENT",
        metadata={"extracted_on": exc.extracted_on.isoformat(), "current_snapshot": exc.current.name,
                  "current_extracted_on": exc.current.extracted_on.isoformat()})


def _first_rejects(path: Path) -> list[tuple[int, str]]:
    if not path.exists():
        return []
    out: list[tuple[int, str]] = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        for line, reason in reader:
            out.append((int(line), reason))
            if len(out) >= MAX_REJECTS_RETURNED:
                break
    return out
