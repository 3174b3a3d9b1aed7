"""The `HttpRequestReceiver` base protocol that reads one bounded HTTP/1.1 request per connection
and writes its answer, and the receiver and factory the daemons build on. The values it reads
and writes are `deploy.httpmsg`'s, its budget of bytes held before authentication
`deploy.pending`'s; both are re-exported here."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from deploy.errors import ClientWentAway, PendingBytesExceeded, RequestError, status_for
from deploy.httpmsg import (  # noqa: F401  (re-exported)
    JSON_TYPE,
    MAX_FIELDS,
    TEXT_TYPE,
    Request,
    Response,
    decode_form,
    encode_json,
)
from deploy.logrecord import redact_target
from deploy.message import STATUS_TEXT, encode_form  # noqa: F401  (re-exported)
from deploy.pending import (  # noqa: F401  (re-exported)
    MAX_PENDING_BYTES,
    TRIM_AFTER_BYTES,
    PendingBytes,
    release_free_memory,
)

MAX_LINE = 8192
MAX_HEADERS = 64
# The start line and the headers together: a real request's head is a few hundred bytes.
MAX_HEAD = 16 * 1024
# An agent order's fields: options are at most 8 KiB, form-encoded.
MAX_BODY = 16 * 1024


class HttpRequestReceiver(LineReceiver, TimeoutMixin):
    """Reads one request (start line, headers in line mode, body in raw mode), hands it to
    `handleRequest`, writes the answer and closes. Every size is bounded; a bad request gets a
    4xx and the connection closes. The whole request must arrive within `socket_timeout` seconds
    of the connection opening (0 disables it): a deadline, not an idle timer, so a client
    trickling a byte at a time (slow loris) cannot hold a connection open for ever. The answer
    must be taken within `socket_timeout` seconds of its start too, else the connection is
    dropped with what is left of the answer (a client that never reads).

    Before a body is read, `headReceived` may refuse the request from its head alone; until the
    request is handed on, its bytes count against the factory's `pending` (`PendingBytes`). A
    client that hangs up after its request was handed on does not stop the answer from being
    logged: `client_gone` says nobody got it."""

    log = Logger()
    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE
    max_headers = MAX_HEADERS
    max_head = MAX_HEAD
    max_body = MAX_BODY
    socket_timeout: float = 5.0

    def connectionMade(self) -> None:
        self._method: str | None = None
        self._target = ""
        self._headers: dict[str, str] = {}
        self._header_count = 0
        self._head_bytes = 0
        self._body = bytearray()
        self._length = 0
        self._answered = False
        self._dispatched = False
        self._held = 0
        self._write_deadline: Any = None
        self._dropped_unread = 0  # the size of an answer the client did not take
        self._answer_size = 0
        self.client_gone = False
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
        if not self._hold(len(data)):
            self._refuse(PendingBytesExceeded())
            return
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._answered or self._dispatched:
            return
        self._head_bytes += len(line) + 1
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            if self._head_bytes > self.max_head:
                raise RequestError(431, f"request head larger than {self.max_head} bytes")
            if self._method is None:
                self._startLine(line)
            elif line:
                self._headerLine(line)
            else:
                self._headersDone()
        except Exception as e:
            if status_for(e) is None:
                raise
            self._refuse(e)

    def _refuse(self, error: Exception) -> None:
        """Answer a domain error found while reading; its status from deploy.errors."""
        status = status_for(error)
        assert status is not None
        self.answer(Response.text(status, str(error)))

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
            return
        # The head alone may be enough to refuse the request (a stale signature): then its
        # body is never read.
        self.request = self._makeRequest(b"")
        self.headReceived(self.request)
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
        self._release()
        if self._write_deadline is not None:
            if self._write_deadline.active():
                self._write_deadline.cancel()
            self._write_deadline = None
        if self._dispatched and not self._answered:
            # The order runs on (or its handler cancels it): its answer is still logged.
            self.client_gone = True
        else:
            self._answered = True
        if self._dropped_unread:
            # The transport still holds the answer the client did not take: let go of it so the
            # buffer is freed as soon as the reactor does (not whenever this protocol is), and
            # after a large one give the freed pages back to the system.
            self.transport = None
            if self._dropped_unread > TRIM_AFTER_BYTES:
                self.callLater(0, release_free_memory)

    def headReceived(self, request: Request) -> None:
        """Judge a request by its head (`request.body` is empty) before its body is read; raise
        a domain error to refuse it. Only called for a request that has a body."""

    # -- what is held before the handler

    def _hold(self, count: int) -> bool:
        pending: PendingBytes | None = getattr(self.factory, "pending", None)
        if pending is None:
            return True
        if not pending.take(count):
            return False
        self._held += count
        return True

    def _release(self) -> None:
        if self._held:
            pending: PendingBytes | None = getattr(self.factory, "pending", None)
            if pending is not None:
                pending.give_back(self._held)
            self._held = 0

    # -- dispatching

    def _makeRequest(self, body: bytes) -> Request:
        path, _, query = self._target.partition("?")
        return Request(
            method=self._method or "GET",
            path=path,
            query=query,
            headers=self._headers,
            body=body,
            peer=self.peer,
        )

    def _dispatch(self) -> None:
        self._dispatched = True
        self.setTimeout(None)
        request = self._makeRequest(bytes(self._body))
        self._body = bytearray()
        self.request = request
        # maybeDeferred's overloads take a handler's `Response | Deferred[Response]` for the
        # result's type; the Deferred it returns fires with a Response either way.
        d = cast("defer.Deferred[Response]", defer.maybeDeferred(self.handleRequest, request))
        # The handler has judged the request (authentication is its first step): its bytes no
        # longer count as pending.
        self._release()
        d.addErrback(self._requestFailed, request)
        d.addCallback(self.answer)

    def _requestFailed(self, failure: Failure, request: Request) -> Response:
        # The one place an error becomes an answer: its status from deploy.errors, its text
        # from its message.
        if self.client_gone and failure.check(defer.CancelledError):
            # Stopped because its client hung up: what the logs say, never an answer.
            failure = Failure(ClientWentAway())
        status = status_for(failure.value) if failure.value is not None else None
        if status is not None:
            return Response.text(status, str(failure.value))
        self.log.failure(
            "unexpected error handling {method} {path} from {peer}",
            failure,
            method=request.method,
            path=redact_target(request.path),
            peer=request.peer,
        )
        return Response.text(500, "internal error; see the daemon's log")

    def handleRequest(self, request: Request) -> Response | defer.Deferred[Response]:
        raise NotImplementedError

    def answer(self, response: Response) -> None:
        """Write the answer and close; later calls are ignored (an answer is written once). The
        observers hear of it even when the client has gone (nothing is written then)."""
        if self._answered:
            return
        self._answered = True
        self.setTimeout(None)
        self._release()
        self.responseSent(response)
        if self.client_gone or self.transport is None:
            return
        data = response.to_bytes()
        self._answer_size = len(data)
        self.transport.write(data)
        self.transport.loseConnection()
        if self.socket_timeout:
            self._write_deadline = self.callLater(self.socket_timeout, self._writeTimedOut)

    def _writeTimedOut(self) -> None:
        self._write_deadline = None
        self.log.info(
            "{peer} did not take its answer within {timeout:g} s: connection dropped",
            peer=self.peer,
            timeout=self.socket_timeout,
        )
        # ITCPTransport (TCP and TLS alike): drop the connection and what it still buffers.
        self._dropped_unread = self._answer_size
        transport: Any = self.transport
        transport.abortConnection()

    def responseSent(self, response: Response) -> None:
        """Tell the factory's observers (access and audit logs) about the answer."""
        notify = getattr(self.factory, "responseSent", None)
        if notify is not None:
            notify(self, response)


