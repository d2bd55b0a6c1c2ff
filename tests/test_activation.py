"""An activation's life and exactly-once behaviour, over the real channel, on both backends:
transitions (allowed and refused, one event each), the ledger release on revocation, AIP-155
idempotency, one live activation per person and program (also under concurrency), advisor scope,
and the platform side (redeem, forged and expired tokens, verify)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select

from own_server import next_ledger_person, on_day, own_server
from support import TODAY, Api, Failure, Harness, expect_error, failure, identity, next_person, wait_until
from test_ledger import lock_waiters

from entitlement import credentials
from entitlement.callers import make_caller
from entitlement.storage.models import Activation, Event
from entitlement.v1 import activation_pb2, audit_pb2

PROGRAM = "programs/premium-job-seekers"
FUNDERS = ("france-travail", "ministry-of-labour")
PRICE, MONTHS = 2000, 12
PARIS_ACTOR = "advisor:A0001@75011"
TOKEN_TYPE = "entitlement-activation+jwt"

STATE_NAMES = {activation_pb2.ACTIVE: "ACTIVE", activation_pb2.SUSPENDED: "SUSPENDED",
               activation_pb2.REVOKED: "REVOKED", activation_pb2.EXPIRED: "EXPIRED"}


# ------------------------------------------------------------------------------------------ helpers

def rid() -> str:
    return uuid.uuid4().hex


def move(api: Api, action: str, name: str, reason: str, *, caller: str = "advisor-paris",
         request_id: str = "") -> activation_pb2.Activation:
    method = {"suspend": "SuspendActivation", "resume": "ResumeActivation", "revoke": "RevokeActivation"}[action]
    return getattr(api.as_(caller), method)(activation_pb2.TransitionActivationRequest(
        name=name, reason=reason, request_id=request_id))


def refuse_move(api: Api, action: str, name: str, reason: str, code: grpc.StatusCode, *,
                caller: str = "advisor-paris", request_id: str = "") -> Failure:
    method = {"suspend": "SuspendActivation", "resume": "ResumeActivation", "revoke": "RevokeActivation"}[action]
    return expect_error(getattr(api.as_(caller), method), activation_pb2.TransitionActivationRequest(
        name=name, reason=reason, request_id=request_id), code)


def get(api: Api, name: str, caller: str = "advisor-paris") -> activation_pb2.Activation:
    return api.as_(caller).GetActivation(activation_pb2.GetActivationRequest(name=name))


def all_events(api: Api) -> list[audit_pb2.Event]:
    events: list[audit_pb2.Event] = []
    token = ""
    while True:
        page = api.admin.ListEvents(audit_pb2.ListEventsRequest(page_size=1000, page_token=token))
        events.extend(page.events)
        token = page.next_page_token
        if not token:
            return events


def events_of(api: Api, name: str) -> list[audit_pb2.Event]:
    return [e for e in all_events(api) if e.subject == name]


def ledger(api: Api, month: str) -> dict[str, tuple[int, int, int]]:
    """funder -> (activations_started, committed_cents, released_cents) for the program and month."""
    rows = api.admin.GetFundingReport(audit_pb2.GetFundingReportRequest(
        program=PROGRAM, start_month=month, end_month=month)).rows
    out = {f: (0, 0, 0) for f in FUNDERS}
    for r in rows:
        assert r.program == PROGRAM and r.month == month
        out[r.funder] = (r.activations_started, r.committed_cents, r.released_cents)
    return out


def delta(before: dict[str, tuple[int, int, int]],
          after: dict[str, tuple[int, int, int]]) -> dict[str, tuple[int, int, int]]:
    return {f: tuple(a - b for a, b in zip(after[f], before[f])) for f in FUNDERS}  # type: ignore[misc]


@contextmanager
def clock_moved(harness: Harness, days: int) -> Iterator[None]:
    """Move the shared server clock, and always move it back."""
    harness.clock.advance(dt.timedelta(days=days))
    try:
        yield
    finally:
        harness.clock.advance(dt.timedelta(days=-days))


def this_month() -> str:
    return TODAY.strftime("%Y-%m")


def redeem(api: Api, token: str, account: str, caller: str = "platform-oc") -> activation_pb2.EntitlementStatus:
    return api.as_(caller).RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
        token=token, account_id=account))


def refuse_redeem(api: Api, token: str, account: str, code: grpc.StatusCode,
                  caller: str = "platform-oc") -> Failure:
    return expect_error(api.as_(caller).RedeemActivationToken, activation_pb2.RedeemActivationTokenRequest(
        token=token, account_id=account), code)


def verify(api: Api, account: str, caller: str = "platform-oc") -> activation_pb2.EntitlementStatus:
    return api.as_(caller).VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(account_id=account))


# ------------------------------------------------------------------------------------- transitions

@pytest.mark.parametrize("path", [["suspend", "resume", "revoke"], ["suspend", "revoke"], ["revoke"],
                                  ["suspend", "resume", "suspend", "resume"]],
                         ids=lambda p: "->".join(p))
def test_allowed_transitions_each_write_one_event(api: Api, path: list[str]) -> None:
    act = api.activate(reason="first activation").activation
    assert act.state == activation_pb2.ACTIVE
    expected_state = {"suspend": activation_pb2.SUSPENDED, "resume": activation_pb2.ACTIVE,
                      "revoke": activation_pb2.REVOKED}
    reasons = []
    for step, action in enumerate(path):
        reason = f"{action} #{step} for {act.name}"
        reasons.append(reason)
        moved = move(api, action, act.name, reason)
        assert moved.name == act.name
        assert moved.state == expected_state[action]
        assert moved.state_reason == reason
        again = get(api, act.name)
        assert again.state == expected_state[action] and again.state_reason == reason

    events = events_of(api, act.name)
    assert [e.type for e in events] == ["activation.created"] + [
        {"suspend": "activation.suspended", "resume": "activation.resumed", "revoke": "activation.revoked"}[a]
        for a in path]
    assert all(e.actor == PARIS_ACTOR for e in events)
    assert [e.reason for e in events] == ["first activation"] + reasons
    seqs = [e.sequence for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    state_before = "active"
    for e, action in zip(events[1:], path):
        payload = json.loads(e.payload_json)
        new = {"suspend": "suspended", "resume": "active", "revoke": "revoked"}[action]
        assert (payload["from"], payload["to"]) == (state_before, new)
        state_before = new


REFUSED = [
    # (moves to reach the state, refused action, current_state reported)
    ([], "resume", "ACTIVE"),
    (["suspend"], "suspend", "SUSPENDED"),
    (["revoke"], "suspend", "REVOKED"),
    (["revoke"], "resume", "REVOKED"),
    (["revoke"], "revoke", "REVOKED"),
    (["suspend", "revoke"], "resume", "REVOKED"),
    (["suspend", "revoke"], "revoke", "REVOKED"),
]


@pytest.mark.parametrize("setup,action,current", REFUSED,
                         ids=[f"{'-'.join(s) or 'active'}:{a}" for s, a, _ in REFUSED])
def test_refused_transitions_are_invalid_state_and_write_nothing(api: Api, setup: list[str], action: str,
                                                                 current: str) -> None:
    act = api.activate().activation
    for step in setup:
        move(api, step, act.name, f"setup {step}")
    before = get(api, act.name)
    events_before = events_of(api, act.name)

    f = refuse_move(api, action, act.name, "should be refused", grpc.StatusCode.FAILED_PRECONDITION)
    assert f.reason == "INVALID_STATE"
    assert f.metadata["current_state"] == current
    assert f.metadata["action"] == action

    after = get(api, act.name)
    assert STATE_NAMES[after.state] == current
    assert after.state_reason == before.state_reason
    assert after.update_time == before.update_time
    assert events_of(api, act.name) == events_before


def test_transitions_on_an_expired_activation_are_refused(api: Api, harness: Harness) -> None:
    act = api.activate().activation
    end = dt.date(act.end_date.year, act.end_date.month, act.end_date.day)
    with clock_moved(harness, (end - TODAY).days + 1):
        assert get(api, act.name).state == activation_pb2.EXPIRED
        for action in ("suspend", "resume", "revoke"):
            f = refuse_move(api, action, act.name, "too late", grpc.StatusCode.FAILED_PRECONDITION)
            assert f.reason == "INVALID_STATE" and f.metadata["current_state"] == "EXPIRED"
    assert get(api, act.name).state == activation_pb2.ACTIVE


# ------------------------------------------------------------------------------------------ ledger

@pytest.mark.parametrize("suspend_first", [False, True], ids=["from-active", "from-suspended"])
def test_revoke_releases_the_months_not_yet_begun(api: Api, suspend_first: bool) -> None:
    month = this_month()
    before = ledger(api, month)
    act = api.activate().activation
    assert {s.funder: s.amount_cents for s in act.funding.shares} == {f: PRICE * MONTHS // 2 for f in FUNDERS}

    after_activation = ledger(api, month)
    assert delta(before, after_activation) == {f: (1, PRICE * MONTHS // 2, 0) for f in FUNDERS}

    if suspend_first:
        move(api, "suspend", act.name, "paused")
        assert ledger(api, month) == after_activation  # a suspension moves no money
    move(api, "revoke", act.name, "left the program")

    # Started today: month 1 of 12 has begun, 11 are released, split exactly between the funders;
    # what was committed stays committed.
    released = 11 * PRICE
    assert delta(after_activation, ledger(api, month)) == {f: (0, 0, released // 2) for f in FUNDERS}
    [revoked] = [e for e in events_of(api, act.name) if e.type == "activation.revoked"]
    payload = json.loads(revoked.payload_json)
    assert payload["released_cents"] == {f: released // 2 for f in FUNDERS}
    # The month begun is consumed by the revocation: the event says so, as the report does.
    assert payload["consumed_cents"] == {f: PRICE // 2 for f in FUNDERS}
    assert payload["consumed_months"] == [month]


def test_revoke_a_month_later_releases_ten_months_in_the_month_of_revocation(api: Api, harness: Harness) -> None:
    march = this_month()
    act = api.activate().activation
    with clock_moved(harness, 31):  # 2026-04-16: the second month of access has begun
        april = harness.clock.today().strftime("%Y-%m")
        assert april != march
        march_before, april_before = ledger(api, march), ledger(api, april)
        move(api, "revoke", act.name, "found a job")
        assert delta(march_before, ledger(api, march)) == {f: (0, 0, 0) for f in FUNDERS}
        assert delta(april_before, ledger(api, april)) == {f: (0, 0, 10 * PRICE // 2) for f in FUNDERS}


# ------------------------------------------------------------------------------------- idempotency

def test_activate_replays_with_the_same_request_id(api: Api) -> None:
    agency_id, birth = next_person()
    request_id = rid()
    before = ledger(api, this_month())
    first = api.activate(agency_id, birth, request_id=request_id, reason="same")
    second = api.activate(agency_id, birth, request_id=request_id, reason="same")
    assert second.activation.name == first.activation.name
    assert second.activation_token == first.activation_token
    assert second.activation.create_time == first.activation.create_time
    # Exactly once: one activation, one event, one commitment.
    assert [e.type for e in events_of(api, first.activation.name)] == ["activation.created"]
    assert delta(before, ledger(api, this_month())) == {f: (1, PRICE * MONTHS // 2, 0) for f in FUNDERS}


def test_replays_answer_what_the_first_call_answered_after_later_changes(api: Api) -> None:
    """AIP-155: a retry after later changes (a suspension, a resumption, a redemption) gets the answer
    the call first gave (state, reason, update time, binding), not the activation as it is now."""
    agency_id, birth = next_person()
    activate_id, suspend_id = rid(), rid()
    first = api.activate(agency_id, birth, request_id=activate_id, reason="first answer")
    name = first.activation.name
    suspended = move(api, "suspend", name, "paused", request_id=suspend_id)
    move(api, "resume", name, "back")
    api.platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
        token=first.activation_token, account_id="acct-" + rid()[:12]))
    again = api.activate(agency_id, birth, request_id=activate_id, reason="first answer")
    assert again.activation == first.activation and again.activation_token == first.activation_token
    replay = move(api, "suspend", name, "paused", request_id=suspend_id)
    assert replay == suspended
    assert (replay.state, replay.state_reason, replay.account_id) == (activation_pb2.SUSPENDED, "paused", "")
    now = get(api, name)
    assert (now.state, now.state_reason) == (activation_pb2.ACTIVE, "back") and now.account_id


def test_activate_request_id_reused_for_another_request_is_refused(api: Api) -> None:
    agency_id, birth = next_person()
    request_id = rid()
    first = api.activate(agency_id, birth, request_id=request_id, reason="original")
    for kwargs in ({"reason": "different reason"}, {"program": "deuxieme-chance-numerique", "reason": "original"}):
        f = expect_error(lambda _r, kw=kwargs: api.activate(agency_id, birth, request_id=request_id, **kw),
                         None, grpc.StatusCode.FAILED_PRECONDITION)
        assert f.reason == "REQUEST_ID_REUSED"
        assert f.metadata["reused_request_id"] == request_id and f.metadata["request_id"] != request_id
    other, other_birth = next_person()
    f = expect_error(lambda _r: api.activate(other, other_birth, request_id=request_id, reason="original"),
                     None, grpc.StatusCode.FAILED_PRECONDITION)
    assert f.reason == "REQUEST_ID_REUSED"
    # The other person was not activated by that refused call.
    assert api.activate(other, other_birth).activation.name != first.activation.name
    # The original request still replays.
    assert api.activate(agency_id, birth, request_id=request_id, reason="original").activation.name \
        == first.activation.name


def test_activate_request_id_reused_for_another_platform_is_refused(api: Api) -> None:
    """The platform is part of the request: the same request_id asking for another platform is
    not a retry (its replay would answer a token the other platform cannot redeem)."""
    agency_id, birth = next_person()
    request_id = rid()

    def activate(platform: str) -> activation_pb2.ActivateEntitlementResponse:
        return api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            request_id=request_id, job_seeker=identity(agency_id, birth), program=PROGRAM,
            platform=f"platforms/{platform}", reason="original"))

    first = activate("openclassrooms")
    f = expect_error(lambda _r: activate("otherplatform"), None, grpc.StatusCode.FAILED_PRECONDITION)
    assert f.reason == "REQUEST_ID_REUSED" and f.metadata["reused_request_id"] == request_id
    assert get(api, first.activation.name).platform == "platforms/openclassrooms"
    assert activate("openclassrooms").activation.name == first.activation.name  # the original still replays


def test_request_ids_belong_to_their_caller(api: Api) -> None:
    """Another advisor reusing the same request_id does not get the first advisor's token back."""
    agency_id, birth = next_person()
    request_id = rid()
    first = api.activate(agency_id, birth, request_id=request_id)
    f = expect_error(lambda _r: api.activate(agency_id, birth, request_id=request_id, caller="advisor-lyon"),
                     None, grpc.StatusCode.ALREADY_EXISTS)
    assert f.reason == "ACTIVATION_EXISTS"
    assert f.metadata["activation"] == first.activation.name
    assert first.activation_token not in f.message + json.dumps(f.metadata)


