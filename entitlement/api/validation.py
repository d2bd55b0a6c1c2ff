"""Request validation at the edge: required fields from the proto's own AIP-203 annotations, and
the formats of names, dates and ids. Every violation of a request is reported at once."""

from __future__ import annotations

import datetime as dt
import re

from google.api import field_behavior_pb2
from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.type import date_pb2

from entitlement import callers
from entitlement.errors import Violations
from entitlement.pseudonym import normalize_agency_id

PROGRAM_NAME_RE = re.compile(r"^programs/([a-z][a-z0-9-]{1,62})$")
ACTIVATION_NAME_RE = re.compile(r"^activations/([0-9a-f]{32})$")
PLATFORM_NAME_RE = re.compile(r"^platforms/([A-Za-z0-9][A-Za-z0-9._-]{0,62})$")
AGENCY_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ACCOUNT_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")
# Its rule as errors state it: printable ASCII, where the space is not ("printable ASCII" alone
# named the space among what is accepted: found by a review).
ACCOUNT_ID_RULE = "1 to 128 printable ASCII characters, no space"
MAX_REASON = 500


_MESSAGE, _STRING, _OTHER = 0, 1, 2


def _is_required(f: FieldDescriptor) -> bool:
    return field_behavior_pb2.REQUIRED in f.GetOptions().Extensions[field_behavior_pb2.field_behavior]


def _required_fields(descriptor: Descriptor) -> tuple[tuple[str, int, bool], ...]:
    """(name, kind, whether to look inside) of the REQUIRED fields (per the proto annotations),
    read once per message type; a message field is looked inside only when its type has REQUIRED
    fields of its own (a google.type.Date has none: check_required would find nothing there)."""
    found = _REQUIRED.get(descriptor)
    if found is None:
        found = _REQUIRED[descriptor] = tuple(
            (f.name, _MESSAGE if f.type == FieldDescriptor.TYPE_MESSAGE else
             _STRING if f.type == FieldDescriptor.TYPE_STRING else _OTHER,
             f.message_type is not None and any(_is_required(g) for g in f.message_type.fields))
            for f in descriptor.fields if _is_required(f))
    return found


_REQUIRED: dict[Descriptor, tuple[tuple[str, int, bool], ...]] = {}


def check_required(msg: Message, v: Violations, prefix: str = "") -> None:
    """Add a violation for each REQUIRED field (per the proto annotations) that is unset, recursively."""
    for name, kind, inside in _required_fields(msg.DESCRIPTOR):
        if kind == _MESSAGE:
            if not msg.HasField(name):
                v.add(prefix + name, "is required")
            elif inside:
                check_required(getattr(msg, name), v, prefix + name + ".")
        elif kind == _STRING and not getattr(msg, name):
            v.add(prefix + name, "is required")


def date(d: date_pb2.Date, field: str, v: Violations, *, required: bool = False) -> dt.date | None:
    """The civil date, or None when empty (a violation if `required`) or invalid (a violation)."""
    if d.year == 0 and d.month == 0 and d.day == 0:
        if required:
            v.add(field, "is required")
        return None
    try:
        return dt.date(d.year, d.month, d.day)
    except ValueError:
        v.add(field, "must be a complete, valid calendar date")
        return None


# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799


def timestamp(ts: timestamp_pb2.Timestamp, field: str, v: Violations) -> dt.datetime | None:
    """An aware UTC datetime, or None with a violation when outside the Timestamp range."""
    if not (_MIN_SECONDS <= ts.seconds <= _MAX_SECONDS and 0 <= ts.nanos <= 999_999_999):
        v.add(field, "must be a valid timestamp between years 1 and 9999")
        return None
    return ts.ToDatetime(tzinfo=UTC)


def name(value: str, pattern: re.Pattern[str], field: str, example: str, v: Violations) -> str:
    """The id inside a resource name, or '' with a violation."""
    if not value:
        return ""
    m = pattern.fullmatch(value)
    if not m:
        v.add(field, f"must look like {example}")
        return ""
    return m.group(1)


