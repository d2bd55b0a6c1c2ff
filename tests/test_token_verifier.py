"""entitlement/token_verifier.py, the verifier recommended to platforms, against PyJWT.

The reference is README's PyJWT `TokenVerifier` (the copy bench/tokens.py times). Differential:
the new verifier accepts a token exactly when PyJWT's does, except where it is deliberately
stricter, each case listed in `documented_stricter` (and in the module's doc); it never accepts a
token PyJWT refuses. Tokens are signed by the service's code (entitlement.tokens.sign) with a key
of a real key store; the hand-made headers and payloads below are signed with that same key, so
they reach the checks after the signature. Then: every kind of bad token refused with its
reason, the leeway, JWKS loading and refresh, a token and JWKS from the real RPCs, and the file
imported alone (what a platform copying it gets).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import tokens as bt
from entitlement import token_verifier as tv
from entitlement import tokens
from entitlement.token_verifier import InvalidJWKS, InvalidToken, TokenVerifier
from entitlement.v1 import activation_pb2
from support import Api, Harness

ISSUER, PLATFORM, TYP = bt.ISSUER, bt.PLATFORM, tokens.TOKEN_TYPE
HOUR = 3600
# Every example keeps its time claims at least this far from the clock, so that the two
# verifiers (each reading the clock itself) never disagree on a boundary.
MARGIN = 120
PROPERTY = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@dataclasses.dataclass
class World:
    now: dt.datetime
    store: tokens.KeyStore
    signer: tokens.SigningKey
    other: tokens.SigningKey  # a key of another store: not in the JWKS
    jwks: str
    pyjwt: bt.TokenVerifier
    ours: TokenVerifier


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> World:
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    store = tokens.KeyStore.load(tmp_path_factory.mktemp("verifier") / "keys", create=True, now=now)
    other = tokens.KeyStore.load(tmp_path_factory.mktemp("verifier-other") / "keys", create=True, now=now)
    jwks = store.jwks_json(now)
    return World(now, store, store.signer(now), other.signer(now), jwks, bt.TokenVerifier(jwks, ISSUER, PLATFORM),
                 TokenVerifier(jwks, ISSUER, PLATFORM))  # both allow 60 s, README's PyJWT code as ours


# ------------------------------------------------------------------------------ making tokens

def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def claims(**changes: Any) -> tokens.TokenClaims:
    t = int(time.time()) - 1
    fields: dict[str, Any] = dict(issuer=ISSUER, platform_id=PLATFORM, subject="sub-" + "ab" * 16,
                                  program_id="premium-job-seekers", activation_id="0123456789abcdef" * 2,
                                  jti="jti-" + "cd" * 14, issued_at=t, not_before=t, expires_at=t + 30 * 86400)
    fields.update(changes)
    return tokens.TokenClaims(**fields)


def real(w: World, **changes: Any) -> str:
    """A token from the service's own signing code."""
    return tokens.sign(w.store, claims(**changes), now=w.now)


def payload_of(token: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(unb64(token.split(".")[1]))
    return result


def header(w: World, **changes: Any) -> dict[str, Any]:
    h = {"alg": "EdDSA", "kid": w.signer.kid, "typ": TYP}
    h.update(changes)
    return {k: v for k, v in h.items() if v is not DROP}


DROP = object()


def jws(w: World, head: dict[str, Any] | bytes, body: dict[str, Any] | bytes, *,
        key: Ed25519PrivateKey | None = None, head_b64: str | None = None, body_b64: str | None = None) -> str:
    """A compact JWS over any header and payload (JSON objects, or raw bytes to write duplicate
    names, other encodings, ...) signed with our key (or `key`), over the segments as written."""
    h = head_b64 if head_b64 is not None else b64(head if isinstance(head, bytes) else json.dumps(head).encode())
    p = body_b64 if body_b64 is not None else b64(body if isinstance(body, bytes) else json.dumps(body).encode())
    sig = (key or w.signer.private).sign(f"{h}.{p}".encode())
    return f"{h}.{p}.{b64(sig)}"


def signed(w: World, **payload_changes: Any) -> str:
    """A real token's payload with claims changed (DROP removes one), re-signed with our key."""
    body = payload_of(real(w))
    body.update(payload_changes)
    return jws(w, header(w), {k: v for k, v in body.items() if v is not DROP})


def raw_payload(w: World, text: str) -> str:
    """A token whose payload is this exact JSON text (UTF-8), signed with our key."""
    return jws(w, header(w), text.encode())


def real_payload_text(w: World) -> str:
    return unb64(real(w).split(".")[1]).decode()


# ------------------------------------------------------------------------------ the two verdicts

@dataclasses.dataclass
class Verdict:
    pyjwt: dict[str, Any] | None  # the claims, None when refused
    ours: dict[str, Any] | None
    reason: str | None  # ours, when refused


def both(w: World, token: str) -> Verdict:
    try:
        theirs: dict[str, Any] | None = w.pyjwt.verify(token)
    except jwt.InvalidTokenError:
        theirs = None
    try:
        return Verdict(theirs, w.ours.verify(token), None)
    except InvalidToken as exc:
        assert exc.reason in tv.REASONS
        return Verdict(theirs, None, exc.reason)


def documented_stricter(token: str) -> str | None:
    """Why the new verifier may refuse a token PyJWT accepts: the cases of its module doc, found
    here by reading the token independently. None: no such case, the two must agree."""
    if len(token) > tv.MAX_TOKEN_CHARS:
        return "longer than 8 KiB"
    if "=" in token:
        return "base64 padding"
    try:
        head, body = (unb64(s) for s in token.split(".")[:2])
    except ValueError:
        return None
    found: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in items}) != len(items):
            found.append("duplicate member names")
        return dict(items)

    def constant(name: str) -> float:
        found.append("NaN or Infinity")
        return float(name)

    parsed = []
    for raw in (head, body):
        try:
            raw.decode("utf-8")
            if raw.startswith(b"\xef\xbb\xbf"):
                raise UnicodeError
        except UnicodeError:
            return "JSON not in UTF-8"
        try:
            parsed.append(json.loads(raw, object_pairs_hook=pairs, parse_constant=constant))
        except (ValueError, RecursionError):
            return None
    if found:
        return found[0]
    h, p = parsed
    if isinstance(h, dict) and ("crit" in h or "b64" in h):
        return "crit or b64 header"
    if isinstance(p, dict):
        if any(name in p and type(p[name]) is not int for name in ("exp", "nbf", "iat")):
            return "time claim not a JSON integer"
        if any(name in p and type(p[name]) is not str for name in ("program", "entitlement")):
            return "program or entitlement not a string"
    return None


