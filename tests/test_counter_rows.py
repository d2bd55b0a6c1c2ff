"""A program's counter row (entitlement/counters.py): made once per program and server process
before the first activation (`ensure_row`, a transaction of its own), so that an activation's
conditional UPDATE, sent late with the event's sequence number, always finds it and an UPDATE that
changes nothing means a cap refused. A row deleted behind the server's back is made again and the
activation retried, never answered CAP_REACHED."""

from __future__ import annotations

from sqlalchemy import delete, func, select, update
from support import Api

from entitlement.storage.models import LedgerEntry, ProgramCounter

PROGRAM = "premium-job-seekers"


def _counter(api: Api) -> tuple[int, int] | None:
    with api.h.ctx.db.read() as s:
        row = s.get(ProgramCounter, PROGRAM)
        return None if row is None else (row.seats_used, row.cents_committed)


def test_a_counter_row_deleted_under_the_server_is_made_again(api: Api) -> None:
    api.activate()  # the row is made (or was), and this process knows it
    before = _counter(api)
    assert before is not None
    db = api.h.ctx.db
    with db.write() as s:
        s.execute(delete(ProgramCounter).where(ProgramCounter.program_id == PROGRAM))
    try:
        made = api.activate()  # the UPDATE finds no row: made again, the activation retried
        assert made.activation.name.startswith("activations/")
        activation_id = made.activation.name.removeprefix("activations/")
        with db.read() as s:
            cents = s.execute(select(func.sum(LedgerEntry.amount_cents)).where(
                LedgerEntry.activation_id == activation_id, LedgerEntry.kind == "commit")).scalar_one()
        assert cents and cents > 0
        assert _counter(api) == (1, cents)  # counted once, from a fresh row
    finally:  # as it was, plus this activation, for the tests after this one (the doctor's checks)
        after = _counter(api)
        with db.write() as s:
            if after is None:
                s.add(ProgramCounter(program_id=PROGRAM, seats_used=before[0], cents_committed=before[1]))
            else:
                s.execute(update(ProgramCounter).where(ProgramCounter.program_id == PROGRAM).values(
                    seats_used=before[0] + after[0], cents_committed=before[1] + after[1]))
