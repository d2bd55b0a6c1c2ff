"""Token verification benchmark (`python -m bench.tokens`, part of `make bench`): how many activation
tokens a course platform verifies per second on one core, in Python (issue #8: >= 10,000 tokens/s).

Tokens are minted by the service's own signing code (entitlement.tokens.sign, an Ed25519 key made by
the key store), then verified as a platform does, from the published JWKS (what GetSigningKeys
answers), in one process pinned to one core (os.sched_setaffinity). Every way measured below checks
the signature and every claim (EdDSA only, `kid` among the published keys, `typ`, issuer, audience,
expiry, not-before, required claims) except the two floors, which check the Ed25519 signature alone
(tests/test_bench_tokens.py feeds each way bad tokens):

  pyjwt-key-per-token  PyJWT, get_unverified_header, then the key object built from the JWK for
                       every token and jwt.decode
  pyjwt-two-parses     PyJWT with the keys and a PyJWT instance built once, get_unverified_header
                       then decode (the token is decoded and checked twice)
  pyjwt                TokenVerifier below, README's "Verifying tokens in Python": as above, the
                       kid read from the header segment alone, decode_complete once
  by-hand-openssl      the same checks written out over `cryptography`: sizes PyJWT's own
                       overhead; not offered to platforms
  ed25519-openssl      cryptography's Ed25519PublicKey.verify on the signing input, nothing else:
                       the floor (OpenSSL) under every PyJWT verification
  token-verifier       entitlement/token_verifier.py, the RECOMMENDED way (README): the supported
                       verifier over PyNaCl (libsodium), stricter than PyJWT (canonical base64url,
                       duplicate JSON names refused, length bound); when PyNaCl is installed
  by-hand-libsodium,   the by-hand way and the floor over PyNaCl (libsodium), when it is installed
  ed25519-libsodium    (dev extra)

Rates are tokens per CPU second of the pinned process (other processes on the core do not count
against it, though they still slow it through shared caches) and per wall second.

Settings (environment):
  BENCH_TOKENS          distinct tokens minted (2000), verified round-robin
  BENCH_TOKENS_SECONDS  seconds timed per way (3)
  BENCH_TOKENS_CPU      the core to pin to (default: the last one this process may use)
  BENCH_OUTPUT          BENCHMARKS.md (its "tokens" section is rewritten); "-" to only print
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cryptography
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bench.common import OUTPUT, say
from bench.sections import replace_section
from entitlement import tokens

TOKENS = int(os.environ.get("BENCH_TOKENS", "2000"))
SECONDS = float(os.environ.get("BENCH_TOKENS_SECONDS", "3"))
TARGET = 10_000  # tokens/s on one core (issue #8)
ISSUER = "urn:entitlement"
PLATFORM = "openclassrooms"


# ------------------------------------------------------------------------- the platform's side

# README "Verifying tokens in Python" shows this code as it is here: keep the two the same.
TOKEN_TYPE = "entitlement-activation+jwt"
REQUIRED = ["iss", "aud", "sub", "exp", "nbf", "iat", "jti", "program", "entitlement"]
LEEWAY_S = 60  # clocks differ: a token signed a few seconds "in the future" is not refused


class TokenVerifier:
    """Build once per JWKS (GetSigningKeys' jwks_json; refresh it daily, and at most once a minute
    on an unknown kid) and keep it: verify() then does only the token's own work."""

    def __init__(self, jwks_json: str, issuer: str, platform_id: str) -> None:
        self.keys = {k.key_id: k for k in jwt.PyJWKSet.from_json(jwks_json).keys}
        self.issuer, self.platform_id = issuer, platform_id
        self.jwt = jwt.PyJWT({"require": REQUIRED})

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, once its signature (EdDSA, a published key), type, issuer, audience,
        validity period and required claims are checked; jwt.InvalidTokenError otherwise."""
        key = self.keys.get(unverified_kid(token))
        if key is None:
            raise jwt.InvalidTokenError("unknown kid: refresh the JWKS, then refuse")
        decoded = self.jwt.decode_complete(token, key, algorithms=["EdDSA"], audience=self.platform_id,
                                           issuer=self.issuer, leeway=LEEWAY_S)
        if decoded["header"].get("typ") != TOKEN_TYPE:
            raise jwt.InvalidTokenError(f"token type must be {TOKEN_TYPE}")
        return dict(decoded["payload"])


def unverified_kid(token: str) -> str | None:
    """The kid of the token's header, from the header segment alone: only to pick the key, as
    decode_complete then checks the whole token. (jwt.get_unverified_header checks every segment,
    which decode does again: a sixth of the time, see BENCHMARKS.md.)"""
    head = token.partition(".")[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, RecursionError):  # bad base64, bad UTF-8, bad JSON, JSON nested too deep
        raise jwt.DecodeError("malformed token header") from None
    kid = header.get("kid") if isinstance(header, dict) else None
    return kid if isinstance(kid, str) else None


# ------------------------------------------------------------------------- the other ways measured

def two_parses(jwks_json: str, issuer: str, platform_id: str) -> Callable[[str], dict[str, Any]]:
    """The obvious PyJWT way, keys and PyJWT instance built once: jwt.get_unverified_header for the
    kid and typ, then decode."""
    keys = {k.key_id: k for k in jwt.PyJWKSet.from_json(jwks_json).keys}
    verifier = jwt.PyJWT({"require": REQUIRED})

    def verify(token: str) -> dict[str, Any]:
        header = jwt.get_unverified_header(token)
        key = keys.get(header.get("kid"))
        if key is None:
            raise jwt.InvalidTokenError("unknown kid")
        if header.get("typ") != TOKEN_TYPE:
            raise jwt.InvalidTokenError(f"token type must be {TOKEN_TYPE}")
        return verifier.decode(token, key, algorithms=["EdDSA"], audience=platform_id, issuer=issuer)
    return verify


def key_per_token(jwks_json: str, issuer: str, platform_id: str) -> Callable[[str], dict[str, Any]]:
    """As two_parses, but the JWK made into a key object for every token, and jwt.decode's options
    merged per call (the JWKS JSON itself is parsed once)."""
    jwks = {k["kid"]: k for k in json.loads(jwks_json)["keys"]}

    def verify(token: str) -> dict[str, Any]:
        header = jwt.get_unverified_header(token)
        jwk = jwks.get(header.get("kid"))
        if jwk is None:
            raise jwt.InvalidTokenError("unknown kid")
        if header.get("typ") != TOKEN_TYPE:
            raise jwt.InvalidTokenError(f"token type must be {TOKEN_TYPE}")
        return jwt.decode(token, jwt.PyJWK.from_dict(jwk), algorithms=["EdDSA"], audience=platform_id,
                          issuer=issuer, options={"require": REQUIRED})
    return verify


def _b64(part: str) -> bytes:
    """Strict base64url without padding (what PyJWT accepts; urlsafe_b64decode alone skips junk)."""
    if not _B64URL.fullmatch(part):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def openssl_ed25519(x: bytes) -> Callable[[bytes, bytes], None]:
    """verify(signature, message) with cryptography (OpenSSL); InvalidSignature when it fails."""
    return Ed25519PublicKey.from_public_bytes(x).verify


def libsodium_ed25519(x: bytes) -> Callable[[bytes, bytes], None]:
    """verify(signature, message) with PyNaCl (libsodium); nacl's BadSignatureError when it fails."""
    from nacl.bindings import crypto_sign_open

    def verify(signature: bytes, message: bytes) -> None:
        crypto_sign_open(signature + message, x)
    return verify