def text(value: str, field: str, v: Violations, *, maximum: int = MAX_REASON) -> str:
    if len(value) > maximum:
        v.add(field, f"must be at most {maximum} characters")
    elif any((ord(c) < 32 and c != "\t") or 127 <= ord(c) < 160 for c in value):
        # C0 but tab, DEL and C1 (U+009B is a terminal's CSI): a reason is shown by the CLI and kept
        # for good in the event log.
        v.add(field, "must not contain control characters")
    return value


_DATE_PARTS = re.compile(r"(?<![0-9])([0-9]{1,4})[/.-]([0-9]{1,2})[/.-]([0-9]{1,4})(?![0-9])")
_EIGHT_DIGITS = re.compile(r"(?<![0-9])[0-9]{8}(?![0-9])")


def free_of_identity(value: str, field: str, agency_id: str, birth: object, v: Violations) -> None:
    """A free text (an activation's reason) must not hold the job seeker's identifiant or birth date,
    the two personal data the request carries: the reason is kept for ever in the append-only event
    log, which funders read and `privacy purge` never erases. The identifiant as a word of its own,
    any case (from 4 characters: shorter ones are words); the birth date as written in France or in
    ISO form (17/05/1990, 17-05-1990, 17.05.1990, 17/5/1990, 1990-05-17, 1990/05/17, 17051990,
    19900517). Names the service never sees, so it cannot refuse them. (Precompiled patterns only:
    one built from each request's values cost 0.2 ms an activation.)"""
    if value and (_holds_word(value.upper(), agency_id) or (isinstance(birth, dt.date) and _holds_date(value, birth))):
        v.add(field, "must not contain the job seeker's identifier or birth date: it is kept for ever in the "
                     "event log, which funders read")


def _holds_word(text: str, word: str) -> bool:
    """`word` (4 characters or more) in `text`, not inside a longer run of letters and digits."""
    if len(word) < 4:
        return False
    at = text.find(word)
    while at >= 0:
        end = at + len(word)
        if (at == 0 or not text[at - 1].isalnum()) and (end == len(text) or not text[end].isalnum()):
            return True
        at = text.find(word, at + 1)
    return False


def _holds_date(text: str, day: dt.date) -> bool:
    for a, b, c in _DATE_PARTS.findall(text):
        if (int(b) == day.month and ((len(c) == 4 and int(c) == day.year and int(a) == day.day)
                                     or (len(a) == 4 and int(a) == day.year and int(c) == day.day))):
            return True
    compact = (f"{day.day:02d}{day.month:02d}{day.year:04d}", f"{day.year:04d}{day.month:02d}{day.day:02d}")
    return any(m in compact for m in _EIGHT_DIGITS.findall(text))


def agency_id(value: str, field: str, v: Violations) -> str:
    """The agency's identifiant in its canonical form (entitlement.pseudonym.normalize_agency_id:
    trimmed, upper-cased), with a violation unless that is 1 to 32 letters or digits. (Empty: left
    to check_required.)"""
    canonical = normalize_agency_id(value)
    if value and not AGENCY_ID_RE.fullmatch(canonical):
        v.add(field, "1 to 32 letters or digits")
    return canonical


def pattern(value: str, regex: re.Pattern[str], field: str, description: str, v: Violations) -> str:
    if value and not regex.fullmatch(value):
        v.add(field, description)
    return value

MENTOR_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MENTOR_ID_RULE = "1 to 64 letters, digits, '.', '_' or '-', the first a letter or a digit"
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
FUNDER_RE = re.compile(r"^[a-z][a-z0-9-]{1,62}$")
AGENCY_CODE_RE = callers.AGENCY_CODE_RE  # any agency code a caller can have
MONTH_RE = re.compile(r"^20[0-9]{2}-(0[1-9]|1[0-2])$")  # as audit.MONTH_RE: 2000-01 to 2099-12
UTC = dt.timezone.utc
