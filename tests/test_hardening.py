"""Issue 12's attacks from outside, against a real `twistd -n deploy-agent` and `deploy-proxy`:
memory before authentication (huge bodies, a flood of stalled requests), an order whose client
hung up, a request replayed after `kill -9` and a restart, an API key looked for in every log,
log lines forged with control, C1, bidi and separator characters, and a client that never reads
its answer. The 3,000-connection flood itself is `bench/load.py --scenario flood`."""

from __future__ import annotations

import json
import resource
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from deploy.orders import ClientOptions, Order, build_request
from deploy.wire import MAX_HEAD, MAX_PENDING_BYTES
from tests.conftest import JOBS, Daemons
from tests.harness import (
    AgentProcess,
    ProxyProcess,
    free_port,
    parsed_answer,
    raw_request,
    wait_until,
)

SECRET = "proxy-secret-api-key-4242"
AGENT_BODY, PROXY_BODY = 16 * 1024, 64 * 1024


@dataclass
class Fleet:
    work: Path
    agent: AgentProcess
    proxy: ProxyProcess

    def logs(self, daemon: str) -> dict[str, Path]:
        return {kind: self.work / f"{daemon}-{kind}.log" for kind in ("error", "access", "audit")}


def log_settings(work: Path, daemon: str) -> dict[str, str]:
    return {
        "log_write": "true",
        "log_error_level": "debug",
        "log_error_path": str(work / f"{daemon}-error.log"),
        "log_access_path": str(work / f"{daemon}-access.log"),
        "audit_log_path": str(work / f"{daemon}-audit.log"),
    }


@pytest.fixture(scope="module")
def fleet(module_daemons: Daemons) -> Fleet:
    """An agent and a proxy in front of it, both logging everything (debug), with a request
    deadline long enough for a flood to stall."""
    work = module_daemons.workdir
    jobs = work / "jobs.ini"
    jobs.write_text(JOBS)
    (work / "targets").mkdir()
    agent = module_daemons.agent(
        jobs=jobs,
        state=work / "state",
        allow_paths=[work / "targets"],
        server={"socket_timeout": 10, **log_settings(work, "agent")},
    )
    api = work / "api.ini"
    api.write_text(f"[keys]\n{SECRET}[] = web\n[servers]\nweb[] = {agent.address}\n")
    port = free_port()
    server = "\n".join(f"{k} = {v}" for k, v in log_settings(work, "proxy").items())
    proxy = module_daemons.proxy(
        f"[server]\naddr = 127.0.0.1\nport = {port}\nsocket_timeout = 10\n{server}\n"
        f"[client]\nport = {agent.port}\n[allow::hosts]\nhost[] = 127.0.0.0/8\n"
        f"[api]\npath = {api}\n",
        "127.0.0.1",
        port,
        extra=["--debug"],
    )
    return Fleet(work, agent, proxy)


def signed(order: Order, *, now: float | None = None) -> bytes:
    """`order` as deploy-client sends it, signed at `now`."""
    return build_request(order, ClientOptions(), "127.0.0.1", time.time() if now is None else now)


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for {pid}")


# --------------------------------------------------------------------------- point 3: memory


def answered(sock: socket.socket) -> bytes:
    """What the daemon wrote on `sock` so far, without waiting (`sock` in blocking mode)."""
    try:
        return sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""
    except ConnectionResetError:
        return b"reset"


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Client sockets a test opens; all closed when it ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def stall(daemon: AgentProcess, sockets: list[socket.socket], data: bytes) -> socket.socket:
    sock = socket.create_connection((daemon.host, daemon.port), timeout=10)
    sockets.append(sock)
    sock.sendall(data)
    sock.settimeout(None)  # blocking: answered()'s MSG_DONTWAIT then never waits
    return sock


@pytest.mark.parametrize("which", ["agent", "proxy"])
def test_a_flood_of_1_mib_bodies_is_413_at_once_and_nothing_is_held(
    fleet: Fleet, sockets: list[socket.socket], which: str
) -> None:
    """300 connections announcing a 1 MiB body each (and stalling): every one is answered 413
    as soon as its head ends, long before socket_timeout; the daemon's RSS hardly moves."""
    daemon = getattr(fleet, which)
    before = rss_mib(daemon.pid)
    head = b"POST /agent/status HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n" + b"x" * 1000
    started = time.monotonic()
    flood = [stall(daemon, sockets, head) for _ in range(300)]
    wait_until(lambda: all(answered(s) for s in flood), 8, 0.05, "300 answers")
    assert time.monotonic() - started < 8
    assert {parsed_answer(answered(s))[0] for s in flood} == {413}
    assert rss_mib(daemon.pid) < before + 20


