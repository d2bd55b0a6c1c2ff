"""ListActivations answers byte for byte what it answered before it was made cheaper per row (plain
columns on the autocommit pool, each distinct decision decoded and serialized once, messages built in
place): the reference below is the former code (ORM instances in a read transaction,
activation.view, convert.activation), frozen here, with the funder scope it has had since (an
activation of which the funder has a `commit` ledger entry). Compared on the wire (the raw response bytes)
over a randomized set of activations: real ones made through the RPCs, and rows written directly
with every variant a stored activation can take (states live past their end date, redeemed or
not, snapshots or none, live facts, funding plans or none, purged decisions, counters and mentors
that differ, decisions stored in another JSON shape, instants with and without microseconds, ties
on create_time, text with quotes, braces and accents)."""

from __future__ import annotations

import datetime as dt
import json
import random
import uuid
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import timestamp_pb2
from google.type import date_pb2
from own_server import next_ledger_person, own_server
from sqlalchemy import select, tuple_
from support import CALLERS, TODAY, Api, Harness, identity

from entitlement import audit, privacy, registry, rules
from entitlement.activation import LIVE, STATES
from entitlement.api.convert import STATE_TO_PROTO
from entitlement.app import Context
from entitlement.callers import Caller
from entitlement.paging import page_size
from entitlement.storage.db import utc
from entitlement.storage.models import Activation, LedgerEntry
from entitlement.v1 import activation_pb2, audit_pb2, common_pb2

METHOD = "/entitlement.v1.AuditService/ListActivations"
PROGRAMS = ("premium-job-seekers", "opencfa-apprentices", "deuxieme-chance-numerique")


# ------------------------------------------------------------------ the former code, frozen here

def _ref_view(ctx: Context, a: Activation) -> dict[str, Any]:
    stored = json.loads(a.decision_json)
    snap = stored.get("registry_snapshot")
    today = ctx.clock.today()
    return dict(
        id=a.id, program_id=a.program_id,
        state="expired" if a.state in LIVE and a.end_date < today else a.state,
        person_ref=ctx.pseudo.person_ref(a.person_key), advisor_id=a.advisor_id, agency_code=a.agency_code,
        start_date=a.start_date, end_date=a.end_date, created_at=utc(a.created_at),
        updated_at=utc(a.updated_at), platform_id=a.platform_id, account_id=a.account_id,
        redeemed_at=utc(a.redeemed_at) if a.redeemed_at else None,
        decision=rules.decision_from_dict(stored["decision"]),
        snapshot=registry.SnapshotRef(snap["id"], dt.date.fromisoformat(snap["extracted_on"])) if snap else None,
        # (Since: a live activation past its end date gives its expiry's reason, as the job records it.)
        state_reason="end date passed" if a.state in LIVE and a.end_date < today else a.state_reason)


def _ref_date(d: dt.date | None) -> date_pb2.Date | None:
    return None if d is None else date_pb2.Date(year=d.year, month=d.month, day=d.day)


