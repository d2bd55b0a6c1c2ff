"""Signing keys and activation tokens.

- The key store (entitlement/tokens.py) with an explicit `now`: a new key is published before it
  signs, the old one retires and is dropped once every token it signed has expired, keys without
  metadata, path-like file names, reloading a folder that changed (or broke).
- `entitlement keys create|rotate|list`.
- Rotation end to end on a dedicated real server (its own key folder, database and clock, on both
  backends), picked up by the running server without a restart.
- Token attacks through RedeemActivationToken on the real server (both backends), each refused
  with its reason and nothing bound. With tests/test_activation.py the list is complete:
  there: tampered payload, `alg: none`, HS256 keyed with the public key (raw and PEM), unknown
  kid, our kid with another key, not a JWS, truncated, expired, revoked entitlement, another
  platform redeeming, replay (ALREADY_EXISTS with the original binding), concurrent redeems;
  here: path-like kids, missing kid, embedded `jwk`, missing / wrong `aud`, missing or malformed
  time claims, not yet valid, wrong issuer, wrong or missing `typ`, a token for no activation.
  The claim-level cases are signed with our own key: they show the checks after the signature.
- An independent verification in another language: jose on Node (tests/node/verify.mjs) verifies
  a token with the JWKS, both taken from the real RPCs, and refuses a tampered one.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import IN_CI, create_pg_database, drop_pg_database
from support import CALLERS, TODAY, Api, Harness, expect_error, make_registry_file

from entitlement import app, cli, registry, tokens
from entitlement.callers import write_callers
from entitlement.clock import FixedClock
from entitlement.config import ROOT, Settings
from entitlement.server_main import start
from entitlement.storage.migrate import upgrade
from entitlement.tokens import KeyStore, KeyStoreError
from entitlement.v1 import activation_pb2

TOKEN_TYPE = tokens.TOKEN_TYPE
TTL = dt.timedelta(days=30)
T0 = dt.datetime(2026, 3, 16, 10, 0, tzinfo=dt.timezone.utc)
HOUR, DAY = dt.timedelta(hours=1), dt.timedelta(days=1)
NODE_DIR = ROOT / "tests" / "node"


def rid() -> str:
    return uuid.uuid4().hex


def kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def jwks_kids(store: KeyStore, now: dt.datetime) -> list[str]:
    return [k["kid"] for k in store.jwks(now)["keys"]]


def states(store: KeyStore, now: dt.datetime) -> dict[str, str]:
    return {k.kid: k.state for k in store.describe(now)}


def write_bare_key(directory: Path, kid: str, mtime: dt.datetime) -> None:
    """A key as deployments before rotation have it: KID.pem alone."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{kid}.pem"
    path.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    os.utime(path, (mtime.timestamp(), mtime.timestamp()))


def unsupported_key_pem() -> bytes:
    """A PKCS#8 PEM whose key type `cryptography` does not know (an Ed25519 key with its OID changed
    to 1.3.101.116): it raises UnsupportedAlgorithm, not ValueError, as an SM2 or a post-quantum key
    of a newer OpenSSL would."""
    der = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    der = der.replace(bytes.fromhex("06032b6570"), bytes.fromhex("06032b6574"), 1)
    return b"-----BEGIN PRIVATE KEY-----\n" + base64.encodebytes(der) + b"-----END PRIVATE KEY-----\n"


def claims_at(now: dt.datetime, **kw: Any) -> tokens.TokenClaims:
    ts = int(now.timestamp())
    base: dict[str, Any] = dict(issuer="urn:test", platform_id="openclassrooms", subject="s" * 32,
                                program_id="premium-job-seekers", activation_id=rid(), jti=rid(),
                                issued_at=ts, not_before=ts, expires_at=ts + int(TTL.total_seconds()))
    base.update(kw)
    return tokens.TokenClaims(**base)


# ------------------------------------------------------------------------------------ signing

_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(issuer=_TEXT, platform=_TEXT, subject=_TEXT, program=_TEXT, kid=st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True),
       iat=st.integers(0, 2**32), nbf_offset=st.integers(-10**6, 10**6), ttl=st.integers(0, 10**8))
def test_sign_makes_the_token_pyjwt_makes_byte_for_byte(issuer: str, platform: str, subject: str, program: str,
                                                        kid: str, iat: int, nbf_offset: int, ttl: int) -> None:
    """tokens.sign builds the compact JWS itself: the same bytes as PyJWT's encode (Ed25519 is
    deterministic), for any text in the claims (non-ASCII escaped as PyJWT's json.dumps does)."""
    key = tokens.SigningKey(kid, _SIGNER, T0, T0)
    store = KeyStore([key], token_ttl=TTL)
    claims = tokens.TokenClaims(issuer, platform, subject, program, rid(), rid(), iat, iat + nbf_offset, iat + ttl)
    at = dt.datetime.fromtimestamp(max(iat, int(T0.timestamp())), dt.timezone.utc)
    ours = tokens.sign(store, claims, now=at)
    payload = {"iss": issuer, "aud": platform, "sub": subject, "program": program, "entitlement": claims.activation_id,
               "jti": claims.jti, "iat": iat, "nbf": iat + nbf_offset, "exp": iat + ttl}
    assert ours == jwt.encode(payload, _SIGNER, algorithm="EdDSA", headers={"kid": kid, "typ": TOKEN_TYPE})
    decoded = jwt.decode(ours, _SIGNER.public_key(), algorithms=["EdDSA"], options={"verify_signature": True,
                         "verify_aud": False, "verify_exp": False, "verify_nbf": False, "verify_iat": False,
                         "verify_iss": False})
    assert (decoded["iss"], decoded["aud"], decoded["sub"], decoded["exp"]) == (issuer, platform, subject, iat + ttl)
    assert jwt.get_unverified_header(ours) == {"alg": "EdDSA", "kid": kid, "typ": TOKEN_TYPE}


