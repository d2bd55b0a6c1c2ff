"""ReissueActivationToken over the real channel, on both backends: a live activation whose token was
never redeemed gets a new token (new jti, same activation, nothing in the ledger moves); the old
token stops redeeming; the new one redeems; a redeemed, revoked or expired activation is refused;
another agency's advisor and a platform are refused; request_id replays the same token; one
`activation.token_reissued` event, with no personal data."""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import jwt
import pytest
from sqlalchemy import func, select

from own_server import next_ledger_person, on_day, own_server
from support import Api, Harness, expect_error, identity, next_person, wait_until
from test_ledger import lock_waiters

from entitlement.storage.models import Activation, Event, LedgerEntry
from entitlement.v1 import activation_pb2, audit_pb2

Transition = activation_pb2.TransitionActivationRequest


def claims(token: str) -> dict[str, object]:
    decoded: dict[str, object] = jwt.decode(token, options={"verify_signature": False})
    return decoded


def reissue(api: Api, name: str, caller: str = "advisor-paris", request_id: str = "",
            reason: str = "the job seeker lost the link") -> activation_pb2.ActivateEntitlementResponse:
    resp: activation_pb2.ActivateEntitlementResponse = api.as_(caller).ReissueActivationToken(
        Transition(name=name, reason=reason, request_id=request_id))
    return resp


def redeem(api: Api, token: str, account: str) -> activation_pb2.EntitlementStatus:
    status: activation_pb2.EntitlementStatus = api.platform.RedeemActivationToken(
        activation_pb2.RedeemActivationTokenRequest(token=token, account_id=account))
    return status


def ledger_rows(h: Harness, activation_id: str) -> list[tuple[str, str, str, int]]:
    with h.ctx.db.read() as s:
        return sorted((e.funder_id, e.kind, e.month, e.amount_cents) for e in s.query(LedgerEntry).filter_by(
            activation_id=activation_id))


def test_a_new_token_replaces_the_unredeemed_one(api: Api, harness: Harness) -> None:
    made = api.activate()
    activation_id = made.activation.name.split("/")[1]
    before = ledger_rows(harness, activation_id)
    with harness.ctx.db.read() as s:
        head = int(s.execute(select(func.max(Event.seq))).scalar_one())
    again = reissue(api, made.activation.name)
    old, new = claims(made.activation_token), claims(again.activation_token)
    assert again.activation.name == made.activation.name and again.activation.state == made.activation.state
    assert new["entitlement"] == old["entitlement"] and new["sub"] == old["sub"] and new["aud"] == old["aud"]
    assert new["jti"] != old["jti"]
    assert ledger_rows(harness, activation_id) == before  # the funders pay nothing more
    f = expect_error(api.platform.RedeemActivationToken, activation_pb2.RedeemActivationTokenRequest(
        token=made.activation_token, account_id="acct-" + uuid.uuid4().hex[:8]), grpc.StatusCode.FAILED_PRECONDITION)
    assert f.reason == "TOKEN_INVALID"
    account = "acct-" + uuid.uuid4().hex[:8]
    assert redeem(api, again.activation_token, account).activation == made.activation.name
    # Redeemed: no further token.
    f = expect_error(api.advisor.ReissueActivationToken, Transition(name=made.activation.name, reason="again"),
                     grpc.StatusCode.FAILED_PRECONDITION)
    assert f.reason == "TOKEN_ALREADY_REDEEMED" and account not in f.message
    # One event, by the advisor, with the new jti and nothing personal.
    events = api.admin.ListEvents(audit_pb2.ListEventsRequest(page_size=1000, start_sequence=head + 1)).events
    mine = [e for e in events if e.subject == made.activation.name and e.type == "activation.token_reissued"]
    assert len(mine) == 1
    assert mine[0].actor.startswith("advisor:") and mine[0].reason == "the job seeker lost the link"
    assert json.loads(mine[0].payload_json) == {"platform": "openclassrooms", "jti": new["jti"]}


def test_a_replay_with_the_request_id_returns_the_same_token(api: Api) -> None:
    made = api.activate()
    rid = uuid.uuid4().hex
    first = reissue(api, made.activation.name, request_id=rid)
    second = reissue(api, made.activation.name, request_id=rid)
    assert second.activation_token == first.activation_token
    f = expect_error(api.advisor.ReissueActivationToken,
                     Transition(name=made.activation.name, reason="another reason", request_id=rid),
                     grpc.StatusCode.FAILED_PRECONDITION)
    assert f.reason == "REQUEST_ID_REUSED"


