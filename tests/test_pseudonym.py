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
    """The values stored in every database so far: person_key and person_ref as first defined."""
    key = os.urandom(32)
    p = Pseudonymizer(key)
    for agency_id in ("1234567A", "", "\u00e9t\u00e9-99", "x" * 64):
        person_key = hmac.digest(key, b"person\x00" + agency_id.encode(), "sha256")
        assert p.person_key(agency_id) == person_key
        assert p.person_ref(person_key) == hmac.new(key, b"ref\x00" + person_key, hashlib.sha256).hexdigest()[:32]