def by_hand(jwks_json: str, issuer: str, platform_id: str,
            ed25519: Callable[[bytes], Callable[[bytes, bytes], None]] = openssl_ed25519,
            ) -> Callable[[str], dict[str, Any]]:
    """Every check of TokenVerifier written out (split, strict base64url, Ed25519, JSON, claims);
    raises ValueError (or the Ed25519 library's error) when the token is not acceptable."""
    keys = {k["kid"]: ed25519(_b64(k["x"])) for k in json.loads(jwks_json)["keys"]
            if k.get("kty") == "OKP" and k.get("crv") == "Ed25519" and k.get("alg", "EdDSA") == "EdDSA"}

    def verify(token: str) -> dict[str, Any]:
        head, body, sig = token.split(".")
        header = json.loads(_b64(head))
        key = keys.get(header.get("kid"))
        if key is None or header.get("alg") != "EdDSA" or header.get("typ") != TOKEN_TYPE or "crit" in header:
            raise ValueError("header refused")
        key(_b64(sig), f"{head}.{body}".encode())
        claims = json.loads(_b64(body))
        if not isinstance(claims, dict) or any(c not in claims for c in REQUIRED):
            raise ValueError("missing claim")
        if claims["iss"] != issuer or claims["aud"] != platform_id:
            raise ValueError("issuer or audience refused")
        if not all(type(claims[c]) is int for c in ("exp", "nbf", "iat")):
            raise ValueError("time claims must be integers")
        now = time.time()
        if claims["exp"] <= now or claims["nbf"] > now or claims["iat"] > now:
            raise ValueError("outside the validity period")
        return dict(claims)
    return verify


