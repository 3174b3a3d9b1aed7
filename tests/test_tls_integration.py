"""TLS end to end with real processes: twistd deploy-agent/deploy-proxy listening with TLS, the
real deploy-client, keys made the operator's way with openssl and a small CA made with
cryptography; pinning, CA and host name checks, mutual TLS, mixed plain/TLS, config errors."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from deploy.client import ClientOptions, Order, build_request
from tests.conftest import JOBS, Daemons
from tests.harness import (
    AgentProcess,
    ClientRun,
    can_connect,
    free_port,
    make_tree,
    parse_response,
    run_client,
    wait_until,
)
from tests.pki import CA_KEY_USAGE, OPENSSL, rsa_pair

ECHO = ("--order=exec", "--options=service:echo,over-tls")
# Every failure below must come back well inside the client's own timeouts.
CLIENT_TIMEOUTS = ("--socket-timeout=10", "--thread-timeout=20")
# A refusal is a handshake away, not a timeout away: it ends the client well inside its
# timeouts, with room for a loaded machine (process start-up included).
FAST = 10.0

# TLS record content types (RFC 8446 section 5.1).
CHANGE_CIPHER_SPEC, HANDSHAKE = 20, 22
# An encrypted alert is the largest record a refusing TLS 1.3 client sends after its
# ClientHello: 2 bytes of alert + 1 byte of inner content type + a 16-byte AEAD tag.
ENCRYPTED_ALERT = 2 + 1 + 16


# ---------------------------------------------------------------- keys and certificates


def openssl_fingerprint(public_pem: Path) -> str:
    """sha256 of a public key as docs/tls.md tells operators to compute it."""
    assert OPENSSL
    der = subprocess.run(
        [OPENSSL, "pkey", "-pubin", "-in", str(public_pem), "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    digest = subprocess.run(
        [OPENSSL, "dgst", "-sha256", "-r"], input=der, check=True, capture_output=True
    ).stdout
    return digest.split()[0].decode()


@dataclass
class CA:
    """A small certificate authority: an EC key and its self-signed certificate in `path`."""

    name: str
    path: Path
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    certificate: x509.Certificate = field(repr=False)

    @classmethod
    def create(cls, directory: Path, name: str) -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(CA_KEY_USAGE, critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        path = directory / f"{name}.pem"
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return cls(name, path, key, certificate)

    def issue(self, public_key_pem: Path, out: Path, names: list[str], *, client: bool) -> Path:
        """A certificate for the key in `public_key_pem` (the operator's public.pem)."""
        public_key = serialization.load_pem_public_key(public_key_pem.read_bytes())
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        out.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return out


@dataclass
class Keys:
    """Every file the tests hand to daemons and clients."""

    agent_private: Path
    agent_public: Path
    other_private: Path  # a second operator key pair: the "wrong pin"
    other_public: Path
    proxy_private: Path
    proxy_public: Path
    ca: Path
    rogue_ca: Path
    agent_cert: Path  # agent key, signed by ca, for localhost and 127.0.0.1
    client_private: Path
    client_cert: Path  # signed by ca, for mutual TLS
    rogue_client_cert: Path  # same client key, signed by rogue_ca


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    directory = tmp_path_factory.mktemp("tls-keys")
    assert OPENSSL, "the openssl command is needed to make keys the operator's way"
    agent_private, agent_public = rsa_pair(directory, "agent")
    other_private, other_public = rsa_pair(directory, "other")
    proxy_private, proxy_public = rsa_pair(directory, "proxy")
    client_private, client_public = rsa_pair(directory, "client")
    ca = CA.create(directory, "deploy-ca")
    rogue = CA.create(directory, "rogue-ca")
    return Keys(
        agent_private=agent_private,
        agent_public=agent_public,
        other_private=other_private,
        other_public=other_public,
        proxy_private=proxy_private,
        proxy_public=proxy_public,
        ca=ca.path,
        rogue_ca=rogue.path,
        agent_cert=ca.issue(
            agent_public, directory / "agent-cert.pem", ["localhost", "127.0.0.1"], client=False
        ),
        client_private=client_private,
        client_cert=ca.issue(
            client_public, directory / "client-cert.pem", ["deploy-client"], client=True
        ),
        rogue_client_cert=rogue.issue(
            client_public, directory / "rogue-client-cert.pem", ["deploy-client"], client=True
        ),
    )


# ---------------------------------------------------------------- a relay that counts bytes


@dataclass
class RelayedConnection:
    """One connection through the relay: every byte the client sent towards the daemon."""

    from_client: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    pumps_done: int = 0

    @property
    def finished(self) -> bool:
        return self.pumps_done == 2

    def client_records(self) -> list[tuple[int, int]]:
        """(content type, payload length) of each TLS record the client sent."""
        records, data = [], bytes(self.from_client)
        while len(data) >= 5:
            length = int.from_bytes(data[3:5], "big")
            records.append((data[0], length))
            data = data[5 + length :]
        assert not data, f"{len(data)} bytes from the client are not a whole TLS record"
        return records


class CountingRelay:
    """A raw TCP relay of our own between a client and a daemon. It sees only ciphertext, so it
    can tell what the client sent by TLS record type and size: a request cannot hide in it."""

    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self.listener = socket.create_server((host, 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.connections: list[RelayedConnection] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sockets: list[socket.socket] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            server = socket.create_connection(self.target)
            seen = RelayedConnection()
            with self._lock:
                self.connections.append(seen)
                self._sockets += [client, server]
            for src, dst, record in (
                (client, server, seen.from_client),
                (server, client, seen.to_client),
            ):
                threading.Thread(
                    target=self._pump, args=(src, dst, record, seen), daemon=True
                ).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, record: bytearray, seen: RelayedConnection
    ) -> None:
        try:
            while chunk := src.recv(65536):
                with self._lock:
                    record += chunk
                dst.sendall(chunk)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            # One side reset: pass that on, as a wire would.
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        finally:
            with self._lock:
                seen.pumps_done += 1

    def wait_finished(self, count: int) -> list[RelayedConnection]:
        """The first `count` connections, once both directions of each have ended."""

        def done() -> list[RelayedConnection] | None:
            with self._lock:
                chosen = self.connections[:count]
                ready = len(chosen) == count and all(c.finished for c in chosen)
            return chosen if ready else None

        return wait_until(done, 10, what=f"{count} relayed connection(s) to end")

    def close(self) -> None:
        self._stopping.set()
        self.listener.close()
        self._accepting.join(5)
        with self._lock:
            for s in self._sockets:
                s.close()


@pytest.fixture
def relays() -> Iterator[list[CountingRelay]]:
    started: list[CountingRelay] = []
    try:
        yield started
    finally:
        for relay in started:
            relay.close()


# ---------------------------------------------------------------- daemons and clients


@pytest.fixture
def jobs(tmp_path: Path) -> Path:
    path = tmp_path / "deploy_agent_exec.ini"
    path.write_text(JOBS)
    return path


def tls_agent(daemons: Daemons, jobs: Path, **server: Any) -> AgentProcess:
    """An agent with the test jobs and `[server]` TLS keys `server` (none: plain)."""
    if server:
        server = {"ssl": "true", **server}
    return daemons.agent(jobs=jobs, server={"socket_timeout": 2, **server})


def mutual_tls_agent(daemons: Daemons, jobs: Path, keys: Keys) -> AgentProcess:
    """An agent with its certificate from keys.ca that wants client certificates from it too."""
    return tls_agent(
        daemons,
        jobs,
        ssl_private_key=keys.agent_private,
        ssl_certificate=keys.agent_cert,
        ssl_client_ca=keys.ca,
    )


def client(host: str, *args: str) -> tuple[ClientRun, float]:
    """Run deploy-client against `host`; also how long it took."""
    started = time.monotonic()
    run = run_client(f"--hosts={host}", *CLIENT_TIMEOUTS, *args, timeout=60)
    return run, time.monotonic() - started


def assert_echoed(run: ClientRun, host: str) -> None:
    assert run.rc == 0, run.stdout + run.stderr
    entry = run.entry(host, "exec")
    assert entry["serverStatus"] == 1 and entry["returnCode"] == "200", entry
    assert entry["content"]["return"] == "true", entry


def refusal(run: ClientRun, host: str, order: str = "exec") -> str:
    """The one-line message the client gave for `host`, after checking it is a refusal."""
    assert run.rc == 3, run.stdout + run.stderr  # unreachable, not a usage error or a crash
    assert "Traceback" not in run.stderr, run.stderr
    entry = run.entry(host, order)
    assert entry["serverStatus"] == 0 and entry["return"] == 0, entry
    message = entry["content"]
    assert isinstance(message, str) and message and "\n" not in message, entry
    return message


def wait_logged(daemon: AgentProcess, text: str, count: int = 1) -> None:
    """Wait until the daemon's log holds `text` `count` times (it logs on its own schedule)."""
    wait_until(
        lambda: daemon.log_text().count(text) == count,
        10,
        what=f"{daemon.name} to log {text!r} {count} time(s)",
    )


def orders_logged(daemon: AgentProcess) -> int:
    """How many orders the agent has logged as received (one line per request it read)."""
    return sum(1 for line in daemon.log_text().splitlines() if "from 127.0.0.1" in line)


# ---------------------------------------------------------------- pinning


def test_pinned_self_signed_agent_answers_status_and_exec(daemons, jobs, keys, tmp_path):
    """ssl = true + ssl_private_key only: a client pinning public.pem gets status and exec."""
    rsyncd = daemons.rsyncd({"DEST": make_tree(tmp_path / "tree", files=5, size=100)})
    targets = tmp_path / "targets"
    targets.mkdir()
    agent = daemons.agent(
        jobs=jobs,
        groups={
            "web": {
                "dest": rsyncd.url("DEST"),
                "src": targets / "web",
                "option": [f"--port={rsyncd.port}", "--archive"],
            }
        },
        allow_paths=[targets],
        server={"ssl": "true", "ssl_private_key": keys.agent_private},
    )
    run, _ = client(
        agent.address, "--order=status", "--options=web", f"--ssl-public-key={keys.agent_public}"
    )
    assert run.rc == 0, run.stdout + run.stderr
    status = run.content(agent.address, "status")
    assert status["return"] == "true" and status["transferFilesCount"] == "5", status
    run, _ = client(agent.address, *ECHO, f"--ssl-public-key={keys.agent_public}")
    assert_echoed(run, agent.address)
    # The agent logs its key's fingerprint as the documented openssl command prints public.pem's.
    assert f"public key sha256 {openssl_fingerprint(keys.agent_public)}" in agent.log_text()


def test_pinned_agent_listens_on_ipv6_too(daemons, jobs, keys):
    """addr = ::1 with ssl = true: the TLS endpoint listens on IPv6 and pinning works there."""
    agent = daemons.agent(
        "::1",
        jobs=jobs,
        server={"ssl": "true", "ssl_private_key": keys.agent_private},
        allow_hosts=("::1",),
    )
    host = f"[::1]:{agent.port}"
    run, _ = client(host, *ECHO, f"--ssl-public-key={keys.agent_public}")
    assert_echoed(run, host)


def test_wrong_pin_is_refused_before_any_request_byte_reaches_the_agent(
    daemons, jobs, keys, relays
):
    """A pin mismatch is one line for that host and no request byte ever leaves the client."""
    # Proof: a relay of our own in front of the agent sees every byte the client sends; the
    # agent logs no order either, and it keeps serving.
    agent = tls_agent(daemons, jobs, ssl_private_key=keys.agent_private)
    relay = CountingRelay((agent.host, agent.port))
    relays.append(relay)

    run, took = client(relay.address, *ECHO, f"--ssl-public-key={keys.other_public}")
    message = refusal(run, relay.address)
    assert f"does not match pinned public key {keys.other_public}" in message, message
    assert took < FAST, took
    (refused,) = relay.wait_finished(1)

    # The same request through the same relay with the right pin, for comparison.
    run, _ = client(relay.address, *ECHO, f"--ssl-public-key={keys.agent_public}")
    assert_echoed(run, relay.address)
    _, accepted = relay.wait_finished(2)

    request = build_request(
        Order("exec", "service:echo,over-tls"), ClientOptions(), "127.0.0.1", time.time()
    )
    refused_records = refused.client_records()
    assert refused_records[0][0] == HANDSHAKE  # the ClientHello
    after_hello = refused_records[1:]
    # After its ClientHello the refusing client sent at most a ChangeCipherSpec and one
    # encrypted alert: not even its Finished message, so no request either.
    assert all(
        kind == CHANGE_CIPHER_SPEC or size <= ENCRYPTED_ALERT for kind, size in after_hello
    ), after_hello
    assert sum(size for _, size in after_hello) < len(request)
    # The accepted client did put the request on the wire: the relay can see it when it flows.
    assert max(size for _, size in accepted.client_records()[1:]) >= len(request)
    assert orders_logged(agent) == 1  # the accepted request only
    # The agent's side of the story, for its operator.
    wait_logged(agent, "client hung up after our certificate; it probably refused it")


# ---------------------------------------------------------------- CA mode


def test_ca_signed_agent_is_verified_by_chain_and_host_name(daemons, jobs, keys, relays):
    """--ssl-ca checks chain and host name; another CA or another name is one clear line."""
    agent = tls_agent(
        daemons, jobs, ssl_private_key=keys.agent_private, ssl_certificate=keys.agent_cert
    )
    for host in (agent.address, f"localhost:{agent.port}"):
        run, _ = client(host, *ECHO, f"--ssl-ca={keys.ca}")
        assert_echoed(run, host)

    run, took = client(agent.address, *ECHO, f"--ssl-ca={keys.rogue_ca}")
    assert refusal(run, agent.address) == (
        f"127.0.0.1:{agent.port}: server certificate is not signed by the CA in {keys.rogue_ca}"
    )
    assert took < FAST

    # 127.0.0.2 reaches the same agent through a relay; the certificate does not name it.
    relay = CountingRelay((agent.host, agent.port), host="127.0.0.2")
    relays.append(relay)
    run, took = client(relay.address, *ECHO, f"--ssl-ca={keys.ca}")
    assert refusal(run, relay.address) == (
        f"127.0.0.2:{relay.port}: server certificate does not match host 127.0.0.2"
    )
    assert took < FAST
    (refused,) = relay.wait_finished(1)
    assert all(
        kind == CHANGE_CIPHER_SPEC or size <= ENCRYPTED_ALERT
        for kind, size in refused.client_records()[1:]
    )
    run, _ = client(agent.address, *ECHO, f"--ssl-ca={keys.ca}")
    assert_echoed(run, agent.address)


# ---------------------------------------------------------------- mutual TLS


def test_mutual_tls_requires_a_client_certificate_from_the_agents_ca(daemons, jobs, keys):
    """ssl_client_ca: only a client certificate from that CA gets an order through."""
    # No certificate, or one from another CA: one clear line and no order runs; the agent goes on.
    agent = mutual_tls_agent(daemons, jobs, keys)
    run, took = client(agent.address, *ECHO, f"--ssl-ca={keys.ca}")
    assert refusal(run, agent.address) == (
        f"127.0.0.1:{agent.port}: server requires a client certificate (--ssl-cert/--ssl-key)"
    )
    assert took < FAST

    run, took = client(
        agent.address,
        *ECHO,
        f"--ssl-ca={keys.ca}",
        f"--ssl-cert={keys.rogue_client_cert}",
        f"--ssl-key={keys.client_private}",
    )
    message = refusal(run, agent.address)
    assert message.startswith(f"127.0.0.1:{agent.port}: server refused our client certificate")
    assert took < FAST
    assert orders_logged(agent) == 0
    wait_logged(agent, "client sent no certificate; ssl_client_ca requires one")
    wait_logged(agent, "client certificate is not signed by the ssl_client_ca")

    for pin_or_ca in (f"--ssl-ca={keys.ca}", f"--ssl-public-key={keys.agent_public}"):
        run, _ = client(
            agent.address,
            *ECHO,
            pin_or_ca,
            f"--ssl-cert={keys.client_cert}",
            f"--ssl-key={keys.client_private}",
        )
        assert_echoed(run, agent.address)


# ---------------------------------------------------------------- plain and TLS mixed up


def test_plain_client_to_tls_agent_is_one_line_and_the_agent_keeps_serving(daemons, jobs, keys):
    """A plain client to a TLS agent: one line saying to use TLS, fast; the agent goes on."""
    agent = tls_agent(daemons, jobs, ssl_private_key=keys.agent_private)
    run, took = client(agent.address, *ECHO)
    message = refusal(run, agent.address)
    assert message.startswith(f"127.0.0.1:{agent.port}"), message
    assert took < FAST
    wait_logged(agent, "client sent plain HTTP, not TLS")
    # What to fix: the client must speak TLS to this port.
    assert "TLS" in message and "--ssl-public-key" in message, message
    run, _ = client(agent.address, *ECHO, f"--ssl-public-key={keys.agent_public}")
    assert_echoed(run, agent.address)


def test_tls_client_to_plain_agent_is_one_line_and_the_agent_keeps_serving(daemons, jobs, keys):
    """A TLS client to a plain agent: one line within the agent's socket timeout; it goes on."""
    # The agent waits for a request line a ClientHello may not contain, then answers plain HTTP.
    # Given a key but not ssl = true, it warns that it listens without TLS.
    agent = daemons.agent(
        jobs=jobs, server={"socket_timeout": 2, "ssl_private_key": keys.agent_private}
    )
    assert "ssl_private_key set but ssl is off: listening WITHOUT TLS" in agent.log_text()
    run, took = client(agent.address, *ECHO, f"--ssl-public-key={keys.agent_public}")
    message = refusal(run, agent.address)
    assert message == f"127.0.0.1:{agent.port}: server does not speak TLS (is ssl enabled on it?)"
    assert took < FAST  # the agent answers within its socket_timeout (2 s)
    run, _ = client(agent.address, *ECHO)
    assert_echoed(run, agent.address)


def test_a_stalled_handshake_is_dropped_after_the_socket_timeout(daemons, jobs, keys):
    """A TLS handshake not completed within socket_timeout is dropped, not held forever."""
    # Silent, or stopped inside its ClientHello: the agent's own 408 cannot close such a
    # connection (TLS holds it until the handshake completes); the handshake deadline does.
    agent = tls_agent(daemons, jobs, ssl_private_key=keys.agent_private)  # socket_timeout 2
    partial_hello = bytes.fromhex("16030102000100 01fc0303")
    stalled = []
    for first_bytes in (b"", partial_hello):
        conn = socket.create_connection((agent.host, agent.port), timeout=2 + FAST)
        conn.sendall(first_bytes)
        stalled.append(conn)
    started = time.monotonic()
    for conn in stalled:
        with conn:
            try:
                # Blocks until the agent closes (b"") or resets; a timeout fails the test.
                assert conn.recv(65536) == b""
            except ConnectionResetError:
                pass
    assert time.monotonic() - started < 2 + FAST
    wait_logged(agent, "TLS handshake not completed within 2 s", 2)
    run, _ = client(agent.address, *ECHO, f"--ssl-public-key={keys.agent_public}")
    assert_echoed(run, agent.address)


# ---------------------------------------------------------------- protocol versions


def _probe(agent: AgentProcess, version: ssl.TLSVersion) -> ssl.SSLSocket:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    # Old versions are off by default at OpenSSL 3's security level; allow them so that only
    # the agent can refuse.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = context.maximum_version = version
    raw = socket.create_connection((agent.host, agent.port), timeout=5)
    return context.wrap_socket(raw)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_agent_refuses_tls_below_1_2_and_serves_1_2(daemons, jobs, keys):
    """The agent refuses TLS 1.0/1.1 itself and serves a TLS 1.2 client."""
    # The refusal is the agent's protocol_version alert, not our probe giving up.
    agent = tls_agent(daemons, jobs, ssl_private_key=keys.agent_private)
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        with pytest.raises(ssl.SSLError) as refused:
            _probe(agent, version).close()
        assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value
    wait_logged(agent, "client offers no TLS version deploy accepts (1.2 or newer)", 2)
    with _probe(agent, ssl.TLSVersion.TLSv1_2) as tls:
        assert tls.version() == "TLSv1.2"
        tls.sendall(
            build_request(Order("exec", "service:echo,tls12"), ClientOptions(), "x", time.time())
        )
        answer = bytearray()
        while chunk := tls.recv(65536):
            answer += chunk
    status, _, body = parse_response(bytes(answer))
    assert status == 200 and b'"return": "true"' in body.replace(b'":"', b'": "'), answer


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_client_refuses_a_server_offering_only_tls_1_1(keys):
    """deploy-client will not go below TLS 1.2: a TLS 1.1-only server is one clear line."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.load_cert_chain(keys.agent_cert, keys.agent_private)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    outcome: list[BaseException] = []

    def serve_one() -> None:
        try:
            conn, _ = listener.accept()
            with context.wrap_socket(conn, server_side=True):
                pass
        except (OSError, ssl.SSLError) as e:
            outcome.append(e)

    server = threading.Thread(target=serve_one, daemon=True)
    server.start()
    try:
        run, took = client(f"127.0.0.1:{port}", *ECHO, f"--ssl-public-key={keys.agent_public}")
    finally:
        server.join(10)
        listener.close()
    message = refusal(run, f"127.0.0.1:{port}")
    assert message.startswith(
        f"127.0.0.1:{port}: no common TLS version; deploy needs TLS 1.2 or newer"
    ), message
    assert took < FAST
    # The handshake failed on the server side too: nothing was ever spoken in TLS 1.1.
    assert outcome and isinstance(outcome[0], ssl.SSLError), outcome


# ---------------------------------------------------------------- through the proxy


def proxy_ini(
    tmp_path: Path, port: int, servers: list[str], *, server: str = "", client_tls: str = ""
) -> str:
    api = tmp_path / f"api-{port}.ini"
    api.write_text(
        "[keys]\ntlskey[] = fleet\n\n[servers]\n" + "".join(f"fleet[] = {h}\n" for h in servers)
    )
    return (
        f"[server]\naddr = 127.0.0.1\nport = {port}\n{server}\n"
        f"[client]\nthread_timeout = 10\nsocket_timeout = 5\n{client_tls}\n"
        f"[allow::hosts]\nhost[] = 127.0.0.0/8\n\n[api]\npath = {api}\n"
    )


def proxy_answers(run: ClientRun, proxy: str) -> dict[str, dict[str, Any]]:
    """host → that agent's entry, from the proxy's answer to an exec."""
    entry = run.entry(proxy, "exec")
    assert entry["serverStatus"] == 1 and entry["returnCode"] == "200", entry
    return {host: orders["exec"] for host, orders in entry["content"].items()}


def via_proxy(proxy: str, *args: str) -> tuple[ClientRun, float]:
    port = proxy.rsplit(":", 1)[1]
    return client(proxy, f"--port={port}", "--api-key=tlskey", "--args=groups:fleet", *ECHO, *args)


def test_proxy_pins_agents_and_reports_a_mismatch_for_that_host_only(daemons, jobs, keys, tmp_path):
    """Client → proxy over TLS; proxy → agents pinned: a wrong key fails that agent only."""
    good = [tls_agent(daemons, jobs, ssl_private_key=keys.agent_private) for _ in range(2)]
    odd = tls_agent(daemons, jobs, ssl_private_key=keys.other_private)
    hosts = [good[0].address, odd.address, good[1].address]
    port = free_port()
    proxy = daemons.proxy(
        proxy_ini(
            tmp_path,
            port,
            hosts,
            server=f"ssl = true\nssl_private_key = {keys.proxy_private}\n",
            client_tls=f"ssl = true\nssl_public_key = {keys.agent_public}\n",
        ),
        "127.0.0.1",
        port,
    )
    run, took = via_proxy(proxy.address, f"--ssl-public-key={keys.proxy_public}")
    assert took < FAST
    answers = proxy_answers(run, proxy.address)
    assert set(answers) == set(hosts)
    for agent in good:
        assert answers[agent.address]["serverStatus"] == 1, answers
        assert answers[agent.address]["content"]["return"] == "true", answers
    message = answers[odd.address]["content"]
    assert answers[odd.address]["serverStatus"] == 0, answers
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith(
        f"127.0.0.1:{odd.port}: server key does not match pinned public key {keys.agent_public}"
    ), message
    assert orders_logged(odd) == 0
    assert run.rc == 3  # one agent unreachable, none failed

    # The proxy pins its own key for the client too, and keeps serving after a refusal.
    run, took = via_proxy(proxy.address, f"--ssl-public-key={keys.agent_public}")
    assert "does not match pinned public key" in refusal(run, proxy.address)
    assert took < FAST
    run, _ = via_proxy(proxy.address, f"--ssl-public-key={keys.proxy_public}")
    assert proxy_answers(run, proxy.address)[good[0].address]["serverStatus"] == 1


def test_proxy_verifies_agents_with_a_ca(daemons, jobs, keys, tmp_path):
    """Proxy → agents with [client] ssl_ca + client certificate; a self-signed agent fails alone."""
    signed = mutual_tls_agent(daemons, jobs, keys)
    self_signed = tls_agent(daemons, jobs, ssl_private_key=keys.agent_private)
    port = free_port()
    proxy = daemons.proxy(
        proxy_ini(
            tmp_path,
            port,
            [signed.address, self_signed.address],
            client_tls=(
                f"ssl = true\nssl_ca = {keys.ca}\n"
                f"ssl_cert = {keys.client_cert}\nssl_key = {keys.client_private}\n"
            ),
        ),
        "127.0.0.1",
        port,
    )
    run, _ = via_proxy(proxy.address)
    answers = proxy_answers(run, proxy.address)
    assert answers[signed.address]["content"]["return"] == "true", answers
    assert answers[self_signed.address].pop("seconds") >= 0  # its own time (issue 13)
    assert answers[self_signed.address] == {
        "return": 0,
        "serverStatus": 0,
        "returnCode": None,  # null, as the original (issue 15)
        "returnString": None,
        "content": f"127.0.0.1:{self_signed.port}: server certificate is not signed by the CA "
        f"in {keys.ca}",
    }


# ---------------------------------------------------------------- configuration errors


def refused_to_start(daemon: AgentProcess) -> str:
    """Wait for the daemon to exit; check it failed and never listened; its output."""
    wait_until(lambda: daemon.proc.poll() is not None, 30, what=f"{daemon.name} to exit")
    output = daemon.log_text()
    assert daemon.proc.returncode != 0, output
    assert "starting on" not in output, output  # the factory never started listening
    assert not can_connect(daemon.host, daemon.port)
    return output


def test_agent_tls_config_errors_stop_it_before_it_listens(daemons, jobs, keys, tmp_path):
    """Unusable TLS files or settings stop the agent before it listens, naming the file."""
    missing = tmp_path / "no-such-private.pem"
    missing_ca = tmp_path / "no-such-ca.pem"
    tls = {"ssl": "true"}
    cases: list[tuple[dict[str, Any], list[str], str]] = [
        ({**tls, "ssl_private_key": missing}, [], f"cannot read private key {missing}"),
        (
            {**tls, "ssl_private_key": keys.other_private, "ssl_certificate": keys.agent_cert},
            [],
            f"server certificate {keys.agent_cert} does not match private key {keys.other_private}",
        ),
        # config.py locates this one: the ini file and the line of `ssl = true`.
        (tls, [], ".ini:5: ssl = true needs ssl_private_key"),
        (
            {**tls, "ssl_private_key": keys.agent_private, "ssl_client_ca": missing_ca},
            [],
            f"cannot read client CA {missing_ca}",
        ),
        (
            {**tls, "ssl_private_key": keys.agent_public},
            [],
            f"{keys.agent_public} holds a public key",
        ),
        ({}, [f"--ssl-private-key={missing}"], f"cannot read private key {missing}"),
    ]
    # Started together: each exits on its own, so waiting for them one by one costs no more.
    started = [
        (daemons.agent(jobs=jobs, server=server, extra=extra, wait=False), expected)
        for server, extra, expected in cases
    ]
    for daemon, expected in started:
        assert expected in refused_to_start(daemon), expected


def test_proxy_tls_config_errors_stop_it_before_it_listens(daemons, keys, tmp_path):
    """Unusable [server]/[client] TLS settings stop the proxy before it listens, naming the file."""
    missing = tmp_path / "no-such.pem"
    cases = [
        (f"ssl = true\nssl_private_key = {missing}\n", "", f"cannot read private key {missing}"),
        ("", f"ssl = true\nssl_public_key = {missing}\n", f"cannot read public key {missing}"),
        ("", f"ssl = true\nssl_ca = {missing}\n", f"cannot read CA {missing}"),
        ("", "ssl = true\n", "TLS needs --ssl-public-key or --ssl-ca"),
    ]
    started = []
    for server, client_tls, expected in cases:
        port = free_port()
        ini = proxy_ini(tmp_path, port, ["127.0.0.1"], server=server, client_tls=client_tls)
        started.append((daemons.proxy(ini, "127.0.0.1", port, wait=False), expected))
    for proxy, expected in started:
        assert expected in refused_to_start(proxy), expected


def test_client_tls_file_errors_are_one_line_usage_errors(keys, tmp_path):
    """Unusable TLS files make deploy-client exit 1 with one line, before contacting any host."""
    missing = tmp_path / "no-such-public.pem"
    cases = [
        ([f"--ssl-public-key={missing}"], f"cannot read public key {missing}"),
        ([f"--ssl-public-key={keys.agent_private}"], f"{keys.agent_private} holds a private key"),
        ([f"--ssl-ca={missing}"], f"cannot read CA {missing}"),
        ([f"--ssl-ca={keys.ca}", f"--ssl-cert={keys.client_cert}"], "--ssl-key"),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:
        runs = list(pool.map(lambda case: client("127.0.0.1:9", *ECHO, *case[0]), cases))
    for (run, _), (_, expected) in zip(runs, cases, strict=True):
        assert run.rc == 1, run.stdout + run.stderr
        assert "Traceback" not in run.stderr, run.stderr
        (line,) = run.stderr.strip().splitlines()
        assert line.startswith("deploy-client: error: ") and expected in line, line
