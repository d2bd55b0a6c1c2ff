"""WatchEntitlementChanges over the real channel, on both backends: a platform's changes from a
cursor, resumed after a disconnect with nothing lost and nothing repeated, never another
platform's; expiry by the settlement job and curtailment by revalidation as changes; bad cursors,
the stream limit, and streams ending when the server stops. Also the funders' StreamEvents, the
other stream that lasts as long as its client reads: ended on revocation and at a stop even when
its client stopped reading."""

from __future__ import annotations

import base64
import datetime as dt
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from own_server import default_people, next_ledger_person, on_day, own_server, write_registry
from support import Api, As, Harness, failure, identity, next_person

from entitlement import changes, jobs, registry
from entitlement.v1 import activation_pb2, audit_pb2

Change = activation_pb2.EntitlementChange
WAIT = 20  # seconds a stream may take to deliver what the test waits for


def watch(api: Api, cursor: str = "", caller: str = "platform-oc", timeout: float = WAIT) -> Any:
    return api.as_(caller).WatchEntitlementChanges(activation_pb2.WatchEntitlementChangesRequest(cursor=cursor),
                                                   timeout=timeout)


def drain(call: Any) -> list[Change]:
    """Every change until the call's deadline, which must end it (the stream never ends by itself)."""
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for change in call:
            got.append(change)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value
    return got


def activate_and_redeem(api: Api, platform: str = "openclassrooms", caller: str = "platform-oc",
                        suspend_first: bool = False, person: tuple[str, dt.date] | None = None,
                        account: str = "") -> tuple[str, str]:
    """(activation name, account): a person (`person`, else the harness registry's next) activated
    and redeemed for `account` (else a new one)."""
    agency_id, birth = person or next_person()
    resp = api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
        job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
        platform=f"platforms/{platform}", reason="watch test"))
    if suspend_first:
        move(api, "suspend", resp.activation.name)
    account = account or "learner-" + uuid.uuid4().hex[:12]
    api.as_(caller).RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
        token=resp.activation_token, account_id=account))
    return resp.activation.name, account


def move(api: Api, action: str, name: str) -> None:
    method = {"suspend": "SuspendActivation", "resume": "ResumeActivation", "revoke": "RevokeActivation"}[action]
    getattr(api.advisor, method)(activation_pb2.TransitionActivationRequest(name=name, reason=f"{action} for test"))


def curtail(server: Harness, people: dict[str, Any], agency_id: str, tmp_path: Path) -> None:
    """A later extract (of 2026-04-15) ends the person's registration on 2026-04-10, and revalidation
    curtails their activation (to 2026-05-31). Run on a day after it (`on_day`)."""
    later = dict(people)
    birth_text, postal, reg, _end, cat = later[agency_id]
    later[agency_id] = (birth_text, postal, reg, "2026-04-10", cat)
    registry.import_extract(server.ctx.db, server.ctx.pseudo, server.clock,
                            write_registry(tmp_path / "later.csv", later), extracted_on=dt.date(2026, 4, 15))
    assert jobs.run_revalidation(server.ctx).curtailed == 1


def summary(c: Change) -> tuple[str, str, str, bool]:
    return (Change.ChangeType.Name(c.type), activation_pb2.ActivationState.Name(c.status.state),
            c.status.account_id, c.status.active)


