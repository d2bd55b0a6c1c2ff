"""The hot paths' answers built in place or kept serialized (entitlement/api/convert.py:
check_answer, activation, activation_response, status) are, byte for byte on the wire, the messages the
plain builders make (the conversions as they were before, frozen in
tests/test_list_activations_output.py: every message built by its constructor from its field
values), over every program of the catalog and random people, days, snapshots and activation
states."""

from __future__ import annotations

import datetime as dt

from google.type import date_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from test_list_activations_output import _ref_activation, _ref_decision

from entitlement import rules
from entitlement.activation import ActivationView, EntitlementStatus
from entitlement.api import convert
from entitlement.config import ROOT
from entitlement.programs import ProgramCatalog
from entitlement.registry import SnapshotRef
from entitlement.v1 import activation_pb2, eligibility_pb2

CATALOG = ProgramCatalog.load(ROOT / "programs")
PROGRAMS = CATALOG.all()
DAYS = st.dates(dt.date(2025, 1, 1), dt.date(2027, 12, 31))
FACTS = st.none() | st.builds(
    rules.PersonFacts, birth_date=st.dates(dt.date(1950, 1, 1), dt.date(2010, 12, 31)),
    postal_code=st.sampled_from(["75011", "13001", "97411", "98800", "59000", "69003"]),
    registered_on=DAYS, registration_ended_on=st.none() | DAYS, category=st.integers(1, 8))
SNAPSHOTS = st.none() | st.builds(SnapshotRef, st.integers(1, 10**6), DAYS)
CIRCUMSTANCES = st.builds(
    rules.Circumstances, registry_extracted_on=st.none() | DAYS, seats_used=st.integers(0, 10**4),
    cents_committed=st.integers(0, 10**9), mentor_id=st.sampled_from(["", "M-1"]),
    facts_source=st.sampled_from(["snapshot", "live", "snapshot_fallback"]))
TIMES = st.datetimes(dt.datetime(2025, 1, 1), dt.datetime(2027, 12, 31), timezones=st.just(dt.timezone.utc))


@settings(max_examples=300, deadline=None)
@given(facts=st.lists(FACTS, min_size=1, max_size=3), day=DAYS, snapshot=SNAPSHOTS, circumstances=CIRCUMSTANCES,
       all_programs=st.booleans())
def test_check_response_is_the_plain_builders_response(facts: list[rules.PersonFacts | None], day: dt.date,
                                                       snapshot: SnapshotRef | None,
                                                       circumstances: rules.Circumstances, all_programs: bool) -> None:
    programs = PROGRAMS if all_programs else PROGRAMS[:1]
    decisions = [rules.evaluate(p, f, day, circumstances) for f in facts for p in programs]
    want = eligibility_pb2.CheckEligibilityResponse(decisions=[_ref_decision(d, snapshot) for d in decisions])
    answer = convert.check_answer(decisions, snapshot)
    assert answer == want.SerializeToString()  # the bytes CheckEligibility sends
    got = eligibility_pb2.CheckEligibilityResponse.FromString(answer)
    assert got.SerializeToString() == want.SerializeToString()
    assert got == want


@settings(max_examples=300, deadline=None)
@given(facts=FACTS, day=DAYS, snapshot=SNAPSHOTS, circumstances=CIRCUMSTANCES, program=st.sampled_from(PROGRAMS),
       state=st.sampled_from(list(convert.STATE_TO_PROTO)), created=TIMES, redeemed=st.none() | TIMES,
       account=st.sampled_from([None, "acct-1"]), reason=st.text(max_size=30), token=st.text(max_size=600))
def test_activation_builders_are_the_plain_builders_messages(
        facts: rules.PersonFacts | None, day: dt.date, snapshot: SnapshotRef | None,
        circumstances: rules.Circumstances, program: object, state: str, created: dt.datetime,
        redeemed: dt.datetime | None, account: str | None, reason: str, token: str) -> None:
    # An uncapped program's decision is shared, its bytes kept and reused (convert.activation_response);
    # a capped one's built in place: with and without counts, and a second activation of the same
    # decision, against the plain builders.
    for counts in ((circumstances.seats_used, circumstances.cents_committed), (0, 0), (0, 0)):
        _check_activation_builders(program, facts, day, snapshot, circumstances._replace(
            seats_used=counts[0], cents_committed=counts[1]), state, created, redeemed, account, reason, token)


def _check_activation_builders(program: object, facts: rules.PersonFacts | None, day: dt.date,
                               snapshot: SnapshotRef | None, circumstances: rules.Circumstances, state: str,
                               created: dt.datetime, redeemed: dt.datetime | None, account: str | None,
                               reason: str, token: str) -> None:
    d = rules.evaluate(program, facts, day, circumstances)  # type: ignore[arg-type]
    view = ActivationView(
        id="0123456789abcdef" * 2, program_id=d.program_id, state=state, person_ref="r" * 43, advisor_id="A0001",
        agency_code="75011", start_date=day, end_date=d.access_end or day, created_at=created,
        updated_at=created + dt.timedelta(seconds=7, microseconds=3), platform_id="openclassrooms",
        account_id=account, redeemed_at=redeemed, decision=d, snapshot=snapshot, state_reason=reason)
    plain = _ref_activation(vars(view))
    assert convert.activation(view).SerializeToString() == plain.SerializeToString()
    want = activation_pb2.ActivateEntitlementResponse(activation=plain, activation_token=token)
    assert convert.activation_response(view, token).SerializeToString() == want.SerializeToString()


@settings(max_examples=300, deadline=None)
@given(account=st.text(min_size=1, max_size=40), active=st.booleans(), activation=st.sampled_from(["", "0123abcd" * 4]),
       program=st.sampled_from(["", *(p.id for p in PROGRAMS)]), state=st.sampled_from(["", "nonsense", *convert.STATE_TO_PROTO]),
       end=st.none() | DAYS, tier=st.sampled_from(["", "premium"]))
def test_verification_answer_is_the_plain_builders_message(account: str, active: bool, activation: str, program: str,
                                                           state: str, end: dt.date | None, tier: str) -> None:
    """VerifyEntitlement's answer (its end date set in place) is the message built from its fields."""
    s = EntitlementStatus(account_id=account, active=active, activation_id=activation, program_id=program,
                          state=state, end_date=end, tier=tier)
    want = activation_pb2.EntitlementStatus(
        account_id=account, active=active, activation=f"activations/{activation}" if activation else "",
        program=f"programs/{program}" if program else "",
        state=convert.STATE_TO_PROTO.get(state, activation_pb2.ACTIVATION_STATE_UNSPECIFIED),
        end_date=None if end is None else date_pb2.Date(year=end.year, month=end.month, day=end.day), tier=tier)
    got = convert.status(s)
    assert got.SerializeToString() == want.SerializeToString()
    assert got.HasField("end_date") == (end is not None)
