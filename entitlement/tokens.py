"""Activation tokens: compact JWS, EdDSA over Ed25519, signed by keys from a key store.

PyJWT (>= 2.13) does the JOSE work; we add what a library cannot know: which key ids exist
(a `kid` is only ever looked up in our own key set, never used as a path), which algorithm we
accept (EdDSA only, whatever the token header says), our token type, and required claims.

Key store: a folder (ENTITLEMENT_KEY_DIR) kept apart from the database, one PKCS#8 PEM per key
named `{kid}.pem` (mode 0600). The newest key signs; every key in the folder is published in the
JWKS, so a rotated-out key keeps verifying the tokens it signed until it is removed.
Publication-before-signing and retirement are refined in step 4.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

TOKEN_TYPE = "entitlement-activation+jwt"
ALGORITHM = "EdDSA"
KID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
REQUIRED_CLAIMS = ["iss", "aud", "sub", "exp", "nbf", "iat", "jti", "program", "entitlement"]


class TokenError(Exception):
    """A token we cannot accept. `reason` is TOKEN_INVALID, TOKEN_EXPIRED or TOKEN_WRONG_AUDIENCE."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: Ed25519PrivateKey
    created: float  # file mtime: newest signs

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    def jwk(self) -> dict[str, str]:
        raw = self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.kid, "alg": ALGORITHM, "use": "sig"}


class KeyStore:
    def __init__(self, keys: list[SigningKey]) -> None:
        if not keys:
            raise ValueError("no signing key")
        self._keys = {k.kid: k for k in keys}
        self._signer = max(keys, key=lambda k: (k.created, k.kid))

    @classmethod
    def load(cls, directory: Path, *, create: bool = False) -> "KeyStore":
        directory.mkdir(parents=True, exist_ok=True) if create else None
        if create and not any(directory.glob("*.pem")):
            generate_key(directory)
        keys = []
        for pem in sorted(directory.glob("*.pem")):
            kid = pem.stem
            if not KID_RE.fullmatch(kid):
                raise SystemExit(f"key file {pem}: name must be KID.pem with KID of 8-64 [A-Za-z0-9_-]")
            key = serialization.load_pem_private_key(pem.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise SystemExit(f"key file {pem}: not an Ed25519 private key")
            keys.append(SigningKey(kid, key, pem.stat().st_mtime))
        if not keys:
            raise SystemExit(f"no signing key in {directory}; create one with `entitlement keys create`")
        return cls(keys)

    @property
    def signer(self) -> SigningKey:
        return self._signer

    def get(self, kid: str) -> SigningKey | None:
        return self._keys.get(kid)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self._keys[k].jwk() for k in sorted(self._keys)]}

    def jwks_json(self) -> str:
        return json.dumps(self.jwks(), sort_keys=True, separators=(",", ":"))


def generate_key(directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    kid = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d") + "-" + secrets.token_hex(4)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(directory / f"{kid}.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return kid


@dataclass(frozen=True)
class TokenClaims:
    issuer: str
    platform_id: str
    subject: str
    program_id: str
    activation_id: str
    jti: str
    issued_at: int
    not_before: int
    expires_at: int


def sign(keys: KeyStore, claims: TokenClaims) -> str:
    payload = {"iss": claims.issuer, "aud": claims.platform_id, "sub": claims.subject,
               "program": claims.program_id, "entitlement": claims.activation_id, "jti": claims.jti,
               "iat": claims.issued_at, "nbf": claims.not_before, "exp": claims.expires_at}
    key = keys.signer
    return jwt.encode(payload, key.private, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": TOKEN_TYPE})


def verify(keys: KeyStore, token: str, *, issuer: str, audience: str, now: dt.datetime) -> TokenClaims:
    """Verify signature, type, issuer, audience and validity period; EdDSA only."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise TokenError("TOKEN_INVALID", "token is not a compact JWS") from None
    if header.get("alg") != ALGORITHM:
        raise TokenError("TOKEN_INVALID", f"token algorithm must be {ALGORITHM}")
    if header.get("typ") != TOKEN_TYPE:
        raise TokenError("TOKEN_INVALID", f"token type must be {TOKEN_TYPE}")
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise TokenError("TOKEN_INVALID", "token signed with an unknown key")
    try:
        claims = jwt.decode(token, key.public, algorithms=[ALGORITHM], audience=audience, issuer=issuer,
                            # Time claims are checked below against the service clock, not PyJWT's.
                            options={"require": REQUIRED_CLAIMS, "verify_exp": False,
                                     "verify_nbf": False, "verify_iat": False})
    except jwt.InvalidAudienceError:
        raise TokenError("TOKEN_WRONG_AUDIENCE", "token was issued for another platform") from None
    except jwt.PyJWTError as exc:
        raise TokenError("TOKEN_INVALID", f"token rejected: {exc}") from None
    ts = int(now.timestamp())
    for name in ("exp", "nbf", "iat"):
        if not isinstance(claims[name], int) or isinstance(claims[name], bool):
            raise TokenError("TOKEN_INVALID", f"token claim {name} must be an integer")
    if claims["exp"] <= ts:
        raise TokenError("TOKEN_EXPIRED", "token has expired")
    if claims["nbf"] > ts:
        raise TokenError("TOKEN_INVALID", "token is not valid yet")
    return TokenClaims(claims["iss"], claims["aud"], claims["sub"], claims["program"], claims["entitlement"],
                       claims["jti"], claims["iat"], claims["nbf"], claims["exp"])


def decode_unverified(token: str) -> dict[str, Any]:
    """For display only (CLI): the payload without any check."""
    try:
        part = token.split(".")[1]
        return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))
    except (IndexError, ValueError):
        return {}