def test_resuming_from_a_cursor_loses_nothing_and_repeats_nothing(api: Api) -> None:
    call = watch(api)
    stream = iter(call)
    mark = next(stream)  # from now: a bookmark first
    assert mark.type == Change.CHANGE_TYPE_UNSPECIFIED and mark.cursor and not mark.HasField("status")

    name, account = activate_and_redeem(api)
    move(api, "suspend", name)
    redeemed, suspended = next(stream), next(stream)
    call.cancel()  # the client disconnects
    assert summary(redeemed) == ("REDEEMED", "ACTIVE", account, True)
    assert summary(suspended) == ("SUSPENDED", "SUSPENDED", account, False)
    status = suspended.status
    assert status.activation == name and status.program == "programs/premium-job-seekers"
    assert status.tier == "premium" and (status.end_date.year, status.end_date.month) == (2027, 3)
    assert suspended.HasField("change_time")

    # Two more changes while disconnected, and changes of another platform's entitlement.
    move(api, "resume", name)
    move(api, "revoke", name)
    other_name, other_account = activate_and_redeem(api, "otherplatform", "platform-other")
    move(api, "suspend", other_name)

    resumed = drain(watch(api, suspended.cursor, timeout=2))
    assert [summary(c) for c in resumed] == [("RESUMED", "ACTIVE", account, True),
                                            ("REVOKED", "REVOKED", account, False)]
    # From the first of them: only the second.
    assert [summary(c) for c in drain(watch(api, resumed[0].cursor, timeout=1.5))] == [
        ("REVOKED", "REVOKED", account, False)]
    # The other platform sees its own changes, and only those.
    theirs = drain(watch(api, mark.cursor, caller="platform-other", timeout=1.5))
    assert [summary(c) for c in theirs] == [("REDEEMED", "ACTIVE", other_account, True),
                                           ("SUSPENDED", "SUSPENDED", other_account, False)]


def test_changes_before_redemption_are_not_sent(api: Api) -> None:
    call = watch(api)
    stream = iter(call)
    next(stream)
    name, account = activate_and_redeem(api, suspend_first=True)
    move(api, "resume", name)
    first, second = next(stream), next(stream)
    call.cancel()
    # The suspension came before the account existed: the redemption carries the state it left.
    assert summary(first) == ("REDEEMED", "SUSPENDED", account, False)
    assert summary(second) == ("RESUMED", "ACTIVE", account, True)


def test_expiry_by_the_settlement_job_is_a_change(api: Api, harness: Harness) -> None:
    name, account = activate_and_redeem(api)
    call = watch(api)
    stream = iter(call)
    next(stream)
    with on_day(harness, dt.date(2027, 3, 16)):  # the day after the end date
        assert jobs.run_settlement(harness.ctx, activation_ids=[name.split("/")[1]]).expired == 1
        expired = next(stream)
    call.cancel()
    assert summary(expired) == ("EXPIRED", "EXPIRED", account, False)


def _tagged(text: str) -> str:
    return base64.urlsafe_b64encode(f"entitlement.v1.changes:{text}".encode()).rstrip(b"=").decode()


def _text(cursor: str) -> str:
    return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()


@pytest.mark.parametrize("cursor", ["not-a-cursor", "", changes.encode_cursor(10**12), _tagged("\u00b2"),
                                    _tagged("\u0663"), _tagged("9" * 5000), _tagged("-1"),
                                    _tagged("1.ZZZZZZZZZZZZZZZZ"), _tagged("0.0123456789abcdef")],
                         ids=["garbage", "other-tag", "ahead-of-the-log", "superscript-digit",
                              "arabic-indic-digit", "5000-digits", "negative", "hash-not-hex", "hash-of-no-event"])
def test_bad_cursors_are_invalid_argument(api: Api, cursor: str) -> None:
    if cursor == "":
        cursor = "b3RoZXI6MTI"  # base64 of another service's text
    with pytest.raises(grpc.RpcError) as info:
        next(iter(watch(api, cursor, timeout=5)))
    f = failure(info.value)
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and "cursor" in f.fields


PLATFORMS = ("platform-oc", "platform-other")


