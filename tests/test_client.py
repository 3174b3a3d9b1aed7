"""Tests of the client side of the wire: the request bytes it sends, `OrderClient` against a
scripted fake agent on loopback (answers, garbage, hang-ups), and its timeouts, refused and
unreachable hosts on a MemoryReactorClock (no real waiting)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, error, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from deploy.auth import HmacVerifier, check_legacy_auth_key
from deploy.client import (
    MAX_HEAD,
    ClientOptions,
    HostResult,
    Order,
    OrderClient,
    build_request,
    decode_content,
    split_host,
)
from deploy.wire import STATUS_TEXT, decode_form

# --------------------------------------------------------------------------- a scripted agent

Script = Callable[["ScriptedAgent"], None]


def response(
    status: int = 200,
    body: bytes = b"",
    content_type: str = "application/json; charset=utf-8",
    length: str | None = None,
) -> bytes:
    """An answer laid out as the agent writes it (Content-Length overridable for bad ones)."""
    head = (
        f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Unknown')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def json_response(obj: object, status: int = 200) -> bytes:
    return response(status, json.dumps(obj, indent=0).encode())


def answer(data: bytes) -> Script:
    """Write `data` and close."""

    def script(proto: ScriptedAgent) -> None:
        proto.transport.write(data)
        proto.transport.loseConnection()

    return script


def answer_in_pieces(data: bytes, size: int = 1) -> Script:
    """Write `data` `size` bytes per reactor turn, then close."""

    def script(proto: ScriptedAgent) -> None:
        def step(offset: int) -> None:
            if proto.lost:
                return
            if offset >= len(data):
                proto.transport.loseConnection()
                return
            proto.transport.write(data[offset : offset + size])
            reactor.callLater(0, step, offset + size)

        step(0)

    return script


def hang(proto: ScriptedAgent) -> None:
    """Read the request and never answer."""


def hang_up(proto: ScriptedAgent) -> None:
    """Read the request and close without a word."""
    proto.transport.loseConnection()


class ScriptedAgent(Protocol):
    """Reads one request (headers + Content-Length body), records it, runs the script."""

    factory: ScriptedFactory

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.answered = False
        self.lost = False

    def connectionMade(self) -> None:
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.answered:
            return
        head, sep, body = bytes(self.buffer).partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if len(body) < length:
            return
        self.answered = True
        self.factory.requests.append(bytes(self.buffer))
        self.factory.script(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True


class ScriptedFactory(Factory):
    protocol = ScriptedAgent

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections: list[ScriptedAgent] = []


class FakeAgent:
    """A scripted agent listening on 127.0.0.1 (or ::1) on a free port, in this reactor."""

    def __init__(self, script: Script, host: str = "127.0.0.1") -> None:
        self.factory = ScriptedFactory(script)
        self.host = host
        self.listening = reactor.listenTCP(0, self.factory, interface=host)
        self.port: int = self.listening.getHost().port

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def requests(self) -> list[bytes]:
        return self.factory.requests

    def stop(self) -> defer.Deferred[object]:
        for c in self.factory.connections:
            if not c.lost:
                c.transport.abortConnection()
        return defer.maybeDeferred(self.listening.stopListening)


ADDRESS = "127.0.0.1:3440"


class ClockedSend:
    """One `OrderClient.send` of `status web` to ADDRESS on a MemoryReactorClock: nothing
    connects until the test says how the connection attempt goes, and time passes only when
    the test advances the clock."""

    def __init__(self, **options: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.results: list[HostResult] = []
        client = OrderClient(self.reactor, ClientOptions(**options))
        client.send(ADDRESS, Order("status", "web")).addCallback(self.results.append)
        self.host, self.port, self.factory, self.timeout, _ = self.reactor.tcpClients[0]
        self.connector = self.reactor.connectors[0]
        self.protocol: Protocol | None = None

    @property
    def result(self) -> HostResult | None:
        return self.results[0] if self.results else None

    def connect(self) -> StringTransport:
        """The agent accepts: the client's protocol runs on a StringTransport."""
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", self.host, self.port))
        transport = StringTransport()
        self.protocol.makeConnection(transport)
        return transport

    def refuse(self) -> None:
        """Nothing listens: the attempt fails at once, as the kernel refuses it."""
        self.factory.clientConnectionFailed(self.connector, Failure(error.ConnectionRefusedError()))

    def never_accept(self) -> None:
        """The host never answers the SYN: as the real reactor's connector does, the attempt
        fails with TimeoutError once the timeout given to connectTCP has passed (unless the
        client stopped it first)."""

        def timed_out() -> None:
            if not self.connector.stoppedConnecting:
                self.factory.clientConnectionFailed(self.connector, Failure(error.TimeoutError()))

        self.reactor.callLater(self.timeout, timed_out)