def assert_agree(w: World, token: str) -> Verdict:
    """The differential rule; returns the verdict for more checks."""
    v = both(w, token)
    if v.ours is not None:
        assert v.pyjwt is not None, f"accepted a token PyJWT refuses: {token!r}"
        assert v.ours == v.pyjwt
    elif v.pyjwt is not None:
        assert documented_stricter(token), f"refused ({v.reason}) a token PyJWT accepts, no documented case: {token!r}"
    return v


# ------------------------------------------------------------------------------ every kind of token

ACCEPT = "accepted by both"
Case = tuple[str, Callable[[World], str], str, str | None]  # name, token, who refuses, our reason


def _swap(token: str, i: int, j: int) -> str:
    s = token.split(".")
    s[i], s[j] = s[j], s[i]
    return ".".join(s)


def _flip(token: str, segment: int) -> str:
    s = token.split(".")
    m = len(s[segment]) // 2
    s[segment] = s[segment][:m] + ("A" if s[segment][m] != "A" else "B") + s[segment][m + 1:]
    return ".".join(s)


def _noncanonical(segment: str) -> str:
    """The same bytes with nonzero unused bits in the last character (PyJWT refuses it too)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    assert len(segment) % 4 in (2, 3)
    return segment[:-1] + alphabet[alphabet.index(segment[-1]) + 1]


def _short_sig(w: World, size: int) -> str:
    h, p, s = real(w).split(".")
    return f"{h}.{p}.{b64(unb64(s)[:size] if size <= 64 else unb64(s) + bytes(size - 64))}"


def _hs256(w: World) -> str:
    import hmac
    h, p = b64(json.dumps(header(w, alg="HS256")).encode()), real(w).split(".")[1]
    x = unb64(json.loads(w.jwks)["keys"][0]["x"])
    return f"{h}.{p}.{b64(hmac.new(x, f'{h}.{p}'.encode(), 'sha256').digest())}"


def _edit(token: str, change: Callable[[str], str]) -> str:
    return change(token)


def _segment_of_length(make: Callable[[int], bytes], rems: tuple[int, ...]) -> str:
    """b64 of make(n) for the first n that gives a segment length mod 4 in rems."""
    return next(s for s in (b64(make(n)) for n in range(4)) if len(s) % 4 in rems)


def _padded(make: Callable[[int], bytes]) -> str:
    s = _segment_of_length(make, (2, 3))
    return s + "=" * (-len(s) % 4)


def _unpadded(make: Callable[[int], bytes]) -> str:
    return _segment_of_length(make, (2, 3))


def _at(offset: int) -> int:
    return int(time.time()) + offset


CASES: list[Case] = [
    ("from tokens.sign", real, ACCEPT, None),
    ("re-signed by hand, same claims", lambda w: signed(w), ACCEPT, None),
    ("unicode claims", lambda w: real(w, subject="sujet-é-漢字-\U0001f600", jti="jti-ü"), ACCEPT, None),
    ("aud a list that holds the platform", lambda w: signed(w, aud=["other", PLATFORM]), ACCEPT, None),
    ("JSON with spaces around", lambda w: raw_payload(w, " \n" + real_payload_text(w) + " \t"), ACCEPT, None),
    ("extra claims and headers", lambda w: jws(w, header(w, cty="x", x5u="https://e.invalid"),
                                               {**payload_of(real(w)), "scope": ["a"], "n": 1.5}), ACCEPT, None),
    ("6 KiB token", lambda w: signed(w, pad="x" * 4000), ACCEPT, None),
    ("far future exp", lambda w: real(w, expires_at=2 ** 62), ACCEPT, None),
    # signature and keys
    ("forged claims, signature kept", lambda w: _flip(real(w), 1), "both", tv.BAD_SIGNATURE),
    ("flipped signature", lambda w: _flip(real(w), 2), "both", tv.BAD_SIGNATURE),
    ("header not JSON after a change", lambda w: "A" + real(w)[1:], "both", tv.MALFORMED),
    ("our kid, another key", lambda w: jws(w, header(w), payload_of(real(w)), key=w.other.private), "both",
     tv.BAD_SIGNATURE),
    ("unknown kid", lambda w: jws(w, header(w, kid=w.other.kid), payload_of(real(w)), key=w.other.private), "both",
     tv.UNKNOWN_KEY),
    ("no kid", lambda w: jws(w, header(w, kid=DROP), payload_of(real(w))), "both", tv.MALFORMED),
    ("kid not a string", lambda w: jws(w, header(w, kid=[w.signer.kid]), payload_of(real(w))), "both", tv.MALFORMED),
    ("path-like kid", lambda w: jws(w, header(w, kid="../" + w.signer.kid), payload_of(real(w))), "both",
     tv.UNKNOWN_KEY),
    ("signature of 63 bytes", lambda w: _short_sig(w, 63), "both", tv.MALFORMED),
    ("signature of 65 bytes", lambda w: _short_sig(w, 65), "both", tv.MALFORMED),
    ("signature of 0 bytes", lambda w: real(w).rpartition(".")[0] + ".", "both", tv.MALFORMED),
    # header
    ("alg none, no signature", lambda w: jws(w, header(w, alg="none"), payload_of(real(w))).rpartition(".")[0] + ".",
     "both", tv.MALFORMED),
    ("alg none, signed", lambda w: jws(w, header(w, alg="none"), payload_of(real(w))), "both", tv.UNSUPPORTED),
    ("alg HS256 keyed with the public key", _hs256, "both", tv.MALFORMED),  # a 32-byte signature
    ("alg Ed25519", lambda w: jws(w, header(w, alg="Ed25519"), payload_of(real(w))), "both", tv.UNSUPPORTED),
    ("alg eddsa", lambda w: jws(w, header(w, alg="eddsa"), payload_of(real(w))), "both", tv.UNSUPPORTED),
    ("no alg", lambda w: jws(w, header(w, alg=DROP), payload_of(real(w))), "both", tv.UNSUPPORTED),
    ("typ JWT", lambda w: jws(w, header(w, typ="JWT"), payload_of(real(w))), "both", tv.UNSUPPORTED),
    ("typ as a media type", lambda w: jws(w, header(w, typ="application/" + TYP), payload_of(real(w))), "both",
     tv.UNSUPPORTED),
    ("no typ", lambda w: jws(w, header(w, typ=DROP), payload_of(real(w))), "both", tv.UNSUPPORTED),
    ("crit exp", lambda w: jws(w, header(w, crit=["exp"]), payload_of(real(w))), "both", tv.UNSUPPORTED),
    ("crit empty", lambda w: jws(w, header(w, crit=[]), payload_of(real(w))), "both", tv.UNSUPPORTED),
    ("b64 false", lambda w: jws(w, header(w, b64=False, crit=["b64"]), payload_of(real(w))), "both",
     tv.UNSUPPORTED),
    ("crit b64 with b64 true", lambda w: jws(w, header(w, b64=True, crit=["b64"]), payload_of(real(w))),
     "stricter", tv.UNSUPPORTED),
    ("b64 true without crit", lambda w: jws(w, header(w, b64=True), payload_of(real(w))), "stricter",
     tv.UNSUPPORTED),
    ("header duplicate alg", lambda w: jws(w, json.dumps(header(w)).replace('"alg": "EdDSA"',
                                                                          '"alg": "none", "alg": "EdDSA"').encode(),
                                           payload_of(real(w))), "stricter", tv.MALFORMED),
    ("header duplicate kid", lambda w: jws(w, json.dumps(header(w)).replace('"kid"', f'"kid": "{w.other.kid}", "kid"')
                                           .encode(), payload_of(real(w))), "stricter", tv.MALFORMED),
    ("header a JSON list", lambda w: jws(w, b'["EdDSA"]', payload_of(real(w))), "both", tv.MALFORMED),
    ("header nested too deep", lambda w: jws(w, b"[" * 2000 + b"]" * 2000, payload_of(real(w))), "both",
     tv.MALFORMED),
    ("header not JSON", lambda w: jws(w, b"{alg: EdDSA}", payload_of(real(w))), "both", tv.MALFORMED),
    ("header in UTF-16", lambda w: jws(w, json.dumps(header(w)).encode("utf-16"), payload_of(real(w))), "stricter",
     tv.MALFORMED),
    ("header not Unicode", lambda w: jws(w, json.dumps(header(w)).encode()[:-2] + b'\xff"}', payload_of(real(w))),
     "both", tv.MALFORMED),
    # base64url and structure
    ("signature padded", lambda w: real(w) + "==", "stricter", tv.MALFORMED),
    ("signature with one =", lambda w: real(w) + "=", "both", tv.MALFORMED),
    ("header padded (and signed so)", lambda w: jws(w, b"", payload_of(real(w)), head_b64=_padded(
        lambda n: json.dumps(header(w, x="x" * n)).encode())), "stricter", tv.MALFORMED),
    ("payload not canonical (signed so)", lambda w: jws(w, header(w), b"", body_b64=_noncanonical(_unpadded(
        lambda n: json.dumps({**payload_of(real(w)), "p": "x" * n}).encode()))), "both", tv.MALFORMED),
    ("signature not canonical", lambda w: _edit(real(w), lambda t: t[:-1] + _noncanonical(t.split(".")[2])[-1]), "both",
     tv.MALFORMED),
    ("standard alphabet", lambda w: _edit(real(w), lambda t: t.replace("-", "+").replace("_", "/") + "+"), "both",
     tv.MALFORMED),
    ("two segments", lambda w: real(w).rpartition(".")[0], "both", tv.MALFORMED),
    ("four segments", lambda w: real(w) + ".AAAA", "both", tv.MALFORMED),
    ("empty payload segment", lambda w: jws(w, header(w), b""), "both", tv.MALFORMED),
    ("header and payload swapped", lambda w: _swap(real(w), 0, 1), "both", tv.UNSUPPORTED),  # no alg
    ("trailing newline", lambda w: real(w) + "\n", "both", tv.MALFORMED),
    ("leading space", lambda w: " " + real(w), "both", tv.MALFORMED),
    ("space inside", lambda w: _edit(real(w), lambda t: t[:20] + " " + t[20:]), "both", tv.MALFORMED),
    ("non-ASCII inside", lambda w: _edit(real(w), lambda t: t[:20] + "é" + t[21:]), "both", tv.MALFORMED),
    ("empty", lambda w: "", "both", tv.MALFORMED),
    ("not a JWS", lambda w: "not.a-token", "both", tv.MALFORMED),
    ("garbage header", lambda w: "!!!." + ".".join(real(w).split(".")[1:]), "both", tv.MALFORMED),
    ("12 KiB token", lambda w: signed(w, pad="x" * 9000), "stricter", tv.MALFORMED),
    # payload
    ("payload a JSON list", lambda w: raw_payload(w, "[1]"), "both", tv.MALFORMED),
    ("payload not JSON", lambda w: raw_payload(w, "{iss: 1}"), "both", tv.MALFORMED),
    ("payload UTF-16", lambda w: jws(w, header(w), real_payload_text(w).encode("utf-16")), "stricter", tv.MALFORMED),
    ("payload with a UTF-8 BOM", lambda w: jws(w, header(w), b"\xef\xbb\xbf" + real_payload_text(w).encode()),
     "stricter", tv.MALFORMED),
    ("payload duplicate aud", lambda w: raw_payload(w, real_payload_text(w).replace('"aud":', '"aud":"other","aud":')),
     "stricter", tv.MALFORMED),
    ("payload duplicate exp", lambda w: raw_payload(w, real_payload_text(w).replace('"exp":', f'"exp":{_at(-HOUR)},"exp":')),
     "stricter", tv.MALFORMED),
    ("payload NaN in a claim", lambda w: raw_payload(w, real_payload_text(w)[:-1] + ',"x":NaN}'), "stricter",
     tv.MALFORMED),
    # claims
    *[(f"no {c}", lambda w, c=c: signed(w, **{c: DROP}), "both", tv.BAD_CLAIMS) for c in tokens.REQUIRED_CLAIMS],
    *[(f"{c} null", lambda w, c=c: signed(w, **{c: None}), "both", tv.BAD_CLAIMS) for c in tokens.REQUIRED_CLAIMS],
    ("sub a number", lambda w: signed(w, sub=12), "both", tv.BAD_CLAIMS),
    ("jti a list", lambda w: signed(w, jti=["a"]), "both", tv.BAD_CLAIMS),
    ("program a number", lambda w: signed(w, program=1), "stricter", tv.BAD_CLAIMS),
    ("entitlement an object", lambda w: signed(w, entitlement={"id": "x"}), "stricter", tv.BAD_CLAIMS),
    ("exp true", lambda w: signed(w, exp=True), "both", tv.BAD_CLAIMS),
    ("nbf false", lambda w: signed(w, nbf=False), "stricter", tv.BAD_CLAIMS),
    ("iat true", lambda w: signed(w, iat=True), "stricter", tv.BAD_CLAIMS),
    ("exp a float", lambda w: signed(w, exp=float(_at(HOUR))), "stricter", tv.BAD_CLAIMS),
    ("exp a numeric string", lambda w: signed(w, exp=str(_at(HOUR))), "stricter", tv.BAD_CLAIMS),
    ("exp a word", lambda w: signed(w, exp="tomorrow"), "both", tv.BAD_CLAIMS),
    ("exp Infinity", lambda w: raw_payload(w, json.dumps({**payload_of(real(w)), "exp": float("inf")})), "both",
     tv.MALFORMED),
    ("expired", lambda w: real(w, expires_at=_at(-HOUR)), "both", tv.EXPIRED),
    ("expired long ago", lambda w: real(w, issued_at=0, not_before=0, expires_at=1), "both", tv.EXPIRED),
    ("not yet valid", lambda w: real(w, not_before=_at(HOUR)), "both", tv.NOT_YET_VALID),
    ("issued in the future", lambda w: real(w, issued_at=_at(HOUR), not_before=_at(-HOUR)), "both",
     tv.NOT_YET_VALID),
    ("other platform", lambda w: real(w, platform_id="other-platform"), "both", tv.WRONG_AUDIENCE),
    ("platform with another case", lambda w: real(w, platform_id=PLATFORM.upper()), "both", tv.WRONG_AUDIENCE),
    ("aud a list without the platform", lambda w: signed(w, aud=["other"]), "both", tv.WRONG_AUDIENCE),
    ("aud a list with a number", lambda w: signed(w, aud=[PLATFORM, 1]), "both", tv.WRONG_AUDIENCE),
    ("aud an empty list", lambda w: signed(w, aud=[]), "both", tv.WRONG_AUDIENCE),
    ("aud empty", lambda w: signed(w, aud=""), "both", tv.WRONG_AUDIENCE),
    ("aud an object", lambda w: signed(w, aud={PLATFORM: True}), "both", tv.WRONG_AUDIENCE),
    ("other issuer", lambda w: real(w, issuer="urn:someone-else"), "both", tv.WRONG_ISSUER),
    ("issuer in a list", lambda w: signed(w, iss=[ISSUER]), "both", tv.WRONG_ISSUER),
]


@pytest.mark.parametrize("name,make,who,reason", CASES, ids=[c[0] for c in CASES])
def test_each_kind_of_token_against_pyjwt(w: World, name: str, make: Callable[[World], str], who: str,
                                          reason: str | None) -> None:
    token = make(w)
    v = assert_agree(w, token)
    if who == ACCEPT:
        assert v.ours is not None and v.pyjwt is not None, v.reason
        assert documented_stricter(token) is None
    elif who == "both":
        assert v.pyjwt is None, f"PyJWT accepts {name}"
        assert v.reason == reason
    else:  # the new verifier is deliberately stricter: PyJWT accepts these
        assert who == "stricter"
        assert v.pyjwt is not None, f"PyJWT refuses {name}: not a case where the new verifier is the stricter"
        assert v.reason == reason
        assert documented_stricter(token)


# ------------------------------------------------------------------------------ properties

texts = st.text(st.characters(codec="utf-8"), max_size=40)
offsets = st.one_of(st.integers(MARGIN, 400 * 86400), st.integers(-400 * 86400, -MARGIN))


@PROPERTY
@given(subject=texts, program=texts, activation=texts, jti=texts,
       issuer=st.sampled_from([ISSUER, ISSUER + " ", ISSUER.upper(), "", "urn:other"]),
       platform=st.sampled_from([PLATFORM, PLATFORM + "\x00", "", "other"]),
       iat=offsets, nbf=offsets, exp=offsets)
def test_tokens_of_the_signer_verify_exactly_when_pyjwt_says(
        w: World, subject: str, program: str, activation: str, jti: str, issuer: str, platform: str,
        iat: int, nbf: int, exp: int) -> None:
    now = int(time.time())
    token = real(w, subject=subject, program_id=program, activation_id=activation, jti=jti, issuer=issuer,
                 platform_id=platform, issued_at=now + iat, not_before=now + nbf, expires_at=now + exp)
    v = assert_agree(w, token)
    assert (v.ours is None) == (v.pyjwt is None)  # the signer's tokens: no documented difference applies
    good = issuer == ISSUER and platform == PLATFORM and iat < 0 and nbf < 0 and exp > 0
    assert (v.ours is not None) == good, v.reason


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=6)


@dataclasses.dataclass(frozen=True)
class FromNow:
    """A time claim, seconds from the clock of the test (at least MARGIN away)."""
    seconds: int


claim_values = st.one_of(json_values, st.sampled_from([ISSUER, PLATFORM, [PLATFORM], [PLATFORM, "x"], DROP]),
                         offsets.map(FromNow), offsets.map(lambda o: float(int(time.time()) + o)))
claim_names = st.sampled_from([*tokens.REQUIRED_CLAIMS, "x"])


@PROPERTY
@given(changes=st.dictionaries(claim_names, claim_values, max_size=3),
       head_changes=st.dictionaries(st.sampled_from(["alg", "typ", "kid", "crit", "b64", "jwk", "x"]),
                                    st.one_of(json_values, st.sampled_from(["EdDSA", TYP, DROP])), max_size=2))
def test_signed_headers_and_payloads_verify_exactly_when_pyjwt_says_or_a_documented_case(
        w: World, changes: dict[str, Any], head_changes: dict[str, Any]) -> None:
    body = payload_of(real(w))
    for name, value in changes.items():
        body[name] = int(time.time()) + value.seconds if isinstance(value, FromNow) else value
    token = jws(w, header(w, **head_changes), {k: v for k, v in body.items() if v is not DROP})
    assert_agree(w, token)


mutation = st.one_of(
    st.tuples(st.just("replace"), st.integers(0, 10 ** 6), st.sampled_from(list("AQgwBz09-_=.+/ \n\té\x00"))),
    st.tuples(st.just("insert"), st.integers(0, 10 ** 6), st.sampled_from(list("AQgw-_=. \né"))),
    st.tuples(st.just("delete"), st.integers(0, 10 ** 6), st.just("")),
    st.tuples(st.just("truncate"), st.integers(0, 10 ** 6), st.just("")),
    st.tuples(st.just("pad"), st.integers(0, 2), st.sampled_from(["=", "==", "==="])),
    st.tuples(st.just("bitflip"), st.integers(0, 10 ** 6), st.integers(0, 7)),
)


@PROPERTY
@given(mutations=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_tokens_are_refused_and_pyjwt_agrees(w: World, mutations: list[tuple[str, int, Any]]) -> None:
    original = real(w)
    token = original
    for op, at, what in mutations:
        i = at % (len(token) + 1)
        if op == "replace" and token:
            token = token[:i % len(token)] + what + token[i % len(token) + 1:]
        elif op == "insert":
            token = token[:i] + what + token[i:]
        elif op == "delete":
            token = token[:i] + token[i + 1:]
        elif op == "truncate":
            token = token[:i]
        elif op == "pad":
            s = token.split(".")
            if at < len(s):
                s[at] += what
            token = ".".join(s)
        elif op == "bitflip" and token:
            raw = bytearray(token.encode())
            raw[i % len(raw)] ^= 1 << what
            token = raw.decode("utf-8", "replace")
    v = assert_agree(w, token)
    if token != original:
        assert v.ours is None, f"accepted a changed token: {token!r}"


# ------------------------------------------------------------------------------ leeway, JWKS

def test_leeway_applies_to_exp_nbf_and_iat(w: World) -> None:
    t = 2_000_000_000
    token = real(w, issued_at=t, not_before=t, expires_at=t + 1000)
    v = TokenVerifier(w.jwks, ISSUER, PLATFORM, leeway_s=30)
    assert v.verify(token, now=t - 30)["exp"] == t + 1000  # nbf and iat 30 s ahead of our clock: fine
    for now, reason in ((t - 31, tv.NOT_YET_VALID), (t + 1030, tv.EXPIRED)):
        with pytest.raises(InvalidToken) as refused:
            v.verify(token, now=now)
        assert refused.value.reason == reason
    v.verify(token, now=t + 1029)
    iat_ahead = real(w, issued_at=t + 100, not_before=t, expires_at=t + 1000)
    with pytest.raises(InvalidToken, match="iat") as refused:
        v.verify(iat_ahead, now=t + 69)
    assert refused.value.reason == tv.NOT_YET_VALID
    assert TokenVerifier(w.jwks, ISSUER, PLATFORM).leeway_s == tv.DEFAULT_LEEWAY_S


def readme_pyjwt_verifier() -> type:
    """README's "With PyJWT" code block, run as a platform would paste it."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    code = readme.split("#### With PyJWT", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md (With PyJWT)", "exec"), namespace)
    verifier: type = namespace["TokenVerifier"]
    return verifier


