"""The pseudonyms' HMAC with precomputed states (entitlement/pseudonym.py PrefixedHmac) is HMAC."""

from __future__ import annotations

import hashlib
import hmac
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from entitlement.pseudonym import PrefixedHmac, Pseudonymizer


@settings(max_examples=300, deadline=None)
@given(key=st.binary(min_size=0, max_size=200), prefix=st.binary(max_size=80), message=st.binary(max_size=300))
def test_prefixed_hmac_is_hmac_sha256(key: bytes, prefix: bytes, message: bytes) -> None:
    h = PrefixedHmac(key, prefix)
    assert h.digest(message) == hmac.digest(key, prefix + message, "sha256")
    assert h.digest(message) == h.digest(message)  # the precomputed states are not consumed


def test_pseudonyms_are_unchanged() -> None:
    """The values stored in every database so far: person_key and person_ref as first defined, for
    an identifiant in its canonical form (trimmed; ASCII letters in upper case: the agency's own).
    Another spelling of it (lower case, surrounding spaces) is the same person: its canonical key."""
    key = os.urandom(32)
    p = Pseudonymizer(key)
    for agency_id in ("1234567A", "", "\u00e9t\u00e9-99", "X" * 64):
        person_key = hmac.digest(key, b"person\x00" + agency_id.encode(), "sha256")
        assert p.person_key(agency_id) == person_key
        assert p.person_ref(person_key) == hmac.new(key, b"ref\x00" + person_key, hashlib.sha256).hexdigest()[:32]
    for spelling, canonical in (("1234567a", "1234567A"), (" 1234567A\t", "1234567A"), ("x" * 64, "X" * 64)):
        assert p.person_key(spelling) == hmac.digest(key, b"person\x00" + canonical.encode(), "sha256")
