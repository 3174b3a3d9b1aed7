"""Fan-out with a deadline, on a Clock: it fires by then with a result for every host; each host
ordered gets its share of the time left so that the hosts at the back are ordered too; hosts
still waiting for a slot or a batch are reported not ordered; with the real OrderClient every
connection and attempt is dropped at the deadline."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from deploy.client import (
    ClientOptions,
    FanOutResult,
    OrderClient,
    fan_out,
    host_share,
    rounds_to_order,
)
from tests.test_fanout import ORDER, FakeClient, hosts, run

NEVER = 10_000.0  # a host that accepts and never answers


def test_deadline_shares_the_time_so_the_last_host_is_ordered():
    """Nine hosts that never answer ahead of a good one, 3 at once, deadline 8 s: each silent
    host gets its share (2 s) instead of thread_timeout (10 s), the good host last is ordered
    and answers, and the fan-out fires before the deadline with every host."""
    clock = Clock()
    silent = hosts(9)
    client = FakeClient(clock, delays={**dict.fromkeys(silent, NEVER), "good": 0.5})
    d = fan_out(client, [*silent, "good"], ORDER, max_parallel=3, deadline=8, clock=clock)
    result, at = run(d, clock, step=0.5)
    assert at == 6.5
    assert result.results["good"].succeeded
    assert [result.results[h].content for h in silent] == ["Process Timeout(2)!"] * 9
    assert all(result.results[h].server_status == 0 for h in silent)
    assert [t for t, _ in client.sent] == [0, 0, 0, 2, 2, 2, 4, 4, 4, 6]
    assert sorted(h for _, h in client.cancelled) == silent  # each silent connection dropped
    assert client.in_flight == 0
    assert not clock.getDelayedCalls(), "a timer outlived the fan-out"


def test_deadline_reports_hosts_still_waiting_for_a_slot_as_not_ordered():
    """30 silent hosts, 2 at once, deadline 2.5 s: a share is at least 1 s, so six are ordered;
    at the deadline the two in flight are `Process Timeout(2.5)!` and dropped, the 24 that
    waited for a slot are reported not ordered and never sent."""
    clock = Clock()
    many = hosts(30)
    client = FakeClient(clock, delays=dict.fromkeys(many, NEVER))
    d = fan_out(client, many, ORDER, max_parallel=2, deadline=2.5, clock=clock)
    result, at = run(d, clock, step=0.5)
    assert at == 2.5
    assert client.hosts_sent == many[:6]
    contents = [result.results[h].content for h in many]
    assert contents[:4] == ["Process Timeout(1)!"] * 4
    assert contents[4:6] == ["Process Timeout(2.5)!"] * 2
    assert contents[6:] == ["Process Timeout(2.5)! (not ordered before the deadline)"] * 24
    assert client.in_flight == 0 and len(client.cancelled) == 6
    assert not clock.getDelayedCalls()


def test_deadline_covers_batches_not_started():
    """Rolling one host per batch: the batches the deadline comes before are not ordered."""
    clock = Clock()
    many = hosts(10)
    client = FakeClient(clock, delays=dict.fromkeys(many, NEVER))
    d = fan_out(client, many, ORDER, batch=1, deadline=2.5, clock=clock)
    result, at = run(d, clock, step=0.5)
    assert at == 2.5 and client.hosts_sent == many[:3]
    assert result.results["h2"].content == "Process Timeout(2.5)!"
    assert all(
        result.results[h].content.endswith("(not ordered before the deadline)") for h in many[3:]
    )
    assert not result.stopped and not clock.getDelayedCalls()


def test_deadline_changes_nothing_when_the_hosts_answer_in_time():
    """Hosts answering within thread_timeout: the same sends and results as without deadline."""
    clock = Clock()
    client = FakeClient(clock, outcomes={"h3": "dead"})
    d = fan_out(client, hosts(10), ORDER, max_parallel=3, deadline=50, clock=clock)
    result, at = run(d, clock, step=0.5)
    assert at == 4 and [t for t, _ in client.sent] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert result.results["h3"].content == "can't connect to h3:3440"
    assert sum(r.succeeded for r in result.results.values()) == 9
    assert not client.cancelled and not clock.getDelayedCalls()


@pytest.mark.parametrize(
    ("position", "in_flight", "total", "batch_size", "limit", "expected"),
    [
        (0, 0, 401, 401, 64, 7),
        (63, 63, 401, 401, 64, 7),  # the last of the first round
        (320, 0, 401, 401, 64, 2),
        (320, 63, 401, 401, 64, 3),
        (400, 0, 401, 401, 64, 1),
        (400, 63, 401, 401, 64, 1),
        (0, 0, 10, 10, 0, 1),  # no limit: one round
        (0, 0, 10, 2, 64, 5),  # five batches, one round each
        (3, 1, 10, 2, 64, 4),  # the rest of its batch, then three more
        (0, 0, 10, 4, 3, 5),  # batches of 4, 4, 2 at most 3 at once: 2 + 2 + 1
    ],
)
def test_rounds_to_order(position, in_flight, total, batch_size, limit, expected):
    """Rounds of max_parallel hosts still needed for the hosts in flight and those from a host
    on, batch by batch."""
    assert rounds_to_order(position, total, batch_size, limit, in_flight) == expected


@pytest.mark.parametrize(
    ("remaining", "rounds", "thread_timeout", "expected"),
    [
        (50, 7, 10, 50 / 7),  # 401 hosts, 64 at once: every host is ordered in 50 s
        (50, 5, 10, None),  # five rounds of 10 s fit: thread_timeout as before
        (50, 70, 10, 1.0),  # at least MIN_HOST_SECONDS
        (0.5, 70, 10, 0.5),  # at most the time left
        (50, 7, 0, 50 / 7),  # no thread_timeout: the share still applies
    ],
)
def test_host_share(remaining, rounds, thread_timeout, expected):
    """A host's share of the time left: split over the rounds, within [1 s, time left]."""
    assert host_share(remaining, rounds, thread_timeout) == expected


