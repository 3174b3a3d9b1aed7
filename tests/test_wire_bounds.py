"""The wire's bounds against hostile peers, on `StringTransport` and a `Clock` (issue 12): the
body and head caps, the budget of bytes held for requests not yet authenticated, a stale or
malformed signature refused before its body is read, answers logged when their client has gone,
and the write deadline that drops a client who never takes its answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from deploy.agent import AgentFactory, AgentService
from deploy.auth import sign_request
from deploy.wire import (
    MAX_BODY,
    MAX_HEAD,
    HttpRequestReceiver,
    PendingBytes,
    Request,
    RequestFactory,
    Response,
)
from tests.test_wire import NOW, EchoReceiver, connect, make_service, parse, post

KEY = "65535"


class EchoFactory(RequestFactory):
    protocol = EchoReceiver


def open_connection(factory: RequestFactory, clock: Clock) -> tuple[Any, StringTransport]:
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert proto is not None
    return proto, connect(proto, clock)


def stalled(body_length: int, sent: int) -> bytes:
    """The head of a POST announcing `body_length` bytes, and the first `sent` of them."""
    return post("/agent/status", b"x" * body_length)[: -body_length + sent or None]


# --------------------------------------------------------------------------- caps


def test_an_agent_order_body_is_capped_at_16_kib_and_a_bigger_one_is_413_unread() -> None:
    """Bodies are capped far below the old 1 MiB: 1 MiB announced is 413 the moment the head
    ends, nothing of the body is held; 16 KiB (options are at most 8 KiB) still passes."""
    assert MAX_BODY == 16 * 1024
    factory, clock = EchoFactory(), Clock()
    proto, transport = open_connection(factory, clock)
    proto.dataReceived(stalled(1024 * 1024, 0))
    assert parse(transport.value())[0] == 413
    assert transport.disconnecting and factory.pending.held == 0
    proto, transport = open_connection(factory, clock)
    proto.dataReceived(post("/agent/status", b"options=" + b"x" * (MAX_BODY - 8)))
    assert parse(transport.value())[0] == 200


def test_a_head_larger_than_max_head_is_431() -> None:
    """Headers each under the line limit but together over MAX_HEAD: 431 and close."""
    factory, clock = EchoFactory(), Clock()
    proto, transport = open_connection(factory, clock)
    pad = [f"X-Pad-{i}: " + "a" * 7000 for i in range(MAX_HEAD // 7000 + 1)]
    proto.dataReceived(post("/agent/status", b"", *pad))
    status, _, body = parse(transport.value())
    assert status == 431 and b"head larger than" in body


# --------------------------------------------------------------------------- the budget


def test_pending_bytes_over_the_budget_are_503_and_come_back_when_connections_end() -> None:
    """Bytes of requests not yet handed on count across every connection of a factory: the
    connection whose bytes would pass the budget gets 503 and is closed, holding nothing; bytes
    come back when a connection closes or its request is handed to its handler."""
    factory, clock = EchoFactory(), Clock()
    factory.pending = PendingBytes(10_000)
    first, _ = open_connection(factory, clock)
    first.dataReceived(stalled(8000, 4000))
    second, _ = open_connection(factory, clock)
    second.dataReceived(stalled(8000, 4000))
    held = factory.pending.held
    assert 8000 < held <= 10_000
    third, third_transport = open_connection(factory, clock)
    third.dataReceived(stalled(8000, 4000))
    status, _, body = parse(third_transport.value())
    assert status == 503 and b"try again later" in body
    assert third_transport.disconnecting
    assert factory.pending.held == held
    first.connectionLost()
    assert factory.pending.held == held // 2
    fourth, fourth_transport = open_connection(factory, clock)
    fourth.dataReceived(post("/agent/status", b"options=web"))
    assert parse(fourth_transport.value())[0] == 200
    second.dataReceived(b"x" * 4000)  # its request is complete: handed on, answered
    assert factory.pending.held == 0


def test_the_budget_is_a_daemons_not_a_connections() -> None:
    """Each factory has its own PendingBytes of MAX_PENDING_BYTES; a connection without a
    factory (a bare receiver) holds bytes without a budget."""
    first, second = EchoFactory(), EchoFactory()
    assert first.pending is not second.pending
    assert first.pending.limit == 8 * 1024 * 1024
    receiver = EchoReceiver()
    transport = connect(receiver, Clock())
    receiver.dataReceived(post("/agent/status", b"options=web"))
    assert parse(transport.value())[0] == 200


# --------------------------------------------------------------------------- signature first


def agent_service(tmp_path: Path) -> tuple[AgentService, Any]:
    """test_wire's agent service, started at NOW."""
    for name in ("targets", "outside"):
        (tmp_path / name).mkdir()
    return make_service(
        {"tmp": tmp_path, "targets": tmp_path / "targets", "outside": tmp_path / "outside"}
    )


