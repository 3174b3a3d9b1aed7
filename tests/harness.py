"""What the integration tests add to `deploy.testing` (real daemons on loopback, shared with the
benchmark): the real `deploy-client`, raw requests and captured answers, scripted servers, and
stopping the syncs our agents left. Every wait polls with a deadline; every process started here
is stopped by its pid when the test ends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from deploy.auth import legacy_auth_key
from deploy.client import ClientOptions, Order, build_request
from deploy.testing import (  # noqa: F401  (re-exported: what the tests import from here)
    AgentProcess,
    ChildProcess,
    ProxyProcess,
    RsyncDaemon,
    agent_ini,
    can_connect,
    free_port,
    make_tree,
    tool,
    wait_until,
)

DATA = Path(__file__).parent / "data"


def shared_free_port(hosts: list[str]) -> int:
    """A port free on every one of `hosts` (a proxy's [client] port is one number for all)."""
    for _ in range(100):
        port = free_port(hosts[0])
        socks = []
        try:
            for host in hosts:
                s = socket.socket()
                socks.append(s)
                s.bind((host, port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return port
    raise AssertionError("no port free on all of " + ", ".join(hosts))


def jail(work: Path) -> tuple[Path, Path]:
    """`work/targets`, for an agent's allow::paths, holding `link`: a symlink to `work/outside`,
    where no order may write. Answers (targets, outside)."""
    targets, outside = work / "targets", work / "outside"
    targets.mkdir()
    outside.mkdir()
    (targets / "link").symlink_to(outside)
    return targets, outside


@dataclass
class ClientRun:
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)

    def entry(self, host: str, order: str) -> dict[str, Any]:
        return self.json[host][order]

    def content(self, host: str, order: str) -> Any:
        return self.entry(host, order)["content"]


def run_client(*args: str, timeout: float = 120.0, env: dict[str, str] | None = None) -> ClientRun:
    """Run the real `deploy-client` with `args`."""
    proc = subprocess.run(
        [tool("deploy-client"), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        env=env,
    )
    return ClientRun(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def refused_at_start(ini: Path, cwd: Path, port: int, plugin: str = "deploy-agent") -> str:
    """Run `twistd -n PLUGIN --path INI` with a config it must refuse: it exits non-zero
    without listening on `port` (127.0.0.1). Answers its output, to look for the reason in."""
    proc = subprocess.run(
        [tool("twistd"), "-n", "--pidfile=", "--logfile=-", plugin, "--path", str(ini)],
        capture_output=True,
        timeout=60,
        cwd=cwd,
    )
    output = (proc.stdout + proc.stderr).decode()
    assert proc.returncode != 0, output
    assert "starting on" not in output
    assert not can_connect("127.0.0.1", port)
    return output


def comm(pid: int) -> str:
    """The command name of `pid` (/proc/PID/comm), or "" when it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


class AgentClient:
    """Runs the real deploy-client against `self.agent`."""

    agent: AgentProcess

    def client(self, *args: str, **kw: Any) -> ClientRun:
        return run_client(f"--hosts={self.agent.address}", *args, **kw)


def raw_request(
    host: str, port: int, data: bytes, timeout: float = 15.0, chunk_delay: float = 0.0
) -> bytes:
    """Send raw bytes, read until the server closes; returns everything it sent."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        out = bytearray()
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def parsed_answer(raw: bytes) -> tuple[int, Any]:
    """An answer's status and body: the JSON when it is JSON, else the text."""
    status, _, body = parse_response(raw)
    text = body.decode("utf-8", "replace")
    return status, json.loads(text) if text.startswith("{") else text


def ask(agent: AgentProcess, order: str, options: str, timeout: float = 15.0) -> tuple[int, Any]:
    """One order straight to `agent`, signed as deploy-client signs it: (status, parsed answer)."""
    request = build_request(Order(order, options), ClientOptions(), agent.host, time.time())
    return parsed_answer(raw_request(agent.host, agent.port, request, timeout=timeout))


def legacy_request(name: str, replace: dict[str, str] | None = None, key: str = "65535") -> bytes:
    """A captured request from tests/data/wire with a fresh one-time auth_key (and paths
    rewritten by `replace`), its Content-Length fixed."""
    raw = (DATA / "wire" / f"{name}.request").read_bytes()
    head, _, body = raw.partition(b"\r\n\r\n")
    text = body.decode()
    fields = text.split("&")
    fresh = legacy_auth_key(key, time.time())
    fields = [f"auth_key={fresh}" if f.startswith("auth_key=") else f for f in fields]
    text = "&".join(fields)
    for old, new in (replace or {}).items():
        text = text.replace(old, new)
    body = text.encode()
    lines = [
        f"Content-Length: {len(body)}" if line.lower().startswith("content-length:") else line
        for line in head.decode().split("\r\n")
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# Captures of the original proxy refusing a request (tests/data/wire).
PROXY_REFUSALS = (
    "proxy-error-unknown-api-key",
    "proxy-error-group-not-granted",
    "proxy-error-host-not-granted",
    "proxy-error-args-syntax",
)


def captured_response(name: str) -> tuple[int, dict[str, str], bytes]:
    return parse_response((DATA / "wire" / f"{name}.response").read_bytes())


def stop_supervisors(state_dir: Path) -> None:
    """Stop sync supervisors and rsyncs recorded in `state_dir` (started by our agents)."""
    from deploy.jobstate import read_state
    from deploy.process import is_same_process

    if not state_dir.is_dir():
        return
    for path in state_dir.glob("*.json"):
        state = read_state(str(path)) or {}
        for pid_key, start_key, group in (
            ("rsyncPid", "rsyncStart", True),
            ("supervisorPid", "supervisorStart", False),
        ):
            pid = state.get(pid_key)
            if pid and is_same_process(pid, state.get(start_key)):
                try:
                    if group:
                        os.killpg(pid, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


class ScriptedServer:
    """A scripted agent, proxy or old Perl daemon on host:port, served by threads: keeps the bytes
    of every request and answers each with `reply`; with `reply=None` it never answers and
    notes when the other side closes."""

    def __init__(self, host: str, port: int = 0, reply: bytes | None = None) -> None:
        self.reply = reply
        self.sock = socket.create_server((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.requests: list[bytes] = []
        self.accepted: list[float] = []
        self.closed: list[float] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        self.accepted.append(time.monotonic())
        conn.settimeout(30)
        with conn:
            try:
                data = _read_request(conn)
                if data is not None:
                    self.requests.append(data)
                    if self.reply is not None:
                        conn.sendall(self.reply)
                        return
                while conn.recv(65536):
                    pass
            except OSError:
                pass  # a reset is a close too
            self.closed.append(time.monotonic())

    def last(self) -> tuple[str, dict[str, str], dict[str, str]]:
        """The last request: start line, headers (lower-case names), form fields."""
        head, _, body = self.requests[-1].partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])
        }
        fields = dict(parse_qsl(body.decode(), keep_blank_values=True))
        return lines[0], headers, fields

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _read_request(conn: socket.socket) -> bytes | None:
    """One request (head and Content-Length body) from `conn`; None if it closes first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    _, found, rest = head.partition("content-length:")
    length = int(rest.split("\r\n")[0]) if found else 0
    while len(data.partition(b"\r\n\r\n")[2]) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    return data