def test_the_pyjwt_verifier_of_the_readme_allows_the_same_clock_skew(w: World) -> None:
    """A platform whose clock runs 30 s behind the service (or a token 30 s past its exp) gets the
    same answer from README's PyJWT code, its copy in bench/tokens.py and the recommended
    verifier: accepted, as the 60 s the README promises; an hour off, refused by all three."""
    verifiers: dict[str, Callable[[str], Any]] = {
        "README": readme_pyjwt_verifier()(w.jwks, ISSUER, PLATFORM).verify,
        "bench": bt.TokenVerifier(w.jwks, ISSUER, PLATFORM).verify,
        "token_verifier": TokenVerifier(w.jwks, ISSUER, PLATFORM).verify,
    }
    ahead = real(w, issued_at=_at(30), not_before=_at(30), expires_at=_at(HOUR))  # signed 30 s "in the future"
    just_expired = real(w, issued_at=_at(-HOUR), not_before=_at(-HOUR), expires_at=_at(-30))
    for name, verify in verifiers.items():
        for token in (ahead, just_expired):
            assert verify(token) == payload_of(token), name
        for token in (real(w, issued_at=_at(HOUR), not_before=_at(HOUR), expires_at=_at(2 * HOUR)),
                      real(w, issued_at=_at(-2 * HOUR), not_before=_at(-2 * HOUR), expires_at=_at(-HOUR))):
            with pytest.raises((jwt.InvalidTokenError, InvalidToken)):
                verify(token)


