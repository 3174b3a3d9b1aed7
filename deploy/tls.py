"""pyOpenSSL context factories: server from a private key (+ optional certificate, else
self-signed), client pinning a public key or checking a CA with service_identity; optional client
certificates. The files are read by `deploy.tls_keys`; the daemons' endpoint is
`deploy.tls_endpoint`; what a failure means is `deploy.tls_failures`'s."""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from deploy.config import TLSConfigError
from deploy.tls_failures import (
    TLSVerificationError,
    describe_tls_failure,  # noqa: F401  (re-exported for callers)
    openssl_reasons,
)
from deploy.tls_keys import (
    PrivateKeyTypes,
    fingerprint,
    load_certificates,
    load_pins,
    load_private_key,
    self_signed_certificate,
    spki_der,
)

if TYPE_CHECKING:
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    from deploy.config import ServerSettings

MINIMUM_TLS_VERSION = TLSVersion.TLSv1_2
ALPN_PROTOCOL = b"http/1.1"

log = Logger()

# X509_V_ERR_* codes meaning "no chain from this certificate to a trusted CA".
_UNTRUSTED_CHAIN_ERRORS = frozenset({2, 7, 18, 19, 20, 21, 24, 27, 28})
_X509_V_ERR_CERT_NOT_YET_VALID = 9
_X509_V_ERR_CERT_HAS_EXPIRED = 10

NEEDS_VERIFICATION_MESSAGE = "TLS needs --ssl-public-key or --ssl-ca"


def _openssl_certificate(certificate: x509.Certificate) -> X509:
    # Trust stores (X509Store.add_cert) still want pyOpenSSL's X509.
    return X509.from_cryptography(certificate)


def _key_and_chain(key_path: str, certificate_path: str, what: str) -> dict[str, Any]:
    """CertificateOptions arguments for a key and its certificate (+ intermediates) file."""
    key = load_private_key(key_path)
    chain = load_certificates(certificate_path, f"{what} certificate")
    if spki_der(chain[0].public_key()) != spki_der(key.public_key()):
        raise TLSConfigError(
            f"{what} certificate {certificate_path} does not match private key {key_path}"
        )
    return _options_for(key, chain)


def _options_for(key: PrivateKeyTypes, chain: list[x509.Certificate]) -> dict[str, Any]:
    # CertificateOptions hands these straight to Context.use_certificate/use_privatekey/
    # add_extra_chain_cert, which take cryptography objects and warn (pyOpenSSL >= 25) for the
    # pyOpenSSL X509/PKey wrappers Twisted's signature still names.
    return {"privateKey": key, "certificate": chain[0], "extraCertChain": chain[1:] or None}


def _built(options: CertificateOptions, files: str) -> CertificateOptions:
    # Build the context now, so a problem OpenSSL finds stops the daemon at start, not at the
    # first connection.
    try:
        options.getContext()
    except SSL.Error as e:
        raise TLSConfigError(f"TLS setup from {files} failed: {openssl_reasons(e)}") from e
    return options


def _warn_if_expired(certificate: x509.Certificate, path: str) -> None:
    # Pinning clients do not care, CA clients will refuse it: worth a warning, not a refusal.
    now = datetime.datetime.now(datetime.UTC)
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        log.warn(
            "certificate {path} is valid only from {start} to {end}; clients checking a CA "
            "will refuse it",
            path=path,
            start=certificate.not_valid_before_utc.isoformat(),
            end=certificate.not_valid_after_utc.isoformat(),
        )


def server_context_factory(
    private_key_path: str,
    certificate_path: str | None = None,
    client_ca_path: str | None = None,
) -> IOpenSSLServerConnectionCreator:
    """TLS ≥ 1.2 server options; with ``client_ca_path``, clients must show a certificate signed
    by a CA in that file."""
    if certificate_path is None:
        key = load_private_key(private_key_path)
        kwargs = _options_for(key, [self_signed_certificate(key)])
    else:
        kwargs = _key_and_chain(private_key_path, certificate_path, "server")
        _warn_if_expired(kwargs["certificate"], certificate_path)
    if client_ca_path is not None:
        client_cas = load_certificates(client_ca_path, "client CA")
        kwargs.update(
            verify=True,
            caCerts=[_openssl_certificate(c) for c in client_cas],
            requireCertificate=True,
        )
    options = CertificateOptions(raiseMinimumTo=MINIMUM_TLS_VERSION, **kwargs)
    files = ", ".join(p for p in (private_key_path, certificate_path, client_ca_path) if p)
    built = _built(options, files)
    # Twisted's own ALPN callback answers b"" when it shares no protocol with the client, which
    # OpenSSL turns into an "internal error" alert: curl, `openssl s_client -alpn` and most
    # monitoring probes could not connect. Select http/1.1 when offered, else go on without.
    built.getContext().set_alpn_select_callback(select_alpn)
    return built


