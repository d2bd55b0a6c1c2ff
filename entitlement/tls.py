"""TLS for the server and the CLI client, and a local test CA (`entitlement tls make-ca DIR`).

Server: ENTITLEMENT_TLS_CERT_FILE + ENTITLEMENT_TLS_KEY_FILE (PEM) switch TLS on; with
ENTITLEMENT_TLS_CLIENT_CA_FILE every client must also present a certificate signed by that CA
(mutual TLS; a platform is then identified by its certificate, see entitlement/api/identity.py).
Without TLS the server listens only on loopback addresses unless ENTITLEMENT_INSECURE=1.

make-ca writes, in DIR: ca.crt / ca.key (a CA for local tests, 10 years), server.crt / server.key
(for localhost, 127.0.0.1 and ::1) and, per client caller id, CALLER.crt / CALLER.key whose subject
CN is the caller id and whose URI SAN is `urn:entitlement:caller:CALLER`. Keys are ECDSA P-256,
written 0600. Not for production: use your PKI there.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CALLER_URI_PREFIX = "urn:entitlement:caller:"


class TransportError(RuntimeError):
    """The transport settings are unusable or unsafe: the server does not start."""


# ------------------------------------------------------------------------------------ settings

def is_loopback(listen: str) -> bool:
    """Whether a listen address (`host:port`, `[v6]:port`) only accepts local connections."""
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, 0.0.0.0, [::], ...


@dataclass(frozen=True)
class ServerTLS:
    key: bytes
    cert: bytes
    client_ca: bytes | None


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TransportError(f"{what} {path}: cannot read ({exc.strerror})") from None


def server_tls(cert_file: str, key_file: str, client_ca_file: str) -> ServerTLS | None:
    if not cert_file and not key_file:
        if client_ca_file:
            raise TransportError("ENTITLEMENT_TLS_CLIENT_CA_FILE needs ENTITLEMENT_TLS_CERT_FILE and "
                                 "ENTITLEMENT_TLS_KEY_FILE (mutual TLS is TLS first)")
        return None
    if not cert_file or not key_file:
        raise TransportError("set both ENTITLEMENT_TLS_CERT_FILE and ENTITLEMENT_TLS_KEY_FILE")
    return ServerTLS(key=_read(key_file, "ENTITLEMENT_TLS_KEY_FILE"), cert=_read(cert_file, "ENTITLEMENT_TLS_CERT_FILE"),
                     client_ca=_read(client_ca_file, "ENTITLEMENT_TLS_CLIENT_CA_FILE") if client_ca_file else None)


def check_transport(listen: str, tls: ServerTLS | None, insecure: bool) -> None:
    """Refuse plaintext on an address other machines can reach, unless explicitly allowed."""
    if tls is None and not insecure and not is_loopback(listen):
        raise TransportError(
            f"refusing to serve without TLS on {listen}, which is not a loopback address: bearer tokens "
            "and job seekers' identities would cross the network in clear. Set ENTITLEMENT_TLS_CERT_FILE "
            "and ENTITLEMENT_TLS_KEY_FILE (try `entitlement tls make-ca DIR` for a test CA), or "
            "ENTITLEMENT_INSECURE=1 if TLS is terminated in front of this server")


# ------------------------------------------------------------------------------------ test CA

def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, private: bool) -> None:
    if private:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        path.chmod(0o600)
    else:
        path.write_bytes(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "entitlement local test CA", days: int = 3650) -> "Authority":
        key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    def issue(self, common_name: str, *, server: bool, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
              uris: tuple[str, ...] = (), days: int = 825) -> tuple[bytes, bytes]:
        """A leaf certificate signed by this CA: (certificate PEM, key PEM)."""
        key = _key()
        now = dt.datetime.now(dt.timezone.utc)
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        names += [x509.UniformResourceIdentifier(u) for u in uris]
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(
                       [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return _pem_cert(builder.sign(self.key, hashes.SHA256())), _pem_key(key)

    @property
    def cert_pem(self) -> bytes:
        return _pem_cert(self.cert)

    @property
    def key_pem(self) -> bytes:
        return _pem_key(self.key)


@dataclass(frozen=True)
class MadeCA:
    dir: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]  # caller id -> (certificate, key)


def make_ca(directory: Path, clients: list[str], *, force: bool = False) -> MadeCA:
    """A local test CA, a server certificate for localhost/127.0.0.1/::1 and one client certificate
    per caller id, written to `directory` (refuses to overwrite unless `force`)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_path = directory / "ca.crt"
    if ca_path.exists() and not force:
        raise FileExistsError(f"{ca_path} exists; use another folder or --force to replace it")
    ca = Authority.create()
    _write(ca_path, ca.cert_pem, private=False)
    _write(directory / "ca.key", ca.key_pem, private=True)
    cert, key = ca.issue("localhost", server=True, dns=("localhost",), ips=("127.0.0.1", "::1"))
    _write(directory / "server.crt", cert, private=False)
    _write(directory / "server.key", key, private=True)
    made: dict[str, tuple[Path, Path]] = {}
    for caller_id in clients:
        cert, key = ca.issue(caller_id, server=False, uris=(CALLER_URI_PREFIX + caller_id,))
        c, k = directory / f"{caller_id}.crt", directory / f"{caller_id}.key"
        _write(c, cert, private=False)
        _write(k, key, private=True)
        made[caller_id] = (c, k)
    return MadeCA(directory, ca_path, directory / "server.crt", directory / "server.key", made)
