"""Fan-out on a Clock: bounded concurrency, rolling batches with a failure budget, budget
rounding, per-host results for every host, and no waiting beyond the slowest answer."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from deploy.client import (
    ClientOptions,
    FanOutResult,
    HostResult,
    Order,
    OrderClient,
    fan_out,
    parse_budget,
    result_map,
)

ORDER = Order("exec", "app:true")


class FakeClient:
    """Stands in for OrderClient: every send answers after `delay` seconds of the Clock with the
    outcome named for that host, and the client counts what is in flight."""

    def __init__(
        self,
        clock: Clock,
        outcomes: dict[str, str] | None = None,
        delays: dict[str, float] | None = None,
        max_parallel: int = 64,
    ) -> None:
        self.clock = clock
        self.options = ClientOptions(max_parallel=max_parallel)
        self.outcomes = outcomes or {}
        self.delays = delays or {}
        self.sent: list[tuple[float, str]] = []
        self.cancelled: list[tuple[float, str]] = []
        self.in_flight = 0
        self.peak = 0

    def send(self, host: str, order: Order) -> defer.Deferred[HostResult]:
        self.sent.append((self.clock.seconds(), host))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)

        def cancel(_d: defer.Deferred[HostResult]) -> None:
            # as OrderClient drops the connection
            self.in_flight -= 1
            self.cancelled.append((self.clock.seconds(), host))
            call.cancel()

        d: defer.Deferred[HostResult] = defer.Deferred(cancel)

        def answer() -> None:
            self.in_flight -= 1
            outcome = self.outcomes.get(host, "ok")
            if outcome == "error":
                d.errback(RuntimeError("client bug"))
            else:
                d.callback(result_for(host, order, outcome))

        call = self.clock.callLater(self.delays.get(host, 1.0), answer)
        return d

    @property
    def hosts_sent(self) -> list[str]:
        return [h for _, h in self.sent]


def result_for(host: str, order: Order, outcome: str) -> HostResult:
    if outcome == "ok":
        return HostResult(host, order.order, 1, 200, "OK", {"return": "true"})
    if outcome == "false":  # answered, but the command failed
        return HostResult(host, order.order, 1, 200, "OK", {"return": "false"})
    if outcome == "400":
        return HostResult(host, order.order, 1, 400, "Bad Request", "exec[x] not found!")
    if outcome == "dead":
        return HostResult(host, order.order, 0, content=f"can't connect to {host}:3440")
    if outcome == "timeout":
        return HostResult(host, order.order, 0, content="Process Timeout(10)!")
    raise AssertionError(outcome)


def hosts(n: int) -> list[str]:
    return [f"h{i}" for i in range(n)]


def run(d: defer.Deferred[FanOutResult], clock: Clock, step: float = 0.1, limit: float = 100):
    """Advance the clock until `d` fires; returns (result, time it fired)."""
    box: list[Any] = []
    d.addBoth(lambda r: box.append((r, clock.seconds())))
    while not box:
        if clock.seconds() > limit:
            raise AssertionError("fan_out never finished")
        clock.advance(step)
    result, at = box[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result, at


def test_max_parallel_bounds_the_hosts_in_flight():
    """At most max_parallel sends are in flight; the rest start as slots free up."""
    clock = Clock()
    client = FakeClient(clock)
    result, at = run(fan_out(client, hosts(10), ORDER, max_parallel=3), clock, step=1.0)
    assert client.peak == 3
    assert [t for t, _ in client.sent] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert at == 4
    assert list(result.results) == hosts(10) and not result.stopped


def test_max_parallel_defaults_to_the_client_setting():
    """Without max_parallel, the client's options bound the fan-out."""
    clock = Clock()
    client = FakeClient(clock, max_parallel=2)
    run(fan_out(client, hosts(5), ORDER), clock)
    assert client.peak == 2


def test_max_parallel_zero_means_no_limit():
    """max_parallel = 0 sends to every host at once (0 is "no limit", as for max_prefork)."""
    clock = Clock()
    client = FakeClient(clock, max_parallel=0)
    run(fan_out(client, hosts(100), ORDER), clock)
    assert client.peak == 100


def test_fires_when_the_slowest_host_answers():
    """No polling floor: the fan-out fires at exactly the time the slowest host answered."""
    clock = Clock()
    client = FakeClient(clock, delays={"h0": 0.003, "h1": 0.017, "h2": 0.009})
    d = fan_out(client, hosts(3), ORDER)
    fired: list[FanOutResult] = []
    d.addCallback(fired.append)
    clock.advance(0.016)
    assert not fired
    clock.advance(0.001)
    assert fired and len(fired[0].results) == 3


def test_results_are_in_host_order_whatever_the_answer_order():
    """Results come back in the order the hosts were given, not the order they answered."""
    clock = Clock()
    client = FakeClient(clock, delays={"h0": 3, "h1": 1, "h2": 2})
    result, _ = run(fan_out(client, ["h0", "h1", "h2", "h1"], ORDER), clock)
    assert list(result.results) == ["h0", "h1", "h2"]
    assert client.hosts_sent == ["h0", "h1", "h2"]  # a host named twice is ordered once