def refused_address() -> str:
    """A loopback host:port where nothing listens, so connections are refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


def split_request(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, body


async def send_to(
    script: Script, order: Order | None = None, **options: object
) -> tuple[HostResult, FakeAgent]:
    agent = FakeAgent(script)
    try:
        client = OrderClient(reactor, ClientOptions(**options))  # type: ignore[arg-type]
        result = await client.send(agent.address, order or Order("status", "web"))
    finally:
        await agent.stop()
    return result, agent


# --------------------------------------------------------------------------- request bytes


def test_build_request_signed_is_verifiable() -> None:
    """The default request carries an HMAC the agent's verifier accepts, and no auth_key."""
    clock = Clock()
    clock.advance(1_700_000_000)
    raw = build_request(
        Order("status", "web"), ClientOptions(key_cipher="s3cret"), "h", 1_700_000_000
    )
    start, headers, body = split_request(raw)
    assert start == "POST /agent/status HTTP/1.1"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert decode_form(body) == {"auth_key": "", "options": "web", "args": "", "api_key": ""}
    verifier = HmacVerifier("s3cret", clock=clock)
    verifier.verify(headers["authorization"], "POST", "/agent/status", body)


def test_build_request_legacy_has_one_time_key_and_no_signature() -> None:
    """With legacy auth the body carries the original's auth_key and there is no signature."""
    now = 1_700_000_000.0
    raw = build_request(
        Order("exec", "service:echo,1+1"), ClientOptions(legacy_auth=True), "h", now
    )
    _, headers, body = split_request(raw)
    assert "authorization" not in headers
    fields = decode_form(body)
    assert fields["options"] == "service:echo,1+1"
    check_legacy_auth_key("65535", fields["auth_key"], now=now)
    assert body.startswith(b"auth_key=") and b"&options=service:echo,1%2B1&" in body


def test_build_request_proxy_fields() -> None:
    """Proxy orders carry args and api_key in the original's field order, then extras."""
    order = Order("rsync", "web", "groups:g1", "KEY", {"batch": "10%"})
    body = split_request(build_request(order, ClientOptions(), "h", 1e9))[2]
    assert body.split(b"&")[1:] == [
        b"options=web",
        b"args=groups:g1",
        b"api_key=KEY",
        b"batch=10%25",
    ]


def test_build_request_host_header() -> None:
    """The Host header names the host; an IPv6 literal in brackets (RFC 7230)."""
    assert b"\r\nHost: web1\r\n" in build_request(
        Order("status", "web"), ClientOptions(), "web1", 1e9
    )
    assert b"\r\nHost: [::1]\r\n" in build_request(
        Order("status", "web"), ClientOptions(), "::1", 1e9
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("web1", ("web1", 3440)),
        ("web1:4000", ("web1", 4000)),
        ("[::1]:4000", ("::1", 4000)),
        ("[::1]", ("::1", 3440)),
        ("::1", ("::1", 3440)),
        (" 10.0.0.1:1 ", ("10.0.0.1", 1)),
    ],
)
def test_split_host(spec: str, expected: tuple[str, int]) -> None:
    """`host`, `host:port`, `[v6]:port` and bare IPv6 addresses name a host and port."""
    assert split_host(spec, 3440) == expected


