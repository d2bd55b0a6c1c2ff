"""Typed SQLAlchemy models. The schema itself is owned by the Alembic migrations; a test checks
that models and migrations agree on both backends."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (BigInteger, Date, DateTime, ForeignKey, Index, Integer, LargeBinary, SmallInteger,
                        String, Text, text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT.
BigId = BigInteger().with_variant(Integer(), "sqlite")

LIVE_STATES_SQL = "state IN ('active', 'suspended')"


class Base(DeclarativeBase):
    pass


class RegistrySnapshot(Base):
    """One imported extract of the agency's registry. The current snapshot is the newest complete one."""

    __tablename__ = "registry_snapshots"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    source_name: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    extracted_on: Mapped[dt.date] = mapped_column(Date)
    # importing | complete | failed | superseded (rows pruned, metadata kept)
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    rows_read: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_imported: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_rejected: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (Index("ix_registry_snapshots_status_id", "status", "id"),)


class RegistryPerson(Base):
    """A registered job seeker in one snapshot: only what the rules need. No name, no agency id:
    `person_key` is the keyed HMAC of the agency id (see entitlement.pseudonym).

    `snapshot_id` names a registry_snapshots row but is not a foreign key: checking it cost a
    lookup per imported row (migration 0009). The import and pruning delete people rows in the
    transaction that changes their snapshot's status; the invariant checker (entitlement/doctor.py)
    verifies that every row names a snapshot that exists and is `importing` or `complete`."""

    __tablename__ = "registry_people"

    snapshot_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    person_key: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    birth_date: Mapped[dt.date] = mapped_column(Date)
    postal_code: Mapped[str] = mapped_column(String(5))
    registered_on: Mapped[dt.date] = mapped_column(Date)
    registration_ended_on: Mapped[dt.date | None] = mapped_column(Date)
    category: Mapped[int] = mapped_column(SmallInteger)

    # SQLite: the primary key is the table (no separate rowid B-tree): half the work per imported row.
    __table_args__ = {"sqlite_with_rowid": False}


class Activation(Base):
    __tablename__ = "activations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    program_id: Mapped[str] = mapped_column(String(63))
    program_version: Mapped[str] = mapped_column(String(64))
    person_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    state: Mapped[str] = mapped_column(String(16))  # active | suspended | revoked | expired
    start_date: Mapped[dt.date] = mapped_column(Date)
    end_date: Mapped[dt.date] = mapped_column(Date)
    advisor_id: Mapped[str] = mapped_column(String(64))
    agency_code: Mapped[str] = mapped_column(String(16))
    platform_id: Mapped[str] = mapped_column(String(63))
    state_reason: Mapped[str] = mapped_column(Text)
    decision_json: Mapped[str] = mapped_column(Text)
    snapshot_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("registry_snapshots.id"))
    token_jti: Mapped[str] = mapped_column(String(32))
    account_id: Mapped[str | None] = mapped_column(String(128))
    redeemed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        # At most one live activation per person per program, enforced by the database itself.
        Index("uq_activations_live_person_program", "program_id", "person_key", unique=True,
              sqlite_where=text(LIVE_STATES_SQL), postgresql_where=text(LIVE_STATES_SQL)),
        # A platform account holds at most one live entitlement per program.
        Index("uq_activations_live_account_program", "platform_id", "account_id", "program_id", unique=True,
              sqlite_where=text(f"account_id IS NOT NULL AND {LIVE_STATES_SQL}"),
              postgresql_where=text(f"account_id IS NOT NULL AND {LIVE_STATES_SQL}")),
        Index("ix_activations_created", "created_at", "id"),
        Index("ix_activations_program_created", "program_id", "created_at", "id"),
        Index("ix_activations_account", "platform_id", "account_id"),
        Index("ix_activations_person", "person_key"),
        # The funding report's counts: what they read of an activation, by id, without the row.
        Index("ix_activations_span", "id", "start_date", "end_date", "state", "updated_at"),
    )


class LedgerEntry(Base):
    """Append-only funding ledger: commit when an activation starts, consume for access owed,
    release what is given back. Corrections are new entries; the database refuses UPDATE/DELETE."""

    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    activation_id: Mapped[str] = mapped_column(String(32), ForeignKey("activations.id"))
    program_id: Mapped[str] = mapped_column(String(63))
    funder_id: Mapped[str] = mapped_column(String(63))
    kind: Mapped[str] = mapped_column(String(16))  # commit | consume | release
    month: Mapped[str] = mapped_column(String(7))  # YYYY-MM
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        # An activation's entries; with the funder and kind, a funder's scope (audit.funds: is there a
        # `commit` of this activation for this funder?) is answered from the index alone (0012).
        Index("ix_ledger_activation", "activation_id", "funder_id", "kind"),
        # Read alone (index-only): the `commit` entries of a funder and program up to a month with
        # their activation ids (the rollup's rebuild of its activity, the report's path in another
        # time zone), and every entry's money grouped in this order (the rebuild of its money,
        # without sorting the entries). Nothing else is indexed: each index costs every entry
        # written (migration 0011 made this one of three).
        Index("ix_ledger_kind_funder_month_cents", "kind", "funder_id", "program_id", "month", "activation_id",
              "amount_cents"),
    )


