"""Hypothesis strategies derived from the proto descriptors alone: every service of every
`entitlement/v1/*_pb2` module, every method, its input message and, recursively, every field
(scalars, strings, bytes, enums, repeated, maps, oneofs, nested and well-known messages).

Nothing here names an RPC or a field: a method added to the contract is fuzzed without a change.
Values are hostile on purpose (huge and negative numbers, enum numbers outside the enum, odd and
very long unicode, random bytes, missing fields, empty messages), mixed with values harvested from
the real server's own answers and valid requests (`Pool`): whole known messages, known messages
with some fields replaced by generated values, and known strings and dates in generated messages.
So some requests get past validation and exercise the deeper paths (transitions of real
activations, real tokens and identities with hostile dates, real program names).
"""

from __future__ import annotations

import datetime as dt
import importlib
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

import entitlement.v1

F = FieldDescriptor
INT32 = (-(2 ** 31), 2 ** 31 - 1)
INT64 = (-(2 ** 63), 2 ** 63 - 1)
UINT32 = (0, 2 ** 32 - 1)
UINT64 = (0, 2 ** 64 - 1)
RANGES = {F.TYPE_INT32: INT32, F.TYPE_SINT32: INT32, F.TYPE_SFIXED32: INT32,
          F.TYPE_INT64: INT64, F.TYPE_SINT64: INT64, F.TYPE_SFIXED64: INT64,
          F.TYPE_UINT32: UINT32, F.TYPE_FIXED32: UINT32, F.TYPE_UINT64: UINT64, F.TYPE_FIXED64: UINT64}
MAX_DEPTH = 4  # nesting bound, should a message ever contain itself
KNOWN_PER_TYPE = 50
ODD_TEXT = ["", " ", "\t", "\x00", "\x7f", "\u202e", "\u200b", "\ufeff", "\u2028", "\U0010ffff", "é",
            "e\u0301", "😀", "𝕏", "ß", "İ", "'; DROP TABLE activations; --", "%s%n", "{0}", "../../etc/passwd",
            "null", "-1", "0x7fffffff", "1e309", "NaN", "programs/", "activations/", "/", "//", "\\"]


@dataclass(frozen=True)
class Rpc:
    service: str  # full name, e.g. entitlement.v1.ActivationService
    method: MethodDescriptor

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method.name}"

    @property
    def client_streaming(self) -> bool:
        return bool(self.method.client_streaming)

    @property
    def server_streaming(self) -> bool:
        return bool(self.method.server_streaming)

    def request_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.input_type)

    def response_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.output_type)


def contract_modules() -> Iterator[Any]:
    """Every generated `*_pb2` module of the entitlement.v1 package."""
    for info in sorted(pkgutil.iter_modules(entitlement.v1.__path__), key=lambda m: m.name):
        if info.name.endswith("_pb2"):
            yield importlib.import_module(f"{entitlement.v1.__name__}.{info.name}")


def all_rpcs() -> list[Rpc]:
    """Every method of every service of the contract, from the descriptors."""
    out = []
    for module in contract_modules():
        for service in module.DESCRIPTOR.services_by_name.values():
            out.extend(Rpc(service.full_name, m) for m in service.methods)
    return sorted(out, key=lambda r: r.path)


@dataclass
class Pool:
    """Values the real server gave out (names, tokens, ids, dates), harvested from its responses:
    generated strings and dates are sometimes drawn from here."""

    strings: set[str] = field(default_factory=set)
    dates: set[tuple[int, int, int]] = field(default_factory=set)
    known: dict[str, set[bytes]] = field(default_factory=dict)  # message type -> serialized messages

    def harvest(self, msg: Message) -> None:
        """Remember `msg` (a valid request or an answer) and everything in it."""
        seen = self.known.setdefault(msg.DESCRIPTOR.full_name, set())
        if len(seen) < KNOWN_PER_TYPE:
            seen.add(msg.SerializeToString(deterministic=True))
        for fd, value in msg.ListFields():
            values = value if fd.is_repeated else [value]
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                values = list(value.values()) + list(value.keys())
            for v in values:
                if isinstance(v, Message):
                    if v.DESCRIPTOR.full_name == "google.type.Date":
                        self.dates.add((v.year, v.month, v.day))  # type: ignore[attr-defined]
                    self.harvest(v)
                elif isinstance(v, str) and v and len(v) <= 4096:
                    self.strings.add(v)
                    if "/" in v:  # a resource name: its id alone is a value somewhere else
                        self.strings.add(v.rsplit("/", 1)[1])


def _long_text() -> st.SearchStrategy[str]:
    return st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=6), st.integers(50, 20_000))


def text(pool: Pool) -> st.SearchStrategy[str]:
    """Strings: any unicode (no surrogates: protobuf strings are UTF-8), odd characters, very long
    ones, and values the server handed out, sometimes slightly edited."""
    base = [st.text(max_size=40), st.sampled_from(ODD_TEXT), _long_text(),
            st.text(alphabet=st.characters(max_codepoint=0x7f), max_size=80)]
    if pool.strings:
        known = st.sampled_from(sorted(pool.strings))
        base += [known, known,
                 st.builds(lambda k, extra: k + extra, known, st.sampled_from(ODD_TEXT + ["0", "x", "/x"])),
                 st.builds(lambda k: k[:-1], known), st.builds(str.upper, known)]
    return st.one_of(base)


def integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted(x for x in {lo, hi, 0, 1, -1, hi // 2 + 1, lo // 2} if lo <= x <= hi)
    return st.one_of(st.integers(-5, 1000).filter(lambda x: lo <= x <= hi), st.integers(lo, hi), st.sampled_from(edges))


def _timestamp() -> st.SearchStrategy[dict[str, Any]]:
    valid = st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31)).map(
        lambda d: {"seconds": int((d - dt.datetime(1970, 1, 1)).total_seconds()), "nanos": d.microsecond * 1000})
    return st.one_of(valid, st.fixed_dictionaries({}, optional={"seconds": integers(*INT64),
                                                                 "nanos": integers(*INT32)}))