def agent_head(body: bytes, authorization: str) -> bytes:
    return post("/agent/rkill", body, f"Authorization: {authorization}")[: -len(body)]


@pytest.mark.parametrize(
    "authorization",
    [
        sign_request(KEY, "POST", "/agent/rkill", b"x", now=NOW - 120),
        sign_request(KEY, "POST", "/agent/rkill", b"x", now=NOW + 60),
        "Deploy-HMAC-SHA256 ts=1, nonce=zz, sig=00",
        "Basic dXNlcjpwYXNz",
    ],
    ids=["stale", "future", "malformed", "other-scheme"],
)
def test_a_bad_signature_header_is_401_before_the_body_is_read(
    tmp_path: Path, authorization: str
) -> None:
    """A signature header that is stale, dated in the future, malformed or of another scheme is
    refused as soon as the head ends: the announced body is never waited for nor held."""
    service, reactor = agent_service(tmp_path)
    factory = AgentFactory(service)
    proto, transport = open_connection(factory, reactor)
    proto.dataReceived(agent_head(b"options=web" + b"x" * 8000, authorization))
    status, _, _ = parse(transport.value())
    assert status == 401 and transport.disconnecting
    assert factory.pending.held == 0
    assert proto.request is not None and proto.request.path == "/agent/rkill"


def test_a_good_signature_header_waits_for_its_body(tmp_path: Path) -> None:
    """A well-formed, current signature lets the body be read; the whole request is then
    verified (here: accepted)."""
    service, reactor = agent_service(tmp_path)
    proto, transport = open_connection(AgentFactory(service), reactor)
    body = b"options=web"
    proto.dataReceived(agent_head(body, sign_request(KEY, "POST", "/agent/rkill", body, now=NOW)))
    assert transport.value() == b""
    proto.dataReceived(body)
    assert parse(transport.value())[0] == 200


def test_a_request_signed_before_the_agent_started_is_401(tmp_path: Path) -> None:
    """An agent that started at NOW refuses, before its body, a request signed in an earlier
    second (as a request captured before a restart would be), and says why."""
    service, reactor = agent_service(tmp_path)
    body = b"options=web"
    proto, transport = open_connection(AgentFactory(service), reactor)
    proto.dataReceived(
        agent_head(body, sign_request(KEY, "POST", "/agent/rkill", body, now=NOW - 1))
    )
    status, _, text = parse(transport.value())
    assert (status, text) == (401, b"request signed before this daemon started; sign it again")


# --------------------------------------------------------------------------- the client goes


class PendingReceiver(HttpRequestReceiver):
    """Hands every request to a Deferred the test fires (or cancels)."""

    socket_timeout = 5.0

    def handleRequest(self, request: Request) -> defer.Deferred[Response]:
        self.pending_answer: defer.Deferred[Response] = defer.Deferred()
        return self.pending_answer