class Event(Base):
    """Append-only event log, one row per state change, numbered without gaps by `log_head`."""

    __tablename__ = "events"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    type: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(128))
    subject: Mapped[str] = mapped_column(String(128))
    program_id: Mapped[str | None] = mapped_column(String(63))
    reason: Mapped[str] = mapped_column(Text)
    payload_json: Mapped[str] = mapped_column(Text)
    # The platform of the activation the event is about (None for other subjects), so a platform's
    # change stream (WatchEntitlementChanges) is filtered in the query, by index.
    platform_id: Mapped[str | None] = mapped_column(String(63))

    __table_args__ = (
        Index("ix_events_program_seq", "program_id", "seq"),
        Index("ix_events_platform_seq", "platform_id", "seq"),
        # An activation's history (suspensions decide which months of access are owed).
        Index("ix_events_subject_seq", "subject", "seq"),
    )


class LogHead(Base):
    """Single row holding the event log size. Incrementing it in the writer's transaction gives
    gapless sequence numbers on both backends (a PostgreSQL sequence leaves gaps on rollback)."""

    __tablename__ = "log_head"

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)


class LogNode(Base):
    """The event log's Merkle tree (entitlement/logtree.py): the hash of every complete, aligned
    subtree of 2**level leaves, leaves [idx * 2**level, (idx + 1) * 2**level). Level 0 holds the
    leaf hash of the event with seq = idx + 1. Written with the event, in its transaction; the
    database refuses UPDATE and DELETE."""

    __tablename__ = "log_nodes"

    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class IdempotencyRecord(Base):
    """AIP-155: the response of a mutation, kept by (caller, request_id) to replay it exactly."""

    __tablename__ = "idempotency_records"

    caller_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    method: Mapped[str] = mapped_column(String(128))
    request_sha256: Mapped[str] = mapped_column(String(64))
    response: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class CallerCredential(Base):
    """A bearer token of a managed caller (`entitlement callers ...`): one row per token, so a
    rotation adds a row (`rotated_from` the previous one, which keeps working until its new
    `expires_at`: the overlap). Only the SHA-256 of the token is stored. A caller is its `caller_id`
    with the role and scope of its rows."""

    __tablename__ = "caller_credentials"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    caller_id: Mapped[str] = mapped_column(String(63))
    role: Mapped[str] = mapped_column(String(16))
    platform_id: Mapped[str] = mapped_column(String(63))
    advisor_id: Mapped[str] = mapped_column(String(63))
    agency_code: Mapped[str] = mapped_column(String(63))
    funder_id: Mapped[str] = mapped_column(String(63))
    token_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    rotated_from: Mapped[str | None] = mapped_column(String(32))

    __table_args__ = (
        Index("uq_caller_credentials_token", "token_sha256", unique=True),
        Index("ix_caller_credentials_caller", "caller_id", "created_at"),
    )


class ProgramCounter(Base):
    """Running use of each program's caps: seats taken and cents committed net of releases. Caps are
    enforced by one conditional UPDATE of this row in the activation's transaction, so concurrent
    activations (several server processes included) can never overspend."""

    __tablename__ = "program_counters"

    program_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    seats_used: Mapped[int] = mapped_column(BigInteger)
    cents_committed: Mapped[int] = mapped_column(BigInteger)


class ReportMonth(Base):
    """The funding report's money, per funder x program x ledger month (entitlement/rollup.py):
    what GetFundingReport would sum from `ledger_entries`, kept up to date in the transaction of
    every ledger entry. A row exists as soon as one entry of its key does."""

    __tablename__ = "report_months"

    funder_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    program_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    month: Mapped[str] = mapped_column(String(7), primary_key=True)  # YYYY-MM
    activations_started: Mapped[int] = mapped_column(BigInteger)  # distinct activations with a commit
    committed_cents: Mapped[int] = mapped_column(BigInteger)
    consumed_cents: Mapped[int] = mapped_column(BigInteger)
    released_cents: Mapped[int] = mapped_column(BigInteger)
    person_months_consumed: Mapped[int] = mapped_column(BigInteger)  # distinct activations with a consume


class ReportDay(Base):
    """The funding report's activity counters, per funder x program x civil day (in the time zone
    of `report_rollup`): each `commit` entry adds 1 where its activation's live span begins
    (`live_from`) and 1 the day after it ends (`live_until`), and 1 on the day its access ends
    (`ended_before`: counted once that day is past; `ended_through`: counted from that day on).
    Live at the end of a day = sum of live_from - live_until up to it; ended in a month = sum of
    the ended counters of its days up to today. See entitlement/rollup.py."""

    __tablename__ = "report_days"

    funder_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    program_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    live_from: Mapped[int] = mapped_column(BigInteger)
    live_until: Mapped[int] = mapped_column(BigInteger)
    ended_before: Mapped[int] = mapped_column(BigInteger)
    ended_through: Mapped[int] = mapped_column(BigInteger)


class ReportRollup(Base):
    """Single row: the time zone whose civil days `report_days` counts in (a revocation counts on
    its civil day). GetFundingReport reads the rollup only when it is the service's time zone."""

    __tablename__ = "report_rollup"

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    timezone: Mapped[str] = mapped_column(String(64))
