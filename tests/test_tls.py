"""deploy.tls over real loopback connections: pinning, CA and host name checks, mutual TLS."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from zope.interface import implementer

from deploy.tls import (
    TLSConfigError,
    client_context_factories,
    client_context_factory,
    server_context_factory,
)
from deploy.tls_failures import describe_tls_failure
from deploy.tls_keys import load_private_key, self_signed_certificate
from tests.pki import CA_KEY_USAGE, rsa_pair

DEADLINE = 5.0
LINE = b"hello over tls\n"


# ---------------------------------------------------------------- keys and certificates


def _pem_key(key: object) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,  # type: ignore[attr-defined]
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(
    subject_cn: str,
    key: object,
    issuer: tuple[x509.Name, object] | None = None,
    *,
    sans: list[x509.GeneralName] | None = None,
    ca: bool = False,
    expired: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    if expired:
        now -= datetime.timedelta(days=60)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(CA_KEY_USAGE, critical=True)
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]


@dataclass
class PKI:
    """Files of a test PKI; every *_key has a matching *_cert."""

    dir: Path
    rsa_private: Path
    rsa_public: Path
    other_private: Path
    other_public: Path
    ca: Path
    other_ca: Path
    server_key: Path
    server_cert: Path  # SAN DNS:localhost, IP:127.0.0.1, signed by ca
    localhost_only_cert: Path  # SAN DNS:localhost, signed by ca
    other_host_cert: Path  # SAN DNS:other.example, signed by ca
    no_san_cert: Path  # CN=localhost only, signed by ca
    foreign_cert: Path  # SAN localhost + 127.0.0.1, signed by other_ca
    expired_cert: Path  # SAN localhost + 127.0.0.1, signed by ca, expired a month ago
    client_key: Path
    client_cert: Path  # signed by ca
    foreign_client_cert: Path  # signed by other_ca


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """RSA keys made the operator's way, and a small CA world made with cryptography."""
    d = tmp_path_factory.mktemp("pki")
    rsa_private, rsa_public = rsa_pair(d, "server")
    other_private, other_public = rsa_pair(d, "other")

    def ec_key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def write(name: str, data: bytes) -> Path:
        (d / name).write_bytes(data)
        return d / name

    def cert_pem(c: x509.Certificate) -> bytes:
        return c.public_bytes(serialization.Encoding.PEM)

    ca_key, other_ca_key, server_key, client_key = ec_key(), ec_key(), ec_key(), ec_key()
    ca_cert = _certificate("deploy test CA", ca_key, ca=True)
    other_ca_cert = _certificate("someone else's CA", other_ca_key, ca=True)
    by_ca = (ca_cert.subject, ca_key)
    by_other = (other_ca_cert.subject, other_ca_key)
    localhost = x509.DNSName("localhost")
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    return PKI(
        dir=d,
        rsa_private=rsa_private,
        rsa_public=rsa_public,
        other_private=other_private,
        other_public=other_public,
        ca=write("ca.pem", cert_pem(ca_cert)),
        other_ca=write("other-ca.pem", cert_pem(other_ca_cert)),
        server_key=write("server-key.pem", _pem_key(server_key)),
        server_cert=write(
            "server-cert.pem",
            cert_pem(_certificate("server", server_key, by_ca, sans=[localhost, loopback])),
        ),
        localhost_only_cert=write(
            "localhost-cert.pem",
            cert_pem(_certificate("server", server_key, by_ca, sans=[localhost])),
        ),
        other_host_cert=write(
            "other-host-cert.pem",
            cert_pem(
                _certificate("server", server_key, by_ca, sans=[x509.DNSName("other.example")])
            ),
        ),
        no_san_cert=write(
            "no-san-cert.pem", cert_pem(_certificate("localhost", server_key, by_ca))
        ),
        foreign_cert=write(
            "foreign-cert.pem",
            cert_pem(_certificate("server", server_key, by_other, sans=[localhost, loopback])),
        ),
        expired_cert=write(
            "expired-cert.pem",
            cert_pem(
                _certificate("server", server_key, by_ca, sans=[localhost, loopback], expired=True)
            ),
        ),
        client_key=write("client-key.pem", _pem_key(client_key)),
        client_cert=write(
            "client-cert.pem",
            cert_pem(_certificate("client", client_key, by_ca, sans=[x509.DNSName("client")])),
        ),
        foreign_client_cert=write(
            "foreign-client-cert.pem",
            cert_pem(_certificate("client", client_key, by_other, sans=[x509.DNSName("client")])),
        ),
    )


