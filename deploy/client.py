"""The client side of the wire: one order to one host as a Deferred (connect, sign, send, read a
bounded answer, time out), and fan-out to many hosts with bounded concurrency, per-host timeouts
and rolling batches with a failure budget."""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from deploy.answers import AnswerAccount, over_budget
from deploy.orders import (  # noqa: F401  (re-exported: the client's public names)
    MAX_HEAD,
    MAX_RESPONSE,
    SKIPPED,
    Answer,
    AnswerReader,
    ClientOptions,
    FanOutResult,
    HostResult,
    Order,
    ResponseError,
    answered,
    bad_answer,
    build_request,
    cant_connect,
    decode_content,
    host_share,
    hung_up,
    not_ordered,
    parse_budget,
    process_timeout,
    result_map,
    result_of,
    rounds_to_order,
    send_failed,
    split_host,
    timed_out,
    unanswered,
)


class OrderProtocol(protocol.Protocol):
    """Writes one request and reads the answer (`AnswerReader`) until Content-Length or close."""

    # Set before connectionMade: a TCP connection, or TLS over one (both can abort).
    transport: ITCPTransport

    def __init__(
        self, request: bytes, finished: defer.Deferred[Answer], reader: AnswerReader
    ) -> None:
        self.request = request
        self.finished = finished
        self.reader = reader

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        try:
            answer = self.reader.feed(data)
        except ResponseError as e:
            self._fail(e)
            return
        if answer is not None:
            self.finished.callback(answer)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.finished.called:
            self.reader.release()  # timed out or cancelled: what arrived is not kept
            return
        try:
            answer = self.reader.end()
        except ResponseError as e:
            self._fail(e)
            return
        if answer is not None:
            self.finished.callback(answer)
        else:
            self.finished.errback(reason)

    def _fail(self, exc: Exception) -> None:
        if not self.finished.called:
            self.finished.errback(exc)
        self.transport.abortConnection()


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
    """Sends orders to hosts with the given options; with an `account`, the answers it reads
    and keeps are held within that account's budget (a proxy's order)."""

    log = Logger()

    def __init__(
        self, reactor: Any, options: ClientOptions, account: AnswerAccount | None = None
    ) -> None:
        self.reactor = reactor
        self.options = options
        self.account = account

    def send(self, host_spec: str, order: Order) -> defer.Deferred[HostResult]:
        """One order to one host. Never fails: every problem becomes that host's result.
        Cancelling it drops the connection (or the attempt)."""
        opts = self.options
        try:
            host, port = split_host(host_spec, opts.port)
        except ValueError as e:
            return defer.succeed(unanswered(host_spec, order, str(e)))
        state: dict[str, Any] = {"proto": None}

        def stop_trying() -> None:
            proto = state["proto"]
            if proto is not None and proto.transport is not None:
                proto.transport.abortConnection()
            else:
                connecting.cancel()

        finished: defer.Deferred[Answer] = defer.Deferred(lambda _d: stop_trying())
        request = build_request(order, opts, host, self.reactor.seconds(), port)
        endpoint = client_endpoint(self.reactor, host, port, opts.socket_timeout)
        if opts.tls is not None:
            try:
                endpoint = wrapClientTLS(opts.tls(host), endpoint)
            except Exception as e:  # a TLS setup problem is this host's error, said plainly
                return defer.succeed(unanswered(host_spec, order, str(e)))
        reader = AnswerReader(opts.answer_limit(order.order), self.account, order.order)
        factory = protocol.Factory.forProtocol(lambda: OrderProtocol(request, finished, reader))
        factory.noisy = False  # no "Starting/Stopping factory" log events for every host
        connecting = endpoint.connect(factory)

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
            stop_trying()

        timer = (
            self.reactor.callLater(opts.thread_timeout, on_timeout) if opts.thread_timeout else None
        )

        def ok(answer: Answer) -> HostResult:
            result = result_of(host_spec, order, answer, host, port)
            account = self.account
            if account is not None and result.size and not account.take(result.size):
                return unanswered(host_spec, order, bad_answer(host, port, over_budget(account)))
            return result

        def failed(f: Failure) -> HostResult:
            return unanswered(host_spec, order, self.describe(f, host, port))

        def cleanup(result: HostResult) -> HostResult:
            if timer is not None and timer.active():
                timer.cancel()
            return result

        return finished.addCallbacks(ok, failed).addBoth(cleanup)

    def describe(self, f: Failure, host: str, port: int) -> str:
        if f.check(defer.TimeoutError):
            return timed_out(self.options)
        if f.check(
            error.ConnectError,
            error.ConnectionRefusedError,
            error.TimeoutError,
            error.DNSLookupError,
            defer.CancelledError,
        ):
            return cant_connect(host, port)
        if isinstance(f.value, ResponseError):
            return bad_answer(host, port, f.value)
        if self.options.tls is not None:
            from deploy.tls import describe_tls_failure

            return f"{host}:{port}: {describe_tls_failure(f)}"
        if f.check(error.ConnectionDone, error.ConnectionLost):
            return hung_up(host, port)
        return f"{host}:{port}: {f.getErrorMessage()}"


class OrderSender(typing.Protocol):
    """What `fan_out` needs of a client: `OrderClient`, or a wrapper of one (the CLI's, which
    times each host or follows its sync)."""

    @property
    def options(self) -> ClientOptions: ...

    def send(self, host: str, order: Order, /) -> defer.Deferred[HostResult]: ...


