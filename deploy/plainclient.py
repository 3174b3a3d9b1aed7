"""Orders over plain TCP without an event-loop framework (non-blocking sockets and `selectors`), so
that `deploy-client` without TLS starts without importing Twisted. Only the I/O loop is here, and
host names resolved in threads beside it (a literal address needs no lookup): requests, answer
parsing, limits and per-host messages are `deploy.orders`', as for `deploy.client.OrderClient`."""

from __future__ import annotations

import collections
import errno
import selectors
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from deploy.orders import (
    AnswerReader,
    ClientOptions,
    FanOutResult,
    HostResult,
    Order,
    ResponseError,
    bad_answer,
    build_request,
    cant_connect,
    hung_up,
    result_of,
    send_failed,
    split_host,
    timed_out,
    unanswered,
)

_NO_DEADLINE = float("inf")
AddressInfo = list[tuple[Any, ...]]  # getaddrinfo's (family, type, proto, _, sockaddr)


class Exchange:
    """One order to one host: connect (each resolved address in turn), write, read the answer."""

    def __init__(
        self,
        spec: str,
        order: Order,
        host: str,
        port: int,
        addresses: list[tuple[Any, ...]],
        options: ClientOptions,
        now: float,
    ) -> None:
        self.spec = spec
        self.order = order
        self.host = host
        self.port = port
        self.addresses = addresses  # getaddrinfo's (family, type, proto, _, sockaddr), in order
        self.resolving = False  # its name is being looked up (in a thread)
        self.options = options
        self.started = now
        self.deadline = now + options.thread_timeout if options.thread_timeout else _NO_DEADLINE
        self.connect_deadline = _NO_DEADLINE
        self.sock: socket.socket | None = None
        self.connected = False
        self.outgoing = build_request(order, options, host, time.time(), port)
        self.reader = AnswerReader(options.answer_limit(order.order), order=order.order)

    def connect_next(self, now: float) -> bool:
        """Start connecting to the next address; False once none is left."""
        self.close()
        while self.addresses:
            family, kind, proto, _, sockaddr = self.addresses.pop(0)
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            if sock.connect_ex(sockaddr) in (0, errno.EINPROGRESS):
                self.sock = sock
                timeout = self.options.socket_timeout
                self.connect_deadline = now + timeout if timeout else _NO_DEADLINE
                return True
            sock.close()
        return False

    def next_deadline(self) -> float:
        return self.deadline if self.connected else min(self.deadline, self.connect_deadline)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def numeric_addresses(host: str, port: int) -> AddressInfo | None:
    """The addresses of a literal IPv4/IPv6 address, found without a lookup; None for a name."""
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError):
        return None


def resolve(host: str, port: int) -> AddressInfo | None:
    """The addresses a name resolves to (blocking: run in a thread); None when it does not."""
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None


class Lookups:
    """Names resolved in daemon threads, so that a slow name stalls only its own host: each answer
    is queued and a byte on a socket pair wakes the selector loop. A lookup still going when its
    host's deadline passes is left to finish in the background, unread."""

    def __init__(self, sel: selectors.BaseSelector, resolver: Callable[[str, int], Any]) -> None:
        self.sel = sel
        self.resolver = resolver
        # deque's append and popleft are atomic: no lock (nor `threading`) before a lookup.
        self.answers: collections.deque[tuple[Exchange, AddressInfo | None]] = collections.deque()
        self.wake: tuple[socket.socket, socket.socket] | None = None

    def start(self, ex: Exchange) -> None:
        import threading  # only when a name needs a lookup

        if self.wake is None:
            self.wake = socket.socketpair()
            for end in self.wake:
                end.setblocking(False)
            self.sel.register(self.wake[0], selectors.EVENT_READ, self)
        ex.resolving = True
        threading.Thread(target=self._lookup, args=(ex,), daemon=True).start()

    def _lookup(self, ex: Exchange) -> None:
        self.answers.append((ex, self.resolver(ex.host, ex.port)))
        wake = self.wake
        if wake is not None:
            try:
                wake[1].send(b"\0")
            except OSError:
                pass  # closed: the run is over; or full: a wake-up is pending anyway

    def done(self) -> list[tuple[Exchange, AddressInfo | None]]:
        """The lookups that ended since the last call."""
        if self.wake is not None:
            try:
                while self.wake[0].recv(4096):
                    pass
            except OSError:
                pass
        found = []
        while self.answers:
            found.append(self.answers.popleft())
        return found

    def close(self) -> None:
        if self.wake is not None:
            self.sel.unregister(self.wake[0])
            for end in self.wake:
                end.close()
            self.wake = None


