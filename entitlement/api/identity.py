"""Who calls, and may they call this method: one interceptor resolves the caller from the bearer
token in the `authorization` metadata (or, under mutual TLS, from a platform's client certificate),
checks the role table, and hands the caller to handlers.

Authorization is deny-by-default: a method of our package that is missing from ROLES is refused
for everybody. ROLES is the one map RPC -> roles; what a caller may see within an allowed RPC (its
agency, its platform's accounts, the programs it funds) is applied in the use cases' queries.
Health and reflection (other packages) need no credentials.

UNAUTHENTICATED: no credentials, a bad, expired or revoked token, or a token and a certificate
naming different callers. PERMISSION_DENIED: a known caller calling outside its role.

Client certificates (mutual TLS, ENTITLEMENT_TLS_CLIENT_CA_FILE): the certificate names a caller by
a URI subject alternative name `urn:entitlement:caller:<caller id>`, or else by its subject common
name (CN) = the caller id. When that caller is a platform with a usable credential, a call without
a bearer token is that platform's; a call with a token must name the same caller. Certificates of
other roles only secure the channel (they still send their token).
"""

from __future__ import annotations

import contextvars
import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import grpc

from entitlement import logs
from entitlement.api.wrapping import BehaviorInterceptor, Handler
from entitlement.callers import Caller, Directory
from entitlement.errors import PermissionDenied, Unauthenticated
from entitlement.tls import CALLER_URI_PREFIX

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
    "/entitlement.v1.ActivationService/ReissueActivationToken": ADVISOR,
    "/entitlement.v1.ActivationService/RedeemActivationToken": frozenset({"platform"}),
    "/entitlement.v1.ActivationService/VerifyEntitlement": frozenset({"platform"}),
    "/entitlement.v1.ActivationService/GetSigningKeys": ALL,
    "/entitlement.v1.ActivationService/ReportUsage": frozenset({"platform"}),
    "/entitlement.v1.ActivationService/WatchEntitlementChanges": frozenset({"platform"}),
    "/entitlement.v1.AuditService/ListActivations": FUNDER,
    "/entitlement.v1.AuditService/GetFundingReport": FUNDER,
    "/entitlement.v1.AuditService/ListEvents": FUNDER,
    "/entitlement.v1.AuditService/GetCheckpoint": FUNDER,
    "/entitlement.v1.AuditService/GetInclusionProof": FUNDER,
    "/entitlement.v1.AuditService/GetConsistencyProof": FUNDER,
    "/entitlement.v1.AuditService/StreamEvents": FUNDER,
    "/entitlement.v1.RegistryService/ImportExtract": frozenset({"agency", "admin"}),
}

_NO_ROLE: frozenset[str] = frozenset()  # a method missing from ROLES: refused to every role

_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)
# For the calls that stream their responses: the caller authenticated again, with the call's own
# credentials (see `caller_check`).
_recheck: contextvars.ContextVar[Callable[[], Caller] | None] = contextvars.ContextVar("recheck", default=None)


def current_caller() -> Caller:
    caller = _caller.get()
    if caller is None:  # only reachable if a method bypassed the interceptor
        raise Unauthenticated("missing credentials", reason="CREDENTIALS_MISSING")
    return caller


def caller_check() -> Callable[[], Caller]:
    """For a call that streams its responses for as long as its caller wishes (a change stream):
    a function that authenticates the call's credentials again and raises UNAUTHENTICATED once they
    no longer hold (revoked, expired, rotated out: within the caller cache's time, as a new call
    would be refused). Checked only when the call started, a stream opened before a revocation
    went on streaming for ever (found by a review). Take it at the start of the handler."""
    check = _recheck.get()
    if check is None:  # only reachable if a method bypassed the interceptor
        raise Unauthenticated("missing credentials", reason="CREDENTIALS_MISSING")
    return check