def test_transitions_replay_with_the_same_request_id(api: Api) -> None:
    act = api.activate().activation
    request_id = rid()
    first = move(api, "suspend", act.name, "paused", request_id=request_id)
    replay = move(api, "suspend", act.name, "paused", request_id=request_id)  # not INVALID_STATE
    assert first.state == replay.state == activation_pb2.SUSPENDED
    assert replay.name == act.name and replay.update_time == first.update_time
    assert [e.type for e in events_of(api, act.name)] == ["activation.created", "activation.suspended"]

    # Same id, different request: another reason, or another action.
    f = refuse_move(api, "suspend", act.name, "another reason", grpc.StatusCode.FAILED_PRECONDITION,
                    request_id=request_id)
    assert f.reason == "REQUEST_ID_REUSED"
    f = refuse_move(api, "resume", act.name, "paused", grpc.StatusCode.FAILED_PRECONDITION, request_id=request_id)
    assert f.reason == "REQUEST_ID_REUSED"
    other = api.activate().activation
    f = refuse_move(api, "suspend", other.name, "paused", grpc.StatusCode.FAILED_PRECONDITION,
                    request_id=request_id)
    assert f.reason == "REQUEST_ID_REUSED"
    assert get(api, other.name).state == activation_pb2.ACTIVE

    # A transition's id cannot be replayed as an activation either.
    f = expect_error(lambda _r: api.activate(request_id=request_id), None, grpc.StatusCode.FAILED_PRECONDITION)
    assert f.reason == "REQUEST_ID_REUSED"

    revoke_id = rid()
    revoked = move(api, "revoke", act.name, "done", request_id=revoke_id)
    assert move(api, "revoke", act.name, "done", request_id=revoke_id).state == revoked.state == activation_pb2.REVOKED
    assert [e.type for e in events_of(api, act.name)].count("activation.revoked") == 1