def test_decode_content_json_and_text() -> None:
    """JSON bodies (even sent as text/plain by the original proxy) parse; others stay text."""
    assert decode_content({}, b'{"return": "true"}') == {"return": "true"}
    assert decode_content({}, b"exec[x] not found!") == "exec[x] not found!"
    assert decode_content({}, b"{not json") == "{not json"


# --------------------------------------------------------------------------- answers


@pytest_twisted.ensureDeferred
async def test_json_answer_becomes_the_original_shape() -> None:
    """A 200 JSON answer: serverStatus 1, returnCode "200", content = the agent's JSON."""
    content = {"return": "true", "transferFilesCount": "3"}
    result, agent = await send_to(answer(json_response(content)))
    assert result.to_json() == {
        "return": 1,
        "serverStatus": 1,
        "returnCode": "200",
        "returnString": "OK",
        "content": content,
    }
    assert result.succeeded
    start, headers, _ = split_request(agent.requests[0])
    assert start == "POST /agent/status HTTP/1.1"
    assert headers["authorization"].startswith("Deploy-HMAC-SHA256 ")


@pytest_twisted.ensureDeferred
async def test_answer_return_false_is_not_success() -> None:
    """An answer with `return` "false" is a 200 but not a success."""
    result, _ = await send_to(answer(json_response({"return": "false", "content": ""})))
    assert result.http_ok and not result.succeeded
    assert result.to_json()["return"] == 1


@pytest_twisted.ensureDeferred
async def test_error_answer_keeps_code_and_text() -> None:
    """A 400 text answer: returnCode "400", the original reason, content = the text."""
    body = b"exec[service:nosuch] not found!"
    result, _ = await send_to(answer(response(400, body, "text/plain; charset=utf-8")))
    assert result.to_json() == {
        "return": 0,
        "serverStatus": 1,
        "returnCode": "400",
        "returnString": "Bad Request",
        "content": "exec[service:nosuch] not found!",
    }
    assert not result.succeeded and not result.unreachable


@pytest_twisted.ensureDeferred
async def test_answer_arriving_byte_by_byte() -> None:
    """An answer that arrives one byte at a time gives the same result as a whole one."""
    data = json_response({"return": "true", "process": ["1", "2"]})
    whole, _ = await send_to(answer(data))
    pieces, _ = await send_to(answer_in_pieces(data, 1))
    assert pieces.to_json() == whole.to_json()
    assert pieces.content == {"return": "true", "process": ["1", "2"]}


@pytest_twisted.ensureDeferred
async def test_answer_without_content_length_is_read_until_close() -> None:
    """Without Content-Length the body is everything until the agent closes."""
    data = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"return": "true"}'
    result, _ = await send_to(answer(data))
    assert result.content == {"return": "true"}


@pytest_twisted.ensureDeferred
async def test_bytes_beyond_content_length_are_ignored() -> None:
    """Only Content-Length bytes are the body."""
    result, _ = await send_to(answer(response(200, b'{"return": "true"}') + b"GARBAGE"))
    assert result.content == {"return": "true"}


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP answer"),
        (b"HTTP/1.1 OK\r\n\r\n", "not an HTTP answer"),
        (response(200, b"{}", length="abc"), "bad Content-Length"),
        (response(200, b"{}", length="-1"), "bad Content-Length"),
        (response(200, b"{}", length="\xb2"), "bad Content-Length"),
        (response(200, b'{"return": "true"}', length="500"), "closed before the whole answer"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"x" * (MAX_HEAD + 10), "headers too large"),
    ],
    ids=["ssh", "no-code", "length-abc", "length-negative", "length-superscript", "cut", "huge"],
)
@pytest_twisted.ensureDeferred
async def test_garbage_answer_is_that_hosts_error(data: bytes, why: str) -> None:
    """Garbage, a bad Content-Length, a cut answer or huge headers: serverStatus 0 with why."""
    result, agent = await send_to(answer(data))
    assert result.server_status == 0
    assert result.content.startswith(f"bad answer from {agent.address}: ")
    assert why in result.content
    assert not result.succeeded


