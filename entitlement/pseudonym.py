"""Keyed pseudonyms: how job seekers appear everywhere except in the registry lookup itself.

HMAC-SHA256 with a secret kept apart from the database (a file, not a table): someone holding a
database dump cannot recompute a pseudonym from an agency id, and audit output and logs carry
only pseudonyms.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path


class Pseudonymizer:
    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("pseudonym key must be at least 32 bytes")
        self._key = key

    @classmethod
    def from_file(cls, path: Path, *, create: bool = False) -> "Pseudonymizer":
        """Loads the key; with create=True makes one (0600) when missing (local demo and tests)."""
        if not path.exists():
            if not create:
                raise SystemExit(
                    f"pseudonym key file {path} is missing; create one with "
                    f"`entitlement secrets init` or set ENTITLEMENT_PSEUDONYM_KEY_FILE"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
        return cls(bytes.fromhex(path.read_text().strip()))

    def person_key(self, agency_id: str) -> bytes:
        """Registry lookup key of a job seeker: 32 bytes, stored instead of the agency id."""
        return hmac.digest(self._key, b"person\x00" + agency_id.encode(), "sha256")

    def person_ref(self, person_key: bytes) -> str:
        """The pseudonym shown in activations, audit output and logs (hex, 32 chars)."""
        return hmac.new(self._key, b"ref\x00" + person_key, hashlib.sha256).hexdigest()[:32]

    def platform_subject(self, platform_id: str, person_key: bytes) -> str:
        """Per-platform pseudonym (`sub` of tokens): two platforms cannot link their users."""
        msg = b"sub\x00" + platform_id.encode() + b"\x00" + person_key
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:32]

    def derive(self, label: str) -> bytes:
        """A secondary secret for another purpose (e.g. signing page tokens), never the key itself."""
        return hmac.new(self._key, b"derive\x00" + label.encode(), hashlib.sha256).digest()
