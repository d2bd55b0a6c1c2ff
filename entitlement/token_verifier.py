"""Verify entitlement activation tokens on a platform, offline, in Python (PyNaCl + the standard library).

This one file is meant to be copied into a platform's code base as it is (or used from the
`entitlement[verify]` install): it imports nothing else from the service. It needs PyNaCl
(`pip install pynacl`, libsodium's Ed25519, about twice as fast as OpenSSL's on our machine, see
BENCHMARKS.md, section "tokens").

    verifier = TokenVerifier(jwks_json, issuer="urn:entitlement", platform_id="openclassrooms")
    try:
        claims = verifier.verify(token)
    except InvalidToken as exc:
        ...  # exc.reason: one of REASONS; UNKNOWN_KEY means "refresh the JWKS, then retry once"

`jwks_json` is what GetSigningKeys answers. Build the verifier once and keep it; refresh the JWKS
daily, and when a token names an unknown key (at most once a minute), with `update_jwks`.

What is checked, strictly, in this order (any failure raises InvalidToken, nothing else):

- the token is a str (or ASCII bytes) of at most `max_token_chars` characters (8 KiB), before
  any other work;
- compact JWS: exactly three non-empty segments of strict base64url (URL-safe alphabet, no
  padding, no whitespace, canonical: the unused bits of the last character are zero);
- header: a JSON object (UTF-8, no duplicate member names), `alg` exactly "EdDSA", `typ` exactly
  "entitlement-activation+jwt", `kid` a string naming a key of the JWKS, no `crit` and no `b64`
  (the service emits neither);
- the Ed25519 signature (64 bytes) over the ASCII bytes `header_b64 + "." + payload_b64`, with
  the key named by `kid` (JWKS keys: OKP / Ed25519 with a 32-byte `x`; others are ignored);
- payload: a JSON object (UTF-8, no duplicate member names, no NaN / Infinity) with `iss` equal
  to the issuer, `aud` the platform id (a string, or a list of strings that contains it, RFC 7519
  4.1.3), `sub`, `jti`, `program`, `entitlement` strings, `exp`, `nbf`, `iat` JSON integers (not
  booleans, floats or strings); `exp` after now - leeway, `nbf` and `iat` not after now + leeway.

Compared with PyJWT (README's alternative), this refuses more: duplicate member names (PyJWT keeps
the last), base64 padding (PyJWT tolerates trailing "="), `crit`/`b64` headers, non-integer time
claims (PyJWT applies int(): "1.9e9", 2e9, false pass there), non-string `program` /
`entitlement`, JSON that is not UTF-8 (PyJWT also reads UTF-16/32 and a BOM), NaN / Infinity,
and tokens over 8 KiB. tests/test_token_verifier.py checks it accepts exactly what PyJWT accepts
apart from these.
"""

from __future__ import annotations

import binascii
import json
import re
import time
from typing import Any, Dict, FrozenSet, List, Optional, Tuple, Union

from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

__all__ = ["TokenVerifier", "InvalidToken", "InvalidJWKS", "TOKEN_TYPE", "REASONS"]

TOKEN_TYPE = "entitlement-activation+jwt"
ALGORITHM = "EdDSA"
MAX_TOKEN_CHARS = 8192
DEFAULT_LEEWAY_S = 60

# InvalidToken.reason values.
MALFORMED = "MALFORMED"            # not a compact JWS of strict base64url / JSON objects, or too long
UNSUPPORTED = "UNSUPPORTED"        # header: alg, typ, crit or b64 not what the service emits
UNKNOWN_KEY = "UNKNOWN_KEY"        # kid not in the JWKS: refresh it (rate-limited), then refuse
BAD_SIGNATURE = "BAD_SIGNATURE"    # forged, tampered, or signed by another key
BAD_CLAIMS = "BAD_CLAIMS"          # a required claim missing or of the wrong type
WRONG_ISSUER = "WRONG_ISSUER"
WRONG_AUDIENCE = "WRONG_AUDIENCE"  # issued for another platform
EXPIRED = "EXPIRED"
NOT_YET_VALID = "NOT_YET_VALID"    # nbf or iat after now + leeway
REASONS = (MALFORMED, UNSUPPORTED, UNKNOWN_KEY, BAD_SIGNATURE, BAD_CLAIMS, WRONG_ISSUER,
           WRONG_AUDIENCE, EXPIRED, NOT_YET_VALID)

_STRING_CLAIMS = ("sub", "jti", "program", "entitlement")
_TIME_CLAIMS = ("exp", "nbf", "iat")
_HEADER_CACHE_MAX = 64


