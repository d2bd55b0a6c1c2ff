"""The invariant checker: what must hold in the database whatever happened (crashes, concurrent
writers, outages). `entitlement doctor` runs it from the command line; the tests run the same
function after their scenarios (the crash, drain and soak tests give it what their clients were
told, so it also checks that every acknowledged request is durable).

What it checks:
- the event log: sequence numbers without gaps, one leaf hash per event, each leaf hash the hash of
  its event, the Merkle tree's stored nodes agreeing with its leaves, and, given a checkpoint the
  caller trusts (one it fetched earlier), the log still extends it: same root at that size;
- every activation has its `activation.created` event and its ledger commits; no ledger entry
  without its activation; the commits equal the funding plan and the amounts the created event
  logged; for every funder with an entry of the activation, consumed + released never exceed what
  it committed (nothing, for a funder without a commit); every entry is a commit, consume or
  release of a positive amount (a commit may be 0: a funder's share of a free program, or one that
  rounds to no cent, still gives it the activation); program counters equal ledger sums;
- an activation's state is the one its last logged state change left, and it is bound to an
  account exactly when a redemption was logged;
- stored idempotent answers name rows that exist, and each acknowledged request (`Acknowledged`)
  is in the database;
- given the program files (`catalog`: the command loads the server's folder), every parameter value
  an activation was decided with is still the one its program's file gives for that day: a past
  value edited in place, or a value dated in the past added, rewrites the history the file tells
  (the activations keep their recorded terms whatever the file says; PROGRAM_VALUE_REWRITTEN).

Each check reads in bulk (aggregates or one streaming pass), so it also runs on a large database.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import and_, case, func, select, text
from sqlalchemy.orm import Session

from entitlement import logtree, merkle, rollup
from entitlement.logformat import LogEvent, time_us
from entitlement.note import Checkpoint
from entitlement.programs import ProgramCatalog
from entitlement.storage.db import Database, utc
from entitlement.storage.models import (Activation, Event, IdempotencyRecord, LedgerEntry, LogHead, LogNode,
                                        ProgramCounter, RegistrySnapshot)

# Event types that change an activation's state, and the state each leaves (curtailed and expired
# events name it in their payload's "to").
STATE_EVENTS = ("activation.created", "activation.suspended", "activation.resumed", "activation.revoked",
                "activation.expired", "activation.curtailed")
KEYED_METHODS = ("activate", "suspend", "resume", "revoke")


@dataclass(frozen=True)
class Problem:
    code: str  # stable, UPPER_SNAKE
    detail: str  # names rows by id or sequence number, never a person


@dataclass(frozen=True)
class Acknowledged:
    """A mutation a client was told succeeded (the call returned OK): it must be in the database.

    `method`: `activate`, `suspend`, `resume`, `revoke` (with the caller's `request_id`: its stored
    answer names `activation_id`; without one: the activation exists, with a logged event of that
    kind), `redeem` (the activation is bound to `account_id`), `import` (registry snapshot
    `snapshot_id` was switched to: complete, or superseded by a later one)."""

    method: str
    activation_id: str = ""
    caller_id: str = ""
    request_id: str = ""
    account_id: str = ""
    snapshot_id: int = 0


def check(db: Database, *, leaves: bool = True, trusted: Checkpoint | None = None,
          acknowledged: Iterable[Acknowledged] = (), catalog: ProgramCatalog | None = None) -> list[Problem]:
    """Every invariant; an empty list means the database is sound. `leaves=False` skips recomputing
    each event's leaf hash and the tree's root from its leaves (the checks that read every event).
    `trusted`: a checkpoint fetched earlier (its signature already verified by the caller); the log
    must extend it. `acknowledged`: requests clients were told succeeded. `catalog`: the program
    files, checked against the values activations were decided with."""
    problems: list[Problem] = []
    with _snapshot(db) as s:
        problems += _event_log(s, leaves, trusted)
        problems += _activations_have_their_records(s)
        problems += _ledger_balances(s)
        problems += _counters(s)
        problems += _states_logged(s)
        problems += _idempotency(s)
        problems += _acknowledged(s, list(acknowledged))
        problems += _registry(s)
        problems += _report_rollup(s)
        if catalog is not None:
            problems += _program_history(s, catalog)
    return problems


@contextmanager
def _snapshot(db: Database) -> Iterator[Session]:
    """One consistent view of the whole database for every check: SQLite's read transaction is one
    already (WAL); on PostgreSQL, READ COMMITTED gives each statement its own, so beside running
    servers the checks compared counts taken at different moments and reported gaps and mismatches
    that were not there. REPEATABLE READ, READ ONLY: one snapshot, no lock taken."""
    if db.is_sqlite:
        with db.read() as s:
            yield s
        return
    with db.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        with Session(bind=conn, autoflush=False) as s, s.begin():
            yield s


def _event_log(s: Session, leaves: bool, trusted: Checkpoint | None) -> list[Problem]:
    out = []
    count, top = s.execute(select(func.count(), func.coalesce(func.max(Event.seq), 0)).select_from(Event)).one()
    head = s.execute(select(LogHead.size).where(LogHead.id == 1)).scalar_one_or_none() or 0
    if not count == top == head:
        out.append(Problem("EVENT_SEQUENCE_GAP", f"{count} events, highest seq {top}, log head {head}"))
    stored = s.execute(select(func.count()).select_from(LogNode).where(LogNode.level == 0)).scalar_one()
    if stored != count:
        out.append(Problem("LOG_LEAVES_MISSING", f"{count} events but {stored} leaf hashes"))
        return out  # the tree checks below would only repeat this
    if trusted is not None and head < trusted.size:
        out.append(Problem("LOG_TRUNCATED", f"the log holds {head} events, fewer than the {trusted.size} of the "
                           f"trusted checkpoint"))
        trusted = None
    if leaves:
        # One pass over the events and their leaf hashes, in order: each leaf is its event's hash,
        # and the leaves hash up to the root the stored tree gives (and to the trusted root).
        tree = merkle.CompactRange()
        trusted_root = merkle.EMPTY_ROOT if trusted is not None and trusted.size == 0 else None
        altered = False
        inner: dict[merkle.Node, bytes] = {}  # subtree hashes recomputed from the leaves, not yet compared
        bad_nodes: list[merkle.Node] = []

        def recomputed(level: int, idx: int, h: bytes) -> None:
            if level:
                inner[(level, idx)] = h

        rows = s.execute(select(Event, LogNode.hash).join(LogNode, and_(LogNode.level == 0, LogNode.idx == Event.seq - 1))
                         .order_by(Event.seq))
        for e, stored_leaf in rows:
            leaf = LogEvent(e.seq, time_us(utc(e.time)), e.type, e.actor, e.subject, e.program_id or "", e.reason,
                            e.payload_json).leaf_hash()
            if bytes(stored_leaf) != leaf and not altered:
                out.append(Problem("EVENT_ALTERED", f"event seq {e.seq} does not match its logged leaf hash"))
                altered = True  # the first one is what matters; the verifier names it too
            tree.append(bytes(stored_leaf), recomputed)
            if trusted is not None and tree.size == trusted.size:
                trusted_root = tree.root()
            if len(inner) >= _NODES_PER_READ:
                bad_nodes += _compare_nodes(s, inner)
        bad_nodes += _compare_nodes(s, inner)
        if bad_nodes:
            level, idx = bad_nodes[0]
            out.append(Problem("LOG_TREE_MISMATCH", f"{len(bad_nodes)} stored Merkle tree node(s) are not the hash of "
                               f"their leaves, the first at level {level}, index {idx}"))
        if trusted is not None and trusted_root != trusted.root_hash:
            out.append(Problem("LOG_FORKED", f"the log's first {trusted.size} leaves do not hash to the root of "
                               f"the trusted checkpoint"))
            trusted = None  # said once
    if trusted is not None:
        try:
            served = logtree.root(s, trusted.size)  # what checkpoints and proofs are made of
        except logtree.DamagedLog as exc:
            out.append(Problem("LOG_TREE_MISMATCH", str(exc)))
        else:
            if served != trusted.root_hash:
                out.append(Problem("LOG_FORKED", f"the stored tree's root at size {trusted.size} is not the root "
                                   f"of the trusted checkpoint"))
    return out


_NODES_PER_READ = 2000
_IDS_PER_QUERY = 500  # bound parameters per IN (...) of the acknowledged checks


def _compare_nodes(s: Session, recomputed: dict[merkle.Node, bytes]) -> list[merkle.Node]:
    """The nodes of `recomputed` whose stored hash differs or is missing (and empty the dict)."""
    if not recomputed:
        return []
    try:
        stored = logtree.fetch(s, recomputed)
    except logtree.DamagedLog:
        stored = {}
        for level, idx, h in s.execute(select(LogNode.level, LogNode.idx, LogNode.hash).where(
                LogNode.level >= 1, LogNode.idx >= min(i for _, i in recomputed))):
            if (level, idx) in recomputed:
                stored[(int(level), int(idx))] = bytes(h)
    bad = sorted(n for n, h in recomputed.items() if stored.get(n) != h)
    recomputed.clear()
    return bad


def _activations_have_their_records(s: Session) -> list[Problem]:
    out = []
    created = select(Event.subject).where(Event.type == "activation.created")
    missing_event = s.execute(select(Activation.id).where(
        ("activations/" + Activation.id).not_in(created)).limit(5)).scalars().all()
    for aid in missing_event:
        out.append(Problem("ACTIVATION_WITHOUT_EVENT", f"activations/{aid} has no activation.created event"))
    duplicated = s.execute(select(Event.subject).where(Event.type == "activation.created")
                           .group_by(Event.subject).having(func.count() > 1).limit(5)).scalars().all()
    for subject in duplicated:
        out.append(Problem("ACTIVATION_CREATED_TWICE", f"{subject} has more than one activation.created event"))
    orphans = s.execute(select(LedgerEntry.id).where(
        LedgerEntry.activation_id.not_in(select(Activation.id))).limit(5)).scalars().all()
    for entry in orphans:
        out.append(Problem("LEDGER_WITHOUT_ACTIVATION", f"ledger entry {entry} has no activation"))
    return out


LEDGER_KINDS = ("commit", "consume", "release")


def _ledger_balances(s: Session) -> list[Problem]:
    """Per activation: commits add up to its funding plan and to the shares its created event
    logged; for every funder with an entry of it (a commit or not), consumed + released never
    exceed committed (what is left is still reserved); and every entry is of a known kind, with a
    positive amount (0 only for a commit: the activation writes one per funder of its plan, the
    share of a free program or one rounding to no cent included)."""
    out: list[Problem] = []
    sums: dict[str, dict[tuple[str, str], int]] = defaultdict(dict)
    invalid = 0
    for aid, funder, kind, cents, smallest in s.execute(
            select(LedgerEntry.activation_id, LedgerEntry.funder_id, LedgerEntry.kind,
                   func.sum(LedgerEntry.amount_cents), func.min(LedgerEntry.amount_cents))
            .group_by(LedgerEntry.activation_id, LedgerEntry.funder_id, LedgerEntry.kind)):
        sums[aid][(funder, kind)] = int(cents)
        # (0 cents: a commit of a share rounding to nothing, a month's consumption of one, are sound)
        if kind not in LEDGER_KINDS or smallest < 0 or (smallest == 0 and kind == "release"):
            invalid += 1
            if invalid <= 5:
                what = f"entries of unknown kind {kind!r}" if kind not in LEDGER_KINDS else \
                    f"a {kind} entry of {int(smallest)} cents"
                out.append(Problem("LEDGER_ENTRY_INVALID", f"activations/{aid}, {funder}: {what}"))
    logged: dict[str, dict[str, int]] = {}
    for subject, payload_json in s.execute(select(Event.subject, Event.payload_json)
                                           .where(Event.type == "activation.created")):
        shares = json.loads(payload_json).get("shares")
        if isinstance(shares, dict):
            logged[subject[len("activations/"):]] = {f: int(c) for f, c in shares.items() if int(c)}
    for aid, decision_json in s.execute(select(Activation.id, Activation.decision_json)):
        plan = json.loads(decision_json)["decision"]["funding_plan"]
        ledger = sums.get(aid, {})
        committed = {f: c for (f, k), c in ledger.items() if k == "commit" and c}  # as the plan: no 0 shares
        expected = {f: int(c) for f, _bp, c in plan["shares"] if int(c)} if plan else {}
        if expected and not ledger:
            out.append(Problem("ACTIVATION_WITHOUT_LEDGER", f"activations/{aid}: no ledger entry, plan {expected}"))
            continue
        if committed != expected:
            out.append(Problem("COMMIT_MISMATCH", f"activations/{aid}: committed {committed}, plan {expected}"))
            continue
        if aid in logged and logged[aid] != committed:
            out.append(Problem("COMMIT_NOT_AS_LOGGED",
                               f"activations/{aid}: committed {committed}, its created event logged {logged[aid]}"))
        for funder in sorted({f for f, _k in ledger}):  # a funder that committed nothing may not spend
            total = committed.get(funder, 0)
            spent = ledger.get((funder, "consume"), 0) + ledger.get((funder, "release"), 0)
            if spent > total:
                out.append(Problem("LEDGER_OVERSPENT",
                                   f"activations/{aid}, {funder}: consumed + released {spent} > committed {total}"))
    return out


def _program_history(s: Session, catalog: ProgramCatalog) -> list[Problem]:
    """Every parameter value recorded with the activations' decisions is the one their program's
    file (loaded now, when it is still there) gives for the decision's day. One decision read per
    program, file version and day (its parameters are those of that version and day), whatever the
    number of activations. A parameter the file no longer has is not reported (a criterion removed
    takes its parameter with it); one it gained is not either (a criterion added needs its
    parameter dated from the program's start)."""
    out: list[Problem] = []
    groups = s.execute(select(Activation.program_id, Activation.program_version, Activation.start_date,
                              func.min(Activation.id))
                       .group_by(Activation.program_id, Activation.program_version, Activation.start_date)
                       .order_by(Activation.program_id, Activation.start_date)).all()
    wanted = [(str(pid), str(version), aid) for pid, version, _day, aid in groups
              if (program := catalog.get(str(pid))) is not None and program.version != version]
    reported: set[tuple[str, str, str]] = set()
    for i in range(0, len(wanted), _IDS_PER_QUERY):
        chunk = wanted[i:i + _IDS_PER_QUERY]
        stored = dict(s.execute(select(Activation.id, Activation.decision_json)
                                .where(Activation.id.in_([aid for _p, _v, aid in chunk]))).all())
        for pid, version, aid in chunk:
            program = catalog.get(pid)
            assert program is not None
            decision = json.loads(stored[aid])["decision"]
            day = dt.date.fromisoformat(decision["as_of"])
            for name, value_json, _effective_from, _reference in decision["parameters"]:
                if name not in program.parameters:
                    continue
                now = json.dumps(program.value(name, day).value, sort_keys=True)
                if _same_value(now, value_json) or (pid, name, value_json) in reported:
                    continue
                reported.add((pid, name, value_json))
                out.append(Problem("PROGRAM_VALUE_REWRITTEN", (
                    f"programs/{pid}: {program.source.name} gives {name} = {now} on {day.isoformat()}, but "
                    f"activations decided that day (activations/{aid}, file version {version}) used "
                    f"{value_json}: a past value was edited, or a value dated in the past added. They keep "
                    "the terms they were granted; to change terms from a date, add a value dated then")))
    return out


def _same_value(a_json: str, b_json: str) -> bool:
    """Two recorded parameter values are the same: equal, or lists of the same items in another
    order (categories and departments are sets: a file listing them anew is no rewrite)."""
    if a_json == b_json:
        return True
    a, b = json.loads(a_json), json.loads(b_json)
    return isinstance(a, list) and isinstance(b, list) and sorted(map(json.dumps, a)) == sorted(map(json.dumps, b))


def _counters(s: Session) -> list[Problem]:
    """Program counters (what caps compare against) agree with the ledger and the activations."""
    out = []
    signed = case((LedgerEntry.kind == "commit", LedgerEntry.amount_cents),
                  (LedgerEntry.kind == "release", -LedgerEntry.amount_cents), else_=0)
    net = dict(s.execute(select(LedgerEntry.program_id, func.sum(signed)).group_by(LedgerEntry.program_id)).all())
    seats = dict(s.execute(select(Activation.program_id, func.count()).group_by(Activation.program_id)).all())
    counters = {r.program_id: r for r in s.execute(select(ProgramCounter)).scalars()}
    for program in sorted(set(seats) | set(counters)):
        c = counters.get(program)
        want_seats, want_cents = int(seats.get(program, 0)), int(net.get(program, 0) or 0)
        if c is None or (c.seats_used, c.cents_committed) != (want_seats, want_cents):
            got = "no counter" if c is None else f"{c.seats_used} seats, {c.cents_committed} cents"
            out.append(Problem("COUNTER_MISMATCH", f"programs/{program}: counter {got}; activations and "
                               f"ledger say {want_seats} seats, {want_cents} cents"))
    return out


def _states_logged(s: Session) -> list[Problem]:
    """An activation's state is what its last logged state change left (created: active), and it
    is bound to an account exactly when one redemption was logged (unless the privacy purge has
    since unbound it): a change and its event are one transaction, so a crash can never leave one
    without the other."""
    out: list[Problem] = []
    last = (select(Event.subject, func.max(Event.seq).label("seq")).where(Event.type.in_(STATE_EVENTS))
            .group_by(Event.subject).subquery())
    logged: dict[str, str] = {}
    for subject, kind, payload_json in s.execute(
            select(Event.subject, Event.type, Event.payload_json).join(last, Event.seq == last.c.seq)):
        to = "active" if kind == "activation.created" else json.loads(payload_json).get("to", "")
        logged[subject[len("activations/"):]] = str(to)
    redeemed = dict(s.execute(select(Event.subject, func.count()).where(Event.type == "activation.redeemed")
                              .group_by(Event.subject)).all())
    wrong_state = wrong_binding = 0
    purged = Activation.decision_json.like('%"purged": true%')  # privacy purge unbinds ended activations
    for aid, state, account_id, was_purged in s.execute(
            select(Activation.id, Activation.state, Activation.account_id, purged)):
        if aid in logged and logged[aid] != state:
            wrong_state += 1
            if wrong_state <= 5:
                out.append(Problem("STATE_NOT_LOGGED", f"activations/{aid} is {state}; its last logged change "
                                   f"left it {logged[aid]}"))
        times = int(redeemed.get(f"activations/{aid}", 0))
        if (account_id is None and times and not was_purged) or (account_id is not None and times != 1):
            wrong_binding += 1
            if wrong_binding <= 5:
                bound = "bound to an account" if account_id is not None else "not bound to an account"
                out.append(Problem("REDEMPTION_NOT_LOGGED", f"activations/{aid} is {bound}, with {times} "
                                   f"redemption event(s)"))
    return out


def _idempotency(s: Session) -> list[Problem]:
    """An acknowledged request's stored answer points at a row that exists."""
    out = []
    known = set(s.execute(select(Activation.id)).scalars())
    for method, response in s.execute(select(IdempotencyRecord.method, IdempotencyRecord.response)):
        try:
            target = json.loads(response).get("activation_id")
        except (ValueError, AttributeError):
            continue
        if target and target not in known:
            out.append(Problem("ACKNOWLEDGED_BUT_MISSING", f"a stored {method} answer names activations/{target}"))
    return out


def _acknowledged(s: Session, acks: list[Acknowledged]) -> list[Problem]:
    """Each acknowledged request is durable (see Acknowledged); one problem per lost request."""
    if not acks:
        return []
    out: list[Problem] = []
    ids = sorted({a.activation_id for a in acks if a.activation_id})
    activations: dict[str, tuple[str, str | None]] = {}
    for i in range(0, len(ids), _IDS_PER_QUERY):
        activations.update({aid: (state, account) for aid, state, account in s.execute(
            select(Activation.id, Activation.state, Activation.account_id)
            .where(Activation.id.in_(ids[i:i + _IDS_PER_QUERY])))})
    keyed = [a for a in acks if a.request_id and a.method in KEYED_METHODS]
    stored: dict[tuple[str, str], tuple[str, str]] = {}
    for caller_id in sorted({a.caller_id for a in keyed}):
        wanted = sorted({a.request_id for a in keyed if a.caller_id == caller_id})
        for i in range(0, len(wanted), _IDS_PER_QUERY):
            for request_id, method, response in s.execute(
                    select(IdempotencyRecord.request_id, IdempotencyRecord.method, IdempotencyRecord.response)
                    .where(IdempotencyRecord.caller_id == caller_id,
                           IdempotencyRecord.request_id.in_(wanted[i:i + _IDS_PER_QUERY]))):
                try:
                    target = str(json.loads(response).get("activation_id", ""))
                except (ValueError, AttributeError):
                    target = ""
                stored[(caller_id, request_id)] = (method, target)
    snapshots = dict(s.execute(select(RegistrySnapshot.id, RegistrySnapshot.status).where(
        RegistrySnapshot.id.in_(sorted({a.snapshot_id for a in acks if a.method == "import"})))).all())
    kinds = {"suspend": "activation.suspended", "resume": "activation.resumed", "revoke": "activation.revoked"}
    for a in acks:
        what = f"an acknowledged {a.method}"
        if a.method in KEYED_METHODS:
            if a.activation_id not in activations:
                out.append(Problem("ACKNOWLEDGED_BUT_MISSING", f"{what} of activations/{a.activation_id}: no such "
                                   f"activation"))
            elif a.request_id and stored.get((a.caller_id, a.request_id)) != (a.method, a.activation_id):
                got = stored.get((a.caller_id, a.request_id))
                out.append(Problem("ACKNOWLEDGED_BUT_MISSING", f"{what} of activations/{a.activation_id} by "
                                   f"{a.caller_id}: stored answer {got or 'missing'}"))
            elif not a.request_id and a.method in kinds and not s.execute(select(Event.seq).where(
                    Event.subject == f"activations/{a.activation_id}", Event.type == kinds[a.method]).limit(1)).first():
                out.append(Problem("ACKNOWLEDGED_BUT_MISSING", f"{what} of activations/{a.activation_id}: no "
                                   f"{kinds[a.method]} event"))
        elif a.method == "redeem":
            bound = activations.get(a.activation_id, (None, None))[1]
            if bound != a.account_id:
                out.append(Problem("ACKNOWLEDGED_BUT_MISSING", f"{what} of activations/{a.activation_id}: bound "
                                   f"to {'another account' if bound else 'no account'}"))
        elif a.method == "import":
            if snapshots.get(a.snapshot_id) not in ("complete", "superseded"):
                out.append(Problem("ACKNOWLEDGED_BUT_MISSING", f"{what} of registrySnapshots/{a.snapshot_id}: "
                                   f"{snapshots.get(a.snapshot_id, 'no such snapshot')}"))
        else:
            raise ValueError(f"unknown acknowledged method {a.method!r}")
    return out


# The distinct snapshot ids of registry_people by a loose index scan of its primary key (snapshot_id,
# person_key): one index descent per snapshot, not a pass over millions of rows.
_PEOPLE_SNAPSHOTS = text(
    "WITH RECURSIVE ids(id) AS ("
    " SELECT (SELECT min(snapshot_id) FROM registry_people)"
    " UNION ALL"
    " SELECT (SELECT min(snapshot_id) FROM registry_people WHERE snapshot_id > ids.id) FROM ids"
    " WHERE ids.id IS NOT NULL)"
    " SELECT id FROM ids WHERE id IS NOT NULL")

# Snapshots that may hold people rows: the one being imported and the complete ones (pruning
# deletes the rows of those it marks superseded, a failed import its own, in the same transaction).
_MAY_HOLD_ROWS = ("importing", "complete")


def _registry(s: Session) -> list[Problem]:
    """Every registry_people row names an existing snapshot that is importing or complete (no
    foreign key says so since migration 0009: this check does)."""
    out = []
    status = dict(s.execute(select(RegistrySnapshot.id, RegistrySnapshot.status)).all())
    for sid in s.execute(_PEOPLE_SNAPSHOTS).scalars():
        if sid not in status:
            out.append(Problem("REGISTRY_ROW_ORPHANED",
                               f"registry_people rows name registrySnapshots/{sid}, which does not exist"))
        elif status[sid] not in _MAY_HOLD_ROWS:
            out.append(Problem("REGISTRY_ROWS_OF_DEAD_SNAPSHOT",
                               f"registrySnapshots/{sid} is {status[sid]} but still has registry_people rows"))
    return out


def _report_rollup(s: Session) -> list[Problem]:
    """The funding report's rollup (entitlement/rollup.py) equals its recomputation from the ledger
    entries and the activations."""
    return [Problem("REPORT_ROLLUP_MISMATCH", detail) for detail in list(rollup.differences(s))[:5]]
