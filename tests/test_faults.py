"""Faults around a real `twistd -n deploy-agent`: its rsync daemon killed mid-transfer, a target
directory it cannot write, a host that accepts and never answers, a slow-loris client, a
thousand idle connections. Each ends in a clear outcome and the agent keeps serving. (The rsync
daemon down, and the agent SIGKILLed mid-sync and restarted, are proven in test_agent_orders.py
and test_jobs_integration.py: see docs/robustness.md.)"""

from __future__ import annotations

import base64
import os
import resource
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deploy.client import ClientOptions, Order, build_request
from deploy.process import all_processes
from tests.conftest import JOBS, Daemons
from tests.harness import (
    AgentProcess,
    RsyncDaemon,
    ask,
    make_tree,
    parse_response,
    run_client,
    wait_until,
)

SOCKET_TIMEOUT = 2
IDLE_CONNECTIONS = 1000
# A file descriptor per idle connection on each side, plus what the agent and pytest hold.
NEEDED_FDS = 2 * IDLE_CONNECTIONS + 512
LOW_SOFT_LIMIT = 512
# 3 MB at 300 kB/s: a transfer of about 10 s, stopped after its first progress.
BIG_FILES, BIG_SIZE, BWLIMIT = 30, 100_000, 300


@dataclass
class Env:
    work: Path
    targets: Path
    rsyncd: RsyncDaemon
    doomed: RsyncDaemon
    agent: AgentProcess

    def ask(self, order: str, options: str, timeout: float = 15.0) -> tuple[int, Any]:
        """One signed order, as deploy-client sends it: (status, JSON answer or text)."""
        return ask(self.agent, order, options, timeout)


def raise_fd_limit(needed: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to `needed` (within the hard limit); answers the
    old limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    assert limit >= needed, f"the hard limit {hard} is below the {needed} descriptors needed"
    if soft != resource.RLIM_INFINITY and soft < limit:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    return soft, hard


@pytest.fixture(scope="module")
def env(module_daemons: Daemons) -> Iterator[Env]:
    daemons = module_daemons
    work = daemons.workdir
    old_limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        tree = make_tree(work / "tree", files=5, size=100)
        targets = work / "targets"
        targets.mkdir()
        jobs = work / "jobs.ini"
        jobs.write_text(JOBS)
        rsyncd = daemons.rsyncd({"DEST": tree})
        big = make_tree(work / "big", files=BIG_FILES, size=BIG_SIZE)
        doomed = daemons.rsyncd({"BIG": big})  # killed mid-transfer by its test
        base = ["--archive", "--delete"]
        # twistd inherits this process's limit: start it under a soft limit that 1000
        # connections exceed (systemd's default, 1024, barely fits them), which the agent must
        # raise itself to hold the idle clients and still serve.
        resource.setrlimit(resource.RLIMIT_NOFILE, (LOW_SOFT_LIMIT, old_limits[1]))
        agent = daemons.agent(
            groups={
                "web": rsyncd.group(targets / "web", *base),
                "midway": doomed.group(
                    targets / "midway", "--archive", f"--bwlimit={BWLIMIT}", module="BIG"
                ),
                "readonly": rsyncd.group(targets / "readonly", *base),
            },
            jobs=jobs,
            state=work / "state",
            allow_paths=[targets],
            # A burst of 1000 connects overflows the default listen backlog (128) for an instant,
            # and the kernel then makes some clients retry their SYN a second later.
            server={"socket_timeout": SOCKET_TIMEOUT, "backlog": 1024},
        )
        raise_fd_limit(NEEDED_FDS)  # for this process's own end of the idle connections
        yield Env(work, targets, rsyncd, doomed, agent)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old_limits)


@pytest.fixture(autouse=True)
def agent_survives(env: Env) -> Iterator[None]:
    """Whatever a fault did, the agent still runs and answers afterwards."""
    yield
    assert env.agent.proc.poll() is None, f"the agent died:\n{env.agent.log_text()}"
    assert env.ask("rkill", "web") == (200, {"return": "true", "process": []})


def last_rsync(env: Env, options: str, timeout: float = 30) -> dict[str, Any]:
    """Poll status until the target is idle with a lastRsync; that record."""

    def ended() -> dict[str, Any] | None:
        status, body = env.ask("status", options)
        assert status == 200, body
        return body.get("lastRsync") if body.get("alreadyRsync") != "true" else None

    return wait_until(ended, timeout, 0.1, f"the sync of {options} to end")


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (an rsync daemon forks one per connection)."""
    return [stat.pid for stat in all_processes() if stat.ppid == pid]


def open_sockets(pid: int) -> int:
    """How many sockets `pid` holds (its listening socket included)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


# --------------------------------------------------------------------------- the data plane


def test_rsync_daemon_killed_mid_transfer_is_failed_with_rsyncs_message(env: Env) -> None:
    """rsyncd SIGKILLed mid-transfer: the sync is `failed` with rsync's error; status shows it."""
    status, body = env.ask("rsync", "midway")
    assert status == 200 and body["return"] == "true", body

    def flowing() -> bool:
        status, body = env.ask("status", "midway")
        return body.get("progress", {}).get("bytes", 0) > 0

    wait_until(flowing, 20, 0.1, "bytes to flow")
    serving = children(env.doomed.pid)
    env.doomed.kill(signal.SIGKILL)
    for pid in serving:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    last = last_rsync(env, "midway")
    assert last["outcome"] == "failed", last
    assert last["exitCode"] not in (None, 0, 24)
    assert "rsync" in last["message"] and f"code {last['exitCode']}" in last["message"], last
    status, body = env.ask("status", "midway")
    assert body["return"] == "false" and body["lastRsync"] == last
    assert "Connection refused" in body["message"]


