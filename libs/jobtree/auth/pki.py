"""A local certificate authority: the CA, the gateway's server certificate, client certificates.

Contract: `ensure_ca(directory)` creates `ca.crt` and `ca.key` in `directory` unless both exist
(then they are reused), and returns the CA; `ensure_server(directory, hosts)` does the same
for `server.crt`/`server.key`, a certificate for the names and IP addresses in `hosts`, signed by
the CA (and re-issued when it was signed by another CA, lacks one of the hosts or expires within
30 days); `issue_client(directory, name)` writes `<name>.crt`/`<name>.key`, a client certificate
whose subject common name is `name` (the identity the gateway's policy knows it by). Keys are
ECDSA P-256, files of keys mode 0600. Every certificate is valid from an hour ago (clock skew)
for `days` days. This is what `jobtree up` uses on one machine; a deployment brings its own
certificates (cert-manager, a corporate CA) and only points the gateway at the files.
Not: the gateway's TLS setup (`jobtree.services.gateway`), not the policy (`jobtree.auth.policy`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CA_DAYS", "CERT_DAYS", "Authority", "ensure_ca", "ensure_server", "issue_client", "write_file"]

CA_DAYS = 3650
CERT_DAYS = 825
RENEW_BEFORE = dt.timedelta(days=30)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")


@dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path


def write_file(path: Path, data: bytes, private: bool) -> None:
    """Write `data` to `path` atomically; mode 0600 when `private` (keys, tokens, policies)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _save(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_file(directory / f"{stem}.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), private=True)
    write_file(directory / f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM), private=False)


def _load(directory: Path, stem: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    crt, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    if not (crt.exists() and key.exists()):
        return None
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key}: not an ECDSA key")
    return x509.load_pem_x509_certificate(crt.read_bytes()), private


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _builder(subject: str, issuer: x509.Name | None, public: ec.EllipticCurvePublicKey, days: int) -> x509.CertificateBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = _now()
    return (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=days)))


def ensure_ca(directory: Path, name: str = "jobtree local CA") -> Authority:
    """The CA of `directory`, created on first use."""
    found = _load(directory, "ca")
    if found is None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (_builder(name, None, key.public_key(), CA_DAYS)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        _save(directory, "ca", cert, key)
        found = (cert, key)
    return Authority(found[0], found[1], directory / "ca.crt")


def _sans(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def _issue(ca: Authority, name: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName], days: int
           ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (_builder(name, ca.cert.subject, key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca.key, hashes.SHA256()), key


def _current(cert: x509.Certificate, ca: Authority, sans: list[x509.GeneralName]) -> bool:
    if cert.issuer != ca.cert.subject or cert.not_valid_after_utc - RENEW_BEFORE < _now():
        return False
    try:
        cert.verify_directly_issued_by(ca.cert)
        have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return all(san in have for san in sans)


def ensure_server(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = CERT_DAYS) -> Path:
    """`server.crt` for `hosts`, signed by the CA of `directory` (reused while still right); its path."""
    ca = ensure_ca(directory)
    sans = _sans(hosts)
    found = _load(directory, "server")
    if found is None or not _current(found[0], ca, sans):
        cert, key = _issue(ca, hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, sans, days)
        _save(directory, "server", cert, key)
    return directory / "server.crt"


def issue_client(directory: Path, name: str, days: int = CERT_DAYS) -> tuple[Path, Path]:
    """A client certificate for identity `name`, signed by the CA of `directory`: (cert, key) paths."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"identity: must be 1-128 letters, digits or ._@:- (starting with a letter or digit), got {name!r}")
    ca = ensure_ca(directory)
    cert, key = _issue(ca, name, ExtendedKeyUsageOID.CLIENT_AUTH, [], days)
    stem = f"client-{name}"
    _save(directory, stem, cert, key)
    return directory / f"{stem}.crt", directory / f"{stem}.key"