def test_the_number_of_streams_is_limited(api: Api, harness: Harness) -> None:
    limit = harness.ctx.settings.watch_max_streams
    assert limit == 2 * harness.ctx.settings.watch_max_per_caller  # the two platforms fill it
    calls = []
    try:
        for i in range(limit):
            call = _open_when_free(api, PLATFORMS[i % 2])
            calls.append(call)
        with pytest.raises(grpc.RpcError) as info:
            next(iter(watch(api, timeout=5)))
        f = failure(info.value)
        assert f.code == grpc.StatusCode.RESOURCE_EXHAUSTED and f.reason == "TOO_MANY_WATCHERS"
        assert f.metadata["limit"] == "server" and _retry_delay_s(info.value) == 5.0
        calls.pop().cancel()  # a slot comes back when a client goes away
        calls.append(_open_when_free(api, PLATFORMS[(limit - 1) % 2]))
    finally:
        for call in calls:
            call.cancel()


def test_one_caller_cannot_take_every_stream_slot(api: Api, harness: Harness) -> None:
    """A platform holding every change-stream slot of a process had every other platform refused
    (found by a review): one caller holds `watch_max_per_caller` at most; the refusal says which
    limit, and when to retry."""
    per_caller = harness.ctx.settings.watch_max_per_caller
    calls = []
    try:
        for _ in range(per_caller):
            calls.append(_open_when_free(api, "platform-oc"))
        with pytest.raises(grpc.RpcError) as info:
            next(iter(watch(api, caller="platform-oc", timeout=5)))
        f = failure(info.value)
        assert f.code == grpc.StatusCode.RESOURCE_EXHAUSTED and f.reason == "TOO_MANY_WATCHERS"
        assert f.metadata["limit"] == "caller" and _retry_delay_s(info.value) == 5.0
        calls.append(_open_when_free(api, "platform-other"))  # another platform still gets one
    finally:
        for call in calls:
            call.cancel()


def _retry_delay_s(err: grpc.RpcError) -> float | None:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for d in status.details if status is not None else ():
        if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            d.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


