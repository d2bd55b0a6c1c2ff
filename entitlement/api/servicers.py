"""The three gRPC servicers. Each method: validate the request, build a domain command, call the use
case, convert the result. Errors are raised as domain errors; interceptors map them (api.errors)."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import structlog

from entitlement import activation, audit, changes, eligibility, registry_feed, transparency, usage
from entitlement.api import convert
from entitlement.api import errors as api_errors
from entitlement.api import validation as val
from entitlement.api.identity import caller_check, current_caller
from entitlement.app import Context
from entitlement.errors import DomainError, InvalidArgument, ResourceExhausted, Unavailable, Violations
from entitlement.v1 import (activation_pb2, activation_pb2_grpc, audit_pb2, audit_pb2_grpc, common_pb2,
                            eligibility_pb2, eligibility_pb2_grpc, registry_pb2, registry_pb2_grpc)

log = structlog.get_logger("entitlement.rpc")


def _job_seeker(msg: common_pb2.JobSeekerIdentity, v: Violations) -> eligibility.JobSeeker:
    """The `job_seeker` field of a check or an activation (its field names spelled once, here:
    every check validates it)."""
    agency_id = val.agency_id(msg.agency_id, "job_seeker.agency_id", v)  # canonical: case and spaces never matter
    # An explicitly set but empty Date (0-0-0) is no birth date: refused, never "not registered".
    # (An unset one is already reported by check_required.)
    birth = val.date(msg.birth_date, "job_seeker.birth_date", v, required=msg.HasField("birth_date"))
    return eligibility.JobSeeker(agency_id, birth)  # type: ignore[arg-type]


class EligibilityServicer(eligibility_pb2_grpc.EligibilityServiceServicer):
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def CheckEligibility(self, request: eligibility_pb2.CheckEligibilityRequest,
                         context: grpc.ServicerContext) -> eligibility_pb2.CheckEligibilityResponse:
        v = Violations()
        val.check_required(request, v)
        who = _job_seeker(request.job_seeker, v)
        program_id = val.name(request.program, val.PROGRAM_NAME_RE, "program", "programs/premium-job-seekers", v)
        as_of = val.date(request.as_of, "as_of", v)
        val.pattern(request.mentor_id, val.MENTOR_ID_RE, "mentor_id", val.MENTOR_ID_RULE, v)
        v.raise_if_any()
        result = eligibility.check(self.ctx, who, program_id or None, as_of, request.mentor_id)
        # Serialized already (sent as it is: entitlement.api.wrapping.passthrough).
        return convert.check_answer(result.decisions, result.snapshot, result.facts_on)  # type: ignore[return-value]

    def ListPrograms(self, request: eligibility_pb2.ListProgramsRequest,
                     context: grpc.ServicerContext) -> eligibility_pb2.ListProgramsResponse:
        v = Violations()
        as_of = val.date(request.as_of, "as_of", v)
        v.raise_if_any()
        programs, token, day = eligibility.list_programs(self.ctx, current_caller(), request.page_size,
                                                         request.page_token, as_of)
        return eligibility_pb2.ListProgramsResponse(programs=[convert.program(p, day) for p in programs],
                                                    next_page_token=token)


class ActivationServicer(activation_pb2_grpc.ActivationServiceServicer):
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._watchers = threading.BoundedSemaphore(max(1, ctx.settings.watch_max_streams))
        self._watching: dict[str, int] = {}  # caller id -> its change streams open (under _watching_lock)
        self._watching_lock = threading.Lock()
        self._stopping = threading.Event()  # the server's graceful stop has begun (stop_streams)
        self._streams = _OpenStreams("watch-stalls")  # each open change stream

    def ActivateEntitlement(self, request: activation_pb2.ActivateEntitlementRequest,
                            context: grpc.ServicerContext) -> activation_pb2.ActivateEntitlementResponse:
        v = Violations()
        val.check_required(request, v)
        val.pattern(request.request_id, val.REQUEST_ID_RE, "request_id", "1 to 64 letters, digits, '-' or '_'", v)
        who = _job_seeker(request.job_seeker, v)
        program_id = val.name(request.program, val.PROGRAM_NAME_RE, "program", "programs/premium-job-seekers", v)
        platform_id = val.name(request.platform, val.PLATFORM_NAME_RE, "platform", "platforms/openclassrooms", v)
        reason = val.text(request.reason, "reason", v)
        val.free_of_identity(reason, "reason", who.agency_id, who.birth_date, v)
        val.pattern(request.mentor_id, val.MENTOR_ID_RE, "mentor_id", val.MENTOR_ID_RULE, v)
        v.raise_if_any()
        result = activation.activate(self.ctx, current_caller(), activation.ActivateCommand(
            who, program_id, platform_id, reason, request.request_id, request.mentor_id))
        return convert.activation_response(result.activation, result.token)

    def GetActivation(self, request: activation_pb2.GetActivationRequest,
                      context: grpc.ServicerContext) -> activation_pb2.Activation:
        v = Violations()
        val.check_required(request, v)
        activation_id = val.name(request.name, val.ACTIVATION_NAME_RE, "name", "activations/{32 hex digits}", v)
        v.raise_if_any()
        return convert.activation(activation.get(self.ctx, current_caller(), activation_id))

    @staticmethod
    def _command(action: str, request: activation_pb2.TransitionActivationRequest) -> activation.TransitionCommand:
        v = Violations()
        val.check_required(request, v)
        activation_id = val.name(request.name, val.ACTIVATION_NAME_RE, "name", "activations/{32 hex digits}", v)
        reason = val.text(request.reason, "reason", v)
        val.pattern(request.request_id, val.REQUEST_ID_RE, "request_id", "1 to 64 letters, digits, '-' or '_'", v)
        v.raise_if_any()
        return activation.TransitionCommand(activation_id, action, reason, request.request_id)

    def _transition(self, action: str, request: activation_pb2.TransitionActivationRequest) -> activation_pb2.Activation:
        return convert.activation(activation.transition(self.ctx, current_caller(), self._command(action, request)))

    def SuspendActivation(self, request: activation_pb2.TransitionActivationRequest,
                          context: grpc.ServicerContext) -> activation_pb2.Activation:
        return self._transition("suspend", request)

    def ResumeActivation(self, request: activation_pb2.TransitionActivationRequest,
                         context: grpc.ServicerContext) -> activation_pb2.Activation:
        return self._transition("resume", request)

    def RevokeActivation(self, request: activation_pb2.TransitionActivationRequest,
                         context: grpc.ServicerContext) -> activation_pb2.Activation:
        return self._transition("revoke", request)

    def ReissueActivationToken(self, request: activation_pb2.TransitionActivationRequest,
                               context: grpc.ServicerContext) -> activation_pb2.ActivateEntitlementResponse:
        result = activation.reissue_token(self.ctx, current_caller(), self._command("reissue", request))
        return convert.activation_response(result.activation, result.token)

    def RedeemActivationToken(self, request: activation_pb2.RedeemActivationTokenRequest,
                              context: grpc.ServicerContext) -> activation_pb2.EntitlementStatus:
        v = Violations()
        val.check_required(request, v)
        val.pattern(request.account_id, val.ACCOUNT_ID_RE, "account_id", val.ACCOUNT_ID_RULE, v)
        if len(request.token) > 4096:
            v.add("token", "must be at most 4096 characters")
        v.raise_if_any()
        return convert.status(activation.redeem(self.ctx, current_caller(), request.token, request.account_id))

    def VerifyEntitlement(self, request: activation_pb2.VerifyEntitlementRequest,
                          context: grpc.ServicerContext) -> activation_pb2.EntitlementStatus:
        v = Violations()
        val.check_required(request, v)
        val.pattern(request.account_id, val.ACCOUNT_ID_RE, "account_id", val.ACCOUNT_ID_RULE, v)
        v.raise_if_any()
        return convert.status(activation.verify(self.ctx, current_caller(), request.account_id))

    def GetSigningKeys(self, request: activation_pb2.GetSigningKeysRequest,
                       context: grpc.ServicerContext) -> activation_pb2.GetSigningKeysResponse:
        return activation_pb2.GetSigningKeysResponse(jwks_json=self.ctx.keys.jwks_json(self.ctx.clock.now()))

    def ReportUsage(self, request: activation_pb2.ReportUsageRequest,
                    context: grpc.ServicerContext) -> activation_pb2.ReportUsageResponse:
        v = Violations()
        val.check_required(request, v)
        val.pattern(request.request_id, val.REQUEST_ID_RE, "request_id", "1 to 64 letters, digits, '-' or '_'", v)
        val.pattern(request.account_id, val.ACCOUNT_ID_RE, "account_id", val.ACCOUNT_ID_RULE, v)
        val.pattern(request.month, val.MONTH_RE, "month", "a month YYYY-MM", v)
        program_id = val.name(request.program, val.PROGRAM_NAME_RE, "program", "programs/opencfa-apprentices", v)
        v.raise_if_any()
        usage.report_usage(self.ctx, current_caller(), usage.UsageReport(
            request.account_id, request.month, request.used, request.request_id, program_id))
        return activation_pb2.ReportUsageResponse()

    # A refused change stream's RetryInfo: a slot frees when a stream ends (its client's cancel, its
    # deadline, or keepalive finding its connection dead: up to 80 s by default).
    WATCH_RETRY_S = 5.0

    def _take_watch_slot(self, caller_id: str) -> None:
        """One of the process's change-stream slots, at most `watch_max_per_caller` of them for one
        caller (found by a review: one platform could hold every slot, every other platform then
        refused); RESOURCE_EXHAUSTED TOO_MANY_WATCHERS with a RetryInfo otherwise."""
        settings = self.ctx.settings
        per_caller = max(1, settings.watch_max_per_caller)
        with self._watching_lock:
            if not self._watchers.acquire(blocking=False):
                exc = ResourceExhausted(
                    f"this server already serves {settings.watch_max_streams} change streams; retry later",
                    reason="TOO_MANY_WATCHERS", metadata={"limit": "server",
                                                          "max_streams": str(settings.watch_max_streams)})
                exc.retry_delay_s = self.WATCH_RETRY_S
                raise exc
            if self._watching.get(caller_id, 0) >= per_caller:
                self._watchers.release()
                exc = ResourceExhausted(
                    f"this caller already holds {per_caller} change streams on this server (one is enough: it "
                    f"sees every change of the platform); close one, or retry later", reason="TOO_MANY_WATCHERS",
                    metadata={"limit": "caller", "max_streams": str(per_caller)})
                exc.retry_delay_s = self.WATCH_RETRY_S
                raise exc
            self._watching[caller_id] = self._watching.get(caller_id, 0) + 1

    def _give_back_watch_slot(self, caller_id: str) -> None:
        with self._watching_lock:
            left = self._watching.get(caller_id, 0) - 1
            if left > 0:
                self._watching[caller_id] = left
            else:
                self._watching.pop(caller_id, None)
            self._watchers.release()

    def stop_streams(self) -> None:
        """The server's graceful stop begins: every change stream ends now, UNAVAILABLE with reason
        SERVER_STOPPING, and one opened from now on at once. A stream never finishes by itself, so
        left to the grace it held the stop for all of it (ENTITLEMENT_GRACE_SECONDS), served by a
        process already NOT_SERVING, and was then cut anyway (found by a review); ended now, its
        platform calls again at once, another process answers, with its last cursor: nothing lost.
        A stream blocked handing a change to a client that stopped reading (HTTP/2 flow control)
        never came back to see the stop: its call is ended here (`_end_call`: the same code and
        message, without the details), after what its client has not read yet."""
        self._stopping.set()  # (before the look at `sending`: see WatchEntitlementChanges)
        opened = self._streams.opened()
        for stream in opened:
            if stream.wake is not None:  # (a change stream's: each has one)
                stream.wake.set()
        self._streams.end_held(opened, self._stopping_error())

    @staticmethod
    def _stopping_error() -> Unavailable:
        return Unavailable("this server is stopping: call again (another server process answers) with the "
                           "cursor of the last change received", reason="SERVER_STOPPING")

    def _stopping_now(self) -> None:
        if self._stopping.is_set():
            raise self._stopping_error()

    def WatchEntitlementChanges(self, request: activation_pb2.WatchEntitlementChangesRequest,
                                context: grpc.ServicerContext) -> Iterator[activation_pb2.EntitlementChange]:
        caller = current_caller()
        still_allowed = caller_check()
        position, opening = changes.start_position(self.ctx, request.cursor)
        self._take_watch_slot(caller.id)
        done = threading.Event()  # set when the call ends, or the server stops (stop_streams)
        released = threading.Lock()
        stream = _OpenStream(context, still_allowed, done)
        self._streams.add(stream)

        def release_slot() -> None:  # once: on termination (cancel, deadline, server stop) or on return
            if released.acquire(blocking=False):
                self._streams.discard(stream)
                self._give_back_watch_slot(caller.id)

        def on_termination() -> None:
            done.set()
            release_slot()

        try:
            if not context.add_callback(on_termination):
                return  # already terminated
            self._stopping_now()
            if opening is not None:  # "from now": a bookmark first
                yield convert.change(opening)
            interval = self.ctx.settings.watch_poll_ms / 1000
            while not done.is_set():
                # Its credentials again before each read (cached for the caller cache's time): a
                # platform revoked, expired or rotated out meanwhile gets UNAUTHENTICATED, and its
                # stream ends (found by a review: a stream opened before went on for ever).
                caller = still_allowed()
                batch, position, more = changes.poll(self.ctx, caller, position)
                for change in batch:
                    # Marked before the stop is looked at: a stop either is seen here or finds the
                    # mark (stop_streams sets its flag before it looks), and a stream held in
                    # `yield` by a client that stopped reading is ended from outside
                    # (_OpenStreams: its caller's check, the stop).
                    stream.sending = time.monotonic()
                    self._stopping_now()
                    yield convert.change(change)
                    stream.sending = None
                if not more:
                    done.wait(interval)
                self._stopping_now()
        finally:
            release_slot()


# How often the open server streams are looked at for one held in `yield` by a client that stopped
# reading (_OpenStreams), and how long it must have been held.
STALL_CHECK_S = 1.0


class _OpenStream:
    """An open server stream as the stall check and the stop see it: its call, its caller's check
    (run in a copy of the call's contextvars: its log lines carry the call's fields), its wake
    event, and since when it has been handing over a response (None: it is not)."""

    __slots__ = ("context", "still_allowed", "wake", "scope", "sending")

    def __init__(self, context: grpc.ServicerContext, still_allowed: Callable[[], object],
                 wake: threading.Event | None = None) -> None:
        self.context, self.still_allowed, self.wake = context, still_allowed, wake
        self.scope = contextvars.copy_context()
        self.sending: float | None = None


class _OpenStreams:
    """The open streams of a method that streams for as long as its client reads, seen from outside:
    while one is open, a thread checks every STALL_CHECK_S the credentials of each stream held that
    long in `yield` (its client stopped reading: HTTP/2 flow control holds the handler there, where
    it checks nothing) and ends its call (`_end_call`) once they no longer hold; `end_held` ends the
    held ones at a stop. Found by a review: a leaked, then revoked, platform token kept its change
    streams' slots for as long as its connection lived, the stream ending UNAUTHENTICATED only once
    its client read on, and a stop waited its whole grace for such a stream."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._open: set[_OpenStream] = set()
        self._checker: threading.Thread | None = None
        self._stopped = threading.Event()

    def add(self, stream: _OpenStream) -> None:
        with self._lock:
            self._open.add(stream)
            if self._checker is None and not self._stopped.is_set():
                self._checker = threading.Thread(target=self._check, name=self._name, daemon=True)
                self._checker.start()

    def discard(self, stream: _OpenStream) -> None:
        with self._lock:
            self._open.discard(stream)

    def opened(self) -> list[_OpenStream]:
        with self._lock:
            return list(self._open)

    def end_held(self, streams: list[_OpenStream], err: DomainError) -> None:
        """The server stops: the checks end, and each of `streams` still held in `yield` after up
        to STALL_CHECK_S is ended with `err` (the others see the stop themselves and end with
        `err`'s details too). Not at once: a stream handing its last message to a client that
        reads is in `yield` for a moment, longer under load, and one ended from outside loses its
        error details (seen in a loaded test run: UNAVAILABLE without the reason SERVER_STOPPING)."""
        self._stopped.set()
        deadline = time.monotonic() + STALL_CHECK_S
        held = [s for s in streams if s.sending is not None]
        while held and time.monotonic() < deadline:
            time.sleep(0.01)
            held = [s for s in held if s.sending is not None]
        for stream in held:
            _end_call(stream.context, err)

    def _check(self) -> None:
        while True:
            with self._lock:
                if not self._open or self._stopped.is_set():
                    self._checker = None
                    return
            self._stopped.wait(STALL_CHECK_S)
            now = time.monotonic()
            held = [s for s in self.opened() if s.sending is not None and now - s.sending >= STALL_CHECK_S]
            for stream in held:
                try:
                    stream.scope.run(stream.still_allowed)
                except DomainError as err:
                    # (its access log line says OK, as for a client that went away: this one says why)
                    stream.scope.run(log.info, "stalled_stream_ended", reason=err.reason)
                    _end_call(stream.context, err)
                except Exception:  # noqa: BLE001 (the database unreachable, say): checked again next time
                    pass


