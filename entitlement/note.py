"""Signed notes (C2SP signed-note) and transparency-log checkpoints (C2SP tlog-checkpoint), with
Ed25519 keys only. Pure: no files, no database.

A signed note is a text ending in a newline, a blank line, then signature lines

    — <key name> base64(key ID || signature)

(em dash U+2014, space, name, space, signature, newline). The signature is Ed25519 (RFC 8032) over
the text, final newline included. The key ID is the first 4 bytes (big-endian uint32) of
SHA-256(key name || 0x0A || 0x01 || 32-byte public key), 0x01 being the Ed25519 signature type.

A verifier key is the text `<name>+<key ID as 8 hex digits>+base64(0x01 || public key)` (the
encoding of golang.org/x/mod/sumdb/note, which signed-note formalises).

A checkpoint is a signed note whose text is the log's origin, the tree size in decimal and the
root hash in base64, one per line (extension lines are accepted when reading, never written).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALG_ED25519 = 0x01
SIGNATURE_PREFIX = "\u2014 "  # em dash, space
MAX_SIGNATURES = 16  # signed-note: verifiers must accept at least 16
_SIZE_RE = re.compile(r"^(0|[1-9][0-9]{0,19})$")


class NoteError(ValueError):
    """A malformed note, key or checkpoint, or a signature that does not verify."""


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise NoteError(f"{what} is not valid base64") from None


def valid_name(name: str) -> bool:
    """Key names and origins: non-empty, no Unicode space, no '+'."""
    return bool(name) and "+" not in name and not any(c.isspace() for c in name) and _no_controls(name)


def _no_controls(text: str) -> bool:
    return not any(ord(c) < 0x20 and c != "\n" for c in text)


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(name: str, public_key: bytes) -> bytes:
    """The 4-byte key ID of an Ed25519 key (signed-note)."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public_key).digest()[:4]


@dataclass(frozen=True)
class Verifier:
    name: str
    key_id: bytes
    public_key: Ed25519PublicKey

    @classmethod
    def from_public_key(cls, name: str, public_key: bytes) -> "Verifier":
        if not valid_name(name):
            raise NoteError(f"invalid key name {name!r}: it must be non-empty, without spaces or '+'")
        if len(public_key) != 32:
            raise NoteError("an Ed25519 public key is 32 bytes")
        return cls(name, key_id(name, public_key), Ed25519PublicKey.from_public_bytes(public_key))

    @classmethod
    def parse(cls, vkey: str) -> "Verifier":
        """Read `<name>+<8 hex digits>+<base64(0x01 || key)>`, checking the key ID."""
        parts = vkey.strip().split("+", 2)  # the base64 key may itself hold '+'
        if len(parts) != 3:
            raise NoteError("a verifier key is <name>+<key ID, 8 hex digits>+<base64 key>")
        name, hex_id, b64 = parts
        if not re.fullmatch(r"[0-9a-fA-F]{8}", hex_id):
            raise NoteError("the key ID of a verifier key is 8 hexadecimal digits")
        raw = _b64decode(b64, "the key of the verifier key")
        if not raw or raw[0] != ALG_ED25519:
            raise NoteError("only Ed25519 verifier keys (type 0x01) are supported")
        verifier = cls.from_public_key(name, raw[1:])
        if verifier.key_id.hex() != hex_id.lower():
            raise NoteError("the key ID of the verifier key does not match its name and key")
        return verifier

    def encode(self) -> str:
        raw = bytes([ALG_ED25519]) + _raw_public(self.public_key)
        return f"{self.name}+{self.key_id.hex()}+{base64.b64encode(raw).decode()}"

    def verify(self, text: bytes, signature: bytes) -> bool:
        try:
            self.public_key.verify(signature, text)
            return True
        except InvalidSignature:
            return False


@dataclass(frozen=True)
class Signer:
    name: str
    private_key: Ed25519PrivateKey

    def __post_init__(self) -> None:
        if not valid_name(self.name):
            raise NoteError(f"invalid key name {self.name!r}: it must be non-empty, without spaces or '+'")

    @property
    def verifier(self) -> Verifier:
        return Verifier.from_public_key(self.name, _raw_public(self.private_key.public_key()))

    def sign(self, text: str) -> str:
        """The signed note: text, blank line, one signature line."""
        data = _check_text(text)
        signature = self.verifier.key_id + self.private_key.sign(data)
        return f"{text}\n{SIGNATURE_PREFIX}{self.name} {base64.b64encode(signature).decode()}\n"