def _ref_timestamp(t: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if t is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(t)
    return ts


def _ref_plan(plan: rules.FundingPlan | None, funder: str = "") -> common_pb2.FundingPlan | None:
    """`funder`: a funder caller's answer, its own share alone."""
    if plan is None:
        return None
    return common_pb2.FundingPlan(
        price_per_month_cents=plan.price_per_month_cents, months=plan.months, total_cents=plan.total_cents,
        shares=[common_pb2.FundingShare(funder=f, share_basis_points=bp, amount_cents=c) for f, bp, c in plan.shares
                if not funder or f == funder])


def _ref_decision(d: rules.Decision, snapshot: registry.SnapshotRef | None,
                  funder: str = "") -> common_pb2.EligibilityDecision:
    return common_pb2.EligibilityDecision(
        program=f"programs/{d.program_id}", eligible=d.eligible,
        criteria=[common_pb2.Criterion(criterion=c.criterion, passed=c.passed, reason_code=c.reason_code,
                                       detail=c.detail) for c in d.criteria],
        as_of=_ref_date(d.as_of), program_version=d.program_version,
        parameters=[common_pb2.ParameterValue(name=p.name, value_json=p.value_json,
                                              effective_from=_ref_date(p.effective_from), reference=p.reference)
                    for p in d.parameters],
        funding_plan=_ref_plan(d.funding_plan, funder),
        registry_snapshot=snapshot.name if snapshot else "",
        registry_extracted_on=_ref_date(snapshot.extracted_on if snapshot else d.circumstances.registry_extracted_on),
        access_end_date=_ref_date(d.access_end), facts_source=d.circumstances.facts_source)


def _ref_activation(a: dict[str, Any], funder: str = "") -> activation_pb2.Activation:
    return activation_pb2.Activation(
        name=f"activations/{a['id']}", program=f"programs/{a['program_id']}", state=STATE_TO_PROTO[a["state"]],
        job_seeker_ref=a["person_ref"], advisor_id=a["advisor_id"], agency_code=a["agency_code"],
        start_date=_ref_date(a["start_date"]), end_date=_ref_date(a["end_date"]),
        create_time=_ref_timestamp(a["created_at"]), update_time=_ref_timestamp(a["updated_at"]),
        # (a funder never sees the learner's platform account id: personal data, since the 26th session)
        platform=f"platforms/{a['platform_id']}", account_id="" if funder else a["account_id"] or "",
        redeem_time=_ref_timestamp(a["redeemed_at"]), decision=_ref_decision(a["decision"], a["snapshot"], funder),
        funding=_ref_plan(a["decision"].funding_plan, funder), state_reason=a["state_reason"])


def reference_page(ctx: Context, caller: Caller, f: audit.ActivationFilter, size: int, token: str) -> bytes:
    """The former audit.list_activations and servicer, serialized."""
    size = page_size(size, default=50, maximum=500)
    filters = {**f.__dict__, "caller": caller.id}
    position = audit._tokens(ctx).read(token, "activations", filters)
    _funder, programs = audit._scope(ctx, caller, f.funder, f.program_id)
    funder = caller.funder_id if caller.role == "funder" else f.funder
    q = select(Activation)
    if programs is not None:
        q = q.where(Activation.program_id.in_(programs))
    if funder:
        q = q.where(select(LedgerEntry.id).where(LedgerEntry.activation_id == Activation.id,
                                                 LedgerEntry.funder_id == funder,
                                                 LedgerEntry.kind == "commit").exists())
    if f.agency_code:
        q = q.where(Activation.agency_code == f.agency_code)
    today = ctx.clock.today()
    if f.state == "expired":
        q = q.where((Activation.state == "expired") | (Activation.state.in_(LIVE) & (Activation.end_date < today)))
    elif f.state in LIVE:
        q = q.where(Activation.state == f.state, Activation.end_date >= today)
    elif f.state:
        q = q.where(Activation.state == f.state)
    if f.created_from:
        q = q.where(Activation.created_at >= f.created_from)
    if f.created_to:
        q = q.where(Activation.created_at < f.created_to)
    if position:
        q = q.where(tuple_(Activation.created_at, Activation.id) <
                    tuple_(dt.datetime.fromisoformat(position[0]), position[1]))
    q = q.order_by(Activation.created_at.desc(), Activation.id.desc()).limit(size + 1)
    with ctx.db.read() as s:
        rows = list(s.execute(q).scalars())
    more = len(rows) > size
    rows = rows[:size]
    next_token = ""
    if more:
        last = rows[-1]
        next_token = audit._tokens(ctx).issue("activations", filters, [utc(last.created_at).isoformat(), last.id])
    views = [_ref_view(ctx, a) for a in rows]
    own = caller.funder_id if caller.role == "funder" else ""  # a funder sees its own share alone
    return audit_pb2.ListActivationsResponse(activations=[_ref_activation(v, own) for v in views],
                                             next_page_token=next_token).SerializeToString()


# ------------------------------------------------------------------------------- the data

def _make_real(h: Harness) -> None:
    """Activations made, redeemed, suspended and revoked through the RPCs."""
    api = Api(h)
    made = []
    for i in range(10):
        agency_id, birth = next_ledger_person()
        if i % 3 == 2:
            r = api.as_("advisor-lyon" if i % 2 else "advisor-paris").ActivateEntitlement(
                activation_pb2.ActivateEntitlementRequest(
                    job_seeker=identity(agency_id, birth), program="programs/opencfa-apprentices",
                    platform="platforms/openclassrooms", reason="apprentissage « CFA »", mentor_id=f"M-{i}"))
        else:
            r = api.activate(agency_id, birth, reason=f"test {i}")
        made.append(r)
    for i, r in enumerate(made[:4]):
        api.platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
            token=r.activation_token, account_id=f"account-{i}"))
    api.as_("admin").SuspendActivation(activation_pb2.TransitionActivationRequest(
        name=made[4].activation.name, reason="pause"))
    api.as_("admin").RevokeActivation(activation_pb2.TransitionActivationRequest(
        name=made[5].activation.name, reason="fin"))