class InvalidToken(Exception):
    """A token that must be refused; `reason` is one of REASONS, the message says what was wrong."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class InvalidJWKS(ValueError):
    """A JWKS that cannot be used (not JSON, no usable Ed25519 key, the same kid twice)."""


# ------------------------------------------------------------------------------ strict decoding

# Three segments of the URL-safe alphabet. The signature (64 bytes) is 86 characters, the last one
# carrying 2 bits of data and 4 zero bits (A, Q, g or w). Header and payload are checked for
# canonical endings in _decode.
_COMPACT = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]{85}[AQgw])")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
# By length mod 4: the characters a segment may end with (its unused low bits zero); None: no
# length mod 4 of 1 is valid base64.
_CANONICAL_LAST = (None, frozenset(), frozenset("AQgw"), frozenset("AEIMQUYcgkosw048"))
_PADDING = (b"", b"", b"==", b"=")


def _decode(segment: str) -> bytes:
    """Strict base64url (the alphabet already checked): canonical, no padding."""
    rem = len(segment) & 3
    if rem:
        last = _CANONICAL_LAST[rem]
        if not last or segment[-1] not in last:
            raise InvalidToken(MALFORMED, "a segment is not canonical base64url")
    return binascii.a2b_base64(segment.encode("ascii").translate(_TO_STANDARD) + _PADDING[rem])


def _unique_members(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate member name")  # a classic JWS confusion: which one counts?
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_JSON = json.JSONDecoder(object_pairs_hook=_unique_members, parse_constant=_no_constant)


def _json_object(data: bytes, what: str) -> Dict[str, Any]:
    try:
        obj = _JSON.decode(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InvalidToken(MALFORMED, f"{what} is not UTF-8 JSON without duplicate names ({exc})") from None
    if type(obj) is not dict:
        raise InvalidToken(MALFORMED, f"{what} is not a JSON object")
    return obj


# ------------------------------------------------------------------------------ keys

class _KeySet:
    """Public keys by kid, and the header segments already seen verified with them."""

    __slots__ = ("keys", "headers")

    def __init__(self, keys: Dict[str, bytes]) -> None:
        self.keys = keys
        self.headers: Dict[str, bytes] = {}


def load_jwks(jwks: Union[str, bytes, Dict[str, Any]]) -> Dict[str, bytes]:
    """{kid: 32-byte Ed25519 public key} of a JWKS (JSON text or the parsed object). Keys that are
    not OKP / Ed25519 (or say another alg or use) are ignored; InvalidJWKS when none is left, when
    a kid appears twice, or when the JWKS is not a JSON object with a "keys" list."""
    if isinstance(jwks, (str, bytes)):
        try:
            jwks = json.loads(jwks, object_pairs_hook=_unique_members, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise InvalidJWKS(f"JWKS is not JSON: {exc}") from None
    listed = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(listed, list):
        raise InvalidJWKS('JWKS must be a JSON object with a "keys" list')
    keys: Dict[str, bytes] = {}
    for jwk in listed:
        if not (isinstance(jwk, dict) and jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519"
                and jwk.get("alg", ALGORITHM) == ALGORITHM and jwk.get("use", "sig") == "sig"):
            continue
        kid, x = jwk.get("kid"), jwk.get("x")
        if not isinstance(kid, str) or not kid or not isinstance(x, str) or not _B64URL.fullmatch(x):
            continue
        try:
            public = _decode(x)
        except (InvalidToken, binascii.Error):
            continue
        if len(public) != 32:
            continue
        if kid in keys:
            raise InvalidJWKS(f"kid {kid!r} appears twice in the JWKS")
        keys[kid] = public
    if not keys:
        raise InvalidJWKS("JWKS holds no usable Ed25519 key (kty OKP, crv Ed25519, 32-byte x, kid)")
    return keys


# ------------------------------------------------------------------------------ the verifier

class TokenVerifier:
    """Verifies activation tokens for one platform against one JWKS; thread-safe, keep it."""

    def __init__(self, jwks_json: Union[str, bytes, Dict[str, Any]], issuer: str, platform_id: str, *,
                 leeway_s: int = DEFAULT_LEEWAY_S, max_token_chars: int = MAX_TOKEN_CHARS) -> None:
        if not isinstance(issuer, str) or not issuer or not isinstance(platform_id, str) or not platform_id:
            raise ValueError("issuer and platform_id must be non-empty strings")
        if leeway_s < 0:
            raise ValueError("leeway_s cannot be negative")
        self.issuer = issuer
        self.platform_id = platform_id
        self.leeway_s = leeway_s
        self.max_token_chars = max_token_chars
        self._keyset = _KeySet(load_jwks(jwks_json))

    def update_jwks(self, jwks_json: Union[str, bytes, Dict[str, Any]]) -> None:
        """Replace the keys (a refreshed GetSigningKeys answer). A JWKS that cannot be used raises
        InvalidJWKS and leaves the keys in force. Tokens being verified meanwhile use one key set
        or the other, never a mix."""
        self._keyset = _KeySet(load_jwks(jwks_json))

    @property
    def kids(self) -> FrozenSet[str]:
        return frozenset(self._keyset.keys)

    def verify(self, token: Union[str, bytes], *, now: Optional[float] = None) -> Dict[str, Any]:
        """The token's claims once every check of the module doc has passed; InvalidToken otherwise.
        `now` (seconds since the epoch) defaults to time.time()."""
        if not isinstance(token, (str, bytes)):
            raise InvalidToken(MALFORMED, "token must be a str")
        # The length first: a request body of megabytes is refused before it is decoded or scanned.
        if len(token) > self.max_token_chars:
            raise InvalidToken(MALFORMED, f"token is longer than {self.max_token_chars} characters")
        if isinstance(token, bytes):
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                raise InvalidToken(MALFORMED, "token is not ASCII") from None
        match = _COMPACT.fullmatch(token)
        if match is None:
            raise InvalidToken(MALFORMED, "not a compact JWS of three base64url segments with a 64-byte signature")
        head, body, sig = match.groups()
        keyset = self._keyset  # one key set for the whole verification, whatever update_jwks does

        public = keyset.headers.get(head)
        if public is None:
            public = self._header_key(keyset, head)
        signing_input = token[: len(head) + 1 + len(body)].encode("ascii")
        try:
            crypto_sign_open(_decode(sig) + signing_input, public)
        except BadSignatureError:
            raise InvalidToken(BAD_SIGNATURE, "signature does not verify with the key named by kid") from None
        if len(keyset.headers) < _HEADER_CACHE_MAX:  # only headers the service signed get here
            keyset.headers[head] = public

        claims = _json_object(_decode(body), "payload")
        self._check_claims(claims, time.time() if now is None else now)
        return claims

    @staticmethod
    def _header_key(keyset: _KeySet, head: str) -> bytes:
        header = _json_object(_decode(head), "header")
        if header.get("alg") != ALGORITHM:
            raise InvalidToken(UNSUPPORTED, f"alg must be {ALGORITHM}")
        if header.get("typ") != TOKEN_TYPE:
            raise InvalidToken(UNSUPPORTED, f"typ must be {TOKEN_TYPE}")
        if "crit" in header or "b64" in header:
            raise InvalidToken(UNSUPPORTED, "crit and b64 headers are not accepted")
        kid = header.get("kid")
        if type(kid) is not str:
            raise InvalidToken(MALFORMED, "kid must be a string")
        public = keyset.keys.get(kid)
        if public is None:
            raise InvalidToken(UNKNOWN_KEY, "kid is not in the JWKS: refresh it, then refuse")
        return public

    def _check_claims(self, claims: Dict[str, Any], now: float) -> None:
        try:
            iss, aud = claims["iss"], claims["aud"]
            exp, nbf, iat = claims["exp"], claims["nbf"], claims["iat"]
            strings = [claims[name] for name in _STRING_CLAIMS]
        except KeyError as exc:
            raise InvalidToken(BAD_CLAIMS, f"claim {exc.args[0]} is missing") from None
        if iss is None or aud is None:  # null is missing (RFC 7519 has no null claims; PyJWT agrees)
            raise InvalidToken(BAD_CLAIMS, f"claim {'iss' if iss is None else 'aud'} is missing")
        for name, value in zip(_STRING_CLAIMS, strings):
            if type(value) is not str:
                raise InvalidToken(BAD_CLAIMS, f"claim {name} must be a string")
        if type(exp) is not int or type(nbf) is not int or type(iat) is not int:
            raise InvalidToken(BAD_CLAIMS, "claims exp, nbf and iat must be integers")
        if iss != self.issuer or type(iss) is not str:
            raise InvalidToken(WRONG_ISSUER, "token was issued by another issuer")
        if aud != self.platform_id and not (type(aud) is list and self.platform_id in aud
                                            and all(type(a) is str for a in aud)):
            raise InvalidToken(WRONG_AUDIENCE, "token was issued for another platform")
        if exp <= now - self.leeway_s:
            raise InvalidToken(EXPIRED, "token has expired")
        if nbf > now + self.leeway_s:
            raise InvalidToken(NOT_YET_VALID, "token is not valid yet (nbf)")
        if iat > now + self.leeway_s:
            raise InvalidToken(NOT_YET_VALID, "token was issued in the future (iat)")