# --------------------------------------------------------------------------- one live per person

def test_second_activation_is_already_exists_until_revoked(api: Api) -> None:
    agency_id, birth = next_person()
    first = api.activate(agency_id, birth).activation

    f = expect_error(lambda _r: api.activate(agency_id, birth), None, grpc.StatusCode.ALREADY_EXISTS)
    assert f.reason == "ACTIVATION_EXISTS" and f.metadata["activation"] == first.name
    # From another agency too, and while suspended (a suspended activation is still live).
    f = expect_error(lambda _r: api.activate(agency_id, birth, caller="advisor-lyon"), None,
                     grpc.StatusCode.ALREADY_EXISTS)
    assert f.metadata["activation"] == first.name
    move(api, "suspend", first.name, "paused")
    f = expect_error(lambda _r: api.activate(agency_id, birth), None, grpc.StatusCode.ALREADY_EXISTS)
    assert f.reason == "ACTIVATION_EXISTS" and f.metadata["activation"] == first.name

    move(api, "revoke", first.name, "mistake")
    second = api.activate(agency_id, birth).activation
    assert second.name != first.name and second.state == activation_pb2.ACTIVE
    assert second.job_seeker_ref == first.job_seeker_ref
    assert get(api, first.name).state == activation_pb2.REVOKED
    f = expect_error(lambda _r: api.activate(agency_id, birth), None, grpc.StatusCode.ALREADY_EXISTS)
    assert f.metadata["activation"] == second.name


