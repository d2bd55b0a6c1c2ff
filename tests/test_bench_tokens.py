"""bench/tokens.py runs (a few tokens, no timing asserted), and every way it times is a correct
verification: it accepts the service's tokens and refuses forged, expired, misdirected or
mistyped ones, so its figures are never those of a check that skips something."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.exceptions import InvalidSignature
from nacl.exceptions import BadSignatureError

from bench import tokens as bt
from entitlement import tokens
from entitlement.token_verifier import InvalidToken, TokenVerifier

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)  # PyJWT checks exp against the real clock

WAYS: dict[str, Callable[[str, str, str], Callable[[str], dict[str, Any]]]] = {
    "pyjwt": lambda jwks, iss, aud: bt.TokenVerifier(jwks, iss, aud).verify,
    "pyjwt-two-parses": bt.two_parses,
    "pyjwt-key-per-token": bt.key_per_token,
    "by-hand-openssl": bt.by_hand,
    "by-hand-libsodium": lambda jwks, iss, aud: bt.by_hand(jwks, iss, aud, bt.libsodium_ed25519),
    "token-verifier": lambda jwks, iss, aud: TokenVerifier(jwks, iss, aud).verify,
}
# What each way raises for a token it refuses (anything else, or nothing, fails the test).
REFUSALS: dict[str, tuple[type[Exception], ...]] = {
    **{w: (jwt.InvalidTokenError,) for w in WAYS if w.startswith("pyjwt")},
    "by-hand-openssl": (ValueError, InvalidSignature),
    "by-hand-libsodium": (ValueError, BadSignatureError),
    "token-verifier": (InvalidToken,),
}


@pytest.fixture(scope="module")
def minted(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str], Path]:
    keys = tmp_path_factory.mktemp("bench-tokens") / "keys"
    jwks_json, good = bt.mint(3, keys, NOW)
    return jwks_json, good, keys


def _segments(token: str) -> list[str]:
    return token.split(".")


def _forge_claims(token: str, **changes: object) -> str:
    """The token with claims changed and the original signature kept."""
    head, body, sig = _segments(token)
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims.update(changes)
    new = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{new}.{sig}"


def _flip_signature(token: str) -> str:
    head, body, sig = _segments(token)
    middle = len(sig) // 2
    return f"{head}.{body}.{sig[:middle]}{'A' if sig[middle] != 'A' else 'B'}{sig[middle + 1:]}"


def _signed_by_store(keys: Path, payload: dict[str, Any], typ: str) -> str:
    signer = tokens.KeyStore.load(keys, now=NOW).signer(NOW)
    return jwt.encode(payload, signer.private, algorithm="EdDSA", headers={"kid": signer.kid, "typ": typ})


@pytest.mark.parametrize("way", sorted(WAYS))
def test_each_timed_way_accepts_good_tokens_and_refuses_bad_ones(way: str, minted: tuple[str, list[str], Path],
                                                                 tmp_path: Path) -> None:
    jwks_json, good, keys = minted
    verify = WAYS[way](jwks_json, bt.ISSUER, bt.PLATFORM)
    for i, token in enumerate(good):
        claims = verify(token)
        assert (claims["aud"], claims["iss"], claims["entitlement"]) == (bt.PLATFORM, bt.ISSUER, f"{i:032x}")

    payload = jwt.decode(good[0], options={"verify_signature": False})
    _, expired = bt.mint(1, tmp_path / "old", NOW - dt.timedelta(days=31))  # another key: unknown kid too
    bad = {
        "forged claims": _forge_claims(good[0], entitlement="f" * 32),
        "flipped signature": _flip_signature(good[0]),
        "expired": _signed_by_store(keys, {**payload, "exp": int(NOW.timestamp()) - 60}, bt.TOKEN_TYPE),
        "not yet valid": _signed_by_store(keys, {**payload, "nbf": int(NOW.timestamp()) + 3600}, bt.TOKEN_TYPE),
        "other audience": _signed_by_store(keys, {**payload, "aud": "other-platform"}, bt.TOKEN_TYPE),
        "other issuer": _signed_by_store(keys, {**payload, "iss": "urn:someone-else"}, bt.TOKEN_TYPE),
        "claim missing": _signed_by_store(keys, {k: v for k, v in payload.items() if k != "jti"}, bt.TOKEN_TYPE),
        "other type": _signed_by_store(keys, payload, "JWT"),
        "unknown key": expired[0],
        "not a JWS": "not.a-token",
        "garbage header": "!!!." + ".".join(_segments(good[0])[1:]),
    }
    for name, token in bad.items():
        with pytest.raises(REFUSALS[way]):
            verify(token)
            pytest.fail(f"{way} accepted a token with {name}")
    verify(good[1])  # still fine after the refusals


def test_the_floors_check_the_signature(minted: tuple[str, list[str], Path]) -> None:
    jwks_json, good, _ = minted
    for ed25519, error in ((bt.openssl_ed25519, InvalidSignature), (bt.libsodium_ed25519, BadSignatureError)):
        floor, prepare = bt.signature_only(jwks_json, ed25519)
        floor(prepare(good[0]))
        with pytest.raises(error):
            floor(prepare(_flip_signature(good[0])))
        with pytest.raises(error):
            floor(prepare(_forge_claims(good[0], aud="other-platform")))


def test_the_benchmark_runs_and_writes_its_section(tmp_path: Path) -> None:
    rates = bt.run(4, 0.0, tmp_path / "keys")
    assert [r.way for r in rates] == ["pyjwt-key-per-token", "pyjwt-two-parses", "pyjwt", "by-hand-openssl",
                                      "ed25519-openssl", "token-verifier", "by-hand-libsodium", "ed25519-libsodium"]
    assert all(r.verified >= 4 and r.per_cpu_s > 0 for r in rates)
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n<!-- section:registry -->\nkept\n<!-- /section:registry -->\n")
    bt.replace_section(out, "tokens", bt.markdown(rates, cpu=0))
    text = out.read_text()
    assert "kept" in text and "<!-- section:tokens -->" in text
    assert "| PyJWT, `TokenVerifier` (README)" in text
    assert "| **recommended**: `entitlement/token_verifier.py`" in text
