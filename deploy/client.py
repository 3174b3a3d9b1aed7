"""The client side of the wire: one order to one host as a Deferred (connect, sign, send, read a
bounded answer, time out), and fan-out to many hosts with bounded concurrency, per-host timeouts
and rolling batches with a failure budget."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from deploy import auth
from deploy.wire import STATUS_TEXT, encode_form

MAX_RESPONSE = 256 * 1024 * 1024
MAX_HEAD = 64 * 1024

SKIPPED = "skipped"


@dataclass
class Order:
    """What to ask: `order` with `options`, and for a proxy `args`/`api_key` (+ rolling fields)."""

    order: str
    options: str = ""
    args: str = ""
    api_key: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    target: str = "agent"

    @property
    def path(self) -> str:
        return f"/{self.target}/{self.order}"


@dataclass
class ClientOptions:
    port: int = 3440
    key_cipher: str = auth.DEFAULT_KEY_CIPHER
    legacy_auth: bool = False
    socket_timeout: float = 5.0
    thread_timeout: float = 10.0
    tls: Callable[[str], Any] | None = None  # host -> IOpenSSLClientConnectionCreator
    max_parallel: int = 64


@dataclass
class HostResult:
    """One host's answer in the original client's shape."""

    host: str
    order: str
    server_status: int  # 1: the host answered; 0: it did not
    code: int | None = None
    reason: str = ""
    content: Any = ""
    skipped: bool = False

    @property
    def http_ok(self) -> bool:
        return self.server_status == 1 and self.code == 200

    @property
    def succeeded(self) -> bool:
        """Answered 200 and, when the answer is agent JSON, with `return` true."""
        if not self.http_ok:
            return False
        if isinstance(self.content, dict) and "return" in self.content:
            return self.content["return"] in ("true", True, 1)
        return True

    @property
    def unreachable(self) -> bool:
        return self.server_status == 0 and not self.skipped

    def to_json(self, *, numeric_code: bool = False) -> dict[str, Any]:
        code: Any = self.code
        if code is not None and not numeric_code:
            code = str(code)
        body = {
            "return": 1 if self.http_ok else 0,
            "serverStatus": self.server_status,
            "returnCode": code if code is not None else ("" if not numeric_code else 0),
            "returnString": self.reason,
            "content": self.content,
        }
        if self.skipped:
            body["skipped"] = True
        return body


class ResponseError(Exception):
    pass


class OrderProtocol(protocol.Protocol):
    """Writes one request and reads the answer until Content-Length or close, bounded."""

    def __init__(self, request: bytes, finished: defer.Deferred[tuple[int, str, dict, bytes]]):
        self.request = request
        self.finished = finished
        self.buffer = bytearray()
        self.head: tuple[int, str, dict[str, str]] | None = None
        self.length: int | None = None
        self.timeout_call: Any = None

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self.buffer += data
        if self.head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self._fail(ResponseError("answer headers too large"))
                return
            try:
                self.head = _parse_head(bytes(self.buffer[:end]))
            except ResponseError as e:
                self._fail(e)
                return
            del self.buffer[: end + 4]
            length = self.head[2].get("content-length")
            if length is not None:
                # isascii: "²" (latin-1 0xB2) passes isdigit() but not int()
                if not (length.isascii() and length.isdigit()):
                    self._fail(ResponseError(f"bad Content-Length in answer: {length[:20]!r}"))
                    return
                self.length = int(length)
        if len(self.buffer) > MAX_RESPONSE:
            self._fail(ResponseError(f"answer larger than {MAX_RESPONSE} bytes"))
            return
        if self.length is not None and len(self.buffer) >= self.length:
            self._done()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.finished.called:
            return
        if self.head is not None and (self.length is None or len(self.buffer) >= self.length):
            self._done()
        elif self.head is not None:
            self._fail(ResponseError("connection closed before the whole answer arrived"))
        else:
            self.finished.errback(reason)

    def _done(self) -> None:
        assert self.head is not None
        code, text, headers = self.head
        body = bytes(self.buffer if self.length is None else self.buffer[: self.length])
        self.finished.callback((code, text, headers, body))
        self.transport.loseConnection()

    def _fail(self, exc: Exception) -> None:
        if not self.finished.called:
            self.finished.errback(exc)
        self.transport.abortConnection()


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ResponseError(f"not an HTTP answer: {lines[0][:60]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), parts[2] if len(parts) > 2 else "", headers


def build_request(order: Order, options: ClientOptions, host: str, now: float) -> bytes:
    """The original client's request bytes, signed (or with the legacy auth_key)."""
    fields = {
        "auth_key": auth.legacy_auth_key(options.key_cipher, now) if options.legacy_auth else "",
        "options": order.options,
        "args": order.args,
        "api_key": order.api_key,
        **order.extra,
    }
    body = encode_form(fields)
    lines = [
        f"POST {order.path} HTTP/1.1",
        f"Host: [{host}]" if ":" in host else f"Host: {host}",  # an IPv6 literal is bracketed
        "Connection: close",
        "Content-Type: application/x-www-form-urlencoded",
        f"Content-Length: {len(body)}",
    ]
    if not options.legacy_auth:
        lines.append(
            "Authorization: "
            + auth.sign_request(options.key_cipher, "POST", order.path, body, now=now)
        )
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def split_host(spec: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]:port` or a bare IPv6 address."""
    spec = spec.strip()
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif spec.count(":") == 1:
        host, _, port = spec.partition(":")
    else:
        host, port = spec, ""
    if port and not port.isdigit():
        raise ValueError(f"bad port in host {spec!r}")
    return host, int(port) if port else default_port


def decode_content(headers: dict[str, str], body: bytes) -> Any:
    """Agent JSON (and proxy JSON sent as text/plain by the original) parsed; else the text."""
    text = body.decode("utf-8", "replace")
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def client_endpoint(reactor: Any, host: str, port: int, timeout: float) -> Any:
    """A TCP endpoint for `host`. An address literal is connected to directly: HostnameEndpoint
    would resolve it with getaddrinfo in a thread and pause 0.3 s between attempts, which a
    fan-out to hundreds of addresses pays for every host."""
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


class OrderClient:
    """Sends orders to hosts with the given options."""

    log = Logger()

    def __init__(self, reactor: Any, options: ClientOptions) -> None:
        self.reactor = reactor
        self.options = options

    def send(self, host_spec: str, order: Order) -> defer.Deferred[HostResult]:
        """One order to one host. Never fails: every problem becomes that host's result."""
        opts = self.options
        try:
            host, port = split_host(host_spec, opts.port)
        except ValueError as e:
            return defer.succeed(HostResult(host_spec, order.order, 0, content=str(e)))
        finished: defer.Deferred[tuple[int, str, dict, bytes]] = defer.Deferred()
        request = build_request(order, opts, host, self.reactor.seconds())
        endpoint = client_endpoint(self.reactor, host, port, opts.socket_timeout)
        if opts.tls is not None:
            try:
                endpoint = wrapClientTLS(opts.tls(host), endpoint)
            except Exception as e:  # a TLS setup problem is this host's error, said plainly
                return defer.succeed(HostResult(host_spec, order.order, 0, content=str(e)))
        factory = protocol.Factory.forProtocol(lambda: OrderProtocol(request, finished))
        connecting = endpoint.connect(factory)
        state: dict[str, Any] = {"proto": None}

        def connected(proto: OrderProtocol) -> None:
            state["proto"] = proto

        def connect_failed(f: Failure) -> None:
            if not finished.called:
                finished.errback(f)

        connecting.addCallbacks(connected, connect_failed)

        def on_timeout() -> None:
            if finished.called:
                return
            finished.errback(defer.TimeoutError())
            proto = state["proto"]
            if proto is not None and proto.transport is not None:
                proto.transport.abortConnection()
            else:
                connecting.cancel()

        timer = (
            self.reactor.callLater(opts.thread_timeout, on_timeout) if opts.thread_timeout else None
        )

        def ok(result: tuple[int, str, dict, bytes]) -> HostResult:
            code, reason, headers, body = result
            return HostResult(
                host_spec,
                order.order,
                1,
                code,
                reason or STATUS_TEXT.get(code, ""),
                decode_content(headers, body),
            )

        def failed(f: Failure) -> HostResult:
            return HostResult(host_spec, order.order, 0, content=self.describe(f, host, port))

        def cleanup(result: HostResult) -> HostResult:
            if timer is not None and timer.active():
                timer.cancel()
            return result

        return finished.addCallbacks(ok, failed).addBoth(cleanup)

    def describe(self, f: Failure, host: str, port: int) -> str:
        if f.check(defer.TimeoutError):
            return f"Process Timeout({self.options.thread_timeout:g})!"
        if f.check(
            error.ConnectError,
            error.ConnectionRefusedError,
            error.TimeoutError,
            error.DNSLookupError,
            defer.CancelledError,
        ):
            return f"can't connect to {host}:{port}"
        if f.check(ResponseError):
            return f"bad answer from {host}:{port}: {f.value}"
        if self.options.tls is not None:
            from deploy.tls import describe_tls_failure

            return f"{host}:{port}: {describe_tls_failure(f)}"
        if f.check(error.ConnectionDone, error.ConnectionLost):
            # Every deploy daemon answers, if only with an error: a port that hangs up on a
            # request without a word is most likely a TLS port.
            return (
                f"{host}:{port} closed the connection without an answer "
                "(is it a TLS port? then use --ssl-public-key or --ssl-ca)"
            )
        return f"{host}:{port}: {f.getErrorMessage()}"


def parse_budget(
    value: str | int | None, total: int, name: str, *, round_up: bool = True
) -> int | None:
    """`N` or `N%` of `total`; None when unset.

    A batch size rounds a percentage up (at least 1 host when the percentage is above 0); a
    failure budget rounds it down, so that "more than 10% failed" means exactly that: with 5
    hosts, one failure (20%) is already more than 10%."""
    if value is None or value == "":
        return None
    text = str(value).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            # rounded first so that float noise (1.1% of 110 = 1.2100000000000002) cannot
            # move a result across a whole number
            share = round(total * pct / 100, 9)
            if round_up:
                return max(1, math.ceil(share)) if pct else 0
            return math.floor(share)
        n = int(text)
        if n < 0:
            raise ValueError
        return n
    except ValueError:
        raise ValueError(f"{name}: expected N or N%, got {text!r}") from None


@dataclass
class FanOutResult:
    results: dict[str, HostResult]
    stopped: bool = False  # the failure budget stopped the rollout

    @property
    def failed(self) -> list[HostResult]:
        return [r for r in self.results.values() if not r.skipped and not r.succeeded]

    @property
    def skipped(self) -> list[HostResult]:
        return [r for r in self.results.values() if r.skipped]


def fan_out(
    client: OrderClient,
    hosts: Sequence[str],
    order_for: Callable[[str], Order] | Order,
    *,
    max_parallel: int | None = None,
    batch: str | int | None = None,
    max_fail: str | int | None = None,
    on_result: Callable[[HostResult], None] | None = None,
) -> defer.Deferred[FanOutResult]:
    """Send an order to every host, at most `max_parallel` at once (None: the client's setting;
    0: no limit). With `batch`, hosts go in batches, each started once the one before has
    answered; once more hosts failed than `max_fail` (unreachable and timed-out hosts count as
    failed), no new batch starts and the rest are reported as skipped. Fires as soon as the
    last host started has answered."""
    hosts = list(dict.fromkeys(hosts))
    total = len(hosts)
    batch_size = parse_budget(batch, total, "batch") or total or 1
    budget = parse_budget(max_fail, total, "max_fail", round_up=False)
    limit = client.options.max_parallel if max_parallel is None else max_parallel
    sem = defer.DeferredSemaphore(limit if limit > 0 else max(1, total))
    results: dict[str, HostResult] = {}
    make = order_for if callable(order_for) else (lambda _h, o=order_for: o)

    def record(result: HostResult, host: str) -> None:
        # Keyed by the host as given, whatever the client put in the result.
        results[host] = result
        if on_result is not None:
            on_result(result)

    def send(host: str) -> defer.Deferred[None]:
        order = make(host)

        def broken(f: Failure) -> HostResult:
            # `send` promises never to fail; if it does, the host still gets a result.
            OrderClient.log.failure(
                "sending {order} to {host} failed", f, order=order.order, host=host
            )
            return HostResult(host, order.order, 0, content=f"{host}: {f.getErrorMessage()}")

        d = sem.run(client.send, host, order)
        return d.addErrback(broken).addCallback(record, host)

    @defer.inlineCallbacks
    def run() -> Any:
        stopped = False
        for start in range(0, total, batch_size):
            if budget is not None and start > 0:
                failed = sum(1 for r in results.values() if not r.succeeded)
                if failed > budget:
                    stopped = True
                    for host in hosts[start:]:
                        record(
                            HostResult(
                                host,
                                make(host).order,
                                0,
                                content=SKIPPED,
                                skipped=True,
                                reason="Skipped",
                            ),
                            host,
                        )
                    break
            yield defer.gatherResults([send(h) for h in hosts[start : start + batch_size]])
        return FanOutResult({h: results[h] for h in hosts}, stopped)

    return run()


def result_map(results: Iterable[HostResult], *, numeric_code: bool = False) -> dict[str, Any]:
    """host → order → answer, the original client's output shape."""
    return {r.host: {r.order: r.to_json(numeric_code=numeric_code)} for r in results}
