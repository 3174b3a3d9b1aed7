"""Real processes for integration tests: an rsync daemon, `twistd -n deploy-agent` and
`deploy-proxy` on 127.0.0.x with free ports, and the real `deploy-client`. Every wait polls
with a deadline; every process started here is stopped by its pid when the test ends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from deploy.auth import legacy_auth_key

T = TypeVar("T")
BIN = Path(sys.executable).parent
DATA = Path(__file__).parent / "data"


def tool(name: str) -> str:
    """An executable next to this interpreter (the venv's twistd/deploy-client), else on PATH."""
    candidate = BIN / name
    if candidate.exists():
        return str(candidate)
    import shutil

    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed (run scripts/setup.sh)")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


def wait_until(
    predicate: Callable[[], T], timeout: float = 20.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what or predicate}")
        time.sleep(interval)


def can_connect(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Daemon:
    """A child process we started; `stop()` ends it (TERM, then KILL) and only it."""

    name = "daemon"

    def __init__(
        self, argv: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.argv = argv
        self.log = log
        self._log_file = open(log, "ab")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_listening(self, host: str, port: int, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()}"
                )
            return can_connect(host, port)

        wait_until(ready, timeout, what=f"{self.name} to listen on {host}:{port}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log_file.close()


class RsyncDaemon(Daemon):
    """`rsync --daemon --no-detach` serving `modules` read-only on host:port."""

    name = "rsyncd"

    def __init__(self, workdir: Path, modules: dict[str, Path], host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port(host)
        conf = workdir / f"rsyncd-{self.port}.conf"
        lines = ["use chroot = no", "max connections = 0", f"log file = {workdir}/rsyncd.log"]
        for name, path in modules.items():
            lines += [f"[{name}]", f"    path = {path}", "    read only = yes", "    list = yes"]
        conf.write_text("\n".join(lines) + "\n")
        super().__init__(
            [
                tool("rsync") if (BIN / "rsync").exists() else "rsync",
                "--daemon",
                "--no-detach",
                f"--config={conf}",
                f"--port={self.port}",
                f"--address={host}",
            ],
            workdir / f"rsyncd-{self.port}.out",
        )
        self.wait_listening(host, self.port)

    def url(self, module: str) -> str:
        return f"{self.host}::{module}/"


def agent_ini(
    *,
    host: str,
    port: int,
    state: Path,
    allow_paths: list[Path],
    groups: dict[str, dict[str, Any]] | None = None,
    jobs: Path | None = None,
    server: dict[str, Any] | None = None,
    allow_hosts: tuple[str, ...] = ("127.0.0.0/8", "::1"),
) -> str:
    """An agent config in the original's dialect."""
    out = ["[server]", f"addr = {host}", f"port = {port}", f"state_path = {state}"]
    out += [f"{k} = {v}" for k, v in (server or {}).items()]
    out += ["", "[allow::hosts]"] + [f"host[] = {h}" for h in allow_hosts]
    out += ["", "[allow::paths]"] + [f"path[] = {p}" for p in allow_paths]
    for name, keys in (groups or {}).items():
        out += ["", f"[rsync::group::{name}]"]
        for key, value in keys.items():
            if isinstance(value, list | tuple):
                out += [f"{key}[] = {v}" for v in value]
            else:
                out.append(f"{key} = {value}")
    if jobs is not None:
        out += ["", "[jobs]", f"path = {jobs}"]
    return "\n".join(out) + "\n"


class AgentProcess(Daemon):
    """`twistd -n --pidfile= deploy-agent --path INI` on host:port."""

    name = "deploy-agent"
    plugin = "deploy-agent"

    def __init__(
        self,
        workdir: Path,
        ini_text: str,
        host: str,
        port: int,
        extra: list[str] | None = None,
        wait: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.workdir = workdir
        self.ini = workdir / f"{self.plugin}-{host}-{port}.ini"
        self.ini.write_text(ini_text)
        super().__init__(
            [
                tool("twistd"),
                "-n",
                "--pidfile=",
                "--logfile=-",
                self.plugin,
                "--path",
                str(self.ini),
                *(extra or []),
            ],
            workdir / f"{self.plugin}-{host}-{port}.log",
            cwd=workdir,
        )
        if wait:
            self.wait_listening(host, port)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class ProxyProcess(AgentProcess):
    name = "deploy-proxy"
    plugin = "deploy-proxy"


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


def make_tree(root: Path, files: int = 20, size: int = 100, dirs: int = 4) -> Path:
    """A release tree: `files` files of `size` bytes spread over `dirs` directories."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        d = root / f"d{i % dirs:02d}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:05d}.dat").write_bytes(bytes([65 + i % 26]) * size)
    return root


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