class TimedSender:
    """Wraps a sender and keeps each host's own time, from `send` (its connect) until its result
    (an answer, a failure, a timeout, or a cancel at the deadline), as `seconds` on `clock`."""

    def __init__(self, inner: OrderSender, clock: Callable[[], float]) -> None:
        self.inner = inner
        self.options = inner.options
        self.clock = clock
        self.seconds: dict[str, float] = {}

    def send(self, host: str, order: Order) -> defer.Deferred[HostResult]:
        started = self.clock()

        def done(result: HostResult) -> HostResult:
            self.seconds[host] = self.clock() - started
            return result

        return self.inner.send(host, order).addCallback(done)


def fan_out(
    client: OrderSender,
    hosts: Sequence[str],
    order_for: Callable[[str], Order] | Order,
    *,
    max_parallel: int | None = None,
    batch: str | int | None = None,
    max_fail: str | int | None = None,
    on_result: Callable[[HostResult], None] | None = None,
    deadline: float | None = None,
    clock: Any = None,
) -> defer.Deferred[FanOutResult]:
    """Send an order to every host, at most `max_parallel` at once (None: the client's setting;
    0: no limit). With `batch`, hosts go in batches, each started once the one before has
    answered; once more hosts failed than `max_fail` (unreachable and timed-out hosts count as
    failed), no new batch starts and the rest are reported as skipped. Fires as soon as the
    last host started has answered.

    With a `deadline` (seconds on `clock`), it fires by then at the latest, every host with a
    result: a host still unanswered is `Process Timeout(deadline)!` and its connection dropped,
    a host still waiting for a slot or its batch is reported not ordered. So that the hosts at
    the back are ordered too, each host started may take no more than its share of the time
    left (`host_share`) when that is shorter than thread_timeout."""
    hosts = list(dict.fromkeys(hosts))
    total = len(hosts)
    batch_size = parse_budget(batch, total, "batch") or total or 1
    budget = parse_budget(max_fail, total, "max_fail", round_up=False)
    limit = client.options.max_parallel if max_parallel is None else max_parallel
    sem = defer.DeferredSemaphore(limit if limit > 0 else max(1, total))
    results: dict[str, HostResult] = {}
    make = order_for if callable(order_for) else (lambda _h, o=order_for: o)
    orders: dict[str, Order] = {}
    position = {h: i for i, h in enumerate(hosts)}
    pending: dict[str, defer.Deferred[HostResult]] = {}  # sent or waiting for a slot
    started: set[str] = set()
    timers: dict[str, Any] = {}  # host -> its share's DelayedCall
    end = clock.seconds() + deadline if deadline is not None else None

    def record(result: HostResult, host: str) -> None:
        # Keyed by the host as given, whatever the client put in the result. The first result
        # counts: the deadline's, or the host's own.
        if host in results:
            return
        timer = timers.pop(host, None)
        if timer is not None and timer.active():
            timer.cancel()
        pending.pop(host, None)
        results[host] = result
        if on_result is not None:
            on_result(result)

    def give_up(give_up_on: dict[str, str]) -> None:
        """Record each host's reason first, then drop what they wait for: a dropped host frees
        a slot, and a host recorded here must not start in it."""
        waiting = [pending.get(h) for h in give_up_on]
        for host, message in give_up_on.items():
            record(unanswered(host, orders.get(host) or make(host), message), host)
        for d in waiting:
            if d is not None:
                d.cancel()

    def start(host: str, order: Order) -> defer.Deferred[HostResult]:
        if host in results:  # the deadline passed while it waited for this slot
            return defer.succeed(results[host])
        started.add(host)
        if end is not None:
            left = end - clock.seconds()
            in_flight = sum(1 for h in started if h not in results)  # this host's included
            rounds = rounds_to_order(position[host], total, batch_size, limit, in_flight - 1)
            share = host_share(left, rounds, client.options.thread_timeout)
            if share is not None and share < left:  # else the deadline itself ends it
                message = process_timeout(round(share, 1))
                timers[host] = clock.callLater(share, give_up, {host: message})
        return client.send(host, order)

    def send(host: str) -> defer.Deferred[None]:
        order = orders[host] = make(host)

        def broken(f: Failure) -> HostResult:
            if host in results:  # given up on (deadline): its send was cancelled
                return results[host]
            # `send` promises never to fail; if it does, the host still gets a result.
            OrderClient.log.failure(
                "sending {order} to {host} failed", f, order=order.order, host=host
            )
            return send_failed(host, order, f.value)

        d = pending[host] = sem.run(start, host, order)
        return d.addErrback(broken).addCallback(record, host)

    def expire() -> None:
        assert deadline is not None
        late = {
            h: process_timeout(deadline) if h in started else not_ordered(deadline)
            for h in hosts
            if h not in results
        }
        OrderClient.log.warn(
            "{order}: {late} of {total} hosts had not answered at the {deadline:g} s deadline"
            " ({unordered} of them not ordered)",
            order=next(iter(orders.values())).order if orders else "",
            late=len(late),
            total=total,
            deadline=deadline,
            unordered=sum(1 for h in late if h not in started),
        )
        give_up(late)

    @defer.inlineCallbacks
    def run() -> Any:
        stopped = False
        for start_at in range(0, total, batch_size):
            if len(results) == total:  # the deadline passed
                break
            if budget is not None and start_at > 0:
                failed = sum(1 for r in results.values() if not r.succeeded)
                if failed > budget:
                    stopped = True
                    for host in hosts[start_at:]:
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
            yield defer.gatherResults([send(h) for h in hosts[start_at : start_at + batch_size]])
        return FanOutResult({h: results[h] for h in hosts}, stopped)

    alarm = clock.callLater(deadline, expire) if deadline is not None and total else None
    done = run()

    def disarm(result: Any) -> Any:
        if alarm is not None and alarm.active():
            alarm.cancel()
        return result

    return done.addBoth(disarm)