class ObservedFactory(RequestFactory):
    protocol = PendingReceiver

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, int]] = []
        self.observers.append(
            lambda proto, response: self.seen.append((proto.client_gone, response.status))
        )


def test_an_answer_whose_client_hung_up_is_still_logged_as_such() -> None:
    """The client hangs up while its order runs: when the order ends, the observers (access and
    audit logs) still hear of the answer, marked client_gone; nothing is written."""
    factory, clock = ObservedFactory(), Clock()
    proto, transport = open_connection(factory, clock)
    proto.dataReceived(post("/agent/exec", b"options=service:sleep,1"))
    proto.connectionLost()
    assert factory.seen == []
    proto.pending_answer.callback(Response.json({"return": "true"}))
    assert factory.seen == [(True, 200)]
    assert transport.value() == b"" and not clock.getDelayedCalls()


def test_an_order_cancelled_because_its_client_left_is_logged_499_not_as_an_error() -> None:
    """A handler that cancels its order when the client hangs up (a dry run nobody will read)
    leaves a 499 record, and no 'unexpected error' in the log."""
    factory, clock = ObservedFactory(), Clock()
    proto, _ = open_connection(factory, clock)
    proto.dataReceived(post("/agent/status", b"options=web"))
    with capturedLogs() as events:
        proto.connectionLost()
        proto.pending_answer.cancel()
    assert factory.seen == [(True, 499)]
    assert not [e for e in events if e.get("log_failure") is not None]


def test_a_client_that_hangs_up_before_its_request_is_complete_leaves_no_record() -> None:
    """No order ran: no access or audit record, no timer."""
    factory, clock = ObservedFactory(), Clock()
    proto, _ = open_connection(factory, clock)
    proto.dataReceived(post("/agent/status", b"options=web")[:-3])
    proto.connectionLost()
    assert factory.seen == [] and not clock.getDelayedCalls()


# --------------------------------------------------------------------------- the slow reader


def test_a_client_that_does_not_take_its_answer_is_dropped_socket_timeout_after_it() -> None:
    """The answer is written and the connection asked to close; a client that has not taken it
    socket_timeout later is aborted (what is left of the answer is dropped with it)."""
    factory, clock = EchoFactory(), Clock()
    proto, transport = open_connection(factory, clock)
    clock.advance(4.0)  # the deadline counts from the answer, not from the connection
    proto.dataReceived(post("/agent/status", b"options=web"))
    assert transport.disconnecting and not transport.disconnected
    with capturedLogs() as events:
        clock.advance(4.9)
        assert not transport.disconnected
        clock.advance(0.1)
    assert transport.disconnected
    assert [e["timeout"] for e in events if "did not take" in e["log_format"]] == [5.0]
    proto.connectionLost()
    assert not clock.getDelayedCalls()


def test_a_client_that_takes_its_answer_leaves_no_write_deadline() -> None:
    """The connection closes once the answer is written: the write deadline is cancelled."""
    factory, clock = EchoFactory(), Clock()
    proto, transport = open_connection(factory, clock)
    proto.dataReceived(post("/agent/status", b"options=web"))
    assert len(clock.getDelayedCalls()) == 1
    proto.connectionLost()
    assert not clock.getDelayedCalls() and not transport.disconnected


def test_the_heap_is_handed_back_once_a_flood_has_drained() -> None:
    """When the held bytes fall back to none after more than trim_after were held at once, the
    free heap is released once; ordinary traffic (small peaks) never triggers it."""
    released: list[int] = []
    pending = PendingBytes(1000, trim_after=100, release=lambda: released.append(1))
    for _ in range(3):
        assert pending.take(50)
        pending.give_back(50)
    assert released == []
    assert pending.take(90) and pending.take(60) and not pending.take(900)
    pending.give_back(60)
    assert released == []
    pending.give_back(90)
    assert released == [1]
    assert pending.take(50)
    pending.give_back(50)
    assert released == [1]
