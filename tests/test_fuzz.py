"""Fuzzing every RPC of the contract over a real channel, on both backends.

Requests come from strategies derived from the proto descriptors (tests/fuzz_strategies.py), sent
by callers of every role (and by nobody), so the authentication, authorization and validation
paths all run. Whatever arrives, the answer is never INTERNAL or UNKNOWN; INVALID_ARGUMENT always
carries a google.rpc.BadRequest naming fields of the request; errors leak no SQL; and afterwards
the server is healthy and every invariant of the database holds.

Random bytes on the wire (a request that is not a protobuf message at all, or a truncated or
corrupted one) are answered INVALID_ARGUMENT, after the credential and role checks, with a
BadRequest violation of the empty field path (the request as a whole) naming the message type.
gRPC Python itself answers INTERNAL ("Exception deserializing request!") before any interceptor
runs, so the server decodes requests itself (entitlement/api/wrapping.py). Bytes that do decode
(protobuf accepts many) are answered like any request.

Sizes, per RPC and backend: FUZZ_EXAMPLES generated requests (40; 10,000 with ENTITLEMENT_STRESS=1;
ENTITLEMENT_FUZZ_EXAMPLES overrides), a tenth as many with odd credentials (at least 10), and
WIRE_EXAMPLES byte strings (40; 2,000 in stress, where one decoder answers them all;
ENTITLEMENT_FUZZ_WIRE_EXAMPLES). The seed is fixed (CI is reproducible) unless
ENTITLEMENT_FUZZ_SEED is set; it is printed, and shown in every failure.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fuzz_strategies as fs
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st

from support import Api, Failure, Harness, failure, identity, next_person
from test_validation import REPRESENTATIVE, SQL_WORDS

from entitlement import doctor
from entitlement.api.identity import ROLES
from entitlement.v1 import activation_pb2

STRESS = os.environ.get("ENTITLEMENT_STRESS") == "1"
FUZZ_EXAMPLES = int(os.environ.get("ENTITLEMENT_FUZZ_EXAMPLES", 10_000 if STRESS else 40))
WIRE_EXAMPLES = int(os.environ.get("ENTITLEMENT_FUZZ_WIRE_EXAMPLES", 2_000 if STRESS else 40))
SEED = int(os.environ.get("ENTITLEMENT_FUZZ_SEED", "20260316"))
RPCS = fs.all_rpcs()
NEVER = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
STREAM_MESSAGES = 10  # server streams: read at most this many messages...
STREAM_IDLE_S = 0.2  # ...and stop waiting (cancel) when the next one takes longer than this
CALL_TIMEOUT_S = 15
PROGRAM = "programs/premium-job-seekers"
CALLER_IDS = sorted(REPRESENTATIVE.values())


def fuzz_settings(examples: int = FUZZ_EXAMPLES) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(scope="module", autouse=True)
def announce_seed() -> None:
    print(f"\nfuzz seed {SEED} ({FUZZ_EXAMPLES} requests and {WIRE_EXAMPLES} byte strings per RPC and "
          f"backend); reproduce with ENTITLEMENT_FUZZ_SEED={SEED}")


@pytest.fixture(scope="module")
def pool(harness: Harness) -> fs.Pool:
    """Valid requests and what the server answers: activations made here (a redeemed one, a
    suspended one among them), their names and tokens, programs, funders, months, events; and
    activation requests for people not yet activated, so that some generated calls succeed."""
    api = Api(harness)
    p = fs.Pool()

    def sent(caller: str, method: str, request: Any) -> Any:
        p.harvest(request)
        answer = getattr(api.as_(caller), method)(request)
        p.harvest(answer)
        return answer

    def activation_request(agency_id: str, birth: Any) -> activation_pb2.ActivateEntitlementRequest:
        return activation_pb2.ActivateEntitlementRequest(
            request_id=uuid.uuid4().hex, job_seeker=identity(agency_id, birth), program=PROGRAM,
            platform="platforms/openclassrooms", reason="fuzz")

    made = [sent("advisor-paris", "ActivateEntitlement", activation_request(*next_person())) for _ in range(4)]
    account = f"fuzz-{uuid.uuid4().hex[:12]}"
    sent("platform-oc", "RedeemActivationToken", activation_pb2.RedeemActivationTokenRequest(
        token=made[0].activation_token, account_id=account))
    sent("advisor-paris", "SuspendActivation", activation_pb2.TransitionActivationRequest(
        name=made[1].activation.name, reason="fuzz", request_id=uuid.uuid4().hex))
    sent("platform-oc", "VerifyEntitlement", activation_pb2.VerifyEntitlementRequest(account_id=account))
    for _ in range(4):  # valid, never sent: the fuzzer may send them
        p.harvest(activation_request(*next_person()))
    for rpc in RPCS:  # what every RPC answers to an empty request from a caller it allows
        allowed = sorted(REPRESENTATIVE[r] for r in ROLES.get(rpc.path, frozenset()) if r in REPRESENTATIVE)
        if allowed and not rpc.client_streaming:
            for answer in _answers(harness.channel, rpc, metadata(harness, allowed[0])):
                p.harvest(answer)
    p.strings.add(uuid.uuid4().hex)  # a fresh request_id
    return p


def _answers(channel: grpc.Channel, rpc: fs.Rpc, md: Any) -> list[Any]:
    try:
        if rpc.server_streaming:
            call = channel.unary_stream(rpc.path, request_serializer=rpc.request_class().SerializeToString,
                                        response_deserializer=rpc.response_class().FromString)(
                rpc.request_class()(), metadata=md, timeout=CALL_TIMEOUT_S)
            try:
                return [next(iter(call))]
            finally:
                call.cancel()
        return [channel.unary_unary(rpc.path, request_serializer=rpc.request_class().SerializeToString,
                                    response_deserializer=rpc.response_class().FromString)(
            rpc.request_class()(), metadata=md, timeout=CALL_TIMEOUT_S)]
    except (grpc.RpcError, StopIteration):
        return []


def metadata(h: Harness, caller: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {h.tokens[caller]}"),) if caller else ()


def callers(rpc: fs.Rpc) -> st.SearchStrategy[str | None]:
    """Mostly callers allowed to call the RPC (from the role table), sometimes anybody or nobody."""
    allowed = sorted(REPRESENTATIVE[r] for r in ROLES.get(rpc.path, frozenset()) if r in REPRESENTATIVE)
    anybody = st.sampled_from([*CALLER_IDS, None])
    return st.one_of(st.sampled_from(allowed), anybody) if allowed else anybody


def invoke(channel: grpc.Channel, rpc: fs.Rpc, request: Any, md: Any, *, raw: bool = False) -> Failure | None:
    """Call `rpc`; None when it answers OK, else the decoded error. `raw`: `request` is bytes
    sent as they are (for a client stream, a list of them)."""
    ser = None if raw else rpc.request_class().SerializeToString
    de = None if raw else rpc.response_class().FromString
    try:
        if rpc.client_streaming:
            channel.stream_unary(rpc.path, request_serializer=ser, response_deserializer=de)(
                iter(request), metadata=md, timeout=CALL_TIMEOUT_S)
        elif rpc.server_streaming:
            return _read_stream(channel.unary_stream(rpc.path, request_serializer=ser, response_deserializer=de)(
                request, metadata=md, timeout=CALL_TIMEOUT_S))
        else:
            channel.unary_unary(rpc.path, request_serializer=ser, response_deserializer=de)(
                request, metadata=md, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as err:
        return failure(err)
    return None


def _read_stream(call: Any) -> Failure | None:
    """A bounded read of a server stream; a stream we stop reading (it may run forever, like a
    change stream) is cancelled by us, which is no answer of the server's."""
    idle = threading.Timer(STREAM_IDLE_S, call.cancel)
    idle.start()
    try:
        for i, _ in enumerate(call, start=1):
            idle.cancel()
            if i >= STREAM_MESSAGES:
                return None
            idle = threading.Timer(STREAM_IDLE_S, call.cancel)
            idle.start()
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.CANCELLED and call.cancelled():
            return None
        return failure(err)
    finally:
        idle.cancel()
        call.cancel()
    return None