def signature_only(jwks_json: str, ed25519: Callable[[bytes], Callable[[bytes, bytes], None]] = openssl_ed25519,
                   ) -> tuple[Callable[[tuple[bytes, bytes]], None], Callable[[str], tuple[bytes, bytes]]]:
    """The floor: (verify, prepare); prepare splits a token into (signature, signing input) outside
    the timed loop, verify is the Ed25519 check alone."""
    [jwk] = json.loads(jwks_json)["keys"]
    key = ed25519(_b64(jwk["x"]))

    def prepare(token: str) -> tuple[bytes, bytes]:
        signing_input, _, sig = token.rpartition(".")
        return _b64(sig), signing_input.encode()

    def verify(item: tuple[bytes, bytes]) -> None:
        key(*item)
    return verify, prepare


def have_libsodium() -> bool:
    try:
        import nacl.bindings  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------- minting and timing

def mint(count: int, directory: Path, now: dt.datetime) -> tuple[str, list[str]]:
    """(JWKS JSON, tokens): `count` activation tokens signed by the service's own code with a fresh
    key store, for PLATFORM, valid from now for 30 days."""
    store = tokens.KeyStore.load(directory, create=True, now=now)
    iat = int(now.timestamp())
    minted = [tokens.sign(store, tokens.TokenClaims(
        issuer=ISSUER, platform_id=PLATFORM, subject=f"sub-{i:032x}", program_id="premium-job-seekers",
        activation_id=f"{i:032x}", jti=f"jti-{i:028x}", issued_at=iat, not_before=iat,
        expires_at=iat + 30 * 86400), now=now) for i in range(count)]
    return store.jwks_json(now), minted


@dataclass
class Rate:
    way: str
    verified: int
    cpu_s: float
    wall_s: float

    @property
    def per_cpu_s(self) -> float:
        return self.verified / self.cpu_s if self.cpu_s else 0.0

    @property
    def per_wall_s(self) -> float:
        return self.verified / self.wall_s if self.wall_s else 0.0

    @property
    def us_per_token(self) -> float:
        return 1e6 / self.per_cpu_s if self.per_cpu_s else 0.0


def measure(way: str, verify: Callable[[Any], object], items: list[Any], seconds: float) -> Rate:
    """Verify `items` round-robin for about `seconds` (after one warm-up pass over them)."""
    for item in items:
        verify(item)
    done, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
    deadline = wall0 + seconds
    while True:
        for item in items:
            verify(item)
        done += len(items)
        if time.perf_counter() >= deadline:
            break
    return Rate(way, done, time.process_time() - cpu0, time.perf_counter() - wall0)