def bearer(metadata: tuple[Any, ...] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


def certificate_caller_id(pem: bytes) -> str:
    """The caller id a client certificate names: its URI SAN `urn:entitlement:caller:ID`, else its
    subject CN; "" when it names none."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith(CALLER_URI_PREFIX):
                return uri[len(CALLER_URI_PREFIX):]
    except x509.ExtensionNotFound:
        pass
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


class _CertificateNames:
    """PEM of a verified client certificate -> caller id, remembered (parsing costs ~50 us)."""

    def __init__(self, size: int = 1024) -> None:
        self._names: OrderedDict[bytes, str] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def __call__(self, context: grpc.ServicerContext) -> str:
        try:
            pems = context.auth_context().get("x509_pem_cert") or []
        except (AttributeError, NotImplementedError):
            return ""
        if not pems:
            return ""
        pem = pems[0]
        with self._lock:
            name = self._names.get(pem)
        if name is None:
            try:
                name = certificate_caller_id(pem)
            except ValueError:
                name = ""
            with self._lock:
                self._names[pem] = name
                while len(self._names) > self._size:
                    self._names.popitem(last=False)
        return name


class CallerInterceptor(BehaviorInterceptor):
    def __init__(self, callers: Directory, *, client_certificates: bool = True) -> None:
        """`client_certificates`: whether calls may carry a verified client certificate (mutual
        TLS); without, their auth context is not read at all."""
        self.callers = callers
        self._certificate_name = _CertificateNames()
        self._client_certificates = client_certificates

    def _certificate_caller(self, context: grpc.ServicerContext) -> Caller | None:
        """The platform caller the verified client certificate names, if any (mutual TLS only:
        without a client CA the server asks for no certificate)."""
        if not self._client_certificates:
            return None
        name = self._certificate_name(context)
        if not name:
            return None
        caller = self.callers.by_id(name)
        return caller if caller is not None and caller.role == "platform" else None

    def authenticate(self, metadata: tuple[Any, ...] | None, context: grpc.ServicerContext) -> Caller:
        token = bearer(metadata)
        by_certificate = self._certificate_caller(context) if self._client_certificates else None
        if token is None:
            if by_certificate is not None:
                return by_certificate
            raise Unauthenticated("missing credentials: send metadata 'authorization: Bearer <token>'",
                                  reason="CREDENTIALS_MISSING")
        caller = self.callers.authenticate(token)
        if by_certificate is not None and by_certificate.id != caller.id:
            raise Unauthenticated("the bearer token and the client certificate name different callers",
                                  reason="CREDENTIALS_MISMATCH")
        return caller

    def applies_to(self, method: str) -> bool:
        return method.startswith(PACKAGE)

    def scope(self, method: str, metadata: tuple[Any, ...] | None,
              context: grpc.ServicerContext) -> AbstractContextManager[None]:
        """Authenticates and authorizes now (refusing the call); the block runs as the caller."""
        if not method.startswith(PACKAGE):
            return _NOTHING
        allowed = ROLES.get(method, _NO_ROLE)
        caller = self._admit(method, allowed, metadata, context)

        def recheck() -> Caller:
            return self._admit(method, allowed, metadata, context)
        return _AsCaller(caller, recheck)

    def around_unary(self, fn: Handler, method: str) -> Handler:
        """What `scope` does, in the call's own frame (every call of ours goes through it)."""
        if not method.startswith(PACKAGE):
            return fn
        allowed = ROLES.get(method, _NO_ROLE)
        admit = self._admit

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            reset = _caller.set(admit(method, allowed, context.invocation_metadata(), context))
            try:
                return fn(request, context)
            finally:
                _caller.reset(reset)
        return unary

    def _admit(self, method: str, allowed: frozenset[str], metadata: tuple[Any, ...] | None,
               context: grpc.ServicerContext) -> Caller:
        """The caller of this call, when it may call `method` (whose roles are `allowed`)."""
        caller = self.authenticate(metadata, context)
        # Bound before the role check, so a refused call's log lines say who was refused.
        logs.bind_caller(caller.id, caller.role)
        if caller.role not in allowed:
            raise PermissionDenied(f"role {caller.role} may not call {method.rsplit('/', 1)[-1]}",
                                   reason="ROLE_NOT_ALLOWED", metadata={"role": caller.role})
        return caller


class _AsCaller:
    """The block runs with `current_caller()` = caller (a class, not a generator; the calls that
    stream their responses: `around_unary` binds it for the others)."""

    __slots__ = ("_caller", "_recheck", "_reset", "_reset_recheck")

    def __init__(self, caller: Caller, recheck: Callable[[], Caller]) -> None:
        self._caller = caller
        self._recheck = recheck

    def __enter__(self) -> None:
        self._reset = _caller.set(self._caller)
        self._reset_recheck = _recheck.set(self._recheck)

    def __exit__(self, *exc: object) -> None:
        _recheck.reset(self._reset_recheck)
        _caller.reset(self._reset)


_NOTHING = nullcontext()