# ---------------------------------------------------------------- loopback harness


class ServerSide(Protocol):
    """Echoes what it gets and records every dataReceived call."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.factory.connections.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        self.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class PlainHTTPServer(Protocol):
    """A server without TLS: answers whatever arrives with an HTTP error, as the agent would."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        self.transport.loseConnection()


class PlainHangUpServer(Protocol):
    """A server without TLS that hangs up on the first bytes without answering."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.loseConnection()


class ClientSide(Protocol):
    """Writes a line at once (before any handshake) and hangs up when it is echoed back."""

    def __init__(self) -> None:
        self.received = b""
        self.reason: Failure | None = None
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(LINE)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\n" in self.received:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.done.callback(None)


@dataclass
class Outcome:
    echoed: bytes
    reason: Failure
    server_received: list[bytes]

    @property
    def message(self) -> str:
        return describe_tls_failure(self.reason)


async def _exchange(
    server_creator: object, client_creator: object, *, plain_server: type[Protocol] | None = None
) -> Outcome:
    """Listen on 127.0.0.1:0, connect once, and wait for both ends to close: all within DEADLINE."""
    exchange = _exchange_unbounded(server_creator, client_creator, plain_server)
    return await Deferred.fromCoroutine(exchange).addTimeout(DEADLINE, reactor)


async def _exchange_unbounded(
    server_creator: object, client_creator: object, plain_server: type[Protocol] | None
) -> Outcome:
    factory = Factory.forProtocol(plain_server or ServerSide)
    factory.connections = []  # type: ignore[attr-defined]
    if plain_server:
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    else:
        endpoint = SSL4ServerEndpoint(reactor, 0, server_creator, interface="127.0.0.1")
    port = await endpoint.listen(factory)
    try:
        client = ClientSide()
        tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, timeout=DEADLINE)
        await connectProtocol(wrapClientTLS(client_creator, tcp), client)
        await client.done
        assert client.reason is not None
        received: list[bytes] = []
        for server_side in factory.connections:  # type: ignore[attr-defined]
            await server_side.lost
            received.extend(server_side.received)
        return Outcome(client.received, client.reason, received)
    finally:
        await port.stopListening()


def _server(pki: PKI, cert: Path | None = None, client_ca: Path | None = None) -> object:
    if cert is None:
        return server_context_factory(str(pki.rsa_private))
    return server_context_factory(
        str(pki.server_key), str(cert), str(client_ca) if client_ca else None
    )


# ---------------------------------------------------------------- pinning


@pytest_twisted.ensureDeferred
async def test_self_signed_server_with_correct_pin_echoes_a_line(pki: PKI) -> None:
    """A self-signed server and a client pinning its public.pem exchange application data."""
    client = client_context_factory("127.0.0.1", public_key_path=str(pki.rsa_public))
    outcome = await _exchange(_server(pki), client)
    assert outcome.echoed == LINE
    assert outcome.reason.check(ConnectionDone)


@pytest_twisted.ensureDeferred
async def test_wrong_pin_fails_before_one_application_byte_is_sent(pki: PKI) -> None:
    """A pin mismatch aborts the handshake: clear message, and the server never sees data."""
    client = client_context_factory("127.0.0.1", public_key_path=str(pki.other_public))
    outcome = await _exchange(_server(pki), client)
    server_der = (
        load_private_key(str(pki.rsa_private))
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert outcome.message == (
        f"server key does not match pinned public key {pki.other_public} "
        f"(server key sha256 {hashlib.sha256(server_der).hexdigest()})"
    )
    assert outcome.echoed == b""
    assert outcome.server_received == []


@pytest_twisted.ensureDeferred
async def test_pin_may_be_given_as_a_certificate(pki: PKI) -> None:
    """A certificate file as the pin pins its key; the host name is not checked in pin mode."""
    client = client_context_factory("not-the-name.example", public_key_path=str(pki.server_cert))
    outcome = await _exchange(_server(pki, pki.other_host_cert), client)
    assert outcome.echoed == LINE


# ---------------------------------------------------------------- CA mode


@pytest.mark.parametrize(
    ("hostname", "cert_name"),
    [
        ("localhost", "server_cert"),
        ("127.0.0.1", "server_cert"),
        ("localhost", "localhost_only_cert"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_ca_signed_certificate_matching_host_is_accepted(
    pki: PKI, hostname: str, cert_name: str
) -> None:
    """A certificate from the CA whose DNS or IP SAN matches the host name connects."""
    client = client_context_factory(hostname, ca_path=str(pki.ca))
    outcome = await _exchange(_server(pki, getattr(pki, cert_name)), client)
    assert outcome.echoed == LINE


@pytest_twisted.ensureDeferred
async def test_unknown_ca_is_refused_with_the_ca_file_named(pki: PKI) -> None:
    """A certificate from another CA fails with a message naming our CA file."""
    client = client_context_factory("localhost", ca_path=str(pki.ca))
    outcome = await _exchange(_server(pki, pki.foreign_cert), client)
    assert outcome.message == f"server certificate is not signed by the CA in {pki.ca}"
    assert outcome.server_received == []


@pytest_twisted.ensureDeferred
async def test_self_signed_server_is_refused_in_ca_mode(pki: PKI) -> None:
    """The self-signed certificate of a key-only server does not pass a CA check."""
    client = client_context_factory("localhost", ca_path=str(pki.ca))
    outcome = await _exchange(_server(pki), client)
    assert outcome.message == f"server certificate is not signed by the CA in {pki.ca}"


@pytest.mark.parametrize(
    ("hostname", "cert_name", "suffix"),
    [
        ("localhost", "other_host_cert", ""),
        ("127.0.0.1", "localhost_only_cert", ""),
        ("localhost", "no_san_cert", " (it has no subjectAltName)"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_host_name_mismatch_is_refused(
    pki: PKI, hostname: str, cert_name: str, suffix: str
) -> None:
    """A CA-signed certificate for another name or IP (or with only a CN) is refused."""
    client = client_context_factory(hostname, ca_path=str(pki.ca))
    outcome = await _exchange(_server(pki, getattr(pki, cert_name)), client)
    assert outcome.message == f"server certificate does not match host {hostname}{suffix}"
    assert outcome.server_received == []


@pytest_twisted.ensureDeferred
async def test_expired_certificate_is_refused_and_warned_about_at_start(pki: PKI) -> None:
    """An expired server certificate: a warning naming it at start, a clear refusal by clients."""
    with capturedLogs() as events:
        server = _server(pki, pki.expired_cert)
    assert [e["path"] for e in events if e.get("log_level") == LogLevel.warn] == [
        str(pki.expired_cert)
    ]
    client = client_context_factory("localhost", ca_path=str(pki.ca))
    outcome = await _exchange(server, client)
    assert outcome.message == "server certificate has expired"


@pytest_twisted.ensureDeferred
async def test_pin_and_ca_together_need_both(pki: PKI) -> None:
    """Given a pin and a CA, a CA-valid certificate with another key is still refused."""
    client = client_context_factory(
        "localhost", ca_path=str(pki.ca), public_key_path=str(pki.rsa_public)
    )
    outcome = await _exchange(_server(pki, pki.server_cert), client)
    assert outcome.message.startswith("server key does not match pinned public key")


# ---------------------------------------------------------------- not TLS, versions


@pytest.mark.parametrize(
    ("plain_server", "expected"),
    [
        (PlainHTTPServer, "server does not speak TLS (is ssl enabled on it?)"),
        (
            PlainHangUpServer,
            "server closed the connection (if during the TLS handshake: is ssl enabled on it?)",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_plain_server_fails_fast_with_a_hint(
    pki: PKI, plain_server: type[Protocol], expected: str
) -> None:
    """TLS to a plain server (answering HTTP, or hanging up) fails at once, saying why."""
    client = client_context_factory("127.0.0.1", public_key_path=str(pki.rsa_public))
    outcome = await _exchange(None, client, plain_server=plain_server)
    assert outcome.message == expected


@implementer(IOpenSSLClientConnectionCreator)
class TLS11Client:
    """A client that offers only TLS 1.1 (and trusts anything)."""

    def __init__(self) -> None:
        self.context = SSL.Context(SSL.TLS_METHOD)
        self.context.set_min_proto_version(SSL.TLS1_1_VERSION)
        self.context.set_max_proto_version(SSL.TLS1_1_VERSION)
        self.context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.context)


def _tls11_configurable() -> bool:
    """Whether this OpenSSL can still put TLS 1.1 into a ClientHello."""
    client = SSL.Connection(TLS11Client().context)
    client.set_connect_state()
    try:
        client.do_handshake()
    except SSL.WantReadError:
        return True
    except SSL.Error:
        return False
    return False


@pytest_twisted.ensureDeferred
async def test_tls_1_1_client_is_refused(pki: PKI) -> None:
    """The server refuses a TLS 1.1 client (or, where OpenSSL cannot speak 1.1, excludes it)."""
    server = _server(pki)
    options = server.getContext().set_options(0)  # type: ignore[attr-defined]
    assert options & SSL.OP_NO_TLSv1_1 and options & SSL.OP_NO_TLSv1
    assert not options & SSL.OP_NO_TLSv1_2
    if not _tls11_configurable():
        return
    outcome = await _exchange(server, TLS11Client())
    assert outcome.echoed == b""
    assert outcome.server_received == []
    assert outcome.message.startswith("no common TLS version; deploy needs TLS 1.2 or newer")


# ---------------------------------------------------------------- mutual TLS


async def _to_mutual_server(pki: PKI, client: object) -> Outcome:
    """An exchange with a server that wants a client certificate signed by pki.ca."""
    return await _exchange(_server(pki, pki.server_cert, client_ca=pki.ca), client)


def _showing(pki: PKI, host: str, cert: Path, **trust: str) -> object:
    """A client for `host` that shows `cert` (with the client key) and trusts as `trust` says."""
    return client_context_factory(host, cert_path=str(cert), key_path=str(pki.client_key), **trust)


@pytest_twisted.ensureDeferred
async def test_mutual_tls_without_client_certificate_fails_clearly(pki: PKI) -> None:
    """A server with a client CA refuses a client that has no certificate."""
    client = client_context_factory("localhost", ca_path=str(pki.ca))
    outcome = await _to_mutual_server(pki, client)
    assert outcome.message == "server requires a client certificate (--ssl-cert/--ssl-key)"
    assert outcome.server_received == []


@pytest_twisted.ensureDeferred
async def test_mutual_tls_with_client_certificate_connects(pki: PKI) -> None:
    """A client certificate signed by the server's client CA is accepted."""
    client = _showing(pki, "localhost", pki.client_cert, ca_path=str(pki.ca))
    outcome = await _to_mutual_server(pki, client)
    assert outcome.echoed == LINE


