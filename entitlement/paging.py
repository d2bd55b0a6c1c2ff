"""AIP-158 page tokens: opaque, signed (HMAC), and bound to the filters they were issued for, so a
token cannot be forged, edited, or replayed with other filters (INVALID_ARGUMENT)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from entitlement.errors import InvalidArgument


class PageTokens:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._secret, body, hashlib.sha256).digest()[:16]

    def issue(self, kind: str, filters: dict[str, Any], position: list[Any]) -> str:
        body = json.dumps({"k": kind, "f": _digest(filters), "p": position}, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(self._mac(body) + body).rstrip(b"=").decode()

    def read(self, token: str, kind: str, filters: dict[str, Any]) -> list[Any] | None:
        """The position encoded in `token`, or None for the first page."""
        if not token:
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except ValueError:
            raise InvalidArgument.single("page_token", "malformed page token") from None
        mac, body = raw[:16], raw[16:]
        if len(raw) < 17 or not hmac.compare_digest(mac, self._mac(body)):
            raise InvalidArgument.single("page_token", "malformed page token")
        doc = json.loads(body)
        if doc.get("k") != kind or doc.get("f") != _digest(filters):
            raise InvalidArgument.single("page_token", "page token was issued for a different request; "
                                         "repeat the same filters or start without a token")
        position = doc.get("p")
        assert isinstance(position, list)
        return position


def _digest(filters: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(filters, sort_keys=True, default=str).encode()).hexdigest()[:16]


def page_size(value: int, *, default: int, maximum: int) -> int:
    if value < 0:
        raise InvalidArgument.single("page_size", "must not be negative")
    return min(value or default, maximum)  # AIP-158: larger sizes are coerced to the maximum