def select_alpn(connection: SSL.Connection, offered: list[bytes]) -> Any:
    """The server's ALPN choice: `http/1.1` (what the daemons speak) when the client offers it,
    else no protocol (the handshake goes on, as with a client that offers none)."""
    return ALPN_PROTOCOL if ALPN_PROTOCOL in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def server_context_from_settings(server: ServerSettings) -> IOpenSSLServerConnectionCreator | None:
    """The TLS a daemon's `[server]` settings ask for; None when `ssl` is off.

    Cheap enough to call twice: once to check the files while the options are parsed (where
    twistd prints a UsageError as one line) and once to listen."""
    if not server.ssl:
        return None
    if not server.ssl_private_key:
        raise TLSConfigError("ssl = true needs ssl_private_key")
    return server_context_factory(
        server.ssl_private_key, server.ssl_certificate, server.ssl_client_ca
    )


_Check = Callable[[X509, int, int, bool], str | None]


def _pin_check(pins: Collection[bytes], path: str) -> _Check:
    """Passes a leaf whose key's sha256 is one of `pins` (several: a key and its backup)."""

    def check(certificate: X509, errno: int, depth: int, ok: bool) -> str | None:
        # The pin is the identity: the chain and the host name do not matter, only the leaf's key.
        if depth != 0:
            return None
        server_der = spki_der(certificate.to_cryptography().public_key())
        if hashlib.sha256(server_der).digest() in pins:
            return None
        return (
            f"server key does not match pinned public key {path} "
            f"(server key sha256 {fingerprint(server_der)})"
        )

    return check


def _is_ip_address(hostname: str) -> bool:
    return isIPAddress(hostname) or isIPv6Address(hostname)


def _server_name(hostname: str) -> bytes | None:
    """The SNI name to send: none for an IP address, as RFC 6066 says."""
    if _is_ip_address(hostname):
        return None
    try:
        return hostname.encode("idna")
    except UnicodeError as e:
        raise TLSConfigError(f"invalid host name {hostname!r}: {e}") from e


def _ca_check(hostname: str, ca_path: str) -> _Check:
    service_id: DNS_ID | IPAddress_ID
    try:
        service_id = IPAddress_ID(hostname) if _is_ip_address(hostname) else DNS_ID(hostname)
    except ValueError as e:
        raise TLSConfigError(f"invalid host name {hostname!r}: {e}") from e

    def check(certificate: X509, errno: int, depth: int, ok: bool) -> str | None:
        if not ok:
            which = (
                "server certificate" if depth == 0 else f"certificate {depth} of the server chain"
            )
            if errno in _UNTRUSTED_CHAIN_ERRORS:
                return f"server certificate is not signed by the CA in {ca_path}"
            if errno == _X509_V_ERR_CERT_HAS_EXPIRED:
                return f"{which} has expired"
            if errno == _X509_V_ERR_CERT_NOT_YET_VALID:
                return f"{which} is not valid yet (check the clocks)"
            return f"{which} failed verification against {ca_path} (OpenSSL verify error {errno})"
        if depth != 0:
            return None
        try:
            verify_service_identity(extract_patterns(certificate), [service_id], [])
        except VerificationError:
            return f"server certificate does not match host {hostname}"
        except CertificateError:
            # No subjectAltName: a bare common name is not accepted as a host name.
            return f"server certificate does not match host {hostname} (it has no subjectAltName)"
        return None

    return check