def _open_when_free(api: Api, caller: str = "platform-oc") -> Any:
    """Open a stream and read its bookmark, retrying while cancelled streams release their slot."""
    deadline = time.monotonic() + 5
    while True:
        call = watch(api, caller=caller)
        try:
            next(iter(call))
            return call
        except grpc.RpcError as err:
            if failure(err).reason != "TOO_MANY_WATCHERS" or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_curtailment_is_a_change_and_streams_end_when_the_server_stops(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    people = default_people()
    with own_server(backend[0], tmp_path / "own", request, people=people) as server:
        api = Api(server)
        person = next_ledger_person()
        activate_and_redeem(api, person=person, account="learner-curtailed")
        call = watch(api, timeout=60)
        stream = iter(call)
        next(stream)
        with on_day(server, dt.date(2026, 4, 20)):
            curtail(server, people, person[0], tmp_path)
            curtailed = next(stream)
        assert summary(curtailed) == ("CURTAILED", "ACTIVE", "learner-curtailed", True)
        assert (curtailed.status.end_date.year, curtailed.status.end_date.month,
                curtailed.status.end_date.day) == (2026, 5, 31)

        started = time.monotonic()
        server.running.stop(0)
        with pytest.raises(grpc.RpcError) as info:
            next(stream)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert time.monotonic() - started < 10


def test_a_change_read_again_after_a_curtailment_carries_the_end_date_it_left(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A change carries the status as that change left it: read again from an earlier cursor after a
    curtailment, the redemption and a suspension carried the curtailed end date (the row's as it is
    now), not the one they left, so a platform resuming from an older cursor was told otherwise than
    when it read them live. Likewise the state a curtailment left (suspended), not the row's after a
    later resumption."""
    people = default_people()
    with own_server(backend[0], tmp_path / "own", request, people=people) as server:
        api = Api(server)
        call = watch(api, timeout=60)
        stream = iter(call)
        mark = next(stream)
        person = next_ledger_person()
        name, _account = activate_and_redeem(api, person=person, account="learner-read-again")
        move(api, "suspend", name)
        live = [next(stream), next(stream)]
        with on_day(server, dt.date(2026, 4, 20)):
            curtail(server, people, person[0], tmp_path)
            live.append(next(stream))
            # Resumed after the curtailment: the curtailment read again still left it suspended.
            move(api, "resume", name)
            live.append(next(stream))
        call.cancel()
        ends = [(c.status.end_date.year, c.status.end_date.month, c.status.end_date.day) for c in live]
        assert [summary(c)[:2] for c in live] == [("REDEEMED", "ACTIVE"), ("SUSPENDED", "SUSPENDED"),
                                                  ("CURTAILED", "SUSPENDED"), ("RESUMED", "ACTIVE")]
        assert ends == [(2027, 3, 15), (2027, 3, 15), (2026, 5, 31), (2026, 5, 31)]
        again = drain(watch(api, mark.cursor, timeout=2))
        assert [(c.cursor, summary(c)) for c in again] == [(c.cursor, summary(c)) for c in live]
        assert [(c.status.end_date.year, c.status.end_date.month, c.status.end_date.day) for c in again] == ends


def test_a_change_is_active_up_to_its_end_date_and_not_after(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """`active` in a change is the access the platform must apply now: on its end date an
    activation's access is still on (a resumption that day: active), the day after it is off, even
    for a change read again then that left the state ACTIVE (the settlement job has not yet logged
    the expiry): a platform catching up from an old cursor does not switch Premium back on past the
    end date. VerifyEntitlement says the same each day."""
    with own_server(backend[0], tmp_path / "own", request) as server:
        api = Api(server)
        name, account = activate_and_redeem(api, person=next_ledger_person())
        end_date = api.admin.GetActivation(activation_pb2.GetActivationRequest(name=name)).end_date
        end = dt.date(end_date.year, end_date.month, end_date.day)
        with on_day(server, end):
            call = watch(api)
            stream = iter(call)
            mark = next(stream)
            move(api, "suspend", name)
            move(api, "resume", name)
            suspended, resumed = next(stream), next(stream)
            call.cancel()
            assert summary(suspended) == ("SUSPENDED", "SUSPENDED", account, False)
            assert summary(resumed) == ("RESUMED", "ACTIVE", account, True)
            assert api.platform.VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(account_id=account)).active
        with on_day(server, end + dt.timedelta(days=1)):
            again = drain(watch(api, mark.cursor, timeout=2))
            assert [summary(c) for c in again] == [("SUSPENDED", "SUSPENDED", account, False),
                                                  ("RESUMED", "ACTIVE", account, False)]
            assert not api.platform.VerifyEntitlement(
                activation_pb2.VerifyEntitlementRequest(account_id=account)).active


def test_open_streams_leave_the_unary_calls_their_threads(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Streams run on threads of their own (ENTITLEMENT_STREAM_WORKERS): with a pool of ONE thread for
    the unary calls and every change stream open, activations and verifications are still served.
    When streams shared the unary pool, the first open stream held its only thread: the second
    stream and every unary call waited for it."""
    with own_server(backend[0], tmp_path / "own", request, max_workers=1, stream_workers=6) as server:
        api = Api(server)
        calls = [watch(api, caller=PLATFORMS[i % 2], timeout=20) for i in range(server.ctx.settings.watch_max_streams)]
        try:
            for call in calls:
                next(iter(call))  # its bookmark: the stream is open and holding a thread
            agency_id, birth = next_ledger_person()
            resp = api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
                job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
                platform="platforms/openclassrooms", reason="watch test"), timeout=10)
            api.platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
                token=resp.activation_token, account_id="learner-beside-streams"), timeout=10)
            answer = api.platform.VerifyEntitlement(
                activation_pb2.VerifyEntitlementRequest(account_id="learner-beside-streams"), timeout=10)
            assert answer.active and answer.activation == resp.activation.name
        finally:
            for call in calls:
                call.cancel()