def _race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(0..n-1) in n threads released at once; each result is a response or a Failure."""
    barrier = threading.Barrier(n)

    def one(i: int) -> Any:
        barrier.wait()
        try:
            return fn(i)
        except grpc.RpcError as err:
            return failure(err)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def test_concurrent_activations_of_one_person_exactly_one_wins(api: Api) -> None:
    agency_id, birth = next_person()
    api.as_("advisor-paris")  # build the stubs before the threads share them
    before = ledger(api, this_month())
    results = _race(20, lambda i: api.activate(agency_id, birth, request_id=f"race-{i}-{rid()}"))
    wins = [r for r in results if not isinstance(r, Failure)]
    losses = [r for r in results if isinstance(r, Failure)]
    assert len(wins) == 1, [r.message if isinstance(r, Failure) else r.activation.name for r in results]
    assert len(losses) == 19
    winner = wins[0].activation.name
    for f in losses:
        assert f.code == grpc.StatusCode.ALREADY_EXISTS, f
        assert f.reason == "ACTIVATION_EXISTS" and f.metadata["activation"] == winner
    assert delta(before, ledger(api, this_month())) == {f: (1, PRICE * MONTHS // 2, 0) for f in FUNDERS}
    assert [e.type for e in events_of(api, winner)] == ["activation.created"]


def test_concurrent_retries_with_one_request_id_return_one_activation(api: Api) -> None:
    agency_id, birth = next_person()
    request_id = rid()
    api.as_("advisor-paris")
    before = ledger(api, this_month())
    results = _race(20, lambda i: api.activate(agency_id, birth, request_id=request_id))
    # AIP-155: a retry arriving while the first is processed is ABORTED at once (no waiting);
    # every other answer is the one activation.
    wins = [r for r in results if not isinstance(r, Failure)]
    assert wins and all(f.code == grpc.StatusCode.ABORTED and f.reason == "REQUEST_IN_FLIGHT"
                        for f in results if isinstance(f, Failure)), results
    assert len({r.activation.name for r in wins}) == 1
    assert len({r.activation_token for r in wins}) == 1
    again = api.activate(agency_id, birth, request_id=request_id)  # once done, a retry replays it
    assert (again.activation.name, again.activation_token) == (wins[0].activation.name, wins[0].activation_token)
    assert delta(before, ledger(api, this_month())) == {f: (1, PRICE * MONTHS // 2, 0) for f in FUNDERS}


# ------------------------------------------------------------------------------------------- scope

def test_advisors_only_reach_their_agency_and_cannot_probe_ids(api: Api) -> None:
    act = api.activate(caller="advisor-paris").activation
    missing = "activations/" + uuid.uuid4().hex

    seen = get(api, act.name, caller="advisor-paris")
    assert seen.agency_code == "75011" and seen.advisor_id == "A0001"

    out_of_scope = expect_error(api.as_("advisor-lyon").GetActivation,
                                activation_pb2.GetActivationRequest(name=act.name), grpc.StatusCode.PERMISSION_DENIED)
    absent = expect_error(api.as_("advisor-lyon").GetActivation,
                          activation_pb2.GetActivationRequest(name=missing), grpc.StatusCode.PERMISSION_DENIED)
    # Same code, same reason, same message up to the id: existence cannot be told apart.
    assert out_of_scope.reason == absent.reason == "OUT_OF_SCOPE"
    assert out_of_scope.message.replace(act.name, "X") == absent.message.replace(missing, "X")
    assert set(out_of_scope.metadata) == set(absent.metadata)

    for action in ("suspend", "resume", "revoke"):
        f = refuse_move(api, action, act.name, "not mine", grpc.StatusCode.PERMISSION_DENIED, caller="advisor-lyon")
        assert f.reason == "OUT_OF_SCOPE"
        f = refuse_move(api, action, missing, "not mine", grpc.StatusCode.PERMISSION_DENIED, caller="advisor-lyon")
        assert f.reason == "OUT_OF_SCOPE"
    assert get(api, act.name).state == activation_pb2.ACTIVE
    assert [e.type for e in events_of(api, act.name)] == ["activation.created"]

    # Admins see everything, and get a plain NOT_FOUND for an id that does not exist.
    assert get(api, act.name, caller="admin").name == act.name
    f = expect_error(api.admin.GetActivation, activation_pb2.GetActivationRequest(name=missing),
                     grpc.StatusCode.NOT_FOUND)
    assert f.reason == "ACTIVATION_NOT_FOUND" and f.metadata["activation"] == missing
    f = refuse_move(api, "suspend", missing, "x", grpc.StatusCode.NOT_FOUND, caller="admin")
    assert f.reason == "ACTIVATION_NOT_FOUND"
    # An admin's transition is recorded under the admin's name.
    move(api, "suspend", act.name, "admin pause", caller="admin")
    assert events_of(api, act.name)[-1].actor == "admin:admin"


# ------------------------------------------------------------------------------------------ redeem

def test_redeem_binds_once(api: Api) -> None:
    resp = api.activate()
    account = "acct-" + rid()
    bound = redeem(api, resp.activation_token, account)
    assert bound.active and bound.account_id == account and bound.activation == resp.activation.name
    assert bound.state == activation_pb2.ACTIVE and bound.program == PROGRAM and bound.tier == "premium"
    stored = get(api, resp.activation.name)
    assert stored.account_id == account and stored.platform == "platforms/openclassrooms"
    assert stored.HasField("redeem_time")

    # A replay, for the same account or another, is ALREADY_EXISTS naming the original binding.
    for replay_account in (account, "acct-" + rid()):
        f = refuse_redeem(api, resp.activation_token, replay_account, grpc.StatusCode.ALREADY_EXISTS)
        assert f.reason == "TOKEN_ALREADY_REDEEMED"
        assert f.metadata["account_id"] == account
        assert f.metadata["activation"] == resp.activation.name
    stored_again = get(api, resp.activation.name)
    assert stored_again.account_id == account and stored_again.redeem_time == stored.redeem_time
    redeemed = [e for e in events_of(api, resp.activation.name) if e.type == "activation.redeemed"]
    assert len(redeemed) == 1 and redeemed[0].actor == "platform:openclassrooms"


def test_a_redeemed_token_stays_bound_after_revocation(api: Api) -> None:
    resp = api.activate()
    account = "acct-" + rid()
    redeem(api, resp.activation_token, account)
    move(api, "revoke", resp.activation.name, "ended")
    f = refuse_redeem(api, resp.activation_token, "acct-" + rid(), grpc.StatusCode.ALREADY_EXISTS)
    assert f.reason == "TOKEN_ALREADY_REDEEMED"
    status = verify(api, account)
    assert not status.active and status.state == activation_pb2.REVOKED


def test_redeem_by_another_platform_is_permission_denied(api: Api) -> None:
    resp = api.activate()
    f = refuse_redeem(api, resp.activation_token, "acct-" + rid(), grpc.StatusCode.PERMISSION_DENIED,
                      caller="platform-other")
    assert resp.activation_token not in f.message
    assert get(api, resp.activation.name).account_id == ""
    # The rightful platform can still redeem it.
    assert redeem(api, resp.activation_token, "acct-" + rid()).active


def test_a_job_seekers_token_subject_is_one_per_platform(api: Api) -> None:
    """A token's `sub` is the person's pseudonym for its platform (entitlement/pseudonym.py
    platform_subject): the same at every activation on one platform, another on another platform,
    so two platforms cannot link their users."""
    agency_id, birth = next_person()

    def subject(platform: str) -> str:
        resp = api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(agency_id, birth), program=PROGRAM, platform=f"platforms/{platform}",
            reason="subject"))
        claims = jwt.decode(resp.activation_token, options={"verify_signature": False})
        assert claims["aud"] == platform
        move(api, "revoke", resp.activation.name, "next platform")  # one live activation at a time
        return str(claims["sub"])

    first, other, again = subject("openclassrooms"), subject("otherplatform"), subject("openclassrooms")
    assert first == again
    assert other != first


def test_one_account_holds_one_live_entitlement_per_program(api: Api) -> None:
    account = "acct-" + rid()
    redeem(api, api.activate().activation_token, account)
    second = api.activate()
    f = refuse_redeem(api, second.activation_token, account, grpc.StatusCode.ALREADY_EXISTS)
    assert f.reason == "ACCOUNT_ALREADY_BOUND"
    assert get(api, second.activation.name).account_id == ""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _jwks_key(api: Api) -> tuple[str, bytes]:
    jwks = json.loads(api.platform.GetSigningKeys(activation_pb2.GetSigningKeysRequest()).jwks_json)
    [key] = jwks["keys"]
    return key["kid"], _unb64(key["x"])


def _tampered(token: str, _api: Api) -> str:
    header, payload, sig = token.split(".")
    i = len(payload) // 2  # a middle character: all its 6 bits are significant
    payload = payload[:i] + ("A" if payload[i] != "A" else "B") + payload[i + 1:]
    return ".".join((header, payload, sig))


def _alg_none(token: str, api: Api) -> str:
    kid, _ = _jwks_key(api)
    header = _b64(json.dumps({"alg": "none", "kid": kid, "typ": TOKEN_TYPE}).encode())
    return f"{header}.{token.split('.')[1]}."


def _hs256(key_bytes: Callable[[bytes], bytes]) -> Callable[[str, Api], str]:
    def make(token: str, api: Api) -> str:
        kid, raw = _jwks_key(api)
        header = _b64(json.dumps({"alg": "HS256", "kid": kid, "typ": TOKEN_TYPE}).encode())
        signing_input = f"{header}.{token.split('.')[1]}".encode()
        return signing_input.decode() + "." + _b64(hmac.new(key_bytes(raw), signing_input, hashlib.sha256).digest())
    return make


def _pem(raw: bytes) -> bytes:
    return Ed25519PublicKey.from_public_bytes(raw).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _resigned(kid_of: Callable[[Api], str]) -> Callable[[str, Api], str]:
    """The same claims, signed EdDSA by a key that is not ours."""
    def make(token: str, api: Api) -> str:
        claims = json.loads(_unb64(token.split(".")[1]))
        return jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA",
                          headers={"kid": kid_of(api), "typ": TOKEN_TYPE})
    return make


FORGERIES: dict[str, Callable[[str, Api], str]] = {
    "tampered-payload": _tampered,
    "alg-none": _alg_none,
    "hs256-raw-public-key": _hs256(lambda raw: raw),
    "hs256-pem-public-key": _hs256(_pem),
    "unknown-kid": _resigned(lambda _api: "unknownkid-00000000"),
    "our-kid-wrong-key": _resigned(lambda api: _jwks_key(api)[0]),
    "not-a-jws": lambda token, _api: "not.a.token",
    "truncated": lambda token, _api: token.rsplit(".", 1)[0],
}


@pytest.mark.parametrize("forge", list(FORGERIES), ids=list(FORGERIES))
def test_forged_tokens_are_token_invalid(api: Api, forge: str) -> None:
    resp = api.activate()
    forged = FORGERIES[forge](resp.activation_token, api)
    assert forged != resp.activation_token
    f = refuse_redeem(api, forged, "acct-" + rid(), grpc.StatusCode.FAILED_PRECONDITION)
    assert f.reason == "TOKEN_INVALID"
    assert get(api, resp.activation.name).account_id == ""
    assert redeem(api, resp.activation_token, "acct-" + rid()).active  # the genuine one still works


def test_token_of_a_revoked_activation_is_not_active(api: Api) -> None:
    resp = api.activate()
    move(api, "revoke", resp.activation.name, "mistake")
    f = refuse_redeem(api, resp.activation_token, "acct-" + rid(), grpc.StatusCode.FAILED_PRECONDITION)
    assert f.reason == "ENTITLEMENT_NOT_ACTIVE" and f.metadata["current_state"] == "REVOKED"
    assert get(api, resp.activation.name).account_id == ""


def test_expired_token_is_token_expired(api: Api, harness: Harness) -> None:
    resp = api.activate()
    with clock_moved(harness, 31):  # tokens live 30 days in the test settings
        f = refuse_redeem(api, resp.activation_token, "acct-" + rid(), grpc.StatusCode.FAILED_PRECONDITION)
        assert f.reason == "TOKEN_EXPIRED"
    assert get(api, resp.activation.name).account_id == ""
    assert redeem(api, resp.activation_token, "acct-" + rid()).active  # back in time, it is valid


def test_a_redemption_replayed_after_the_token_expired_still_names_its_binding(api: Api, harness: Harness) -> None:
    """The proto: any later redemption of a redeemed token is a replay, ALREADY_EXISTS with the
    binding. After the token's expiry a replay (a platform retrying late after a lost answer)
    answered TOKEN_EXPIRED, as if the redemption had failed. A token never redeemed still answers
    TOKEN_EXPIRED."""
    resp = api.activate()
    account = "acct-" + rid()
    assert redeem(api, resp.activation_token, account).active
    unredeemed = api.activate()
    with clock_moved(harness, 31):  # tokens live 30 days in the test settings
        f = refuse_redeem(api, resp.activation_token, "acct-" + rid(), grpc.StatusCode.ALREADY_EXISTS)
        assert f.reason == "TOKEN_ALREADY_REDEEMED", f
        assert (f.metadata["account_id"], f.metadata["activation"]) == (account, resp.activation.name), f.metadata
        f = refuse_redeem(api, unredeemed.activation_token, "acct-" + rid(), grpc.StatusCode.FAILED_PRECONDITION)
        assert f.reason == "TOKEN_EXPIRED"
    assert get(api, unredeemed.activation.name).account_id == ""
    assert get(api, resp.activation.name).account_id == account  # nothing changed


def test_a_redemption_that_waited_for_the_row_past_midnight_of_the_end_date_is_refused(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A redemption sent a moment before midnight of the end date (the token, valid until then,
    verified), that waited for the activation's row held by another writer (the settlement job at
    midnight), judged the activation by the day it arrived: past midnight it bound an activation
    whose access had ended, answered OK with `active = false`, and logged `activation.redeemed`
    after the end of access, where the proto promises `ENTITLEMENT_NOT_ACTIVE`. A redemption is
    judged by the day once it holds the row."""
    if backend[0] != "postgres":
        pytest.skip("orders the writers by PostgreSQL's row locks (SQLite's writers take one lock, in no set order)")
    with own_server(backend[0], tmp_path / "own", request) as server:
        api = Api(server)
        agency_id, birth = next_ledger_person()
        made = api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(agency_id, birth), program=PROGRAM, platform="platforms/openclassrooms",
            reason="redeem test"))
        name, end = made.activation.name, made.activation.end_date
        activation_id = name.split("/")[1]
        with on_day(server, dt.date(end.year, end.month, end.day)), ThreadPoolExecutor(2) as pool:
            # A token valid until the end of access (the first one lived 30 days).
            token = api.advisor.ReissueActivationToken(activation_pb2.TransitionActivationRequest(
                name=name, reason="lost the link")).activation_token
            holding, done = threading.Event(), threading.Event()

            def hold_the_row() -> None:
                with server.ctx.db.write() as s:
                    s.execute(select(Activation.id).where(Activation.id == activation_id).with_for_update())
                    holding.set()
                    done.wait(20)

            holder = pool.submit(hold_the_row)
            assert holding.wait(10)
            try:
                answer = pool.submit(refuse_redeem, api, token, "acct-" + rid(), grpc.StatusCode.FAILED_PRECONDITION)
                wait_until(lambda: lock_waiters(server) == 1, "the redemption waiting for the activation's row")
                server.clock.advance(dt.timedelta(days=1))  # midnight has passed: access has ended
            finally:
                done.set()
                holder.result()
            f = answer.result()
            server.clock.advance(-dt.timedelta(days=1))
        assert f.reason == "ENTITLEMENT_NOT_ACTIVE" and f.metadata["current_state"] == "EXPIRED"
        with server.ctx.db.read() as s:
            assert s.get(Activation, activation_id).account_id is None
            types = list(s.execute(select(Event.type).where(Event.subject == name)).scalars())
        assert "activation.redeemed" not in types


