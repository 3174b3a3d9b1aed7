"""Keys for the TLS tests, made as operators make them: RSA pairs from the openssl command, and
the key usage of a certificate authority's certificate."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

OPENSSL = shutil.which("openssl")

# What a CA certificate may be used for: signing certificates and revocation lists.
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def rsa_pair(directory: Path, stem: str) -> tuple[Path, Path]:
    """As operators do: openssl genrsa 2048 > private.pem; openssl rsa -pubout > public.pem (the
    same with cryptography where there is no openssl command)."""
    private, public = directory / f"{stem}-private.pem", directory / f"{stem}-public.pem"
    if OPENSSL:
        private.write_bytes(
            subprocess.run([OPENSSL, "genrsa", "2048"], check=True, capture_output=True).stdout
        )
        public.write_bytes(
            subprocess.run(
                [OPENSSL, "rsa", "-in", str(private), "-pubout"], check=True, capture_output=True
            ).stdout
        )
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        write_pair(key, private, public, serialization.PrivateFormat.TraditionalOpenSSL)
    return private, public


def ec_pair(directory: Path, stem: str) -> tuple[Path, Path]:
    """A private key and its public key, PEM (EC: made in a moment, where RSA takes seconds)."""
    private, public = directory / f"{stem}-private.pem", directory / f"{stem}-public.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    write_pair(key, private, public, serialization.PrivateFormat.PKCS8)
    return private, public


def write_pair(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    private: Path,
    public: Path,
    form: serialization.PrivateFormat,
) -> None:
    """`key` as PEM in `private` (unencrypted, in `form`) and its public key in `public`."""
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