def pin() -> int:
    """Pin this process to one core (BENCH_TOKENS_CPU, or the last allowed one); returns it."""
    allowed = sorted(os.sched_getaffinity(0))
    cpu = int(os.environ.get("BENCH_TOKENS_CPU", allowed[-1]))
    os.sched_setaffinity(0, {cpu})
    return cpu


def run(count: int, seconds: float, directory: Path, now: dt.datetime | None = None) -> list[Rate]:
    now = now or dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    jwks_json, minted = mint(count, directory, now)
    rates = [
        measure("pyjwt-key-per-token", key_per_token(jwks_json, ISSUER, PLATFORM), minted, seconds),
        measure("pyjwt-two-parses", two_parses(jwks_json, ISSUER, PLATFORM), minted, seconds),
        measure("pyjwt", TokenVerifier(jwks_json, ISSUER, PLATFORM).verify, minted, seconds),
        measure("by-hand-openssl", by_hand(jwks_json, ISSUER, PLATFORM), minted, seconds),
    ]
    floor, prepare = signature_only(jwks_json)
    rates.append(measure("ed25519-openssl", floor, [prepare(t) for t in minted], seconds))
    if have_libsodium():
        from entitlement.token_verifier import TokenVerifier as Recommended
        rates.append(measure("token-verifier", Recommended(jwks_json, ISSUER, PLATFORM).verify, minted, seconds))
        rates.append(measure("by-hand-libsodium", by_hand(jwks_json, ISSUER, PLATFORM, libsodium_ed25519),
                             minted, seconds))
        floor, prepare = signature_only(jwks_json, libsodium_ed25519)
        rates.append(measure("ed25519-libsodium", floor, [prepare(t) for t in minted], seconds))
    return rates


def main() -> int:
    cpu = pin()
    say(f"token verification benchmark: {TOKENS:,} tokens, {SECONDS:g} s per way, pinned to CPU {cpu}")
    with tempfile.TemporaryDirectory(prefix="entitlement-bench-tokens-") as tmp:
        rates = run(TOKENS, SECONDS, Path(tmp) / "keys")
    for r in rates:
        say(f"  {r.way:<20} {r.per_cpu_s:>9,.0f} tokens/CPU s  {r.per_wall_s:>9,.0f} tokens/s wall  "
            f"{r.us_per_token:6.1f} us/token")
    md = markdown(rates, cpu)
    print(md)
    if OUTPUT != "-":
        replace_section(Path(OUTPUT), "tokens", md)
    return 0


WHAT = {
    "pyjwt-key-per-token": "PyJWT, `get_unverified_header` + key object built from the JWK per token",
    "pyjwt-two-parses": "PyJWT, keys and `PyJWT` built once, `get_unverified_header` + `decode`",
    "pyjwt": "PyJWT, `TokenVerifier` (README): keys and `PyJWT` built once, one parse",
    "by-hand-openssl": "the same checks by hand over `cryptography` (not offered: sizes PyJWT's overhead)",
    "ed25519-openssl": "Ed25519 signature only, `cryptography` (OpenSSL): PyJWT's floor",
    "token-verifier": "**recommended**: `entitlement/token_verifier.py` (README), over PyNaCl (libsodium)",
    "by-hand-libsodium": "the same checks by hand over PyNaCl (libsodium)",
    "ed25519-libsodium": "Ed25519 signature only, PyNaCl (libsodium)",
}