def _variant(rng: random.Random, template: dict[str, Any]) -> str:
    stored = json.loads(json.dumps(template))
    d = stored["decision"]
    circ = d.setdefault("circumstances", {})
    circ["seats_used"] = rng.randrange(0, 10**6)
    circ["cents_committed"] = rng.randrange(0, 10**9)
    circ["mentor_id"] = rng.choice(["", "M-1", "m.2_x-Y"])
    circ["facts_source"] = rng.choice(["snapshot", "live", "snapshot_fallback"])
    circ["registry_extracted_on"] = rng.choice([None, "2026-03-15", "2025-12-31"])
    stored["registry_snapshot"] = rng.choice([None, {"id": 1, "extracted_on": "2026-03-15"},
                                              {"id": 7, "extracted_on": "2025-01-02"}])
    roll = rng.random()
    if roll < 0.15:
        d["funding_plan"] = None
    if rng.random() < 0.2:
        d["access_end"] = None
    if rng.random() < 0.3 and d["criteria"]:
        c = rng.randrange(len(d["criteria"]))
        d["criteria"][c][3] = rng.choice(['Il a dit "oui" }', "accentué é à ü", "back\\slash", "{brace}"])
    text = json.dumps(stored, sort_keys=True)
    if rng.random() < 0.15:
        text = privacy._scrub_decision(text)
    if rng.random() < 0.1:
        text = json.dumps(json.loads(text))  # another shape: keys not sorted
    if rng.random() < 0.05:
        text = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    return text


def _make_random(h: Harness, n: int, seed: int) -> None:
    """Rows written directly, shaped like the service's, varied at random, each with a `commit`
    ledger entry per funder of its program, one funder left out now and then (a plan decided when
    the program's funders were others)."""
    rng = random.Random(seed)
    funders = {p: sorted({f for v in h.ctx.catalog.get(p).parameters["funders"].values for f in v.value})
               for p in PROGRAMS}
    commits = []
    with h.ctx.db.read() as s:
        templates = [json.loads(t) for t in s.execute(select(Activation.decision_json)).scalars()]
    assert templates
    base = dt.datetime.combine(TODAY, dt.time(9), tzinfo=dt.timezone.utc)
    rows = []
    shared = base - dt.timedelta(hours=3)
    for i in range(n):
        created = shared if i % 11 == 0 else base - dt.timedelta(seconds=rng.randrange(0, 90 * 86400),
                                                                  microseconds=rng.randrange(0, 10**6))
        if i % 5 == 0:
            created = created.replace(microsecond=0)
        start = created.date()
        end = start + dt.timedelta(days=rng.randrange(0, 400))
        redeemed = rng.random() < 0.4
        rows.append({
            "id": uuid.UUID(int=rng.getrandbits(128)).hex, "program_id": rng.choice(PROGRAMS),
            "program_version": "v", "person_key": rng.randbytes(32), "state": rng.choice(STATES),
            "start_date": start, "end_date": end, "advisor_id": rng.choice(["A0001", "A0002", "é-advisor"]),
            "agency_code": rng.choice(["75011", "69003"]), "platform_id": rng.choice(["openclassrooms", "other"]),
            "state_reason": rng.choice(["", "bench", 'motif "cité" }', "réactivé"]),
            "decision_json": _variant(rng, rng.choice(templates)), "snapshot_id": None,
            "token_jti": uuid.UUID(int=rng.getrandbits(128)).hex,
            "account_id": f"acct-{i}" if redeemed else None,
            "redeemed_at": created + dt.timedelta(seconds=rng.randrange(1, 10**6)) if redeemed else None,
            "created_at": created, "updated_at": created + dt.timedelta(seconds=rng.randrange(0, 10**6)),
        })
        shares = list(funders[rows[-1]["program_id"]])
        if rng.random() < 0.2:
            shares.remove(rng.choice(shares))
        commits += [{"activation_id": rows[-1]["id"], "program_id": rows[-1]["program_id"], "funder_id": f,
                     "kind": "commit", "month": start.strftime("%Y-%m"), "amount_cents": 1000, "created_at": created}
                    for f in shares]
    with h.ctx.db.write() as s:
        s.connection().execute(Activation.__table__.insert(), rows)
        s.connection().execute(LedgerEntry.__table__.insert(), commits)


# ------------------------------------------------------------------------------- the tests