def test_revoked_and_expired_activations_and_other_callers_are_refused(api: Api, harness: Harness) -> None:
    made = api.activate()
    # Another agency's advisor: as if it did not exist; a platform: not its method.
    f = expect_error(api.as_("advisor-lyon").ReissueActivationToken,
                     Transition(name=made.activation.name, reason="x"), grpc.StatusCode.PERMISSION_DENIED)
    assert f.reason == "OUT_OF_SCOPE"
    f = expect_error(api.platform.ReissueActivationToken, Transition(name=made.activation.name, reason="x"),
                     grpc.StatusCode.PERMISSION_DENIED)
    assert f.reason == "ROLE_NOT_ALLOWED"
    missing = "activations/" + "0" * 32
    f = expect_error(api.advisor.ReissueActivationToken, Transition(name=missing, reason="x"),
                     grpc.StatusCode.PERMISSION_DENIED)
    assert f.reason == "OUT_OF_SCOPE"
    f = expect_error(api.admin.ReissueActivationToken, Transition(name=missing, reason="x"), grpc.StatusCode.NOT_FOUND)
    f = expect_error(api.advisor.ReissueActivationToken, Transition(name="activations/nope", reason="x"),
                     grpc.StatusCode.INVALID_ARGUMENT)
    assert "name" in f.fields
    f = expect_error(api.advisor.ReissueActivationToken, Transition(name=made.activation.name),
                     grpc.StatusCode.INVALID_ARGUMENT)
    assert "reason" in f.fields
    # Past its end date (expired, though the job has not recorded it yet): refused.
    end = made.activation.end_date
    day_after = dt.datetime(end.year, end.month, end.day, 12, tzinfo=dt.timezone.utc) + dt.timedelta(days=1)
    before = harness.clock.now()
    harness.clock.advance(day_after - before)
    try:
        f = expect_error(api.advisor.ReissueActivationToken, Transition(name=made.activation.name, reason="x"),
                         grpc.StatusCode.FAILED_PRECONDITION)
    finally:
        harness.clock.advance(before - harness.clock.now())
    assert f.reason == "INVALID_STATE" and f.metadata["current_state"] == "EXPIRED"
    # Revoked: refused, and its old token redeems nothing either.
    api.advisor.RevokeActivation(Transition(name=made.activation.name, reason="ended"))
    f = expect_error(api.advisor.ReissueActivationToken, Transition(name=made.activation.name, reason="x"),
                     grpc.StatusCode.FAILED_PRECONDITION)
    assert f.reason == "INVALID_STATE" and f.metadata["current_state"] == "REVOKED"


def test_a_suspended_activation_gets_a_token_that_redeems(api: Api) -> None:
    made = api.activate()
    api.advisor.SuspendActivation(Transition(name=made.activation.name, reason="pause"))
    again = reissue(api, made.activation.name)
    assert again.activation.state == activation_pb2.SUSPENDED
    assert redeem(api, again.activation_token, "acct-" + uuid.uuid4().hex[:8]).activation == made.activation.name


def test_an_activation_replayed_after_a_reissue_answers_a_token_that_redeems(api: Api) -> None:
    """The token first answered was replaced by the reissue: the replay answers one for the current
    jti (the stored one would redeem nothing)."""
    rid = uuid.uuid4().hex
    agency_id, birth = next_person()
    made = api.activate(agency_id, birth, request_id=rid)
    again = reissue(api, made.activation.name)
    replayed = api.activate(agency_id, birth, request_id=rid)
    assert replayed.activation.name == made.activation.name
    assert claims(replayed.activation_token)["jti"] == claims(again.activation_token)["jti"]
    assert redeem(api, replayed.activation_token, "acct-" + uuid.uuid4().hex[:8]).activation == made.activation.name


def test_a_reissue_that_waited_for_the_row_past_midnight_of_the_end_date_is_refused(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A reissue sent a moment before midnight of the end date, that waited for the activation's row
    (held by the settlement job, or any other writer), judged the activation by the day it arrived:
    past midnight it signed a token for an activation already expired (answered with state EXPIRED,
    and `activation.token_reissued` logged after the end of access), where the proto promises
    INVALID_STATE. A reissue is judged by the day once it holds the row, as the transitions are."""
    if backend[0] != "postgres":
        pytest.skip("orders the writers by PostgreSQL's row locks (SQLite's writers take one lock, in no set order)")
    with own_server(backend[0], tmp_path / "own", request) as server:
        api = Api(server)
        agency_id, birth = next_ledger_person()
        made = api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
            platform="platforms/openclassrooms", reason="reissue test"))
        name, end = made.activation.name, made.activation.end_date
        activation_id = name.split("/")[1]
        with on_day(server, dt.date(end.year, end.month, end.day)), ThreadPoolExecutor(2) as pool:
            holding, done = threading.Event(), threading.Event()

            def hold_the_row() -> None:
                with server.ctx.db.write() as s:
                    s.execute(select(Activation.id).where(Activation.id == activation_id).with_for_update())
                    holding.set()
                    done.wait(20)

            holder = pool.submit(hold_the_row)
            assert holding.wait(10)
            try:
                answer = pool.submit(expect_error, api.advisor.ReissueActivationToken,
                                     Transition(name=name, reason="lost the link"), grpc.StatusCode.FAILED_PRECONDITION)
                wait_until(lambda: lock_waiters(server) == 1, "the reissue waiting for the activation's row")
                server.clock.advance(dt.timedelta(days=1))  # midnight has passed: access has ended
            finally:
                done.set()
                holder.result()
            f = answer.result()
            server.clock.advance(-dt.timedelta(days=1))
        assert f.reason == "INVALID_STATE" and f.metadata["current_state"] == "EXPIRED"
        with server.ctx.db.read() as s:
            types = list(s.execute(select(Event.type).where(Event.subject == name)).scalars())
        assert types == ["activation.created"]
