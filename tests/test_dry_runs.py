"""Dry runs (the rsync children behind status and rlist) are bounded: by dry_run_timeout even when
max_process_timeout is 0, and by their client — one that hangs up has its dry run stopped, while
an exec order runs on. On a clock, with children that never end by themselves and the signals
recorded instead of sent; the real agent is in tests/test_request_bounds.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from deploy import auth
from deploy.agent import AgentFactory, AgentService
from deploy.config import load_agent_config
from deploy.process import KILL_GRACE
from deploy.wire import Response
from tests.harness import agent_ini

NOW = 1_700_000_000.0
KEY = "dry-run-test-key"
PEER = IPv4Address("TCP", "127.0.0.1", 40000)
FIRST_PID = 4_000_001  # never signalled: the signals are recorded


class HangingTransport:
    """A spawned child as its protocol sees it; it ends only when the test ends it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def closeStdin(self) -> None:
        pass


class HangingProcessReactor(MemoryReactorClock):
    """A clock whose children run until `end()` is called for them."""

    def __init__(self) -> None:
        super().__init__()
        self.children: list[Any] = []

    def spawnProcess(self, proto: Any, executable: str, args: list[str], **kw: Any) -> Any:
        transport = HangingTransport(FIRST_PID + len(self.children))
        proto.makeConnection(transport)
        self.children.append(proto)
        return transport

    def end(self, index: int = 0, signal: int = 9) -> None:
        self.children[index].processEnded(Failure(ProcessTerminated(None, signal)))


