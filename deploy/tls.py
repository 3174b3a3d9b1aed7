"""pyOpenSSL context factories: server from a private key (+ optional certificate, else
self-signed), client pinning a public key or checking a CA with service_identity; optional client
certificates. Also the daemons' TLS endpoint, which bounds and logs each handshake."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet import error as twisted_error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHandshakeListener,
    IListeningPort,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from deploy.config import TLSConfigError  # noqa: F401  (re-exported; defined without OpenSSL)

if TYPE_CHECKING:
    from deploy.config import ServerSettings

PrivateKeyTypes = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)

MINIMUM_TLS_VERSION = TLSVersion.TLSv1_2
MINIMUM_RSA_BITS = 2048
SELF_SIGNED_VALIDITY = datetime.timedelta(days=3653)

log = Logger()

# X509_V_ERR_* codes meaning "no chain from this certificate to a trusted CA".
_UNTRUSTED_CHAIN_ERRORS = frozenset({2, 7, 18, 19, 20, 21, 24, 27, 28})
_X509_V_ERR_CERT_NOT_YET_VALID = 9
_X509_V_ERR_CERT_HAS_EXPIRED = 10

# OpenSSL reason strings a TLS client sees when the peer answered in plain text.
_NOT_TLS_REASONS = (
    "wrong version number",
    "packet length too long",
    "unknown protocol",
)
_PLAIN_HTTP_FROM_CLIENT_REASONS = ("http request", "https proxy request")
_CLIENT_CERT_REQUIRED_REASONS = ("alert certificate required", "peer did not return a certificate")
_CLIENT_CERT_REFUSED_REASONS = (
    "alert unknown ca",
    "alert bad certificate",
    "alert certificate unknown",
    "alert certificate expired",
    "alert decrypt error",
)
_VERSION_REASONS = ("alert protocol version", "unsupported protocol", "no protocols available")
# What the server sees when a client's certificate is missing or not from ssl_client_ca.
_NO_CLIENT_CERT_REASONS = ("peer did not return a certificate", "certificate required")

NOT_TLS_MESSAGE = "server does not speak TLS (is ssl enabled on it?)"
CLIENT_CERT_REQUIRED_MESSAGE = "server requires a client certificate (--ssl-cert/--ssl-key)"
CLOSED_MESSAGE = "server closed the connection (if during the TLS handshake: is ssl enabled on it?)"
NEEDS_VERIFICATION_MESSAGE = "TLS needs --ssl-public-key or --ssl-ca"


class TLSVerificationError(Exception):
    """The client refused the server's certificate during the handshake; the message says why."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"cannot read {what} {path}: {e.strerror or e}") from e