class ServiceRequestReceiver(HttpRequestReceiver):
    """A daemon's request receiver: its factory's `service` gives the request deadline
    (`config.server.socket_timeout`), the clock it runs on (`clock`: a `Clock` in tests) and
    the peers allowed to talk (`allowed_hosts`); anyone else gets 403 before a byte is read.
    When the service has an `authenticator`, a signature header that is malformed or out of
    its time window is refused before the body is read."""

    def callLater(self, period: float, func: Callable[[], Any]) -> Any:
        return self.factory.service.clock.callLater(period, func)

    def connectionMade(self) -> None:
        service = self.factory.service
        self.socket_timeout = service.config.server.socket_timeout
        super().connectionMade()
        if not service.allowed_hosts.allows(self.peer):
            self.factory.log.warn("refused connection from {peer}", peer=self.peer)
            self.answer(Response.text(403, f"{self.peer} is not allowed!"))

    def headReceived(self, request: Request) -> None:
        authenticator = getattr(self.factory.service, "authenticator", None)
        if authenticator is not None:
            authenticator.check_head(request)


class RequestFactory(Factory):
    """A factory whose `observers` see every answer: `observer(protocol, response)`, and whose
    `pending` bounds what its connections hold before their requests are handed on."""

    log = Logger()

    def __init__(self) -> None:
        self.observers: list[Callable[[HttpRequestReceiver, Response], None]] = []
        self.pending = PendingBytes()

    def responseSent(self, proto: HttpRequestReceiver, response: Response) -> None:
        for observer in self.observers:
            try:
                observer(proto, response)
            except Exception:
                self.log.failure("response observer {observer!r} failed", observer=observer)


def peer_host(address: Any) -> str:
    """The host of a peer address (an IP address), or the address as text when it has none."""
    return getattr(address, "host", "") or str(address)