def markdown(rates: list[Rate], cpu: int) -> str:
    by_way = {r.way: r for r in rates}
    floor = by_way.get("ed25519-openssl")
    lines = [
        "## Token verification by a platform in Python (`python -m bench.tokens`)",
        "",
        f"- Run on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, `nproc` = {os.cpu_count()}, "
        f"Python {platform.python_version()}, PyJWT {jwt.__version__}, cryptography {cryptography.__version__}; "
        f"one process pinned to CPU {cpu}; load average (1/5/15 min) at the end: "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} (other processes share the 2 cores).",
        f"- {TOKENS:,} activation tokens signed by `entitlement.tokens.sign` (EdDSA, Ed25519), verified "
        f"round-robin for {SECONDS:g} s per way after a warm-up pass, against the JWKS the service publishes. "
        "Every way but the two floors checks the signature, `kid`, `alg`, `typ`, issuer, audience, `exp`, "
        "`nbf` and the required claims (tests/test_bench_tokens.py feeds each of them forged, expired, "
        "misdirected and mistyped tokens; tests/test_token_verifier.py holds the recommended one to PyJWT's "
        "verdicts).",
        "- Rate per CPU second of the pinned process (what one core does, whatever else runs on the "
        "machine) and per wall second (depends on the load). Target (issue #8): 10,000 tokens/s on one core.",
        "",
        "| way | tokens / CPU s | tokens / wall s | us per token (CPU) | vs OpenSSL floor |",
        "|---|---:|---:|---:|---:|",
        *(f"| {WHAT.get(r.way, r.way)} | {r.per_cpu_s:,.0f} | {r.per_wall_s:,.0f} | {r.us_per_token:.1f} | "
          f"{r.per_cpu_s / floor.per_cpu_s if floor and floor.per_cpu_s else 0:.2f} |" for r in rates),
    ]
    us = {r.way: r.us_per_token for r in rates}
    if {"pyjwt", "pyjwt-two-parses", "pyjwt-key-per-token", "by-hand-openssl", "ed25519-openssl"} <= us.keys():
        lines += [
            "",
            "What it shows:",
            f"- The Ed25519 verification of `cryptography` (OpenSSL), which PyJWT uses, costs "
            f"{us['ed25519-openssl']:.0f} us on this CPU: {1e6 / us['ed25519-openssl']:,.0f} tokens/s is the "
            "ceiling of any verification through PyJWT, whatever the Python around it.",
            f"- PyJWT adds {us['pyjwt'] - us['ed25519-openssl']:.0f} us per token with `TokenVerifier`, "
            f"{us['by-hand-openssl'] - us['ed25519-openssl']:.0f} us the same checks written out. Profile "
            "(cProfile of `TokenVerifier.verify`): most of PyJWT's own time is the strict base64url check "
            f"of its `_decode_base64url_segment` (in PyJWT {jwt.__version__}: a Python generator over every character of "
            "the three segments, about 21 us for our 545-character tokens; the decoding itself takes 3 us).",
            f"- Reading the header with `jwt.get_unverified_header` parses and checks the whole token, which "
            f"`decode` does again: +{us['pyjwt-two-parses'] - us['pyjwt']:.0f} us. `TokenVerifier` reads the "
            "`kid` from the header segment alone and checks `typ` on the header `decode_complete` verified.",
            f"- Building the key object from the JWK per token: a further "
            f"+{us['pyjwt-key-per-token'] - us['pyjwt-two-parses']:.0f} us; keep the `PyJWKSet`.",
        ]
    if {"ed25519-libsodium", "by-hand-libsodium"} <= us.keys():
        lines.append(
            f"- libsodium (PyNaCl) verifies an Ed25519 signature in {us['ed25519-libsodium']:.0f} us "
            f"({1e6 / us['ed25519-libsodium']:,.0f}/s); the full check by hand over it reaches "
            f"{1e6 / us['by-hand-libsodium']:,.0f} tokens/s. PyJWT's EdDSA goes through `cryptography` only.")
    if {"token-verifier", "ed25519-libsodium"} <= us.keys():
        rate = 1e6 / us["token-verifier"]
        lines.append(
            f"- The recommended verifier, `entitlement/token_verifier.py` (PyNaCl + the standard library; "
            f"every check above, plus canonical base64url, no duplicate JSON names, at most 8 KiB), verifies "
            f"{rate:,.0f} tokens per CPU second: {us['token-verifier'] - us['ed25519-libsodium']:.0f} us of "
            f"Python around libsodium's {us['ed25519-libsodium']:.0f} us. Issue #8's "
            f"{TARGET:,} tokens/s on one core: {'met' if rate >= TARGET else 'NOT met'} in this run.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