@pytest_twisted.ensureDeferred
async def test_mutual_tls_with_client_certificate_from_another_ca_fails(pki: PKI) -> None:
    """A client certificate the server's client CA did not sign is refused, and said so."""
    client = _showing(
        pki, "127.0.0.1", pki.foreign_client_cert, public_key_path=str(pki.server_cert)
    )
    outcome = await _to_mutual_server(pki, client)
    assert outcome.message.startswith("server refused our client certificate")
    assert outcome.server_received == []


# ---------------------------------------------------------------- configuration errors


def test_certificate_not_matching_key_is_a_config_error(pki: PKI) -> None:
    """A certificate for another key is refused at start, naming both files."""
    with pytest.raises(TLSConfigError) as e:
        server_context_factory(str(pki.rsa_private), str(pki.server_cert))
    assert str(e.value) == (
        f"server certificate {pki.server_cert} does not match private key {pki.rsa_private}"
    )


def test_client_certificate_not_matching_key_is_a_config_error(pki: PKI) -> None:
    """A client certificate for another key is refused, naming both files."""
    with pytest.raises(TLSConfigError, match="client certificate .* does not match private key"):
        client_context_factory(
            "h", ca_path=str(pki.ca), cert_path=str(pki.client_cert), key_path=str(pki.rsa_private)
        )


