"""What a request leaves in the logs (issue 12, points 4, 10 and 14), without a daemon: secrets
redacted from the access line, the audit record and the error log; request-derived text escaped
so it cannot forge, break or hide a line (C0 and C1 controls, bidi overrides and isolates, line
separators); and the record of an answer whose client went away."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger

from deploy import logrecord
from deploy.config import load_proxy_config
from deploy.logrecord import json_line, log_safe, redact_target
from deploy.proxy import ProxyFactory, ProxyRequest, ProxyService
from deploy.wire import HttpRequestReceiver, Request, RequestFactory, Response
from tests.test_logs import Clock, EchoFactory, connect, service_for

SECRET = "s3cret-api-key-0123456789"
# One of each kind of character that could forge or hide a line.
HOSTILE = [
    "\n",
    "\r",
    "\x1b",
    "\x00",
    "\x7f",
    "\x85",  # NEL, a C1 line break
    "\x9b",  # CSI, a C1 terminal escape
    "\u2028",
    "\u2029",
    "\u202a",
    "\u202e",  # RIGHT-TO-LEFT OVERRIDE
    "\u2066",
    "\u2069",
    "\u200f",
    "\u061c",
]


# --------------------------------------------------------------------------- escaping


@pytest.mark.parametrize("char", HOSTILE, ids=[f"U+{ord(c):04X}" for c in HOSTILE])
def test_log_safe_and_json_line_escape_every_line_breaking_or_reordering_character(
    char: str,
) -> None:
    """log_safe writes each such character as an escape; json_line too, and its JSON still
    decodes to the very text that came in. Other non-ASCII text stays readable."""
    text = f"web{char}[2026/01/01 00:00:00] [info] forged é"
    assert char not in log_safe(text) and "é" in log_safe(text)
    line = json_line({"options": text})
    assert char not in line and "é" in line and "\n" not in line
    assert json.loads(line) == {"options": text}


def test_the_error_log_keeps_each_event_on_its_own_lines(tmp_path: Path) -> None:
    """A field holding a newline, U+2028 or a bidi override stays on its event's line; a
    traceback whose message holds `\\n[...]` is indented, so no line but an event's first starts
    with `[`."""
    svc = service_for(tmp_path, EchoFactory(), Clock())
    svc.startService()
    log = Logger(namespace="deploy.test", observer=svc.publisher)
    forged = "x\n[2023/11/14 22:13:20] [critical] (deploy.agent) forged\u2028\u202eevil"
    log.info("exec {name} from {peer}", name=forged, peer="127.0.0.1")
    try:
        raise ValueError(forged)
    except ValueError:
        log.failure("order {order} failed", order=forged)
    svc.stopService()
    lines = (tmp_path / "error.log").read_text().splitlines()
    starts = [line for line in lines if line.startswith("[")]
    assert len(starts) == 2, lines
    assert "\\x0a[2023/11/14" in starts[0] and "\\u2028\\u202eevil" in starts[0]
    assert all(line.startswith("    ") for line in lines if not line.startswith("["))
    assert any("ValueError" in line for line in lines)
    assert not any(c in "".join(lines) for c in "\u2028\u202e")


def test_the_audit_log_escapes_request_text_but_decodes_to_it(tmp_path: Path) -> None:
    """Options holding a C1 NEL, U+2028 and a bidi override: the audit file has no such raw
    character (one record, one line), and its JSON gives back exactly the options sent."""
    factory = EchoFactory()
    svc = service_for(tmp_path, factory, Clock(), audit_log_path=str(tmp_path / "audit.log"))
    svc.startService()
    proto, _ = connect(factory)
    body = b"options=web%C2%85%E2%80%A8%E2%80%AEevil"
    proto.dataReceived(
        b"POST /agent/status HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    svc.stopService()
    raw = (tmp_path / "audit.log").read_bytes()
    for char in ("\x85", "\u2028", "\u202e"):
        assert char.encode() not in raw
    (line,) = raw.decode().splitlines()
    assert json.loads(line)["options"] == "web\x85\u2028\u202eevil"


# --------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    "target, logged",
    [
        (
            f"/api/exec/service:echo,hi/groups:web/{SECRET}",
            "/api/exec/service:echo,hi/groups:web/<redacted>",
        ),
        (f"/api/exec/o/a/{SECRET}/more", "/api/exec/o/a/<redacted>"),
        (
            f"/agent/status?options=web&api_key={SECRET}",
            "/agent/status?options=web&api_key=<redacted>",
        ),
        (f"/agent/status?auth_key={SECRET}&x=1", "/agent/status?auth_key=<redacted>&x=1"),
        (f"/agent/status?api%5Fkey={SECRET}", "/agent/status?api%5Fkey=<redacted>"),
        ("/api/status/web/hosts:a", "/api/status/web/hosts:a"),
        ("/agent/status?options=web", "/agent/status?options=web"),
    ],
)
def test_redact_target_replaces_path_and_query_keys(target: str, logged: str) -> None:
    """The proxy's path-form key (fifth segment of /api/...) and api_key / auth_key values in a
    query string are replaced; nothing else changes."""
    assert redact_target(target) == logged


def test_the_key_reaches_no_access_line_audit_record_or_repr(tmp_path: Path) -> None:
    """A proxy order in the path form, and one with the key in the query string: the key is in
    neither the access log nor the audit log (which names it by id); a Request's or a
    ProxyRequest's repr never shows it."""
    api = tmp_path / "api.ini"
    api.write_text(f"[keys]\n{SECRET}[] = web\n[servers]\nweb[] = 10.0.0.1\n")
    ini = tmp_path / "proxy.ini"
    ini.write_text(f"[allow::hosts]\nhost[] = 127.0.0.0/8\n[api]\npath = {api}\n")
    factory = ProxyFactory(ProxyService(load_proxy_config(str(ini)), MemoryReactorClock()))
    audit = tmp_path / "audit.log"
    svc = service_for(tmp_path, factory, Clock(), audit_log_path=str(audit))
    svc.startService()
    for target in (
        f"/api/exec/service:echo,hi/groups:nope/{SECRET}",
        f"/agent/exec?options=x&args=groups:nope&api_key={SECRET}",
    ):
        proto, transport = connect(factory)
        proto.dataReceived(f"GET {target} HTTP/1.1\r\n\r\n".encode())
        assert transport.value().startswith(b"HTTP/1.1 403 ")
    svc.stopService()
    access, records = (tmp_path / "access.log").read_text(), audit.read_text()
    assert SECRET not in access and SECRET not in records
    assert access.count("<redacted>") == 2
    assert {json.loads(r)["apiKeyId"] for r in records.splitlines()} == {
        logrecord.api_key_id(SECRET)
    }
    request = Request(
        "POST",
        "/api/status/w/a/" + SECRET,
        f"api_key={SECRET}",
        {"authorization": "sig"},
        f"api_key={SECRET}".encode(),
    )
    assert SECRET not in repr(request) and "sig" not in repr(request)
    assert SECRET not in repr(ProxyRequest("status", "web", "groups:web", SECRET, None, None))