@implementer(IOpenSSLClientConnectionCreator)
class VerifyingClientCreator:
    """Client connections whose certificate check runs inside the handshake.

    A refusal aborts the handshake before any application byte is written, and is handed to the
    protocol's ``connectionLost`` as a :class:`TLSVerificationError` carrying the reason.
    """

    def __init__(
        self, options: CertificateOptions, server_name: bytes | None, checks: list[_Check]
    ) -> None:
        self.options = options
        self.server_name = server_name
        self._checks = checks

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self.options.clientConnectionForTLS(tlsProtocol)
        if self.server_name is not None:
            connection.set_tlsext_host_name(self.server_name)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify_callback(tlsProtocol)
        )
        return connection

    def _verify_callback(self, tls_protocol: TLSMemoryBIOProtocol) -> Callable[..., bool]:
        # Held only until the first refusal, so the connection does not keep its protocol alive.
        holder = [tls_protocol]

        def verify(
            connection: SSL.Connection, certificate: X509, errno: int, depth: int, ok: int
        ) -> bool:
            problem = None
            try:
                for check in self._checks:
                    problem = check(certificate, errno, depth, bool(ok))
                    if problem is not None:
                        break
            except Exception:
                # An exception escaping an OpenSSL callback would surface from the handshake as a
                # non-SSL error that Twisted does not expect; refuse instead.
                log.failure("while verifying the server certificate")
                problem = "internal error while verifying the server certificate"
            if problem is None:
                return True
            if holder:
                holder.pop().failVerification(Failure(TLSVerificationError(problem)))
            return False

        return verify


def client_context_factories(
    *,
    public_key_path: str | Sequence[str] | None = None,
    ca_path: str | None = None,
    cert_path: str | None = None,
    key_path: str | None = None,
) -> Callable[[str], IOpenSSLClientConnectionCreator]:
    """Load the files once and return ``hostname -> creator``; what a fan-out over many hosts
    wants (the proxy, the client). Arguments and checks as for :func:`client_context_factory`;
    ``public_key_path`` may name several pin files (a server matching any pin passes)."""
    pin_paths = (
        [public_key_path] if isinstance(public_key_path, str) else [*(public_key_path or ())]
    )
    # From here on, the pin files as messages name them.
    public_key_path = ", ".join(pin_paths) or None
    if public_key_path is None and ca_path is None:
        raise TLSConfigError(NEEDS_VERIFICATION_MESSAGE)
    if (cert_path is None) != (key_path is None):
        raise TLSConfigError("--ssl-cert and --ssl-key must be given together")
    kwargs: dict[str, Any] = {}
    if cert_path is not None and key_path is not None:
        kwargs = _key_and_chain(key_path, cert_path, "client")
    if ca_path is not None:
        cas = load_certificates(ca_path, "CA")
        kwargs["trustRoot"] = trustRootFromCertificates(
            [Certificate(_openssl_certificate(c)) for c in cas]
        )
    pin = None
    if pin_paths:
        pin = _pin_check({d for p in pin_paths for d in load_pins(p)}, public_key_path or "")
    options = CertificateOptions(raiseMinimumTo=MINIMUM_TLS_VERSION, **kwargs)
    files = ", ".join(p for p in (public_key_path, ca_path, cert_path, key_path) if p)
    # One context for every host: what differs per host (SNI, host name check) is set per
    # connection by VerifyingClientCreator.
    options = _built(options, files)

    def for_host(hostname: str) -> IOpenSSLClientConnectionCreator:
        checks: list[_Check] = []
        if ca_path is not None:
            checks.append(_ca_check(hostname, ca_path))
        if pin is not None:
            checks.append(pin)
        return VerifyingClientCreator(options, _server_name(hostname), checks)

    return for_host


def client_context_factory(
    hostname: str,
    *,
    public_key_path: str | None = None,
    ca_path: str | None = None,
    cert_path: str | None = None,
    key_path: str | None = None,
) -> IOpenSSLClientConnectionCreator:
    """TLS ≥ 1.2 client that pins a public key, or checks chain and host name against a CA.

    Given both, both checks apply. ``cert_path``/``key_path`` add a client certificate.
    """
    return client_context_factories(
        public_key_path=public_key_path, ca_path=ca_path, cert_path=cert_path, key_path=key_path
    )(hostname)