@pytest.mark.parametrize(
    "call",
    [
        lambda missing: server_context_factory(missing),
        lambda missing: client_context_factory("h", public_key_path=missing),
        lambda missing: client_context_factory("h", ca_path=missing),
    ],
)
def test_missing_file_is_a_config_error_naming_it(tmp_path: Path, call: object) -> None:
    """A file that is not there gives TLSConfigError with its path."""
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(TLSConfigError, match="nope.pem: No such file or directory"):
        call(missing)  # type: ignore[operator]


@pytest_twisted.ensureDeferred
async def test_shared_factories_check_each_host_name(pki: PKI) -> None:
    """client_context_factories loads once, yet checks every host against its own name."""
    for_host = client_context_factories(ca_path=str(pki.ca))
    server = _server(pki, pki.localhost_only_cert)
    assert (await _exchange(server, for_host("localhost"))).echoed == LINE
    outcome = await _exchange(server, for_host("127.0.0.1"))
    assert outcome.message == "server certificate does not match host 127.0.0.1"


def test_invalid_host_name_is_a_config_error(pki: PKI) -> None:
    """A host name that cannot be sent or checked is refused when the client is built."""
    with pytest.raises(TLSConfigError, match="invalid host name 'a..b'"):
        client_context_factory("a..b", ca_path=str(pki.ca))