_SIGNER = Ed25519PrivateKey.generate()


# ----------------------------------------------------------------------------- key store, unit

def test_rotation_publishes_before_signing_then_retires_and_drops_the_old_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    a = tokens.create_first_key(keys, T0)
    store = KeyStore.load(keys, now=T0, token_ttl=TTL, reload_interval_s=0)
    assert store.signer(T0).kid == a and states(store, T0) == {a: "signing"}
    meta = json.loads((keys / f"{a}.json").read_text())
    assert meta == {"kid": a, "created": "2026-03-16T10:00:00Z", "sign_from": "2026-03-16T10:00:00Z",
                    "retire_after": None}
    assert (keys / f"{a}.pem").stat().st_mode & 0o777 == 0o600

    r = tokens.rotate(keys, T0 + HOUR, publish_for=24 * HOUR, token_ttl=TTL)
    b = r.new_kid
    assert (r.previous_kid, r.sign_from, r.previous_dropped_after) == (a, T0 + 25 * HOUR, T0 + 25 * HOUR + TTL)
    assert json.loads((keys / f"{a}.json").read_text())["retire_after"] == "2026-03-17T11:00:00Z"
    assert json.loads((keys / f"{b}.json").read_text())["sign_from"] == "2026-03-17T11:00:00Z"
    assert store.refresh() is True  # the running store sees the rotation

    # Published at once, signing only from sign_from.
    now = T0 + HOUR
    assert sorted(jwks_kids(store, now)) == sorted([a, b])
    assert store.signer(now).kid == a and states(store, now) == {a: "signing", b: "next"}
    just_before = T0 + 25 * HOUR - dt.timedelta(seconds=1)
    assert store.signer(just_before).kid == a
    assert kid_of(tokens.sign(store, claims_at(just_before))) == a

    # From sign_from the new key signs; the old one keeps verifying the tokens it signed.
    now = T0 + 25 * HOUR
    assert store.signer(now).kid == b and states(store, now) == {a: "retiring", b: "signing"}
    old_token = tokens.sign(store, claims_at(T0 + 2 * HOUR, issuer="urn:test"))
    assert kid_of(old_token) == a
    assert kid_of(tokens.sign(store, claims_at(now))) == b
    later = T0 + 25 * HOUR + TTL - dt.timedelta(seconds=1)
    assert sorted(jwks_kids(store, later)) == sorted([a, b])
    assert store.get(a, later) is not None

    # Retirement + token TTL: dropped from the JWKS, refused for verification.
    dropped = T0 + 25 * HOUR + TTL
    assert jwks_kids(store, dropped) == [b]
    assert store.get(a, dropped) is None
    assert states(store, dropped) == {a: "expired", b: "signing"}
    with pytest.raises(tokens.TokenError) as info:
        tokens.verify(store, old_token, issuer="urn:test", audience="openclassrooms", now=dropped)
    assert info.value.reason == "TOKEN_INVALID"
    info_a = next(k for k in store.describe(dropped) if k.kid == a)
    assert (info_a.retire_after, info_a.published_until) == (T0 + 25 * HOUR, dropped)