@pytest.mark.parametrize("which, cap", [("agent", AGENT_BODY), ("proxy", PROXY_BODY)])
def test_a_flood_of_stalled_requests_is_503_past_the_pending_budget(
    fleet: Fleet, sockets: list[socket.socket], which: str, cap: int
) -> None:
    """300 connections each send a head of almost MAX_HEAD and almost the largest body, then
    stall: past MAX_PENDING_BYTES held in all, each new one gets 503 and is closed, so the
    daemon never holds more; once they go, it serves a signed order again."""
    daemon = getattr(fleet, which)
    pad = [f"X-Pad-{i}: ".encode() + b"p" * 7000 for i in range((MAX_HEAD - 1024) // 7000)]
    head = b"\r\n".join(
        [b"POST /agent/status HTTP/1.1", f"Content-Length: {cap}".encode(), *pad, b"", b""]
    )
    data = head + b"x" * (cap - 100)
    conns = 300
    kept = MAX_PENDING_BYTES // len(data)
    assert kept < conns - 20
    flood = [stall(daemon, sockets, data) for _ in range(conns)]

    def refused() -> list[socket.socket]:
        done = [s for s in flood if answered(s)]
        return done if len(done) >= conns - kept - 1 else []

    for sock in wait_until(refused, 20, 0.05, "the connections past the budget to be refused"):
        status, text = parsed_answer(answered(sock))
        assert (status, text) == (503, "too many requests in flight; try again later")
    assert len([s for s in flood if answered(s)]) <= conns - kept + 1
    assert rss_mib(daemon.pid, "VmHWM") < 200
    for sock in flood:
        sock.close()
    order = Order("status", "web") if which == "agent" else Order("status", "web", "x", SECRET)

    def served() -> bool:
        status, _ = parsed_answer(raw_request(daemon.host, daemon.port, signed(order)))
        return status != 503

    wait_until(served, 10, 0.1, "the daemon to serve again")


# --------------------------------------------------------------------------- point 4: hang-ups


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def gone_record(path: Path, order: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        gone = [r for r in records(path) if r.get("clientGone") and r.get("order") == order]
        return gone[-1] if gone else None

    return wait_until(found, 20, 0.1, f"a clientGone record in {path.name}")


def hang_up_after(daemon: AgentProcess, data: bytes) -> None:
    with socket.create_connection((daemon.host, daemon.port), timeout=10) as sock:
        sock.sendall(data)


def test_an_order_whose_client_hung_up_leaves_its_access_line_and_audit_record(
    fleet: Fleet,
) -> None:
    """An exec that outlives its client (sleep 1; the client hangs up at once): the agent still
    writes its audit record (status 200, clientGone) and an access line that says so."""
    hang_up_after(fleet.agent, signed(Order("exec", "service:sleep,1")))
    logs = fleet.logs("agent")
    record = gone_record(logs["audit"], "exec")
    assert (record["options"], record["status"]) == ("service:sleep,1", 200)
    lines = logs["access"].read_text().splitlines()
    assert any(
        '"POST /agent/exec HTTP/1.1" 200 ' in line and line.endswith(' "client went away"')
        for line in lines
    )


def test_a_proxy_order_whose_client_hung_up_is_recorded_by_the_proxy(fleet: Fleet) -> None:
    """The same through the proxy: its record of the fanned-out exec says the client went away;
    the agent's record of the proxy's own request is an ordinary one."""
    hang_up_after(fleet.proxy, signed(Order("exec", "service:sleep,1", "groups:web", SECRET)))
    record = gone_record(fleet.logs("proxy")["audit"], "exec")
    assert (record["hosts"], record["status"]) == (1, 200)


# --------------------------------------------------------------------------- point 5: replays


def test_a_signed_request_captured_before_kill_9_is_refused_after_the_restart(
    daemons: Daemons, tmp_path: Path
) -> None:
    """Capture a request signed one second before it is sent (and run), `kill -9` the agent,
    start it again: the replay is 401, though the new agent's nonce cache is empty and the
    request is well inside the window; a freshly signed one runs."""
    agent = daemons.agent(jobs=_jobs(tmp_path))
    listening = time.time()
    wait_until(lambda: time.time() > listening + 1.1, 5, 0.05, "a second past the start")
    captured = signed(Order("exec", "app:true"), now=time.time() - 1)
    assert parsed_answer(raw_request(agent.host, agent.port, captured))[0] == 200
    assert parsed_answer(raw_request(agent.host, agent.port, captured))[0] == 401
    agent.kill()
    again = daemons.agent_from_text(agent.ini.read_text(), agent.host, agent.port)
    status, text = parsed_answer(raw_request(again.host, again.port, captured))
    assert (status, text) == (401, "request signed before this daemon started; sign it again")
    assert (
        parsed_answer(raw_request(again.host, again.port, signed(Order("exec", "app:true"))))[0]
        == 200
    )


def _jobs(tmp_path: Path) -> Path:
    jobs = tmp_path / "jobs.ini"
    jobs.write_text(JOBS)
    return jobs


def test_a_request_dated_in_the_future_beyond_the_skew_is_401(fleet: Fleet) -> None:
    """A request signed 30 s ahead (valid for the whole window before) is refused, before its
    body is read; 1 s ahead (clock drift) still passes."""
    agent = fleet.agent
    ahead = signed(Order("exec", "app:true"), now=time.time() + 30)
    assert parsed_answer(raw_request(agent.host, agent.port, ahead))[0] == 401
    drift = signed(Order("exec", "app:true"), now=time.time() + 1)
    assert parsed_answer(raw_request(agent.host, agent.port, drift))[0] == 200


# --------------------------------------------------------------------------- point 10: secrets


def test_the_api_key_reaches_no_log_in_any_of_its_forms(fleet: Fleet) -> None:
    """The API key in the proxy's path form (GET /api/<order>/<options>/<args>/<key>), in a
    query string and in a form body, answered 200 and 403: it is in no access, error (debug
    level) or audit line of the proxy or the agent, nor in twistd's own log; the audit names
    it by its id."""
    proxy = fleet.proxy
    audit = fleet.logs("proxy")["audit"]
    earlier = len(records(audit))
    key = quote(SECRET, safe="")
    requests = [
        f"GET /api/exec/service:echo,hi/groups:web/{key} HTTP/1.1\r\n\r\n".encode(),
        f"GET /api/exec/service:echo,hi/groups:nope/{key} HTTP/1.1\r\n\r\n".encode(),
        f"GET /agent/exec?options=service:echo,hi&args=groups:web&api_key={key} HTTP/1.1"
        "\r\n\r\n".encode(),
        signed(Order("exec", "service:echo,hi", "groups:web", SECRET)),
    ]
    statuses = [parsed_answer(raw_request(proxy.host, proxy.port, r))[0] for r in requests]
    assert statuses == [200, 403, 200, 200]
    wait_until(lambda: len(records(audit)) >= earlier + 4, 10, 0.1, "the audit records")
    texts = [p.read_text() for p in [*fleet.logs("proxy").values(), *fleet.logs("agent").values()]]
    texts += [proxy.log_text(), fleet.agent.log_text()]
    assert all(SECRET not in text for text in texts)
    access = fleet.logs("proxy")["access"].read_text()
    assert "GET /api/exec/service:echo,hi/groups:web/<redacted> HTTP/1.1" in access
    assert "api_key=<redacted>" in access
    from deploy.logs import api_key_id

    assert {r["apiKeyId"] for r in records(audit)[earlier:]} == {api_key_id(SECRET)}


# --------------------------------------------------------------------------- point 14: forgery


FORGING = "\n[2026/01/01 00:00:00] [info] (deploy.agent) forged\x85\u2028\u2029\u202e\u2066\x1b[31m"


def test_request_text_cannot_forge_a_log_line(fleet: Fleet) -> None:
    """Options (to the agent) and args (through the proxy) holding a newline, NEL, U+2028/9, a
    bidi override, an isolate and an ANSI escape: no log file of either daemon holds any of them
    raw, every error-log line is an event's or an indented continuation, each audit line is one
    record whose JSON gives back exactly what was sent; twistd's own log has none of them
    either."""
    agent, proxy = fleet.agent, fleet.proxy
    status, _ = parsed_answer(
        raw_request(agent.host, agent.port, signed(Order("status", "web" + FORGING)))
    )
    assert status == 400
    # Refused (the forged text is no granted group), and granted (the line breaks alone are
    # stripped from the group names, so the order runs and is logged).
    for args, expected in (("groups:web," + FORGING, 403), ("groups:web,\n\x85\u2028\u2029", 200)):
        order = Order("exec", "service:echo,hi", args, SECRET)
        assert parsed_answer(raw_request(proxy.host, proxy.port, signed(order)))[0] == expected
        wait_until(
            lambda args=args: any(
                r.get("args") == args for r in records(fleet.logs("proxy")["audit"])
            ),
            10,
        )
    wait_until(
        lambda: any(
            r.get("options") == "web" + FORGING for r in records(fleet.logs("agent")["audit"])
        ),
        10,
    )
    for daemon in ("agent", "proxy"):
        for kind, path in fleet.logs(daemon).items():
            raw = path.read_text()
            for char in "\x85\u2028\u2029\u202e\u2066\x1b":
                assert char not in raw, (daemon, kind, repr(char))
            lines = raw.splitlines()
            if kind == "error":
                assert all(line.startswith(("[", "    ")) for line in lines), (daemon, lines)
                assert not any("] forged" in line[:40] for line in lines)
            if kind == "audit":
                assert all(isinstance(json.loads(line), dict) for line in lines)
        # twistd's own log (stdout; the journal under systemd) gets the same events.
        twistd = getattr(fleet, daemon).log_text()
        assert not any(char in twistd for char in "\x85\u2028\u2029\u202e\u2066\x1b"), daemon
        assert not any(line.startswith("[2026/01/01") for line in twistd.splitlines()), daemon


# --------------------------------------------------------------------------- point 15: readers


def agent_holds(agent: AgentProcess, client_port: int) -> bool:
    """Whether the agent process still has the connection from `client_port` open."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(address.split(":")[1], 16) for address in fields[1:3])
        if (local, remote) == (agent.port, client_port):
            inodes.add(f"socket:[{fields[9]}]")
    fds = Path(f"/proc/{agent.pid}/fd")
    held = set()
    for fd in fds.iterdir():
        try:
            held.add(str(fd.readlink()))
        except OSError:
            pass  # closed meanwhile
    return bool(inodes & held)


def long_named_tree(root: Path, files: int) -> Path:
    """`files` empty files at the bottom of twelve nested 250-character directories: each is
    listed by rlist with a path of ~3,200 bytes, so the answer is `files` * 3.2 KB (more than
    the kernel's socket buffers take) for few files."""
    deep = root.joinpath(*(f"{level:02d}" + "d" * 248 for level in range(12)))
    deep.mkdir(parents=True)
    for i in range(files):
        (deep / (f"{i:05d}-" + "f" * 190)).touch()
    return root


def test_a_client_that_never_reads_a_large_answer_is_dropped_at_the_write_deadline(
    daemons: Daemons, tmp_path: Path
) -> None:
    """An rlist of 2,500 files with long paths (an 8 MB answer) to a client with a tiny receive
    buffer that never reads: the agent drops the connection socket_timeout after the answer
    started (not before, not never), frees what it buffered, and its RSS settles; a reading
    client gets the whole answer."""
    tree = long_named_tree(tmp_path / "tree", 2_500)
    rsyncd = daemons.rsyncd({"BIG": tree})
    (tmp_path / "targets").mkdir()
    agent = daemons.agent(
        groups={"big": rsyncd.group(tmp_path / "targets" / "big", "--archive", module="BIG")},
        allow_paths=[tmp_path / "targets"],
        server={"socket_timeout": 2},
    )
    request = signed(Order("rlist", "big"))
    raw = raw_request(agent.host, agent.port, request, timeout=60)
    status, whole = parsed_answer(raw)
    assert status == 200 and len(whole["transferNewFiles"]) > 2_500 and len(raw) > 7_000_000
    settled = rss_mib(agent.pid)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((agent.host, agent.port))
    try:
        sock.sendall(signed(Order("rlist", "big")))
        wait_until(lambda: answered(sock), 60, 0.02, "the answer to start")
        started = time.monotonic()
        client_port = sock.getsockname()[1]
        assert agent_holds(agent, client_port)
        wait_until(lambda: not agent_holds(agent, client_port), 15, 0.05, "the drop")
        took = time.monotonic() - started
        assert 1.5 < took < 2 + 2.5, took
        assert "did not take its answer within 2 s" in agent.log_text()
    finally:
        sock.close()
    wait_until(lambda: rss_mib(agent.pid) < settled + 15, 10, 0.1, "the agent's RSS to settle")