def _check_text(text: str) -> bytes:
    if not text.endswith("\n"):
        raise NoteError("a note text ends with a newline")
    if not _no_controls(text):
        raise NoteError("a note contains no control character other than newline")
    return text.encode("utf-8")


def open_note(message: str, verifier: Verifier) -> str:
    """The text of a signed note, once a signature of `verifier`'s key verifies. Signatures of other
    keys are ignored; a signature of this key that does not verify rejects the note."""
    if not _no_controls(message):
        raise NoteError("a note contains no control character other than newline")
    split = message.rfind("\n\n")
    if split < 0:
        raise NoteError("not a signed note: no blank line before the signatures")
    text, signatures = message[: split + 1], message[split + 2:]
    if not signatures.endswith("\n"):
        raise NoteError("not a signed note: the signature lines must end with a newline")
    lines = signatures[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"more than {MAX_SIGNATURES} signatures")
    verified = False
    data = text.encode("utf-8")
    for line in lines:
        if not line.startswith(SIGNATURE_PREFIX):
            raise NoteError(f"malformed signature line {line[:40]!r}")
        name, _, b64 = line[len(SIGNATURE_PREFIX):].partition(" ")
        if not valid_name(name) or not b64 or " " in b64:
            raise NoteError(f"malformed signature line {line[:40]!r}")
        raw = _b64decode(b64, "a signature")
        if len(raw) < 5:
            raise NoteError("a signature is a 4-byte key ID and the signature bytes")
        if name != verifier.name or raw[:4] != verifier.key_id:
            continue  # another key: ignored (signed-note)
        if not verifier.verify(data, raw[4:]):
            raise NoteError(f"the signature of {verifier.name} does not verify: the note was altered "
                            f"or signed by another key")
        verified = True
    if not verified:
        raise NoteError(f"the note has no signature of the key {verifier.name}+{verifier.key_id.hex()}")
    return text


# -------------------------------------------------------------------------------- checkpoints

@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        """The note text (tlog-checkpoint): origin, size, base64 root hash, one per line."""
        if not valid_name(self.origin):
            raise NoteError(f"invalid origin {self.origin!r}")
        lines = [self.origin, str(self.size), base64.b64encode(self.root_hash).decode(), *self.extensions]
        return "\n".join(lines) + "\n"


def parse_checkpoint(text: str) -> Checkpoint:
    """A checkpoint's note text (already verified) as a Checkpoint."""
    lines = text.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise NoteError("a checkpoint has at least three lines: origin, tree size, root hash")
    origin, size, root, *extensions = lines[:-1]
    if not origin:
        raise NoteError("the checkpoint's origin line is empty")
    if not _SIZE_RE.fullmatch(size) or int(size) >= 1 << 63:
        raise NoteError(f"the checkpoint's tree size {size[:30]!r} is not a decimal number without leading zeros")
    root_hash = _b64decode(root, "the checkpoint's root hash")
    if len(root_hash) != 32:
        raise NoteError("the checkpoint's root hash is not 32 bytes")
    if any(not line for line in extensions):
        raise NoteError("a checkpoint's extension lines are not empty")
    return Checkpoint(origin, int(size), root_hash, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, signer: Signer) -> str:
    return signer.sign(checkpoint.text())


def open_checkpoint(message: str, verifier: Verifier, *, origin: str | None = None) -> Checkpoint:
    """Verify a signed checkpoint and read it. The origin must be the expected one (by default,
    the key's name, as tlog-checkpoint recommends logs to sign)."""
    checkpoint = parse_checkpoint(open_note(message, verifier))
    expected = origin if origin is not None else verifier.name
    if checkpoint.origin != expected:
        raise NoteError(f"the checkpoint is of the log {checkpoint.origin!r}, not {expected!r}")
    return checkpoint


def private_key_from_seed(seed: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(seed)