def test_a_vanished_clients_stream_ends_by_keepalive_and_frees_its_slot(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A platform whose connection vanishes without closing (the proxy between stops carrying
    anything) held its change stream's slot for the kernel's two hours of TCP keepalive: every
    other stream was RESOURCE_EXHAUSTED meanwhile. The server's HTTP/2 keepalive pings now find it
    dead and end the call (here 1 s + 1 s; 60 s + 20 s by default)."""
    from tcp_proxy import TcpProxy
    with own_server(backend[0], tmp_path / "srv", request, watch_max_streams=1, keepalive_seconds=1,
                    keepalive_timeout_seconds=1) as h:
        proxy = TcpProxy("127.0.0.1", h.running.port)
        far = grpc.insecure_channel(f"127.0.0.1:{proxy.port}")
        try:
            meta = (("authorization", f"Bearer {h.tokens['platform-oc']}"),)
            far_watch = far.unary_stream("/entitlement.v1.ActivationService/WatchEntitlementChanges",
                                         request_serializer=activation_pb2.WatchEntitlementChangesRequest.SerializeToString,
                                         response_deserializer=Change.FromString)
            held = far_watch(activation_pb2.WatchEntitlementChangesRequest(), metadata=meta, timeout=120)
            next(iter(held))  # its bookmark: the slot is taken
            api = Api(h)

            def slot_free() -> bool:
                call = watch(api, timeout=5)
                try:
                    next(iter(call))
                    return True
                except grpc.RpcError as err:
                    assert failure(err).reason == "TOO_MANY_WATCHERS", err
                    return False
                finally:
                    call.cancel()
            assert not slot_free()
            proxy.freeze()
            limit = time.monotonic() + 20
            while not slot_free():
                assert time.monotonic() < limit, "the vanished client's stream still holds its slot after 20 s"
                time.sleep(0.5)
        finally:
            far.close()
            proxy.close()


@pytest.mark.parametrize("model", ["threads", "event-loop"])
def test_a_revoked_platforms_open_stream_ends_and_gets_nothing_after(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest, model: str) -> None:
    """A platform revoked (its token leaked, say) is refused every new call within the caller
    cache's time; its change stream opened before went on streaming its accounts' changes for ever,
    holding a slot (found by a review). It now ends UNAUTHENTICATED (CREDENTIALS_REVOKED) at its
    next read of the log after the cache's time, and gets nothing logged after the revocation."""
    from entitlement import credentials
    from entitlement.callers import make_caller
    with own_server(backend[0], tmp_path / "srv", request, server_model=model, caller_cache_seconds=1,
                    watch_poll_ms=50) as h:
        api = Api(h)
        caller_id = f"plat-{uuid.uuid4().hex[:8]}"
        token = credentials.create(h.ctx.db, make_caller(caller_id, "platform", platform_id="openclassrooms"),
                                   now=h.clock.now(), actor="operator:test").token
        stream = iter(As(h.channel, token).WatchEntitlementChanges(activation_pb2.WatchEntitlementChangesRequest(),
                                                                   timeout=WAIT))
        mark = next(stream)  # a bookmark: the stream is open
        assert mark.type == Change.CHANGE_TYPE_UNSPECIFIED and mark.cursor
        credentials.revoke(h.ctx.db, caller_id, now=h.clock.now(), actor="operator:test", reason="leaked")
        time.sleep(1.2)  # the caller cache's time (1 s here): every new call of it is refused by now
        agency_id, birth = next_ledger_person()  # redeemed by the platform's other caller, after
        made = api.advisor.ActivateEntitlement(activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers",
            platform="platforms/openclassrooms", reason="watch test"))
        account = "learner-" + uuid.uuid4().hex[:12]
        api.platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(
            token=made.activation_token, account_id=account))
        got = []
        with pytest.raises(grpc.RpcError) as info:
            for change in stream:
                got.append(change)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value
        assert failure(info.value).reason == "CREDENTIALS_REVOKED"
        assert account not in [c.status.account_id for c in got]