# ------------------------------------------------------------------------------------------ verify

def test_verify_unknown_account_is_inactive_not_an_error(api: Api) -> None:
    status = verify(api, "nobody-" + rid())
    assert not status.active
    assert status.activation == "" and status.state == activation_pb2.ACTIVATION_STATE_UNSPECIFIED


def test_verify_follows_the_lifecycle(api: Api) -> None:
    resp = api.activate()
    account = "acct-" + rid()
    redeem(api, resp.activation_token, account)
    assert verify(api, account).active

    move(api, "suspend", resp.activation.name, "paused")
    status = verify(api, account)
    assert not status.active and status.state == activation_pb2.SUSPENDED
    assert status.activation == resp.activation.name

    move(api, "resume", resp.activation.name, "back")
    status = verify(api, account)
    assert status.active and status.state == activation_pb2.ACTIVE
    # Another platform knows nothing of this account.
    assert not verify(api, account, caller="platform-other").active
    assert verify(api, account, caller="platform-other").activation == ""


def test_access_lasts_through_the_end_date(api: Api, harness: Harness) -> None:
    """The end date is the last day of access (inclusive): on it the entitlement is still active
    for the platform and the advisor; the next day it is expired, before any job records it."""
    resp = api.activate()
    account = "acct-" + rid()
    redeem(api, resp.activation_token, account)
    e = resp.activation.end_date
    last_day = (dt.date(e.year, e.month, e.day) - TODAY).days
    with clock_moved(harness, last_day):
        status = verify(api, account)
        assert status.active and status.state == activation_pb2.ACTIVE, status
        assert get(api, resp.activation.name).state == activation_pb2.ACTIVE
    with clock_moved(harness, last_day + 1):
        status = verify(api, account)
        assert not status.active and status.state == activation_pb2.EXPIRED, status
        assert get(api, resp.activation.name).state == activation_pb2.EXPIRED


