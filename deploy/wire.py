"""The message format: `Request`/`Response` values, their encoding, form decoding, and the
`HttpRequestReceiver` base protocol that reads one bounded HTTP/1.1 request per connection."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import unquote_to_bytes

from twisted.internet import defer
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from deploy.errors import RequestError, status_for
from deploy.message import STATUS_TEXT, encode_form  # noqa: F401  (re-exported)

JSON_TYPE = "application/json; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"

MAX_LINE = 8192
MAX_HEADERS = 64
MAX_BODY = 1024 * 1024
MAX_FIELDS = 64


@dataclass
class Request:
    method: str
    path: str
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    peer: str = ""

    @property
    def segments(self) -> list[str]:
        """The path split at `/`, without the empty leading segment, each percent-decoded."""
        return [unquote_to_bytes(s).decode("utf-8", "replace") for s in self.path.split("/")[1:]]

    def form(self) -> dict[str, str]:
        """The request's fields: the query string, then the form body (which wins)."""
        fields = decode_form(self.query.encode("latin-1", "replace")) if self.query else {}
        if self.body:
            fields.update(decode_form(self.body))
        return fields


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT_TYPE

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> Response:
        return cls(status, encode_json(obj), JSON_TYPE)

    @classmethod
    def text(cls, status: int, message: str = "") -> Response:
        return cls(status, message.encode("utf-8"), TEXT_TYPE)

    def to_bytes(self) -> bytes:
        reason = STATUS_TEXT.get(self.status, "Unknown")
        head = (
            f"HTTP/1.1 {self.status} {reason}\r\n"
            f"Content-Type: {self.content_type}\r\n"
            f"Content-Length: {len(self.body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode("ascii") + self.body


def encode_json(obj: Any) -> bytes:
    """JSON laid out as the original agent wrote it: one key per line, no indentation."""
    return json.dumps(obj, indent=0, ensure_ascii=False).encode("utf-8", "surrogateescape")


def decode_form(data: bytes) -> dict[str, str]:
    """Decode `a=1&b=x+y%2C` (`+` is a space, `%XX` a byte) into text fields.

    Bytes that are not UTF-8 are refused: every field feeds a command line or a path."""
    fields: dict[str, str] = {}
    if not data:
        return fields
    pairs = data.split(b"&")
    if len(pairs) > MAX_FIELDS:
        raise RequestError(400, f"too many fields (more than {MAX_FIELDS})")
    for pair in pairs:
        if not pair:
            continue
        key, _, value = pair.partition(b"=")
        try:
            k = unquote_to_bytes(key.replace(b"+", b" ")).decode("utf-8")
            v = unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(400, "request fields must be UTF-8") from None
        fields[k] = v
    return fields


class HttpRequestReceiver(LineReceiver, TimeoutMixin):
    """Reads one request (start line, headers in line mode, body in raw mode), hands it to
    `handleRequest`, writes the answer and closes. Every size is bounded; a bad request gets a
    4xx and the connection closes. The whole request must arrive within `socket_timeout` seconds
    of the connection opening (0 disables it): a deadline, not an idle timer, so a client
    trickling a byte at a time (slow loris) cannot hold a connection open for ever."""

    log = Logger()
    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE
    max_headers = MAX_HEADERS
    max_body = MAX_BODY
    socket_timeout: float = 5.0

    def connectionMade(self) -> None:
        self._method: str | None = None
        self._target = ""
        self._headers: dict[str, str] = {}
        self._header_count = 0
        self._body = bytearray()
        self._length = 0
        self._answered = False
        self._dispatched = False
        self.opened_at = time.monotonic()
        self.request_line = ""
        self.request: Request | None = None
        # What the order handler wants in the audit log (order, target, key id...).
        self.audit: dict[str, Any] = {}
        assert self.transport is not None  # makeConnection sets it before calling us
        self.peer = peer_host(self.transport.getPeer())
        if self.socket_timeout:
            self.setTimeout(self.socket_timeout)

    # -- reading

    def dataReceived(self, data: bytes) -> None:
        if self._answered or self._dispatched:
            return  # one request per connection: anything after it is ignored
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._answered or self._dispatched:
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            if self._method is None:
                self._startLine(line)
            elif line:
                self._headerLine(line)
            else:
                self._headersDone()
        except RequestError as e:
            self.answer(Response.text(e.status, e.message))

    def _startLine(self, line: bytes) -> None:
        if not line:
            return  # tolerate blank lines before the request, as HTTP servers do
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise RequestError(405, "")
        method = parts[0].decode("ascii", "replace")
        if method not in ("GET", "POST"):
            raise RequestError(405, "")
        # A request target is printable ASCII (RFC 3986); any other byte would be decoded
        # into something else than what was sent.
        if not all(0x21 <= b < 0x7F for b in parts[1]):
            raise RequestError(400, "bad request target")
        target = parts[1].decode("ascii")
        if not target.startswith("/"):
            raise RequestError(400, "bad request target")
        self._method = method
        self._target = target
        self.request_line = f"{method} {target[:2048]} {parts[2].decode('ascii', 'replace')}"

    def _headerLine(self, line: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.max_headers:
            raise RequestError(431, f"too many headers (more than {self.max_headers})")
        name, sep, value = line.partition(b":")
        if not sep or not name.strip() or name != name.strip():
            raise RequestError(400, "malformed header line")
        key = name.decode("ascii", "replace").lower()
        text = value.strip().decode("latin-1")
        if key == "content-length" and self._headers.get(key, text) != text:
            # Which one frames the body? Refuse rather than guess (RFC 9112 section 6.3).
            raise RequestError(400, "conflicting Content-Length headers")
        self._headers[key] = text

    def _headersDone(self) -> None:
        if "transfer-encoding" in self._headers:
            raise RequestError(400, "Transfer-Encoding is not supported; send Content-Length")
        length = self._headers.get("content-length")
        if length is None:
            if self._method == "POST":
                raise RequestError(411, "POST needs a Content-Length header")
            self._length = 0
        else:
            # isdigit() alone passes "²" (latin-1 0xB2), which int() refuses.
            if not (length.isascii() and length.isdigit()) or len(length) > 12:
                raise RequestError(400, f"bad Content-Length: {length[:40]!r}")
            self._length = int(length)
            if self._length > self.max_body:
                raise RequestError(413, f"body larger than {self.max_body} bytes")
        if self._length == 0:
            self._dispatch()
        else:
            self.setRawMode()

    def rawDataReceived(self, data: bytes) -> None:
        if self._answered or self._dispatched:
            return
        need = self._length - len(self._body)
        self._body += data[:need]
        if len(self._body) >= self._length:
            self._dispatch()

    def lineLengthExceeded(self, line: bytes) -> None:
        status = 400 if self._method is None else 431
        self.answer(Response.text(status, f"line longer than {self.MAX_LENGTH} bytes"))

    def timeoutConnection(self) -> None:
        if self._method is None and not self._header_count:
            # Nothing arrived at all: an idle socket, not a request.
            self.log.debug("idle connection from {peer} closed", peer=self.peer)
        self.answer(Response.text(408, f"no complete request within {self.socket_timeout:g} s"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        self._answered = True

    # -- dispatching

    def _dispatch(self) -> None:
        self._dispatched = True
        self.setTimeout(None)
        path, _, query = self._target.partition("?")
        request = Request(
            method=self._method or "GET",
            path=path,
            query=query,
            headers=self._headers,
            body=bytes(self._body),
            peer=self.peer,
        )
        self._body = bytearray()
        self.request = request
        # maybeDeferred's overloads take a handler's `Response | Deferred[Response]` for the
        # result's type; the Deferred it returns fires with a Response either way.
        d = cast("defer.Deferred[Response]", defer.maybeDeferred(self.handleRequest, request))
        d.addErrback(self._requestFailed, request)
        d.addCallback(self.answer)

    def _requestFailed(self, failure: Failure, request: Request) -> Response:
        # The one place an error becomes an answer: its status from deploy.errors, its text
        # from its message.
        status = status_for(failure.value) if failure.value is not None else None
        if status is not None:
            return Response.text(status, str(failure.value))
        self.log.failure(
            "unexpected error handling {method} {path} from {peer}",
            failure,
            method=request.method,
            path=request.path,
            peer=request.peer,
        )
        return Response.text(500, "internal error; see the daemon's log")

    def handleRequest(self, request: Request) -> Response | defer.Deferred[Response]:
        raise NotImplementedError

    def answer(self, response: Response) -> None:
        """Write the answer and close; later calls are ignored (an answer is written once)."""
        if self._answered:
            return
        self._answered = True
        self.setTimeout(None)
        self.responseSent(response)
        if self.transport is not None:
            self.transport.write(response.to_bytes())
            self.transport.loseConnection()

    def responseSent(self, response: Response) -> None:
        """Tell the factory's observers (access and audit logs) about the answer."""
        notify = getattr(self.factory, "responseSent", None)
        if notify is not None:
            notify(self, response)


class ServiceRequestReceiver(HttpRequestReceiver):
    """A daemon's request receiver: its factory's `service` gives the request deadline
    (`config.server.socket_timeout`), the clock it runs on (`clock`: a `Clock` in tests) and
    the peers allowed to talk (`allowed_hosts`); anyone else gets 403 before a byte is read."""

    def callLater(self, period: float, func: Callable[[], Any]) -> Any:
        return self.factory.service.clock.callLater(period, func)

    def connectionMade(self) -> None:
        service = self.factory.service
        self.socket_timeout = service.config.server.socket_timeout
        super().connectionMade()
        if not service.allowed_hosts.allows(self.peer):
            self.factory.log.warn("refused connection from {peer}", peer=self.peer)
            self.answer(Response.text(403, f"{self.peer} is not allowed!"))


class RequestFactory(Factory):
    """A factory whose `observers` see every answer: `observer(protocol, response)`."""

    log = Logger()

    def __init__(self) -> None:
        self.observers: list[Callable[[HttpRequestReceiver, Response], None]] = []

    def responseSent(self, proto: HttpRequestReceiver, response: Response) -> None:
        for observer in self.observers:
            try:
                observer(proto, response)
            except Exception:
                self.log.failure("response observer {observer!r} failed", observer=observer)


def peer_host(address: Any) -> str:
    """The host of a peer address (an IP address), or the address as text when it has none."""
    return getattr(address, "host", "") or str(address)
