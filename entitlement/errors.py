"""Domain errors. The domain raises these; `api.errors` alone maps them to gRPC statuses (AIP-193).

Each error carries a stable UPPER_SNAKE reason and metadata (no personal data: values echoed back
are resource names and codes, never identities).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    reason: str = "ERROR"

    def __init__(self, message: str, *, reason: str | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason
        self.metadata = dict(metadata or {})


class InvalidArgument(DomainError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation], *, reason: str | None = None) -> None:
        fields = ", ".join(v.field for v in violations)
        first = violations[0].description if violations else "invalid request"
        message = f"invalid {fields}: {first}" if len(violations) == 1 else f"invalid fields {fields}"
        super().__init__(message, reason=reason, metadata={"fields": fields})
        self.violations = violations

    @classmethod
    def single(cls, field_name: str, description: str) -> "InvalidArgument":
        return cls([FieldViolation(field_name, description)])


class NotFound(DomainError):
    reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    reason = "FAILED_PRECONDITION"


class PermissionDenied(DomainError):
    reason = "PERMISSION_DENIED"


class Unauthenticated(DomainError):
    reason = "UNAUTHENTICATED"


class ResourceExhausted(DomainError):
    """With `retry_delay_s`, answered with a google.rpc.RetryInfo saying when to try again."""

    reason = "RESOURCE_EXHAUSTED"
    retry_delay_s: float | None = None


class RateLimited(ResourceExhausted):
    """Too many calls: answered with a google.rpc.RetryInfo saying when to try again."""

    reason = "RATE_LIMITED"

    def __init__(self, message: str, *, retry_delay_s: float, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_delay_s = retry_delay_s


class Aborted(DomainError):
    reason = "ABORTED"


class Unavailable(DomainError):
    reason = "UNAVAILABLE"


class Unimplemented(DomainError):
    reason = "NOT_IMPLEMENTED"


class DeadlineExceeded(DomainError):
    """The caller's deadline passed (or is too close to start a write): nothing was committed."""

    reason = "DEADLINE_EXCEEDED"
    database_wait = False  # True: a wait for the database (a lock) was cut short by the deadline


class Cancelled(DomainError):
    """The caller cancelled the call before its work was committed: nothing was."""

    reason = "CANCELLED"


@dataclass
class Violations:
    """Collects every field violation of a request before failing once (AIP-193 BadRequest)."""

    items: list[FieldViolation] = field(default_factory=list)

    def add(self, field_name: str, description: str) -> None:
        self.items.append(FieldViolation(field_name, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)
