"""TLS for STARTTLS and implicit TLS: a certificate on disk, created on first start.

``load_context`` returns a server ``SSLContext``. With no certificate given, a
self-signed one for the hostname is generated once into the data directory
(``tls-cert.pem`` and ``tls-key.pem``, the key readable by the owner only) and
reused on every later start, as a fresh Postfix install uses its snakeoil pair.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CERT_NAME = "tls-cert.pem"
KEY_NAME = "tls-key.pem"


def ensure_self_signed(data_dir: Path, hostname: str) -> tuple[Path, Path]:
    """Return (cert, key) in ``data_dir``, creating a self-signed pair if absent."""
    cert_path, key_path = data_dir / CERT_NAME, data_dir / KEY_NAME
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    data_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    # X.509 allows 64 characters in a CN; the full name goes in the SAN (IDNA-encoded).
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64] or "localhost")])
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        try:
            alt = x509.DNSName(hostname.encode("idna").decode("ascii"))
        except UnicodeError:
            alt = x509.DNSName("localhost")
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def load_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for ``cert``/``key``; ``ValueError`` says which file is bad."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from exc
    return context
