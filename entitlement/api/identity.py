"""Who calls, and may they call this method: one interceptor resolves the caller from the bearer
token in the `authorization` metadata, checks the role table, and hands the caller to handlers.

Authorization is deny-by-default: a method of our package that is missing from ROLES is refused
for everybody. Health and reflection (other packages) need no credentials.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import structlog

from entitlement.api.wrapping import BehaviorInterceptor
from entitlement.callers import Caller, CallerDirectory
from entitlement.errors import PermissionDenied, Unauthenticated

PACKAGE = "/entitlement.v1."
ALL = frozenset({"platform", "advisor", "funder", "agency", "admin"})
ADVISOR = frozenset({"advisor", "admin"})
PLATFORM = frozenset({"platform", "admin"})
FUNDER = frozenset({"funder", "admin"})

ROLES: dict[str, frozenset[str]] = {
    "/entitlement.v1.EligibilityService/CheckEligibility": ADVISOR,
    "/entitlement.v1.EligibilityService/ListPrograms": ALL,
    "/entitlement.v1.ActivationService/ActivateEntitlement": ADVISOR,
    "/entitlement.v1.ActivationService/GetActivation": ADVISOR,
    "/entitlement.v1.ActivationService/SuspendActivation": ADVISOR,
    "/entitlement.v1.ActivationService/ResumeActivation": ADVISOR,
    "/entitlement.v1.ActivationService/RevokeActivation": ADVISOR,
    "/entitlement.v1.ActivationService/RedeemActivationToken": frozenset({"platform"}),
    "/entitlement.v1.ActivationService/VerifyEntitlement": frozenset({"platform"}),
    "/entitlement.v1.ActivationService/GetSigningKeys": ALL,
    "/entitlement.v1.ActivationService/ReportUsage": frozenset({"platform"}),
    "/entitlement.v1.ActivationService/WatchEntitlementChanges": frozenset({"platform"}),
    "/entitlement.v1.AuditService/ListActivations": FUNDER,
    "/entitlement.v1.AuditService/GetFundingReport": FUNDER,
    "/entitlement.v1.AuditService/ListEvents": FUNDER,
    "/entitlement.v1.RegistryService/ImportExtract": frozenset({"agency", "admin"}),
}

_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


def current_caller() -> Caller:
    caller = _caller.get()
    if caller is None:  # only reachable if a method bypassed the interceptor
        raise Unauthenticated("missing credentials", reason="CREDENTIALS_MISSING")
    return caller


def bearer(metadata: tuple[Any, ...] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


class CallerInterceptor(BehaviorInterceptor):
    def __init__(self, callers: CallerDirectory) -> None:
        self.callers = callers

    @contextmanager
    def scope(self, method: str, metadata: tuple[Any, ...] | None,
              context: grpc.ServicerContext) -> Iterator[None]:
        if not method.startswith(PACKAGE):
            yield
            return
        token = bearer(metadata)
        if token is None:
            raise Unauthenticated("missing credentials: send metadata 'authorization: Bearer <token>'",
                                  reason="CREDENTIALS_MISSING")
        caller = self.callers.resolve(token) if token else None
        if caller is None:
            raise Unauthenticated("invalid credentials", reason="CREDENTIALS_INVALID")
        # Bound before the role check, so a refused call's log lines say who was refused.
        structlog.contextvars.bind_contextvars(caller=caller.id, role=caller.role)
        allowed = ROLES.get(method, frozenset())
        if caller.role not in allowed:
            raise PermissionDenied(f"role {caller.role} may not call {method.rsplit('/', 1)[-1]}",
                                   reason="ROLE_NOT_ALLOWED", metadata={"role": caller.role})
        reset = _caller.set(caller)
        try:
            yield
        finally:
            _caller.reset(reset)