def test_batches_start_in_order_after_the_previous_batch_answered():
    """With batch=2, each batch starts only once every host of the one before answered."""
    clock = Clock()
    client = FakeClient(clock, delays={"h1": 5})
    result, at = run(fan_out(client, hosts(5), ORDER, batch=2), clock, step=1.0)
    assert client.sent == [(0, "h0"), (0, "h1"), (5, "h2"), (5, "h3"), (6, "h4")]
    assert at == 7 and not result.stopped


def test_batch_is_bounded_by_max_parallel_too():
    """A batch larger than max_parallel still has at most max_parallel hosts in flight."""
    clock = Clock()
    client = FakeClient(clock)
    run(fan_out(client, hosts(6), ORDER, batch=4, max_parallel=2), clock, step=1.0)
    assert client.peak == 2
    assert [t for t, _ in client.sent] == [0, 0, 1, 1, 2, 2]


def test_budget_stops_the_rollout_once_more_hosts_failed_than_max_fail():
    """batch=1, max_fail=1: the second failure stops it; later hosts are skipped, never sent."""
    clock = Clock()
    client = FakeClient(clock, outcomes={"h1": "false", "h3": "400"})
    result, _ = run(fan_out(client, hosts(6), ORDER, batch=1, max_fail=1), clock)
    assert client.hosts_sent == ["h0", "h1", "h2", "h3"]
    assert result.stopped
    assert [r.host for r in result.skipped] == ["h4", "h5"]
    assert [r.host for r in result.failed] == ["h1", "h3"]
    shown = result_map(result.results.values(), numeric_code=True)
    assert shown["h4"]["exec"]["skipped"] is True
    assert shown["h4"]["exec"]["serverStatus"] == 0 and shown["h4"]["exec"]["return"] == 0
    assert "skipped" not in shown["h3"]["exec"]


def test_budget_equal_to_failures_does_not_stop():
    """Failures equal to max_fail are within budget: only more than max_fail stops."""
    clock = Clock()
    client = FakeClient(clock, outcomes={"h0": "false", "h2": "false"})
    result, _ = run(fan_out(client, hosts(5), ORDER, batch=1, max_fail=2), clock)
    assert not result.stopped and client.hosts_sent == hosts(5)


def test_unreachable_and_timed_out_hosts_count_as_failed():
    """A host that could not be reached and one that timed out both use up the budget."""
    clock = Clock()
    client = FakeClient(clock, outcomes={"h0": "dead", "h2": "timeout"})
    result, _ = run(fan_out(client, hosts(6), ORDER, batch=2, max_fail=1), clock)
    assert client.hosts_sent == hosts(4)
    assert result.stopped and [r.host for r in result.skipped] == ["h4", "h5"]


def test_budget_is_checked_only_between_batches():
    """Failures inside a batch do not cancel the rest of that batch; the next one is skipped."""
    clock = Clock()
    outcomes = {"h0": "false", "h1": "false", "h2": "false"}
    client = FakeClient(clock, outcomes=outcomes)
    result, _ = run(fan_out(client, hosts(8), ORDER, batch=4, max_fail=0), clock)
    assert client.hosts_sent == hosts(4)
    assert [r.host for r in result.skipped] == ["h4", "h5", "h6", "h7"]


def test_max_fail_zero_stops_at_the_first_failed_batch():
    """max_fail=0 tolerates no failure: the batch after the first failure does not start."""
    clock = Clock()
    client = FakeClient(clock, outcomes={"h2": "dead"})
    result, _ = run(fan_out(client, hosts(5), ORDER, batch=1, max_fail=0), clock)
    assert client.hosts_sent == ["h0", "h1", "h2"] and result.stopped


def test_max_fail_percentage_rounds_down():
    """max_fail=10% of 5 hosts is 0.5 hosts: one failure (20%) is more, and stops the rollout."""
    clock = Clock()
    client = FakeClient(clock, outcomes={"h0": "false"})
    result, _ = run(fan_out(client, hosts(5), ORDER, batch=1, max_fail="10%"), clock)
    assert client.hosts_sent == ["h0"] and result.stopped


def test_batch_percentage_rounds_up():
    """batch=30% of 5 hosts is 1.5: batches of 2."""
    clock = Clock()
    client = FakeClient(clock)
    run(fan_out(client, hosts(5), ORDER, batch="30%"), clock, step=1.0)
    assert [t for t, _ in client.sent] == [0, 0, 1, 1, 2]


def test_without_batch_max_fail_has_no_batch_to_stop():
    """max_fail without batch: every host is one batch, so every host is ordered."""
    clock = Clock()
    client = FakeClient(clock, outcomes={"h0": "dead", "h1": "dead"})
    result, _ = run(fan_out(client, hosts(4), ORDER, max_fail=0), clock)
    assert client.hosts_sent == hosts(4) and not result.stopped


