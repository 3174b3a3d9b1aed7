"""systemd readiness and watchdog without systemd: the datagrams a daemon sends to a
NOTIFY_SOCKET the test owns (a path, or an abstract `@` name), READY only once its port accepts
connections, watchdog pings from the reactor, RELOADING around a SIGHUP and STOPPING at the end."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid

from twisted.internet import defer
from twisted.internet.task import Clock

from deploy import sdnotify
from tests.harness import ChildProcess, agent_ini, can_connect, free_port, tool, wait_until


class NotifySocket:
    """A datagram socket standing in for systemd's: every message with whether the daemon's
    port accepted a connection when it came."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(sdnotify.socket_address(address))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[dict[str, str], bool]] = []

    def poll(self, port: int | None = None) -> list[dict[str, str]]:
        try:
            while True:
                data = self.sock.recv(4096)
                fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
                listening = port is not None and can_connect("127.0.0.1", port)
                self.messages.append((fields, listening))
        except (TimeoutError, BlockingIOError):
            pass
        return [m for m, _ in self.messages]

    def close(self) -> None:
        self.sock.close()


def test_notifier_sends_to_a_path_and_to_an_abstract_socket(tmp_path):
    """`KEY=value` lines in one datagram, to a socket path or to `@name` (abstract); without
    NOTIFY_SOCKET nothing is sent; a socket nobody listens on is not an error."""
    for address in (str(tmp_path / "notify"), f"@deploy-test-{uuid.uuid4().hex}"):
        listener = NotifySocket(address)
        try:
            assert sdnotify.Notifier(address).send(READY=1, STATUS="listening on x")
            assert listener.poll() == [{"READY": "1", "STATUS": "listening on x"}]
        finally:
            listener.close()
    assert not sdnotify.Notifier(None).send(READY=1)
    assert not sdnotify.Notifier(str(tmp_path / "nobody")).send(READY=1)


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process():
    """WATCHDOG_USEC=2000000 pings every second; not for another WATCHDOG_PID, nor when unset;
    the variables are taken out of the environment children inherit."""
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "2000000"}, 7) == 1.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "7"}, 7) == 1.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "8"}, 7) is None
    assert sdnotify.watchdog_interval({}, 7) is None
    environ = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1", "PATH": "/bin"}
    assert sdnotify.take_environment(environ) == {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1"}
    assert environ == {"PATH": "/bin"}


class Recorder(sdnotify.Notifier):
    def __init__(self) -> None:
        super().__init__("@recorder")
        self.sent: list[dict[str, object]] = []

    def send(self, **fields: object) -> bool:
        self.sent.append(fields)
        return True


def test_notify_service_is_ready_only_once_listening_and_pings_on_the_clock():
    """READY=1 waits for the port; WATCHDOG=1 at once and every interval of the clock; reload
    and stop say so; no ping after the stop (its timer is cancelled)."""
    clock = Clock()
    listening: defer.Deferred[object] = defer.Deferred()
    recorder = Recorder()
    svc = sdnotify.NotifyService(
        clock, recorder, lambda: listening, describe=lambda: "listening on h:1", watchdog=5.0
    )
    svc.startService()
    assert recorder.sent == [{"WATCHDOG": 1}]
    clock.advance(5)
    assert recorder.sent[-1] == {"WATCHDOG": 1} and len(recorder.sent) == 2
    listening.callback(object())
    assert recorder.sent[-1] == {"READY": 1, "STATUS": "listening on h:1", "MAINPID": os.getpid()}
    svc.reloading()
    assert recorder.sent[-1]["RELOADING"] == 1 and "MONOTONIC_USEC" in recorder.sent[-1]
    svc.reloaded("reloaded")
    assert recorder.sent[-1] == {"READY": 1, "STATUS": "reloaded"}
    svc.stopService()
    assert recorder.sent[-1] == {"STOPPING": 1, "STATUS": "stopping"}
    assert not clock.getDelayedCalls()


def test_real_agent_notifies_ready_after_listening_and_feeds_the_watchdog(tmp_path):
    """A real agent with NOTIFY_SOCKET (abstract) and WATCHDOG_USEC=400000: READY=1 arrives
    when its port already accepts connections, with a STATUS line; watchdog pings come every
    0.2 s; SIGHUP brings RELOADING=1 then READY=1; SIGTERM brings STOPPING=1."""
    address = f"@deploy-test-{uuid.uuid4().hex}"
    listener = NotifySocket(address)
    port = free_port()
    ini = tmp_path / "agent.ini"
    ini.write_text(
        agent_ini(host="127.0.0.1", port=port, state=tmp_path / "state", allow_paths=[tmp_path])
    )
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    argv = [tool("twistd"), "-n", "--pidfile=", "--logfile=-", "deploy-agent", f"--path={ini}"]
    agent = ChildProcess(argv, tmp_path / "agent.log", cwd=tmp_path, env=env, name="deploy-agent")
    try:

        def ready() -> bool:
            assert agent.proc.poll() is None, agent.log_text()
            return any(m.get("READY") == "1" for m in listener.poll(port))

        wait_until(ready, 30, 0.01, "READY=1")
        fields, was_listening = next((m, ok) for m, ok in listener.messages if "READY" in m)
        assert was_listening, "READY=1 came before the port accepted connections"
        assert fields["STATUS"] == f"listening on 127.0.0.1:{port}"
        assert int(fields["MAINPID"]) == agent.pid
        started = time.monotonic()
        wait_until(
            lambda: sum(m == {"WATCHDOG": "1"} for m in listener.poll(port)) >= 4,
            10,
            0.01,
            "watchdog pings",
        )
        assert time.monotonic() - started < 5
        os.kill(agent.pid, signal.SIGHUP)
        wait_until(
            lambda: any(m.get("STATUS") == "reloaded" for m in listener.poll(port)),
            10,
            0.01,
            "the reload to be notified",
        )
        reloading = [m for m in listener.poll() if "RELOADING" in m]
        assert reloading and int(reloading[0]["MONOTONIC_USEC"]) > 0
        agent.stop()
        assert {"STOPPING": "1", "STATUS": "stopping"} in listener.poll()
    finally:
        agent.stop()
        listener.close()