@pytest.mark.parametrize("model", ["threads", "event-loop"])
def test_a_graceful_stop_ends_change_streams_at_once_unavailable(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest, model: str) -> None:
    """A graceful stop (SIGTERM: ENTITLEMENT_GRACE_SECONDS for the calls in flight) let every open
    change stream run on for the whole grace, as if it were a call about to finish (found by a
    review): with a platform watching, every stop took the whole grace, the platform stayed on a
    process that had said NOT_SERVING, and then gRPC cut the stream ("Cancelling all calls", no
    reason; the access log said OK). Change streams now end when the stop begins, UNAVAILABLE with
    reason SERVER_STOPPING: the platform calls again (another process answers) with its last cursor.
    (Here the grace outlasts the stream's deadline: unfixed, the stream ends DEADLINE_EXCEEDED.)"""
    import threading
    with own_server(backend[0], tmp_path / "srv", request, server_model=model, grace_seconds=120) as h:
        api = Api(h)
        stream = iter(watch(api, timeout=WAIT))
        mark = next(stream)
        _name, account = activate_and_redeem(api, person=next_ledger_person())
        assert summary(next(stream)) == ("REDEEMED", "ACTIVE", account, True)
        stopping = threading.Thread(target=h.running.stop, args=(120,))
        stopping.start()
        try:
            with pytest.raises(grpc.RpcError) as info:
                next(stream)
        finally:
            stopping.join()
        f = failure(info.value)
        assert f.code == grpc.StatusCode.UNAVAILABLE and f.reason == "SERVER_STOPPING", info.value
        assert "cursor" in info.value.details()
        assert mark.cursor  # (what the platform resumes from, had no change come)