def test_a_failing_send_still_gives_that_host_a_result():
    """A client whose Deferred fails does not make the host vanish from the results."""
    clock = Clock()
    client = FakeClient(clock, outcomes={"h1": "error"})
    result, _ = run(fan_out(client, hosts(3), ORDER), clock)
    assert list(result.results) == hosts(3)
    broken = result.results["h1"]
    assert broken.server_status == 0 and "client bug" in broken.content
    assert [r.host for r in result.failed] == ["h1"]


def test_order_per_host():
    """order_for may be a function: each host gets the order it returns."""
    clock = Clock()
    client = FakeClient(clock)
    seen: list[str] = []
    real_send = client.send

    def send(host: str, order: Order) -> defer.Deferred[HostResult]:
        seen.append(f"{host}:{order.options}")
        return real_send(host, order)

    client.send = send  # type: ignore[method-assign]
    run(fan_out(client, hosts(2), lambda h: Order("exec", f"service:echo,{h}")), clock)
    assert seen == ["h0:service:echo,h0", "h1:service:echo,h1"]


def test_on_result_sees_each_host_as_it_answers():
    """on_result is called once per host, in answer order, skipped hosts included."""
    clock = Clock()
    client = FakeClient(clock, outcomes={"h0": "dead"}, delays={"h0": 2, "h1": 1})
    seen: list[str] = []
    run(
        fan_out(
            client, hosts(3), ORDER, batch=2, max_fail=0, on_result=lambda r: seen.append(r.host)
        ),
        clock,
    )
    assert seen == ["h1", "h0", "h2"]


def test_no_hosts():
    """An empty host list fires at once with no results."""
    clock = Clock()
    result, at = run(fan_out(FakeClient(clock), [], ORDER, batch="50%", max_fail=0), clock)
    assert result.results == {} and not result.stopped and at == 0


@pytest.mark.parametrize(
    ("value", "total", "round_up", "expected"),
    [
        (None, 10, True, None),
        ("", 10, True, None),
        ("3", 10, True, 3),
        (3, 10, True, 3),
        ("0", 10, True, 0),
        ("30%", 10, True, 3),
        ("25%", 10, True, 3),
        ("1%", 10, True, 1),
        ("0%", 10, True, 0),
        ("100%", 7, True, 7),
        ("33.3%", 3, True, 1),
        ("1.1%", 110, True, 2),
        ("10%", 30, False, 3),
        ("10%", 5, False, 0),
        ("50%", 5, False, 2),
        ("19%", 100, False, 19),
        ("1.1%", 1000, False, 11),
        ("100%", 7, False, 7),
        (" 2 ", 10, False, 2),
    ],
)
def test_parse_budget(value, total, round_up, expected):
    """N is taken as is; N% of the hosts rounds up for a batch and down for a failure budget."""
    assert parse_budget(value, total, "batch", round_up=round_up) == expected


@pytest.mark.parametrize("value", ["x", "-1", "101%", "-5%", "nan%", "inf%", "1.5", "%", "5%%"])
def test_parse_budget_refuses(value):
    """Anything but a non-negative N or a 0-100 N% is refused, naming the option."""
    with pytest.raises(ValueError, match="--max-fail: expected N or N%"):
        parse_budget(value, 10, "--max-fail")


# -- the real OrderClient under fan-out, on a MemoryReactorClock


ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
    b'Content-Length: 18\r\nConnection: close\r\n\r\n{"return": "true"}'
)


def test_real_client_per_host_timeout_closes_that_connection_only():
    """OrderClient under fan_out: a silent host times out and is aborted; others are not held."""
    reactor = MemoryReactorClock()
    client = OrderClient(reactor, ClientOptions(port=3440, thread_timeout=2, socket_timeout=1))
    d = fan_out(client, ["quick", "dead", "silent"], ORDER, max_parallel=3)
    fired: list[FanOutResult] = []
    d.addCallback(fired.append)
    assert len(reactor.tcpClients) == 3
    transports = []
    for i, (_h, port, factory, _t, _b) in enumerate(reactor.tcpClients):
        assert port == 3440
        if i == 1:
            factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
            transports.append(None)
            continue
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        transports.append((proto, transport))
    quick_proto, quick_transport = transports[0]
    assert quick_transport.value().startswith(b"POST /agent/exec HTTP/1.1\r\n")
    quick_proto.dataReceived(ANSWER)
    silent_transport = transports[2][1]
    assert not fired
    reactor.advance(1.999)
    assert not fired and not silent_transport.disconnecting
    reactor.advance(0.001)
    assert fired, "the fan-out waited beyond the per-host timeout"
    assert silent_transport.disconnecting
    results = fired[0].results
    assert results["quick"].http_ok and results["quick"].content == {"return": "true"}
    assert results["dead"].server_status == 0
    assert results["dead"].content == "can't connect to dead:3440"
    assert results["silent"].server_status == 0
    assert results["silent"].content == "Process Timeout(2)!"
    assert not reactor.getDelayedCalls(), "a timer outlived its host"