def fan_out_plain(
    hosts: Sequence[str],
    order_for: Callable[[str], Order],
    options: ClientOptions,
    *,
    on_result: Callable[[HostResult, float], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    resolver: Callable[[str, int], AddressInfo | None] = resolve,
) -> FanOutResult:
    """Every host's answer, at most `options.max_parallel` exchanges at once (0: no limit)."""
    hosts = list(dict.fromkeys(hosts))
    limit = options.max_parallel if options.max_parallel > 0 else max(1, len(hosts))
    results: dict[str, HostResult] = {}
    waiting = list(reversed(hosts))
    active: set[Exchange] = set()
    sel = selectors.DefaultSelector()
    lookups = Lookups(sel, resolver)

    def record(spec: str, result: HostResult, seconds: float) -> None:
        results[spec] = result
        if on_result is not None:
            on_result(result, seconds)

    def finish(ex: Exchange, result: HostResult) -> None:
        if ex.sock is not None:
            sel.unregister(ex.sock)
        ex.close()
        active.discard(ex)
        record(ex.spec, result, clock() - ex.started)

    def start(spec: str) -> None:
        order = order_for(spec)
        try:
            host, port = split_host(spec, options.port)
        except ValueError as e:
            record(spec, unanswered(spec, order, str(e)), 0.0)
            return
        addresses = numeric_addresses(host, port)
        ex = Exchange(spec, order, host, port, addresses or [], options, clock())
        active.add(ex)
        if addresses is None:
            lookups.start(ex)  # its deadline runs meanwhile; the other hosts go on
        else:
            connect_next(ex)

    def resolved() -> None:
        for ex, addresses in lookups.done():
            if ex not in active:
                continue  # its deadline passed while the name was looked up
            ex.resolving = False
            if addresses:
                ex.addresses = list(addresses)
                connect_next(ex)
            else:
                finish(ex, unanswered(ex.spec, ex.order, cant_connect(ex.host, ex.port)))

    def connect_next(ex: Exchange) -> None:
        if ex.sock is not None:
            sel.unregister(ex.sock)
        if ex.connect_next(clock()):
            assert ex.sock is not None
            sel.register(ex.sock, selectors.EVENT_WRITE, ex)
        else:
            finish(ex, unanswered(ex.spec, ex.order, cant_connect(ex.host, ex.port)))

    def writable(ex: Exchange) -> None:
        assert ex.sock is not None
        if not ex.connected:
            if ex.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                connect_next(ex)
                return
            ex.connected = True
        try:
            sent = ex.sock.send(ex.outgoing)
        except BlockingIOError:
            return
        except OSError:
            closed(ex)
            return
        ex.outgoing = ex.outgoing[sent:]
        if not ex.outgoing:
            sel.modify(ex.sock, selectors.EVENT_READ, ex)

    def readable(ex: Exchange) -> None:
        assert ex.sock is not None
        try:
            data = ex.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            closed(ex)
            return
        try:
            answer = ex.reader.feed(data)
        except ResponseError as e:
            finish(ex, unanswered(ex.spec, ex.order, bad_answer(ex.host, ex.port, e)))
            return
        if answer is not None:
            finish(ex, result_of(ex.spec, ex.order, answer, ex.host, ex.port))

    def closed(ex: Exchange) -> None:
        try:
            answer = ex.reader.end()
        except ResponseError as e:
            finish(ex, unanswered(ex.spec, ex.order, bad_answer(ex.host, ex.port, e)))
            return
        if answer is not None:
            finish(ex, result_of(ex.spec, ex.order, answer, ex.host, ex.port))
        else:
            finish(ex, unanswered(ex.spec, ex.order, hung_up(ex.host, ex.port)))

    def expire(now: float) -> None:
        for ex in list(active):
            if now >= ex.deadline:
                finish(ex, unanswered(ex.spec, ex.order, timed_out(options)))
            elif not ex.connected and now >= ex.connect_deadline:
                connect_next(ex)  # this address did not answer in time: the next one

    with sel:
        while waiting or active:
            while waiting and len(active) < limit:
                start(waiting.pop())
            if not active:
                continue
            nearest = min(ex.next_deadline() for ex in active)
            wait = None if nearest == _NO_DEADLINE else max(0.0, nearest - clock())
            for key, events in sel.select(wait):
                if key.data is lookups:
                    resolved()
                    continue
                ex = key.data
                if ex not in active or ex.sock is None or key.fileobj is not ex.sock:
                    continue  # finished, or moved to another address, earlier in this round
                try:
                    if events & selectors.EVENT_WRITE:
                        writable(ex)
                    else:
                        readable(ex)
                except Exception as e:
                    # A bug here is this host's error, as fan_out makes it one: the other
                    # hosts' results are not lost.
                    if ex not in active:
                        raise
                    finish(ex, send_failed(ex.spec, ex.order, e))
            expire(clock())
        lookups.close()
    return FanOutResult({h: results[h] for h in hosts})
