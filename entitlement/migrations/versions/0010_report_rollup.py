"""report_months, report_days, report_rollup: the funding report's rollup, backfilled from the rows

GetFundingReport read every activation committed up to the month (2.8 s as a funder, 4.4 s as an
admin at a million activations); it now reads these tables, which every write keeps up to date
(entitlement/rollup.py has the definitions). The backfill computes them from the existing ledger
entries and activations, in the time zone of ENTITLEMENT_TIMEZONE (default Europe/Paris), with
a copy of the rules frozen here as they were when this migration was written (entitlement/rollup.py
is the reference; tests/test_funding_report.py checks a downgrade and upgrade rebuild the same
rollup the service maintained).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-23
"""

from __future__ import annotations

import datetime as dt
import os
from collections import defaultdict
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

MONEY = ("activations_started", "committed_cents", "consumed_cents", "released_cents", "person_months_consumed")
ACTIVITY = ("live_from", "live_until", "ended_before", "ended_through")
CENTS = {"commit": "committed_cents", "consume": "consumed_cents", "release": "released_cents"}
DISTINCT = {"commit": "activations_started", "consume": "person_months_consumed"}


def _month_last(day: dt.date) -> dt.date:
    return dt.date(day.year + day.month // 12, day.month % 12 + 1, 1) - dt.timedelta(days=1)


def _date(value: Any) -> dt.date:
    return value if isinstance(value, dt.date) else dt.date.fromisoformat(value)


def _instant(value: Any) -> dt.datetime:
    if not isinstance(value, dt.datetime):
        value = dt.datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _activity(start: dt.date, end: dt.date, state: str, updated: dt.datetime, commit_month: str,
              tz: ZoneInfo) -> list[tuple[dt.date, str]]:
    s = max(start, dt.date(int(commit_month[:4]), int(commit_month[5:7]), 1))
    out: list[tuple[dt.date, str]] = []
    if state == "revoked":
        r = updated.astimezone(tz).date()
        last_live = min(end, r - dt.timedelta(days=1))
    else:
        r, last_live = None, end
    if s <= last_live:
        out += [(s, "live_from"), (last_live + dt.timedelta(days=1), "live_until")]
    if r is not None:
        if end >= r.replace(day=1) and s <= _month_last(r):
            out.append((max(s, r.replace(day=1)), "ended_through"))
    elif s <= end:
        out.append((end, "ended_before"))
    elif (s.year, s.month) == (end.year, end.month):
        out.append((s, "ended_through"))
    return out


def upgrade() -> None:
    months = op.create_table(
        "report_months",
        sa.Column("funder_id", sa.String(length=63), nullable=False),
        sa.Column("program_id", sa.String(length=63), nullable=False),
        sa.Column("month", sa.String(length=7), nullable=False),
        *(sa.Column(c, sa.BigInteger(), nullable=False) for c in MONEY),
        sa.PrimaryKeyConstraint("funder_id", "program_id", "month"),
    )
    days = op.create_table(
        "report_days",
        sa.Column("funder_id", sa.String(length=63), nullable=False),
        sa.Column("program_id", sa.String(length=63), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        *(sa.Column(c, sa.BigInteger(), nullable=False) for c in ACTIVITY),
        sa.PrimaryKeyConstraint("funder_id", "program_id", "day"),
    )
    rollup = op.create_table(
        "report_rollup",
        sa.Column("id", sa.SmallInteger(), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    timezone = os.environ.get("ENTITLEMENT_TIMEZONE") or "Europe/Paris"
    tz = ZoneInfo(timezone)
    op.bulk_insert(rollup, [{"id": 1, "timezone": timezone}])
    conn = op.get_bind()
    ledger = sa.table("ledger_entries", *(sa.column(c) for c in (
        "activation_id", "program_id", "funder_id", "kind", "month", "amount_cents")))
    activations = sa.table("activations", *(sa.column(c) for c in (
        "id", "start_date", "end_date", "state", "updated_at")))
    money: dict[tuple[str, str, str], dict[str, int]] = defaultdict(lambda: dict.fromkeys(MONEY, 0))
    for funder, program, month, kind, cents, distinct in conn.execute(
            sa.select(ledger.c.funder_id, ledger.c.program_id, ledger.c.month, ledger.c.kind,
                      sa.func.sum(ledger.c.amount_cents), sa.func.count(sa.distinct(ledger.c.activation_id)))
            .group_by(ledger.c.funder_id, ledger.c.program_id, ledger.c.month, ledger.c.kind)):
        row = money[(funder, program, month)]
        if kind in CENTS:
            row[CENTS[kind]] += int(cents)
        if kind in DISTINCT:
            row[DISTINCT[kind]] += int(distinct)
    counts: dict[tuple[str, str, dt.date], dict[str, int]] = defaultdict(lambda: dict.fromkeys(ACTIVITY, 0))
    q = (sa.select(ledger.c.funder_id, ledger.c.program_id, ledger.c.month, activations.c.start_date,
                   activations.c.end_date, activations.c.state, activations.c.updated_at)
         .select_from(ledger.join(activations, activations.c.id == ledger.c.activation_id))
         .where(ledger.c.kind == "commit"))
    for funder, program, month, start, end, state, updated in conn.execute(q.execution_options(yield_per=20_000)):
        for day, counter in _activity(_date(start), _date(end), state, _instant(updated), month, tz):
            counts[(funder, program, day)][counter] += 1
    for table, keys, rows in ((months, ("funder_id", "program_id", "month"), money),
                              (days, ("funder_id", "program_id", "day"), counts)):
        batch = [dict(zip(keys, k)) | v for k, v in sorted(rows.items()) if any(v.values()) or table is months]
        for i in range(0, len(batch), 5000):
            op.bulk_insert(table, batch[i:i + 5000])


def downgrade() -> None:
    op.drop_table("report_rollup")
    op.drop_table("report_days")
    op.drop_table("report_months")