def test_a_token_of_a_retiring_key_verifies_until_it_expires(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    a = tokens.create_first_key(keys, T0)
    store = KeyStore.load(keys, now=T0, token_ttl=TTL, reload_interval_s=0)
    token = tokens.sign(store, claims_at(T0, issuer="urn:test"))
    tokens.rotate(keys, T0, publish_for=0 * HOUR, token_ttl=TTL)  # the new key signs at once
    store.refresh()
    assert store.signer(T0).kid != a
    for now in (T0, T0 + 29 * DAY):
        claims = tokens.verify(store, token, issuer="urn:test", audience="openclassrooms", now=now)
        assert claims.issued_at == int(T0.timestamp())
    with pytest.raises(tokens.TokenError) as info:
        tokens.verify(store, token, issuer="urn:test", audience="openclassrooms", now=T0 + TTL)
    assert info.value.reason == "TOKEN_INVALID"  # the key is gone, whatever the token's exp says


def test_a_rotation_undone_by_deleting_the_new_key_leaves_the_old_one_signing_and_published(tmp_path: Path) -> None:
    """`keys rotate` by mistake, then the new key's files deleted before it signs (rotate refuses
    while a key waits): the old key's recorded retire_after had no key to hand over to. It stays
    the signer, published, and its tokens verify until they expire; a later rotation is as usual."""
    keys = tmp_path / "keys"
    a = tokens.create_first_key(keys, T0)
    store = KeyStore.load(keys, now=T0, token_ttl=TTL, reload_interval_s=0)
    b = tokens.rotate(keys, T0, publish_for=24 * HOUR, token_ttl=TTL).new_kid
    for name in (f"{b}.pem", f"{b}.json"):
        (keys / name).unlink()
    store.refresh(force=True)

    late = T0 + 20 * DAY  # well past the abandoned retire_after
    token = tokens.sign(store, claims_at(late))
    assert kid_of(token) == a and states(store, late) == {a: "signing"}
    just_before_exp = late + TTL - dt.timedelta(seconds=1)
    assert jwks_kids(store, just_before_exp) == [a]
    assert tokens.verify(store, token, issuer="urn:test", audience="openclassrooms",
                         now=just_before_exp).jti == _claims(token)["jti"]
    assert store.signer(T0 + 90 * DAY).kid == a  # something still signs

    c = tokens.rotate(keys, late, publish_for=24 * HOUR, token_ttl=TTL)
    store.refresh(force=True)
    assert c.previous_kid == a and store.signer(late + 24 * HOUR).kid == c.new_kid
    assert states(store, late + 24 * HOUR + TTL) == {a: "expired", c.new_kid: "signing"}


def test_keys_without_metadata_sign_from_their_mtime(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    write_bare_key(keys, "legacy-old", T0 - 10 * DAY)
    write_bare_key(keys, "legacy-new", T0)
    store = KeyStore.load(keys, now=T0, token_ttl=TTL)
    assert store.signer(T0 - DAY).kid == "legacy-old"
    assert store.signer(T0).kid == "legacy-new"
    # The old one retired when the newer one started signing, and is dropped a TTL later.
    assert states(store, T0) == {"legacy-old": "retiring", "legacy-new": "signing"}
    assert jwks_kids(store, T0 + TTL) == ["legacy-new"]
    assert not (keys / "legacy-old.json").exists()  # loading writes nothing

    # Rotating records what was derived: the old signer's times and its retirement.
    r = tokens.rotate(keys, T0 + DAY, token_ttl=TTL)
    assert r.previous_kid == "legacy-new"
    meta = json.loads((keys / "legacy-new.json").read_text())
    assert meta["sign_from"] == "2026-03-16T10:00:00Z" and meta["retire_after"] == "2026-03-18T10:00:00Z"


def test_when_no_key_has_reached_sign_from_the_earliest_signs(tmp_path: Path) -> None:
    """A first key, or a service clock behind the key files: something must sign."""
    keys = tmp_path / "keys"
    a = tokens.create_first_key(keys, T0 + 10 * DAY)
    store = KeyStore.load(keys, now=T0, token_ttl=TTL)
    assert store.signer(T0).kid == a and jwks_kids(store, T0) == [a]


def test_create_refuses_a_folder_with_keys_and_rotate_refuses_while_a_key_waits(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    tokens.create_first_key(keys, T0)
    with pytest.raises(KeyStoreError, match="keys rotate"):
        tokens.create_first_key(keys, T0)
    r = tokens.rotate(keys, T0, publish_for=24 * HOUR)
    with pytest.raises(KeyStoreError, match=f"{r.new_kid} is already waiting"):
        tokens.rotate(keys, T0 + HOUR)
    r2 = tokens.rotate(keys, T0 + 24 * HOUR)  # once it signs, the next rotation may start
    assert r2.previous_kid == r.new_kid


@pytest.mark.parametrize("name", ["...pem", "..pem", ".hidden-key.pem", "etc%2Fpasswd.pem", "has.dots.in.it.pem",
                                  "has space-0000.pem", "short.pem", "x" * 65 + ".pem"])
def test_path_like_or_malformed_key_names_are_refused_at_load(tmp_path: Path, name: str) -> None:
    keys = tmp_path / "keys"
    tokens.create_first_key(keys, T0)
    (keys / name).write_bytes((next(keys.glob("2026*.pem"))).read_bytes())
    with pytest.raises(SystemExit, match="a key id is never a path"):
        KeyStore.load(keys, now=T0)


def test_metadata_without_its_key_is_ignored_and_bad_metadata_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    a = tokens.create_first_key(keys, T0)
    (keys / "waiting-0000.json").write_text(json.dumps({"created": "2026-03-16T10:00:00Z"}))
    assert jwks_kids(KeyStore.load(keys, now=T0), T0) == [a]
    for bad in ({"created": "yesterday"}, {"created": "2026-03-16T10:00:00"}, {"kid": "another-kid",
                "created": "2026-03-16T10:00:00Z"}, ["not", "an", "object"]):
        (keys / f"{a}.json").write_text(json.dumps(bad))
        with pytest.raises(SystemExit, match=f"{a}.json"):
            KeyStore.load(keys, now=T0)


def test_reload_waits_for_the_interval_and_keeps_the_keys_when_the_folder_breaks(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    a = tokens.create_first_key(keys, T0)
    store = KeyStore.load(keys, now=T0, reload_interval_s=3600)
    b = tokens.rotate(keys, T0, publish_for=HOUR).new_kid
    assert store.refresh() is False and jwks_kids(store, T0) == [a]  # looked at most every interval
    assert store.refresh(force=True) is True and sorted(jwks_kids(store, T0)) == sorted([a, b])

    (keys / "...pem").write_text("not a key")
    assert store.refresh(force=True) is False  # refused, logged; the keys in force stay
    assert sorted(jwks_kids(store, T0)) == sorted([a, b]) and store.signer(T0).kid == a
    (keys / "...pem").unlink()
    (keys / f"{b}.pem").unlink()
    (keys / f"{b}.json").unlink()
    assert store.refresh(force=True) is True and jwks_kids(store, T0) == [a]


def test_a_key_file_of_an_unknown_key_type_is_refused_like_any_unusable_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    a = tokens.create_first_key(keys, T0)
    store = KeyStore.load(keys, now=T0, reload_interval_s=3600)
    (keys / "zz-unknown-type.pem").write_bytes(unsupported_key_pem())
    with pytest.raises(SystemExit, match="zz-unknown-type.pem"):
        KeyStore.load(keys, now=T0)
    assert store.refresh(force=True) is False  # refused, logged; the keys in force stay
    assert jwks_kids(store, T0) == [a] and store.signer(T0).kid == a


# ---------------------------------------------------------------------------------------- CLI

@pytest.fixture
def keys_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
             capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    monkeypatch.setenv("ENTITLEMENT_KEY_DIR", str(tmp_path / "keys"))
    monkeypatch.setenv("ENTITLEMENT_TOKEN_TTL_DAYS", "30")
    # Never the repository's own database: the key commands log to the configured one.
    url = f"sqlite:///{tmp_path / 'keys-cli.db'}"
    upgrade(url)
    monkeypatch.setenv("ENTITLEMENT_DATABASE_URL", url)

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(["keys", *argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def test_keys_create_rotate_list(keys_cli: Callable[..., tuple[int, str, str]], tmp_path: Path) -> None:
    code, out, err = keys_cli("create")
    assert code == 0, err
    [a] = [p.stem for p in (tmp_path / "keys").glob("*.pem")]
    assert a in out and "signs from now" in out
    code, _out, err = keys_cli("create")
    assert code == 1 and "keys rotate" in err

    code, out, err = keys_cli("rotate", "--publish-hours", "12")
    assert code == 0, err
    [b] = [p.stem for p in (tmp_path / "keys").glob("*.pem") if p.stem != a]
    assert b in out and a in out
    code, _out, err = keys_cli("rotate")
    assert code == 1 and f"{b} is already waiting" in err

    code, out, err = keys_cli("list")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["KID", "CREATED", "SIGN", "FROM", "RETIRE", "AFTER", "PUBLISHED", "UNTIL", "STATE"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows[a][-1] == "signing" and rows[b][-1] == "next"

    code, out, err = keys_cli("list", "--json")
    listed = {k["kid"]: k for k in json.loads(out)["keys"]}
    assert listed[a]["state"] == "signing" and listed[b]["state"] == "next"
    sign_from = dt.datetime.fromisoformat(listed[b]["sign_from"])
    created = dt.datetime.fromisoformat(listed[b]["created"])
    assert sign_from - created == 12 * HOUR
    assert listed[a]["retire_after"] == listed[b]["sign_from"]
    assert dt.datetime.fromisoformat(listed[a]["published_until"]) == sign_from + TTL
    assert listed[b]["retire_after"] is None and listed[b]["published_until"] is None


def test_keys_rotate_without_delay_and_list_shows_the_retiring_key(
        keys_cli: Callable[..., tuple[int, str, str]]) -> None:
    assert keys_cli("create")[0] == 0
    assert keys_cli("rotate", "--publish-hours", "0")[0] == 0
    assert keys_cli("rotate", "--publish-hours", "-1")[0] == 1
    code, out, _err = keys_cli("list", "--json")
    assert sorted(k["state"] for k in json.loads(out)["keys"]) == ["retiring", "signing"]


def test_keys_commands_log_one_event_each_without_key_material(
        fresh_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from sqlalchemy import select

    from entitlement.storage.db import Database
    from entitlement.storage.models import Event
    keys = tmp_path / "keys"
    monkeypatch.setenv("ENTITLEMENT_KEY_DIR", str(keys))
    monkeypatch.setenv("ENTITLEMENT_TOKEN_TTL_DAYS", "30")
    monkeypatch.setenv("ENTITLEMENT_DATABASE_URL", fresh_url)
    # A database that is not migrated fails the command before any key is made.
    assert cli.main(["keys", "create", "--operator", "alice"]) == 1
    assert "db upgrade" in capsys.readouterr().err
    assert not keys.exists() or not list(keys.glob("*.pem"))
    upgrade(fresh_url)
    assert cli.main(["keys", "create", "--operator", "alice"]) == 0
    [a] = [p.stem for p in keys.glob("*.pem")]
    monkeypatch.setattr("getpass.getuser", lambda: "bob")
    assert cli.main(["keys", "rotate", "--publish-hours", "12"]) == 0
    [b] = [p.stem for p in keys.glob("*.pem") if p.stem != a]
    assert cli.main(["keys", "rotate"]) == 1  # refused: nothing changed, nothing logged
    capsys.readouterr()
    db = Database(fresh_url)
    try:
        with db.read() as s:
            events = list(s.execute(select(Event).order_by(Event.seq)).scalars())
    finally:
        db.dispose()
    assert [(e.type, e.actor, e.subject, e.program_id) for e in events] == [
        ("keys.created", "operator:alice", f"keys/{a}", None), ("keys.rotated", "operator:bob", f"keys/{b}", None)]
    created, rotated = (json.loads(e.payload_json) for e in events)
    assert created["kid"] == a and created["sign_from"] == created["created"]
    assert rotated["kid"] == b and rotated["previous_kid"] == a
    sign_from = dt.datetime.fromisoformat(rotated["sign_from"].replace("Z", "+00:00"))
    assert sign_from - dt.datetime.fromisoformat(rotated["created"].replace("Z", "+00:00")) == 12 * HOUR
    assert rotated["previous_retire_after"] == rotated["sign_from"]
    assert dt.datetime.fromisoformat(rotated["previous_published_until"].replace("Z", "+00:00")) == sign_from + TTL
    # No key material: nothing of the PEM files, public or private, is in any payload.
    for kid in (a, b):
        private = serialization.load_pem_private_key((keys / f"{kid}.pem").read_bytes(), None)
        assert isinstance(private, Ed25519PrivateKey)
        raw = [private.private_bytes_raw(), private.public_key().public_bytes_raw()]
        for e in events:
            for material in raw:
                for form in (material.hex(), base64.b64encode(material).decode(),
                             base64.urlsafe_b64encode(material).decode().rstrip("=")):
                    assert form not in e.payload_json
            assert "PRIVATE KEY" not in e.payload_json


# ------------------------------------------------------------- rotation on a dedicated server

@pytest.fixture(params=["sqlite", "postgres"])
def own_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    """A real server with its own key folder, database and clock (nothing shared with the
    harness, so its keys can rotate and its clock move freely)."""
    pg_name = ""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'entitlement.db'}"
    else:
        admin = request.getfixturevalue("pg_server")
        pg_name, url = create_pg_database(admin)
    settings = Settings(
        listen="127.0.0.1:0", database_url=url, programs_dir=ROOT / "programs",
        callers_file=tmp_path / "callers.json", key_dir=tmp_path / "keys",
        pseudonym_key_file=tmp_path / "pseudonym.key", issuer="urn:entitlement:test", token_ttl_days=30,
        max_workers=4, grace_seconds=1)
    upgrade(url)
    caller_tokens = write_callers(settings.callers_file, CALLERS)
    clock = FixedClock(T0)
    ctx = app.build(settings, clock=clock, create_secrets=True)
    registry.import_extract(ctx.db, ctx.pseudo, clock, make_registry_file(tmp_path / "registry.csv"),
                            extracted_on=TODAY - DAY)
    running = start(ctx, settings.listen)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield Harness(backend=request.param, url=url, ctx=ctx, running=running, channel=channel,
                      tokens=caller_tokens, clock=clock, log_path=tmp_path / "unused.log")
    finally:
        channel.close()
        running.stop(0)
        ctx.db.dispose()
        if pg_name:
            drop_pg_database(request.getfixturevalue("pg_server"), pg_name)


@contextmanager
def clock_at(h: Harness, when: dt.datetime) -> Iterator[None]:
    """Set a server clock, and always put it back."""
    before = h.clock.now()
    h.clock.advance(when - before)
    try:
        yield
    finally:
        h.clock.advance(before - h.clock.now())


def rpc_jwks(api: Api) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(api.platform.GetSigningKeys(activation_pb2.GetSigningKeysRequest()).jwks_json)
    return result


def redeem(api: Api, token: str, account: str, caller: str = "platform-oc") -> activation_pb2.EntitlementStatus:
    status: activation_pb2.EntitlementStatus = api.as_(caller).RedeemActivationToken(
        activation_pb2.RedeemActivationTokenRequest(token=token, account_id=account))
    return status


def bound_account(api: Api, activation: str) -> str:
    found: activation_pb2.Activation = api.admin.GetActivation(activation_pb2.GetActivationRequest(name=activation))
    return found.account_id


def test_rotation_on_a_running_server(own_server: Harness, tmp_path: Path) -> None:
    h, api = own_server, Api(own_server)
    a = kid_of(api.activate().activation_token)
    assert [k["kid"] for k in rpc_jwks(api)["keys"]] == [a]
    old = [api.activate() for _ in range(3)]

    # Rotate the folder under the running server: no restart, it re-reads the folder on use.
    b = tokens.rotate(h.ctx.settings.key_dir, h.clock.now(), publish_for=24 * HOUR, token_ttl=TTL).new_kid
    deadline = time.monotonic() + 10 * tokens.RELOAD_INTERVAL_S
    while b not in [k["kid"] for k in rpc_jwks(api)["keys"]]:
        assert time.monotonic() < deadline, "the server did not pick up the new key"
        time.sleep(0.1)
    assert sorted(k["kid"] for k in rpc_jwks(api)["keys"]) == sorted([a, b])
    # Published, not signing yet: tokens are still signed by the old key.
    assert kid_of(api.activate().activation_token) == a

    with clock_at(h, T0 + 24 * HOUR):
        fresh = api.activate()
        assert kid_of(fresh.activation_token) == b
        # The old key's tokens verify and redeem during its retirement.
        account = "acct-" + rid()
        assert redeem(api, old[0].activation_token, account).activation == old[0].activation.name
        assert redeem(api, fresh.activation_token, "acct-" + rid()).active
        if node_problem() is None:  # jose picks each token's key out of the two-key JWKS
            for token in (old[1].activation_token, fresh.activation_token):
                assert node_verify(tmp_path, rpc_jwks(api), token, h)[0] == 0

    with clock_at(h, T0 + 29 * DAY):  # late in the window, the old token not yet expired
        assert redeem(api, old[1].activation_token, "acct-" + rid()).active

    dropped = T0 + 24 * HOUR + TTL  # retirement + token TTL
    with clock_at(h, dropped - dt.timedelta(seconds=1)):
        assert sorted(k["kid"] for k in rpc_jwks(api)["keys"]) == sorted([a, b])
    with clock_at(h, dropped):
        assert [k["kid"] for k in rpc_jwks(api)["keys"]] == [b]
        f = expect_error(api.platform.RedeemActivationToken, activation_pb2.RedeemActivationTokenRequest(
            token=old[2].activation_token, account_id="acct-" + rid()), grpc.StatusCode.FAILED_PRECONDITION)
        assert f.reason == "TOKEN_INVALID" and "unknown key" in f.message
        assert bound_account(api, old[2].activation.name) == ""
        # The new key carries on.
        later = api.activate()
        assert kid_of(later.activation_token) == b
        assert redeem(api, later.activation_token, "acct-" + rid()).active
    assert {k.kid: k.state for k in h.ctx.keys.describe(dropped)} == {a: "expired", b: "signing"}


def test_a_running_server_keeps_its_keys_when_a_key_file_of_an_unknown_type_appears(own_server: Harness) -> None:
    """README: a folder that no longer loads is logged and the keys in force stay. Every call
    that reads the keys after each reload interval still answers (none fails INTERNAL)."""
    h, api = own_server, Api(own_server)
    a = kid_of(api.activate().activation_token)
    (h.ctx.settings.key_dir / "zz-unknown-type.pem").write_bytes(unsupported_key_pem())
    for _ in range(3):
        time.sleep(tokens.RELOAD_INTERVAL_S + 0.1)  # the next use looks at the folder again
        assert [k["kid"] for k in rpc_jwks(api)["keys"]] == [a]
        made = api.activate()
        assert kid_of(made.activation_token) == a
        assert redeem(api, made.activation_token, "acct-" + rid()).active


# ------------------------------------------------------------------------------- token attacks

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    result: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return result


def _jws(header: dict[str, Any], claims: dict[str, Any], key: Ed25519PrivateKey) -> str:
    """A compact JWS built by hand: full control over the header (PyJWT would add or check fields)."""
    signing_input = _b64(json.dumps({"alg": "EdDSA", **header}).encode()) + "." + _b64(json.dumps(claims).encode())
    return signing_input + "." + _b64(key.sign(signing_input.encode()))


def _hs256(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    signing_input = _b64(json.dumps({"alg": "HS256", **header}).encode()) + "." + _b64(json.dumps(claims).encode())
    return signing_input + "." + _b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())


Forge = Callable[[str, Harness], str]


def ours(change: Callable[[dict[str, Any], Harness], None],
         header: Callable[[str], dict[str, Any]] = lambda kid: {"kid": kid, "typ": TOKEN_TYPE}) -> Forge:
    """The genuine claims, changed, signed with our own signing key (only the checks after the
    signature can refuse these); `header` makes the header from our kid."""
    def make(token: str, h: Harness) -> str:
        claims = _claims(token)
        change(claims, h)
        signer = h.ctx.keys.signer(h.clock.now())
        return _jws(header(signer.kid), claims, signer.private)
    return make


def unchanged(_claims: dict[str, Any], _h: Harness) -> None:
    return None


def theirs(kid: str | None, *, embed_jwk: bool = False) -> Forge:
    """The genuine claims signed by the attacker's own Ed25519 key, under the given kid."""
    def make(token: str, h: Harness) -> str:
        key = Ed25519PrivateKey.generate()
        header: dict[str, Any] = {"typ": TOKEN_TYPE}
        if kid is not None:
            header["kid"] = kid
        if embed_jwk:
            raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            header["jwk"] = {"kty": "OKP", "crv": "Ed25519", "x": _b64(raw)}
        return _jws(header, _claims(token), key)
    return make


def _drop(*names: str) -> Callable[[dict[str, Any], Harness], None]:
    def change(c: dict[str, Any], _h: Harness) -> None:
        for n in names:
            del c[n]
    return change


def _set(**values: Any) -> Callable[[dict[str, Any], Harness], None]:
    def change(c: dict[str, Any], h: Harness) -> None:
        for k, v in values.items():
            c[k] = v(c, h) if callable(v) else v
    return change


def _our_key_file(token: str, h: Harness) -> str:
    """kid naming our own key file (absolute, then relative): looked up as an id, never opened."""
    return theirs(str(h.ctx.settings.key_dir / f"{h.ctx.keys.signer(h.clock.now()).kid}.pem"))(token, h)


INVALID, DENIED = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED
ATTACKS: dict[str, tuple[Forge, grpc.StatusCode, str]] = {
    "kid-path-etc-passwd": (theirs("../../etc/passwd"), INVALID, "TOKEN_INVALID"),
    "kid-path-dev-null": (theirs("/dev/null"), INVALID, "TOKEN_INVALID"),
    "kid-dev-null-hs256-empty-secret": (lambda t, h: _hs256({"kid": "/dev/null", "typ": TOKEN_TYPE}, _claims(t), b""),
                                        INVALID, "TOKEN_INVALID"),
    "kid-path-of-our-key-file": (_our_key_file, INVALID, "TOKEN_INVALID"),
    "kid-relative-path-of-our-key": (lambda t, h: theirs(f"../keys/{h.ctx.keys.signer(h.clock.now()).kid}")(t, h),
                                     INVALID, "TOKEN_INVALID"),
    "no-kid": (ours(unchanged, lambda kid: {"typ": TOKEN_TYPE}), INVALID, "TOKEN_INVALID"),
    "embedded-jwk-no-kid": (theirs(None, embed_jwk=True), INVALID, "TOKEN_INVALID"),
    "missing-aud": (ours(_drop("aud")), INVALID, "TOKEN_INVALID"),
    "wrong-aud-another-platform": (ours(_set(aud="otherplatform")), DENIED, "TOKEN_WRONG_AUDIENCE"),
    "missing-exp": (ours(_drop("exp")), INVALID, "TOKEN_INVALID"),
    "exp-not-a-number": (ours(_set(exp=lambda c, h: str(c["exp"]))), INVALID, "TOKEN_INVALID"),
    "missing-nbf": (ours(_drop("nbf")), INVALID, "TOKEN_INVALID"),
    "missing-iat": (ours(_drop("iat")), INVALID, "TOKEN_INVALID"),
    "not-valid-yet": (ours(_set(nbf=lambda c, h: c["nbf"] + 3600)), INVALID, "TOKEN_INVALID"),
    "wrong-issuer": (ours(_set(iss="urn:someone-else")), INVALID, "TOKEN_INVALID"),
    "typ-jwt": (ours(unchanged, lambda kid: {"kid": kid, "typ": "JWT"}), INVALID, "TOKEN_INVALID"),
    "no-typ": (ours(unchanged, lambda kid: {"kid": kid}), INVALID, "TOKEN_INVALID"),
    "no-such-activation": (ours(_set(entitlement=lambda c, h: rid())), INVALID, "TOKEN_INVALID"),
    "another-jti": (ours(_set(jti=lambda c, h: rid())), INVALID, "TOKEN_INVALID"),
}


@pytest.mark.parametrize("attack", list(ATTACKS), ids=list(ATTACKS))
def test_token_attacks_are_refused_and_bind_nothing(api: Api, harness: Harness, attack: str) -> None:
    forge, code, reason = ATTACKS[attack]
    resp = api.activate()
    forged = forge(resp.activation_token, harness)
    assert forged != resp.activation_token
    account = "acct-" + rid()
    f = expect_error(api.platform.RedeemActivationToken,
                     activation_pb2.RedeemActivationTokenRequest(token=forged, account_id=account), code)
    assert f.reason == reason, f
    assert resp.activation_token not in f.message and forged not in f.message
    # Nothing bound: not the activation, not the account.
    assert bound_account(api, resp.activation.name) == ""
    assert not api.platform.VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(account_id=account)).active
    # The genuine token was not used up.
    assert redeem(api, resp.activation_token, account).activation == resp.activation.name


def test_a_token_redeems_on_a_clock_a_little_behind_the_one_that_signed_it(api: Api, harness: Harness) -> None:
    """Another server process whose clock runs 30 s behind the signer's still redeems a fresh token
    (its `nbf` is the signing instant); an `nbf` an hour ahead stays refused ("not-valid-yet")."""
    resp = api.activate()
    with clock_at(harness, harness.clock.now() - dt.timedelta(seconds=30)):
        assert redeem(api, resp.activation_token, "acct-" + rid()).activation == resp.activation.name


def test_a_token_is_expired_from_its_exp_second(api: Api, harness: Harness) -> None:
    """`exp` gets no leeway (tokens.verify): a token redeemed at its `exp` instant is TOKEN_EXPIRED
    and binds nothing; one second earlier it redeems."""
    resp = api.activate()
    exp = dt.datetime.fromtimestamp(_claims(resp.activation_token)["exp"], dt.timezone.utc)
    account = "acct-" + rid()
    with clock_at(harness, exp):
        f = expect_error(api.platform.RedeemActivationToken, activation_pb2.RedeemActivationTokenRequest(
            token=resp.activation_token, account_id=account), grpc.StatusCode.FAILED_PRECONDITION)
        assert f.reason == "TOKEN_EXPIRED", f
    assert bound_account(api, resp.activation.name) == ""
    with clock_at(harness, exp - dt.timedelta(seconds=1)):
        assert redeem(api, resp.activation_token, account).activation == resp.activation.name


def test_no_token_outlives_the_access_it_grants(api: Api, harness: Harness) -> None:
    """`exp` is capped at the end of access: midnight after the end date in the service's time zone
    (Europe/Paris: 23:00 UTC in winter), not midnight UTC, an hour later. The token lifetime is
    stretched past the activation's end for the call, so the cap is what sets `exp`."""
    ctx = harness.ctx
    settings = ctx.settings
    object.__setattr__(ctx, "settings", dataclasses.replace(settings, token_ttl_days=800))
    try:
        resp = api.activate()
    finally:
        object.__setattr__(ctx, "settings", settings)
    claims = jwt.decode(resp.activation_token, options={"verify_signature": False})
    e = resp.activation.end_date
    ends = dt.datetime.combine(dt.date(e.year, e.month, e.day) + dt.timedelta(days=1), dt.time(),
                               ZoneInfo("Europe/Paris"))
    assert ends.astimezone(dt.timezone.utc).hour in (22, 23)
    assert claims["exp"] == int(ends.timestamp())


# ----------------------------------------------------------------------- jose, another language

def node_problem() -> str | None:
    if shutil.which("node") is None:
        return "node is not on PATH"
    if not (NODE_DIR / "node_modules" / "jose").is_dir():
        return "tests/node/node_modules is missing (`npm ci --prefix tests/node`, which `make test` runs)"
    return None


def require_node() -> None:
    problem = node_problem()
    if problem is None:
        return
    if IN_CI:
        pytest.fail(f"{problem}: CI requires the jose cross-check of tokens")
    pytest.skip(f"{problem}; skipping the jose cross-check of tokens")


def node_verify(tmp: Path, jwks: dict[str, Any], token: str, h: Harness, *, audience: str = "openclassrooms",
                now: int | None = None) -> tuple[int, str, str]:
    """Run tests/node/verify.mjs; (exit code, stdout, stderr)."""
    name = rid()
    (tmp / f"{name}.jwks.json").write_text(json.dumps(jwks))
    (tmp / f"{name}.token").write_text(token)
    proc = subprocess.run(
        ["node", str(NODE_DIR / "verify.mjs"), "--jwks", str(tmp / f"{name}.jwks.json"),
         "--token", str(tmp / f"{name}.token"), "--audience", audience, "--issuer", h.ctx.settings.issuer,
         "--now", str(int(h.clock.now().timestamp()) if now is None else now)],
        capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def test_jose_on_node_verifies_our_tokens_with_our_jwks(api: Api, harness: Harness, tmp_path: Path) -> None:
    require_node()
    resp = api.activate()
    token, jwks = resp.activation_token, rpc_jwks(api)
    code, out, err = node_verify(tmp_path, jwks, token, harness)
    assert code == 0, err
    payload = json.loads(out)
    assert payload == _claims(token)
    assert payload["entitlement"] == resp.activation.name.split("/", 1)[1]
    assert payload["aud"] == "openclassrooms" and payload["iss"] == harness.ctx.settings.issuer

    header, body, sig = token.split(".")
    i = len(body) // 2
    tampered = ".".join((header, body[:i] + ("A" if body[i] != "A" else "B") + body[i + 1:], sig))
    code, out, err = node_verify(tmp_path, jwks, tampered, harness)
    assert code == 1 and out == "" and "refused" in err, (code, out, err)
    # jose applies the other checks too: another platform, and after exp.
    code, _out, err = node_verify(tmp_path, jwks, token, harness, audience="otherplatform")
    assert code == 1 and "aud" in err, err
    code, _out, err = node_verify(tmp_path, jwks, token, harness, now=payload["exp"] + 1)
    assert code == 1 and "ERR_JWT_EXPIRED" in err, err
    # And it knows nothing of a key that is not in the JWKS.
    code, _out, err = node_verify(tmp_path, {"keys": []}, token, harness)
    assert code == 1, err