# -- the real OrderClient


SILENT, CONNECTING, QUEUED = "127.0.0.2", "127.0.0.3", "127.0.0.4"  # address literals: no lookup


def test_real_client_at_the_deadline_drops_every_connection_and_attempt():
    """OrderClient under fan_out with a deadline: a host that accepted and never answers is
    aborted, an attempt still connecting is stopped, a host waiting for a slot is never
    connected to; every host has its result and no timer is left. (A deadline under
    MIN_HOST_SECONDS: the first hosts get all of it, not a share.)"""
    reactor = MemoryReactorClock()
    client = OrderClient(reactor, ClientOptions(port=3440, thread_timeout=30, socket_timeout=30))
    d = fan_out(
        client, [SILENT, CONNECTING, QUEUED], ORDER, max_parallel=2, deadline=0.5, clock=reactor
    )
    fired: list[FanOutResult] = []
    d.addCallback(fired.append)
    assert [c[0] for c in reactor.tcpClients] == [SILENT, CONNECTING]
    proto = reactor.tcpClients[0][2].buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    reactor.advance(0.499)
    assert not fired and not transport.disconnecting
    reactor.advance(0.001)
    assert fired, "the fan-out outlived its deadline"
    assert transport.disconnecting
    assert reactor.connectors[1].stoppedConnecting
    assert len(reactor.tcpClients) == 2, "a host was connected to after the deadline"
    results = fired[0].results
    assert results[SILENT].content == "Process Timeout(0.5)!"
    assert results[CONNECTING].content == "Process Timeout(0.5)!"
    assert results[QUEUED].content == "Process Timeout(0.5)! (not ordered before the deadline)"
    assert not reactor.getDelayedCalls(), "a timer outlived its host"