def _end_call(context: grpc.ServicerContext, err: DomainError) -> None:
    """End a server stream's call now, from another thread, with `err`'s code and message (not its
    details: no trailing metadata goes with a cancellation), whatever its handler is doing: the way
    out for a handler held in `yield` by a client that stopped reading, where it never returns to
    raise. Its client gets what it had not read yet, then this status. The event-loop server's
    context ends its call on the loop (entitlement/aio_server.py SyncContext.end_now). The
    thread-pool server's cancels its core call with that status: grpc's `_Context.cancel` does the
    same with CANCELLED (a status a platform would not act on), through `grpc_call_cancel`, which
    grpc.h documents as callable from any thread while the call is referenced (here by the
    context)."""
    code = api_errors.code_of(err)
    end_now = getattr(context, "end_now", None)
    if end_now is not None:
        end_now(code, err.message)
        return
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    if call is not None:
        call.cancel(code.value[0], err.message)
    else:
        context.cancel()


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._stopping = threading.Event()  # the server's graceful stop has begun (stop_streams)
        self._streams = _OpenStreams("log-stalls")  # each open StreamEvents

    @staticmethod
    def _stopping_error() -> Unavailable:
        return Unavailable("this server is stopping: call again (another server process answers) from the "
                           "sequence after the last one received", reason="SERVER_STOPPING")

    def stop_streams(self) -> None:
        """The server's graceful stop begins: every StreamEvents ends at its next entry, UNAVAILABLE
        with reason SERVER_STOPPING, and one held in `yield` by a client that stopped reading at
        once (_OpenStreams.end_held): left to the grace, a download of a long log, or one whose
        client stopped reading, held the stop for all of it (found by a review)."""
        self._stopping.set()  # (before the look at `sending`: see StreamEvents)
        self._streams.end_held(self._streams.opened(), self._stopping_error())

    def ListActivations(self, request: audit_pb2.ListActivationsRequest,
                        context: grpc.ServicerContext) -> audit_pb2.ListActivationsResponse:
        v = Violations()
        program_id = val.name(request.program, val.PROGRAM_NAME_RE, "program", "programs/premium-job-seekers", v)
        val.pattern(request.funder, val.FUNDER_RE, "funder", "a funder id such as region-idf", v)
        val.pattern(request.agency_code, val.AGENCY_CODE_RE, "agency_code",
                    "1 to 16 letters, digits, '.', '_' or '-', the first a letter or a digit", v)
        state = ""
        if request.state:
            state = convert.PROTO_TO_STATE.get(request.state, "")
            if not state:
                v.add("state", "unknown state")
        created_from = val.timestamp(request.create_time_from, "create_time_from", v) \
            if request.HasField("create_time_from") else None
        created_to = val.timestamp(request.create_time_to, "create_time_to", v) \
            if request.HasField("create_time_to") else None
        if created_from is not None and created_to is not None and created_to < created_from:
            v.add("create_time_to", "is before create_time_from")  # (as GetFundingReport's end_month)
        v.raise_if_any()
        items, token = audit.list_activations(self.ctx, current_caller(), audit.ActivationFilter(
            program_id, request.funder, request.agency_code, state, created_from, created_to),
            request.page_size, request.page_token)
        caller = current_caller()  # a funder sees its own share of the money alone
        return convert.listed_activations(items, token, caller.funder_id if caller.role == "funder" else "")

    def GetFundingReport(self, request: audit_pb2.GetFundingReportRequest,
                         context: grpc.ServicerContext) -> audit_pb2.GetFundingReportResponse:
        v = Violations()
        program_id = val.name(request.program, val.PROGRAM_NAME_RE, "program", "programs/premium-job-seekers", v)
        val.pattern(request.funder, val.FUNDER_RE, "funder", "a funder id such as region-idf", v)
        v.raise_if_any()
        rows = audit.funding_report(self.ctx, current_caller(), request.funder, program_id,
                                    request.start_month, request.end_month)
        return audit_pb2.GetFundingReportResponse(rows=[convert.report_row(r) for r in rows])

    def ListEvents(self, request: audit_pb2.ListEventsRequest,
                   context: grpc.ServicerContext) -> audit_pb2.ListEventsResponse:
        events, token = audit.list_events(self.ctx, current_caller(), request.start_sequence,
                                          request.page_size, request.page_token)
        return audit_pb2.ListEventsResponse(events=[convert.event(e) for e in events], next_page_token=token)

    # The Merkle event log (entitlement/transparency.py).

    def GetCheckpoint(self, request: audit_pb2.GetCheckpointRequest,
                      context: grpc.ServicerContext) -> audit_pb2.GetCheckpointResponse:
        c = transparency.get_checkpoint(self.ctx)
        return audit_pb2.GetCheckpointResponse(checkpoint=c.checkpoint, tree_size=c.tree_size, root_hash=c.root_hash,
                                               origin=c.origin, verifier_key=c.verifier_key)

    def GetInclusionProof(self, request: audit_pb2.GetInclusionProofRequest,
                          context: grpc.ServicerContext) -> audit_pb2.GetInclusionProofResponse:
        which = request.WhichOneof("leaf")
        p = transparency.inclusion_proof(
            self.ctx, leaf_index=request.leaf_index if which == "leaf_index" else None,
            sequence=request.sequence if which == "sequence" else None, tree_size=request.tree_size)
        return audit_pb2.GetInclusionProofResponse(leaf_index=p.leaf_index, tree_size=p.tree_size,
                                                   leaf_hash=p.leaf_hash, hashes=p.hashes)

    def GetConsistencyProof(self, request: audit_pb2.GetConsistencyProofRequest,
                            context: grpc.ServicerContext) -> audit_pb2.GetConsistencyProofResponse:
        p = transparency.consistency_proof(self.ctx, old_size=request.old_size, new_size=request.new_size)
        return audit_pb2.GetConsistencyProofResponse(old_size=p.old_size, new_size=p.new_size, hashes=p.hashes)

    def StreamEvents(self, request: audit_pb2.StreamEventsRequest,
                     context: grpc.ServicerContext) -> Iterator[audit_pb2.LogEntry]:
        entries = transparency.stream_entries(self.ctx, current_caller(), start_sequence=request.start_sequence,
                                              tree_size=request.tree_size)
        still_allowed, checked = caller_check(), time.monotonic()
        stream = _OpenStream(context, still_allowed)
        self._streams.add(stream)
        try:
            for e in entries:
                if not context.is_active():
                    return
                if time.monotonic() - checked >= 1.0:  # a long stream: its credentials again, once a second
                    still_allowed()
                    checked = time.monotonic()
                # Marked before the stop is looked at, as in WatchEntitlementChanges: a stream held
                # in `yield` by a client that stopped reading is ended from outside (_OpenStreams).
                stream.sending = time.monotonic()
                if self._stopping.is_set():
                    raise self._stopping_error()
                yield audit_pb2.LogEntry(sequence=e.seq, leaf_hash=e.leaf_hash,
                                         event=convert.event(e.event) if e.event is not None else None)
                stream.sending = None
        finally:
            self._streams.discard(stream)


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def ImportExtract(self, request_iterator: Iterator[registry_pb2.ImportExtractRequest],
                      context: grpc.ServicerContext) -> registry_pb2.ImportExtractResponse:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument.single("header", "the first message must carry the header")
        v = Violations()
        val.check_required(first.header, v, "header.")
        # An explicitly set but empty Date (0-0-0) is no date (an unset one is reported by check_required).
        extracted_on = val.date(first.header.extracted_on, "header.extracted_on", v,
                                required=first.header.HasField("extracted_on"))
        val.text(first.header.source_name, "header.source_name", v, maximum=255)
        val.pattern(first.header.sha256, val.SHA256_RE, "header.sha256", "64 hexadecimal digits", v)
        if not 0 <= first.header.min_ratio <= 1:
            v.add("header.min_ratio", "must be between 0 and 1")
        v.raise_if_any()
        assert extracted_on is not None
        header = registry_feed.PushHeader(extracted_on, first.header.source_name, first.header.sha256,
                                          first.header.min_ratio)
        chunks = registry_feed.idle_bounded(_chunks(request_iterator), self.ctx.settings.import_idle_seconds)
        result = registry_feed.receive(self.ctx, current_caller(), header, chunks)
        s = result.summary
        return registry_pb2.ImportExtractResponse(
            snapshot=f"registrySnapshots/{s.snapshot_id}", unchanged=s.unchanged, sha256=s.sha256,
            rows_read=s.rows_read, rows_imported=s.rows_imported, rows_rejected=s.rows_rejected,
            rejected_rows=[registry_pb2.RejectedRow(line=line, reason=reason) for line, reason in result.rejected])


def _chunks(requests: Iterator[registry_pb2.ImportExtractRequest]) -> Iterator[bytes]:
    for i, req in enumerate(requests, start=1):
        if req.WhichOneof("part") != "chunk":
            raise InvalidArgument.single("header", f"message {i + 1}: only the first message carries a header")
        if len(req.chunk) > registry_feed.MAX_CHUNK_BYTES:
            raise InvalidArgument.single("chunk", f"message {i + 1}: chunks are at most 1 MiB")
        yield req.chunk
