"""Keyed pseudonyms: how job seekers appear everywhere except in the registry lookup itself.

HMAC-SHA256 with a secret kept apart from the database (a file, not a table): someone holding a
database dump cannot recompute a pseudonym from an agency id, and audit output and logs carry
only pseudonyms.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from entitlement import keyfiles


def normalize_agency_id(raw: str) -> str:
    """The agency's `identifiant` in its one canonical form: surrounding whitespace removed, letters
    upper-cased. The agency does not tell `1234567a` from `1234567A`, so neither may this service:
    every path that turns an identifiant into a person key (checks, activations, registry imports,
    the live status source) goes through here (`Pseudonymizer.person_key` applies it too). Only an
    ASCII identifiant is upper-cased: a non-ASCII one is left as it is, for validation to refuse it
    (str.upper would turn the dotless 'ı' into an ASCII 'I' and the long 'ſ' into 'S')."""
    text = raw.strip()
    return text.upper() if text.isascii() else text


class PrefixedHmac:
    """HMAC-SHA256(key, prefix || message) (RFC 2104), with the hash states after the padded key
    and the prefix computed once: a pseudonym is computed at every check, and OpenSSL's one-shot
    HMAC sets its context up again each time (2.5x the cost; tests/test_pseudonym.py holds the two
    equal)."""

    def __init__(self, key: bytes, prefix: bytes = b"") -> None:
        if len(key) > 64:  # SHA-256's block size
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key) + prefix)
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()  # (hashlib objects copy under their own lock: thread-safe)
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def create_key_file(path: Path) -> None:
    """A new pseudonym key (32 random bytes, hex), mode 0600, its folder 0700 when missing
    (`entitlement secrets init`). Never replaces one (FileExistsError): every pseudonym stored
    was made with it."""
    keyfiles.create_private(path, secrets.token_hex(32).encode())


class Pseudonymizer:
    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("pseudonym key must be at least 32 bytes")
        self._key = key
        self._person = PrefixedHmac(key, b"person\x00")
        self._ref = PrefixedHmac(key, b"ref\x00")

    @classmethod
    def from_file(cls, path: Path, *, create: bool = False) -> "Pseudonymizer":
        """Loads the key; with create=True makes one (0600) when missing (local demo and tests)."""
        if not path.exists():
            if not create:
                raise SystemExit(
                    f"pseudonym key file {path} is missing; create one with "
                    f"`entitlement secrets init` or set ENTITLEMENT_PSEUDONYM_KEY_FILE"
                )
            try:
                create_key_file(path)
            except FileExistsError:
                pass  # made by another process meanwhile
        return cls(bytes.fromhex(path.read_text().strip()))

    def person_key(self, agency_id: str) -> bytes:
        """Registry lookup key of a job seeker: 32 bytes, stored instead of the agency id. The id
        is normalised first (`normalize_agency_id`): its case and surrounding spaces never matter."""
        return self._person.digest(normalize_agency_id(agency_id).encode())

    def legacy_person_key(self, agency_id: str) -> bytes:
        """The key versions before `normalize_agency_id` made of an identifiant, spaces trimmed and
        its case as written: differs from `person_key` for an identifiant with lower-case letters,
        whose activations a registry import re-keys (entitlement/registry.py `_rekey`)."""
        return self._person.digest(agency_id.strip().encode())

    def person_ref(self, person_key: bytes) -> str:
        """The pseudonym shown in activations, audit output and logs (hex, 32 chars)."""
        return self._ref.digest(person_key).hex()[:32]

    def platform_subject(self, platform_id: str, person_key: bytes) -> str:
        """Per-platform pseudonym (`sub` of tokens): two platforms cannot link their users."""
        msg = b"sub\x00" + platform_id.encode() + b"\x00" + person_key
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:32]

    def derive(self, label: str) -> bytes:
        """A secondary secret for another purpose (e.g. signing page tokens), never the key itself."""
        return hmac.new(self._key, b"derive\x00" + label.encode(), hashlib.sha256).digest()