def listed_states(api: Api, name: str) -> dict[str, int]:
    """How ListActivations shows activation `name` (as the admin): its state unfiltered, and under
    the filters ACTIVE and EXPIRED (absent from a filter: not listed by it)."""
    out: dict[str, int] = {}
    for label, state in (("all", activation_pb2.ACTIVATION_STATE_UNSPECIFIED), ("ACTIVE", activation_pb2.ACTIVE),
                         ("EXPIRED", activation_pb2.EXPIRED)):
        token = ""
        while True:
            page = api.admin.ListActivations(audit_pb2.ListActivationsRequest(page_size=500, page_token=token,
                                                                              program=PROGRAM, state=state))
            out.update({label: a.state for a in page.activations if a.name == name})
            token = page.next_page_token
            if not token:
                break
    return out


def test_listings_show_access_through_the_end_date(api: Api, harness: Harness) -> None:
    """ListActivations shows a live activation ACTIVE on its end date (listed by the ACTIVE filter,
    not by EXPIRED) and EXPIRED from the next day, as GetActivation does."""
    act = api.activate().activation
    last_day = (dt.date(act.end_date.year, act.end_date.month, act.end_date.day) - TODAY).days
    with clock_moved(harness, last_day):
        assert listed_states(api, act.name) == {"all": activation_pb2.ACTIVE, "ACTIVE": activation_pb2.ACTIVE}
    with clock_moved(harness, last_day + 1):
        assert listed_states(api, act.name) == {"all": activation_pb2.EXPIRED, "EXPIRED": activation_pb2.EXPIRED}