def _stamp(t: dt.datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(t)
    return ts


def test_pages_are_byte_identical_to_the_former_code(backend: tuple[str, str], tmp_path: Path,
                                                     request: pytest.FixtureRequest) -> None:
    with own_server(backend[0], tmp_path / "own", request) as h:
        _make_real(h)
        _make_random(h, 400, seed=8)
        raw = h.channel.unary_unary(METHOD, request_serializer=audit_pb2.ListActivationsRequest.SerializeToString,
                                    response_deserializer=None)
        callers = {c.id: c for c in CALLERS}
        since = dt.datetime.combine(TODAY - dt.timedelta(days=30), dt.time(0), tzinfo=dt.timezone.utc)
        until = dt.datetime.combine(TODAY - dt.timedelta(days=5), dt.time(12), tzinfo=dt.timezone.utc)
        cases: list[tuple[str, dict[str, Any], audit.ActivationFilter]] = [
            ("admin", {}, audit.ActivationFilter()),
            ("admin", {"program": "programs/opencfa-apprentices"}, audit.ActivationFilter(program_id="opencfa-apprentices")),
            ("admin", {"agency_code": "69003"}, audit.ActivationFilter(agency_code="69003")),
            ("admin", {"funder": "ministry-of-labour"}, audit.ActivationFilter(funder="ministry-of-labour")),
            ("admin", {"create_time_from": _stamp(since), "create_time_to": _stamp(until)},
             audit.ActivationFilter(created_from=since, created_to=until)),
            ("funder-ministry", {}, audit.ActivationFilter()),
            ("funder-idf", {}, audit.ActivationFilter()),
            ("funder-ft", {"agency_code": "75011", "create_time_from": _stamp(since)},
             audit.ActivationFilter(agency_code="75011", created_from=since)),
        ]
        cases += [("admin", {"state": STATE_TO_PROTO[s]}, audit.ActivationFilter(state=s)) for s in STATES]
        pages = 0
        for caller_id, fields, f in cases:
            md = (("authorization", f"Bearer {h.tokens[caller_id]}"),)
            for size in (0, 1, 7, 100, 500):
                if size == 1 and pages > 300:
                    continue
                token, seen = "", 0
                while True:
                    got = raw(audit_pb2.ListActivationsRequest(page_size=size, page_token=token, **fields),
                              metadata=md, timeout=60)
                    want = reference_page(h.ctx, callers[caller_id], f, size, token)
                    assert got == want, f"{caller_id} {fields} size {size} page after {seen} items differs"
                    page = audit_pb2.ListActivationsResponse.FromString(got)
                    seen += len(page.activations)
                    pages += 1
                    token = page.next_page_token
                    if not token:
                        break
                if size == 500 and not fields and caller_id == "admin":
                    assert seen >= 410  # every row was compared
        assert pages > 100


def test_a_listed_decision_is_shared_only_by_rows_that_show_the_same() -> None:
    """Stored decisions that differ only in what no listing shows (the caps' counters, the mentor)
    share one decoded decision; any difference the Activation message shows keeps them apart."""
    decision = rules.Decision(
        program_id="premium-job-seekers", program_version="abc", as_of=dt.date(2026, 3, 16), eligible=True,
        criteria=(rules.CriterionResult("program_open", True, "", "open"),), parameters=(),
        funding_plan=rules.FundingPlan(2000, 12, 24000, (("ministry-of-labour", 10000, 24000),)),
        access_end=dt.date(2027, 3, 15),
        circumstances=rules.Circumstances(registry_extracted_on=dt.date(2026, 3, 15), seats_used=3,
                                          cents_committed=72000, mentor_id="M-1", facts_source="snapshot"))

    def stored(**circumstances: Any) -> str:
        d = rules.decision_to_dict(decision)
        d["circumstances"].update(circumstances)  # type: ignore[attr-defined]
        return json.dumps({"decision": d, "registry_snapshot": {"id": 4, "extracted_on": "2026-03-15"}},
                          sort_keys=True)

    first = audit._listed_decision(stored())
    assert audit._listed_decision(stored(seats_used=4, cents_committed=96000, mentor_id="")) is first
    assert first[0].circumstances == rules.Circumstances(registry_extracted_on=dt.date(2026, 3, 15),
                                                         facts_source="snapshot")
    assert first[1] == registry.SnapshotRef(4, dt.date(2026, 3, 15))
    for other in (stored(facts_source="live"), stored(registry_extracted_on=None),
                  stored(registry_extracted_on="2026-03-14"),
                  stored().replace('"id": 4', '"id": 5'), stored().replace('"open"', '"open "')):
        assert audit._listed_decision(other) is not first, other


def test_a_page_is_one_statement_and_no_transaction(api: Api) -> None:
    """A page is read by one statement on the autocommit pool: one consistent snapshot, and the
    next page's token is taken from the rows it returned (issue "Step 7": one round trip per read)."""
    from test_round_trips import counting

    for _ in range(3):
        api.activate()
    request = audit_pb2.ListActivationsRequest(page_size=2)
    first = api.admin.ListActivations(request)
    assert first.next_page_token
    for req in (request, audit_pb2.ListActivationsRequest(page_size=2, page_token=first.next_page_token)):
        with counting(api) as trips:
            page = api.admin.ListActivations(req)
        assert page.activations
        assert len(trips.statements["autocommit"]) == 1, trips
        assert trips.statements["transactional"] == [] and trips.transactions == 0, trips