def test_client_without_pin_or_ca_is_refused() -> None:
    """There is no unverified client connection."""
    with pytest.raises(TLSConfigError, match=r"^TLS needs --ssl-public-key or --ssl-ca$"):
        client_context_factory("h")


def test_private_key_given_as_pin_says_to_use_the_public_key(pki: PKI) -> None:
    """Giving private.pem to a client is refused with the command that makes public.pem."""
    with pytest.raises(TLSConfigError, match="holds a private key; .* -pubout"):
        client_context_factory("h", public_key_path=str(pki.rsa_private))


def test_public_key_given_to_server_says_it_needs_the_private_key(pki: PKI) -> None:
    """Giving public.pem to a server is refused with a hint."""
    with pytest.raises(TLSConfigError, match="holds a public key; the server needs the private"):
        server_context_factory(str(pki.rsa_public))


def test_encrypted_and_short_keys_are_config_errors(tmp_path: Path) -> None:
    """An encrypted key and a 1024-bit RSA key are refused with what to do."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    short = tmp_path / "short.pem"
    short.write_bytes(_pem_key(key))
    with pytest.raises(TLSConfigError, match="is 1024-bit RSA; TLS needs at least 2048"):
        load_private_key(str(short))
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(TLSConfigError, match="is encrypted; decrypt it"):
        load_private_key(str(encrypted))


# ---------------------------------------------------------------- keys and certificates


def test_private_key_loads_pkcs1_pkcs8_and_ec(pki: PKI, tmp_path: Path) -> None:
    """'BEGIN RSA PRIVATE KEY', 'BEGIN PRIVATE KEY' and EC keys all load to the same key."""
    key = load_private_key(str(pki.rsa_private))
    formats = {
        "pkcs1.pem": serialization.PrivateFormat.TraditionalOpenSSL,
        "pkcs8.pem": serialization.PrivateFormat.PKCS8,
    }
    for name, fmt in formats.items():
        (tmp_path / name).write_bytes(
            key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
        )
        assert load_private_key(str(tmp_path / name)).private_numbers() == key.private_numbers()
    assert b"BEGIN RSA PRIVATE KEY" in (tmp_path / "pkcs1.pem").read_bytes()
    assert isinstance(load_private_key(str(pki.server_key)), ec.EllipticCurvePrivateKey)


def test_self_signed_certificate_names_and_validity(pki: PKI) -> None:
    """The self-signed certificate has the four SANs and is valid from yesterday for 10 years."""
    key = load_private_key(str(pki.rsa_private))
    cert = self_signed_certificate(key, "web1")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["web1", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    now = datetime.datetime.now(datetime.UTC)
    assert now - datetime.timedelta(days=1, minutes=1) < cert.not_valid_before_utc < now
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days >= 3652
    cert.verify_directly_issued_by(cert)


# ---------------------------------------------------------------- describe_tls_failure


@pytest.mark.parametrize(
    ("reasons", "expected"),
    [
        ([("SSL routines", "", "wrong version number")], "server does not speak TLS"),
        ([("SSL routines", "", "packet length too long")], "server does not speak TLS"),
        (
            [("SSL routines", "", "tlsv13 alert certificate required")],
            "server requires a client certificate",
        ),
        ([("SSL routines", "", "some new reason")], "TLS error: some new reason"),
    ],
)
def test_describe_tls_failure_maps_openssl_reasons(reasons: list, expected: str) -> None:
    """OpenSSL error queues become one readable line; unknown ones keep OpenSSL's reason."""
    assert describe_tls_failure(Failure(SSL.Error(reasons))).startswith(expected)
    assert describe_tls_failure(SSL.Error(reasons)).startswith(expected)