def test_concurrent_retries_of_one_transition_apply_it_once(api: Api) -> None:
    act = api.activate().activation
    request_id = rid()
    api.as_("advisor-paris")
    results = _race(20, lambda i: move(api, "suspend", act.name, "paused", request_id=request_id))
    wins = [r for r in results if not isinstance(r, Failure)]
    assert wins and all(f.code == grpc.StatusCode.ABORTED and f.reason == "REQUEST_IN_FLIGHT"
                        for f in results if isinstance(f, Failure)), results
    assert {r.state for r in wins} == {activation_pb2.SUSPENDED}
    assert move(api, "suspend", act.name, "paused", request_id=request_id).state == activation_pb2.SUSPENDED
    assert [e.type for e in events_of(api, act.name)] == ["activation.created", "activation.suspended"]


def test_concurrent_redeems_bind_one_account(api: Api) -> None:
    resp = api.activate()
    api.as_("platform-oc")
    accounts = [f"acct-{i}-{rid()}" for i in range(10)]
    results = _race(10, lambda i: redeem(api, resp.activation_token, accounts[i]))
    wins = [r for r in results if not isinstance(r, Failure)]
    assert len(wins) == 1
    assert all(r.code == grpc.StatusCode.ALREADY_EXISTS and r.reason == "TOKEN_ALREADY_REDEEMED"
               for r in results if isinstance(r, Failure))
    assert get(api, resp.activation.name).account_id == wins[0].account_id
    # Concurrent replays for the winning account are all ALREADY_EXISTS naming the one binding.
    again = _race(10, lambda i: redeem(api, resp.activation_token, wins[0].account_id))
    assert all(isinstance(r, Failure) and r.code == grpc.StatusCode.ALREADY_EXISTS
               and r.reason == "TOKEN_ALREADY_REDEEMED" and r.metadata["account_id"] == wins[0].account_id
               for r in again), again
    assert [e.type for e in events_of(api, resp.activation.name)].count("activation.redeemed") == 1


def test_the_answer_shows_the_decision_as_stored(api: Api) -> None:
    """ActivateEntitlement answers with the decision it evaluated (and stores its JSON, made once per
    shared decision object): byte for byte what GetActivation reads back from the stored row, for
    two people in the same situation (who share one decision object) as for one."""
    made = [api.activate(*next_person(), request_id=rid()) for _ in range(3)]
    for m in made:
        assert m.activation.decision.eligible
        assert get(api, m.activation.name).SerializeToString(deterministic=True) == \
            m.activation.SerializeToString(deterministic=True)
    assert made[0].activation.decision == made[1].activation.decision


# --------------------------------------------------------------------------- the token's platform

def test_an_activation_for_a_platform_nobody_can_redeem_on_is_refused(api: Api, harness: Harness) -> None:
    """A mistyped platform got a token no platform could redeem, and the funders' money committed:
    the platform must be one a platform caller with a usable credential has (the credentials file's,
    or `entitlement callers`': known as soon as created, unknown once revoked)."""
    agency_id, birth = next_person()

    def activate(platform: str) -> activation_pb2.ActivateEntitlementResponse:
        return api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            request_id=uuid.uuid4().hex, job_seeker=identity(agency_id, birth),
            program="programs/premium-job-seekers", platform=f"platforms/{platform}", reason="platform test"))

    platform = f"newplatform{uuid.uuid4().hex[:8]}"
    f = expect_error(lambda _r: activate(platform), None, grpc.StatusCode.NOT_FOUND)
    assert f.reason == "PLATFORM_NOT_FOUND" and f.metadata["platform"] == f"platforms/{platform}"
    assert platform in f.message
    now = harness.clock.now()
    credentials.create(harness.ctx.db, make_caller(f"p-{platform}", "platform", platform_id=platform), now=now,
                       actor="admin:test")
    try:
        act = activate(platform).activation  # at once: the refusal above was not remembered
        assert act.platform == f"platforms/{platform}" and act.state == activation_pb2.ACTIVE
    finally:
        credentials.revoke(harness.ctx.db, f"p-{platform}", now=now, actor="admin:test")
    move(api, "revoke", act.name, "platform test over")
    harness.ctx.callers.forget()  # (a known platform is remembered for the cache time)
    f = expect_error(lambda _r: activate(platform), None, grpc.StatusCode.NOT_FOUND)
    assert f.reason == "PLATFORM_NOT_FOUND"
    # Refused, nothing was written: the person can still be activated for a platform that exists.
    assert activate("openclassrooms").activation.state == activation_pb2.ACTIVE