class Signals:
    """The signals the stop policy sends to process groups and processes, recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[tuple[int, int]] = []
        monkeypatch.setattr("deploy.process.signal_group", self.record)
        monkeypatch.setattr("deploy.process.signal_pid", self.record)

    def record(self, pid: int, sig: int) -> bool:
        self.sent.append((pid, sig))
        return True


@pytest.fixture
def signals(monkeypatch: pytest.MonkeyPatch) -> Signals:
    return Signals(monkeypatch)


@pytest.fixture
def errors() -> Iterator[list[dict[str, Any]]]:
    """Every failure or error logged while the test runs."""
    found: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        level = getattr(event.get("log_level"), "name", "")
        if "log_failure" in event or level in ("error", "critical"):
            found.append(event)

    globalLogPublisher.addObserver(observe)
    yield found
    globalLogPublisher.removeObserver(observe)


def agent(tmp_path: Path, **server: Any) -> tuple[AgentService, HangingProcessReactor]:
    """An agent with a `web` group and an `app:true` job, on a fresh clock."""
    targets = tmp_path / "targets"
    targets.mkdir(exist_ok=True)
    jobs = tmp_path / "jobs.ini"
    jobs.write_text("app:true = /bin/true\n")
    ini = tmp_path / "agent.ini"
    ini.write_text(
        agent_ini(
            host="127.0.0.1",
            port=3440,
            state=tmp_path / "state",
            allow_paths=[targets],
            groups={"web": {"dest": "127.0.0.1::DEST/", "src": targets / "web"}},
            jobs=jobs,
            server={"key_cipher": KEY, **server},
        )
    )
    reactor = HangingProcessReactor()
    reactor.advance(NOW)
    return AgentService(load_agent_config(str(ini)), reactor), reactor


def result_of(d: defer.Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


@pytest.mark.parametrize(
    ("dry_run_timeout", "max_process_timeout", "limit"),
    [(300, 0, 300), (300, 20, 20), (5, 60, 5), (0, 0, 0), (0, 7, 7)],
)
def test_a_dry_run_is_bounded_by_the_smaller_limit(
    tmp_path: Path, dry_run_timeout: float, max_process_timeout: float, limit: float
) -> None:
    """The limit is the smaller of dry_run_timeout and max_process_timeout (0: no limit)."""
    service, _ = agent(
        tmp_path, dry_run_timeout=dry_run_timeout, max_process_timeout=max_process_timeout
    )
    assert service.orders.dry_run_limit() == limit


def test_default_config_bounds_dry_runs_at_300_seconds(tmp_path: Path) -> None:
    """With neither key set (max_process_timeout 0, the original's default) a dry run may
    still take 300 s at most."""
    service, _ = agent(tmp_path)
    assert service.config.server.max_process_timeout == 0
    assert service.orders.dry_run_limit() == 300


@pytest.mark.parametrize("order", ["status", "rlist"])
def test_dry_run_is_stopped_at_dry_run_timeout_without_max_process_timeout(
    tmp_path: Path, signals: Signals, order: str
) -> None:
    """A dry run that never ends gets TERM at the limit, KILL after the grace, and is answered
    `Process Timeout(N)!`; its slot is free again and no timer is left."""
    service, reactor = agent(tmp_path, dry_run_timeout=30)
    d = getattr(service.orders, "order_" + order)("web")
    assert service.orders.children == 1
    reactor.advance(29.9)
    assert signals.sent == []
    reactor.advance(0.1)
    assert signals.sent == [(FIRST_PID, 15)]
    reactor.advance(KILL_GRACE)
    assert signals.sent == [(FIRST_PID, 15), (FIRST_PID, 9)]
    reactor.end()
    response = result_of(d)
    assert isinstance(response, Response) and response.status == 200
    body = response.body.decode()
    assert '"return": "false"' in body and "Process Timeout(30)!" in body
    assert service.orders.children == 0
    assert reactor.getDelayedCalls() == []


def test_cancelled_dry_run_stops_its_child_and_holds_its_slot_until_it_ends(
    tmp_path: Path, signals: Signals
) -> None:
    """Cancelling a dry run's Deferred (its client went away) TERMs the child at once, KILLs it
    after the grace; the child counts against max_prefork until it has really ended."""
    service, reactor = agent(tmp_path)
    d = service.orders.order_status("web")
    d.cancel()
    assert isinstance(result_of(d).value, defer.CancelledError)
    assert signals.sent == [(FIRST_PID, 15)]
    assert service.orders.children == 1
    reactor.advance(KILL_GRACE)
    assert signals.sent == [(FIRST_PID, 15), (FIRST_PID, 9)]
    reactor.end()
    assert service.orders.children == 0
    assert reactor.getDelayedCalls() == []


def connect(service: AgentService, order: str, options: str) -> tuple[Any, StringTransport]:
    """A connection that has sent one signed order and waits for its answer."""
    proto = AgentFactory(service).buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    proto.makeConnection(transport)
    path = f"/agent/{order}"
    body = f"options={options}&args=".encode()
    head = (
        f"POST {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
        f"Authorization: {auth.sign_request(KEY, 'POST', path, body, now=NOW)}\r\n\r\n"
    )
    proto.dataReceived(head.encode() + body)
    return proto, transport


@pytest.mark.parametrize("order", ["status", "rlist"])
def test_client_hanging_up_stops_its_dry_run(
    tmp_path: Path, signals: Signals, errors: list[dict[str, Any]], order: str
) -> None:
    """A client that hangs up before its answer has its dry run stopped (nobody will read the
    answer); nothing is written and no error is logged."""
    service, reactor = agent(tmp_path)
    proto, transport = connect(service, order, "web")
    assert service.orders.children == 1 and signals.sent == []
    proto.connectionLost(Failure(ConnectionDone()))
    assert signals.sent == [(FIRST_PID, 15)]
    reactor.advance(KILL_GRACE)
    reactor.end()
    assert service.orders.children == 0
    assert transport.value() == b""
    assert errors == []
    assert reactor.getDelayedCalls() == []


def test_answered_dry_run_is_not_stopped_when_the_connection_closes(
    tmp_path: Path, signals: Signals
) -> None:
    """The connection closing after the answer was written stops nothing."""
    service, reactor = agent(tmp_path)
    proto, transport = connect(service, "status", "web")
    reactor.end(signal=15)
    assert transport.value().startswith(b"HTTP/1.1 200 OK")
    proto.connectionLost(Failure(ConnectionDone()))
    assert signals.sent == []


def test_exec_runs_on_when_its_client_hangs_up(tmp_path: Path, signals: Signals) -> None:
    """An exec command is not stopped when its client hangs up (a half-done restart is worse
    than an unread answer); it keeps its slot until it ends."""
    service, reactor = agent(tmp_path)
    proto, _ = connect(service, "exec", "app:true")
    assert service.orders.children == 1
    proto.connectionLost(Failure(ConnectionDone()))
    reactor.advance(3600)
    assert signals.sent == []
    assert service.orders.children == 1
    reactor.end()
    assert service.orders.children == 0