def _spki_der(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _fingerprint(spki_der: bytes) -> str:
    # Same value as: openssl pkey -pubin -in public.pem -outform DER | sha256sum
    return hashlib.sha256(spki_der).hexdigest()


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
    return _fingerprint(_spki_der(load_private_key(private_key_path).public_key()))


def _load_certificates(path: str, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSConfigError(f"{what} {path} holds no PEM certificate ({e})") from e


def _signature_hash(key: PrivateKeyTypes) -> hashes.HashAlgorithm | None:
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


def _openssl_certificate(certificate: x509.Certificate) -> X509:
    # Trust stores (X509Store.add_cert) still want pyOpenSSL's X509.
    return X509.from_cryptography(certificate)


def _key_and_chain(key_path: str, certificate_path: str, what: str) -> dict[str, object]:
    """CertificateOptions arguments for a key and its certificate (+ intermediates) file."""
    key = load_private_key(key_path)
    chain = _load_certificates(certificate_path, f"{what} certificate")
    if _spki_der(chain[0].public_key()) != _spki_der(key.public_key()):
        raise TLSConfigError(
            f"{what} certificate {certificate_path} does not match private key {key_path}"
        )
    return _options_for(key, chain)


def _options_for(key: PrivateKeyTypes, chain: list[x509.Certificate]) -> dict[str, object]:
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
        raise TLSConfigError(f"TLS setup from {files} failed: {_openssl_reasons(e)}") from e
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
        _warn_if_expired(kwargs["certificate"], certificate_path)  # type: ignore[arg-type]
    if client_ca_path is not None:
        client_cas = _load_certificates(client_ca_path, "client CA")
        kwargs.update(
            verify=True,
            caCerts=[_openssl_certificate(c) for c in client_cas],
            requireCertificate=True,
        )
    options = CertificateOptions(raiseMinimumTo=MINIMUM_TLS_VERSION, **kwargs)
    files = ", ".join(p for p in (private_key_path, certificate_path, client_ca_path) if p)
    return _built(options, files)


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


@implementer(IHandshakeListener)
class _HandshakeDeadline(ProtocolWrapper):
    """Sits between TLS and the daemon's protocol: drops a connection whose handshake has not
    completed in time, and logs why a handshake failed.

    Needed because the daemon's own idle timeout cannot end such a connection: it answers 408
    and closes, but TLS holds an answer written before the handshake until the handshake
    completes, so a client that stays silent would keep the connection (and a descriptor)
    forever."""

    factory: _HandshakeDeadlineFactory

    def makeConnection(self, transport: object) -> None:
        self._handshake_done = False
        timeout = self.factory.timeout
        self._deadline = self.factory.clock.callLater(timeout, self._expired) if timeout else None
        super().makeConnection(transport)

    def logPrefix(self) -> str:
        prefix = getattr(self.wrappedProtocol, "logPrefix", None)
        return prefix() if callable(prefix) else type(self.wrappedProtocol).__name__

    def handshakeCompleted(self) -> None:
        self._handshake_done = True
        self._cancel()
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def _expired(self) -> None:
        self._deadline = None
        log.info(
            "TLS handshake not completed within {timeout:g} s; dropped the connection from {peer}",
            timeout=self.factory.timeout,
            peer=_peer(self.transport),
        )
        self.transport.abortConnection()

    def _cancel(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel()
        if not self._handshake_done:
            why = None
            if isinstance(reason.value, SSL.Error):
                why = describe_tls_failure_from_client(reason.value)
            elif self._hello_answered():
                # Our clients refuse a certificate by hanging up without an alert. A bare TCP
                # check (a load balancer's) hangs up before any ClientHello: not worth a line.
                why = (
                    "client hung up after our certificate; it probably refused it "
                    "(its pin or CA does not match this server's key or certificate)"
                )
            if why is not None:
                log.info(
                    "TLS handshake with {peer} failed: {why}", peer=_peer(self.transport), why=why
                )
        super().connectionLost(reason)

    def _hello_answered(self) -> bool:
        """Whether the handshake got as far as our ServerHello (a cipher was chosen)."""
        try:
            return self.transport.getHandle().get_cipher_name() is not None
        except (AttributeError, SSL.Error):
            return False


class _HandshakeDeadlineFactory(WrappingFactory):
    protocol = _HandshakeDeadline

    def __init__(
        self, wrapped: IProtocolFactory, clock: IReactorTime, timeout: float | None
    ) -> None:
        super().__init__(wrapped)
        self.clock = clock
        self.timeout = timeout

    def logPrefix(self) -> str:
        prefix = getattr(self.wrappedFactory, "logPrefix", None)
        return prefix() if callable(prefix) else type(self.wrappedFactory).__name__


def _peer(transport: object) -> str:
    address = transport.getPeer()  # type: ignore[attr-defined]
    return getattr(address, "host", None) or str(address)


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """TLS on top of a listening TCP endpoint, with a deadline for each handshake.

    ``handshake_timeout`` seconds after a client connects, a connection whose TLS handshake has
    not completed is aborted (None or 0: no deadline)."""

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        creator: IOpenSSLServerConnectionCreator,
        clock: IReactorTime,
        handshake_timeout: float | None,
    ) -> None:
        self.endpoint = endpoint
        self.creator = creator
        self.clock = clock
        self.handshake_timeout = handshake_timeout

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        inner = _HandshakeDeadlineFactory(protocolFactory, self.clock, self.handshake_timeout)
        return self.endpoint.listen(TLSMemoryBIOFactory(self.creator, False, inner))


def _load_pinned_key(path: str) -> bytes:
    """DER SubjectPublicKeyInfo of a PEM public key, or of the key in a PEM certificate."""
    data = _read(path, "public key")
    if b"PRIVATE KEY-----" in data:
        raise TLSConfigError(
            f"{path} holds a private key; give the client the public key "
            f"(openssl rsa -in {path} -pubout > public.pem)"
        )
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return _spki_der(x509.load_pem_x509_certificate(data).public_key())
        return _spki_der(serialization.load_pem_public_key(data))
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TLSConfigError(
            f"{path} is not a PEM public key or certificate "
            f"(openssl rsa -in private.pem -pubout > public.pem): {e}"
        ) from e


# A check looks at one certificate of the server's chain as OpenSSL's verify callback sees it
# and returns why it is refused, or None.
_Check = Callable[[X509, int, int, bool], str | None]


def _pin_check(pinned_der: bytes, path: str) -> _Check:
    def check(certificate: X509, errno: int, depth: int, ok: bool) -> str | None:
        # The pin is the identity: the chain and the host name do not matter, only the leaf's key.
        if depth != 0:
            return None
        server_der = _spki_der(certificate.to_cryptography().public_key())
        if server_der == pinned_der:
            return None
        return (
            f"server key does not match pinned public key {path} "
            f"(server key sha256 {_fingerprint(server_der)})"
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

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = self.options.clientConnectionForTLS(tlsProtocol)
        if self.server_name is not None:
            connection.set_tlsext_host_name(self.server_name)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify_callback(tlsProtocol)
        )
        return connection

    def _verify_callback(self, tls_protocol: object) -> Callable[..., bool]:
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
    public_key_path: str | None = None,
    ca_path: str | None = None,
    cert_path: str | None = None,
    key_path: str | None = None,
) -> Callable[[str], IOpenSSLClientConnectionCreator]:
    """Load the files once and return ``hostname -> creator``; what a fan-out over many hosts
    wants (the proxy, the client). Arguments and checks as for :func:`client_context_factory`."""
    if public_key_path is None and ca_path is None:
        raise TLSConfigError(NEEDS_VERIFICATION_MESSAGE)
    if (cert_path is None) != (key_path is None):
        raise TLSConfigError("--ssl-cert and --ssl-key must be given together")
    kwargs: dict[str, object] = {}
    if cert_path is not None and key_path is not None:
        kwargs = _key_and_chain(key_path, cert_path, "client")
    if ca_path is not None:
        cas = _load_certificates(ca_path, "CA")
        kwargs["trustRoot"] = trustRootFromCertificates(
            [Certificate(_openssl_certificate(c)) for c in cas]
        )
    pin = None
    if public_key_path is not None:
        pin = _pin_check(_load_pinned_key(public_key_path), public_key_path)
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


def _openssl_reasons(exc: SSL.Error) -> str:
    """The reason strings of an OpenSSL error queue, joined; or the error's text."""
    args = exc.args[0] if exc.args else None
    if isinstance(args, list):
        reasons = [str(entry[-1]) for entry in args if isinstance(entry, tuple) and entry]
        if reasons:
            return "; ".join(reasons)
    return str(exc) or type(exc).__name__


def describe_tls_failure_from_client(exc: SSL.Error) -> str:
    """One line for the server's log: why a client's handshake failed, and what to fix."""
    reasons = _openssl_reasons(exc)
    lowered = reasons.lower()
    if any(r in lowered for r in _PLAIN_HTTP_FROM_CLIENT_REASONS):
        return "client sent plain HTTP, not TLS (does it use --ssl-public-key or --ssl-ca?)"
    if any(r in lowered for r in _NO_CLIENT_CERT_REASONS):
        return "client sent no certificate; ssl_client_ca requires one (--ssl-cert/--ssl-key)"
    if "certificate verify failed" in lowered:
        return f"client certificate is not signed by the ssl_client_ca ({reasons})"
    if any(r in lowered for r in _VERSION_REASONS):
        return f"client offers no TLS version deploy accepts (1.2 or newer) ({reasons})"
    if any(r in lowered for r in _NOT_TLS_REASONS):
        return f"client does not speak TLS ({reasons})"
    if "alert" in lowered:
        # The client refused us: most often our certificate (wrong pin, unknown CA, host name).
        return f"client refused the handshake ({reasons}); check its pin or CA"
    return f"TLS error: {reasons}"


def describe_tls_failure(failure_or_exc: Failure | BaseException) -> str:
    """One readable line for why a TLS connection failed, as the client saw it.

    Reasons found during the handshake by our own checks (pin, CA, host name) come back as they
    were given; OpenSSL errors are mapped by their reason strings, else shown as they are.
    """
    exc = failure_or_exc.value if isinstance(failure_or_exc, Failure) else failure_or_exc
    if isinstance(exc, TLSVerificationError | TLSConfigError):
        return str(exc)
    if isinstance(exc, SSL.Error):
        reasons = _openssl_reasons(exc)
        lowered = reasons.lower()
        if any(r in lowered for r in _PLAIN_HTTP_FROM_CLIENT_REASONS):
            return "client sent plain HTTP, not TLS (is ssl enabled on the client?)"
        if any(r in lowered for r in _NOT_TLS_REASONS):
            return NOT_TLS_MESSAGE
        if any(r in lowered for r in _CLIENT_CERT_REQUIRED_REASONS):
            return CLIENT_CERT_REQUIRED_MESSAGE
        if any(r in lowered for r in _CLIENT_CERT_REFUSED_REASONS):
            return f"server refused our client certificate ({reasons})"
        if any(r in lowered for r in _VERSION_REASONS):
            return f"no common TLS version; deploy needs TLS 1.2 or newer ({reasons})"
        if "certificate verify failed" in lowered:
            return "server certificate could not be verified"
        return f"TLS error: {reasons}"
    if isinstance(exc, twisted_error.ConnectionDone | twisted_error.ConnectionLost):
        # Twisted reports an EOF in the middle of the handshake as ConnectionLost; a plain server
        # that hangs up on our ClientHello looks exactly like that.
        return CLOSED_MESSAGE
    return str(exc) or type(exc).__name__