def check_answer(rpc: fs.Rpc, f: Failure | None, *, raw: bool = False) -> None:
    if f is None:
        return
    note(f"answer: {f.code.name} {f.reason} {f.message!r} fields={sorted(f.fields)}")
    assert f.code not in NEVER, f"{rpc.name} answered {f.code.name}: {f.message}"
    for text in (f.message, *f.fields.values()):
        assert not SQL_WORDS.search(text), f"SQL detail in the error of {rpc.name}: {text!r}"
    if f.code == grpc.StatusCode.INVALID_ARGUMENT:
        assert f.fields, f"{rpc.name}: INVALID_ARGUMENT without a BadRequest field violation: {f.message}"
        paths = fs.field_paths(rpc.method.input_type) | ({""} if raw else set())
        assert set(f.fields) <= paths, f"{rpc.name}: violations name {sorted(set(f.fields) - paths)}, not fields"
        assert all(f.fields.values()), f"{rpc.name}: a field violation without a description"


def assert_healthy(h: Harness) -> None:
    health = health_pb2_grpc.HealthStub(h.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    assert Api(h).admin.GetSigningKeys(activation_pb2.GetSigningKeysRequest()).jwks_json
    problems = doctor.check(h.ctx.db, leaves=False)
    assert not problems, problems[:5]


# ------------------------------------------------------------------------------------ coverage

def test_every_rpc_of_the_contract_is_fuzzed() -> None:
    """The fuzzed methods are the contract's: every `rpc` of the .proto sources, every method the
    role table knows. (The strategies come from the descriptors: nothing to add for a new RPC.)"""
    root = Path(__file__).resolve().parent.parent / "proto"
    declared = set()
    for proto in sorted(root.rglob("*.proto")):
        source = proto.read_text(encoding="utf-8")
        package = re.search(r"^package\s+([\w.]+);", source, re.M)
        for service, body in re.findall(r"^service\s+(\w+)\s*\{(.*?)^\}", source, re.M | re.S):
            for method in re.findall(r"^\s*rpc\s+(\w+)\s*\(", body, re.M):
                declared.add(f"/{package.group(1) if package else ''}.{service}/{method}".replace("/.", "/"))
    fuzzed = {r.path for r in RPCS}
    assert declared, "no rpc found in the proto sources"
    assert fuzzed == declared, {"not fuzzed": declared - fuzzed, "not in the protos": fuzzed - declared}
    assert fuzzed == set(ROLES)


def test_strategies_cover_every_field_kind() -> None:
    """The generated requests do set every field of every request message (nested ones too) and
    enum numbers outside their enum: the derivation misses nothing."""
    pool = fs.Pool(strings={"x"}, dates={(2000, 1, 1)})
    for rpc in RPCS:
        seen: set[str] = set()
        unknown_enum = not any(fd.enum_type for fd in _all_fields(rpc.method.input_type))

        @settings(max_examples=300, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(fs.messages(rpc.method.input_type, pool))
        def collect(msg: Any) -> None:
            nonlocal unknown_enum
            for path, fd, value in _set_fields(msg):
                seen.add(path)
                if fd.enum_type is not None and value not in fd.enum_type.values_by_number:
                    unknown_enum = True
        collect()
        expected = _leaf_paths(rpc.method.input_type)
        assert expected <= seen, f"{rpc.name}: never generated {sorted(expected - seen)}"
        assert unknown_enum, f"{rpc.name}: no enum number outside its enum was generated"


def _all_fields(d: Any, depth: int = 0) -> Iterator[Any]:
    for fd in d.fields:
        yield fd
        if fd.message_type is not None and depth < 3:
            yield from _all_fields(fd.message_type, depth + 1)


def _leaf_paths(d: Any, prefix: str = "", depth: int = 0) -> set[str]:
    out = set()
    for fd in d.fields:
        out.add(prefix + fd.name)
        if fd.message_type is not None and depth < 3 and not fd.message_type.GetOptions().map_entry:
            out |= _leaf_paths(fd.message_type, f"{prefix}{fd.name}.", depth + 1)
    return out


def _set_fields(msg: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    for fd, value in msg.ListFields():
        for v in (value if fd.is_repeated else [value]):
            yield prefix + fd.name, fd, v
            if fd.message_type is not None and not fd.message_type.GetOptions().map_entry:
                yield from _set_fields(v, f"{prefix}{fd.name}.")


# ---------------------------------------------------------------------------------- generated

@pytest.mark.parametrize("rpc", RPCS, ids=[r.name for r in RPCS])
def test_generated_requests_never_fail_internally(harness: Harness, pool: fs.Pool, rpc: fs.Rpc) -> None:
    @fuzz_settings()
    @seed(SEED)
    @given(request=fs.requests(rpc, pool), caller=callers(rpc))
    def fuzz(request: Any, caller: str | None) -> None:
        note(f"seed {SEED}, backend {harness.backend}, caller {caller}")
        check_answer(rpc, invoke(harness.channel, rpc, request, metadata(harness, caller)))

    fuzz()
    assert_healthy(harness)


ASCII = st.characters(min_codepoint=0x21, max_codepoint=0x7e)


def odd_metadata(h: Harness) -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    """Credentials and request ids as a confused or hostile client sends them."""
    token = st.sampled_from(sorted(h.tokens.values()))
    value = st.text(alphabet=ASCII, min_size=1, max_size=200)
    authorization = st.one_of(
        value, value.map(lambda v: f"Bearer {v}"), token.map(lambda t: f"bearer {t}"),
        token.map(lambda t: f"Bearer {t[:-1]}"), token.map(lambda t: f"Basic {t}"), st.just("Bearer"))
    return st.tuples(authorization, value).map(lambda av: (("authorization", av[0]), ("x-request-id", av[1])))


@pytest.mark.parametrize("rpc", RPCS, ids=[r.name for r in RPCS])
def test_odd_credentials_and_request_ids(harness: Harness, pool: fs.Pool, rpc: fs.Rpc) -> None:
    """Whatever the credentials metadata holds: UNAUTHENTICATED or an answer, never INTERNAL, and
    the bearer value is never echoed back."""
    @fuzz_settings(max(10, FUZZ_EXAMPLES // 10))
    @seed(SEED)
    @given(request=fs.requests(rpc, pool), md=odd_metadata(harness))
    def fuzz(request: Any, md: tuple[tuple[str, str], ...]) -> None:
        note(f"seed {SEED}, backend {harness.backend}, metadata {md}")
        f = invoke(harness.channel, rpc, request, md)
        check_answer(rpc, f)
        bearer = md[0][1].partition(" ")[2]
        if f is not None and len(bearer) >= 8 and bearer != md[1][1]:
            assert bearer not in f.message and bearer not in f.metadata.values()

    fuzz()
    assert_healthy(harness)


# ------------------------------------------------------------------------------- bytes on the wire

def wire_bytes(rpc: fs.Rpc, pool: fs.Pool) -> st.SearchStrategy[bytes]:
    """Random bytes, and generated requests serialized then truncated or with a byte changed."""
    def corrupt(data: bytes, cut: int, at: int, byte: int) -> bytes:
        if not data:
            return bytes([byte])
        data = data[: max(1, len(data) - cut)]
        i = at % len(data)
        return data[:i] + bytes([byte]) + data[i + 1:]
    serialized = fs.messages(rpc.method.input_type, pool).map(lambda m: m.SerializeToString())
    return st.one_of(st.binary(min_size=1, max_size=300),
                     st.builds(corrupt, serialized, st.integers(0, 8), st.integers(0, 10_000), st.integers(0, 255)))


@pytest.mark.parametrize("rpc", RPCS, ids=[r.name for r in RPCS])
def test_random_bytes_on_the_wire(harness: Harness, pool: fs.Pool, rpc: fs.Rpc) -> None:
    one = wire_bytes(rpc, pool)
    payloads = st.lists(one, min_size=1, max_size=3) if rpc.client_streaming else one

    @fuzz_settings(WIRE_EXAMPLES)
    @seed(SEED)
    @given(payload=payloads, caller=callers(rpc))
    def fuzz(payload: Any, caller: str | None) -> None:
        note(f"seed {SEED}, backend {harness.backend}, caller {caller}, payload {payload!r}")
        check_answer(rpc, invoke(harness.channel, rpc, payload, metadata(harness, caller), raw=True), raw=True)

    fuzz()
    assert_healthy(harness)


def test_undecodable_bytes_are_invalid_argument_after_the_caller_checks(harness: Harness) -> None:
    """Regression: gRPC answered INTERNAL ("Exception deserializing request!") to bytes that are no
    request message. Now: INVALID_ARGUMENT naming the request type, after authentication and the
    role check like any call, and logged with its request id."""
    rpc = next(r for r in RPCS if r.name == "GetActivation")
    garbage = b"\x0a\xff\xff\xff"  # field 1 (name), a length past the end of the bytes
    assert invoke(harness.channel, rpc, garbage, (), raw=True).code == grpc.StatusCode.UNAUTHENTICATED
    denied = invoke(harness.channel, rpc, garbage, metadata(harness, "platform-oc"), raw=True)
    assert denied is not None and denied.code == grpc.StatusCode.PERMISSION_DENIED
    trace = f"garbage-{uuid.uuid4().hex[:12]}"
    f = invoke(harness.channel, rpc, garbage, (*metadata(harness, "admin"), ("x-request-id", trace)), raw=True)
    assert f is not None and f.code == grpc.StatusCode.INVALID_ARGUMENT and f.reason == "INVALID_ARGUMENT"
    assert set(f.fields) == {""} and "entitlement.v1.GetActivationRequest" in f.fields[""]
    assert f.metadata["request_id"] == trace
    assert '"code": "INVALID_ARGUMENT"' in next(line for line in harness.log_path.read_text().splitlines()
                                              if trace in line and '"rpc"' in line)
    # Invalid UTF-8 in a string field is undecodable too; a valid message still works.
    bad_utf8 = b"\x0a\x02\xc3\x28"
    f = invoke(harness.channel, rpc, bad_utf8, metadata(harness, "admin"), raw=True)
    assert f is not None and f.code == grpc.StatusCode.INVALID_ARGUMENT
    f = invoke(harness.channel, rpc, rpc.request_class()(name="activations/" + "ab" * 16).SerializeToString(),
               metadata(harness, "admin"), raw=True)
    assert f is not None and f.code == grpc.StatusCode.NOT_FOUND
    # A client stream: the bad message is refused wherever it comes in the stream.
    push = next(r for r in RPCS if r.client_streaming)
    f = invoke(harness.channel, push, [garbage], metadata(harness, "admin"), raw=True)
    assert f is not None and f.code == grpc.StatusCode.INVALID_ARGUMENT and set(f.fields) == {""}


# ------------------------------------------------------------------- bugs the fuzzer found

def test_an_import_header_with_an_empty_extraction_date_is_invalid(harness: Harness) -> None:
    """Regression (fuzz, seed 99): a header whose `extracted_on` was set to an empty Date (0-0-0)
    passed validation and failed an assertion: INTERNAL."""
    push = next(r for r in RPCS if r.name == "ImportExtract")
    header = push.request_class()()
    header.header.extracted_on.SetInParent()
    f = invoke(harness.channel, push, [header], metadata(harness, "agency-feed"))
    assert f is not None and f.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(f.fields) == {"header.extracted_on"}
    f = invoke(harness.channel, push, [push.request_class()(header={})], metadata(harness, "agency-feed"))
    assert f is not None and f.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(f.fields) == {"header.extracted_on"}