class BuggyReceiver(HttpRequestReceiver):
    socket_timeout = 0

    def handleRequest(self, request: Request) -> Response:
        raise ZeroDivisionError("bug")


class BuggyFactory(RequestFactory):
    protocol = BuggyReceiver


def test_an_unexpected_error_logs_the_path_without_its_key(tmp_path: Path) -> None:
    """The error log's line for a handler bug names the path, its key redacted."""
    factory = BuggyFactory()
    svc = service_for(tmp_path, factory, Clock())
    svc.startService()
    BuggyReceiver.log = Logger(observer=svc.publisher)
    try:
        proto, _ = connect(factory)
        proto.dataReceived(f"GET /api/status/w/a/{SECRET} HTTP/1.1\r\n\r\n".encode())
    finally:
        del BuggyReceiver.log
    svc.stopService()
    text = (tmp_path / "error.log").read_text()
    assert "unexpected error handling GET /api/status/w/a/<redacted>" in text
    assert SECRET not in text


# --------------------------------------------------------------------------- client gone


class SlowEchoReceiver(HttpRequestReceiver):
    socket_timeout = 0
    answers: list[defer.Deferred[Response]] = []

    def handleRequest(self, request: Request) -> defer.Deferred[Response]:
        self.audit.update(order="exec")
        d: defer.Deferred[Response] = defer.Deferred()
        self.answers.append(d)
        return d


class SlowEchoFactory(RequestFactory):
    protocol = SlowEchoReceiver


def test_an_answer_after_the_client_left_gets_its_access_line_and_audit_record(
    tmp_path: Path,
) -> None:
    """The order ran to its end after the client hung up: the access line ends with
    `"client went away"`, the audit record says `clientGone: true` with the order's status."""
    factory = SlowEchoFactory()
    audit = tmp_path / "audit.log"
    svc = service_for(tmp_path, factory, Clock(), audit_log_path=str(audit))
    svc.startService()
    proto, transport = connect(factory)
    proto.dataReceived(b"GET /agent/exec HTTP/1.1\r\n\r\n")
    proto.connectionLost()
    SlowEchoReceiver.answers.pop().callback(Response.json({"return": "true"}))
    svc.stopService()
    line = (tmp_path / "access.log").read_text()
    assert line.endswith(' "GET /agent/exec HTTP/1.1" 200 20 "client went away"\n')
    record: dict[str, Any] = json.loads(audit.read_text())
    assert (record["order"], record["status"], record["clientGone"]) == ("exec", 200, True)
    assert transport.value() == b""