def test_the_readme_refreshes_the_jwks_at_most_once_a_minute_even_when_the_refresh_fails(
        w: World, tmp_path: Path) -> None:
    """README's recommended snippet ("Verifying tokens in Python"), run as written with
    token_verifier.py: tokens naming unknown kids (anyone can make them) call GetSigningKeys at
    most once a minute, also while the answer is unusable or the call fails."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    code = readme.split("### Verifying tokens in Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    calls: list[str] = []

    def get_signing_keys() -> str:
        calls.append("GetSigningKeys")
        if len(calls) % 2:
            return '{"keys": []}'  # an unusable answer
        raise ConnectionError("the service is unreachable")

    shutil.copy(Path(tv.__file__), tmp_path / "token_verifier.py")
    sys.path.insert(0, str(tmp_path))
    try:
        namespace: dict[str, Any] = {"jwks_json": w.jwks, "get_signing_keys": get_signing_keys}
        exec(compile(code, "README.md (Python)", "exec"), namespace)  # issuer and platform: ours
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("token_verifier", None)
    token = real(w)
    assert namespace["claims_of"](token) == payload_of(token)
    namespace["last_refresh"] -= 61  # a minute since the last refresh
    stranger = jws(w, header(w, kid=w.other.kid), payload_of(token), key=w.other.private)
    for _ in range(4):
        with pytest.raises(Exception) as refused:
            namespace["claims_of"](stranger)
        assert isinstance(refused.value, (ConnectionError, namespace["InvalidToken"]))
    assert calls == ["GetSigningKeys"]
    assert namespace["claims_of"](token) == payload_of(token)  # the keys in force stayed


def test_jwks_loading_keeps_only_ed25519_keys(w: World) -> None:
    ours = json.loads(w.jwks)["keys"][0]
    other = w.other.jwk()
    noise = [
        {"kty": "RSA", "kid": "rsa", "n": "AQAB", "e": "AQAB"},
        {**other, "crv": "Ed448", "kid": "ed448"},
        {**other, "alg": "ES256", "kid": "es256"},
        {**other, "use": "enc", "kid": "enc"},
        {**other, "x": other["x"][:-2], "kid": "short"},
        {**other, "x": other["x"] + "==", "kid": "padded"},
        {**other, "kid": 7},
        {**other, "kid": ""},
        "not an object",
    ]
    v = TokenVerifier(json.dumps({"keys": [*noise, ours]}), ISSUER, PLATFORM)
    assert v.kids == {ours["kid"]}
    v.verify(real(w))
    assert TokenVerifier({"keys": [ours]}, ISSUER, PLATFORM).kids == {ours["kid"]}  # a parsed JWKS too
    assert TokenVerifier(w.jwks.encode(), ISSUER, PLATFORM).kids == {ours["kid"]}
    for bad in ("", "[]", '{"keys": {}}', json.dumps({"keys": noise}), '{"keys": [], "keys": []}',
                json.dumps({"keys": [ours, {**ours}]}), json.dumps({"keys": [ours, {**other, "kid": ours["kid"]}]})):
        with pytest.raises(InvalidJWKS):
            TokenVerifier(bad, ISSUER, PLATFORM)


def test_update_jwks_swaps_the_keys_and_a_bad_jwks_keeps_them(w: World) -> None:
    v = TokenVerifier(w.jwks, ISSUER, PLATFORM)
    token = real(w)
    v.verify(token)
    v.verify(token)  # the header now comes from the cache of verified headers
    other_jwks = json.dumps({"keys": [w.other.jwk()]})
    v.update_jwks(other_jwks)
    with pytest.raises(InvalidToken) as refused:
        v.verify(token)
    assert refused.value.reason == tv.UNKNOWN_KEY  # the cache went with the old keys
    with pytest.raises(InvalidJWKS):
        v.update_jwks('{"keys": []}')
    assert v.kids == {w.other.kid}
    v.update_jwks(json.dumps({"keys": [w.other.jwk(), w.signer.jwk()]}))  # a rotation: both published
    assert v.verify(token) == payload_of(token)


def test_the_cache_of_headers_never_lets_a_bad_signature_through(w: World) -> None:
    v = TokenVerifier(w.jwks, ISSUER, PLATFORM)
    token = real(w)
    v.verify(token)
    for bad in (_flip(token, 1), _flip(token, 2), jws(w, header(w), payload_of(token), key=w.other.private)):
        with pytest.raises(InvalidToken) as refused:
            v.verify(bad)
        assert refused.value.reason == tv.BAD_SIGNATURE


def test_inputs_that_are_not_tokens(w: World) -> None:
    token = real(w)
    assert w.ours.verify(token.encode()) == payload_of(token)
    for bad in (None, 12, token.encode("utf-16"), "é".encode() + token.encode(), [token]):
        with pytest.raises(InvalidToken) as refused:
            w.ours.verify(bad)  # type: ignore[arg-type]
        assert refused.value.reason == tv.MALFORMED
    # Bytes too long are refused for their length before any decoding (a request body of
    # megabytes was decoded whole first; the message named its encoding instead).
    for bad in (b"\xff" * (tv.MAX_TOKEN_CHARS + 1), b"a" * (tv.MAX_TOKEN_CHARS + 1)):
        with pytest.raises(InvalidToken) as refused:
            w.ours.verify(bad)
        assert refused.value.reason == tv.MALFORMED and "longer than" in str(refused.value), refused.value
    for args in (("", PLATFORM), (ISSUER, "")):
        with pytest.raises(ValueError):
            TokenVerifier(w.jwks, *args)
    with pytest.raises(ValueError):
        TokenVerifier(w.jwks, ISSUER, PLATFORM, leeway_s=-1)


# ------------------------------------------------------------------------------ the real RPCs

def test_a_token_and_jwks_from_the_real_rpcs(api: Api, harness: Harness) -> None:
    resp = api.activate()
    jwks = api.platform.GetSigningKeys(activation_pb2.GetSigningKeysRequest()).jwks_json
    now = harness.clock.now().timestamp()
    v = TokenVerifier(jwks, harness.ctx.settings.issuer, "openclassrooms")
    got = v.verify(resp.activation_token, now=now)
    assert got["entitlement"] == resp.activation.name.split("/", 1)[1]
    assert got["aud"] == "openclassrooms" and got["iss"] == harness.ctx.settings.issuer
    assert got == payload_of(resp.activation_token)
    refusals = {
        tv.WRONG_AUDIENCE: lambda: TokenVerifier(jwks, harness.ctx.settings.issuer, "other").verify(
            resp.activation_token, now=now),
        tv.WRONG_ISSUER: lambda: TokenVerifier(jwks, "urn:other", "openclassrooms").verify(
            resp.activation_token, now=now),
        tv.EXPIRED: lambda: v.verify(resp.activation_token, now=got["exp"] + v.leeway_s),
        tv.BAD_SIGNATURE: lambda: v.verify(_flip(resp.activation_token, 1), now=now),
    }
    for reason, attempt in refusals.items():
        with pytest.raises(InvalidToken) as refused:
            attempt()
        assert refused.value.reason == reason


# ------------------------------------------------------------------------------ one file

def test_the_file_works_copied_alone(w: World, tmp_path: Path) -> None:
    """A platform copies entitlement/token_verifier.py: it imports PyNaCl and the standard library,
    nothing of the service, PyJWT, cryptography, gRPC or SQLAlchemy."""
    shutil.copy(Path(tv.__file__), tmp_path / "token_verifier.py")
    token = real(w)
    (tmp_path / "jwks.json").write_text(w.jwks)
    script = (
        "import json, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import token_verifier as t\n"
        "v = t.TokenVerifier(open(sys.argv[1] + '/jwks.json').read(), sys.argv[2], sys.argv[3])\n"
        "claims = v.verify(sys.argv[4])\n"
        "try:\n"
        "    v.verify(sys.argv[4] + '==')\n"
        "except t.InvalidToken as exc:\n"
        "    refused = exc.reason\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules})\n"
        "print(json.dumps({'claims': claims, 'refused': refused, 'modules': loaded}))\n")
    out = subprocess.run([sys.executable, "-I", "-c", script, str(tmp_path), ISSUER, PLATFORM, token],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["claims"] == payload_of(token) and result["refused"] == tv.MALFORMED
    modules = set(result["modules"])
    assert "nacl" in modules
    assert not modules & {"entitlement", "jwt", "cryptography", "grpc", "sqlalchemy", "structlog", "google"}