def _date(pool: Pool) -> st.SearchStrategy[dict[str, Any]]:
    valid = st.dates().map(lambda d: {"year": d.year, "month": d.month, "day": d.day})
    options = [valid, st.fixed_dictionaries({}, optional={k: integers(*INT32) for k in ("year", "month", "day")})]
    if pool.dates:
        options.append(st.sampled_from(sorted(pool.dates)).map(lambda t: {"year": t[0], "month": t[1], "day": t[2]}))
    return st.one_of(options)


def scalar(fd: FieldDescriptor, pool: Pool) -> st.SearchStrategy[Any]:
    t = fd.type
    if t in RANGES:
        return integers(*RANGES[t])
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return text(pool)
    if t == F.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=8),
                                                           st.integers(100, 50_000)))
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return st.floats(width=64 if t == F.TYPE_DOUBLE else 32)
    if t == F.TYPE_ENUM:
        # proto3 enums are open: any int32 is accepted on the wire and must be handled.
        return st.one_of(st.sampled_from([v.number for v in fd.enum_type.values]), integers(*INT32))
    raise AssertionError(f"no strategy for field {fd.full_name} of type {t}")


def values(descriptor: Descriptor, pool: Pool, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """A dict of field values for `descriptor`: every field may be missing (the empty message is
    one of the values), at most one member of each oneof is set."""
    if descriptor.full_name == "google.protobuf.Timestamp":
        return _timestamp()
    if descriptor.full_name == "google.type.Date":
        return _date(pool)
    optional: dict[str, st.SearchStrategy[Any]] = {}
    oneofs = []
    for fd in descriptor.fields:
        if fd.containing_oneof is not None and not fd.containing_oneof.name.startswith("_"):
            continue  # real oneofs below; proto3 `optional` (synthetic oneofs) are plain fields
        strategy = _field(fd, pool, depth)
        if strategy is not None:
            optional[fd.name] = strategy
    for oneof in descriptor.oneofs:
        if oneof.name.startswith("_"):
            continue
        members = [(fd.name, _field(fd, pool, depth)) for fd in oneof.fields]
        oneofs.append(st.one_of(st.just({}), *[s.map(lambda v, n=n: {n: v}) for n, s in members if s is not None]))
    plain = st.fixed_dictionaries({}, optional=optional)
    if not oneofs:
        return plain
    return st.tuples(plain, *oneofs).map(lambda parts: {k: v for p in parts for k, v in p.items()})


def _field(fd: FieldDescriptor, pool: Pool, depth: int) -> st.SearchStrategy[Any] | None:
    if fd.type == F.TYPE_MESSAGE:
        if fd.message_type.GetOptions().map_entry:
            key, value = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            return st.dictionaries(scalar(key, pool), _field(value, pool, depth + 1) or st.nothing(), max_size=3)
        if depth >= MAX_DEPTH:
            return None
        one = messages(fd.message_type, pool, depth + 1)
    else:
        one = scalar(fd, pool)
    if fd.is_repeated:
        return st.lists(one, max_size=4)
    return one


def build(descriptor: Descriptor, data: dict[str, Any], base: Message | None = None) -> Message:
    """The message of `descriptor` (a copy of `base`, if given) with the generated values set."""
    msg = message_factory.GetMessageClass(descriptor)()
    if base is not None:
        msg.CopyFrom(base)
    for name, value in data.items():
        fd = descriptor.fields_by_name[name]
        msg.ClearField(name)
        if fd.type == F.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
            target = getattr(msg, name)
            for k, v in value.items():
                if isinstance(v, Message):
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif fd.type == F.TYPE_MESSAGE:
            if fd.is_repeated:
                getattr(msg, name).extend(_message(fd.message_type, v) for v in value)
            else:
                getattr(msg, name).CopyFrom(_message(fd.message_type, value))
        elif fd.is_repeated:
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    return msg


def _message(descriptor: Descriptor, value: Message | dict[str, Any]) -> Message:
    return value if isinstance(value, Message) else build(descriptor, value)


def messages(descriptor: Descriptor, pool: Pool, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`: generated ones and, when the pool knows some of this type, known
    ones as they are or with some fields replaced."""
    fresh = values(descriptor, pool, depth).map(lambda data: build(descriptor, data))
    known = sorted(pool.known.get(descriptor.full_name, ()))
    if not known:
        return fresh
    cls = message_factory.GetMessageClass(descriptor)
    parsed = st.sampled_from(known).map(cls.FromString)
    edited = st.tuples(parsed, values(descriptor, pool, depth)).map(lambda t: build(descriptor, t[1], base=t[0]))
    return st.one_of(fresh, parsed, edited)


def requests(rpc: Rpc, pool: Pool) -> st.SearchStrategy[Any]:
    """One request message, or for a client stream a few of them (none at all is a case too)."""
    one = messages(rpc.method.input_type, pool)
    return st.lists(one, max_size=4) if rpc.client_streaming else one


def field_paths(descriptor: Descriptor, prefix: str = "", depth: int = 0) -> set[str]:
    """Every dotted field path of a message (what a BadRequest field violation may name)."""
    out = set()
    for fd in descriptor.fields:
        out.add(prefix + fd.name)
        if fd.type == F.TYPE_MESSAGE and depth < MAX_DEPTH and not fd.message_type.GetOptions().map_entry:
            out |= field_paths(fd.message_type, f"{prefix}{fd.name}.", depth + 1)
    return out