@pytest_twisted.ensureDeferred
async def test_hang_up_without_answer() -> None:
    """An agent that closes without answering is reported as such, with the likely cause (a TLS
    port: every deploy daemon answers, if only with an error)."""
    result, agent = await send_to(hang_up)
    assert result.server_status == 0
    assert result.content == (
        f"{agent.address} closed the connection without an answer "
        "(is it a TLS port? then use --ssl-public-key or --ssl-ca)"
    )


def test_slow_agent_is_process_timeout_and_connection_dropped() -> None:
    """No answer within thread_timeout: `Process Timeout(N)!`, and the connection is closed."""
    send = ClockedSend(thread_timeout=0.5)
    transport = send.connect()
    start, _, _ = split_request(transport.value())
    assert start == "POST /agent/status HTTP/1.1"
    send.reactor.advance(0.49)
    assert send.result is None
    send.reactor.advance(0.01)
    assert send.result is not None
    assert send.result.server_status == 0
    assert send.result.content == "Process Timeout(0.5)!"
    assert transport.disconnecting
    assert not send.reactor.getDelayedCalls()


def test_refused_is_cant_connect_at_once() -> None:
    """A port where nothing listens: `can't connect to HOST:PORT`, without waiting."""
    send = ClockedSend(thread_timeout=10, socket_timeout=5)
    send.refuse()
    result = send.result  # with the clock not advanced at all
    assert result is not None
    assert result.content == f"can't connect to {ADDRESS}"
    assert result.server_status == 0 and result.unreachable
    assert result.to_json()["returnCode"] is None  # null, as the original (issue 15)
    assert not send.reactor.getDelayedCalls()


def test_unreachable_gives_up_after_socket_timeout() -> None:
    """A host that never completes the connection is `can't connect` after socket_timeout."""
    send = ClockedSend(thread_timeout=20, socket_timeout=0.5)
    send.never_accept()
    send.reactor.advance(0.49)
    assert send.result is None
    send.reactor.advance(0.01)
    assert send.result is not None
    assert send.result.content == f"can't connect to {ADDRESS}"
    assert not send.reactor.getDelayedCalls()


def test_connect_slower_than_thread_timeout_is_process_timeout() -> None:
    """When thread_timeout ends before socket_timeout, the host is a `Process Timeout`."""
    send = ClockedSend(thread_timeout=0.5, socket_timeout=20)
    send.never_accept()
    send.reactor.advance(0.5)
    assert send.result is not None
    assert send.result.content == "Process Timeout(0.5)!"
    assert send.connector.stoppedConnecting


def test_no_timer_left_after_an_answer() -> None:
    """A host that answered leaves no pending timeout in the reactor."""
    send = ClockedSend(thread_timeout=30)
    send.connect()
    assert send.protocol is not None
    send.protocol.dataReceived(json_response({"return": "true"}))
    assert send.result is not None and send.result.succeeded
    assert not send.reactor.getDelayedCalls()


@pytest_twisted.ensureDeferred
async def test_ipv6_loopback_host() -> None:
    """`[::1]:port` reaches an agent listening on IPv6 loopback."""
    agent = FakeAgent(answer(json_response({"return": "true"})), host="::1")
    try:
        result = await OrderClient(reactor, ClientOptions()).send(
            agent.address, Order("rkill", "web")
        )
    finally:
        await agent.stop()
    assert result.succeeded
    assert result.host == agent.address


@pytest_twisted.ensureDeferred
async def test_bad_port_in_host_is_that_hosts_error() -> None:
    """A host spec with a bad port is reported for that host, nothing is sent."""
    result = await OrderClient(reactor, ClientOptions()).send("web1:http", Order("status", "web"))
    assert result.server_status == 0
    assert "bad port" in result.content


@pytest_twisted.ensureDeferred
async def test_legacy_request_on_the_wire() -> None:
    """With legacy_auth the agent receives a fresh one-time auth_key and no Authorization."""
    result, agent = await send_to(
        answer(json_response({"return": "true"})),
        Order("exec", "service:echo,hi"),
        legacy_auth=True,
    )
    assert result.succeeded
    _, headers, body = split_request(agent.requests[0])
    assert "authorization" not in headers
    check_legacy_auth_key("65535", decode_form(body)["auth_key"], now=time.time())
