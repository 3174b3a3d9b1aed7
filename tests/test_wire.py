"""Unit tests of the wire layer: request framing and limits on `StringTransport`, form decoding,
the idle timeout on a `Clock`, and the agent's protocol and `AgentService` helpers without any
real process or socket."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

import deploy
from deploy import agent_orders
from deploy.access import PathNotAllowed
from deploy.agent import AgentFactory, AgentService
from deploy.auth import AuthError, legacy_auth_key, sign_request
from deploy.config import load_agent_config
from deploy.errors import CapacityExceeded, InvalidTarget, NotGranted, status_for
from deploy.wire import (
    MAX_BODY,
    MAX_HEADERS,
    MAX_LINE,
    HttpRequestReceiver,
    Request,
    RequestError,
    Response,
    decode_form,
    encode_form,
)

RSYNC_DATA = Path(__file__).parent / "data" / "rsync"
NOW = 1_700_000_000.0


# --------------------------------------------------------------------------- helpers


class EchoReceiver(HttpRequestReceiver):
    """Answers every request with what it understood of it."""

    socket_timeout = 5.0

    def handleRequest(self, request: Request) -> Response:
        return Response.json(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query,
                "fields": request.form(),
                "body": request.body.decode("latin-1"),
            }
        )


class FailingReceiver(HttpRequestReceiver):
    """A handler with a bug in it."""

    def handleRequest(self, request: Request) -> Response:
        raise ZeroDivisionError("handler bug")


def connect(
    receiver: HttpRequestReceiver, clock: Clock | None = None, peer: str = "127.0.0.1"
) -> StringTransport:
    if clock is not None:
        receiver.callLater = clock.callLater  # type: ignore[method-assign]
    transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
    receiver.makeConnection(transport)
    return transport


def exchange(data: bytes, chunk: int | None = None, receiver_class: type = EchoReceiver) -> bytes:
    """Feed `data` (in chunks of `chunk` bytes) to a fresh receiver; what it wrote back."""
    receiver = receiver_class()
    transport = connect(receiver, Clock())
    step = chunk or len(data) or 1
    for i in range(0, len(data), step):
        receiver.dataReceived(data[i : i + step])
    return transport.value()


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete answer in {raw[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert int(headers["content-length"]) == len(body)
    return status, headers, body


def post(path: str, body: bytes, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Connection: close", f"Content-Length: {len(body)}"]
    return ("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode("latin-1") + body


# --------------------------------------------------------------------------- framing


REQUEST = post("/agent/status", b"auth_key=&options=web%2Cx+y&args=&api_key=")


def test_same_answer_for_every_chunk_size() -> None:
    """A request fed in chunks of every size from 1 to its length gets the same answer."""
    whole = exchange(REQUEST)
    status, _, body = parse(whole)
    assert status == 200
    assert json.loads(body)["fields"]["options"] == "web,x y"
    for size in range(1, len(REQUEST) + 1):
        assert exchange(REQUEST, size) == whole, f"chunk size {size}"


def test_bare_newlines_frame_like_crlf() -> None:
    """Lines ended by a bare LF are read like CRLF lines (the old Perl client's tolerance)."""
    assert exchange(REQUEST.replace(b"\r\n", b"\n")) == exchange(REQUEST)


def test_answer_is_written_once_and_connection_closes() -> None:
    """One request per connection: the answer says Connection: close and the socket closes."""
    receiver = EchoReceiver()
    transport = connect(receiver, Clock())
    receiver.dataReceived(REQUEST)
    status, headers, _ = parse(transport.value())
    assert status == 200
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert transport.disconnecting


def test_bytes_after_the_request_are_ignored() -> None:
    """Anything sent after a complete request (another request, garbage) is not read."""
    tail = b"GARBAGE\r\n\r\n" + post("/agent/rkill", b"options=other")
    assert exchange(REQUEST + tail) == exchange(REQUEST)
    receiver = EchoReceiver()
    transport = connect(receiver, Clock())
    receiver.dataReceived(REQUEST)
    first = transport.value()
    receiver.dataReceived(tail)
    assert transport.value() == first


def test_body_stops_at_content_length() -> None:
    """Bytes beyond Content-Length are not part of the body."""
    raw = post("/agent/status", b"options=web") + b"&options=evil"
    _, _, body = parse(exchange(raw))
    assert json.loads(body)["fields"] == {"options": "web"}


# --------------------------------------------------------------------------- limits


def test_request_line_too_long_is_400_and_closes() -> None:
    """A request line longer than MAX_LINE gets 400 and the connection closes."""
    receiver = EchoReceiver()
    transport = connect(receiver, Clock())
    receiver.dataReceived(b"GET /" + b"a" * (MAX_LINE + 10))  # no newline yet
    status, _, _ = parse(transport.value())
    assert status == 400
    assert transport.disconnecting


def test_request_line_too_long_with_newline_is_400() -> None:
    """The same limit holds when the over-long line arrives whole, newline included."""
    status, _, _ = parse(exchange(b"GET /" + b"a" * (MAX_LINE + 10) + b" HTTP/1.1\r\n\r\n"))
    assert status == 400


def test_line_of_max_length_is_accepted() -> None:
    """A line of exactly MAX_LINE bytes (CR included) is still read."""
    line = b"X-Pad: " + b"p" * (MAX_LINE - len(b"X-Pad: ") - 1) + b"\r"
    assert len(line) == MAX_LINE
    raw = REQUEST.replace(b"Connection: close\r\n", line + b"\n")
    assert parse(exchange(raw))[0] == 200


def test_header_line_too_long_is_431() -> None:
    """An over-long header line gets 431 Request Header Fields Too Large and closes."""
    raw = b"POST /agent/status HTTP/1.1\r\nX-Big: " + b"b" * (MAX_LINE + 1) + b"\r\n\r\n"
    receiver = EchoReceiver()
    transport = connect(receiver, Clock())
    receiver.dataReceived(raw)
    assert parse(transport.value())[0] == 431
    assert transport.disconnecting


def test_too_many_headers_is_431() -> None:
    """More than MAX_HEADERS header lines get 431; exactly MAX_HEADERS is fine."""

    def with_headers(n: int) -> bytes:
        extra = [f"X-H{i}: v" for i in range(n - 1)]  # plus Content-Length
        return post("/agent/status", b"options=web", *extra).replace(b"Connection: close\r\n", b"")

    assert parse(exchange(with_headers(MAX_HEADERS)))[0] == 200
    status, headers, _ = parse(exchange(with_headers(MAX_HEADERS + 1)))
    assert status == 431
    assert headers["content-type"].startswith("text/plain")


def test_body_larger_than_max_is_413_before_reading_it() -> None:
    """A Content-Length above the body limit gets 413 as soon as the headers end."""
    raw = f"POST /agent/status HTTP/1.1\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode()
    receiver = EchoReceiver()
    transport = connect(receiver, Clock())
    receiver.dataReceived(raw)
    assert parse(transport.value())[0] == 413
    assert transport.disconnecting


@pytest.mark.parametrize(
    "value",
    ["abc", "1e3", "-1", "+5", "0x10", "1 2", "", "\xb2", "\u0663", "9" * 20, "99999999999999"],
)
def test_bad_content_length_is_400(value: str) -> None:
    """A Content-Length that is not plain ASCII digits, negative or huge gets 400."""
    raw = f"POST /agent/status HTTP/1.1\r\nContent-Length: {value}\r\n\r\nx".encode(
        "utf-8" if value == "\u0663" else "latin-1"
    )
    receiver = EchoReceiver()
    transport = connect(receiver, Clock())
    receiver.dataReceived(raw)  # must not raise
    assert parse(transport.value())[0] == 400
    assert transport.disconnecting


def test_post_without_content_length_is_411() -> None:
    """A POST without Content-Length gets 411 Length Required."""
    status, _, body = parse(exchange(b"POST /agent/status HTTP/1.1\r\nConnection: close\r\n\r\n"))
    assert status == 411
    assert b"Content-Length" in body


def test_transfer_encoding_is_refused() -> None:
    """Chunked bodies are not supported: 400, not a hang waiting for a length."""
    raw = (
        b"POST /agent/status HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    assert parse(exchange(raw))[0] == 400


def test_content_length_zero_answers_at_once() -> None:
    """`Content-Length: 0` is answered at once, not after socket_timeout (the old agent stalled)."""
    clock = Clock()
    receiver = EchoReceiver()
    transport = connect(receiver, clock)
    receiver.dataReceived(b"POST /agent/status HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    status, _, body = parse(transport.value())  # no clock.advance: at once
    assert status == 200
    assert json.loads(body)["fields"] == {}
    receiver.connectionLost()  # the client took the answer: the write deadline goes too
    assert not clock.getDelayedCalls()


def test_get_without_body_answers_at_once() -> None:
    """A GET needs no Content-Length and is answered when its headers end."""
    raw = exchange(b"GET /agent/status?options=web HTTP/1.1\r\n\r\n")
    assert parse(raw)[0] == 200


# --------------------------------------------------------------------------- decoding


def test_get_with_query_string() -> None:
    """GET reads its fields from the query string, decoded like a form body."""
    _, _, body = parse(
        exchange(b"GET /agent/exec?options=service%3Aecho%2C1+1&args= HTTP/1.1\r\n\r\n")
    )
    answer = json.loads(body)
    assert answer["method"] == "GET"
    assert answer["path"] == "/agent/exec"
    assert answer["fields"] == {"options": "service:echo,1 1", "args": ""}


def test_body_fields_win_over_query_fields() -> None:
    """When both carry a field, the form body's value is used."""
    raw = post("/agent/status?options=fromquery&x=1", b"options=frombody")
    assert json.loads(parse(exchange(raw))[2])["fields"] == {"options": "frombody", "x": "1"}


@pytest.mark.parametrize(
    ("encoded", "decoded"),
    [
        (b"a=1+1", {"a": "1 1"}),
        (b"a=1%2B1", {"a": "1+1"}),
        (b"a=%41%62%2c", {"a": "Ab,"}),
        (b"a=%C3%A9t%C3%A9", {"a": "\u00e9t\u00e9"}),
        (b"a=%0a", {"a": "\n"}),
        (b"a+b=c&d=", {"a b": "c", "d": ""}),
        (b"a=%zz%", {"a": "%zz%"}),
        (b"a=1&&b=2&", {"a": "1", "b": "2"}),
        (b"flag", {"flag": ""}),
        (b"", {}),
    ],
)
def test_form_decoding(encoded: bytes, decoded: dict[str, str]) -> None:
    """`+` is a space, `%XX` a byte, then UTF-8; malformed escapes stay literal."""
    assert decode_form(encoded) == decoded


def test_form_encoding_round_trips() -> None:
    """What the client encodes, the agent decodes back unchanged."""
    fields = {"auth_key": "", "options": "service:echo,1+1 a&b=c%d\u00e9", "args": "hosts:a,b"}
    assert decode_form(encode_form(fields)) == fields


@pytest.mark.parametrize(
    "raw",
    [
        post("/agent/status", b"options=%ff"),
        post("/agent/status", b"options=caf\xe9"),
        post("/agent/status", b"opt%c3ions=web"),
        b"GET /agent/status?options=%ff HTTP/1.1\r\n\r\n",
    ],
)
def test_non_utf8_field_is_400(raw: bytes) -> None:
    """A field whose bytes are not UTF-8 (escaped or raw, key or value) gets 400."""
    status, _, body = parse(exchange(raw))
    assert status == 400
    assert b"UTF-8" in body


@pytest.mark.parametrize(
    "target", [b"/agent/status?options=caf\xe9", b"/agent/st\xffatus", b"/agent/status\x01"]
)
def test_raw_non_ascii_request_target_is_400(target: bytes) -> None:
    """A request target holding raw non-ASCII or control bytes gets 400, not a lossy decode."""
    assert parse(exchange(b"GET " + target + b" HTTP/1.1\r\n\r\n"))[0] == 400


def test_too_many_fields_is_400() -> None:
    """A body with more fields than the limit gets 400."""
    body = b"&".join(b"f%d=1" % i for i in range(100))
    assert parse(exchange(post("/agent/status", body)))[0] == 400


@pytest.mark.parametrize(
    "line",
    [
        b"PUT /agent/status HTTP/1.1",
        b"DELETE /agent/status HTTP/1.1",
        b"get /agent/status HTTP/1.1",
        b"HELLO",
        b"POST /agent/status",
        b"POST /agent/status SPDY/3",
    ],
)
def test_unknown_method_or_garbled_start_line_is_405(line: bytes) -> None:
    """A method other than GET/POST, or a garbled request line, gets 405 (as the original)."""
    status, headers, _ = parse(exchange(line + b"\r\nContent-Length: 0\r\n\r\n"))
    assert status == 405
    assert headers["connection"] == "close"


def test_malformed_header_is_400() -> None:
    """A header line without a colon gets 400."""
    assert parse(exchange(b"GET /agent/status HTTP/1.1\r\nno colon here\r\n\r\n"))[0] == 400


# --------------------------------------------------------------------------- timeout, errors


def test_idle_timeout_answers_408_after_socket_timeout() -> None:
    """Nothing complete within socket_timeout: 408 and close, exactly at the deadline."""
    clock = Clock()
    receiver = EchoReceiver()
    transport = connect(receiver, clock)
    receiver.dataReceived(b"POST /agent/status HTTP/1.1\r\nContent-Le")
    clock.advance(4.9)
    assert transport.value() == b""
    clock.advance(0.1)
    assert parse(transport.value())[0] == 408
    assert transport.disconnecting
    receiver.connectionLost()  # the client took the answer: the write deadline goes too
    assert not clock.getDelayedCalls()


def test_timeout_is_a_deadline_that_bytes_do_not_restart() -> None:
    """The timeout counts from the connection, not the last byte: a slow loris gets 408 too."""
    clock = Clock()
    receiver = EchoReceiver()
    transport = connect(receiver, clock)
    raw = post("/agent/status", b"options=web")
    for byte in raw[:4]:
        receiver.dataReceived(bytes([byte]))
        clock.advance(1.0)
    assert transport.value() == b""
    clock.advance(1.0)
    assert parse(transport.value())[0] == 408
    assert transport.disconnecting
    receiver.dataReceived(raw[4:])
    assert transport.value().count(b"HTTP/1.1 ") == 1


def test_waiting_for_the_body_times_out_too() -> None:
    """A body shorter than its Content-Length times out with 408."""
    clock = Clock()
    receiver = EchoReceiver()
    transport = connect(receiver, clock)
    receiver.dataReceived(post("/agent/status", b"options=web")[:-3])
    clock.advance(5.0)
    assert parse(transport.value())[0] == 408


def test_timeout_is_cancelled_when_the_connection_is_lost() -> None:
    """A client that hangs up leaves no timer behind."""
    clock = Clock()
    receiver = EchoReceiver()
    connect(receiver, clock)
    receiver.connectionLost(Failure(Exception("gone")))
    assert not clock.getDelayedCalls()


def test_handler_exception_is_500_and_logged_once() -> None:
    """An unexpected exception in a handler answers 500, is logged once, and nothing else."""
    with capturedLogs() as events:
        raw = exchange(REQUEST, receiver_class=FailingReceiver)
    status, headers, body = parse(raw)
    assert status == 500
    assert headers["content-type"].startswith("text/plain")
    assert b"ZeroDivisionError" not in body
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(ZeroDivisionError)
    assert failures[0]["path"] == "/agent/status"


def test_request_error_in_handler_is_its_status() -> None:
    """A RequestError raised by a handler becomes its status and text/plain message."""

    class Refusing(HttpRequestReceiver):
        def handleRequest(self, request: Request) -> Response:
            raise RequestError(403, "/x is not allowed!")

    status, headers, body = parse(exchange(REQUEST, receiver_class=Refusing))
    assert (status, body) == (403, b"/x is not allowed!")
    assert headers["content-type"] == "text/plain; charset=utf-8"


@pytest.mark.parametrize("outcome", ["raise", "fail"])
@pytest.mark.parametrize(
    ("error", "status"),
    [
        (NotGranted("web"), 403),
        (PathNotAllowed("/x"), 403),
        (CapacityExceeded(2), 503),
        (AuthError("bad signature"), 401),
    ],
)
def test_domain_error_in_handler_is_its_status_from_the_table(
    error: Exception, status: int, outcome: str
) -> None:
    """A domain error raised by a handler, or failing its Deferred, gets the status the error
    table gives it and its message as the text/plain body; nothing is logged as a failure."""

    class Refusing(HttpRequestReceiver):
        def handleRequest(self, request: Request) -> Any:
            if outcome == "raise":
                raise error
            return defer.fail(error)

    with capturedLogs() as events:
        answer, headers, body = parse(exchange(REQUEST, receiver_class=Refusing))
    assert (answer, body) == (status, str(error).encode("utf-8"))
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert not [e for e in events if "log_failure" in e]


def test_response_status_lines_are_the_originals() -> None:
    """Status lines use the original's reason phrases (403 Permission Denied)."""
    assert Response.text(403).to_bytes().startswith(b"HTTP/1.1 403 Permission Denied\r\n")
    assert Response.text(405).to_bytes().startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert Response.text(408).to_bytes().startswith(b"HTTP/1.1 408 Request Timeout\r\n")


# --------------------------------------------------------------------------- the agent


class FakeProcessTransport:
    pid = None

    def closeStdin(self) -> None:
        pass


class ProcessClock(Clock):
    """A Clock that records spawned children instead of starting them."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str]]] = []

    def spawnProcess(self, proto: Any, executable: str, args: list[str], **kw: Any) -> Any:
        transport = FakeProcessTransport()
        proto.makeConnection(transport)
        self.spawned.append((proto, list(args)))
        return transport


@pytest.fixture
def agent_env(tmp_path: Path) -> dict[str, Any]:
    targets = tmp_path / "targets"
    targets.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (targets / "escape").symlink_to(outside)
    return {"tmp": tmp_path, "targets": targets, "outside": outside}


def make_service(
    env: dict[str, Any], server: str = "", hosts: str = "127.0.0.0/8"
) -> tuple[AgentService, ProcessClock]:
    tmp: Path = env["tmp"]
    jobs = tmp / "jobs.ini"
    jobs.write_text("[service]\nservice:echo = /bin/echo %s\n")
    ini = tmp / "agent.ini"
    ini.write_text(
        f"[server]\nstate_path = {tmp / 'state'}\nsocket_timeout = 3\n{server}\n"
        f"[allow::hosts]\nhost[] = {hosts}\n"
        f"[allow::paths]\npath[] = {env['targets']}\n"
        f"[rsync::group::web]\ndest = 127.0.0.1::DEST/\nsrc = {env['targets']}/web\n"
        f"[rsync::group::badpath]\ndest = 127.0.0.1::DEST/\nsrc = {env['outside']}/web\n"
        f"[jobs]\npath = {jobs}\n"
    )
    reactor = ProcessClock()
    reactor.advance(NOW)
    service = AgentService(load_agent_config(str(ini)), reactor)
    service.startup()
    return service, reactor


def agent_exchange(service: AgentService, data: bytes, chunk: int | None = None) -> bytes:
    proto = AgentFactory(service).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    proto.makeConnection(transport)
    step = chunk or len(data)
    for i in range(0, len(data), step):
        proto.dataReceived(data[i : i + step])
    return transport.value()


def signed(path: str, body: bytes, now: float = NOW, key: str = "65535") -> bytes:
    return post(path, body, "Authorization: " + sign_request(key, "POST", path, body, now=now))


def test_agent_framing_is_the_same_for_every_chunk_size(agent_env: dict[str, Any]) -> None:
    """A signed rkill fed to the agent protocol in chunks of 1..N always gets the same 200."""
    service, _ = make_service(agent_env)
    body = b"auth_key=&options=web&args=&api_key="
    expected = None
    for size in range(1, len(signed("/agent/rkill", body)) + 1):
        raw = agent_exchange(service, signed("/agent/rkill", body), size)  # fresh nonce each
        if expected is None:
            expected = raw
            status, _, answer = parse(raw)
            assert status == 200
            assert json.loads(answer) == {"return": "true", "process": []}
        assert raw == expected, f"chunk size {size}"


def test_agent_idle_timeout_runs_on_the_service_clock(agent_env: dict[str, Any]) -> None:
    """The agent's idle timeout is socket_timeout on the injected clock: 408, no real wait."""
    service, clock = make_service(agent_env)
    raw = agent_exchange(service, b"POST /agent/status HTTP/1.1\r\n")
    assert raw == b""
    clock.advance(2.9)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0.1)
    # The 408 is written; a client that does not take it is dropped socket_timeout later.
    clock.advance(3.0)
    assert not clock.getDelayedCalls()


def test_agent_idle_timeout_answers_408(agent_env: dict[str, Any]) -> None:
    """An agent connection idle for socket_timeout gets 408 Request Timeout and closes."""
    service, clock = make_service(agent_env)
    proto = AgentFactory(service).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    proto.makeConnection(transport)
    clock.advance(3.0)
    assert parse(transport.value())[0] == 408
    assert transport.disconnecting


@pytest.mark.parametrize(
    "path", ["/agent/nosuch", "/api/status", "/agent", "/", "/agent/status/extra", "/agent/STATUS"]
)
def test_agent_unknown_path_or_order_is_404(agent_env: dict[str, Any], path: str) -> None:
    """An unknown target or order gets 404 Not Found with an empty body, before auth."""
    service, _ = make_service(agent_env)
    status, _, body = parse(agent_exchange(service, post(path, b"options=web")))
    assert (status, body) == (404, b"")


def test_agent_refuses_a_peer_outside_allow_hosts_at_once(agent_env: dict[str, Any]) -> None:
    """A peer not in allow::hosts gets 403 `<addr> is not allowed!` before sending anything."""
    service, _ = make_service(agent_env, hosts="127.0.0.2")
    proto = AgentFactory(service).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    proto.makeConnection(transport)
    status, _, body = parse(transport.value())
    assert (status, body) == (403, b"127.0.0.1 is not allowed!")
    assert transport.disconnecting


def test_agent_replayed_signature_is_401(agent_env: dict[str, Any]) -> None:
    """The same signed request twice: the second is refused as a replay."""
    service, _ = make_service(agent_env)
    raw = signed("/agent/rkill", b"options=web")
    assert parse(agent_exchange(service, raw))[0] == 200
    status, _, body = parse(agent_exchange(service, raw))
    assert status == 401
    assert body


def test_agent_signature_outside_clock_window_is_401(agent_env: dict[str, Any]) -> None:
    """A signature made 61 s before the agent's clock is refused."""
    service, _ = make_service(agent_env)
    assert (
        parse(agent_exchange(service, signed("/agent/rkill", b"options=web", NOW - 61)))[0] == 401
    )


def test_agent_signature_binds_the_body(agent_env: dict[str, Any]) -> None:
    """A signed request whose body was changed afterwards is refused."""
    service, _ = make_service(agent_env)
    raw = signed("/agent/rkill", b"options=web").replace(b"options=web", b"options=bad")
    assert parse(agent_exchange(service, raw))[0] == 401


def test_agent_wrong_key_is_401(agent_env: dict[str, Any]) -> None:
    """A request signed with another key gets 401."""
    service, _ = make_service(agent_env)
    raw = signed("/agent/rkill", b"options=web", key="wrong")
    assert parse(agent_exchange(service, raw))[0] == 401


def test_agent_legacy_key_only_when_enabled(agent_env: dict[str, Any]) -> None:
    """The original's auth_key is refused by default and accepted with legacy_auth = true."""
    key = legacy_auth_key("65535", NOW).encode()
    raw = post("/agent/rkill", b"auth_key=" + key + b"&options=web&args=&api_key=")
    service, _ = make_service(agent_env)
    status, _, body = parse(agent_exchange(service, raw))
    assert status == 401
    assert b"legacy_auth" in body
    service, _ = make_service(agent_env, server="legacy_auth = true")
    assert parse(agent_exchange(service, raw))[0] == 200


def test_agent_missing_auth_is_401(agent_env: dict[str, Any]) -> None:
    """No signature and no auth_key: 401."""
    service, _ = make_service(agent_env)
    assert parse(agent_exchange(service, post("/agent/rkill", b"options=web")))[0] == 401


def test_agent_empty_options_is_400(agent_env: dict[str, Any]) -> None:
    """An authenticated order without options gets 400 `empty value in options!`."""
    service, _ = make_service(agent_env)
    status, _, body = parse(agent_exchange(service, signed("/agent/status", b"options=")))
    assert (status, body) == (400, b"empty value in options!")


def test_resolve_group_target(agent_env: dict[str, Any]) -> None:
    """A group name resolves to its dest/src; the job id is md5hex(dest + src)."""
    service, _ = make_service(agent_env)
    target, group = service.targets.resolve("web")
    src = f"{agent_env['targets']}/web"
    assert (target.dest, target.src, group.name) == ("127.0.0.1::DEST/", src, "web")
    assert target.checksum == hashlib.md5(f"127.0.0.1::DEST/{src}".encode()).hexdigest()


def test_resolve_inline_target(agent_env: dict[str, Any]) -> None:
    """`HOST::MODULE/,/path` is an inline target: remote source first, then local path."""
    service, _ = make_service(agent_env)
    target, group = service.targets.resolve(f"h::M/sub/, {agent_env['targets']}/adhoc")
    assert group is None
    assert (target.dest, target.src) == ("h::M/sub/", f"{agent_env['targets']}/adhoc")


@pytest.mark.parametrize("options", ["nosuchgroup", ",/x", "h::M/,", " , "])
def test_resolve_unknown_or_empty_target_is_400(agent_env: dict[str, Any], options: str) -> None:
    """An unknown group or an inline target with an empty side: 400 `empty value in options!`
    (an unknown group named first, issue 15)."""
    service, _ = make_service(agent_env)
    with pytest.raises(InvalidTarget) as e:
        service.targets.resolve(options)
    named = "unknown group 'nosuchgroup': " if options == "nosuchgroup" else ""
    assert (status_for(e.value), str(e.value)) == (400, named + "empty value in options!")


def test_resolve_inline_source_may_not_be_an_option(agent_env: dict[str, Any]) -> None:
    """An inline remote source starting with `-` (option injection) gets 400."""
    service, _ = make_service(agent_env)
    with pytest.raises(InvalidTarget) as e:
        service.targets.resolve(f"--rsh=touch /tmp/x,{agent_env['targets']}/web")
    assert status_for(e.value) == 400


@pytest.mark.parametrize("suffix", ["/../outside/web", "/escape/web", "/escape", "/web/../../x"])
def test_resolve_path_escaping_allow_paths_is_403(agent_env: dict[str, Any], suffix: str) -> None:
    """`..` or a symlink leading out of allow::paths: 403 `<src> is not allowed!`."""
    service, _ = make_service(agent_env)
    src = f"{agent_env['targets']}{suffix}"
    with pytest.raises(PathNotAllowed) as e:
        service.targets.resolve(f"h::M/,{src}")
    assert (status_for(e.value), str(e.value)) == (403, f"{src} is not allowed!")


def test_resolve_group_outside_allow_paths_is_403(agent_env: dict[str, Any]) -> None:
    """A group whose src lies outside allow::paths is refused like an inline one."""
    service, _ = make_service(agent_env)
    with pytest.raises(PathNotAllowed) as e:
        service.targets.resolve("badpath")
    assert (status_for(e.value), str(e.value)) == (
        403,
        f"{agent_env['outside']}/web is not allowed!",
    )


def captured_stdout(name: str) -> bytes:
    data = (RSYNC_DATA / name).read_bytes()
    return data[: data.rstrip(b"\n").rfind(b"\n") + 1]  # drop the trailing "exit N" line


def run_order(service: AgentService, reactor: ProcessClock, order: str) -> Any:
    d = getattr(service.orders, "order_" + order)("web")
    results: list[Any] = []
    d.addBoth(results.append)
    return d, results


def test_status_answers_counts_as_strings(agent_env: dict[str, Any]) -> None:
    """status parses rsync's stats (thousands separators) into the original's string values."""
    service, reactor = make_service(agent_env)
    _, results = run_order(service, reactor, "status")
    proto, argv = reactor.spawned[-1]
    assert "--dry-run" in argv and "--stats" in argv and "--itemize-changes" in argv
    proto.childDataReceived(1, captured_stdout("rsync-3.5-dryrun-itemize-stats.out"))
    proto.processEnded(Failure(ProcessDone(0)))
    response = results[0]
    assert response.status == 200
    assert json.loads(response.body) == {
        "return": "true",
        "alreadyRsync": "false",
        "transferFilesCount": "12",
        "transferFilesSize": "3145747",
        "transferDeleteCount": "1",
        "agentVersion": deploy.__version__,
    }
    assert service.orders.children == 0


def test_rlist_answer_is_valid_json_for_awkward_names(agent_env: dict[str, Any]) -> None:
    """rlist JSON is valid for quotes, backslashes, newlines, non-UTF-8 names; no directories."""
    service, reactor = make_service(agent_env)
    _, results = run_order(service, reactor, "rlist")
    proto, _ = reactor.spawned[-1]
    proto.childDataReceived(1, captured_stdout("rsync-3.5-dryrun-itemize-stats.out"))
    proto.processEnded(Failure(ProcessDone(0)))
    answer = json.loads(results[0].body.decode("utf-8"))  # strict: must be valid UTF-8 JSON
    new = answer["transferNewFiles"]
    assert 'q"uote' in new and "back\\slash" in new and "new\nline" in new
    assert "bin\\#377name" in new and "a/b/with space" in new and "a/deleting x" in new
    assert not [n for n in new if n.endswith("/")]
    assert answer["transferDeleteFiles"] == ["stale"]
    assert answer["transferFilesCount"] == "12"


def test_dry_run_failure_keeps_rsync_message_when_a_timeout_is_set(
    agent_env: dict[str, Any],
) -> None:
    """With max_process_timeout set, an rsync that fails by itself reports rsync's message."""
    service, reactor = make_service(agent_env, server="max_process_timeout = 30")
    _, results = run_order(service, reactor, "status")
    proto, _ = reactor.spawned[-1]
    down = (RSYNC_DATA / "rsync-3.5-daemon-down.out").read_bytes().rsplit(b"exit", 1)[0]
    proto.childDataReceived(2, down)
    proto.processEnded(Failure(ProcessTerminated(exitCode=10)))
    answer = json.loads(results[0].body)
    assert answer["return"] == "false"
    assert "Connection refused" in answer["message"]
    assert answer["exitCode"] == 10
    assert not reactor.getDelayedCalls()


def test_dry_run_timeout_stops_rsync_and_says_so(
    agent_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dry run still running at max_process_timeout is stopped and answers Process Timeout."""
    stopped: list[Any] = []
    monkeypatch.setattr(agent_orders.GroupStopper, "signal", lambda self, sig: stopped.append(sig))
    service, reactor = make_service(agent_env, server="max_process_timeout = 30")
    _, results = run_order(service, reactor, "rlist")
    proto, _ = reactor.spawned[-1]
    reactor.advance(29)
    assert not stopped
    reactor.advance(1)
    assert len(stopped) == 1
    proto.processEnded(Failure(ProcessTerminated(signal=9)))
    answer = json.loads(results[0].body)
    assert answer["return"] == "false"
    assert answer["message"] == "Process Timeout(30)!"


def test_max_prefork_answers_503(agent_env: dict[str, Any]) -> None:
    """With max_prefork children already running, a further dry run gets 503."""
    service, reactor = make_service(agent_env, server="max_prefork = 1")
    run_order(service, reactor, "status")
    with pytest.raises(CapacityExceeded) as e:
        service.orders.order_status("web")
    assert status_for(e.value) == 503
    assert len(reactor.spawned) == 1


def test_state_dir_is_created_at_startup(agent_env: dict[str, Any]) -> None:
    """startup() makes the state directory before the agent listens."""
    make_service(agent_env)
    assert os.path.isdir(agent_env["tmp"] / "state")