@pytest.fixture
def readonly_target(env: Env) -> Iterator[Path]:
    """`readonly`'s target directory, made unwritable for the agent (root writes through mode
    bits, so as root it is made immutable), restored afterwards."""
    path = env.targets / "readonly"
    path.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    else:
        path.chmod(0o555)
    try:
        yield path
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


def test_unwritable_target_directory_is_failed_with_the_reason(
    env: Env, readonly_target: Path
) -> None:
    """A target directory the agent cannot write: `failed`, code 23, rsync's reason."""
    status, body = env.ask("rsync", "readonly")
    assert status == 200, body
    last = last_rsync(env, "readonly")
    assert (last["outcome"], last["exitCode"]) == ("failed", 23), last
    assert "Operation not permitted" in last["message"] or "Permission denied" in last["message"]
    assert not list(readonly_target.iterdir())


# --------------------------------------------------------------------------- clients and peers


def test_a_host_that_accepts_and_never_answers_is_a_timeout_for_that_host_only(
    env: Env,
) -> None:
    """A silent host is `Process Timeout(1)!` for itself only; deploy-client exits 3 in time."""
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = silent.accept()
            except OSError:
                continue
            held.append(conn)  # never read from, never answered

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        started = time.monotonic()
        run = run_client(
            f"--hosts={address},{env.agent.address}",
            "--order=exec",
            "--options=service:echo,hi",
            "--thread-timeout=1",
            timeout=30,
        )
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        silent.close()
    assert held, "the client never connected to the silent host"
    assert run.entry(address, "exec")["content"] == "Process Timeout(1)!"
    assert run.entry(address, "exec")["serverStatus"] == 0
    answer = run.content(env.agent.address, "exec")
    assert base64.b64decode(answer["content"]) == b"hi\n"
    assert run.rc == 3
    assert elapsed < 8


def test_slow_loris_is_closed_at_socket_timeout_while_others_are_served(env: Env) -> None:
    """A one-byte-a-second client gets 408 at socket_timeout; others are answered meanwhile."""
    request = build_request(
        Order("exec", "service:echo,slow"), ClientOptions(), env.agent.host, time.time()
    )
    outcome: dict[str, Any] = {}

    def trickle() -> None:
        with socket.create_connection((env.agent.host, env.agent.port), timeout=10) as s:
            started = time.monotonic()
            selector = selectors.DefaultSelector()
            selector.register(s, selectors.EVENT_READ)
            sent = 0
            answer = b""
            # The pace is the selector's one-second wait; a bounded number of bytes.
            while sent < 4 * SOCKET_TIMEOUT:
                try:
                    s.sendall(request[sent : sent + 1])
                except OSError:
                    break
                sent += 1
                if selector.select(timeout=1.0):
                    break
            while chunk := s.recv(65536):
                answer += chunk
            outcome.update(sent=sent, answer=answer, elapsed=time.monotonic() - started)

    slow = threading.Thread(target=trickle)
    slow.start()
    latencies = []
    while slow.is_alive() and len(latencies) < 50:
        started = time.monotonic()
        status, body = env.ask("exec", "service:echo,fast")
        latencies.append(time.monotonic() - started)
        assert status == 200 and body["return"] == "true"
        slow.join(0.1)
    slow.join(30)
    assert parse_response(outcome["answer"])[0] == 408
    assert SOCKET_TIMEOUT - 0.2 <= outcome["elapsed"] < SOCKET_TIMEOUT + 1.5, outcome
    assert outcome["sent"] <= SOCKET_TIMEOUT + 2 < len(request)
    assert len(latencies) >= 3 and max(latencies) < 1.0, latencies


def test_a_thousand_idle_connections_while_status_answers(env: Env) -> None:
    """1000 idle connections: status and exec answer, all get 408, the agent serves on."""
    # Started under a 512-descriptor soft limit, the agent raises its own limit to cope.
    idle: list[socket.socket] = []
    try:
        started = time.monotonic()
        for _ in range(IDLE_CONNECTIONS):
            idle.append(socket.create_connection((env.agent.host, env.agent.port), timeout=10))
        opened = time.monotonic() - started
        assert opened < SOCKET_TIMEOUT / 2, f"opening took {opened:.2f}s"
        wait_until(
            lambda: open_sockets(env.agent.pid) > IDLE_CONNECTIONS,
            SOCKET_TIMEOUT - opened - 0.5,
            what="the agent to accept every idle connection",
        )
        asked = time.monotonic()
        status, body = env.ask("status", "web")
        assert status == 200 and body["return"] == "true", body
        assert env.ask("exec", "service:echo,busy")[0] == 200
        assert time.monotonic() - started < SOCKET_TIMEOUT, "answered only after the idle ones"
        assert time.monotonic() - asked < 1.5
        closed = 0
        for s in idle:
            s.settimeout(SOCKET_TIMEOUT + 5)
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
            assert parse_response(raw)[0] == 408
            closed += 1
        assert closed == IDLE_CONNECTIONS
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: open_sockets(env.agent.pid) < 5, 10, what="the agent to let them go")
    status, body = env.ask("status", "web")
    assert status == 200 and body["return"] == "true"