def test_a_cursor_of_another_log_is_refused_not_streamed_from(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A cursor was a bare sequence number, accepted wherever the log was that long (found by a
    review): a platform's cursor from another deployment, or from before its database was restored
    from a backup (the numbers since then reused by other events), was streamed from, and the changes
    between the two histories' positions were never sent. Here two servers log the same story:
    the first one's cursor is refused by the second (INVALID_ARGUMENT naming `cursor`), as are the
    first one's bookmark (the cursor "from now" opens with) and one of the second's own cursors with
    its number changed; the second's cursors and bookmark work there, and so does a bare number (the
    cursors issued before they carried a hash)."""
    with own_server(backend[0], tmp_path / "a", request) as first, \
            own_server(backend[0], tmp_path / "b", request) as second:
        cursors, bookmarks = {}, {}
        for name, h in (("first", first), ("second", second)):
            api = Api(h)
            call = watch(api)
            stream = iter(call)
            next(stream)
            activate_and_redeem(api, person=next_ledger_person(), account="learner-two-logs")
            cursors[name] = next(stream).cursor
            call.cancel()
            bookmark_call = watch(api)  # from now: a bookmark at the same position
            bookmarks[name] = next(iter(bookmark_call)).cursor
            bookmark_call.cancel()
        position = {name: _text(c).partition(":")[2].partition(".") for name, c in cursors.items()}
        assert position["first"][0] == position["second"][0]  # the same sequence number
        api = Api(second)
        assert drain(watch(api, cursors["second"], timeout=1.5)) == []  # its own: nothing after it yet
        seq, _, bound = position["second"]
        assert drain(watch(api, _tagged(seq), timeout=1.5)) == []  # a bare number, as issued before: taken
        tampered = _tagged(f"{int(seq) - 1}.{bound}")
        assert drain(watch(api, bookmarks["second"], timeout=1.5)) == []  # its own bookmark
        for cursor in (cursors["first"], tampered, bookmarks["first"]):
            with pytest.raises(grpc.RpcError) as info:
                next(iter(watch(api, cursor, timeout=5)))
            f = failure(info.value)
            assert f.code == grpc.StatusCode.INVALID_ARGUMENT and "cursor" in f.fields, info.value
            assert "VerifyEntitlement" in f.message


# A client that stops reading: a receive window of 1 KiB (HTTP/2 flow control), never grown, so a
# few dozen changes fill it and the server's handler is held in `yield` (the review measured the
# same with 1,200 changes and the default window).
SMALL_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]


def _stalled_stream(h: Harness, token: str, channel: grpc.Channel) -> Any:
    """A change stream of `token`'s platform from before 60 changes, none of which it reads: its
    handler reads them at once and is held in `yield` (given a second for it, during which its
    caller check and the stop find nothing to do)."""
    api = Api(h)
    call = watch(api)
    mark = next(iter(call))
    call.cancel()
    name, _account = activate_and_redeem(api, person=next_ledger_person())
    for _ in range(30):
        move(api, "suspend", name)
        move(api, "resume", name)
    stream = iter(As(channel, token).WatchEntitlementChanges(
        activation_pb2.WatchEntitlementChangesRequest(cursor=mark.cursor), timeout=120))
    time.sleep(1)
    return stream


def _read_to_the_end(stream: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        for _change in stream:
            pass
    return info.value


@pytest.mark.parametrize("model", ["threads", "event-loop"])
def test_a_revoked_platforms_stream_its_client_stopped_reading_ends_and_frees_its_slot(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest, model: str) -> None:
    """The credentials check runs before each read of the log; a handler held in `yield` by a client
    that stopped reading (HTTP/2 flow control) never got there (found by a review): a revoked
    platform kept its stream's slot as long as its connection lived, every other stream of the
    process refused meanwhile (here the only slot), and its stream ended UNAUTHENTICATED only once
    its client read on. Such a stream is now checked from outside and its call ended: the slot
    comes back, and the client, reading again, gets what it had not read, then UNAUTHENTICATED."""
    from entitlement import credentials
    from entitlement.callers import make_caller
    with own_server(backend[0], tmp_path / "srv", request, server_model=model, caller_cache_seconds=1,
                    watch_poll_ms=50, watch_max_streams=1) as h:
        caller_id = f"plat-{uuid.uuid4().hex[:8]}"
        token = credentials.create(h.ctx.db, make_caller(caller_id, "platform", platform_id="openclassrooms"),
                                   now=h.clock.now(), actor="operator:test").token
        slow = grpc.insecure_channel(f"127.0.0.1:{h.running.port}", options=SMALL_WINDOW)
        try:
            stream = _stalled_stream(h, token, slow)
            api = Api(h)
            assert not _slot_free(api)
            credentials.revoke(h.ctx.db, caller_id, now=h.clock.now(), actor="operator:test", reason="leaked")
            limit = time.monotonic() + WAIT
            while not _slot_free(api):
                assert time.monotonic() < limit, "the revoked platform's stream still holds its slot"
                time.sleep(0.2)
            ended = _read_to_the_end(stream)
            assert ended.code() == grpc.StatusCode.UNAUTHENTICATED, ended
        finally:
            slow.close()


@pytest.mark.parametrize("model", ["threads", "event-loop"])
def test_a_graceful_stop_ends_a_change_stream_its_client_stopped_reading(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest, model: str) -> None:
    """A stop ended the change streams by waking them; one held in `yield` by a client that stopped
    reading never woke, and the stop waited its whole grace for it (found by a review). Its call is
    now ended at the stop's start: the stop does not wait (here a grace of 120 s), and the client,
    reading again, gets what it had not read, then UNAVAILABLE (on the event loop, where gRPC
    cannot cancel one call, the stop cancels it with the calls left once no handler runs)."""
    import threading
    with own_server(backend[0], tmp_path / "srv", request, server_model=model, grace_seconds=120,
                    watch_poll_ms=50) as h:
        slow = grpc.insecure_channel(f"127.0.0.1:{h.running.port}", options=SMALL_WINDOW)
        try:
            stream = _stalled_stream(h, h.tokens["platform-oc"], slow)
            stopping = threading.Thread(target=h.running.stop, args=(120,), daemon=True)
            stopping.start()
            stopping.join(WAIT)
            assert not stopping.is_alive(), "the stop waits for the stream its client stopped reading"
            err = _read_to_the_end(stream)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            if model == "threads":  # (on the event loop, gRPC's own: its status cancelled with the call)
                assert "cursor" in (err.details() or "")
        finally:
            slow.close()


def _slot_free(api: Api) -> bool:
    """Whether a change stream of platform-oc opens (then closed again)."""
    call = watch(api, timeout=5)
    try:
        next(iter(call))
        return True
    except grpc.RpcError as err:
        assert failure(err).reason == "TOO_MANY_WATCHERS", err
        return False
    finally:
        call.cancel()


def _held_log_stream(h: Harness, token: str, channel: grpc.Channel) -> Any:
    """A funder's StreamEvents over a log of some 125 events, none of which it reads: its handler
    is held in `yield` (given a second for it)."""
    api = Api(h)
    name, _account = activate_and_redeem(api, person=next_ledger_person())
    for _ in range(60):
        move(api, "suspend", name)
        move(api, "resume", name)
    stream = iter(As(channel, token).StreamEvents(audit_pb2.StreamEventsRequest(), timeout=120))
    time.sleep(1)
    return stream


@pytest.mark.parametrize("model", ["threads", "event-loop"])
def test_a_revoked_funders_log_stream_its_client_stopped_reading_ends_and_frees_its_thread(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest, model: str) -> None:
    """StreamEvents checks its caller's credentials once a second as it sends; held in `yield` by
    a client that stopped reading, it never did (found by a review): a revoked funder's download
    held its stream thread (here the only one: every other stream waited) as long as its
    connection lived. It is now checked from outside and its call ended: the thread comes back,
    and the client, reading again, gets what it had not read, then UNAUTHENTICATED."""
    from entitlement import credentials
    from entitlement.callers import make_caller
    with own_server(backend[0], tmp_path / "srv", request, server_model=model, caller_cache_seconds=1,
                    stream_workers=1) as h:
        caller_id = f"fund-{uuid.uuid4().hex[:8]}"
        token = credentials.create(h.ctx.db, make_caller(caller_id, "funder", funder_id="france-travail"),
                                   now=h.clock.now(), actor="operator:test").token
        slow = grpc.insecure_channel(f"127.0.0.1:{h.running.port}", options=SMALL_WINDOW)
        try:
            stream = _held_log_stream(h, token, slow)
            credentials.revoke(h.ctx.db, caller_id, now=h.clock.now(), actor="operator:test", reason="leaked")
            api = Api(h)
            limit = time.monotonic() + WAIT
            while True:
                try:
                    next(iter(api.as_("funder-ft").StreamEvents(audit_pb2.StreamEventsRequest(tree_size=1),
                                                                  timeout=3)))
                    break
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
                    assert time.monotonic() < limit, "the revoked funder's stream still holds the stream thread"
            ended = _read_to_the_end(stream)
            assert ended.code() == grpc.StatusCode.UNAUTHENTICATED, ended
        finally:
            slow.close()


@pytest.mark.parametrize("model", ["threads", "event-loop"])
def test_a_graceful_stop_ends_a_log_stream_its_client_stopped_reading(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest, model: str) -> None:
    """A StreamEvents held in `yield` by a client that stopped reading held a stop for its whole
    grace (found by a review). Log streams now end as the stop begins, as change streams do: the
    stop does not wait (here a grace of 120 s), and the client, reading again, gets what it had not
    read, then UNAVAILABLE."""
    import threading
    with own_server(backend[0], tmp_path / "srv", request, server_model=model, grace_seconds=120) as h:
        slow = grpc.insecure_channel(f"127.0.0.1:{h.running.port}", options=SMALL_WINDOW)
        try:
            stream = _held_log_stream(h, h.tokens["funder-ft"], slow)
            stopping = threading.Thread(target=h.running.stop, args=(120,), daemon=True)
            stopping.start()
            stopping.join(WAIT)
            assert not stopping.is_alive(), "the stop waits for the log stream its client stopped reading"
            err = _read_to_the_end(stream)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        finally:
            slow.close()
