"""Activation tokens: compact JWS, EdDSA over Ed25519, signed by keys from a key store.

PyJWT (>= 2.13) does the JOSE work; we add what a library cannot know: which key ids exist
(a `kid` is only ever looked up among the keys we loaded, never used as a path), which algorithm
we accept (EdDSA only, whatever the token header says), our token type, and required claims.

Key store: a folder (ENTITLEMENT_KEY_DIR) kept apart from the database. Each key is
`{kid}.pem` (PKCS#8 Ed25519, mode 0600) plus `{kid}.json`, its metadata:

- `created`: when the key was made;
- `sign_from`: the key is published in the JWKS from the moment its file exists, but signs only
  from this instant, so platforms that cache the JWKS learn it before meeting a token it signed;
- `retire_after`: set when a newer key takes over (= the newer key's `sign_from`). The retired key
  signs nothing after it, and stays published until every token it signed has expired, i.e.
  until `retire_after` + ENTITLEMENT_TOKEN_TTL_DAYS; then it leaves the JWKS and verification
  refuses it.

A key without metadata (deployments of before rotation, hand-made keys) is created and signs from
its file's mtime; a key superseded without a recorded `retire_after` retires when the next key (by
`sign_from`) starts signing; the newest key never retires, whatever its metadata says (a rotation
undone by deleting the new key's files before it signs leaves the old key signing). The signer is
the newest key whose `sign_from` has passed, per the service clock (every method takes `now`); when
no key has reached its `sign_from` yet (a first key, or a service clock behind the key files) the
earliest one signs.

`entitlement keys create|rotate|list` manage the folder. Files are written atomically (a temp
name, then a rename) and the metadata before the key, so a reader never sees a half-written key
or a new key without its `sign_from`. A running server re-reads the folder when it changed: on
use (signing, verifying, GetSigningKeys), at most every RELOAD_INTERVAL_S seconds, it compares
the names, mtimes and sizes of the files; a rotation needs no restart. A folder that cannot be
loaded (bad file name, unreadable key) stops the server from starting; at run time the keys
already loaded stay in force and the error is logged.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jwt
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from entitlement import keyfiles

TOKEN_TYPE = "entitlement-activation+jwt"
ALGORITHM = "EdDSA"
KID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
REQUIRED_CLAIMS = ["iss", "aud", "sub", "exp", "nbf", "iat", "jti", "program", "entitlement"]
# How far in the future a token's `nbf` may be when redeemed: another server process's clock may run
# a little ahead of the one that checks (the platforms' verifier allows the same, token_verifier.py
# DEFAULT_LEEWAY_S). `exp` gets none: the service's own clock says when access ends.
NBF_LEEWAY_S = 60
RELOAD_INTERVAL_S = 2.0  # a running server looks at the key folder at most this often
DEFAULT_TOKEN_TTL = dt.timedelta(days=30)
STATES = ("next", "signing", "retiring", "expired")

log = structlog.get_logger("entitlement.keys")


class TokenError(Exception):
    """A token we cannot accept. `reason` is TOKEN_INVALID, TOKEN_EXPIRED or TOKEN_WRONG_AUDIENCE."""

    def __init__(self, reason: str, message: str, claims: "TokenClaims | None" = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        # TOKEN_EXPIRED only: the claims of the token, whose signature, issuer and audience did
        # verify (a redemption replayed after the expiry still answers the binding it made).
        self.claims = claims


class KeyStoreError(Exception):
    """A key folder we cannot load or change; the message names the file and the fix."""


def _utc(t: dt.datetime) -> dt.datetime:
    if t.tzinfo is None:
        raise ValueError("key store instants must be timezone-aware")
    return t.astimezone(dt.timezone.utc)


def _second(t: dt.datetime) -> dt.datetime:
    """Whole seconds (what the metadata stores; token times are whole seconds too)."""
    return _utc(t).replace(microsecond=0)


def format_time(t: dt.datetime | None) -> str | None:
    return None if t is None else _utc(t).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: Any, field: str, where: Path) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise KeyStoreError(f"key metadata {where}: `{field}` must be an ISO 8601 instant with a "
                            f"time zone, like 2026-03-16T10:00:00Z; got {value!r}")
    return _utc(parsed)


@dataclass(frozen=True)
class KeyMeta:
    created: dt.datetime
    sign_from: dt.datetime
    retire_after: dt.datetime | None = None

    def to_json(self, kid: str) -> str:
        return json.dumps({"kid": kid, "created": format_time(self.created),
                           "sign_from": format_time(self.sign_from),
                           "retire_after": format_time(self.retire_after)}, indent=2) + "\n"

    @classmethod
    def from_file(cls, path: Path, kid: str) -> "KeyMeta":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise KeyStoreError(f"key metadata {path}: not readable JSON ({exc})") from None
        if not isinstance(data, dict):
            raise KeyStoreError(f"key metadata {path}: expected a JSON object")
        if data.get("kid", kid) != kid:
            raise KeyStoreError(f"key metadata {path}: kid {data.get('kid')!r} does not match the file name")
        created = _parse_time(data.get("created"), "created", path)
        sign_from = _parse_time(data.get("sign_from", data.get("created")), "sign_from", path)
        retire = data.get("retire_after")
        return cls(created, sign_from, None if retire is None else _parse_time(retire, "retire_after", path))


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: Ed25519PrivateKey
    created: dt.datetime
    sign_from: dt.datetime
    retire_after: dt.datetime | None = None  # as recorded in KID.json
    # Effective retirement: retire_after, or when the next key started signing; None while newest.
    retire_at: dt.datetime | None = None

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    def jwk(self) -> dict[str, str]:
        raw = self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.kid, "alg": ALGORITHM, "use": "sig"}

    @property
    def order(self) -> tuple[dt.datetime, bool, dt.datetime, str]:
        """Oldest first; of two keys signing from the same instant, the one recorded as retired
        (by a rotation without publication delay) comes first."""
        return (self.sign_from, self.retire_after is None, self.created, self.kid)


def _with_retirements(keys: list[SigningKey]) -> tuple[SigningKey, ...]:
    """Sorted by sign_from; each key's effective retirement is its recorded retire_after or, at the
    latest, the instant the next key starts signing (it signs nothing after that). The newest key
    never retires: a retire_after recorded for a key with no successor (the new key's files deleted
    before it signed, a rotation undone) would drop the key that still signs."""
    ordered = sorted(keys, key=lambda k: k.order)
    out = []
    for i, k in enumerate(ordered):
        if i + 1 == len(ordered):
            out.append(replace(k, retire_at=None))
            continue
        successor = ordered[i + 1].sign_from
        out.append(replace(k, retire_at=successor if k.retire_after is None else min(k.retire_after, successor)))
    return tuple(out)


@dataclass(frozen=True)
class KeyInfo:
    """One key as `entitlement keys list` shows it."""

    kid: str
    created: dt.datetime
    sign_from: dt.datetime
    retire_after: dt.datetime | None
    published_until: dt.datetime | None
    state: str

    def to_dict(self) -> dict[str, str | None]:
        return {"kid": self.kid, "created": format_time(self.created), "sign_from": format_time(self.sign_from),
                "retire_after": format_time(self.retire_after),
                "published_until": format_time(self.published_until), "state": self.state}


Fingerprint = tuple[tuple[str, int, int], ...]


def _fingerprint(directory: Path) -> Fingerprint:
    entries = []
    with os.scandir(directory) as it:
        for e in it:
            if e.name.endswith((".pem", ".json")):  # temp files of a write in progress end in .tmp
                st = e.stat()
                entries.append((e.name, st.st_mtime_ns, st.st_size))
    return tuple(sorted(entries))


def read_folder(directory: Path) -> list[SigningKey]:
    """Every KID.pem of the folder, with its KID.json when present. A KID.json without its key is
    ignored (a rotation being written, or a key removed by hand)."""
    if not directory.is_dir():
        raise KeyStoreError(f"key folder {directory} does not exist; create a key with `entitlement keys create`")
    keys = []
    for pem in sorted(directory.glob("*.pem")):
        kid = pem.name[: -len(".pem")]
        if not KID_RE.fullmatch(kid):
            raise KeyStoreError(f"key file {pem}: name must be KID.pem with KID of 8-64 [A-Za-z0-9_-] "
                                f"(a key id is never a path)")
        try:
            key = keyfiles.load_ed25519(pem)
        except ValueError as exc:
            raise KeyStoreError(f"key file {pem}: {exc}") from None
        meta_path = directory / f"{kid}.json"
        if meta_path.exists():
            meta = KeyMeta.from_file(meta_path, kid)
        else:
            mtime = dt.datetime.fromtimestamp(pem.stat().st_mtime, dt.timezone.utc)
            meta = KeyMeta(mtime, mtime)
        keys.append(SigningKey(kid, key, meta.created, meta.sign_from, meta.retire_after))
    if not keys:
        raise KeyStoreError(f"no signing key in {directory}; create one with `entitlement keys create`")
    return keys


class KeyStore:
    """The loaded keys; with a directory, re-read on use when the folder changed (see module doc)."""

    def __init__(self, keys: list[SigningKey], *, token_ttl: dt.timedelta = DEFAULT_TOKEN_TTL,
                 directory: Path | None = None, reload_interval_s: float = RELOAD_INTERVAL_S,
                 fingerprint: Fingerprint | None = None) -> None:
        if not keys:
            raise ValueError("no signing key")
        self._keys = _with_retirements(keys)
        self._token_ttl = token_ttl
        self._directory = directory
        self._reload_interval_s = reload_interval_s
        self._fingerprint = fingerprint
        self._failed: Fingerprint | None = None
        self._next_check = time.monotonic() + reload_interval_s
        self._lock = threading.Lock()

    @classmethod
    def load(cls, directory: Path, *, create: bool = False, now: dt.datetime | None = None,
             token_ttl: dt.timedelta = DEFAULT_TOKEN_TTL,
             reload_interval_s: float = RELOAD_INTERVAL_S) -> "KeyStore":
        """Load the folder (SystemExit with the fix when it cannot be). create=True (local demo,
        tests) makes a first key signing from `now` when the folder holds none."""
        now = now or dt.datetime.now(dt.timezone.utc)
        if create:
            directory.mkdir(parents=True, exist_ok=True)
            if not any(directory.glob("*.pem")):
                generate_key(directory, now=now)
        try:
            fingerprint = _fingerprint(directory) if directory.is_dir() else None
            store = cls(read_folder(directory), token_ttl=token_ttl, directory=directory,
                        reload_interval_s=reload_interval_s, fingerprint=fingerprint)
        except KeyStoreError as exc:
            raise SystemExit(str(exc)) from None
        if store._signer(now) is None:
            raise SystemExit(f"every signing key in {directory} has expired; make a new one with "
                             f"`entitlement keys rotate`")
        return store

    # ------------------------------------------------------------------------------ reloading

    def refresh(self, *, force: bool = False) -> bool:
        """Re-read the folder if its files changed; at most every reload_interval_s unless forced.
        True when a new key set was loaded. A folder that fails to load leaves the keys in force."""
        if self._directory is None:
            return False
        if not force and time.monotonic() < self._next_check:
            return False
        if not self._lock.acquire(blocking=force):
            return False  # another thread is looking at the folder; use the keys in force meanwhile
        try:
            self._next_check = time.monotonic() + self._reload_interval_s
            try:
                fingerprint = _fingerprint(self._directory)
            except OSError as exc:
                self._report(None, f"key folder {self._directory}: {exc}")
                return False
            if fingerprint == self._fingerprint or fingerprint == self._failed:
                return False
            try:
                keys = read_folder(self._directory)
            except KeyStoreError as exc:
                self._report(fingerprint, str(exc))
                return False
            self._keys, self._fingerprint, self._failed = _with_retirements(keys), fingerprint, None
            log.info("signing keys loaded", kids=[k.kid for k in self._keys])
            return True
        finally:
            self._lock.release()

    def _report(self, fingerprint: Fingerprint | None, error: str) -> None:
        if fingerprint is None or fingerprint != self._failed:
            log.error("signing keys not reloaded; the keys already loaded stay in force", error=error)
        self._failed = fingerprint

    # ------------------------------------------------------------------------------ questions

    def _expired(self, k: SigningKey, now: dt.datetime) -> bool:
        return k.retire_at is not None and now >= k.retire_at + self._token_ttl

    def _signer(self, now: dt.datetime) -> SigningKey | None:
        live = [k for k in self._keys if not self._expired(k, now)]
        started = [k for k in live if k.sign_from <= now]
        if started:
            return max(started, key=lambda k: k.order)
        return min(live, key=lambda k: k.order) if live else None

    def _state(self, k: SigningKey, now: dt.datetime, signer: SigningKey | None) -> str:
        if signer is not None and k.kid == signer.kid:
            return "signing"
        if self._expired(k, now):
            return "expired"
        return "next" if k.sign_from > now else "retiring"

    def signer(self, now: dt.datetime) -> SigningKey:
        """The key that signs at `now`."""
        self.refresh()
        key = self._signer(_utc(now))
        if key is None:
            raise KeyStoreError("every signing key has expired; make a new one with `entitlement keys rotate`")
        return key

    def get(self, kid: str, now: dt.datetime) -> SigningKey | None:
        """The published key with this id at `now`, or None (unknown, or dropped after retirement).
        The id is only compared with the ids of the loaded keys."""
        self.refresh()
        key = next((k for k in self._keys if k.kid == kid), None)
        return None if key is None or self._expired(key, _utc(now)) else key

    def published(self, now: dt.datetime) -> list[SigningKey]:
        self.refresh()
        now = _utc(now)
        return [k for k in self._keys if not self._expired(k, now)]

    def jwks(self, now: dt.datetime) -> dict[str, Any]:
        """Every key not yet dropped: the next one, the signer, those retiring."""
        return {"keys": [k.jwk() for k in self.published(now)]}

    def jwks_json(self, now: dt.datetime) -> str:
        return json.dumps(self.jwks(now), sort_keys=True, separators=(",", ":"))

    def describe(self, now: dt.datetime) -> list[KeyInfo]:
        """Every loaded key with its state at `now` (next, signing, retiring, expired)."""
        self.refresh()
        now = _utc(now)
        signer = self._signer(now)
        return [KeyInfo(k.kid, k.created, k.sign_from, k.retire_at,
                        None if k.retire_at is None else k.retire_at + self._token_ttl,
                        self._state(k, now, signer)) for k in self._keys]


# ---------------------------------------------------------------------------------- key files

def generate_key(directory: Path, *, now: dt.datetime | None = None, sign_from: dt.datetime | None = None) -> str:
    """A new key: metadata first, then the key (a reader never sees the key without its
    sign_from). By default it signs from its creation."""
    directory.mkdir(parents=True, exist_ok=True)
    created = _second(now or dt.datetime.now(dt.timezone.utc))
    kid = created.strftime("%Y%m%d") + "-" + secrets.token_hex(4)
    if (directory / f"{kid}.pem").exists():
        raise KeyStoreError(f"key {kid} already exists in {directory}")
    meta = KeyMeta(created, _second(sign_from) if sign_from else created)
    keyfiles.write_private(directory / f"{kid}.json", meta.to_json(kid).encode())
    keyfiles.write_private(directory / f"{kid}.pem", keyfiles.new_pem())
    return kid


def create_first_key(directory: Path, now: dt.datetime) -> str:
    """`entitlement keys create`: the first key of an empty folder, signing at once."""
    if directory.is_dir() and any(directory.glob("*.pem")):
        raise KeyStoreError(f"{directory} already holds signing keys; use `entitlement keys rotate` to "
                            f"replace the signer (a new key must be published before it signs)")
    return generate_key(directory, now=now)


@dataclass(frozen=True)
class Rotation:
    new_kid: str
    sign_from: dt.datetime
    previous_kid: str | None
    previous_dropped_after: dt.datetime | None


def rotate(directory: Path, now: dt.datetime, *, publish_for: dt.timedelta = dt.timedelta(hours=24),
           token_ttl: dt.timedelta = DEFAULT_TOKEN_TTL) -> Rotation:
    """`entitlement keys rotate`: a new key, published now, signing after `publish_for`; the key
    signing now retires at that instant (recorded in its metadata)."""
    if publish_for < dt.timedelta(0):
        raise KeyStoreError("the publication delay cannot be negative")
    now = _second(now)
    store = KeyStore(read_folder(directory), token_ttl=token_ttl, directory=None)
    waiting = [k for k in store.describe(now) if k.state == "next"]
    if waiting:
        raise KeyStoreError(f"key {waiting[0].kid} is already waiting to sign from "
                            f"{format_time(waiting[0].sign_from)}; rotate again after that")
    previous = store._signer(now)
    sign_from = now + publish_for
    kid = generate_key(directory, now=now, sign_from=sign_from)
    if previous is None:
        return Rotation(kid, sign_from, None, None)
    meta_path = directory / f"{previous.kid}.json"
    meta = KeyMeta(previous.created, previous.sign_from, sign_from)
    keyfiles.write_private(meta_path, meta.to_json(previous.kid).encode())
    return Rotation(kid, sign_from, previous.kid, sign_from + token_ttl)


# ------------------------------------------------------------------------------------- tokens

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


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@functools.lru_cache(maxsize=64)
def _header_segment(kid: str) -> str:
    """The protected header of every token `kid` signs, encoded as PyJWT encodes it (sorted keys,
    compact separators)."""
    return _b64url(json.dumps({"alg": ALGORITHM, "kid": kid, "typ": TOKEN_TYPE}, separators=(",", ":"),
                              sort_keys=True).encode())


def sign(keys: KeyStore, claims: TokenClaims, *, now: dt.datetime | None = None) -> str:
    """Sign with the key that signs at `now` (default: the token's issue instant, which is the
    service clock's). The compact JWS is built here, byte for byte what `jwt.encode(payload, key,
    algorithm="EdDSA", headers={"kid": kid, "typ": TOKEN_TYPE})` makes (Ed25519 signatures are
    deterministic; tests/test_tokens.py compares the two over random claims): PyJWT's encode costs
    more than the signature itself, once per activation."""
    payload = {"iss": claims.issuer, "aud": claims.platform_id, "sub": claims.subject,
               "program": claims.program_id, "entitlement": claims.activation_id, "jti": claims.jti,
               "iat": claims.issued_at, "nbf": claims.not_before, "exp": claims.expires_at}
    key = keys.signer(now or dt.datetime.fromtimestamp(claims.issued_at, dt.timezone.utc))
    signing_input = f"{_header_segment(key.kid)}.{_b64url(json.dumps(payload, separators=(',', ':')).encode())}"
    return f"{signing_input}.{_b64url(key.private.sign(signing_input.encode('ascii')))}"


def verify(keys: KeyStore, token: str, *, issuer: str, audience: str, now: dt.datetime) -> TokenClaims:
    """Verify signature, type, issuer, audience and validity period; EdDSA only; the key must be
    published at `now` (a key dropped after its retirement verifies nothing)."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise TokenError("TOKEN_INVALID", "token is not a compact JWS") from None
    if header.get("alg") != ALGORITHM:
        raise TokenError("TOKEN_INVALID", f"token algorithm must be {ALGORITHM}")
    if header.get("typ") != TOKEN_TYPE:
        raise TokenError("TOKEN_INVALID", f"token type must be {TOKEN_TYPE}")
    kid = header.get("kid")
    key = keys.get(kid, now) if isinstance(kid, str) else None
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
    verified = TokenClaims(claims["iss"], claims["aud"], claims["sub"], claims["program"], claims["entitlement"],
                           claims["jti"], claims["iat"], claims["nbf"], claims["exp"])
    if claims["exp"] <= ts:
        raise TokenError("TOKEN_EXPIRED", "token has expired", verified)
    if claims["nbf"] > ts + NBF_LEEWAY_S:
        raise TokenError("TOKEN_INVALID", "token is not valid yet")
    return verified


def decode_unverified(token: str) -> dict[str, Any]:
    """For display only (CLI): the payload without any check."""
    try:
        part = token.split(".")[1]
        return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))
    except (IndexError, ValueError):
        return {}
