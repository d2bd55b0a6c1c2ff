"""The one place where domain errors become gRPC statuses (AIP-193): canonical code, short message,
ErrorInfo (reason, domain, metadata) and BadRequest field violations."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from entitlement import errors as e

DOMAIN = "entitlement.v1"

CODES: dict[type[e.DomainError], grpc.StatusCode] = {
    e.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    e.NotFound: grpc.StatusCode.NOT_FOUND,
    e.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    e.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    e.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    e.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    e.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.Aborted: grpc.StatusCode.ABORTED,
    e.Unavailable: grpc.StatusCode.UNAVAILABLE,
    e.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    e.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    e.Cancelled: grpc.StatusCode.CANCELLED,
}


def code_of(err: e.DomainError) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        if cls in CODES:
            return CODES[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


def _pack(msg: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)  # type: ignore[arg-type]
    return packed


def to_status(code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str],
              violations: list[e.FieldViolation] | None = None,
              retry_delay_s: float | None = None) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)
    details = [_pack(info)]
    if retry_delay_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(int(retry_delay_s * 1e9), 1_000_000))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    if violations:
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in violations])))
    return rpc_status.to_status(status_pb2.Status(
        code=getattr(code_pb2, code.name), message=message, details=details))


def domain_status(err: e.DomainError, request_id: str) -> tuple[grpc.StatusCode, grpc.Status]:
    code = code_of(err)
    violations = err.violations if isinstance(err, e.InvalidArgument) else None
    retry = err.retry_delay_s if isinstance(err, e.ResourceExhausted) else None
    return code, to_status(code, err.message, err.reason, {**err.metadata, "request_id": request_id}, violations,
                           retry)


def internal_status(request_id: str) -> grpc.Status:
    return to_status(grpc.StatusCode.INTERNAL,
                     f"internal error; quote request_id {request_id} to the operators",
                     "INTERNAL", {"request_id": request_id})


DATABASE_RETRY_DELAY_S = 1.0  # RetryInfo of DATABASE_UNAVAILABLE: about the health monitor's ping interval


def unavailable_status(request_id: str) -> grpc.Status:
    """The database is down, unreachable, or locked for longer than the wait bound (or the call's
    deadline): nothing was done (or, for a write whose commit was cut off, retrying with the same
    request_id returns its outcome)."""
    return to_status(grpc.StatusCode.UNAVAILABLE, "the database is unavailable; retry with backoff",
                     "DATABASE_UNAVAILABLE", {"request_id": request_id}, retry_delay_s=DATABASE_RETRY_DELAY_S)
