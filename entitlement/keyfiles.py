"""Private key files (token signing keys, the event log's checkpoint key, the pseudonym key): made,
written atomically with mode 0600, and the Ed25519 ones read back with a reason when they are
unusable."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def new_pem() -> bytes:
    """A new Ed25519 key as PKCS#8 PEM."""
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def write_private(path: Path, data: bytes, *, replace: bool = True) -> None:
    """Write under a temp name readers ignore, then move into place (readers see all or nothing).
    With replace=False an existing file is never overwritten (FileExistsError)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def create_private(path: Path, data: bytes) -> None:
    """A new secret file that must never be replaced (FileExistsError when it exists): written as
    write_private does, in its folder, made 0700 when missing."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(path, data, replace=False)


def load_ed25519(path: Path) -> Ed25519PrivateKey:
    """The key of a PKCS#8 PEM file; ValueError saying why it is unusable (a key type `cryptography`
    does not know raises UnsupportedAlgorithm, not a ValueError: it is one too here)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a readable PKCS#8 PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    return key
