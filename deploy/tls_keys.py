"""The PEM files TLS uses, read and checked with a message that says what to fix: private keys,
certificates and pinned public keys; and a self-signed certificate for a key."""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import ipaddress
import re
import secrets

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from deploy.config import TLSConfigError

PrivateKeyTypes = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


MINIMUM_RSA_BITS = 2048


SELF_SIGNED_VALIDITY = datetime.timedelta(days=3653)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"cannot read {what} {path}: {e.strerror or e}") from e


def spki_der(public_key: object) -> bytes:
    """A public key as DER SubjectPublicKeyInfo: what a pin compares."""
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def fingerprint(der: bytes) -> str:
    """sha256 of a DER SubjectPublicKeyInfo, in hex."""
    # Same value as: openssl pkey -pubin -in public.pem -outform DER | sha256sum
    return hashlib.sha256(der).hexdigest()


def load_private_key(path: str) -> PrivateKeyTypes:
    """Load an unencrypted PEM private key: RSA (PKCS#1 or PKCS#8), EC, Ed25519 or Ed448."""
    data = _read(path, "private key")
    if b"PRIVATE KEY-----" not in data:
        if b"PUBLIC KEY-----" in data:
            raise TLSConfigError(
                f"{path} holds a public key; the server needs the private key "
                f"(openssl genrsa 2048 > private.pem)"
            )
        raise TLSConfigError(f"{path} is not a PEM private key (openssl genrsa 2048 > private.pem)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as e:
        raise TLSConfigError(
            f"private key {path} is encrypted; decrypt it (openssl pkey -in {path} -out NEW.pem)"
        ) from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TLSConfigError(f"cannot load private key {path}: {e}") from e
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MINIMUM_RSA_BITS:
            raise TLSConfigError(
                f"private key {path} is {key.key_size}-bit RSA; TLS needs at least "
                f"{MINIMUM_RSA_BITS} bits (openssl genrsa 2048 > private.pem)"
            )
    elif not isinstance(key, PrivateKeyTypes):
        raise TLSConfigError(f"private key {path} is a {type(key).__name__}; use an RSA or EC key")
    return key


def public_key_fingerprint(private_key_path: str) -> str:
    """sha256 of the public half of a private key, as a pin mismatch reports a server's key and
    ``openssl pkey -pubin -in public.pem -outform DER | openssl dgst -sha256`` prints it."""
    return fingerprint(spki_der(load_private_key(private_key_path).public_key()))


def load_certificates(path: str, what: str) -> list[x509.Certificate]:
    """The PEM certificates of `path` (`what` names the file in errors)."""
    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSConfigError(f"{what} {path} holds no PEM certificate ({e})") from e


def _signature_hash(key: PrivateKeyTypes) -> hashes.SHA256 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def self_signed_certificate(key: PrivateKeyTypes, common_name: str = "deploy") -> x509.Certificate:
    """A certificate for ``key``, signed by itself: what a pinning client needs from a server.

    SAN: ``common_name``, ``localhost``, 127.0.0.1 and ::1; valid from a day ago for ten years.
    """
    names: list[x509.GeneralName] = []
    for name in (common_name, "localhost", "127.0.0.1", "::1"):
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            entry = x509.DNSName(name)
        if entry not in names:
            names.append(entry)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(secrets.randbits(159) + 1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + SELF_SIGNED_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _signature_hash(key))
    )


def load_pinned_key(path: str) -> bytes:
    """DER SubjectPublicKeyInfo of a PEM public key, or of the key in a PEM certificate."""
    data = _read(path, "public key")
    if b"PRIVATE KEY-----" in data:
        raise TLSConfigError(
            f"{path} holds a private key; give the client the public key "
            f"(openssl rsa -in {path} -pubout > public.pem)"
        )
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return spki_der(x509.load_pem_x509_certificate(data).public_key())
        return spki_der(serialization.load_pem_public_key(data))
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TLSConfigError(
            f"{path} is not a PEM public key or certificate "
            f"(openssl rsa -in private.pem -pubout > public.pem): {e}"
        ) from e


PIN_PREFIX = b"sha256//"
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.S)


def _block_spki(block: bytes, kind: bytes, path: str) -> bytes:
    try:
        if kind == b"CERTIFICATE":
            return spki_der(x509.load_pem_x509_certificate(block).public_key())
        if kind.endswith(b"PUBLIC KEY"):
            return spki_der(serialization.load_pem_public_key(block))
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TLSConfigError(f"{path}: a PEM block is not a public key or certificate: {e}") from e
    raise TLSConfigError(
        f"{path} holds a {kind.decode()}; a pin file holds public keys, certificates or "
        "sha256//<base64> pins"
    )


def load_pins(path: str) -> list[bytes]:
    """The sha256 digests of the keys a pin file names: one or several PEM public keys or
    certificates, and/or ``sha256//<base64>`` lines (RFC 7469 pin-sha256 values, as
    ``openssl pkey -pubin -outform DER | openssl dgst -sha256 -binary | base64`` prints them)."""
    data = _read(path, "public key")
    pins: list[bytes] = []
    for number, line in enumerate(data.splitlines(), start=1):
        line = line.strip()
        if line.startswith(PIN_PREFIX):
            try:
                digest = base64.b64decode(line[len(PIN_PREFIX) :], validate=True)
            except (binascii.Error, ValueError):
                digest = b""
            if len(digest) != hashlib.sha256().digest_size:
                raise TLSConfigError(f"{path}:{number}: not a sha256//<base64> pin")
            pins.append(digest)
    blocks = list(_PEM_BLOCK.finditer(data))
    if not pins and len(blocks) <= 1:
        # One key: the messages of the single-key reader say what to fix.
        return [hashlib.sha256(load_pinned_key(path)).digest()]
    if b"PRIVATE KEY-----" in data:
        load_pinned_key(path)  # raises with the message that says what to give instead
    pins += [hashlib.sha256(_block_spki(b[0], b[1], path)).digest() for b in blocks]
    return pins


# A check looks at one certificate of the server's chain as OpenSSL's verify callback sees it
# and returns why it is refused, or None.
