"""Use case: the agency pushes a full extract over gRPC (RegistryService.ImportExtract).

The bytes are spooled to a temporary file (constant memory), checked against the announced
checksum and size limit, then imported exactly as `entitlement registry import` does. One import
at a time per server process; a second concurrent push is told to retry (ABORTED).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from entitlement import registry
from entitlement.app import Context
from entitlement.callers import Caller
from entitlement.errors import Aborted, FailedPrecondition, InvalidArgument, ResourceExhausted

MAX_CHUNK_BYTES = 1 << 20
MAX_EXTRACT_BYTES = 4 << 30
MAX_REJECTS_RETURNED = 1000
DEFAULT_MIN_RATIO = 0.5

_one_import = threading.Lock()


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
        with tempfile.TemporaryDirectory(prefix="entitlement-extract-") as tmp:
            path = Path(tmp) / "extract.csv"
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
            rejects = Path(tmp) / "rejects.csv"
            try:
                summary = registry.import_extract(
                    ctx.db, ctx.pseudo, ctx.clock, path, extracted_on=header.extracted_on, actor=caller.actor,
                    rejects_path=rejects, min_ratio=header.min_ratio or DEFAULT_MIN_RATIO,
                    source_name=header.source_name or "pushed-extract.csv")
            except registry.ExtractError as exc:
                # The temp path means nothing to the agency: name its file instead.
                message = str(exc).replace(str(path), header.source_name or "the extract")
                raise FailedPrecondition(f"import refused, previous snapshot still in force: {message}",
                                         reason="EXTRACT_REFUSED") from None
            return PushResult(summary, _first_rejects(rejects))
    finally:
        _one_import.release()


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