def test_error_infos_carry_the_metadata_keys_the_proto_names(api: Api) -> None:
    """The keys of each reason's ErrorInfo metadata, as activation.proto documents them: a caller's
    code reads them by name."""
    fp, ae = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS
    T = activation_pb2.TransitionActivationRequest

    # NOT_ELIGIBLE: `program`, and `failed_criteria` the failed criteria's reason codes, each once
    # (an unknown person fails every registry criterion with NOT_REGISTERED).
    f = expect_error(api.advisor.ActivateEntitlement, activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity("NOBODYMETA1", "1990-01-01"), program=PROGRAM,
        platform="platforms/openclassrooms"), fp)
    assert f.reason == "NOT_ELIGIBLE"
    assert f.metadata["program"] == PROGRAM and f.metadata["failed_criteria"] == "NOT_REGISTERED"

    agency_id, birth = next_person()
    first = api.activate(agency_id, birth)
    name = first.activation.name
    f = expect_error(api.advisor.ActivateEntitlement, activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program=PROGRAM, platform="platforms/openclassrooms"), ae)
    assert (f.reason, f.metadata["activation"]) == ("ACTIVATION_EXISTS", name)

    f = expect_error(api.advisor.ResumeActivation, T(name=name, reason="r"), fp)
    assert (f.reason, f.metadata["current_state"], f.metadata["action"]) == ("INVALID_STATE", "ACTIVE", "resume")

    missing = "activations/" + "cd" * 16
    f = expect_error(api.admin.GetActivation, activation_pb2.GetActivationRequest(name=missing),
                     grpc.StatusCode.NOT_FOUND)
    assert (f.reason, f.metadata["activation"]) == ("ACTIVATION_NOT_FOUND", missing)

    account = f"meta-{uuid.uuid4().hex[:8]}"
    api.platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
        token=first.activation_token, account_id=account))
    f = expect_error(api.advisor.ReissueActivationToken, T(name=name, reason="lost"), fp)
    assert (f.reason, f.metadata["activation"]) == ("TOKEN_ALREADY_REDEEMED", name)
    second = api.activate()
    f = expect_error(api.platform.RedeemActivationToken, activation_pb2.RedeemActivationTokenRequest(
        token=second.activation_token, account_id=account), ae)
    assert (f.reason, f.metadata["account_id"]) == ("ACCOUNT_ALREADY_BOUND", account)
    api.advisor.RevokeActivation(T(name=second.activation.name, reason="r"))
    f = expect_error(api.platform.RedeemActivationToken, activation_pb2.RedeemActivationTokenRequest(
        token=second.activation_token, account_id=account + "-2"), fp)
    assert (f.reason, f.metadata["current_state"]) == ("ENTITLEMENT_NOT_ACTIVE", "REVOKED")
    f = expect_error(api.advisor.ReissueActivationToken, T(name=second.activation.name, reason="lost"), fp)
    assert (f.reason, f.metadata["current_state"], f.metadata["action"]) == \
        ("INVALID_STATE", "REVOKED", "reissue_token")

    usage = activation_pb2.ReportUsageRequest
    f = expect_error(api.platform.ReportUsage, usage(account_id=account, month="2026-02", used=True), fp)
    assert (f.reason, f.metadata["month"]) == ("MONTH_OUTSIDE_ACCESS", "2026-02")
    f = expect_error(api.platform.ReportUsage, usage(account_id=account, month="2026-05", used=True), fp)
    assert (f.reason, f.metadata["month"]) == ("MONTH_NOT_BEGUN", "2026-05")
    f = expect_error(api.platform.ReportUsage, usage(account_id=account, month="2026-03", used=True,
                                                     program="programs/opencfa-apprentices"),
                     grpc.StatusCode.NOT_FOUND)
    assert (f.reason, f.metadata["account_id"], f.metadata["program"]) == \
        ("ACCOUNT_NOT_FOUND", account, "programs/opencfa-apprentices")


def test_a_retry_answers_the_activation_made_before_its_platform_was_revoked(api: Api, harness: Harness) -> None:
    """AIP-155 as the proto promises it: the same request_id with the same request answers the
    activation first made. The platform check ran before the stored answer was looked up, so a
    retry after the platform's credential was revoked (the answer lost meanwhile) was NOT_FOUND
    PLATFORM_NOT_FOUND, as if nothing had been made, while the funders' money was committed. A new
    request for that platform is still refused, and another id for the same request too."""
    agency_id, birth = next_person()
    platform = f"goneplatform{uuid.uuid4().hex[:8]}"
    request_id = uuid.uuid4().hex
    request = activation_pb2.ActivateEntitlementRequest(
        request_id=request_id, job_seeker=identity(agency_id, birth), program=PROGRAM,
        platform=f"platforms/{platform}", reason="platform gone")
    now = harness.clock.now()
    credentials.create(harness.ctx.db, make_caller(f"p-{platform}", "platform", platform_id=platform), now=now,
                       actor="admin:test")
    try:
        first = api.advisor.ActivateEntitlement(request)
    finally:
        credentials.revoke(harness.ctx.db, f"p-{platform}", now=now, actor="admin:test")
    harness.ctx.callers.forget()
    again = api.advisor.ActivateEntitlement(request)
    assert again.activation == first.activation and again.activation_token == first.activation_token
    # A changed request under that id is still REQUEST_ID_REUSED, a new one still PLATFORM_NOT_FOUND.
    changed = activation_pb2.ActivateEntitlementRequest()
    changed.CopyFrom(request)
    changed.reason = "another reason"
    f = expect_error(api.advisor.ActivateEntitlement, changed, grpc.StatusCode.FAILED_PRECONDITION)
    assert f.reason == "REQUEST_ID_REUSED"
    changed.request_id = uuid.uuid4().hex
    f = expect_error(api.advisor.ActivateEntitlement, changed, grpc.StatusCode.NOT_FOUND)
    assert f.reason == "PLATFORM_NOT_FOUND"
    move(api, "revoke", first.activation.name, "platform gone")
